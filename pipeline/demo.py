"""The end-to-end demo on one machine and real images: Fashion-MNIST shards -> ViT pretraining (DeepSpeed ZeRO-2 on 2
Ray workers, few-shot evaluation, MLflow tracking, registry) -> transfer from the registry onto scikit-learn's digits
-> the same budget from a random init -> the controls (frozen-feature ridge probes of the pretrained model, the same
architecture at random init, and raw pixels) -> a summary table. Fine-tune and scratch run over several seeds
(the quick variant: one), so their gap comes with its spread.

Everything lives under one workdir: shards in a local folder standing in for the object store, the runs and their
checkpoints, a sqlite MLflow store with its artifacts. Ray is a local instance on 127.0.0.1. Each run starts clean
(runs, MLflow store, transfer files are removed); shards written by an earlier run with the same sizes are reused.
ray, mlflow and torch are imported inside functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np

from pipeline.config import RunConfig, load_config
from pipeline.eval.fewshot import ridge_probe
from pipeline.launch.fanout import connect_ray
from pipeline.pretrain import run_pretraining
from pipeline.tracking.registry import describe_model
from pipeline.tracking.run import metric_history, ui_url
from pipeline.tracking.tail import MetricsTail
from pipeline.transfer.config import TransferRunConfig
from pipeline.transfer.runner import run_transfer

__all__ = [
    "DemoPlan", "PLANS", "DemoResult", "run_demo", "find_fashion_mnist", "digits_28px", "format_summary",
    "FMNIST_CLASSES", "MARKER", "CONFIG_DIR",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"
MARKER = ".vitpipe-demo"  # a workdir holding it was made by the demo: the demo may clean its own parts of it
FMNIST_PACKAGE = "dataset-fashion-mnist"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
_CLEANED = ("runs", "mlflow.db", "mlartifacts", "transfer")  # what a new run removes; shards/ is reused


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo flavour. The training recipes themselves are the YAML files in configs/demo/."""

    name: str
    pretrain_config: str
    transfer_config: str
    fmnist_train: int           # first N images of Fashion-MNIST's training file
    fmnist_val: int             # first N of its test file
    fewshot_train: int          # the next N of the training file: the pool the k shots per class are drawn from
    fewshot_test: int           # the next N of the test file
    samples_per_shard: int
    digits_train: int = 1000    # of scikit-learn's 1797 digits; the rest is the test split
    digits_samples_per_shard: int = 250
    seeds: int = 3              # fine-tune and scratch runs, each with its own train.seed and data.seed (order, crops)


PLANS = {
    "full": DemoPlan("full", "pretrain.yaml", "transfer.yaml", 20_000, 2_000, 1_000, 1_000, 1_000),
    "quick": DemoPlan("quick", "pretrain-quick.yaml", "transfer-quick.yaml", 2_000, 512, 300, 300, 250, seeds=1),
}


@dataclass
class StageTime:
    name: str
    seconds: float


@dataclass
class DemoResult:
    workdir: Path
    tracking_uri: str
    pretrain_data: str                      # "fashion-mnist" or "digits" (fallback)
    stages: list[StageTime] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)          # split -> samples
    pretrain: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)  # "top1": first seed's, "seeds": every seed's
    scratch: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, float] = field(default_factory=dict)      # features -> ridge-probe top-1 on digits

    @property
    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000"

    @property
    def ui_link(self) -> str:
        """The pretraining experiment in the model-training view of what `ui_command` serves."""
        return ui_url("http://127.0.0.1:5000", self.pretrain.get("experiment_id"))

    @property
    def transfer_gain(self) -> float:
        """Mean over seeds of fine-tune minus scratch top-1 (paired by seed)."""
        return float(np.mean(self._gaps()))

    @property
    def transfer_gain_std(self) -> float | None:
        gaps = self._gaps()
        return float(np.std(gaps, ddof=1)) if len(gaps) > 1 else None

    def _gaps(self) -> list[float]:
        a = self.transfer.get("seeds") or [self.transfer["top1"]]
        b = self.scratch.get("seeds") or [self.scratch["top1"]]
        return [x - y for x, y in zip(a, b)]


