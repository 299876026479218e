"""Training checkpoints: every rank's DeepSpeed (ZeRO) shard plus the state to continue exactly (step, data-loader
position, MLflow run id), committed by a per-rank marker written last; readers ignore uncommitted checkpoints.
Also the final export: ZeRO shards consolidated into one fp32 state dict in the model's checkpoint format.

Layout of one checkpoint directory (ranks write their own files; Ray merges them in storage):
    <tag>/...                      DeepSpeed's files (model states, ZeRO optimizer shards), `latest`
    train_state.rank<R>.json       step, tag, world_size, run_id, loader state of rank R, the model config and the
                                   resolved run config
    ema.safetensors                train.ema_decay > 0: the fp32 weight average (rank 0; the export saves it)
    COMMITTED.rank<R>              written last by rank R; a checkpoint is complete when all ranks' markers exist.
                                   It records the size and sha256 of every file rank R wrote (the rank's
                                   checkpoint folder before Ray merges them): restores check them
                                   (`verify_checkpoint`) and fall back to an older committed checkpoint when one
                                   was damaged in storage (`fetch_intact`)

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
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pipeline.data.config import StorageConfig
from pipeline.data.storage import HashingWriter, digest, download, get_filesystem, open_url
from pipeline.model.format import CONFIG_FILE

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
    "committed_checkpoints",
    "find_latest_complete",
    "verify_checkpoint",
    "DamagedCheckpointError",
    "fetch_intact",
    "every_rank",
    "file_digest",
    "latest_state",
    "export_final",
    "upload_dir",
    "upload_checkpoint",
    "remove_dir",
    "fetch_checkpoint",
    "EMA_FILE",
]

log = logging.getLogger(__name__)

_STATE = "train_state.rank{}.json"
EMA_FILE = "ema.safetensors"
_MARKER = "COMMITTED.rank{}"
_MARKER_PREFIX = "COMMITTED."
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
    state_path = directory / _STATE.format(rank)
    state_path.write_bytes(data)
    known = {**(digests or {}), os.path.abspath(state_path): {"size": len(data),
                                                              "sha256": hashlib.sha256(data).hexdigest()}}
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.startswith(_MARKER_PREFIX):
            files[path.relative_to(directory).as_posix()] = known.get(os.path.abspath(path)) or file_digest(path)
    tmp = directory / (_MARKER.format(rank) + ".tmp")
    tmp.write_text(json.dumps({"world_size": state["world_size"], "step": state["step"], "files": files},
                              sort_keys=True))
    os.replace(tmp, directory / _MARKER.format(rank))


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


def _iter_committed(run_url: str, storage: StorageConfig | None) -> Iterator[str]:
    """URLs of a run's committed checkpoints, newest first (each folder's markers read when it is reached)."""
    fs, root = get_filesystem(run_url, storage)
    fs.invalidate_cache(root)  # Ray prunes old checkpoints (num_to_keep): a cached listing may name gone ones
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return
    found = []
    for e in entries:
        m = _DIR_RE.match(e.rstrip("/").rsplit("/", 1)[-1])
        if m:
            found.append((int(m.group(1)), e.rstrip("/")))
    for step, path in sorted(found, reverse=True):
        try:
            _forget_listings(fs, path)  # a checkpoint rewritten since this process listed it
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
            complete = _complete(names, lambda n, p=path: _read(run_url, f"{p}/{n}", storage).decode())
        except FileNotFoundError:  # removed while we looked
            continue
        if complete:
            yield _with_protocol(run_url, path)
        else:
            log.warning("ignoring uncommitted checkpoint %s", path)


def committed_checkpoints(run_url: str, storage: StorageConfig | None = None) -> list[str]:
    """URLs of the committed checkpoints under a run's storage folder (`<storage>/<name>`), newest first."""
    return list(_iter_committed(run_url, storage))


def find_latest_complete(run_url: str, storage: StorageConfig | None = None) -> str | None:
    """URL of the newest committed checkpoint under a run's storage folder (`<storage>/<name>`), or None. Its
    files are not verified: `fetch_intact` restores from the newest intact one."""
    return next(_iter_committed(run_url, storage), None)


