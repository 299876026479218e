"""The deterministic per-epoch plan of which samples each (rank, DataLoader worker) slot reads.

An epoch orders the shards by a permutation drawn from (seed, epoch) and lays their samples end to end. The
S = world_size x num_workers slots each take a contiguous run of Q = batches_per_slot x batch_size samples starting
at floor(s x N / S): disjoint, spread over the whole epoch, and independent of how samples fall into shards — so
fewer shards than slots simply means several slots read different parts of the same shard. With drop_last the few
samples that do not fill a batch on every slot are left out (a different few each epoch); without it the runs wrap
around and pad with repeats, and `own_samples` says how much of each run is the slot's own (evaluation masks the
rest, so every sample counts exactly once). Only this rank's slots are ever computed: O(shards) numpy, no per-sample state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EpochPlan", "Segment"]

Segment = tuple[int, int, int]  # (shard index, samples to skip in it, samples to take)


@dataclass(frozen=True)
class EpochPlan:
    samples_per_shard: np.ndarray
    world_size: int
    num_workers: int  # DataLoader workers per rank (0 counts as 1: the main process is the one worker)
    batch_size: int
    drop_last: bool = True

    def __post_init__(self) -> None:
        counts = np.asarray(self.samples_per_shard, dtype=np.int64)
        object.__setattr__(self, "samples_per_shard", counts)
        if counts.ndim != 1 or len(counts) == 0 or (counts < 0).any():
            raise ValueError("samples_per_shard must be a non-empty list of non-negative counts")
        if self.world_size < 1 or self.num_workers < 0 or self.batch_size < 1:
            raise ValueError(f"need world_size >= 1, num_workers >= 0, batch_size >= 1; got {self.world_size}, "
                             f"{self.num_workers}, {self.batch_size}")
        if self.batches_per_slot < 1:
            raise ValueError(
                f"{self.num_samples} samples cannot fill one batch of {self.batch_size} on each of {self.num_slots} "
                f"readers ({self.world_size} ranks x {self.workers} workers): use a smaller batch, fewer workers, "
                "or drop_last=False")

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers

    @property
    def num_samples(self) -> int:
        return int(self.samples_per_shard.sum())

    @property
    def batches_per_slot(self) -> int:
        per_slot = self.num_samples / (self.num_slots * self.batch_size)
        return int(per_slot) if self.drop_last else math.ceil(per_slot)

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_slot * self.workers

    @property
    def samples_per_slot(self) -> int:
        return self.batches_per_slot * self.batch_size

    def shard_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(self.samples_per_shard))

    def slot(self, rank: int, worker: int) -> int:
        if not (0 <= rank < self.world_size and 0 <= worker < self.workers):
            raise ValueError(f"rank {rank} / worker {worker} outside {self.world_size} ranks x {self.workers} workers")
        return rank * self.workers + worker

    def own_samples(self, rank: int, worker: int) -> int:
        """How many of the slot's samples (the first ones of its run, in read order) are its own: without
        drop_last the runs overlap and wrap around, and the rest of each run repeats samples another slot owns.
        Summed over all slots this is exactly the epoch's sample count; with drop_last, the whole run."""
        slot = self.slot(rank, worker)
        if self.drop_last:
            return self.samples_per_slot
        n, s = self.num_samples, self.num_slots
        return (slot + 1) * n // s - slot * n // s

    def segments(self, seed: int, epoch: int, rank: int, worker: int) -> list[Segment]:
        """The shard segments slot (rank, worker) reads this epoch, in order."""
        slot = self.slot(rank, worker)
        order = self.shard_order(seed, epoch)
        counts = self.samples_per_shard[order]
        ends = np.cumsum(counts)
        n = int(ends[-1])
        start = slot * n // self.num_slots
        need = self.samples_per_slot
        out: list[Segment] = []
        pos = start % n
        while need > 0:
            j = int(np.searchsorted(ends, pos, side="right"))
            begin = int(ends[j] - counts[j])
            take = min(int(ends[j]) - pos, need)
            out.append((int(order[j]), pos - begin, take))
            need -= take
            pos = (pos + take) % n
        return out
