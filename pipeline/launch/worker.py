"""The function every Ray Train worker runs: it finds the checkpoint to restore (Ray's latest or the newest one
committed in storage, whichever is newer), wires Ray's report and the interruptions, and runs the training loop
(pipeline.train.loop.run_training) on its `WorkerSpec`.

Interruptions: a SIGTERM to the job's driver (StopSignal) stops the run after a checkpoint at a common step, as does
a SIGTERM to a worker of a fixed-size group. In an elastic group (`scaling.num_workers: [min, max]`) a worker's
SIGTERM is a preemption notice and a resize request (pipeline.launch.elastic.CommitRequest) asks for a checkpoint:
the group commits one at a common step and waits to be replaced, and the next group continues from it.
ray is imported inside functions."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from typing import Callable, Iterator

from pipeline.launch.elastic import CommitRequest, wait_to_be_replaced
from pipeline.launch.stop import StopSignal, termination_requested, training_active
from pipeline.train.checkpoint import checkpoint_dir_name, every_rank, step_of
from pipeline.train.loop import Interrupt, run_evaluation, run_training
from pipeline.train.spec import WorkerSpec

__all__ = ["train_worker", "eval_worker", "restore_point", "CheckpointReporter", "EVALUATION_FILE"]

log = logging.getLogger(__name__)


class CheckpointReporter:
    """The loop's `report` under Ray Train: `ray.train.report` with the checkpoint uploaded in the background
    (`CheckpointUploadMode.ASYNC`: training goes on while it uploads; Ray registers it once every rank's upload is
    done, and raises an upload's error in the training thread), by the run's store (`RunStore.upload`: this rank's
    commit marker last) into Ray's checkpoint folder. At most one
    upload in flight: a report waits for this rank's previous upload to finish first. The local folder is removed
    once uploaded."""

    def __init__(self, spec: WorkerSpec):
        import ray.train

        self._store = spec.store
        storage = ray.train.get_context().get_storage()
        self._fs, self._root = storage.storage_filesystem, storage.experiment_fs_path.rstrip("/")
        self._idle = threading.Event()
        self._idle.set()

    def __call__(self, metrics: dict, checkpoint_dir: str | None, step: int,
                 before_marker: Callable[[], None] | None = None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        self._idle.wait()
        self._idle.clear()
        name = checkpoint_dir_name(step)

        def upload(checkpoint: "ray.train.Checkpoint", dir_name: str) -> "ray.train.Checkpoint":
            try:
                self._store.upload(checkpoint.path, step, before_marker=before_marker)
                return ray.train.Checkpoint(path=f"{self._root}/{dir_name}", filesystem=self._fs)
            finally:
                self._idle.set()

        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=name, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload)
        except BaseException:
            self._idle.set()
            raise

    def wait(self) -> None:
        """Until this rank's last upload is done (or failed)."""
        self._idle.wait()


@contextlib.contextmanager
def restore_point(spec: WorkerSpec) -> Iterator[str | None]:
    """A local directory holding the checkpoint to continue from, or None for a fresh start.

    The commit markers in storage are the authority, not Ray's latest checkpoint (the newest one its controller
    registered: a group that dies right after a report can lose that registration although the checkpoint is
    committed, and a registered one can be uncommitted). Ray's checkpoints live in the same run folder, so the
    newest committed checkpoint whose files match their markers is the restore point; a damaged one is skipped
    for the previous one with a warning (RunStore.fetch_intact). Every rank calls this and all of them agree on the
    same checkpoint."""
    import ray.train

    restored = ray.train.get_checkpoint()
    ray_step = step_of(restored.path) if restored is not None else -1
    with spec.store.fetch_intact(agree=every_rank) as found:
        if found is None:
            if restored is not None:
                raise ValueError(f"checkpoint {restored.path} is incomplete and storage holds no committed one")
            yield None
            return
        url, local = found
        if restored is not None and step_of(url) != ray_step:
            log.warning("resuming from committed checkpoint %s (Ray's latest: step %d)", url, ray_step)
        yield local


def train_worker(spec: WorkerSpec, stop: StopSignal | None = None) -> None:
    """TorchTrainer's train_loop_per_worker (bound to its spec and stop signal with functools.partial)."""
    import ray.train

    if spec.config.scaling.use_gpu and os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        # a CPU accelerator inherited from a node's environment would run DeepSpeed's CPU ops beside NCCL
        log.warning("scaling.use_gpu: ignoring DS_ACCELERATOR=%s from this node's environment",
                    os.environ.pop("DS_ACCELERATOR"))
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    sc = spec.config.scaling
    resize = CommitRequest(spec.run_url, spec.store.storage) if sc.elastic and rank == 0 else None

    def interrupt() -> Interrupt:
        if termination_requested():  # this worker was sent a SIGTERM: preempted (elastic) or stopped
            return "pause" if sc.elastic else "stop"
        # rank 0 asks the driver's flag and the resize requests (one poll is enough: the loop all-reduces the votes)
        if rank == 0 and stop is not None and stop.requested():
            return "stop"
        if resize is not None and resize.pending():
            return "pause"
        return None

    with training_active(), restore_point(spec) as restore_dir:
        reporter = CheckpointReporter(spec)
        last = run_training(spec, rank=rank, world_size=world_size, restore_dir=restore_dir, report=reporter,
                            interrupt=interrupt)
        reporter.wait()
    if last.get("interrupt") != "pause":
        if resize is not None:  # a resize asked for while the last steps ran: the final checkpoint answers it
            resize.answer_if_pending(int(last["step"]))
        return
    every_rank(True)  # every rank's checkpoint is uploaded: the pause's checkpoint is committed
    if resize is not None:
        resize.answer(int(last["step"]))
    why = "preempted (SIGTERM)" if termination_requested() else "paused for a resize or another rank's preemption"
    wait_to_be_replaced(int(last["step"]), sc.stop_grace_s, why)


EVALUATION_FILE = "evaluation.json"


def eval_worker(spec: WorkerSpec) -> None:
    """TorchTrainer's train_loop_per_worker of an evaluation-only job (spec.evaluate_only): no training, no
    checkpoints. Rank 0 writes the metrics to `<run_url>/evaluation.json` for the driver (Ray Train returns only
    checkpointed reports' metrics)."""
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()

    def report(metrics: dict, checkpoint_dir: str | None, step: int) -> None:
        if rank == 0:
            store = spec.store
            store.storage.write_bytes(f"{store.url}/{EVALUATION_FILE}", json.dumps(metrics).encode())

    run_evaluation(spec, rank=rank, world_size=ctx.get_world_size(), report=report)
