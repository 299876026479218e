"""The demo's data cut (pipeline/commands/demo_data.py) on small synthetic IDX files: no held-out class reaches a
pretraining split, labels are remapped to 0..k-1, the held-out task's splits hold only the 4 held-out classes and
none of the pretraining images; the shards written from them, and the digits fallback that skips the held-out task.
No Ray, no training."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.commands import demo_data
from pipeline.commands.demo_data import (
    FMNIST_CLASSES,
    HELDOUT_CLASSES,
    HELDOUT_TASK,
    SEEN_CLASSES,
    DemoPlan,
    fmnist_splits,
    select_classes,
    write_demo_data,
)
from pipeline.data.manifest import load_dataset_spec

PRETRAIN_SPLITS = ("train", "val", "fewshot-train", "fewshot-test")
# 12 training and 6 test images per class; the plan below needs 60 + 30 of the seen classes and 30 + 16 held out
PLAN = DemoPlan("unit", "pretrain-quick.yaml", "transfer-quick.yaml", fmnist_train=40, fmnist_val=20,
                fewshot_train=20, fewshot_test=10, samples_per_shard=16, heldout_train=30, heldout_test=16, seeds=1)


def _write_idx(path: Path, arr: np.ndarray) -> Path:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())
    return path


def _images(labels: np.ndarray, first_id: int) -> np.ndarray:
    """28x28 images that carry their own identity: a unique id in pixels (0,0)/(0,1), the file's label in (1,0)."""
    x = np.zeros((len(labels), 28, 28), np.uint8)
    ids = np.arange(first_id, first_id + len(labels))
    x[:, 0, 0], x[:, 0, 1], x[:, 1, 0] = ids % 256, ids // 256, labels
    return x


def _ids(x: np.ndarray) -> set[int]:
    return set((x[:, 0, 0].astype(int) + 256 * x[:, 0, 1].astype(int)).tolist())


