"""Training checkpoints: every rank's DeepSpeed (ZeRO) shard plus the state to continue exactly (step, data-loader
position, MLflow run id), committed by a per-rank marker written last; readers ignore uncommitted checkpoints.
Also the final export: ZeRO shards consolidated into one fp32 state dict in the model's checkpoint format.

Layout of one checkpoint directory (ranks write their own files; Ray merges them in storage):
    <tag>/...                      DeepSpeed's files (model states, ZeRO optimizer shards), `latest`
    train_state.rank<R>.json       step, tag, world_size, run_id, loader state of rank R, the model config and the
                                   resolved run config
    ema.safetensors                train.ema_decay > 0: the fp32 weight average (rank 0; the export saves it)
    COMMITTED.rank<R>              written last by rank R; a checkpoint is complete when all ranks' markers exist
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pipeline.data.config import StorageConfig

if TYPE_CHECKING:
    from pipeline.model.config import ModelConfig

__all__ = [
    "checkpoint_tag",
    "checkpoint_dir_name",
    "step_of",
    "save_train_checkpoint",
    "write_train_state",
    "read_train_state",
    "is_complete",
    "find_latest_complete",
    "latest_state",
    "export_final",
    "upload_dir",
    "remove_dir",
    "fetch_checkpoint",
    "EMA_FILE",
]

log = logging.getLogger(__name__)

_STATE = "train_state.rank{}.json"
EMA_FILE = "ema.safetensors"
_MARKER = "COMMITTED.rank{}"
_DIR_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir_name(step: int) -> str:
    """The name Ray gives the checkpoint in storage (`<storage>/<run name>/checkpoint_00001000`)."""
    return f"checkpoint_{step:08d}"


def step_of(path_or_url: str) -> int:
    """The step in a checkpoint folder name (`.../checkpoint_00001000` -> 1000); -1 if it has none."""
    m = _DIR_RE.match(str(path_or_url).rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def _json_default(o: Any) -> Any:
    # loader states may hold numpy scalars / arrays; anything else is a bug worth a clear error
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"checkpoint state holds a {type(o).__name__}, which is not JSON-serialisable")


def write_train_state(directory: str | Path, rank: int, state: dict[str, Any]) -> None:
    """Writes rank R's state file and then its commit marker (the marker is last, atomically)."""
    directory = Path(directory)
    (directory / _STATE.format(rank)).write_text(json.dumps(state, default=_json_default, sort_keys=True))
    tmp = directory / (_MARKER.format(rank) + ".tmp")
    tmp.write_text(json.dumps({"world_size": state["world_size"], "step": state["step"]}))
    os.replace(tmp, directory / _MARKER.format(rank))


def save_train_checkpoint(engine: Any, directory: str | Path, *, step: int, rank: int, world_size: int,
                          loader_state: dict | None, run_id: str | None, extra: dict | None = None,
                          before_commit: Callable[[], None] | None = None) -> None:
    """Every rank calls this at the same step: DeepSpeed writes this rank's shard, then the state and marker.
    `before_commit` (tests: fault injection) runs between the two."""
    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step})
    if before_commit is not None:
        before_commit()
    write_train_state(directory, rank, {
        "step": step, "tag": tag, "world_size": world_size, "rank": rank, "run_id": run_id,
        "loader": loader_state, **(extra or {}),
    })


