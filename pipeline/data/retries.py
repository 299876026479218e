"""Retries of reads from storage, and the process-local counters that say how many there were.

Request-level retries (throttling: 503 SlowDown, 5xx, connection errors) are botocore's own; `count_request_retries`, hooked
into each botocore session, counts them. A connection that breaks in the middle of a body read is retried here by
`RetryingReader`, which reopens the object at the byte it had reached, with jittered exponential backoff
(`backoff_s`), up to `storage.read_retries` times; errors that cannot be transient (missing object, permissions) are
raised at once.
"""

from __future__ import annotations

import functools
import http.client
import io
import logging
import random
import threading
import time
from typing import Any, Callable

from pipeline.data.config import StorageConfig

__all__ = ["io_counters", "backoff_s", "RetryingReader", "count", "count_request_retries"]

log = logging.getLogger(__name__)

_COUNTER_NAMES = ("request_retries", "read_retries", "bytes_read")
_counters = dict.fromkeys(_COUNTER_NAMES, 0)
_counters_lock = threading.Lock()


def count(name: str, n: int = 1) -> None:
    with _counters_lock:
        _counters[name] += n


def io_counters() -> dict[str, int]:
    """What THIS process did so far: request_retries (botocore), read_retries (mid-stream), retries (their sum),
    bytes_read (through `open_url`, from any store)."""
    with _counters_lock:
        out = dict(_counters)
    out["retries"] = out["request_retries"] + out["read_retries"]
    return out


def count_request_retries(parsed: dict | None = None, **_: Any) -> None:
    """botocore reports how many times it retried a call (success or final failure) in the response metadata."""
    attempts = ((parsed or {}).get("ResponseMetadata") or {}).get("RetryAttempts") or 0
    if attempts:
        count("request_retries", attempts)
        log.info("S3 request succeeded or gave up after %d retries (throttling / transient errors)", attempts)


_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@functools.cache
def _transient_errors() -> tuple[type[BaseException], ...]:
    """The standard library's transient errors, and those of the object-store clients that are installed (a machine
    that reads only local paths may have no s3fs, hence no aiohttp or botocore)."""
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
                count("read_retries")
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
        count("bytes_read", n)
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
