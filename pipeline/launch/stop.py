"""Stopping a run cleanly: a SIGTERM to the job's driver (what `ray job stop` / `vitpipe jobs stop` and a
preempted head send) or to a training worker (a preempted worker node) makes every rank finish its current step
and write one committed checkpoint at the same step (pipeline.train.loop all-reduces the stop vote).

Driver side: `StopSignal.create()` makes a small Ray actor holding the flag; `on_sigterm(stop)` turns the first
SIGTERM into `stop.request()` (a second one exits at once, as before). Worker side: `stop.requested()` polls the
actor without blocking; `install_worker_handler` (run on each worker's main thread by `torch_config`'s backend:
Python delivers signals only there, and Ray Train runs the training function in another thread) turns a
SIGTERM into `termination_requested()`. Ctrl-C on the driver is Ray Train's own: it aborts the run (KILLED).
ray is imported inside functions.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Iterator

__all__ = ["StopSignal", "on_sigterm", "torch_config", "install_worker_handler", "termination_requested",
           "training_active"]

log = logging.getLogger(__name__)


class _StopFlag:
    """The Ray actor behind a StopSignal."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> str | None:
        return self.reason


class StopSignal:
    """A stop flag shared by a run's driver and its workers. Picklable (the actor handle travels, the polling
    state does not)."""

    def __init__(self, actor: Any, poll_s: float = 0.5):
        self._actor, self._poll_s = actor, poll_s
        self._last = 0.0
        self.reason: str | None = None

    @classmethod
    def create(cls) -> "StopSignal":
        import ray

        return cls(ray.remote(num_cpus=0)(_StopFlag).remote())

    def __getstate__(self) -> dict:
        return {"_actor": self._actor, "_poll_s": self._poll_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_actor"], state["_poll_s"])

    def request(self, reason: str) -> None:
        """Driver side; non-blocking."""
        self.reason = self.reason or reason
        self._actor.request.remote(reason)

    def requested(self) -> bool:
        """Worker side: asks the actor at most every `poll_s` seconds (one small actor call, ~1 ms), so a stop is
        seen within `poll_s` plus a step."""
        import ray

        if self.reason is None and time.monotonic() - self._last >= self._poll_s:
            self._last = time.monotonic()
            try:
                self.reason = ray.get(self._actor.get.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001 - a busy or lost driver: Ray ends the workers if it is gone
                log.warning("stop signal unreachable (%s); continuing", e)
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

    def forward() -> None:  # Ray calls stay out of the signal handler
        while not wake.wait(0.2):
            if done.is_set():
                return
        log.warning("SIGTERM: finishing the current step on every rank, then a checkpoint (a second SIGTERM "
                    "stops at once)")
        stop.request("SIGTERM")

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
