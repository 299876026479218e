"""The demo's data and workdir: its two sizes (full, quick), Fashion-MNIST from the Debian package (scikit-learn's
digits when it is absent), the digits task upsampled to 28 px, and the shards both are written to. Stage 1 of
`vitpipe demo`; the tests take their digit images from here too. torch and scikit-learn are imported inside
`digits_28px`."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.data.manifest import load_dataset_spec
from pipeline.data.sources import ArraySource, IdxSource, SliceSource, Source
from pipeline.data.writer import write_shards

__all__ = [
    "DemoPlan", "PLANS", "CONFIG_DIR", "MARKER", "FMNIST_CLASSES", "DemoData", "find_fashion_mnist", "digits_28px",
    "digits_splits", "write_demo_data", "prepare_workdir",
]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"
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

    def check(self) -> None:
        for f in (self.pretrain_config, self.transfer_config):
            if not (CONFIG_DIR / f).is_file():
                raise FileNotFoundError(f"demo recipe {CONFIG_DIR / f} is missing (run the demo from a source "
                                        "checkout)")


PLANS = {
    "full": DemoPlan("full", "pretrain.yaml", "transfer.yaml", 20_000, 2_000, 1_000, 1_000, 1_000),
    "quick": DemoPlan("quick", "pretrain-quick.yaml", "transfer-quick.yaml", 2_000, 512, 300, 300, 250, seeds=1),
}


@dataclass(frozen=True)
class DemoData:
    """What stage 1 wrote: the pretraining dataset's name ("fashion-mnist", or "digits" as the fallback), each
    split's manifest URL and size (the digits task's splits are "digits-train" and "digits-test")."""

    dataset: str
    urls: dict[str, str]
    sizes: dict[str, int]
    written: int  # shards written now; the others were reused from an earlier run


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


def digits_splits(plan: DemoPlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The downstream task's train and test split: (uint8 images [N, 28, 28], labels)."""
    digits, digit_labels = digits_28px()
    order = np.random.default_rng(0).permutation(len(digits))  # the scans are grouped by writer: mix them
    digits, digit_labels = digits[order], digit_labels[order]
    n = plan.digits_train
    return {"train": (digits[:n], digit_labels[:n]), "test": (digits[n:], digit_labels[n:])}


def _existing(dest: Path, name: str, samples: int) -> str | None:
    """The manifest URL of shards an earlier demo run wrote with the same dataset and size, if any."""
    manifest = dest / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        m = load_dataset_spec(str(manifest))
    except (ValueError, OSError):
        return None
    return str(manifest) if m.name == name and m.num_samples == samples else None


def _write(source: Source, dest: Path, *, name: str, split: str, per_shard: int) -> tuple[str, int]:
    """(manifest URL, shards written): shards of the same dataset and size under `dest` are reused."""
    url = _existing(dest, name, len(source))
    if url:
        return url, 0
    if dest.exists():
        shutil.rmtree(dest)
    url = write_shards(source, str(dest), name=name, split=split, samples_per_shard=per_shard, progress=False)
    return url, -(-len(source) // per_shard)


def write_demo_data(plan: DemoPlan, shards: Path, say: Callable[[str], None]) -> DemoData:
    """Stage 1: the pretraining splits (Fashion-MNIST, or digits when it is absent) and the digits splits."""
    digit_sources = {split: ArraySource(x, y, DIGIT_CLASSES) for split, (x, y) in digits_splits(plan).items()}
    files = find_fashion_mnist()
    if files is not None:
        dataset = "fashion-mnist"
        train = IdxSource(str(files["train_images"]), str(files["train_labels"]), FMNIST_CLASSES)
        test = IdxSource(str(files["test_images"]), str(files["test_labels"]), FMNIST_CLASSES)
        a, b = plan.fmnist_train, plan.fmnist_val
        pre: dict[str, Source] = {
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
    jobs = [(split, src, shards / dataset / split, dataset, plan.samples_per_shard) for split, src in pre.items()]
    jobs += [(f"digits-{split}", src, shards / "digits" / split, "digits", plan.digits_samples_per_shard)
             for split, src in digit_sources.items()]
    urls, sizes, written = {}, {}, 0
    for key, src, dest, name, per_shard in jobs:
        urls[key], n = _write(src, dest, name=name, split=key.removeprefix("digits-"), per_shard=per_shard)
        sizes[key], written = len(src), written + n
    return DemoData(dataset, urls, sizes, written)


def prepare_workdir(workdir: Path) -> list[str]:
    """Makes `workdir` the demo's (refusing a non-empty one the demo did not make) and removes the previous demo
    run's runs, MLflow store and transfer files; shards/ is kept for reuse. Returns what it removed."""
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
    return removed
