"""Our model checkpoint format: `model.safetensors` (weights) + `model.json` (the ModelConfig and caller extras),
so a checkpoint rebuilds its own model. Loading never unpickles. `model.json` is written last (atomically), so a
directory without it is an incomplete checkpoint and is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.format import CONFIG_FILE, FORMAT, WEIGHTS_FILE
from pipeline.model.vit import VisionTransformer
from pipeline.model.weights import check_state_dict, load_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "WEIGHTS_FILE", "CONFIG_FILE", "FORMAT"]


def save_checkpoint(
    directory: str | Path, model_or_state_dict: nn.Module | dict[str, torch.Tensor], cfg: ModelConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes `directory/model.safetensors` and then `directory/model.json`; returns the directory.
    `cfg` defaults to the model's own `.cfg`; `extra` must be JSON-serialisable (e.g. class names, source)."""

    if isinstance(model_or_state_dict, nn.Module):
        cfg = cfg or getattr(model_or_state_dict, "cfg", None)
        sd = model_or_state_dict.state_dict()
    else:
        sd = model_or_state_dict
    if cfg is None:
        raise ValueError("save_checkpoint needs the ModelConfig (pass cfg=) to write a self-describing checkpoint")
    check_state_dict(sd, cfg)
    try:
        meta = json.dumps({"format": FORMAT, "model": cfg.model_dump(mode="json"), "extra": extra or {}}, indent=2)
    except TypeError as e:
        raise ValueError(f"checkpoint extra must be JSON-serialisable: {e}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).unlink(missing_ok=True)  # uncommitted while the weights change
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in sd.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(meta)
    os.replace(tmp, directory / CONFIG_FILE)
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """(state_dict, ModelConfig, extra) from a directory written by `save_checkpoint`; every key and shape is
    checked against the config."""
    directory = Path(directory)
    meta_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"model checkpoint directory not found: {directory}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete model checkpoint: {CONFIG_FILE} is missing")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete model checkpoint: {WEIGHTS_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    cfg = ModelConfig.model_validate(meta["model"])
    sd = load_safetensors(weights_path)
    check_state_dict(sd, cfg)
    return sd, cfg, meta.get("extra") or {}


def load_model(directory: str | Path, **overrides) -> nn.Module:
    """The VisionTransformer a checkpoint describes, with its weights. `overrides` are ModelConfig fields that do
    not change parameter shapes (drop rates, act_checkpoint)."""
    sd, cfg, _ = load_checkpoint(directory)
    if overrides:
        cfg = ModelConfig.model_validate({**cfg.model_dump(), **overrides})
    model = VisionTransformer(cfg)
    model.load_state_dict(sd)
    return model
