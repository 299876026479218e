"""Polyak averaging (the paper's high-resolution fine-tunes, factor 0.9999): an exponential moving average of the
trainable weights, ema <- decay * ema + (1 - decay) * w after every optimizer step, in fp32.

Each rank averages the weights it holds: all of them under ZeRO 0-2 (4 bytes per parameter per rank: a ViT-B/16
adds 0.35 GB, an H/14 2.5 GB), its partition under ZeRO-3 (4/N bytes per parameter; with offload_params the
partition and its average live on the CPU). A checkpoint carries one full fp32 copy (`ema.safetensors`, written by
rank 0 from every rank's partition) that restores exactly under any world size and is what the final export
saves in place of the raw weights. Evaluation swaps the averaged weights in and back out.

Reads DeepSpeed's ZeRO-3 partition layout (`ds_tensor`: the flat parameter padded to N equal slices, slice r on
rank r) but never imports deepspeed (pipeline.train.engine is the only importer).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.eval.gather import distributed
from pipeline.train.checkpoint import EMA_FILE

__all__ = ["ParamEMA"]


def _local(p: nn.Parameter) -> torch.Tensor:
    """The tensor this rank holds of `p`: its ZeRO-3 partition (flat), else the parameter itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ParamEMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: fold the current weights into the average."""
        for n, p in self.params.items():
            self.shadow[n].lerp_(_local(p).float(), 1.0 - self.decay)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Inside, the module runs with the averaged weights (every rank enters: under ZeRO-3 each swaps its
        partition); the raw weights are back, bit for bit, on exit. No optimizer step inside."""
        stash = {n: _local(p).clone() for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                _local(p).copy_(self.shadow[n])
            yield
        finally:
            for n, p in self.params.items():
                _local(p).copy_(stash[n])

    # -- one full copy: checkpoints and the export -------------------------------------------------------------
    @torch.no_grad()
    def full_state(self, device: torch.device) -> dict[str, torch.Tensor] | None:
        """{name: full fp32 tensor} on rank 0 (None elsewhere; every rank must call): ZeRO-3 partitions gathered."""
        if not self.partitioned:
            return {n: t.cpu().clone() for n, t in self.shadow.items()} if not distributed() or dist.get_rank() == 0 \
                else None
        world, rank = dist.get_world_size(), dist.get_rank()
        flat = torch.cat([self.shadow[n].flatten() for n in self.params]).to(device)
        parts = [torch.empty_like(flat) for _ in range(world)] if rank == 0 else None
        dist.gather(flat, parts, dst=0)
        if rank != 0:
            return None
        out, offset = {}, 0
        for n, p in self.params.items():
            size = self.shadow[n].numel()
            full = torch.cat([part[offset: offset + size] for part in parts])[: p.ds_numel]
            out[n] = full.view(p.ds_shape).cpu().clone()
            offset += size
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Every rank: the average from a full copy (this rank's partition of it under ZeRO-3)."""
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} trainable parameters, e.g. {missing[:3]}")
        rank = dist.get_rank() if distributed() else 0
        for n, p in self.params.items():
            full = state[n].float()
            if not hasattr(p, "ds_tensor"):
                if full.shape != p.shape:
                    raise ValueError(f"EMA state {n}: shape {tuple(full.shape)}, the model's {tuple(p.shape)}")
                self.shadow[n] = full.to(p.device).clone()
                continue
            if tuple(full.shape) != tuple(p.ds_shape):
                raise ValueError(f"EMA state {n}: shape {tuple(full.shape)}, the model's {tuple(p.ds_shape)}")
            size = p.ds_tensor.numel()
            flat = torch.zeros(size * (dist.get_world_size() if distributed() else 1))
            flat[: full.numel()] = full.flatten()
            self.shadow[n] = flat[rank * size: (rank + 1) * size].to(p.ds_tensor.device).clone()

    def save(self, directory: str | Path, device: torch.device) -> Path | None:
        """Rank 0 writes `<directory>/ema.safetensors` (every rank must call)."""
        state = self.full_state(device)
        if state is None:
            return None
        path = Path(directory) / EMA_FILE
        save_file({n: t.contiguous() for n, t in state.items()}, str(path), metadata={"decay": str(self.decay)})
        return path

    def load(self, directory: str | Path) -> bool:
        """The average saved in a checkpoint directory; False when it holds none."""
        path = Path(directory) / EMA_FILE
        if not path.is_file():
            return False
        self.load_full_state(load_file(str(path)))
        return True
