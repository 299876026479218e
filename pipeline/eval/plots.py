"""PNG figures for the MLflow UI: attention rollout (paper Fig. 6), position-embedding similarity (Fig. 7) and the
confusion matrix. The math is in small pure torch functions; the plotting uses matplotlib's Agg backend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

__all__ = [
    "attention_rollout",
    "pos_embed_similarity",
    "confusion_matrix",
    "plot_attention_rollout",
    "plot_pos_embed_similarity",
    "plot_confusion_matrix",
]


def attention_rollout(maps: Sequence[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020), as in the paper's Fig. 6: per layer the heads are averaged, the
    identity added for the residual path and rows renormalised; the layers' matrices are multiplied. Returns
    [B, N_patches], how much each patch flows into the [class] token (the mean over tokens for GAP models)."""
    if not maps:
        raise ValueError("attention_rollout needs at least one layer's attention maps")
    rollout = None
    for a in maps:
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention maps must be [B, heads, N, N], got {list(a.shape)}")
        a = a.float().mean(dim=1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if num_prefix_tokens:
        flow = rollout[:, 0, num_prefix_tokens:]
    else:
        flow = rollout.mean(dim=1)
    return flow / flow.amax(dim=-1, keepdim=True).clamp_min(1e-12)


def pos_embed_similarity(pos_embed: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Cosine similarity between the position embedding of every patch and every other (paper Fig. 7):
    [gh, gw, gh, gw] from a [1, prefix + gh*gw, D] embedding with a square grid."""
    pe = pos_embed.detach().float().reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:]
    side = math.isqrt(pe.shape[0])
    if side * side != pe.shape[0]:
        raise ValueError(f"position embedding has {pe.shape[0]} patch rows, not a square grid")
    pe = torch.nn.functional.normalize(pe, dim=-1)
    return (pe @ pe.T).reshape(side, side, side, side)


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [true, predicted] as int64."""
    labels, preds = labels.long().flatten(), preds.long().flatten()
    idx = labels * num_classes + preds
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _as_display(img: torch.Tensor) -> torch.Tensor:
    """A normalised [C, H, W] image -> [H, W, C] (or [H, W]) in [0, 1], whatever normalisation it had."""
    img = img.detach().float().cpu()
    img = (img - img.amin()) / (img.amax() - img.amin()).clamp_min(1e-12)
    return img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)


@torch.no_grad()
def plot_attention_rollout(
    model: torch.nn.Module, images: torch.Tensor, path: str | Path, titles: Sequence[str] | None = None
) -> Path:
    """Each image beside its attention-rollout map (upsampled to the image) for a ViT with `attention_maps`."""
    plt = _pyplot()
    was_training = model.training
    model.eval()
    try:
        maps = model.attention_maps(images)
    finally:
        model.train(was_training)
    prefix = getattr(model, "num_prefix_tokens", 1)
    flow = attention_rollout(maps, prefix)
    side = math.isqrt(flow.shape[-1])
    heat = torch.nn.functional.interpolate(
        flow.reshape(-1, 1, side, side), size=images.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
        shown = _as_display(images[i])
        axes[0][i].imshow(shown.numpy(), cmap="gray" if shown.ndim == 2 else None)
        axes[0][i].set_title(titles[i] if titles else f"#{i}", fontsize=8)
        axes[1][i].imshow(shown.numpy(), cmap="gray" if shown.ndim == 2 else None)
        axes[1][i].imshow(heat[i].cpu().numpy(), cmap="inferno", alpha=0.6)
        for ax in (axes[0][i], axes[1][i]):
            ax.axis("off")
    fig.suptitle("attention rollout (input / attention)", fontsize=9)
    return _save(fig, path)


def plot_pos_embed_similarity(pos_embed: torch.Tensor, path: str | Path, num_prefix_tokens: int = 1) -> Path:
    """The grid of per-patch cosine-similarity maps (tile (i, j) = patch (i, j) against all patches), drawn as one
    mosaic image: one imshow whatever the grid (24 x 24 tiles at 384 px / patch 16)."""
    plt = _pyplot()
    sim = pos_embed_similarity(pos_embed, num_prefix_tokens)
    side = sim.shape[0]
    cell = side + 1  # one pixel of padding between tiles
    mosaic = torch.full((side * cell - 1, side * cell - 1), float("nan"))
    for i in range(side):
        for j in range(side):
            mosaic[i * cell:i * cell + side, j * cell:j * cell + side] = sim[i, j]
    fig, ax = plt.subplots(figsize=(6, 6))
    im = ax.imshow(mosaic.numpy(), vmin=-1, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_xticks([cell * j + side / 2 - 0.5 for j in range(side)], [str(j + 1) for j in range(side)], fontsize=6)
    ax.set_yticks([cell * i + side / 2 - 0.5 for i in range(side)], [str(i + 1) for i in range(side)], fontsize=6)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    ax.set_title("position embedding similarity", fontsize=9)
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: torch.Tensor, path: str | Path, class_names: Sequence[str] | None = None, max_labels: int = 30
) -> Path:
    """The row-normalised confusion matrix; class names on the axes when there are few enough to read."""
    plt = _pyplot()
    m = matrix.double()
    norm = (m / m.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    k = m.shape[0]
    size = min(4 + 0.3 * k, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if k <= max_labels:
        names = list(class_names) if class_names and len(class_names) == k else [str(i) for i in range(k)]
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
    acc = float(m.diag().sum() / m.sum().clamp_min(1))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (top-1 {acc:.3f})", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path
