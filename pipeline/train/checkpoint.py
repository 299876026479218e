"""A rank's training checkpoint on its local disk: its DeepSpeed (ZeRO) shard plus the state to continue exactly
(step, data-loader position, MLflow run id), committed by its marker written last (pipeline.train.commit), and the
checks and export of a local copy. The run's checkpoints in storage are pipeline.train.runstore's.

Layout of one checkpoint directory (ranks write their own files; Ray merges them in storage):
    <tag>/...                      DeepSpeed's files (model states, ZeRO optimizer shards), `latest`
    train_state.rank<R>.json       step, tag, world_size, run_id, loader state of rank R, the model config and the
                                   resolved run config
    ema.safetensors                train.ema_decay > 0: the fp32 weight average (rank 0; the export saves it)
    COMMITTED.rank<R>              written last by rank R; a checkpoint is complete when all ranks' markers exist.
                                   It records the size and sha256 of every file rank R wrote (the rank's
                                   checkpoint folder before Ray merges them): restores check them
                                   (`verify_checkpoint`) and fall back to an older committed checkpoint when one
                                   was damaged in storage (RunStore.fetch_intact)

How the digests are made: DeepSpeed's torch.save calls (the model states and ZeRO shards, nearly all the bytes) are
streamed through the hash while they are written (`_digesting_saves`); the training state is hashed from the bytes
we write. The few files written by other code (DeepSpeed's `latest` and recovery scripts, the EMA file written by
pipeline.train.ema) are read back right after they were written, from the page cache of the local temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.data.storage import HashingWriter, digest
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.config import ModelConfig
from pipeline.train import commit
from pipeline.train.engine import consolidate_fp32

__all__ = [
    "checkpoint_tag",
    "checkpoint_dir_name",
    "step_of",
    "save_train_checkpoint",
    "write_train_state",
    "read_train_state",
    "is_complete",
    "verify_checkpoint",
    "every_rank",
    "file_digest",
    "export_final",
    "EMA_FILE",
]

log = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
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


@contextmanager
def _digesting_saves(engine: Any, digests: dict[str, dict[str, Any]]) -> Iterator[None]:
    """While DeepSpeed writes a checkpoint: its checkpoint engine's `save(state_dict, path)` streams torch.save
    through a hash, and `digests[absolute path]` gets the file's size and sha256. DeepSpeed's plain (synchronous)
    TorchCheckpointEngine only, whose `save` is this torch.save call; with another writer (asynchronous, Nebula)
    the files are read back instead. Deliberately no deepspeed import here: the engine is duck-typed."""
    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce).__name__ != "TorchCheckpointEngine" or "save" in vars(ce):
        yield
        return
    import torch

    def save(state_dict: Any, path: str) -> None:
        with open(path, "wb") as f:
            out = HashingWriter(f)  # torch.save writes its archive sequentially: the hash is the file's
            # a file object, not the path: the archive's inner folder is then named "archive", not after the file,
            # which torch.load (and DeepSpeed's readers through it) ignore
            torch.save(state_dict, out, _use_new_zipfile_serialization=getattr(ce, "zipfile_serialization", True))
        digests[os.path.abspath(path)] = out.digest()

    ce.save = save
    try:
        yield
    finally:
        del ce.save


def file_digest(path: str | Path) -> dict[str, Any]:
    """{"size", "sha256"} of a local file."""
    return digest(path)


def write_train_state(directory: str | Path, rank: int, state: dict[str, Any],
                      digests: dict[str, dict[str, Any]] | None = None) -> None:
    """Writes rank R's state file and then its commit marker (last, atomically), which records the size and
    sha256 of every file in `directory` (this rank's checkpoint folder). `digests` (absolute path -> entry): files
    already hashed while they were written; the others are read back."""
    directory = Path(directory)
    data = json.dumps(state, default=_json_default, sort_keys=True).encode()
    state_path = directory / commit.state_name(rank)
    state_path.write_bytes(data)
    known = {**(digests or {}), os.path.abspath(state_path): {"size": len(data),
                                                              "sha256": hashlib.sha256(data).hexdigest()}}
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.startswith(commit.MARKER_PREFIX):
            files[path.relative_to(directory).as_posix()] = known.get(os.path.abspath(path)) or file_digest(path)
    tmp = directory / (commit.marker_name(rank) + ".tmp")
    tmp.write_text(commit.marker(state["world_size"], state["step"], files))
    os.replace(tmp, directory / commit.marker_name(rank))


def save_train_checkpoint(engine: Any, directory: str | Path, *, step: int, rank: int, world_size: int,
                          loader_state: dict | None, run_id: str | None, extra: dict | None = None,
                          before_commit: Callable[[], None] | None = None) -> None:
    """Every rank calls this at the same step, with its own local `directory` (which may already hold this
    rank's other checkpoint files, e.g. the EMA file): DeepSpeed writes this rank's shard, then the state and the
    marker recording every file's size and sha256. `before_commit` (tests: fault injection) runs between the two."""
    tag = checkpoint_tag(step)
    digests: dict[str, dict[str, Any]] = {}
    with _digesting_saves(engine, digests):
        engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step})
    if before_commit is not None:
        before_commit()
    write_train_state(directory, rank, {
        "step": step, "tag": tag, "world_size": world_size, "rank": rank, "run_id": run_id,
        "loader": loader_state, **(extra or {}),
    }, digests)


