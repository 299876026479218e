"""Collectives of the evaluations: the rows every rank computed over its share of a split, gathered on every rank
(tensors only: nothing is pickled between ranks). The identity when not distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["distributed", "gather_rows"]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Every rank's `t` ([n_rank, ...], n may differ per rank) concatenated in rank order, on every rank (returned
    on the CPU). Rows travel on `device` (the backend's: NCCL needs CUDA tensors)."""
    if not distributed():
        return t.cpu()
    world = dist.get_world_size()
    x = t.to(device).contiguous()
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[dist.get_rank()] = len(x)
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes.tolist())]).cpu()