@pytest.fixture
def fmnist_files(tmp_path) -> dict[str, Path]:
    """Fashion-MNIST's four files in miniature, labels shuffled as in the real ones."""
    rng = np.random.default_rng(0)
    files = {}
    for file, per_class, first_id in (("train", 12, 0), ("test", 6, 10_000)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        files[f"{file}_images"] = _write_idx(tmp_path / f"{file}-images-idx3-ubyte.gz", _images(labels, first_id))
        files[f"{file}_labels"] = _write_idx(tmp_path / f"{file}-labels-idx1-ubyte.gz", labels)
    return files


def test_select_classes_keeps_file_order_and_relabels_contiguously():
    labels = np.array([9, 0, 5, 7, 1, 8, 5])
    x, y = select_classes(np.arange(len(labels)), labels, (5, 7, 8, 9))
    assert x.tolist() == [0, 2, 3, 5, 6] and y.tolist() == [3, 0, 1, 2, 0]


def test_the_held_out_classes_are_the_four_non_clothing_ones():
    assert [FMNIST_CLASSES[c] for c in HELDOUT_CLASSES] == ["Sandal", "Sneaker", "Bag", "Ankle boot"]
    assert sorted(SEEN_CLASSES + HELDOUT_CLASSES) == list(range(10)) and len(SEEN_CLASSES) == 6


def test_no_held_out_class_reaches_pretraining_and_the_task_holds_only_them(fmnist_files):
    cut = fmnist_splits(fmnist_files, PLAN)
    sizes = {"train": 40, "val": 20, "fewshot-train": 20, "fewshot-test": 10, "heldout-train": 30, "heldout-test": 16}
    assert {k: len(x) for k, (x, _) in cut.items()} == sizes
    for split in PRETRAIN_SPLITS:
        x, y = cut[split]
        original = x[:, 1, 0]
        assert not set(original.tolist()) & set(HELDOUT_CLASSES), split
        assert (np.asarray(SEEN_CLASSES)[y] == original).all(), split  # remapped, not shuffled
        assert y.min() >= 0 and y.max() <= 5
    assert set(cut["train"][1].tolist()) == set(range(6))  # contiguous 0..5, every seen class present
    for split in ("heldout-train", "heldout-test"):
        x, y = cut[split]
        assert set(x[:, 1, 0].tolist()) <= set(HELDOUT_CLASSES), split
        assert (np.asarray(HELDOUT_CLASSES)[y] == x[:, 1, 0]).all(), split
        assert set(y.tolist()) == {0, 1, 2, 3}, split
    ids = {k: _ids(x) for k, (x, _) in cut.items()}
    pretraining = set().union(*(ids[k] for k in PRETRAIN_SPLITS))
    assert not (ids["heldout-train"] | ids["heldout-test"]) & pretraining
    assert not ids["train"] & ids["fewshot-train"] and not ids["val"] & ids["fewshot-test"]
    # the task's train split from the training file, its test split from the test file
    assert max(ids["heldout-train"]) < 10_000 <= min(ids["heldout-test"])


def test_a_plan_larger_than_the_files_is_refused_with_the_numbers(fmnist_files):
    big = DemoPlan("big", "pretrain-quick.yaml", "transfer-quick.yaml", 40, 20, 20, 10, 16, heldout_train=49)
    with pytest.raises(ValueError, match=r"holds 48 images of the heldout classes; the big demo plan needs 49"):
        fmnist_splits(fmnist_files, big)


def _tiny_digits(plan: DemoPlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    labels = np.arange(40) % 10
    x = _images(labels, 20_000)
    return {"train": (x[:30], labels[:30]), "test": (x[30:], labels[30:])}


def test_the_written_shards_hold_each_side_of_the_cut(fmnist_files, tmp_path, monkeypatch):
    monkeypatch.setattr(demo_data, "find_fashion_mnist", lambda: fmnist_files)
    monkeypatch.setattr(demo_data, "digits_splits", _tiny_digits)
    said: list[str] = []
    data = write_demo_data(PLAN, tmp_path / "shards", said.append)
    assert not said and data.dataset == "fashion-mnist" and list(data.tasks) == [HELDOUT_TASK, "digits"]
    seen = [FMNIST_CLASSES[c] for c in SEEN_CLASSES]
    held = ["Sandal", "Sneaker", "Bag", "Ankle boot"]
    assert data.classes == {"pretrain": seen, HELDOUT_TASK: held, "digits": [str(i) for i in range(10)]}
    for key, classes, n in (("train", seen, 40), ("fewshot-test", seen, 10), (f"{HELDOUT_TASK}-train", held, 30),
                            (f"{HELDOUT_TASK}-test", held, 16), ("digits-test", data.classes["digits"], 10)):
        m = load_dataset_spec(data.urls[key])
        assert (m.class_names, m.num_samples, data.sizes[key]) == (classes, n, n), key
    assert "/fmnist-pretrain/train/" in data.urls["train"]
    assert "/fmnist-heldout/train/" in data.urls[f"{HELDOUT_TASK}-train"]
    again = write_demo_data(PLAN, tmp_path / "shards", said.append)
    assert again.written == 0 and again.urls == data.urls  # reused: same dataset, size and classes


def test_without_fashion_mnist_the_held_out_task_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_data, "find_fashion_mnist", lambda: None)
    monkeypatch.setattr(demo_data, "digits_splits", _tiny_digits)
    said: list[str] = []
    data = write_demo_data(PLAN, tmp_path / "shards", said.append)
    assert data.dataset == "digits" and list(data.tasks) == ["digits"] and HELDOUT_TASK not in data.classes
    assert len(data.classes["pretrain"]) == 10
    assert any("NOTE: Fashion-MNIST not found" in s for s in said)
    assert any(f"the {HELDOUT_TASK} task is skipped" in s for s in said)
    assert not any(k.startswith(HELDOUT_TASK) for k in data.urls)
