"""Ray, reached from one place: `connect_ray` (the cluster at $RAY_ADDRESS, or a local one bound to 127.0.0.1) and
`ray_map`, the Ray form of the data floor's `Map` (pipeline.data.maps), which a command passes down to the writer or
de-duplication when the user asked for Ray. ray is imported inside the functions (`vitpipe --help` stays fast).

`ray_map` runs the calls as Ray tasks: one per call, or dealt strided into at most `max_tasks` (or `per_cpu` x the
cluster's CPUs) tasks that each run their calls in turn, so every task gets an even share. `shared` is put in the
object store once and handed to every task. Results come back in call order; the progress bar counts calls as their
task finishes. A call that raised ValueError (an unreadable shard, a bad argument) surfaces as that ValueError, its
one-line message, rather than Ray's wrapping of the task's traceback.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

__all__ = ["connect_ray", "ray_map"]


def connect_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Connects to `address` / $RAY_ADDRESS, or starts a local single-node Ray bound to 127.0.0.1; a Ray already
    initialised in this process is used as it is. `log_to_driver`: the workers' output is printed here too."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray picks the eth0 address for its services and MASTER_ADDR unless told it runs a local-only node; its
        # child processes read the variable at start, this process's Ray read it at import (maybe already done).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=log_to_driver)


def _run_calls(fn: Callable[..., Any], calls: list[tuple], *shared: Any) -> list[Any]:
    """One task's share of the calls."""
    return [fn(*call, *shared) for call in calls]


def ray_map(fn: Callable[..., Any], calls: Sequence[tuple], *, desc: str, progress: bool, shared: Any = None,
            max_tasks: int | None = None, per_cpu: int | None = None) -> list[Any]:
    """`[fn(*call[, shared]) for call in calls]` as Ray tasks on the cluster `connect_ray` reaches (see the module
    docstring); `max_tasks` wins over `per_cpu`, and with neither each call is its own task."""
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"the number of Ray tasks must be >= 1, got {max_tasks} (--ray-tasks)")
    connect_ray()
    import ray

    n = len(calls)
    if max_tasks is not None:
        tasks = max_tasks
    elif per_cpu is not None:
        tasks = per_cpu * int(ray.available_resources().get("CPU", 1))
    else:
        tasks = n
    tasks = max(1, min(n, tasks))
    remote = ray.remote(_run_calls).options(name=getattr(fn, "__name__", "ray_map"))
    extra = () if shared is None else (ray.put(shared),)
    pending = {remote.remote(fn, [calls[i] for i in group], *extra): group
               for group in (range(k, n, tasks) for k in range(tasks)) if len(group)}
    results: list[Any] = [None] * n
    with tqdm(total=n, unit="shard", desc=f"{desc} (ray)", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                group = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, ValueError):
                        raise e.cause from None
                    raise
                for i, result in zip(group, out):
                    results[i] = result
                    bar.update(1)
    return results
