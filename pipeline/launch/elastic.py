"""Elastic worker groups that lose no step: Ray Train's elastic mode (`scaling.num_workers: [min, max]`) with every
change of the group's size taken at a checkpoint the whole group committed.

- A worker or node lost without notice: Ray restarts the group on the workers that remain (at least min) and it
  continues from the newest committed checkpoint (the steps since it are trained again, on the same samples).
- A preemption notice (a SIGTERM to a training worker): every rank commits a checkpoint at a common step, then the
  group waits to be replaced (`wait_to_be_replaced`); when the node goes, Ray restarts on the workers that remain
  and they continue at the exact next sample.
- Capacity returns (or leaves without a failure): Ray's elastic policy decides to resize the running group every
  `scaling.resize_interval_s`; before Ray tears the group down, `resize_gate` asks it for a checkpoint through
  the run's storage (`CommitRequest`, as pipeline.launch.stop's StopSignal) and waits until every rank has
  committed one, so the new group starts where the old one stopped.

ray is imported inside functions.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from pipeline.data.storage import Storage

__all__ = ["CommitRequest", "resize_gate", "wait_to_be_replaced", "ReplacementTimeout"]

log = logging.getLogger(__name__)


class ReplacementTimeout(RuntimeError):
    """A paused worker group was not replaced in time."""


class CommitRequest:
    """A request to a running worker group to commit a checkpoint at a common step and wait to be replaced: the
    marker `<run_url>/COMMIT_REQUESTED` ({"id", "reason"}), answered by rank 0 with `<run_url>/COMMIT_DONE`
    ({"id", "step"}) once every rank's checkpoint is in storage. Picklable (only the URLs travel)."""

    REQUEST, DONE = "COMMIT_REQUESTED", "COMMIT_DONE"

    def __init__(self, run_url: str, storage: Storage, poll_s: float = 1.0):
        self.run_url, self._storage, self._poll_s = run_url.rstrip("/"), storage, poll_s
        self._last: float | None = None
        self.seen: str | None = None  # rank 0: the id of the request it is answering

    def __getstate__(self) -> dict:
        return {"run_url": self.run_url, "_storage": self._storage, "_poll_s": self._poll_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _last=None, seen=None)

    def _path(self, name: str) -> tuple[Any, str]:
        return self._storage.filesystem(f"{self.run_url}/{name}")

    def _read(self, name: str) -> dict | None:
        fs, path = self._path(name)
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        try:
            return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None

    def _write(self, name: str, doc: dict) -> None:
        fs, path = self._path(name)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, json.dumps(doc).encode())

    # -- the controller's side ----------------------------------------------------------------------------------
    def request(self, reason: str) -> str:
        rid = uuid.uuid4().hex
        self._write(self.REQUEST, {"id": rid, "reason": reason, "time": time.time()})
        return rid

    def wait_done(self, rid: str, timeout_s: float) -> int | None:
        """The step every rank committed for request `rid`, or None after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = self._read(self.DONE)
            if done and done.get("id") == rid:
                return int(done["step"])
            time.sleep(0.5)
        return None

    def clear(self) -> None:
        for name in (self.REQUEST, self.DONE):
            fs, path = self._path(name)
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass

    # -- rank 0's side ------------------------------------------------------------------------------------------
    def pending(self) -> bool:
        """Whether a request is waiting (looked for at most every `poll_s` seconds: one small read)."""
        if self.seen is None and (self._last is None or time.monotonic() - self._last >= self._poll_s):
            self._last = time.monotonic()
            try:
                found = self._read(self.REQUEST)
            except Exception as e:  # noqa: BLE001 - unreachable storage must not end training; try again later
                log.warning("commit request %s/%s unreadable (%s); continuing", self.run_url, self.REQUEST, e)
                return False
            if found:
                self.seen = str(found["id"])
                log.warning("%s: every rank commits a checkpoint at the end of this step", found.get("reason"))
        return self.seen is not None

    def answer_if_pending(self, step: int) -> None:
        """Rank 0 at the end of training: a request that arrived during the last steps is answered by the final
        checkpoint at `step` (the controller would otherwise wait for a checkpoint that never comes)."""
        self._last = None
        if self.pending():
            self.answer(step)

    def answer(self, step: int) -> None:
        """Rank 0, once every rank's checkpoint at `step` is in storage: the request it saw is done."""
        if self.seen is not None:
            self._write(self.DONE, {"id": self.seen, "step": step})


def wait_to_be_replaced(step: int, timeout_s: float, why: str) -> None:
    """A worker whose group committed a checkpoint at `step` and handed over (a preemption, a resize) waits for
    Ray to tear the group down. Raises ReplacementTimeout after `timeout_s` (the group is then restarted by Ray's
    failure handling, from that checkpoint)."""
    log.warning("%s: checkpoint at step %d committed; waiting for the worker group to be replaced", why, step)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
    raise ReplacementTimeout(f"{why}: the worker group committed step {step} and was not replaced within "
                             f"{timeout_s:.0f} s (scaling.stop_grace_s)")


def _refresh_cluster_view() -> None:
    """Makes Ray's autoscaling coordinator look at the cluster now. Ray Train's elastic policy sizes a group from
    the coordinator's reservations, which it refreshes every 20 s: a group restarted right after a node died is
    otherwise sized for the dead node too and waits out the worker-group start timeout (60 s) before it is sized
    again, and a returning node is seen up to 20 s late. An optimisation only: without it (another Ray), nothing
    breaks."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        coordinator = get_or_create_autoscaling_coordinator()
        ray.get(coordinator.get_reserved_resources.remote("vitpipe-elastic", recompute=True), timeout=10)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.debug("could not refresh Ray's view of the cluster (%s)", e)


def resize_gate(request: CommitRequest, timeout_s: float, interval_s: float):
    """A Ray Train controller callback for elastic groups. Before Ray resizes a *running* worker group (its elastic
    policy found more or fewer workers), the group commits a checkpoint at a common step (`request`), waited for at
    most `timeout_s`; a group restarted after a failure is not asked (it is not running). When a group fails, and
    every `interval_s` while one runs, Ray's view of the cluster is refreshed (`_refresh_cluster_view`), so the
    restarted group is sized for the nodes that are alive and returning capacity is seen within the interval."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class ResizeGate(ControllerCallback):
        def __init__(self) -> None:
            self._running_resized = False
            self._refreshed = time.monotonic()

        def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
            state = type(current_state).__name__
            if state == "ResizingState":
                self._running_resized = type(previous_state).__name__ == "RunningState"
            failed = state in ("RestartingState", "ReschedulingState")
            if failed or (state == "RunningState" and time.monotonic() - self._refreshed >= interval_s / 2):
                self._refreshed = time.monotonic()
                _refresh_cluster_view()

        def before_controller_execute_resize_decision(self, resize_decision: Any) -> None:
            if not self._running_resized:
                return
            self._running_resized = False
            target = getattr(resize_decision, "num_workers", "?")
            rid = request.request(f"resize to {target} workers")
            try:
                step = request.wait_done(rid, timeout_s)
            finally:
                request.clear()
            if step is None:
                log.warning("resize to %s workers: the group committed no checkpoint within %.0f s; resizing anyway "
                            "(it continues from its newest committed checkpoint)", target, timeout_s)
            else:
                log.warning("resize to %s workers at the checkpoint of step %d", target, step)

    return ResizeGate()
