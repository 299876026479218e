"""Analytic compute and size of a ViT: forward FLOPs per image and parameter counts, without building it.

FLOPs count the matrix products only (patch projection, q/k/v, q.k^T, attention.v, output projection, MLP,
pre-logits, head) at 2 FLOPs per multiply-add; LayerNorm, softmax, GELU and residual adds are left out, as in
timm's and the paper's accounting (ViT-B/16 at 224 px: 17.56 GMACs here vs timm's 17.58). Training costs
3x the forward pass (forward + backward for activations and weights), the paper's rule.
"""

from __future__ import annotations

from pipeline.model.config import ModelConfig, check_image_size
from pipeline.model.variants import get_variant

__all__ = ["forward_flops", "forward_macs", "training_flops", "param_count"]


def _cfg(cfg_or_name: ModelConfig | str, image_size: int | None = None) -> ModelConfig:
    if isinstance(cfg_or_name, str):
        cfg = ModelConfig(name=cfg_or_name)
    else:
        cfg = cfg_or_name
    if image_size is not None:
        cfg = cfg.model_copy(update={"image_size": image_size})
    check_image_size(cfg.image_size, cfg.name, "image size")  # model_copy skips the config's own check
    return cfg


def forward_macs(cfg_or_name: ModelConfig | str, image_size: int | None = None) -> int:
    """Multiply-adds of one forward pass for one image (a variant name means a 1000-class token model)."""
    cfg = _cfg(cfg_or_name, image_size)
    v = get_variant(cfg.name)
    d, m = v.width, v.mlp_dim
    patches = (cfg.image_size // v.patch_size) ** 2
    n = patches + (1 if cfg.classifier == "token" else 0)
    embed = patches * d * cfg.in_chans * v.patch_size**2
    block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * m
    feats = cfg.pre_logits or d
    head = (d * cfg.pre_logits if cfg.pre_logits else 0) + feats * cfg.num_classes
    return embed + v.depth * block + head


def forward_flops(cfg_or_name: ModelConfig | str, image_size: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of one forward pass for one image."""
    return 2 * forward_macs(cfg_or_name, image_size)


def training_flops(cfg_or_name: ModelConfig | str, images: int, image_size: int | None = None) -> int:
    """FLOPs to train on `images` images (examples seen, i.e. dataset size x epochs): 3x forward each."""
    return 3 * forward_flops(cfg_or_name, image_size) * int(images)


def param_count(cfg_or_name: ModelConfig | str, image_size: int | None = None) -> int:
    """Number of parameters `build_model(cfg)` has (a variant name means a 1000-class token model at 224)."""
    cfg = _cfg(cfg_or_name, image_size)
    v = get_variant(cfg.name)
    d, m, p = v.width, v.mlp_dim, v.patch_size
    prefix = 1 if cfg.classifier == "token" else 0
    patches = (cfg.image_size // p) ** 2
    embed = cfg.in_chans * p * p * d + d + prefix * d + (prefix + patches) * d
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    pre = d * cfg.pre_logits + cfg.pre_logits if cfg.pre_logits else 0
    feats = cfg.pre_logits or d
    head = feats * cfg.num_classes + cfg.num_classes
    return embed + v.depth * block + 2 * d + pre + head
