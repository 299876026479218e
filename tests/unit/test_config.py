"""Typed configuration: YAML bases, dotted overrides, errors that name file/field/value, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import RunConfig, apply_overrides, config_class, config_hash, load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not p.name.startswith("_"))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = """
data: {train: "s3://b/x-{000000..000009}.tar|1000"}
train: {steps: 10, global_batch: 64, micro_batch: 32}
"""


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path, model_cls=config_class([str(path)]))
    assert cfg.train.steps > 0


def test_paper_recipes_carry_the_paper_hyperparameters() -> None:
    b16 = load_config(REPO / "configs/pretrain/vit-b16-i21k.yaml")
    assert (b16.model.name, b16.model.image_size, b16.train.global_batch) == ("vit_b16", 224, 4096)
    assert b16.train.optim.betas == (0.9, 0.999) and b16.train.optim.grad_clip == 1.0
    assert b16.train.schedule.warmup_steps == 10_000
    assert b16.train.optim.weight_decay == 0.03 and b16.model.drop_rate == 0.1
    jft = load_config(REPO / "configs/pretrain/vit-h14-jft.yaml")
    assert jft.model.name == "vit_h14" and jft.train.optim.weight_decay == 0.1 and jft.model.drop_rate == 0.0
    assert jft.train.loss == "sigmoid" and jft.model.head_bias_init == -10.0


def test_base_inheritance_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path, "base.yaml", MINIMAL + "model: {name: vit_s16, num_classes: 10}\n")
    child = _write(tmp_path, "child.yaml", "base: base.yaml\nmodel: {num_classes: 100}\ntrain: {steps: 5}\n")
    cfg = load_config(child, ["train.optim.lr=3e-4", "model.name=vit_b16"])
    assert cfg.model.name == "vit_b16" and cfg.model.num_classes == 100  # child overrides base, keeps siblings
    assert cfg.train.steps == 5 and cfg.train.global_batch == 64
    assert cfg.train.optim.lr == pytest.approx(3e-4)
    # `null` is YAML's None; for tracking.sink it names the null sink
    assert load_config(child, ["tracking.sink=null"]).tracking.sink == "null"


def test_error_names_file_field_value_and_allowed(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", MINIMAL + "train: {steps: 10, global_batch: 64, micro_batch: 32, precision: fp8}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.precision" in msg and "'fp8'" in msg and "bf16" in msg


def test_unknown_key_is_an_error_naming_the_source(tmp_path: Path) -> None:
    path = _write(tmp_path, "cfg.yaml", MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.optim.learning_rate=1"])
    assert "--set: train.optim.learning_rate: unknown key" in str(err.value)


def test_unknown_variant_lists_known_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, "cfg.yaml", MINIMAL + "model: {name: vit_x99}\n")
    with pytest.raises(ConfigError, match=r"model\.name.*unknown ViT variant 'vit_x99'.*vit_b16"):
        load_config(path)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.global_batch=-4", "train.global_batch"),
        ("train.micro_batch=48", "must be a multiple of micro_batch"),
        ("train.zero.offload_params=true", "offload_params requires stage 3"),
        ("data.augment.scale=[0.9, 0.1]", "scale must satisfy"),
        ("train.steps", "expected dotted.key=value"),
        ("train.steps.x=1", "is a value, not a section"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(tmp_path: Path, override: str, needle: str) -> None:
    path = _write(tmp_path, "cfg.yaml", MINIMAL)
    with pytest.raises(ConfigError, match=needle):
        load_config(path, [override])


def test_missing_file_and_cycles(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_required_sections_are_reported_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data: required field is missing"):
        load_config(_write(tmp_path, "cfg.yaml", "train: {steps: 1}\n"))


def test_config_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    path = _write(tmp_path, "cfg.yaml", MINIMAL)
    a, b = load_config(path), load_config(path)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(path, ["train.steps=11"]))


def test_overrides_do_not_mutate_input() -> None:
    tree = {"train": {"steps": 1}}
    out = apply_overrides(tree, ["train.steps=2"])
    assert tree["train"]["steps"] == 1 and out["train"]["steps"] == 2
    assert isinstance(RunConfig.model_json_schema(), dict)


def test_config_reference_is_current() -> None:
    from pipeline.reference import config_reference

    committed = (REPO / "docs" / "CONFIG.md").read_text()
    assert committed == config_reference(), "docs/CONFIG.md is stale: run `vitpipe config reference > docs/CONFIG.md`"
    assert "`train.zero.stage`" in committed and "`transfer.mode`" in committed
