"""Training without Ray: the loop every Ray worker runs (pipeline.train.loop.run_training), on processes of this
machine. For one GPU box, debugging, benchmarks (benchmarks/gpu_check.py) and tests of the engine's modes.

    result = fit_local(cfg, world_size=2)          # spawns 2 ranks (gloo on CPU, NCCL on GPUs), like fit()

Each rank reports its checkpoint straight into storage at `<run_url>/checkpoint_<step>`, what Ray's report does
(every rank's own files, its commit marker last), so a run started here resumes under Ray and the other way
round, and the final export is the same. What Ray adds and this leaves out: worker restarts on failure, other
machines, the stop signal from a job's driver (a SIGTERM to a rank still stops every rank cleanly), pruning to
`scaling.num_to_keep`. Production runs go through `pipeline.launch.driver.fit`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.config import RunConfig
from pipeline.launch.driver import FitResult, finish_fit
from pipeline.launch.driver import run_url as default_run_url
from pipeline.launch.stop import install_worker_handler, termination_requested, training_active
from pipeline.tracking.sinks import RunRef
from pipeline.train.checkpoint import every_rank
from pipeline.train.hooks import TrainHooks
from pipeline.train.loop import run_evaluation, run_training
from pipeline.train.spec import FinalEval, InitSpec, WorkerSpec

__all__ = ["storage_report", "restore_from_storage", "run_rank", "init_process_group", "fit_local"]

log = logging.getLogger(__name__)


def storage_report(spec: WorkerSpec) -> Callable[..., None]:
    """The loop's `report` for ranks without Ray: the checkpoint folder goes to `<run_url>/checkpoint_<step>`,
    this rank's commit marker last (a checkpoint is complete once every rank's marker is there), synchronously;
    the local folder is removed after."""

    def report(metrics: dict, checkpoint_dir: str | None, step: int,
               before_marker: Callable[[], None] | None = None) -> None:
        if checkpoint_dir is None:
            return
        try:
            spec.store.upload(checkpoint_dir, step, before_marker=before_marker)
        finally:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    return report


@contextlib.contextmanager
def restore_from_storage(spec: WorkerSpec) -> Iterator[str | None]:
    """A local copy of the run's newest committed checkpoint whose files match their commit markers (a damaged
    one is skipped for the previous one, with a warning), or None for a fresh start. Every rank calls this; they
    agree on the checkpoint (RunStore.fetch_intact)."""
    with spec.store.fetch_intact(agree=every_rank) as found:
        yield found[1] if found is not None else None


def run_rank(spec: WorkerSpec, rank: int, world_size: int) -> dict[str, Any]:
    """One rank of a run, inside an initialised process group: continues the newest committed checkpoint, trains,
    reports checkpoints into storage. Returns the loop's last metrics (with "step" and "stopped"). An
    evaluation-only spec (`evaluate_only`) evaluates instead."""
    if spec.evaluate_only:
        return run_evaluation(spec, rank=rank, world_size=world_size, report=lambda *_: None)
    with training_active(), restore_from_storage(spec) as restore_dir:
        return run_training(spec, rank=rank, world_size=world_size, restore_dir=restore_dir,
                            report=storage_report(spec),
                            interrupt=lambda: "stop" if termination_requested() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, *, use_gpu: bool) -> None:
    """torch.distributed on 127.0.0.1:`port` (NCCL on GPUs, gloo on CPUs), with the variables DeepSpeed reads."""
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if use_gpu:
        if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":  # a CPU accelerator would run beside NCCL
            log.warning("scaling.use_gpu: ignoring DS_ACCELERATOR=%s", os.environ.pop("DS_ACCELERATOR"))
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)


def _spawned_rank(rank: int, spec: WorkerSpec, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    install_worker_handler()
    init_process_group(rank, world_size, port, use_gpu=spec.config.scaling.use_gpu)
    try:
        last = run_rank(spec, rank, world_size)
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(last, default=float))
    finally:
        dist.destroy_process_group()


def fit_local(cfg: RunConfig, *, world_size: int = 1, run: RunRef | None = None, init: InitSpec | None = None,
              hooks: TrainHooks | None = None, final_eval: FinalEval | None = None,
              run_url: str | None = None) -> FitResult:
    """`fit` without Ray: `world_size` ranks on this machine (1 = in this process, whose process group is made on
    first use and kept; more = spawned processes, one GPU each with scaling.use_gpu), then the final export to
    `<run_url>/final`. Returns a FitResult."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    url = run_url or default_run_url(cfg)
    spec = WorkerSpec(config=cfg, run_url=url, run=run or RunRef(), init=init, hooks=hooks or TrainHooks(),
                      final_eval=final_eval)
    port = free_port()
    if world_size == 1:
        # this process's group of one, made once and kept: DeepSpeed holds on to it between runs
        if not dist.is_initialized():
            init_process_group(0, 1, port, use_gpu=cfg.scaling.use_gpu)
        metrics = run_rank(spec, 0, 1)
    else:
        with tempfile.TemporaryDirectory(prefix="vitpipe-local-") as out:
            mp.start_processes(_spawned_rank, args=(spec, world_size, port, out), nprocs=world_size,
                               start_method="spawn")
            metrics = json.loads(Path(out, "result.json").read_text())
    return finish_fit(cfg, url, metrics, "SIGTERM on a rank")
