"""Transfer configs: every shipped recipe validates, the paper's recipe values, the checks made before workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.transfer.config import TransferModelConfig, TransferRunConfig
from pipeline.transfer.runner import finetune_model_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "configs" / "transfer").glob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_transfer_recipe_validates(path):
    cfg = load_config(path, (), TransferRunConfig)
    assert cfg.transfer.source and cfg.data.val
    assert "vitpipe transfer configs/transfer/" in path.read_text().split("\nbase:")[0]  # run command in a comment


def test_the_commands_config_loader_picks_the_transfer_class():
    from pipeline.config import config_class

    assert config_class([str(RECIPES[0])]) is TransferRunConfig


@pytest.mark.parametrize(
    "name, steps, lr", [("imagenet", 20000, 0.03), ("cifar10", 10000, 0.03), ("cifar100", 10000, 0.03),
                        ("pets", 500, 0.03), ("flowers", 500, 0.03), ("vtab", 2500, 0.01)]
)
def test_paper_finetuning_recipe(name, steps, lr):
    cfg = load_config(ROOT / "configs" / "transfer" / f"{name}.yaml", (), TransferRunConfig)
    t = cfg.train
    assert (t.steps, t.optim.lr) == (steps, lr)
    assert (t.optim.name, t.optim.momentum, t.optim.weight_decay, t.optim.grad_clip) == ("sgd", 0.9, 0.0, 1.0)
    assert (t.global_batch, t.schedule.decay, cfg.model.image_size) == (512, "cosine", 384)
    assert t.schedule.warmup_steps < steps
    assert cfg.transfer.mode == "finetune" and not cfg.transfer.keep_pre_logits


def _smoke(*overrides):
    return load_config(ROOT / "configs/transfer/smoke.yaml", list(overrides), TransferRunConfig)


def test_bad_transfer_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"transfer.source.*models:/NAME/VERSION"):
        _smoke("transfer.source=vit-b16@latest")
    with pytest.raises(ConfigError, match=r"transfer.mode"):
        _smoke("transfer.mode=distill")
    with pytest.raises(ConfigError, match=r"model.num_classes"):
        _smoke("model.num_classes=1")
    with pytest.raises(ConfigError, match=r"data.val .*required"):
        _smoke("data.val=null")
    with pytest.raises(ConfigError, match=r"model.name.*unknown key"):  # the architecture comes from the source
        _smoke("model.name=vit_b16")


def test_finetune_model_config_keeps_the_architecture_and_drops_pre_logits():
    source = ModelConfig(name="vit_b16", image_size=224, num_classes=21843, pre_logits=768, head_bias_init=-10.0)
    task = TransferModelConfig(image_size=384, num_classes=37, drop_path_rate=0.1)
    cfg = finetune_model_config(source, task)
    assert (cfg.name, cfg.image_size, cfg.num_classes, cfg.pre_logits) == ("vit_b16", 384, 37, None)
    assert cfg.head_bias_init == 0.0 and cfg.drop_path_rate == 0.1 and cfg.classifier == source.classifier
    assert finetune_model_config(source, task, keep_pre_logits=True).pre_logits == 768


def test_resolution_that_does_not_fit_the_patch_size_is_refused_with_a_fix():
    source = ModelConfig(name="vit_b16", image_size=224)
    with pytest.raises(ConfigError, match=r"image_size 390 is not a multiple of .*patch size 16.*384 or 400"):
        finetune_model_config(source, TransferModelConfig(image_size=390, num_classes=10))
