"""The shipped recipes carry the paper's values (Table 3, Appendix B.1, Table 2's high-resolution fine-tunes): one
row per recipe, compared with the resolved config; a recipe without a row fails, so does one without a run command
or a smoke variant."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import config_class, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


@dataclass(frozen=True)
class Dataset:
    num_samples: int  # training images, for epochs = steps x global batch / num_samples
    num_classes: int
    loss: str


# JFT-300M as the paper counts it (303M; _jft.yaml's 517,822 steps are 303M x 7 / 4096); ImageNet-21k fall 2011
# (14,197,122, the paper's "14.2M"); ImageNet-1k's ILSVRC-2012 train split.
DATASETS = {
    "jft300m": Dataset(303_000_000, 18_291, "sigmoid"),
    "imagenet21k": Dataset(14_197_122, 21_843, "sigmoid"),
    "imagenet1k": Dataset(1_281_167, 1000, "softmax"),
}


@dataclass(frozen=True)
class Pretrain:
    path: str
    variant: str
    dataset: str
    epochs: float
    lr: float
    decay: str
    weight_decay: float
    dropout: float
    resolution: int = 224


# Table 3 (Adam 0.9/0.999, batch 4096, 10k warmup, clip 1, 224 px in every row).
PRETRAIN = [
    Pretrain("pretrain/vit-b16-jft.yaml", "vit_b16", "jft300m", 7, 8e-4, "linear", 0.1, 0.0),
    Pretrain("pretrain/vit-b32-jft.yaml", "vit_b32", "jft300m", 7, 8e-4, "linear", 0.1, 0.0),
    Pretrain("pretrain/vit-l32-jft.yaml", "vit_l32", "jft300m", 7, 6e-4, "linear", 0.1, 0.0),
    Pretrain("pretrain/vit-l16-jft.yaml", "vit_l16", "jft300m", 7, 4e-4, "linear", 0.1, 0.0),
    Pretrain("pretrain/vit-l16-jft-14ep.yaml", "vit_l16", "jft300m", 14, 4e-4, "linear", 0.1, 0.0),
    Pretrain("pretrain/vit-h14-jft.yaml", "vit_h14", "jft300m", 14, 3e-4, "linear", 0.1, 0.0),
    Pretrain("pretrain/vit-b16-i21k.yaml", "vit_b16", "imagenet21k", 90, 1e-3, "linear", 0.03, 0.1),
    Pretrain("pretrain/vit-b32-i21k.yaml", "vit_b32", "imagenet21k", 90, 1e-3, "linear", 0.03, 0.1),
    Pretrain("pretrain/vit-l16-i21k.yaml", "vit_l16", "imagenet21k", 90, 1e-3, "linear", 0.03, 0.1),
    Pretrain("pretrain/vit-l32-i21k.yaml", "vit_l32", "imagenet21k", 90, 1e-3, "linear", 0.03, 0.1),
    Pretrain("pretrain/vit-l16-i21k-30ep.yaml", "vit_l16", "imagenet21k", 30, 1e-3, "linear", 0.03, 0.1),
    Pretrain("pretrain/vit-b16-i1k.yaml", "vit_b16", "imagenet1k", 300, 3e-3, "cosine", 0.3, 0.1),
]


@dataclass(frozen=True)
class Transfer:
    path: str
    source: str  # the registered pretraining recipe it starts from (the architecture comes with it)
    num_classes: int
    steps: int
    lr: float
    resolution: int = 384
    ema_decay: float = 0.0


# Appendix B.1.1: SGD momentum 0.9, batch 512, no weight decay, cosine, clip 1, 384 px; lr 0.03 is a point of the
# paper's grid (configs/transfer/_paper_base.yaml says why). Table 2: ViT-L/16 at 512 px and ViT-H/14 at 518 px
# on ImageNet with Polyak averaging 0.9999.
TRANSFER = [
    Transfer("transfer/imagenet.yaml", "vit-b16-i21k", 1000, 20_000, 0.03),
    Transfer("transfer/cifar10.yaml", "vit-b16-i21k", 10, 10_000, 0.03),
    Transfer("transfer/cifar100.yaml", "vit-b16-i21k", 100, 10_000, 0.03),
    Transfer("transfer/pets.yaml", "vit-b16-i21k", 37, 500, 0.03),
    Transfer("transfer/flowers.yaml", "vit-b16-i21k", 102, 500, 0.03),
    Transfer("transfer/imagenet-l16-512.yaml", "vit-l16-jft", 1000, 20_000, 0.03, 512, 0.9999),
    Transfer("transfer/imagenet-h14-518.yaml", "vit-h14-jft", 1000, 20_000, 0.03, 518, 0.9999),
]

SMOKE = ["pretrain/smoke.yaml", "transfer/smoke.yaml"]  # not paper recipes: what the tests run
OWNED_ELSEWHERE = ["transfer/vtab.yaml"]  # the VTAB recipes have their own tests


def _load(rel: str):
    path = CONFIGS / rel
    return load_config(path, model_cls=config_class([str(path)]))


@pytest.mark.parametrize("row", PRETRAIN, ids=lambda r: r.path)
def test_pretraining_recipe_is_the_papers(row: Pretrain) -> None:
    cfg = _load(row.path)
    data = DATASETS[row.dataset]
    assert row.dataset in cfg.data.train
    assert cfg.model.name == row.variant and cfg.model.image_size == row.resolution
    assert cfg.model.num_classes == data.num_classes and cfg.train.loss == data.loss
    assert cfg.model.drop_rate == row.dropout
    assert cfg.model.pre_logits is not None  # the pretraining head: one tanh hidden layer
    assert cfg.train.global_batch == 4096
    assert cfg.train.steps * cfg.train.global_batch / data.num_samples == pytest.approx(row.epochs, rel=0.005)
    optim, schedule = cfg.train.optim, cfg.train.schedule
    assert (optim.name, optim.betas, optim.grad_clip) == ("adamw", (0.9, 0.999), 1.0)
    assert optim.lr == pytest.approx(row.lr) and optim.weight_decay == row.weight_decay
    assert (schedule.warmup_steps, schedule.decay, schedule.end_lr_fraction) == (10_000, row.decay, 0.0)
    assert cfg.train.ema_decay == 0.0


@pytest.mark.parametrize("row", TRANSFER, ids=lambda r: r.path)
def test_fine_tuning_recipe_is_the_papers(row: Transfer) -> None:
    cfg = _load(row.path)
    assert cfg.transfer.source == f"models:/{row.source}@latest"
    assert (cfg.transfer.mode, cfg.transfer.keep_pre_logits) == ("finetune", False)
    assert cfg.model.image_size == row.resolution and cfg.model.num_classes == row.num_classes
    assert cfg.train.steps == row.steps and cfg.train.global_batch == 512 and cfg.train.loss == "softmax"
    optim, schedule = cfg.train.optim, cfg.train.schedule
    assert (optim.name, optim.momentum, optim.weight_decay, optim.grad_clip) == ("sgd", 0.9, 0.0, 1.0)
    assert optim.lr == pytest.approx(row.lr) and schedule.decay == "cosine"
    assert 0 < schedule.warmup_steps < row.steps
    assert cfg.train.ema_decay == row.ema_decay


def test_every_fine_tune_starts_from_a_shipped_pretraining_recipe() -> None:
    registered = {_load(r.path).tracking.registered_model for r in PRETRAIN}
    assert {r.source for r in TRANSFER} <= registered


def test_every_shipped_recipe_has_a_row() -> None:
    shipped = set()
    for folder in ("pretrain", "transfer"):
        for path in (CONFIGS / folder).glob("*.yaml"):  # not recursive: configs/transfer/vtab/ is owned elsewhere
            if not path.name.startswith("_"):
                shipped.add(f"{folder}/{path.name}")
    tabled = [r.path for r in PRETRAIN + TRANSFER] + SMOKE + OWNED_ELSEWHERE
    assert len(tabled) == len(set(tabled)), "a recipe has two rows"
    missing = shipped - set(tabled)
    assert not missing, f"recipes without a row here (add one with the paper's values): {sorted(missing)}"
    assert set(tabled) - set(OWNED_ELSEWHERE) <= shipped, "rows for recipes that are not shipped"


@pytest.mark.parametrize("rel", [r.path for r in PRETRAIN + TRANSFER], ids=str)
def test_recipe_carries_its_run_command_and_smoke_variant(rel: str) -> None:
    folder = rel.split("/")[0]
    header = [ln for ln in (CONFIGS / rel).read_text().splitlines() if ln.startswith("#")]
    assert any("vitpipe " in ln and f"configs/{rel}" in ln for ln in header), f"{rel}: no run command in a comment"
    smoke = [m for ln in header for m in re.findall(r"configs/\S+smoke\.yaml", ln)]
    assert smoke == [f"configs/{folder}/smoke.yaml"], f"{rel}: the header must name its smoke variant"


@pytest.mark.parametrize("rel", [r.path for r in PRETRAIN + TRANSFER] + SMOKE, ids=str)
def test_recipe_world_size_serves_its_training_plan(rel: str) -> None:
    """What `vitpipe submit` checks before anything leaves the machine: the recipe's scaling.num_workers divides its
    virtual readers and its global batch over micro-batches (pipeline.data.epochs.ReaderPlan)."""
    from pipeline.launch.checks import check_world_sizes

    check_world_sizes(_load(rel))