def read_train_state(directory: str | Path, rank: int) -> dict[str, Any]:
    path = Path(directory) / commit.state_name(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no training state for rank {rank} ({path.name})")
    return json.loads(path.read_text())


def is_complete(directory: str | Path) -> bool:
    """A local checkpoint directory every rank committed."""
    d = Path(directory)
    if not d.is_dir():
        return False
    return commit.is_complete({p.name for p in d.iterdir()}, lambda n: (d / n).read_text())


def verify_checkpoint(directory: str | Path) -> list[str]:
    """What is damaged in a local copy of a committed checkpoint, checked against every rank's commit marker:
    each recorded file's size, then its sha256 (read from this copy). [] when intact. Files of a marker written
    before markers recorded digests are not checked (old runs still resume)."""
    d = Path(directory)
    files, problems, unrecorded = commit.recorded_files(lambda n: (d / n).read_text())
    if unrecorded:
        log.debug("the commit markers of rank(s) %s record no file digests (written before they were): their "
                  "files are not verified", unrecorded)

    def size_of(rel: str) -> int | None:
        return (d / rel).stat().st_size if (d / rel).is_file() else None

    return problems + commit.damage(files, size_of, lambda rel: file_digest(d / rel)["sha256"])


def every_rank(ok: bool) -> bool:
    """Whether `ok` holds on every rank of the default process group (`ok` itself without one); every rank must
    call it (one all-reduce, on the current CUDA device under NCCL)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    nccl = "nccl" in str(dist.get_backend())
    votes = torch.tensor([0.0 if ok else 1.0], device=torch.device("cuda", torch.cuda.current_device())
                         if nccl else torch.device("cpu"))
    dist.all_reduce(votes)
    return float(votes.item()) == 0.0


def export_final(checkpoint_dir: str | Path, model_cfg: "ModelConfig | dict", out_dir: str | Path,
                 extra: dict | None = None) -> Path:
    """Consolidates a complete training checkpoint into one fp32 state dict and saves it in the model's checkpoint
    format (model.safetensors + model.json) in the local directory `out_dir`. `model_cfg`: the ModelConfig (or
    its dict) of the trained model."""
    if not is_complete(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} is not a complete training checkpoint (commit markers missing)")
    if isinstance(model_cfg, dict):
        model_cfg = ModelConfig.model_validate(model_cfg)
    state = read_train_state(checkpoint_dir, 0)
    sd = consolidate_fp32(str(checkpoint_dir), tag=state["tag"])
    meta = {"step": state["step"], "run_id": state.get("run_id"), **(extra or {})}
    ema_path = Path(checkpoint_dir) / EMA_FILE
    if ema_path.is_file():  # Polyak averaging was on: the averaged weights are the model (frozen ones stay raw)

        averaged = load_file(str(ema_path))
        unknown = sorted(set(averaged) - set(sd))
        if unknown:
            raise ValueError(f"{ema_path}: averaged weights the model does not have, e.g. {unknown[:3]}")
        sd.update({n: t.float() for n, t in averaged.items()})
        with safe_open(str(ema_path), "pt") as f:
            meta["ema_decay"] = float((f.metadata() or {}).get("decay", "nan"))
    return save_checkpoint(out_dir, sd, model_cfg, meta)
