"""Typed configuration of the ViT model (owned by pipeline.model)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.model.variants import VARIANTS, get_variant

__all__ = ["ModelConfig", "check_image_size"]


class ModelConfig(BaseModel):
    """Which ViT to build. The architecture comes from the named variant; the rest is the task around it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("vit_b16", description="variant name from the registry (`vitpipe model list`)")
    image_size: int = Field(224, gt=0, description="input resolution in pixels (square)")
    in_chans: int = Field(3, gt=0)
    num_classes: int = Field(1000, ge=0, description="head size; 0 = no head (features only)")
    classifier: Literal["token", "gap"] = "token"
    pre_logits: int | None = Field(
        None, gt=0, description="width of the tanh pre-logits layer used in pretraining; null = none"
    )
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after embeddings and in MLPs")
    attn_drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth, linearly increasing")
    head_bias_init: float = Field(0.0, description="e.g. -10 for sigmoid losses (big_vision)")
    act_checkpoint: bool = Field(False, description="activation checkpointing per block")

    @field_validator("name")
    @classmethod
    def _known_variant(cls, name: str) -> str:
        if name not in VARIANTS:
            raise ValueError(f"unknown ViT variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
        return name

    @model_validator(mode="after")
    def _image_fits_patches(self) -> "ModelConfig":
        # Checked here, not only when the model is built: a pretraining run builds it inside its workers.
        check_image_size(self.image_size, self.name)
        return self


def check_image_size(image_size: int, variant: str, what: str = "model.image_size", whose: str = "") -> None:
    """The one check that an input resolution fits a variant's patch size: a ValueError naming `what`, the
    variant (`whose` says whose it is, e.g. "the source model"), its patch size and the nearest sizes that fit."""
    patch = get_variant(variant).patch_size
    if image_size % patch:
        fits = sorted({image_size // patch * patch, (image_size // patch + 1) * patch} - {0})
        owner = f"{whose} {variant}" if whose else variant
        raise ValueError(f"{what} {image_size} is not a multiple of {owner}'s patch size {patch}; "
                         f"use e.g. {' or '.join(map(str, fits))}")
