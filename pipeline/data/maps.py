"""How a data job runs its one-call-per-shard work: the `Map` seam, and `local_map`, which runs the calls here.

The writer, the resume check and de-duplication take a `map` and never import ray: a command that was asked for
Ray passes `pipeline.launch.fanout.ray_map` down instead (same contract, the calls as Ray tasks).

The contract: `map(fn, calls, *, desc, progress, shared=None)` returns `[fn(*call) for call in calls]`, in call
order, with `shared` appended as the last argument of every call when it is not None (one large object, such as
a source or a hash index, that a fan-out ships once rather than once per call). `desc` names the progress bar,
counted in calls ("shard"), shown when `progress`. An exception of a call propagates.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from tqdm.auto import tqdm

__all__ = ["Map", "local_map"]


class Map(Protocol):
    def __call__(self, fn: Callable[..., Any], calls: Sequence[tuple], *, desc: str, progress: bool,
                 shared: Any = None) -> list[Any]: ...


def local_map(fn: Callable[..., Any], calls: Sequence[tuple], *, desc: str, progress: bool,
              shared: Any = None) -> list[Any]:
    """The calls one after the other in this process (see the module docstring)."""
    extra = () if shared is None else (shared,)
    out = []
    with tqdm(total=len(calls), unit="shard", desc=desc, disable=not progress) as bar:
        for call in calls:
            out.append(fn(*call, *extra))
            bar.update(1)
    return out