# -- data -------------------------------------------------------------------------------------------------------
def find_fashion_mnist() -> dict[str, Path] | None:
    """The four gzipped IDX files of the Debian package dataset-fashion-mnist, or None when it is not installed."""
    candidates = [FMNIST_DIR]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listed = subprocess.run(["dpkg", "-L", FMNIST_PACKAGE], capture_output=True, text=True, timeout=20)
        if listed.returncode == 0:
            dirs = {Path(line).parent for line in listed.stdout.splitlines() if line.endswith("-ubyte.gz")}
            candidates = sorted(dirs) + candidates
    for d in candidates:
        files = {k: d / name for k, name in FMNIST_FILES.items()}
        if all(p.is_file() for p in files.values()):
            return files
    return None


def digits_28px(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 real scans, 0..16) upsampled bilinearly to uint8 [N, size, size]."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy(), d.target.astype(np.int64)


def _existing(dest: Path, name: str, samples: int) -> str | None:
    """The manifest URL of shards an earlier demo run wrote with the same dataset and size, if any."""
    manifest = dest / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        from pipeline.data.manifest import load_dataset_spec

        m = load_dataset_spec(str(manifest))
    except (ValueError, OSError):
        return None
    return str(manifest) if m.name == name and m.num_samples == samples else None


def _write(source: Any, dest: Path, *, name: str, split: str, per_shard: int, say: Callable[[str], None]) -> str:
    from pipeline.data.writer import write_shards

    url = _existing(dest, name, len(source))
    if url:
        say(f"  {name}/{split}: reusing {len(source)} samples at {dest}")
        return url
    if dest.exists():
        shutil.rmtree(dest)
    t = time.perf_counter()
    url = write_shards(source, str(dest), name=name, split=split, samples_per_shard=per_shard, progress=False)
    say(f"  {name}/{split}: wrote {len(source)} samples in {-(-len(source) // per_shard)} shards to {dest} "
        f"({time.perf_counter() - t:.1f} s)")
    return url


