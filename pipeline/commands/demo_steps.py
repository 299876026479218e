"""The end-to-end demo on one machine and real images, built on the library's public calls: Fashion-MNIST shards (6
classes for pretraining, 4 held out) -> ViT pretraining (`run_pretraining`: DeepSpeed ZeRO-2 on 2 Ray workers,
few-shot evaluation, MLflow tracking, registry) -> transfer from the registry (`run_transfer`) onto two downstream
tasks: the 4 held-out Fashion-MNIST classes (in-domain, classes the pretraining never saw) and scikit-learn's digits
(cross-domain) -> the same budget from a random init -> the controls (frozen-feature ridge probes of the pretrained
model, the same architecture at random init, and raw pixels) -> a summary table. Fine-tune and scratch run over
several paired seeds (the quick variant: one), so each gap comes with its spread.

Everything lives under one workdir: shards in a local folder standing in for the object store, the runs and their
checkpoints, a sqlite MLflow store with its artifacts. Ray is a local instance on 127.0.0.1. Each run starts clean
(runs, MLflow store, transfer files are removed); shards written by an earlier run with the same sizes are reused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import torch

from pipeline.commands.demo_data import CONFIG_DIR, HELDOUT_TASK, PLANS, DemoPlan, prepare_workdir, write_demo_data
from pipeline.commands.demo_report import DemoResult, Stages, StageTime, TaskResult, format_summary, machine_line
from pipeline.config import RunConfig, load_config
from pipeline.eval.fewshot import ridge_probe
from pipeline.launch.fanout import connect_ray
from pipeline.pretrain import run_pretraining
from pipeline.tracking.registry import describe_model
from pipeline.tracking.run import metric_history
from pipeline.tracking.tail import MetricsTail
from pipeline.transfer.config import TransferRunConfig
from pipeline.transfer.runner import TransferResult, run_transfer

__all__ = ["run_demo"]

TASK_ROLE = {HELDOUT_TASK: "in-domain, classes the pretraining never saw", "digits": "cross-domain"}


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
    result = DemoResult(workdir, f"sqlite:///{workdir / 'mlflow.db'}", machine=machine_line())
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
        result.pretrain_data, result.data, result.classes = data.dataset, data.sizes, data.classes
        s, seen = data.sizes, data.classes["pretrain"]
        held = f"; held out: {', '.join(data.classes[HELDOUT_TASK])}" if HELDOUT_TASK in data.classes else ""
        say(f"  pretraining, {data.dataset} ({len(seen)} classes{held}): train {s['train']}, val {s['val']}, "
            f"few-shot {s['fewshot-train']}/{s['fewshot-test']}")
        for task in data.tasks:
            say(f"  {task} ({TASK_ROLE[task]}): train {s[f'{task}-train']}, test {s[f'{task}-test']}")
        say("  " + (f"{data.written} shards written" if data.written else "shards reused") + f" under "
            f"{workdir / 'shards'}")

    urls = data.urls
    pre_cfg = load_config(CONFIG_DIR / plan.pretrain_config, [
        f"data.train={urls['train']}", f"data.val={urls['val']}", f"data.fewshot_train={urls['fewshot-train']}",
        f"data.fewshot_test={urls['fewshot-test']}", f"scaling.storage_path={runs}", f"tracking.tracking_uri={uri}",
        f"tracking.artifact_root={artifacts}", f"model.num_classes={len(seen)}",  # 6, or 10 in the digits fallback
        f"train.fewshot_name={'fmnist' if data.dataset == 'fashion-mnist' else data.dataset}",
    ], RunConfig)
    tr_over = [f"scaling.storage_path={runs}", f"tracking.tracking_uri={uri}", f"tracking.artifact_root={artifacts}"]

    def task_over(task: str) -> list[str]:
        over = [f"data.train={urls[f'{task}-train']}", f"data.val={urls[f'{task}-test']}",
                f"model.num_classes={len(data.classes[task])}"]
        # the recipe does not flip digits (a mirrored digit is another symbol); a mirrored shoe or bag is the same
        # class, and pretraining flipped its images too
        return over if task == "digits" else [*over, "data.augment.hflip=true"]

    tr_cfg = load_config(CONFIG_DIR / plan.transfer_config, [*tr_over, *task_over("digits")], TransferRunConfig)

    def run_name(task: str, kind: str = "", seed: int = 0) -> str:
        # the digits runs keep the recipe's names (demo-transfer, demo-transfer-scratch, ...)
        base = tr_cfg.name if task == "digits" else f"{tr_cfg.name}-{task.removeprefix('fmnist-')}"
        return base + kind + (f"-seed{seed}" if seed else "")

    m, t = pre_cfg.model, pre_cfg.train
    with stages.stage(f"pretrain: {m.name} at {m.image_size} px on {data.dataset} ({m.num_classes} classes), "
                      f"DeepSpeed ZeRO-{t.zero.stage} on {pre_cfg.scaling.max_workers} Ray workers, {t.steps} steps x "
                      f"{t.global_batch} images"):
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
    tasks = {task: result.tasks.setdefault(task, TaskResult()) for task in data.tasks}

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

    roles = ", ".join(f"{task} ({TASK_ROLE[task]})" for task in tasks)
    with stages.stage(f"transfer: {source} -> {roles} at {tr_cfg.model.image_size} px ({budget}; {plan.seeds} "
                      "seed(s) each)"):
        for task, res in tasks.items():
            for s in range(plan.seeds):
                # only the digits fine-tune of seed 0 goes into the registry (vit-demo-digits), and only it draws
                # the pictures (attention rollout, confusion matrix: seconds a run) for the version the registry shows
                register = task == "digits" and s == 0
                plots = () if register else ("transfer.plots=false",)
                tr = transfer(run_name(task, seed=s), *task_over(task), *seeded(s), *plots, register=register)
                res.finetune.append(tr.metrics["final/top1"])  # the workers' evaluation over the whole test split
                if s == 0:
                    res.run_ids["finetune"] = tr.run_id
                if tr.registered:
                    res.registered = f"models:/{tr.registered.name}/{tr.registered.version}"
                say(f"  {task} seed {s}: fine-tuned top-1 on {data.sizes[f'{task}-test']} test images: "
                    f"{res.finetune[-1]:.2%}")

    with stages.stage(f"scratch: the same architecture and budget from a random init on {', '.join(tasks)} "
                      f"({budget})"):
        # the transfer job itself with transfer.init=random: only the starting weights differ, seed by seed
        for task, res in tasks.items():
            for s in range(plan.seeds):
                sc = transfer(run_name(task, "-scratch", s), *task_over(task), *seeded(s), "transfer.init=random",
                              "transfer.plots=false")
                res.scratch.append(sc.metrics["final/top1"])
                if s == 0:
                    res.run_ids["scratch"] = sc.run_id
                say(f"  {task} seed {s}: from-scratch (random init) top-1 on {data.sizes[f'{task}-test']} test "
                    f"images: {res.scratch[-1]:.2%}")

    with stages.stage(f"probe: ridge probes of frozen features on {', '.join(tasks)} (pretrained, random init, raw "
                      "pixels)"):
        for task, res in tasks.items():
            for init in ("pretrained", "random"):
                pr = transfer(run_name(task, f"-probe-{init}"), *task_over(task), "transfer.mode=fewshot",
                              "transfer.fewshot_probe=true", f"transfer.init={init}", "transfer.keep_pre_logits=true")
                res.probe[init] = pr.metrics["probe/top1"]
                say(f"  {task}, {'pretrained' if init == 'pretrained' else 'random-init'} features: ridge-probe "
                    f"top-1 {res.probe[init]:.2%}")
            res.probe["pixels"], _ = ridge_probe(*_pixel_splits(data.tasks[task]))
            say(f"  {task}, raw pixels: ridge-probe top-1 {res.probe['pixels']:.2%}")

    with stages.stage("registry: what the MLflow model registry now holds"):
        for name in (pre_cfg.tracking.registered_model, tr_cfg.tracking.registered_model):
            for v in describe_model(name, uri)["versions"]:
                tags = {k: v["tags"][k] for k in ("model.variant", "resolution", "steps") if k in v["tags"]}
                say(f"  {name} v{v['version']} @{','.join(v['aliases']) or '-'}  {tags}")
                chain = " <- ".join(link["uri"] for link in v["lineage"])
                say(f"    lineage: {chain} <- data {v['lineage'][-1].get('dataset.url', 'unknown')}")


def _pixel_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, ...]:
    """A task's images as raw pixels [N, H*W] in [0, 1] with their labels (train, then test): the probe's floor."""
    flat = {k: (torch.from_numpy(x.reshape(len(x), -1)).float() / 255.0, torch.from_numpy(y))
            for k, (x, y) in splits.items()}
    return (*flat["train"], *flat["test"])


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
