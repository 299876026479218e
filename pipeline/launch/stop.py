"""Stopping a run cleanly: a SIGTERM to the job's driver (what `ray job stop` / `vitpipe jobs stop` and a
preempted head send) or to a training worker (a preempted worker node) makes every rank finish its current step
and write one committed checkpoint at the same step (pipeline.train.loop all-reduces the stop vote).

Driver side: `StopSignal.create(run_url, storage)` clears the run's stop marker; `on_sigterm(stop)` turns the first
SIGTERM into `stop.request()`, which writes it (a second SIGTERM exits at once, as before). Worker side: rank 0's
`stop.requested()` looks for the marker every second or so; `install_worker_handler` (run on each worker's main
thread by `torch_config`'s backend: Python delivers signals only there, and Ray Train runs the training function in
another thread) turns a SIGTERM into `termination_requested()`. Ctrl-C on the driver is Ray Train's own: it aborts the run (KILLED).
ray is imported inside functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from typing import Iterator

from pipeline.data.storage import Storage

__all__ = ["StopSignal", "on_sigterm", "torch_config", "install_worker_handler", "termination_requested",
           "training_active"]

log = logging.getLogger(__name__)


class StopSignal:
    """A stop flag shared by a run's driver and its workers: a small marker object, `<run_url>/STOP_REQUESTED`, in
    the run's own storage. Only its URL crosses to the workers (no actor to start for every run, nothing tied to
    the driver's process); picklable, its polling state stays behind."""

    MARKER = "STOP_REQUESTED"

    def __init__(self, run_url: str, storage: Storage, poll_s: float = 1.0):
        self.url = f"{run_url.rstrip('/')}/{self.MARKER}"
        self._storage, self._poll_s = storage, poll_s
        self._last: float | None = None  # when it last looked (None: not yet, so the first call looks)
        self.reason: str | None = None

    @classmethod
    def create(cls, run_url: str, storage: Storage) -> "StopSignal":
        """The run's signal, cleared: a request left by an earlier, stopped attempt does not stop this one."""
        signal_ = cls(run_url, storage)
        fs, path = storage.filesystem(signal_.url)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        return signal_

    def __getstate__(self) -> dict:
        return {"url": self.url, "_storage": self._storage, "_poll_s": self._poll_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _last=None, reason=None)

    def request(self, reason: str) -> None:
        """Driver side: writes the marker (with the reason)."""
        self.reason = self.reason or reason
        fs, path = self._storage.filesystem(self.url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, json.dumps({"reason": self.reason, "time": time.time()}).encode())

    def requested(self) -> bool:
        """Worker side: looks for the marker at most every `poll_s` seconds (one small read), so a stop is seen
        within `poll_s` plus a step."""
        if self.reason is None and (self._last is None or time.monotonic() - self._last >= self._poll_s):
            self._last = time.monotonic()
            fs, path = self._storage.filesystem(self.url)
            # a listing of the run folder cached by this process (a restore looked for checkpoints) would answer
            # "not found" for the marker written since
            fs.invalidate_cache(path.rsplit("/", 1)[0])
            try:
                self.reason = json.loads(fs.cat_file(path)).get("reason") or "stop requested"
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 - unreachable storage must not end training; try again later
                log.warning("stop signal %s unreadable (%s); continuing", self.url, e)
        return self.reason is not None


@contextlib.contextmanager
def on_sigterm(stop: StopSignal) -> Iterator[StopSignal]:
    """While inside: the first SIGTERM requests a clean stop of the run; a second one gets the handler that was
    there before (Ray's driver handler exits). Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGTERM)
    wake = threading.Event()

    def handler(signum, frame):
        if stop.reason is not None:  # second signal: stop now
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)
        stop.reason = "SIGTERM"
        wake.set()

    def forward() -> None:  # storage calls stay out of the signal handler
        while not wake.wait(0.2):
            if done.is_set():
                return
        log.warning("SIGTERM: finishing the current step on every rank, then a checkpoint (a second SIGTERM "
                    "stops at once)")
        try:
            stop.request("SIGTERM")
        except Exception as e:  # noqa: BLE001 - the workers then run on; a second SIGTERM still stops the driver
            log.error("could not write the stop request %s: %s", stop.url, e)

    done = threading.Event()
    forwarder = threading.Thread(target=forward, name="vitpipe-stop", daemon=True)
    forwarder.start()
    signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
        done.set()
        forwarder.join(5)


# -- the worker side --------------------------------------------------------------------------------------------
_TERMINATION = threading.Event()
_ACTIVE = threading.Event()


def install_worker_handler() -> None:
    """SIGTERM in a training worker: while training runs, ask for a clean stop (the loop's next stop vote); when
    no training runs, or at a second SIGTERM, the handler that was there before (Ray's: exit)."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if _ACTIVE.is_set() and not _TERMINATION.is_set():
            log.warning("SIGTERM: this rank asks every rank to stop after the current step")
            _TERMINATION.set()
            return
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def termination_requested() -> bool:
    return _TERMINATION.is_set()


@contextlib.contextmanager
def training_active() -> Iterator[None]:
    """Marks the training function as running (a SIGTERM then means "stop cleanly")."""
    _TERMINATION.clear()
    _ACTIVE.set()
    try:
        yield
    finally:
        _ACTIVE.clear()


def torch_config(backend: str):
    """Ray Train's TorchConfig whose backend first installs `install_worker_handler` on every worker's main
    thread (through the worker group's `execute`, as the torch backend sets up its own environment)."""
    from ray.train.torch import TorchConfig

    class StopAwareTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            base = super().backend_cls

            class StopAwareBackend(base):
                def on_start(self, worker_group, backend_config):
                    worker_group.execute(install_worker_handler)
                    super().on_start(worker_group, backend_config)

            return StopAwareBackend

    return StopAwareTorchConfig(backend=backend)
