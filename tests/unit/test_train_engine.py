"""The generated DeepSpeed config (snapshot), batch arithmetic, schedule and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model import build_model
from pipeline.train.config import ScheduleConfig
from pipeline.train.engine import deepspeed_config, gradient_accumulation
from pipeline.train.optim import decay_split, param_groups
from pipeline.train.schedule import lr_factor

SMOKE = "configs/pretrain/smoke.yaml"

# The snapshot: what configs/pretrain/smoke.yaml generates for 2 workers. A change here is a change in what
# DeepSpeed runs; update it deliberately.
SMOKE_DS_2_WORKERS = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 32,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
    },
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": False},
    "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16},
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def test_smoke_deepspeed_config_snapshot():
    assert deepspeed_config(load_config(SMOKE).train, world_size=2) == SMOKE_DS_2_WORKERS


def test_paper_recipe_deepspeed_config():
    cfg = load_config("configs/pretrain/vit-b16-i21k.yaml", ["scaling.num_workers=16"])
    ds = deepspeed_config(cfg.train, world_size=16)
    assert ds["train_batch_size"] == 4096
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_accumulation_steps"] == 4  # 4096 = 64 x 16 x 4
    assert ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["weight_decay"] == 0.03
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_and_offload(stage):
    over = [f"train.zero.stage={stage}", "train.zero.offload_optimizer=true"]
    if stage == 3:
        over.append("train.zero.offload_params=true")
    ds = deepspeed_config(load_config(SMOKE, over).train, world_size=2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in zero) == (stage == 3)
    assert ("stage3_gather_16bit_weights_on_model_save" in zero) == (stage == 3)
    # offloaded partitions are stepped by DeepSpeedCPUAdam (the cpu_adam op), not torch's AdamW on the CPU
    assert "torch_adam" not in ds["optimizer"]["params"]


def test_offload_params_needs_stage3():
    with pytest.raises(ConfigError, match="offload_params requires stage 3"):
        load_config(SMOKE, ["train.zero.stage=2", "train.zero.offload_params=true"])


def test_sgd_and_precisions():
    ds = deepspeed_config(load_config(SMOKE, ["train.optim.name=sgd", "train.optim.momentum=0.9",
                                              "train.precision=bf16"]).train, world_size=1)
    assert ds["optimizer"] == {"type": "SGD", "params": {"lr": 3e-3, "momentum": 0.9, "weight_decay": 0.1}}
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert deepspeed_config(load_config(SMOKE, ["train.precision=fp16"]).train, 1)["fp16"]["enabled"]


@pytest.mark.parametrize("workers,accum", [(1, 2), (2, 1)])
def test_global_batch_is_fixed(workers, accum):
    train = load_config(SMOKE).train  # global 64, micro 32
    assert gradient_accumulation(train, workers) == accum
    assert deepspeed_config(train, workers)["train_batch_size"] == 64


def test_indivisible_global_batch_is_a_clear_error():
    train = load_config(SMOKE).train
    with pytest.raises(ValueError, match=r"global_batch \(64\).*micro_batch \(32\) x 3 workers = 96"):
        gradient_accumulation(train, 3)


def test_schedule_warmup_then_decay():
    lin = ScheduleConfig(warmup_steps=10, decay="linear", end_lr_fraction=0.0)
    assert lr_factor(0, lin, 110) == pytest.approx(0.1)
    assert lr_factor(9, lin, 110) == pytest.approx(1.0)
    assert lr_factor(60, lin, 110) == pytest.approx(0.5)
    assert lr_factor(110, lin, 110) == pytest.approx(0.0)
    cos = ScheduleConfig(warmup_steps=0, decay="cosine", end_lr_fraction=0.1)
    assert lr_factor(0, cos, 100) == pytest.approx(1.0)
    assert lr_factor(50, cos, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cos, 100) == pytest.approx(0.1)
    factors = [lr_factor(s, cos, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # monotone decay
    const = ScheduleConfig(warmup_steps=4, decay="constant")
    assert [lr_factor(s, const, 10) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    assert math.isclose(lr_factor(5, ScheduleConfig(warmup_steps=100), 10), 0.6)  # warmup longer than the run


def test_param_groups_exclude_no_weight_decay_biases_and_norms():
    model = build_model("vit_pico4", image_size=16, num_classes=10, pre_logits=32)
    decay, no_decay = decay_split(model)
    assert "pos_embed" in no_decay and "cls_token" in no_decay
    assert all(n.endswith(".weight") for n in decay)
    assert not any("norm" in n for n in decay)
    assert "blocks.0.attn.qkv.weight" in decay and "blocks.0.attn.qkv.bias" in no_decay
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_skip_frozen():
    model = build_model("vit_pico4", image_size=16, num_classes=10)
    for n, p in model.named_parameters():
        p.requires_grad = n.startswith("head.")
    groups = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == 2  # head weight (decay) and bias (no decay)
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)
