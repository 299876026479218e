"""Position-embedding resampling: fine-tuning at a new resolution keeps the patch size, so the grid of learned
position embeddings is 2-D interpolated to the new grid (paper, Sec. 3.2); prefix ([class]) rows are kept."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["resample_pos_embed"]


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """[1, prefix + h*w, D] -> [1, prefix + H*W, D] for `new_grid=(H, W)`. `old_grid` defaults to the square grid
    the row count implies. Interpolates in float32 and returns the input dtype; a new tensor, never a view."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, tokens, dim], got {list(pos_embed.shape)}")
    if num_prefix_tokens < 0 or num_prefix_tokens > pos_embed.shape[1]:
        raise ValueError(f"num_prefix_tokens {num_prefix_tokens} invalid for {pos_embed.shape[1]} position rows")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{n} patch position rows (after {num_prefix_tokens} prefix rows) are not a square grid; "
                "pass old_grid=(h, w)"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not match {n} patch position rows")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if min(new_grid) <= 0:
        raise ValueError(f"new_grid must be positive, got {new_grid}")
    if tuple(old_grid) == new_grid:
        return pos_embed.clone()
    dim = pos_embed.shape[-1]
    img = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=new_grid, mode=mode, align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
