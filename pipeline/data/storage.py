"""One way to reach storage: an fsspec filesystem for s3://, gs://, file:// and plain paths, with counted retries.

Request-level retries (throttling: 503 SlowDown, 5xx, connection errors) are botocore's own
(`retries={"mode": ..., "max_attempts": ...}`); errors in the middle of a body read are retried here by
`RetryingReader` (pipeline.data.retries), which reopens at the byte it had reached. Both are counted in
process-local counters (`retries.io_counters()`). Filesystems are created lazily per process and never pickled: a `Storage` handle drops its
client in `__getstate__`, so DataLoader and Ray workers each build their own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from pipeline.data.config import StorageConfig
from pipeline.data.retries import RetryingReader, count_request_retries

__all__ = [
    "Storage",
    "is_local",
    "get_filesystem",
    "open_url",
    "download",
    "HashingWriter",
    "digest",
    "write_atomic",
    "url_join",
    "register_wds_opener",
    "wds_opener",
]

log = logging.getLogger(__name__)

_FS_CACHE: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()
_SESSIONS: dict[str, Any] = {}


def _storage_key(storage: StorageConfig) -> str:
    return json.dumps(storage.model_dump(mode="json"), sort_keys=True)


def _make_s3(storage: StorageConfig):
    # One botocore session per config and process: a session is not fork-safe. A loader forks its DataLoader workers
    # while this process may be using storage in another thread (a checkpoint uploading in the background, a
    # manifest read finishing); a worker that inherited the session with one of its locks held would wait on it for
    # ever. A worker's first client loads the service models again (a fraction of a second per epoch's worker).
    import s3fs  # only for s3:// URLs: a machine that reads local paths may not have it
    from aiobotocore.session import AioSession

    key = f"{os.getpid()}:{_storage_key(storage)}"
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = AioSession(profile=storage.profile) if storage.profile else AioSession()
        session.register("after-call.s3", count_request_retries)
    client_kwargs: dict[str, Any] = {}
    # region_name in client_kwargs breaks bucket creation on S3-compatible servers; set it only when asked.
    if storage.region:
        client_kwargs["region_name"] = storage.region
    fs = s3fs.S3FileSystem(
        anon=storage.anon,
        endpoint_url=storage.endpoint_url or None,  # None: botocore reads $AWS_ENDPOINT_URL itself
        client_kwargs=client_kwargs,
        config_kwargs={"retries": {"mode": storage.retry_mode, "max_attempts": storage.max_retries + 1}},
        session=session,
        default_block_size=storage.read_block_size,
        skip_instance_cache=True,
    )
    # s3fs has its own uncounted retry loop around body reads; RetryingReader does that job, counted.
    fs.retries = 1
    return fs


def _make_fs(protocol: str, storage: StorageConfig):
    if protocol in ("s3", "s3a"):
        return _make_s3(storage)
    if protocol in ("gs", "gcs"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise ValueError("gs:// URLs need the gcsfs package: pip install 'vitpipe[gcs]' (or gcsfs)") from None
        return fsspec.filesystem("gcs", token="anon" if storage.anon else None, skip_instance_cache=True)
    if protocol in ("file", "local"):
        return fsspec.filesystem("file", auto_mkdir=True)
    if protocol == "memory":
        return fsspec.filesystem("memory")
    raise ValueError(f"unsupported storage URL scheme {protocol!r}: use s3://, gs://, file:// or a local path")


def get_filesystem(url: str, storage: StorageConfig | None = None) -> tuple[Any, str]:
    """Returns (fsspec filesystem, path inside it) for a URL. Cached per process (and per storage config), so a
    forked or spawned worker builds its own client on first use."""
    storage = storage or StorageConfig()
    protocol = get_protocol(str(url))
    key = (os.getpid(), protocol, _storage_key(storage))
    fs = _FS_CACHE.get(key)
    if fs is None:
        with _FS_LOCK:
            fs = _FS_CACHE.get(key)
            if fs is None:
                fs = _FS_CACHE[key] = _make_fs(protocol, storage)
    return fs, fs._strip_protocol(str(url))


def open_url(url: str, mode: str = "rb", storage: StorageConfig | None = None, *, buffer_size: int = 1 << 20):
    """Opens a URL for reading ("rb": buffered, retrying mid-stream) or writing ("wb": streamed to the destination;
    on S3 a multipart upload that becomes visible when closed)."""
    storage = storage or StorageConfig()
    fs, path = get_filesystem(url, storage)
    if mode == "rb":
        # Open once up front so a missing object fails here with FileNotFoundError, not on the first read.
        first = fs.open(path, "rb")
        handle = {"first": first}

        def opener():
            f = handle.pop("first", None)
            return f if f is not None else fs.open(path, "rb")

        return io.BufferedReader(RetryingReader(opener, url, storage), buffer_size=buffer_size)
    if mode == "wb":
        return fs.open(path, "wb")
    raise ValueError(f"open_url: mode must be 'rb' or 'wb', got {mode!r}")


def download(url: str, local_path: str | Path, storage: StorageConfig | None = None) -> None:
    """Copies one object to a local file through `open_url` (a body cut off half-way is read again from the last
    byte delivered, counted as a retry), where fsspec's own `get` fails the whole copy."""
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    with open_url(url, "rb", storage) as src, open(local_path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


class HashingWriter:
    """A binary stream for writing that passes bytes through to `f` while counting and hashing them: the sha256 of
    what was written, without reading it back (`digest()` once the writer is done)."""

    def __init__(self, f: Any):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = self.f.write(view)  # a buffered or object-store stream takes all of it (or raises)
        self.sha.update(view)
        self.bytes += view.nbytes
        return n

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def digest(self) -> dict[str, Any]:
        return {"size": self.bytes, "sha256": self.sha.hexdigest()}


def digest(url: str | Path, storage: StorageConfig | None = None) -> dict[str, Any]:
    """{"size", "sha256"} of the stored bytes at `url` (an object or a local path), streamed in 1 MiB reads."""
    sha, size = hashlib.sha256(), 0
    with open_url(str(url), "rb", storage) as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def write_atomic(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Writes a small object so that a reader sees the old one or the whole new one, never a part: one PUT on object
    stores (an object appears whole or not at all), write-then-rename on local disks (the temporary name carries
    the process id, so two writers never share one)."""
    fs, path = get_filesystem(url, storage)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def url_join(base: str, name: str) -> str:
    """Joins a relative name onto a directory URL (s3://b/dir + x.tar); absolute URLs/paths pass through."""
    if "://" in name or name.startswith("/"):
        return name
    return base.rstrip("/") + "/" + name


def parent_url(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


class Storage:
    """A picklable handle on storage: carries the config, builds its filesystem lazily in the process that uses it
    (the pattern of mosaicml/streaming's S3Downloader: a DataLoader or Ray worker builds its own client), and is what
    the loader, manifests, run stores and stop signals are given. Reads go through `open_url` (a body cut off
    half-way is read again from the byte it reached, counted as a retry)."""

    def __init__(self, config: StorageConfig | None = None):
        self.config = config or StorageConfig()

    def __repr__(self) -> str:
        return f"Storage({self.config.endpoint_url or 'default endpoint'})"

    def __getstate__(self) -> dict:
        return {"config": self.config.model_dump(mode="json")}

    def __setstate__(self, state: dict) -> None:
        self.config = StorageConfig.model_validate(state["config"])

    # -- objects -------------------------------------------------------------------------------------------------
    def filesystem(self, url: str) -> tuple[Any, str]:
        return get_filesystem(url, self.config)

    def open(self, url: str, mode: str = "rb"):
        return open_url(url, mode, self.config)

    def read_bytes(self, url: str) -> bytes:
        """A small object's bytes (a marker, a state file, a manifest)."""
        with open_url(url, "rb", self.config) as f:
            return f.read()

    def write_bytes(self, url: str, data: bytes) -> None:
        fs, path = self.filesystem(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)

    def download(self, url: str, local_path: str | Path) -> None:
        download(url, local_path, self.config)

    def put_file(self, local_path: str | Path, url: str) -> None:
        fs, path = self.filesystem(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local_path), path)

    def remove(self, url: str) -> None:
        """Deletes an object or a folder and everything under it; a missing one is fine."""
        fs, path = self.filesystem(url)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    # -- folders -------------------------------------------------------------------------------------------------
    def forget(self, url: str) -> None:
        """Drops what this process's filesystem cached about `url` and the folders under it. s3fs keeps what a
        listing returned (ETags included) and a later listing does not replace it, so an object rewritten since
        this process listed it would be opened with a stale ETag and never read."""
        fs, root = self.filesystem(url)
        root = root.rstrip("/")
        cache = getattr(fs, "dircache", None)
        if cache is not None:
            for key in [k for k in list(cache) if k == root or k.startswith(root + "/")]:
                cache.pop(key, None)
        fs.invalidate_cache(root)

    def names(self, url: str) -> list[str]:
        """The names directly in a folder, listed now; [] when it does not exist."""
        self.forget(url)
        fs, path = self.filesystem(url)
        try:
            return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def sizes(self, url: str) -> dict[str, int]:
        """{path relative to the folder: size} of every object under a folder, from one listing."""
        self.forget(url)
        fs, root = self.filesystem(url)
        root = root.rstrip("/")
        return {key[len(root) + 1:]: int(info["size"]) for key, info in fs.find(root, detail=True).items()}

    @contextlib.contextmanager
    def fetch_dir(self, url: str) -> Iterator[str]:
        """A local directory holding the folder at `url`: a local path is used in place; an object-store folder is
        downloaded (file by file, each body read again where it was cut off) to a temporary directory removed on
        exit."""
        if is_local(url):
            path = url.removeprefix("file://")
            if not Path(path).is_dir():
                raise FileNotFoundError(f"folder not found: {url}")
            yield path
            return
        files = self.sizes(url)
        if not files:
            raise FileNotFoundError(f"folder not found in storage: {url}")
        tmp = tempfile.mkdtemp(prefix="vitpipe-fetch-")
        try:
            for rel in files:
                self.download(url_join(url, rel), Path(tmp) / rel)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def put_dir(self, local_dir: str | Path, url: str, *, last: Callable[[str], bool] = lambda name: False,
                before_last: Callable[[], None] | None = None) -> int:
        """Copies a local folder (recursively) to `url`, the files whose name `last(name)` holds after every other
        one (a commit marker: the folder counts once they are there); `before_last` runs between the two. Returns
        the bytes copied."""
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        first = [p for p in files if not last(p.name)]
        done = 0
        for i, path in enumerate(first + [p for p in files if last(p.name)]):
            if i == len(first) and before_last is not None:
                before_last()
            self.put_file(path, url_join(url, path.relative_to(local_dir).as_posix()))
            done += path.stat().st_size
        return done


def is_local(url: str) -> bool:
    """A path on this machine's disk (a plain path or file://), not an object-store URL."""
    return "://" not in url or url.startswith("file://")


def wds_opener(url: str, mode: str = "rb", bufsize: int = 8192, *, storage: StorageConfig | None = None, **_: Any):
    """A webdataset gopen handler built on our fsspec storage (retries included)."""
    return open_url(url, mode, storage)


def register_wds_opener(storage: StorageConfig | None = None, schemes: tuple[str, ...] = ("s3", "gs", "gcs")) -> None:
    """Makes plain `webdataset` open s3:// (and gs://) URLs through our storage layer instead of a CLI."""
    gopen_module = importlib.import_module("webdataset.gopen")
    for scheme in schemes:
        gopen_module.gopen_schemes[scheme] = functools.partial(wds_opener, storage=storage)
