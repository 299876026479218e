"""The end-to-end demo on one machine and real images, built on the library's public calls: Fashion-MNIST shards ->
ViT pretraining (`run_pretraining`: DeepSpeed ZeRO-2 on 2 Ray workers, few-shot evaluation, MLflow tracking,
registry) -> transfer from the registry onto scikit-learn's digits (`run_transfer`) -> the same budget from a random
init -> the controls (frozen-feature ridge probes of the pretrained model, the same architecture at random init, and
raw pixels) -> a summary table. Fine-tune and scratch run over several seeds (the quick variant: one), so their gap
comes with its spread.

Everything lives under one workdir: shards in a local folder standing in for the object store, the runs and their
checkpoints, a sqlite MLflow store with its artifacts. Ray is a local instance on 127.0.0.1. Each run starts clean
(runs, MLflow store, transfer files are removed); shards written by an earlier run with the same sizes are reused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import torch

from pipeline.commands.demo_data import CONFIG_DIR, PLANS, DemoPlan, digits_splits, prepare_workdir, write_demo_data
from pipeline.commands.demo_report import DemoResult, Stages, StageTime, format_summary
from pipeline.config import RunConfig, load_config
from pipeline.eval.fewshot import ridge_probe
from pipeline.launch.driver import connect_ray
from pipeline.pretrain import run_pretraining
from pipeline.tracking.registry import describe_model
from pipeline.tracking.run import metric_history
from pipeline.tracking.tail import MetricsTail
from pipeline.transfer.config import TransferRunConfig
from pipeline.transfer.runner import TransferResult, run_transfer

__all__ = ["run_demo"]


def run_demo(workdir: str | Path = "demo-out", *, quick: bool = False, worker_logs: bool = False,
             out: TextIO | None = None) -> DemoResult:
    """Runs the whole demo (see the module docstring) and returns its figures; prints each stage's header, progress
    and results, then the summary. `worker_logs`: also stream the Ray workers' own output (DeepSpeed, Ray Train) to
    the console. The process's environment is `vitpipe demo`'s (pipeline.commands.demo.demo_environment)."""
    out = out or sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    plan = PLANS["quick" if quick else "full"]
    plan.check()
    workdir = Path(workdir).resolve()
    t0 = time.perf_counter()
    removed = prepare_workdir(workdir)
    if removed:
        say(f"  cleaned the previous demo run in {workdir}: {', '.join(removed)} (shards/ is reused)")
    # the local Ray every stage then reuses (run_pretraining / run_transfer connect to an initialised Ray as is)
    connect_ray(log_to_driver=worker_logs)
    result = DemoResult(workdir, f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        _run_stages(plan, result, Stages(result, say, 6), say)
    finally:
        _shutdown_ray()
    result.stages.append(StageTime("total", time.perf_counter() - t0))
    say("\n" + format_summary(result, plan))
    return result


def _history(tracking_uri: str, run_id: str, key: str) -> list[float]:
    return [v for _, v in metric_history(tracking_uri, run_id, key)]


def _run_stages(plan: DemoPlan, result: DemoResult, stages: Stages, say: Callable[[str], None]) -> None:
    workdir, uri = result.workdir, result.tracking_uri
    runs, artifacts = workdir / "runs", (workdir / "mlartifacts").as_uri()

    with stages.stage(f"data: shards of real images ({plan.name} demo)"):
        data = write_demo_data(plan, workdir / "shards", say)
        result.pretrain_data, result.data = data.dataset, data.sizes
        s = data.sizes
        say(f"  {data.dataset}: train {s['train']}, val {s['val']}, few-shot {s['fewshot-train']}/"
            f"{s['fewshot-test']}; digits: train {s['digits-train']}, test {s['digits-test']}; "
            + (f"{data.written} shards written" if data.written else "shards reused") + f" under {workdir / 'shards'}")

    urls = data.urls
    pre_cfg = load_config(CONFIG_DIR / plan.pretrain_config, [
        f"data.train={urls['train']}", f"data.val={urls['val']}", f"data.fewshot_train={urls['fewshot-train']}",
        f"data.fewshot_test={urls['fewshot-test']}", f"scaling.storage_path={runs}", f"tracking.tracking_uri={uri}",
        f"tracking.artifact_root={artifacts}",
        f"train.fewshot_name={'fmnist' if data.dataset == 'fashion-mnist' else data.dataset}",
    ], RunConfig)
    tr_over = [f"data.train={urls['digits-train']}", f"data.val={urls['digits-test']}", f"scaling.storage_path={runs}",
               f"tracking.tracking_uri={uri}", f"tracking.artifact_root={artifacts}"]
    tr_cfg = load_config(CONFIG_DIR / plan.transfer_config, tr_over, TransferRunConfig)

    m, t = pre_cfg.model, pre_cfg.train
    with stages.stage(f"pretrain: {m.name} at {m.image_size} px on {data.dataset}, DeepSpeed ZeRO-{t.zero.stage} on "
                      f"{pre_cfg.scaling.max_workers} Ray workers, {t.steps} steps x {t.global_batch} images"):
        tail = MetricsTail(uri, pre_cfg.tracking.experiment, pre_cfg.name, t.steps, say)
        tail.start()
        try:
            pre = run_pretraining(pre_cfg)
        finally:
            tail.stop()
        if pre.registered is None:
            raise RuntimeError("pretraining did not register its final model")
        losses = _history(uri, pre.run_id, "train/loss")
        shots = {k: _history(uri, pre.run_id, f"fewshot/{t.fewshot_name or 'fmnist'}_{k}shot") for k in t.fewshot_shots}
        result.pretrain = {
            "run_id": pre.run_id, "experiment_id": pre.experiment_id, "model": m.name, "steps": t.steps,
            "first_loss": losses[0], "last_loss": losses[-1], "fewshot": {k: v[-1] for k, v in shots.items() if v},
            "val_prec1": (_history(uri, pre.run_id, "val/prec1") or [float("nan")])[-1],
            "registered": f"models:/{pre.registered.name}/{pre.registered.version}",
            "source": f"models:/{pre.registered.name}@{pre_cfg.tracking.register_alias}",
            "final_checkpoint": pre.final_checkpoint,
        }
        say(f"  registered {result.pretrain['registered']} (alias @{pre_cfg.tracking.register_alias})")

    source = result.pretrain["source"]
    tt = tr_cfg.train
    budget = f"{tt.steps} steps x {tt.global_batch} images, {tt.optim.name} lr {tt.optim.lr}"
    tests = result.data["digits-test"]

    def transfer(name: str, *over: str, register: bool = False) -> TransferResult:
        cfg = load_config(CONFIG_DIR / plan.transfer_config, [
            *tr_over, f"name={name}", *over, *(() if register else ("tracking.registered_model=null",))
        ], TransferRunConfig)
        tail = MetricsTail(uri, cfg.tracking.experiment, cfg.name, cfg.train.steps, say)
        tail.start()
        try:
            return run_transfer(cfg, source=source, workdir=workdir / "transfer" / name)
        finally:
            tail.stop()

    def seeded(s: int) -> tuple[str, str]:
        return f"train.seed={s}", f"data.seed={s}"

    with stages.stage(f"transfer: {source} -> digits at {tr_cfg.model.image_size} px ({budget}; {plan.seeds} seed(s))"):
        accs: list[float] = []
        for s in range(plan.seeds):
            tr = transfer(tr_cfg.name + (f"-seed{s}" if s else ""), *seeded(s), register=s == 0)
            accs.append(tr.metrics["final/top1"])  # the workers' evaluation over the whole test split
            if s == 0:
                result.transfer = {"run_id": tr.run_id, "registered": f"models:/{tr.registered.name}/"
                                   f"{tr.registered.version}" if tr.registered else None}
            say(f"  seed {s}: fine-tuned top-1 on {tests} test digits: {accs[-1]:.2%}")
        result.transfer.update({"top1": accs[0], "seeds": accs})

    with stages.stage(f"scratch: the same architecture and budget on digits from a random init ({budget})"):
        accs = []
        # the transfer job itself with transfer.init=random: only the starting weights differ
        for s in range(plan.seeds):
            sc = transfer(f"{tr_cfg.name}-scratch" + (f"-seed{s}" if s else ""), *seeded(s), "transfer.init=random",
                          "transfer.plots=false")
            accs.append(sc.metrics["final/top1"])
            if s == 0:
                result.scratch = {"run_id": sc.run_id}
            say(f"  seed {s}: from-scratch (random init) top-1 on {tests} test digits: {accs[-1]:.2%}")
        result.scratch.update({"top1": accs[0], "seeds": accs})

    with stages.stage("probe: ridge probes of frozen features on digits (pretrained, random init, raw pixels)"):
        for init in ("pretrained", "random"):
            pr = transfer(f"{tr_cfg.name}-probe-{init}", "transfer.mode=fewshot", "transfer.fewshot_probe=true",
                          f"transfer.init={init}", "transfer.keep_pre_logits=true")
            result.probe[init] = pr.metrics["probe/top1"]
            say(f"  {'pretrained' if init == 'pretrained' else 'random-init'} features: ridge-probe top-1 "
                f"{result.probe[init]:.2%}")
        result.probe["pixels"], _ = ridge_probe(*_pixel_splits(plan))
        say(f"  raw pixels: ridge-probe top-1 {result.probe['pixels']:.2%}")

    with stages.stage("registry: what the MLflow model registry now holds"):
        for name in (pre_cfg.tracking.registered_model, tr_cfg.tracking.registered_model):
            for v in describe_model(name, uri)["versions"]:
                tags = {k: v["tags"][k] for k in ("model.variant", "resolution", "steps") if k in v["tags"]}
                say(f"  {name} v{v['version']} @{','.join(v['aliases']) or '-'}  {tags}")
                chain = " <- ".join(link["uri"] for link in v["lineage"])
                say(f"    lineage: {chain} <- data {v['lineage'][-1].get('dataset.url', 'unknown')}")


def _pixel_splits(plan: DemoPlan) -> tuple[torch.Tensor, ...]:
    """The digits as raw pixels [N, H*W] in [0, 1] with their labels (train, then test): the probe's floor."""
    flat = {k: (torch.from_numpy(x.reshape(len(x), -1)).float() / 255.0, torch.from_numpy(y))
            for k, (x, y) in digits_splits(plan).items()}
    return (*flat["train"], *flat["test"])


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
