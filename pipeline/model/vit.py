"""The Vision Transformer of Dosovitskiy et al. (2021) as single-device PyTorch code.

Patch embedding (a strided conv = linear projection of flattened patches) -> [class] token -> learnable 1-D
position embeddings -> pre-norm Transformer encoder -> final LayerNorm -> [class] token or global average pool
-> optional tanh pre-logits layer -> linear head. Parameter names follow timm's `VisionTransformer`, so timm
state dicts map one to one (see `pipeline.model.weights`).

`classifier="gap"` follows the original JAX code: no [class] token at all, the encoder output (after the final
LayerNorm) is averaged over the patch tokens. That is timm's `class_token=False, global_pool="avg",
fc_norm=False`; its position embedding then has N rows instead of 1+N.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.config import ModelConfig, check_image_size
from pipeline.model.variants import Variant, get_variant

__all__ = ["VisionTransformer", "build_model", "Attention", "Block", "Mlp"]


def _lecun_normal_(w: torch.Tensor) -> torch.Tensor:
    """JAX's lecun_normal: a standard normal truncated to [-2, 2], scaled to variance 1 / fan_in (the constant
    undoes the variance the truncation removes). torch's trunc_normal_ cuts at absolute values, hence the mul."""
    fan_in = w[0].numel()
    nn.init.trunc_normal_(w, mean=0.0, std=1.0, a=-2.0, b=2.0)
    return w.mul_(math.sqrt(1.0 / fan_in) / 0.87962566103423978)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each [B, heads, N, head_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) computed explicitly: [B, heads, N, N] (for attention rollout)."""
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (the paper's MLP block)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x)), each branch under stochastic depth."""

    def __init__(self, v: Variant, drop: float, attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(v.width, eps=1e-6)
        self.attn = Attention(v.width, v.heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(v.width, eps=1e-6)
        self.mlp = Mlp(v.width, v.mlp_dim, drop=drop)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PreLogits(nn.Module):
    """The tanh hidden layer of the pretraining head."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT built from a `ModelConfig` (variant name + task). See the module docstring for the architecture."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v = get_variant(cfg.name)
        check_image_size(cfg.image_size, cfg.name)  # a model_copy'd config skipped its own check
        self.cfg = cfg
        self.variant = v
        self.grid = (cfg.image_size // v.patch_size,) * 2
        self.num_prefix_tokens = 1 if cfg.classifier == "token" else 0
        num_patches = self.grid[0] * self.grid[1]

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, v.width, kernel_size=v.patch_size, stride=v.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, v.width)) if self.num_prefix_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_patches, v.width))
        self.pos_drop = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else nn.Identity()
        rates = [cfg.drop_path_rate * i / max(v.depth - 1, 1) for i in range(v.depth)]
        self.blocks = nn.ModuleList(Block(v, cfg.drop_rate, cfg.attn_drop_rate, r) for r in rates)
        self.norm = nn.LayerNorm(v.width, eps=1e-6)
        self.pre_logits = PreLogits(v.width, cfg.pre_logits) if cfg.pre_logits else None
        self.num_features = cfg.pre_logits or v.width
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else None
        self.act_checkpoint = cfg.act_checkpoint
        self.init_weights()

    # -- initialisation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official JAX initialisation (as big_vision / timm's 'jax' mode): LeCun-normal patch embedding,
        Xavier-uniform projections (q, k and v each as its own D x D matrix, as the separate JAX kernels are),
        tiny-normal MLP biases, N(0, 0.02) position embeddings, zero [class] token, zero head (bias optionally
        a constant such as -10 for sigmoid losses)."""
        _lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        for blk in self.blocks:
            for part in blk.attn.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(part)
            nn.init.zeros_(blk.attn.qkv.bias)
            nn.init.xavier_uniform_(blk.attn.proj.weight)
            nn.init.zeros_(blk.attn.proj.bias)
            for fc in (blk.mlp.fc1, blk.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
        if self.pre_logits is not None:
            _lecun_normal_(self.pre_logits.fc.weight)
            nn.init.zeros_(self.pre_logits.fc.bias)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, self.cfg.head_bias_init)

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay: position embedding, [class] token, every bias and LayerNorm."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}

    # -- forward ----------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans or tuple(x.shape[2:]) != (self.cfg.image_size,) * 2:
            raise ValueError(
                f"{self.cfg.name} expects images [B, {self.cfg.in_chans}, {self.cfg.image_size}, "
                f"{self.cfg.image_size}], got {list(x.shape)}; resample the position embedding for other sizes"
            )
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.act_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.pre_logits(x) if self.pre_logits is not None else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the representation before the head, [B, num_features] (pre-logits output if any)."""
        return self._pool(self._run_blocks(self._embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.head(x) if self.head is not None else x

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per block, the attention probabilities [B, heads, N, N] (N counts the [class] token), computed with an
        explicit softmax; input to attention rollout (paper Fig. 6)."""
        maps = []
        x = self._embed(x)
        for blk in self.blocks:
            maps.append(blk.attn.attention_probs(blk.norm1(x)))
            x = blk(x)
        return maps

    # -- heads --------------------------------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int, keep_pre_logits: bool = False) -> None:
        """Replace the head with a fresh zero-initialised one of `num_classes` outputs (0 = none), dropping the
        pre-logits layer unless asked to keep it (fine-tuning uses a single linear layer). Updates `.cfg`."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.pos_embed
        if not keep_pre_logits:
            self.pre_logits = None
        self.num_features = self.pre_logits.fc.out_features if self.pre_logits is not None else self.variant.width
        self.head = None
        if num_classes:
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.cfg = self.cfg.model_copy(update={
            "num_classes": num_classes,
            "pre_logits": self.cfg.pre_logits if keep_pre_logits else None,
            "head_bias_init": 0.0,
        })


def build_model(cfg: ModelConfig | str, **overrides) -> VisionTransformer:
    """A `VisionTransformer` from a ModelConfig (or a variant name plus ModelConfig fields)."""
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg, **overrides)
    elif overrides:
        cfg = ModelConfig.model_validate({**cfg.model_dump(), **overrides})
    return VisionTransformer(cfg)