def read_train_state(directory: str | Path, rank: int) -> dict[str, Any]:
    path = Path(directory) / _STATE.format(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no training state for rank {rank} ({path.name})")
    return json.loads(path.read_text())


def _complete(names: set[str], read_marker) -> bool:
    if _MARKER.format(0) not in names:
        return False
    try:
        world = int(json.loads(read_marker(_MARKER.format(0)))["world_size"])
    except (ValueError, KeyError, TypeError):
        return False
    return all(_MARKER.format(r) in names for r in range(world))


def is_complete(directory: str | Path) -> bool:
    """A local checkpoint directory every rank committed."""
    d = Path(directory)
    if not d.is_dir():
        return False
    return _complete({p.name for p in d.iterdir()}, lambda n: (d / n).read_text())


def find_latest_complete(run_url: str, storage: StorageConfig | None = None) -> str | None:
    """URL of the newest committed checkpoint under a run's storage folder (`<storage>/<name>`), or None."""
    from pipeline.data.storage import get_filesystem

    fs, root = get_filesystem(run_url, storage)
    fs.invalidate_cache(root)  # Ray prunes old checkpoints (num_to_keep): a cached listing may name gone ones
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return None
    found = []
    for e in entries:
        m = _DIR_RE.match(e.rstrip("/").rsplit("/", 1)[-1])
        if m:
            found.append((int(m.group(1)), e.rstrip("/")))
    for step, path in sorted(found, reverse=True):
        try:
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
            complete = _complete(names, lambda n, p=path: fs.cat_file(f"{p}/{n}").decode())
        except FileNotFoundError:  # removed while we looked
            continue
        if complete:
            return _with_protocol(run_url, path)
        log.warning("ignoring uncommitted checkpoint %s", path)
    return None


def latest_state(run_url: str, storage: StorageConfig | None = None) -> tuple[str, dict[str, Any]] | None:
    """(URL, rank 0's training state) of the newest committed checkpoint of a run, or None."""
    from pipeline.data.storage import get_filesystem

    latest = find_latest_complete(run_url, storage)
    if latest is None:
        return None
    fs, path = get_filesystem(latest, storage)
    return latest, json.loads(fs.cat_file(f"{path}/{_STATE.format(0)}"))


def _with_protocol(like_url: str, path: str) -> str:
    proto = like_url.split("://", 1)[0] if "://" in like_url else None
    return f"{proto}://{path}" if proto and proto != "file" else path


def export_final(checkpoint_dir: str | Path, model_cfg: "ModelConfig | dict", out_dir: str | Path,
                 extra: dict | None = None) -> Path:
    """Consolidates a complete training checkpoint into one fp32 state dict and saves it in the model's checkpoint
    format (model.safetensors + model.json) in the local directory `out_dir`. `model_cfg`: the ModelConfig (or
    its dict) of the trained model."""
    from pipeline.model.checkpoint import save_checkpoint
    from pipeline.model.config import ModelConfig
    from pipeline.train.engine import consolidate_fp32

    if not is_complete(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} is not a complete training checkpoint (commit markers missing)")
    if isinstance(model_cfg, dict):
        model_cfg = ModelConfig.model_validate(model_cfg)
    state = read_train_state(checkpoint_dir, 0)
    sd = consolidate_fp32(str(checkpoint_dir), tag=state["tag"])
    meta = {"step": state["step"], "run_id": state.get("run_id"), **(extra or {})}
    ema_path = Path(checkpoint_dir) / EMA_FILE
    if ema_path.is_file():  # Polyak averaging was on: the averaged weights are the model (frozen ones stay raw)
        from safetensors import safe_open
        from safetensors.torch import load_file

        averaged = load_file(str(ema_path))
        unknown = sorted(set(averaged) - set(sd))
        if unknown:
            raise ValueError(f"{ema_path}: averaged weights the model does not have, e.g. {unknown[:3]}")
        sd.update({n: t.float() for n, t in averaged.items()})
        with safe_open(str(ema_path), "pt") as f:
            meta["ema_decay"] = float((f.metadata() or {}).get("decay", "nan"))
    return save_checkpoint(out_dir, sd, model_cfg, meta)


def upload_dir(local_dir: str | Path, dest_url: str, storage: StorageConfig | None = None) -> str:
    """Copies a model checkpoint directory to `dest_url`; model.json (the format's commit marker) goes last."""
    from pipeline.data.storage import get_filesystem

    fs, dest = get_filesystem(dest_url, storage)
    fs.makedirs(dest, exist_ok=True)
    names = sorted(p.name for p in Path(local_dir).iterdir() if p.is_file())
    for name in sorted(names, key=lambda n: n == "model.json"):
        fs.put_file(str(Path(local_dir) / name), f"{dest.rstrip('/')}/{name}")
    return dest_url


def remove_dir(url: str, storage: StorageConfig | None = None) -> None:
    """Deletes a folder (and everything under it) in storage; a missing one is fine."""
    from pipeline.data.storage import get_filesystem

    fs, path = get_filesystem(url, storage)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


@contextmanager
def fetch_checkpoint(url: str, storage: StorageConfig | None = None) -> Iterator[str]:
    """A local directory holding the checkpoint at `url` (a local path is used in place; an object-store prefix
    is downloaded to a temporary directory removed on exit)."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {url}")
        yield path
        return
    from pipeline.data.storage import download, get_filesystem

    fs, path = get_filesystem(url, storage)
    if not fs.isdir(path):
        raise FileNotFoundError(f"checkpoint not found in storage: {url}")
    tmp = tempfile.mkdtemp(prefix="vitpipe-fetch-")
    try:
        root = path.rstrip("/")
        for key in fs.find(root):  # one file at a time, a cut-off body retried
            download(f"{url.rstrip('/')}/{key[len(root) + 1:]}", Path(tmp) / key[len(root) + 1:], storage)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
