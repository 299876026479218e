"""Read-ahead of a list of objects: one background thread streams each object's blocks, in order, into a bounded
queue while the consumer reads the previous one, so a reader's next shard is already arriving when it needs it.

The thread holds no reference to its owner (a `weakref.finalize` stops it when the owner is collected), reads at most
`blocks` blocks ahead, and hands a read error to the consumer, raised where that object is read.
"""

from __future__ import annotations

import io
import queue
import threading
import weakref

from pipeline.data.config import StorageConfig
from pipeline.data.storage import open_url

__all__ = ["ReadAhead"]


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
