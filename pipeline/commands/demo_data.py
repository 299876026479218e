"""The demo's data and workdir: its two sizes (full, quick), Fashion-MNIST from the Debian package (scikit-learn's
digits when it is absent) split into the 6 classes pretraining sees and the 4 it never sees (the "fmnist-heldout"
task), the digits task upsampled to 28 px, and the shards all are written to. Stage 1 of `vitpipe demo`; the tests
take their digit images from here too. torch and scikit-learn are imported inside `digits_28px`."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.data.manifest import load_dataset_spec
from pipeline.data.sources import ArraySource, Source, read_idx
from pipeline.data.writer import write_shards

__all__ = [
    "DemoPlan", "PLANS", "CONFIG_DIR", "MARKER", "FMNIST_CLASSES", "HELDOUT_CLASSES", "SEEN_CLASSES", "HELDOUT_TASK",
    "DemoData", "find_fashion_mnist", "select_classes", "fmnist_splits", "digits_28px", "digits_splits",
    "write_demo_data", "prepare_workdir",
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
# Held out of everything pretraining sees: the four non-clothing classes (footwear and bags). The same domain (28 px
# product photos on black), other objects: the transfer onto them asks what the features carry to classes they were
# not trained to separate, while the 6 garments left (tops, trousers, pullovers, dresses, coats, shirts) still give
# pretraining a 6-way task with look-alike classes to learn from.
HELDOUT_CLASSES = (5, 7, 8, 9)  # Sandal, Sneaker, Bag, Ankle boot
SEEN_CLASSES = tuple(c for c in range(len(FMNIST_CLASSES)) if c not in HELDOUT_CLASSES)
HELDOUT_TASK = "fmnist-heldout"
PRETRAIN_SHARDS = "fmnist-pretrain"  # the shards' dataset name: never mistaken for 10-class shards of an older demo
DIGIT_CLASSES = [str(i) for i in range(10)]
_CLEANED = ("runs", "mlflow.db", "mlartifacts", "transfer")  # what a new run removes; shards/ is reused


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo flavour. The training recipes themselves are the YAML files in configs/demo/."""

    name: str
    pretrain_config: str
    transfer_config: str
    # pretraining: images of the 6 seen classes only, in file order
    fmnist_train: int           # first N of Fashion-MNIST's training file
    fmnist_val: int             # first N of its test file
    fewshot_train: int          # the next N of the training file: the pool the k shots per class are drawn from
    fewshot_test: int           # the next N of the test file
    samples_per_shard: int
    heldout_train: int = 1000   # the fmnist-heldout task: first N images of the 4 held-out classes, training file
    heldout_test: int = 2000    # first N of them in the test file
    digits_train: int = 1000    # of scikit-learn's 1797 digits; the rest is the test split
    digits_samples_per_shard: int = 250
    seeds: int = 5              # fine-tune and scratch runs per task, each with its own train.seed and data.seed

    def check(self) -> None:
        for f in (self.pretrain_config, self.transfer_config):
            if not (CONFIG_DIR / f).is_file():
                raise FileNotFoundError(f"demo recipe {CONFIG_DIR / f} is missing (run the demo from a source "
                                        "checkout)")


# Fashion-MNIST holds 6,000 training and 1,000 test images per class: 36,000 / 6,000 of the seen classes and
# 24,000 / 4,000 of the held-out ones, so both plans fit with room to spare.
PLANS = {
    "full": DemoPlan("full", "pretrain.yaml", "transfer.yaml", 20_000, 2_000, 1_000, 1_000, 1_000,
                     heldout_train=1_000, heldout_test=2_000, seeds=5),
    "quick": DemoPlan("quick", "pretrain-quick.yaml", "transfer-quick.yaml", 2_000, 512, 300, 300, 250,
                      heldout_train=300, heldout_test=300, seeds=1),
}


@dataclass(frozen=True)
class DemoData:
    """What stage 1 wrote: the pretraining dataset's name ("fashion-mnist", or "digits" as the fallback), each
    split's manifest URL and size (pretraining: "train", "val", "fewshot-train", "fewshot-test"; each downstream
    task's "<task>-train" and "<task>-test"), the class names of the pretraining data ("pretrain") and of each task,
    and each task's splits in memory {"train", "test"} -> (uint8 images, labels) for the raw-pixel probe. Tasks in
    the order the demo runs them: fmnist-heldout (only with Fashion-MNIST), then digits."""

    dataset: str
    urls: dict[str, str]
    sizes: dict[str, int]
    written: int  # shards written now; the others were reused from an earlier run
    classes: dict[str, list[str]]
    tasks: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


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


