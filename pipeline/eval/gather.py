"""Collectives of the evaluations: the rows every rank computed over its share of a split, gathered on every rank
(tensors only: nothing is pickled between ranks). The identity when not distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["distributed", "gather_rows", "gather_column_shard"]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Every rank's `t` ([n_rank, ...], n may differ per rank) concatenated in rank order, on every rank (returned
    on the CPU). Rows travel on `device` (the backend's: NCCL needs CUDA tensors)."""
    if not distributed():
        return t.cpu()
    x = t.to(device).contiguous()
    sizes = _row_counts(len(x), device)
    padded = _padded(x, max(sizes))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu()


def _row_counts(n: int, device: torch.device | str) -> list[int]:
    """Every rank's row count (`n` here), in rank order."""
    sizes = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    sizes[dist.get_rank()] = n
    dist.all_reduce(sizes)
    return [int(v) for v in sizes.tolist()]


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with zero rows appended up to `rows`: collectives move tensors of one shape."""
    out = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[: len(x)] = x
    return out


def gather_column_shard(t: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns): every rank's rows of `t` [n_rank, K, ...] restricted to this rank's share of the columns
    (columns rank, rank + world, ...), rows in rank order, and the indices of those columns. What a per-class
    metric needs (every sample of a class in one place) at the cost of one copy of `t` over the network, where
    gathering all of `t` on every rank would hold world x `t` per rank (JFT: 18k classes)."""
    if not distributed():
        return t.cpu(), torch.arange(t.shape[1])
    world, rank = dist.get_world_size(), dist.get_rank()
    x = t.to(device).contiguous()
    sizes = _row_counts(len(x), device)
    mine = None
    for dst in range(world):
        padded = _padded(x[:, dst::world], max(sizes))
        parts = [torch.empty_like(padded) for _ in sizes] if rank == dst else None
        dist.gather(padded, parts, dst=dst)
        if rank == dst:
            mine = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return mine.cpu(), torch.arange(rank, t.shape[1], world)