def _committed_files(read_text: Callable[[str], str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({relative path: {"size", "sha256"}} recorded by every rank's marker, the markers that cannot be read)."""
    try:
        world = int(json.loads(read_text(_MARKER.format(0)))["world_size"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {}, [f"{_MARKER.format(0)} is unreadable"]
    files: dict[str, dict[str, Any]] = {}
    problems, unrecorded = [], []
    for r in range(world):
        name = _MARKER.format(r)
        try:
            recorded = json.loads(read_text(name)).get("files")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        except (ValueError, AttributeError, UnicodeDecodeError):
            problems.append(f"{name} is unreadable")
            continue
        if recorded is None:
            unrecorded.append(r)
        elif not _well_formed(recorded):
            problems.append(f"{name} is unreadable")
        else:
            files.update(recorded)  # the ranks wrote disjoint files
    if unrecorded:
        log.debug("the commit markers of rank(s) %s record no file digests (written before they were): their "
                  "files are not verified", unrecorded)
    return files, problems


def _well_formed(recorded: Any) -> bool:
    return isinstance(recorded, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in recorded.values())


def _damage(files: dict[str, dict[str, Any]], size_of: Callable[[str], "int | None"],
            sha256_of: Callable[[str], str] | None = None) -> list[str]:
    """How the files differ from their committed sizes, then (all sizes right) from their committed sha256."""
    out = []
    for rel, want in sorted(files.items()):
        size = size_of(rel)
        if size is None:
            out.append(f"{rel} is missing")
        elif size != want["size"]:
            out.append(f"{rel} has {size} bytes, {want['size']} committed")
    if out or sha256_of is None:
        return out
    return [f"{rel} differs from its committed sha256" for rel, want in sorted(files.items())
            if sha256_of(rel) != want["sha256"]]


def verify_checkpoint(directory: str | Path) -> list[str]:
    """What is damaged in a local copy of a committed checkpoint, checked against every rank's commit marker:
    each recorded file's size, then its sha256 (read from this copy). [] when intact. Files of a marker written
    before markers recorded digests are not checked (old runs still resume)."""
    d = Path(directory)
    files, problems = _committed_files(lambda n: (d / n).read_text())

    def size_of(rel: str) -> int | None:
        return (d / rel).stat().st_size if (d / rel).is_file() else None

    return problems + _damage(files, size_of, lambda rel: file_digest(d / rel)["sha256"])


def _remote_damage(url: str, storage: StorageConfig | None) -> list[str]:
    """The size check of a checkpoint in an object store, from one listing (before downloading it)."""
    fs, root = get_filesystem(url, storage)
    root = root.rstrip("/")
    _forget_listings(fs, root)
    files, problems = _committed_files(lambda n: _read(url, f"{root}/{n}", storage).decode())
    sizes = {key[len(root) + 1:]: int(info["size"]) for key, info in fs.find(root, detail=True).items()}
    return problems + _damage(files, sizes.get)


class DamagedCheckpointError(ValueError):
    """No committed checkpoint of a run is intact in storage."""


@contextmanager
def _fetch_verified(url: str, storage: StorageConfig | None) -> Iterator[tuple[str | None, list[str]]]:
    """(local copy or None, what is damaged) of one committed checkpoint."""
    if not _is_local(url):
        problems = _remote_damage(url, storage)  # a truncated file is seen without downloading the checkpoint
        if problems:
            yield None, problems
            return
    with fetch_checkpoint(url, storage) as local:
        yield local, verify_checkpoint(local)  # the sha256s of the copy the restore will load


@contextmanager
def fetch_intact(run_url: str, storage: StorageConfig | None = None, *,
                 agree: Callable[[bool], bool] | None = None) -> Iterator[tuple[str, str] | None]:
    """(URL, local copy) of the newest committed checkpoint of a run whose files match its commit markers, or
    None when the run has none committed. A damaged one (a file missing, truncated or changed in storage) is
    skipped with a warning naming the file, for the previous committed one; none intact raises
    DamagedCheckpointError, one line naming the run folder and the damaged files.

    `agree(intact_here) -> intact_on_every_rank` (`every_rank`): every rank of a group calls this and must restore
    the same checkpoint. Each rank checks every file of its own full copy, so they see the same damage; the vote
    keeps them together when one rank's copy alone is bad (a download gone wrong)."""
    damaged: list[str] = []
    for url in _iter_committed(run_url, storage):
        with _fetch_verified(url, storage) as (local, problems):
            intact = not problems if agree is None else agree(not problems)
            if intact and local is not None:
                if damaged:
                    log.warning("run %s: resuming from %s, the newest intact committed checkpoint", run_url, url)
                yield url, local
                return
            problems = problems or ["damaged in another rank's copy"]
        log.warning("committed checkpoint %s is damaged (%s): trying the previous committed one", url,
                    "; ".join(problems))
        damaged.append(f"{url.rstrip('/').rsplit('/', 1)[-1]}: {', '.join(problems)}")
    if damaged:
        raise DamagedCheckpointError(
            f"run folder {run_url}: no committed checkpoint is intact ({'; '.join(damaged)}); restore those files "
            f"from a copy, or train in a new run folder (another `name`)")
    yield None


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


def latest_state(run_url: str, storage: StorageConfig | None = None) -> tuple[str, dict[str, Any]] | None:
    """(URL, rank 0's training state) of the newest committed checkpoint of a run, or None. A state file that
    differs from its committed digest is skipped, with a warning, for the previous checkpoint's (only that small
    file is checked here; restores check every file: `fetch_intact`)."""

    damaged = []
    for url in _iter_committed(run_url, storage):
        fs, path = get_filesystem(url, storage)
        name = _STATE.format(0)
        data = _read(url, f"{path}/{name}", storage)
        files, _ = _committed_files(lambda n: _read(url, f"{path}/{n}", storage).decode())
        recorded = {name: files[name]} if name in files else {}
        problems = _damage(recorded, lambda _: len(data), lambda _: hashlib.sha256(data).hexdigest())
        try:
            state = json.loads(data)
        except ValueError:
            problems = problems or [f"{name} is unreadable"]
        if not problems:
            return url, state
        log.warning("committed checkpoint %s is damaged (%s): using the previous one's state", url,
                    "; ".join(problems))
        damaged.append(f"{url.rstrip('/').rsplit('/', 1)[-1]}: {', '.join(problems)}")
    if damaged:
        raise DamagedCheckpointError(f"run folder {run_url}: no committed checkpoint has an intact training state "
                                     f"({'; '.join(damaged)})")
    return None


def _read(like_url: str, path: str, storage: StorageConfig | None) -> bytes:
    """A small file's bytes through `open_url`: a body cut off half-way is read again (fsspec's cat_file would
    fail the restore's or the driver's read of a state file or marker on one reset connection)."""
    with open_url(_with_protocol(like_url, path), "rb", storage) as f:
        return f.read()


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _forget_listings(fs: Any, root: str) -> None:
    """Drops the cached listings of `root` and the folders under it. s3fs keeps what a `find` listed (ETags
    included) and a later `find` does not replace it, so a checkpoint rewritten since this process listed it (a
    resumed run rewrites the damaged one it fell back from) would be opened with stale ETags and never read."""
    cache = getattr(fs, "dircache", None)
    if cache is None:
        return
    for key in [k for k in list(cache) if k == root or k.startswith(root + "/")]:
        cache.pop(key, None)
    fs.invalidate_cache(root)


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
    fs, dest = get_filesystem(dest_url, storage)
    fs.makedirs(dest, exist_ok=True)
    names = sorted(p.name for p in Path(local_dir).iterdir() if p.is_file())
    for name in sorted(names, key=lambda n: n == CONFIG_FILE):
        fs.put_file(str(Path(local_dir) / name), f"{dest.rstrip('/')}/{name}")
    return dest_url


def upload_checkpoint(local_dir: str | Path, dest_url: str, storage: StorageConfig | None = None, *,
                      before_marker: Callable[[], None] | None = None) -> int:
    """Copies one rank's checkpoint folder into `dest_url` (the checkpoint's folder in storage, which the other
    ranks fill too), this rank's commit marker last: the checkpoint counts as committed only once every rank's
    bytes are in the store. `before_marker` (tests: fault injection) runs after the other files are up. Returns
    the bytes copied."""
    fs, root = get_filesystem(dest_url, storage)
    root = root.rstrip("/")
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    data = [p for p in files if not p.name.startswith(_MARKER_PREFIX)]
    markers = [p for p in files if p.name.startswith(_MARKER_PREFIX) and not p.name.endswith(".tmp")]
    done = 0
    for i, path in enumerate(data + markers):
        if i == len(data) and before_marker is not None:
            before_marker()
        target = f"{root}/{path.relative_to(local_dir).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), target)
        done += path.stat().st_size
    return done


def remove_dir(url: str, storage: StorageConfig | None = None) -> None:
    """Deletes a folder (and everything under it) in storage; a missing one is fine."""
    fs, path = get_filesystem(url, storage)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


@contextmanager
def fetch_checkpoint(url: str, storage: StorageConfig | None = None) -> Iterator[str]:
    """A local directory holding the checkpoint at `url` (a local path is used in place; an object-store prefix
    is downloaded to a temporary directory removed on exit)."""
    if _is_local(url):
        path = url.removeprefix("file://")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {url}")
        yield path
        return

    fs, path = get_filesystem(url, storage)
    _forget_listings(fs, path.rstrip("/"))
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