def digits_splits(plan: DemoPlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The downstream task's train and test split: (uint8 images [N, 28, 28], labels)."""
    digits, digit_labels = digits_28px()
    order = np.random.default_rng(0).permutation(len(digits))  # the scans are grouped by writer: mix them
    digits, digit_labels = digits[order], digit_labels[order]
    n = plan.digits_train
    return {"train": (digits[:n], digit_labels[:n]), "test": (digits[n:], digit_labels[n:])}


def write_demo_data(plan: DemoPlan, shards: Path, say: Callable[[str], None]) -> tuple[str, dict[str, str],
                                                                                          dict[str, int]]:
    """Stage 1: the pretraining splits (Fashion-MNIST, or digits when it is absent) and the digits splits.
    Returns (pretraining dataset name, split -> manifest URL, split -> samples)."""
    from pipeline.data.sources import ArraySource, IdxSource, SliceSource

    urls: dict[str, str] = {}
    digit_sources = {split: ArraySource(x, y, DIGIT_CLASSES) for split, (x, y) in digits_splits(plan).items()}
    files = find_fashion_mnist()
    if files is not None:
        dataset = "fashion-mnist"
        say(f"  Fashion-MNIST from {files['train_images'].parent}")
        train = IdxSource(str(files["train_images"]), str(files["train_labels"]), FMNIST_CLASSES)
        test = IdxSource(str(files["test_images"]), str(files["test_labels"]), FMNIST_CLASSES)
        a, b = plan.fmnist_train, plan.fmnist_val
        pre = {
            "train": SliceSource(train, 0, a),
            "val": SliceSource(test, 0, b),
            "fewshot-train": SliceSource(train, a, a + plan.fewshot_train),
            "fewshot-test": SliceSource(test, b, b + plan.fewshot_test),
        }
    else:
        dataset = "digits"
        say(f"  NOTE: Fashion-MNIST not found (Debian package {FMNIST_PACKAGE} is not installed: "
            f"`apt-get install {FMNIST_PACKAGE}`, or `make setup` as root). Falling back to scikit-learn's digits for "
            "pretraining too, so the transfer comparison below is NOT meaningful.")
        pre = {
            "train": digit_sources["train"], "val": digit_sources["test"],
            "fewshot-train": digit_sources["train"], "fewshot-test": digit_sources["test"],
        }
    for split, src in pre.items():
        urls[split] = _write(src, shards / dataset / split, name=dataset, split=split, per_shard=plan.samples_per_shard,
                             say=say)
    for split, src in digit_sources.items():
        urls[f"digits-{split}"] = _write(src, shards / "digits" / split, name="digits", split=split,
                                         per_shard=plan.digits_samples_per_shard, say=say)
    sizes = {split: len(src) for split, src in pre.items()}
    sizes.update({f"digits-{s}": len(src) for s, src in digit_sources.items()})
    return dataset, urls, sizes


# -- helpers --------------------------------------------------------------------------------------------------------
def _prepare_workdir(workdir: Path, say: Callable[[str], None]) -> None:
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise ValueError(
            f"demo workdir {workdir} exists, is not empty and was not made by the demo (no {MARKER} file); "
            "choose another --workdir or an empty directory"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `vitpipe demo`; a new demo run removes runs/, mlflow.db, mlartifacts/ "
                                  "and transfer/ here and reuses shards/\n")
    removed = []
    for name in _CLEANED:
        p = workdir / name
        if p.is_dir():
            shutil.rmtree(p)
            removed.append(name)
        elif p.exists():
            p.unlink()
            removed.append(name)
    if removed:
        say(f"  cleaned the previous demo run in {workdir}: {', '.join(removed)} (shards/ is reused)")


@contextlib.contextmanager
def _demo_environment(say: Callable[[str], None], worker_logs: bool) -> Iterator[None]:
    """Embedded defaults: a local Ray on loopback and the demo's own MLflow store, whatever the shell points at.
    Unless `worker_logs`, the Ray workers' output stays in Ray's log files: the console shows the stages and the
    metrics as MLflow receives them (MetricsTail)."""
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    for k, v in saved.items():
        if v:
            say(f"  note: ignoring ${k}={v} (the demo runs on embedded defaults)")
        os.environ.pop(k, None)
    defaults = {"MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
                "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "vitpipe" / "torch_extensions")}
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pixels(images: np.ndarray) -> "torch.Tensor":
    """Raw pixels as features [N, H*W] in [0, 1]: the probe's floor."""
    import torch

    return torch.from_numpy(images.reshape(len(images), -1)).float() / 255.0


def _history(tracking_uri: str, run_id: str, key: str) -> list[float]:
    return [v for _, v in metric_history(tracking_uri, run_id, key)]


class _Stages:
    def __init__(self, result: DemoResult, say: Callable[[str], None], total: int):
        self.result, self.say, self.total, self.index = result, say, total, 0

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.index += 1
        self.say("\n" + "=" * 100 + f"\n[demo {self.index}/{self.total}] {title}\n" + "=" * 100)
        t = time.perf_counter()
        yield
        dt = time.perf_counter() - t
        self.result.stages.append(StageTime(title.split(":")[0], dt))
        self.say(f"[demo {self.index}/{self.total}] done in {dt:.1f} s")


# -- the demo -------------------------------------------------------------------------------------------------------
def run_demo(workdir: str | Path = "demo-out", *, quick: bool = False, worker_logs: bool = False,
             out: TextIO | None = None) -> DemoResult:
    """Runs the whole demo (see the module docstring) and returns its figures; prints progress and the summary.
    `worker_logs`: also stream the Ray workers' own output (DeepSpeed, Ray Train) to the console."""
    out = out or sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    plan = PLANS["quick" if quick else "full"]
    for f in (plan.pretrain_config, plan.transfer_config):
        if not (CONFIG_DIR / f).is_file():
            raise FileNotFoundError(f"demo recipe {CONFIG_DIR / f} is missing (run the demo from a source checkout)")
    workdir = Path(workdir).resolve()
    t0 = time.perf_counter()
    with _demo_environment(say, worker_logs):
        _prepare_workdir(workdir, say)
        # the local Ray every stage then reuses (run_pretraining / run_transfer connect to an initialised Ray as is)
        connect_ray(log_to_driver=worker_logs)
        if not worker_logs:
            say("  Ray workers' output goes to /tmp/ray/session_latest/logs/ (--worker-logs shows it here)")
        tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        result = DemoResult(workdir, tracking_uri, "")
        stages = _Stages(result, say, 6)
        try:
            _run_stages(plan, workdir, result, stages, say)
        finally:
            _shutdown_ray()
    total = time.perf_counter() - t0
    result.stages.append(StageTime("total", total))
    say("\n" + format_summary(result, plan))
    return result


def _run_stages(plan: DemoPlan, workdir: Path, result: DemoResult, stages: _Stages, say: Callable[[str], None]) -> None:
    uri, runs, artifacts = result.tracking_uri, workdir / "runs", (workdir / "mlartifacts").as_uri()

    with stages.stage(f"data: shards of real images ({plan.name} demo)"):
        dataset, urls, sizes = write_demo_data(plan, workdir / "shards", say)
        result.pretrain_data, result.data = dataset, sizes

    pre_cfg = load_config(CONFIG_DIR / plan.pretrain_config, [
        f"data.train={urls['train']}", f"data.val={urls['val']}", f"data.fewshot_train={urls['fewshot-train']}",
        f"data.fewshot_test={urls['fewshot-test']}", f"scaling.storage_path={runs}", f"tracking.tracking_uri={uri}",
        f"tracking.artifact_root={artifacts}", f"train.fewshot_name={'fmnist' if dataset == 'fashion-mnist' else dataset}",
    ], RunConfig)
    tr_over = [f"data.train={urls['digits-train']}", f"data.val={urls['digits-test']}", f"scaling.storage_path={runs}",
               f"tracking.tracking_uri={uri}", f"tracking.artifact_root={artifacts}"]
    tr_cfg = load_config(CONFIG_DIR / plan.transfer_config, tr_over, TransferRunConfig)

    m, t = pre_cfg.model, pre_cfg.train
    with stages.stage(f"pretrain: {m.name} at {m.image_size} px on {dataset}, DeepSpeed ZeRO-{t.zero.stage} on "
                      f"{pre_cfg.scaling.max_workers} Ray workers, {t.steps} steps x {t.global_batch} images"):
        tail = MetricsTail(uri, pre_cfg.tracking.experiment, pre_cfg.name, t.steps, "pretrain", say)
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
            "run_id": pre.run_id, "experiment_id": pre.experiment_id, "model": m.name, "steps": t.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "fewshot": {k: v[-1] for k, v in shots.items() if v},
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

    def transfer(label: str, name: str, *over: str, register: bool = False) -> Any:
        cfg = load_config(CONFIG_DIR / plan.transfer_config, [*tr_over, f"name={name}", *over,
                                                              *(() if register else ("tracking.registered_model=null",))],
                          TransferRunConfig)
        tail = MetricsTail(uri, cfg.tracking.experiment, cfg.name, cfg.train.steps, label, say)
        tail.start()
        try:
            return run_transfer(cfg, source=source, workdir=workdir / "transfer" / name)
        finally:
            tail.stop()

    seeds = range(plan.seeds)
    with stages.stage(f"transfer: {source} -> digits at {tr_cfg.model.image_size} px ({budget}; {plan.seeds} seed(s))"):
        accs = []
        for s in seeds:
            tr = transfer("transfer", tr_cfg.name + (f"-seed{s}" if s else ""), f"train.seed={s}", f"data.seed={s}",
                          register=s == 0)
            accs.append(tr.metrics["final/top1"])  # the workers' evaluation over the whole test split
            if s == 0:
                result.transfer = {"run_id": tr.run_id, "registered": f"models:/{tr.registered.name}/"
                                   f"{tr.registered.version}" if tr.registered else None}
            say(f"  seed {s}: transfer top-1 on {tests} test digits: {accs[-1]:.2%}")
        result.transfer.update({"top1": accs[0], "seeds": accs})

    with stages.stage(f"scratch: the same architecture and budget on digits from a random init ({budget})"):
        accs = []
        for s in seeds:  # the transfer job itself with transfer.init=random: only the starting weights differ
            sc = transfer("scratch", f"{tr_cfg.name}-scratch" + (f"-seed{s}" if s else ""), f"train.seed={s}",
                          f"data.seed={s}", "transfer.init=random", "transfer.plots=false")
            accs.append(sc.metrics["final/top1"])
            if s == 0:
                result.scratch = {"run_id": sc.run_id}
            say(f"  seed {s}: from-scratch top-1 on {tests} test digits: {accs[-1]:.2%}")
        result.scratch.update({"top1": accs[0], "seeds": accs})

    with stages.stage("probe: ridge probes of frozen features on digits (pretrained, random init, raw pixels)"):
        for init in ("pretrained", "random"):
            pr = transfer("probe", f"{tr_cfg.name}-probe-{init}", "transfer.mode=fewshot", "transfer.fewshot_probe=true",
                          f"transfer.init={init}", "transfer.keep_pre_logits=true")
            result.probe[init] = pr.metrics["probe/top1"]
            say(f"  {init} features: ridge-probe top-1 {result.probe[init]:.2%} (l2 2^{pr.metrics['probe/log2_l2']:.0f} "
                "by leave-one-out)")
        import torch

        flat = {k: (_pixels(x), torch.from_numpy(y)) for k, (x, y) in digits_splits(plan).items()}
        result.probe["pixels"], l2 = ridge_probe(*flat["train"], *flat["test"])
        say(f"  raw pixels: ridge-probe top-1 {result.probe['pixels']:.2%} (l2 {l2:g})")

    with stages.stage("registry: what the MLflow model registry now holds"):
        for name in (pre_cfg.tracking.registered_model, tr_cfg.tracking.registered_model):
            d = describe_model(name, uri)
            for v in d["versions"]:
                tags = {k: v["tags"][k] for k in ("model.variant", "resolution", "steps") if k in v["tags"]}
                say(f"  {name} v{v['version']} @{','.join(v['aliases']) or '-'}  {tags}")
                chain = " <- ".join(link["uri"] for link in v["lineage"])
                say(f"    lineage: {chain} <- data {v['lineage'][-1].get('dataset.url', 'unknown')}")


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def format_summary(result: DemoResult, plan: DemoPlan | None = None) -> str:
    """The summary table printed at the end of the demo."""
    times = {s.name: s.seconds for s in result.stages}
    p, tr, sc = result.pretrain, result.transfer, result.scratch
    shots = "  ".join(f"{k}-shot {v:.1%}" for k, v in sorted(p.get("fewshot", {}).items()))
    d = result.data
    def spread(accs: list[float]) -> str:
        if len(accs) < 2:
            return f"{accs[0]:.1%} (1 seed)" if accs else "n/a"
        return f"{np.mean(accs):.1%} ± {np.std(accs, ddof=1) * 100:.1f} ({len(accs)} seeds)"

    pr = result.probe
    probe = "  ".join(f"{k} {pr[k]:.1%}" for k in ("pretrained", "random", "pixels") if k in pr)
    rows = [
        ("1 data", times.get("data"), f"{result.pretrain_data}: train {d.get('train')}, val {d.get('val')}, "
         f"few-shot {d.get('fewshot-train')}/{d.get('fewshot-test')}; digits {d.get('digits-train')}/"
         f"{d.get('digits-test')}"),
        ("2 pretrain", times.get("pretrain"), f"{p.get('model')} {p.get('steps')} steps: loss {p.get('first_loss', 0):.3f} "
         f"-> {p.get('last_loss', 0):.3f}; val top-1 {p.get('val_prec1', float('nan')):.1%}"),
        ("", None, f"few-shot ({result.pretrain_data}): {shots}"),
        ("3 transfer", times.get("transfer"), f"digits top-1 {spread(tr.get('seeds', []))}  (from {p.get('source')})"),
        ("4 scratch", times.get("scratch"), f"digits top-1 {spread(sc.get('seeds', []))}  (random init, same "
         "steps/batch/optimiser)"),
        ("5 probe", times.get("probe"), f"ridge probe on frozen features, digits top-1: {probe}"),
        ("6 registry", times.get("registry"), f"{p.get('registered')}, {tr.get('registered')}"),
        ("total", times.get("total"), ""),
    ]
    width = max(len(r[2]) for r in rows)
    lines = [f"vitpipe demo summary ({plan.name if plan else ''}; workdir {result.workdir})",
             f"{'stage':<11} {'wall':>8}  result", f"{'-' * 11} {'-' * 8}  {'-' * width}"]
    for name, secs, text in rows:
        lines.append(f"{name:<11} {(f'{secs:.1f} s' if secs is not None else ''):>8}  {text}")
    lines.append("")
    few = [v for _, v in sorted(p.get("fewshot", {}).items())]
    if len(few) > 1 and any(b < a for a, b in zip(few, few[1:])):
        lines.append("NOTE: the few-shot accuracy does not rise with k on every step of the row above")
    if tr and sc:
        gain, std = result.transfer_gain, result.transfer_gain_std
        n = len(tr.get("seeds", [])) or 1
        spread_txt = f" ± {std * 100:.1f}" if std is not None else ""
        verdict = "fine-tuning beats training from scratch" if gain > 0 else \
            "NOTE: fine-tuning did NOT beat training from scratch"
        lines.append(f"{verdict}: {gain * 100:+.1f}{spread_txt} points top-1 on digits ({n} seed(s), paired)")
    if {"pretrained", "random", "pixels"} <= set(pr):
        for other, what in (("random", "the same network at random init"), ("pixels", "raw pixels")):
            diff = (pr["pretrained"] - pr[other]) * 100
            word = "better" if diff > 0 else "NOT better"
            lines.append(f"pretrained features probe {word} than {what}: {diff:+.1f} points")
    lines += ["", "MLflow UI on this demo's store:", f"  {result.ui_command}", f"  then open {result.ui_link}"]
    return "\n".join(lines)