def select_classes(images: np.ndarray, labels: np.ndarray,
                   classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The images whose label is one of `classes`, in file order, relabelled by their class's position in
    `classes` (0..len(classes)-1)."""
    wanted = np.asarray(classes, dtype=np.int64)
    keep = np.isin(labels, wanted)
    remap = np.full(int(max(labels.max(initial=0), wanted.max())) + 1, -1, dtype=np.int64)
    remap[wanted] = np.arange(len(wanted))
    return images[keep], remap[labels[keep]]


def fmnist_splits(files: dict[str, Path], plan: DemoPlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST cut for the demo, each split (uint8 images [N, 28, 28], labels): pretraining's "train",
    "fewshot-train" (seen classes of the training file, one after the other), "val", "fewshot-test" (of the test
    file), labels 0..5; the held-out task's "heldout-train" and "heldout-test" (the held-out classes of each file),
    labels 0..3. No image of a held-out class reaches a pretraining split, so none of the task's images does."""
    cuts = {
        "train": {"seen": (("train", plan.fmnist_train), ("fewshot-train", plan.fewshot_train)),
                  "heldout": (("heldout-train", plan.heldout_train),)},
        "test": {"seen": (("val", plan.fmnist_val), ("fewshot-test", plan.fewshot_test)),
                 "heldout": (("heldout-test", plan.heldout_test),)},
    }
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for file, groups in cuts.items():
        images, labels = read_idx(str(files[f"{file}_images"])), read_idx(str(files[f"{file}_labels"]))
        for group, splits in groups.items():
            x, y = select_classes(images, labels.astype(np.int64), SEEN_CLASSES if group == "seen" else HELDOUT_CLASSES)
            start = 0
            for split, n in splits:
                if start + n > len(x):
                    raise ValueError(f"{files[f'{file}_images']} holds {len(x)} images of the {group} classes; the "
                                     f"{plan.name} demo plan needs {start + n} of them up to its {split!r} split")
                out[split] = (x[start:start + n], y[start:start + n])
                start += n
    return out


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


def _existing(dest: Path, name: str, source: Source) -> str | None:
    """The manifest URL of shards an earlier demo run wrote with the same dataset, size and classes, if any."""
    manifest = dest / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        m = load_dataset_spec(str(manifest))
    except (ValueError, OSError):
        return None
    same = m.name == name and m.num_samples == len(source) and m.class_names == source.class_names
    return str(manifest) if same else None


def _write(source: Source, dest: Path, *, name: str, split: str, per_shard: int) -> tuple[str, int]:
    """(manifest URL, shards written): shards of the same dataset, size and classes under `dest` are reused."""
    url = _existing(dest, name, source)
    if url:
        return url, 0
    if dest.exists():
        shutil.rmtree(dest)
    url = write_shards(source, str(dest), name=name, split=split, samples_per_shard=per_shard, progress=False)
    return url, -(-len(source) // per_shard)


def write_demo_data(plan: DemoPlan, shards: Path, say: Callable[[str], None]) -> DemoData:
    """Stage 1: the pretraining splits (Fashion-MNIST's seen classes, or digits when it is absent) and each
    downstream task's splits (fmnist-heldout when Fashion-MNIST is there, digits always)."""
    tasks: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    classes: dict[str, list[str]] = {}
    digits = digits_splits(plan)
    files = find_fashion_mnist()
    if files is not None:
        dataset, pre_name = "fashion-mnist", PRETRAIN_SHARDS
        cut = fmnist_splits(files, plan)
        classes["pretrain"] = [FMNIST_CLASSES[c] for c in SEEN_CLASSES]
        pre = {k: cut[k] for k in ("train", "val", "fewshot-train", "fewshot-test")}
        tasks[HELDOUT_TASK] = {"train": cut["heldout-train"], "test": cut["heldout-test"]}
        classes[HELDOUT_TASK] = [FMNIST_CLASSES[c] for c in HELDOUT_CLASSES]
    else:
        dataset = pre_name = "digits"
        say(f"  NOTE: Fashion-MNIST not found (Debian package {FMNIST_PACKAGE} is not installed: "
            f"`apt-get install {FMNIST_PACKAGE}`, or `make setup` as root). Falling back to scikit-learn's digits for "
            "pretraining too, so the transfer comparison below is NOT meaningful.")
        say(f"  NOTE: without Fashion-MNIST there are no held-out classes: the {HELDOUT_TASK} task is skipped.")
        classes["pretrain"] = DIGIT_CLASSES
        pre = {"train": digits["train"], "val": digits["test"], "fewshot-train": digits["train"],
               "fewshot-test": digits["test"]}
    tasks["digits"] = digits
    classes["digits"] = DIGIT_CLASSES
    # (key, dataset name, split, images and labels, class names, samples per shard)
    jobs = [(split, pre_name, split, xy, classes["pretrain"], plan.samples_per_shard) for split, xy in pre.items()]
    for task, splits in tasks.items():
        per_shard = plan.digits_samples_per_shard if task == "digits" else plan.samples_per_shard
        jobs += [(f"{task}-{split}", task, split, xy, classes[task], per_shard) for split, xy in splits.items()]
    urls, sizes, written = {}, {}, 0
    for key, name, split, xy, names, per_shard in jobs:
        src = ArraySource(*xy, names)
        urls[key], n = _write(src, shards / name / split, name=name, split=split, per_shard=per_shard)
        sizes[key], written = len(src), written + n
    return DemoData(dataset, urls, sizes, written, classes, tasks)


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
