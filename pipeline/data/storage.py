"""One way to reach storage: an fsspec filesystem for s3://, gs://, file:// and plain paths, with counted retries.

Request-level retries (throttling: 503 SlowDown, 5xx, connection errors) are botocore's own
(`retries={"mode": ..., "max_attempts": ...}`); errors in the middle of a body read are retried here by
`RetryingReader`, which reopens at the byte it had reached. Both are counted in process-local counters
(`io_counters()`). Filesystems are created lazily per process and never pickled: a `Storage` handle drops its
client in `__getstate__`, so DataLoader and Ray workers each build their own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import importlib
import io
import json
import logging
import os
import queue
import random
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import s3fs
from aiobotocore.session import AioSession
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from pipeline.data.config import StorageConfig

__all__ = [
    "Storage",
    "is_local",
    "RetryingReader",
    "get_filesystem",
    "open_url",
    "download",
    "HashingWriter",
    "digest",
    "write_atomic",
    "url_join",
    "io_counters",
    "ReadAhead",
    "register_wds_opener",
    "wds_opener",
]

log = logging.getLogger(__name__)

_COUNTER_NAMES = ("request_retries", "read_retries", "bytes_read")
_counters = dict.fromkeys(_COUNTER_NAMES, 0)
_counters_lock = threading.Lock()
_FS_CACHE: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()
_SESSIONS: dict[str, Any] = {}


def _count(name: str, n: int = 1) -> None:
    with _counters_lock:
        _counters[name] += n


def io_counters() -> dict[str, int]:
    """What THIS process did so far: request_retries (botocore), read_retries (mid-stream), retries (their sum),
    bytes_read (through `open_url`, from any store)."""
    with _counters_lock:
        out = dict(_counters)
    out["retries"] = out["request_retries"] + out["read_retries"]
    return out


def _on_after_call(parsed: dict | None = None, **_: Any) -> None:
    """botocore reports how many times it retried a call (success or final failure) in the response metadata."""
    attempts = ((parsed or {}).get("ResponseMetadata") or {}).get("RetryAttempts") or 0
    if attempts:
        _count("request_retries", attempts)
        log.info("S3 request succeeded or gave up after %d retries (throttling / transient errors)", attempts)


def _storage_key(storage: StorageConfig) -> str:
    return json.dumps(storage.model_dump(mode="json"), sort_keys=True)


def _make_s3(storage: StorageConfig):
    # One botocore session per config and process: a session is not fork-safe. A loader forks its DataLoader workers
    # while this process may be using storage in another thread (a checkpoint uploading in the background, a
    # manifest read finishing); a worker that inherited the session with one of its locks held would wait on it for
    # ever. A worker's first client loads the service models again (a fraction of a second per epoch's worker).
    key = f"{os.getpid()}:{_storage_key(storage)}"
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = AioSession(profile=storage.profile) if storage.profile else AioSession()
        session.register("after-call.s3", _on_after_call)
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


_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@functools.cache
def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, http.client.HTTPException, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        errors.append(FSTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _transient_errors()) and not isinstance(exc, _NOT_TRANSIENT)


def backoff_s(attempt: int, storage: StorageConfig) -> float:
    """Full-jitter exponential backoff for attempt 1, 2, ... bounded by storage.backoff_max_s."""
    return random.uniform(0, min(storage.backoff_max_s, storage.backoff_base_s * 2 ** (attempt - 1)))


class RetryingReader(io.RawIOBase):
    """A read-only stream that survives errors in the middle of a body: it reopens the object and seeks to the
    byte it had reached, at most `storage.max_retries` times in a row, with backoff. Each retry is counted."""

    def __init__(self, opener: Callable[[], Any], url: str, storage: StorageConfig):
        super().__init__()
        self._opener = opener
        self._url = url
        self._storage = storage
        self._f: Any = None
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _with_retries(self, fn: Callable[[Any], Any]) -> Any:
        attempt = 0
        while True:
            try:
                if self._f is None:
                    self._f = self._opener()
                    if self._pos:
                        self._f.seek(self._pos)
                return fn(self._f)
            except Exception as e:
                if not _is_transient(e) or attempt >= self._storage.max_retries:
                    raise
                attempt += 1
                _count("read_retries")
                delay = backoff_s(attempt, self._storage)
                log.warning("read of %s failed at byte %d (%s: %s); retry %d/%d in %.2fs", self._url, self._pos,
                            type(e).__name__, e, attempt, self._storage.max_retries, delay)
                self._close_inner()
                time.sleep(delay)

    def readinto(self, b) -> int:
        def _read(f):
            data = f.read(min(len(b), self._storage.read_block_size))
            n = len(data)
            b[:n] = data
            return n

        n = self._with_retries(_read)
        self._pos += n
        _count("bytes_read", n)
        return n

    def _close_inner(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # a broken connection may fail to close; it is being replaced anyway
                pass

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __getstate__(self):
        raise TypeError("an open stream cannot be pickled; pass the URL and StorageConfig instead")


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


def _put(q: queue.Queue, stop: threading.Event, item: tuple) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _read_ahead(urls: list[str], storage: StorageConfig, q: queue.Queue, abandoned: set[int],
                stop: threading.Event) -> None:
    """`ReadAhead`'s thread: each object's blocks in turn into `q`, then (i, None) at its end or (i, error)."""
    block = storage.read_block_size
    for i, url in enumerate(urls):
        try:
            with open_url(url, "rb", storage, buffer_size=block) as f:
                while i not in abandoned:
                    chunk = f.read(block)
                    if not chunk:
                        break
                    if not _put(q, stop, (i, chunk)):
                        return
            end: tuple = (i, None)
        except Exception as e:  # handed to the consumer, raised where the object is read
            end = (i, e)
        if not _put(q, stop, end):
            return


class ReadAhead:
    """Reads a sequence of objects, in order, in a background thread, up to `blocks` blocks of
    `storage.read_block_size` ahead of the consumer and across object boundaries: the next shard's bytes arrive
    while the current one decodes. `open(i)` returns the i-th object's stream (call it in order, each once); closing
    a stream before its end makes the thread skip the rest of that object. An error opening or reading an object
    (after `open_url`'s retries) is raised by its stream's read."""

    def __init__(self, urls: list[str], storage: StorageConfig | None = None, *, blocks: int = 4):
        self._urls, self._storage = list(urls), storage or StorageConfig()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, blocks))
        self._abandoned: set[int] = set()
        self._pending: tuple | None = None
        self._stop = threading.Event()
        # The thread holds no reference to this object: a reader dropped without `close` (a consumer that stopped
        # early) stops its thread when it is collected, instead of leaving it polling until the process exits.
        self._thread = threading.Thread(target=_read_ahead, name="vitpipe-read-ahead", daemon=True,
                                        args=(self._urls, self._storage, self._queue, self._abandoned, self._stop))
        weakref.finalize(self, self._stop.set)
        self._thread.start()

    def _next(self, i: int) -> bytes | None:
        """The next chunk of object `i` (None at its end); chunks of objects closed early are dropped."""
        while True:
            if self._pending is not None:
                (j, item), self._pending = self._pending, None
            else:
                j, item = self._queue.get()
            if j < i:
                continue  # the rest of an abandoned object
            if j > i:  # object i already ended (its end was taken by an earlier read): keep the next one's chunk
                self._pending = (j, item)
                return None
            if isinstance(item, Exception):
                raise item
            return item

    def open(self, i: int) -> io.BufferedReader:
        return io.BufferedReader(_ReadAheadStream(self, i), buffer_size=1 << 16)

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


class _ReadAheadStream(io.RawIOBase):
    def __init__(self, owner: ReadAhead, i: int):
        super().__init__()
        self._owner, self._i = owner, i
        self._chunk, self._eof = memoryview(b""), False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._chunk:
            if self._eof:
                return 0
            try:
                data = self._owner._next(self._i)
            except Exception:
                self._eof = True  # the object's end (an error) is taken: closing must not wait for another
                raise
            if data is None:
                self._eof = True
                return 0
            self._chunk = memoryview(data)
        n = min(len(b), len(self._chunk))
        b[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def close(self) -> None:
        if not self.closed and not self._eof:
            self._owner._abandoned.add(self._i)
            try:  # drain to this object's end marker so the next object's stream starts at its own bytes
                while self._owner._next(self._i) is not None:
                    pass
            except Exception:
                pass
            self._eof = True
        super().close()


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
