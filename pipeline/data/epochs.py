"""The deterministic per-epoch sample plans: which samples each reader takes, computed per rank in O(shards) numpy.

Both plans order an epoch's shards by a permutation drawn from (seed, epoch) and lay their samples end to end: the
epoch's sequence of N samples. They differ in how the sequence is cut.

`ReaderPlan` (training) cuts it into a fixed number V of *virtual readers*, independent of the cluster. Step k of
an epoch takes c_v = floor(G(v+1)/V) - floor(Gv/V) samples from reader v (the c_v sum to the global batch G), so
every step's global batch is a function of (seed, step) alone: the same samples whatever the world size, micro
batch and DataLoader workers. An epoch has S = floor(N/G) steps; reader v's run is S·c_v consecutive samples of the
sequence starting at S·floor(Gv/V) + floor(Lv/V), where L = N - S·G samples are left out (a different few each
epoch, spread between the runs). A world of W ranks serves the plan when W divides V and W·micro_batch divides G:
rank r reads readers rV/W ... (r+1)V/W - 1, whose c_v sum to exactly G/W (W divides G), i.e. G/(W·micro_batch)
micro-batches per step. A reader's shuffle buffer and augmentation are seeded by (seed, epoch, reader, position),
never by rank or DataLoader worker (pipeline.data.loader), so a checkpoint continues exactly on another world size.

`EpochPlan` (evaluation) cuts it into the S = world_size x num_workers (rank, DataLoader worker) slots: slot s takes
a contiguous run of Q = batches_per_slot x batch_size samples starting at floor(s x N / S): disjoint, spread over the
whole epoch. With drop_last the few samples that do not fill a batch on every slot are left out; without it the
runs wrap around and pad with repeats, and `own_samples` says how much of each run is the slot's own (evaluation
masks the rest, so every sample counts exactly once at any world size).

Fewer shards than readers simply means several readers read different parts of the same shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EpochPlan", "ReaderPlan", "Segment", "shard_order", "servable_world_sizes", "check_world_size"]

Segment = tuple[int, int, int]  # (shard index, samples to skip in it, samples to take)


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the shards."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)


def _cut(order: np.ndarray, counts: np.ndarray, ends: np.ndarray, start: int, need: int) -> list[Segment]:
    """The shard segments of `need` consecutive samples of the epoch's sequence from `start` (wrapping around)."""
    n = int(ends[-1])
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


def _counts(samples_per_shard) -> np.ndarray:
    counts = np.asarray(samples_per_shard, dtype=np.int64)
    if counts.ndim != 1 or len(counts) == 0 or (counts < 0).any():
        raise ValueError("samples_per_shard must be a non-empty list of non-negative counts")
    return counts


def servable_world_sizes(readers: int, global_batch: int, micro_batch: int) -> list[int]:
    """Every world size W that serves a reader plan: W divides `readers` and W x micro_batch divides global_batch."""
    return [w for w in range(1, readers + 1) if readers % w == 0 and global_batch % (micro_batch * w) == 0]


def check_world_size(world_size: int, readers: int, global_batch: int, micro_batch: int) -> None:
    """Refuses a world size the plan cannot serve, naming the fields and listing the sizes that work."""
    problems = []
    if readers % world_size:
        problems.append(f"data.virtual_readers ({readers}) is not a multiple of {world_size}")
    if global_batch % (micro_batch * world_size):
        problems.append(f"train.global_batch ({global_batch}) is not a multiple of train.micro_batch "
                        f"({micro_batch}) x {world_size} = {micro_batch * world_size}")
    if problems:
        works = servable_world_sizes(readers, global_batch, micro_batch)
        raise ValueError(f"{world_size} workers cannot serve the training plan: {'; '.join(problems)}. World sizes "
                         f"that work: {', '.join(map(str, works)) or 'none'} (or change data.virtual_readers, "
                         "train.global_batch or train.micro_batch)")


@dataclass(frozen=True)
class ReaderPlan:
    """The training plan: V virtual readers, G samples per step (see the module docstring)."""

    samples_per_shard: np.ndarray
    readers: int
    global_batch: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples_per_shard", _counts(self.samples_per_shard))
        if self.readers < 1 or self.global_batch < 1:
            raise ValueError(f"need readers >= 1 and global_batch >= 1, got {self.readers}, {self.global_batch}")
        if self.readers > self.global_batch:
            raise ValueError(f"data.virtual_readers ({self.readers}) exceeds train.global_batch "
                             f"({self.global_batch}): every reader must give at least one sample per step; "
                             "lower data.virtual_readers")
        if self.steps_per_epoch < 1:
            raise ValueError(f"the dataset's {self.num_samples} samples cannot fill one global batch of "
                             f"{self.global_batch} (train.global_batch): use a larger dataset or a smaller batch")

    @property
    def num_samples(self) -> int:
        return int(self.samples_per_shard.sum())

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def take(self, reader: int) -> int:
        """Samples reader `reader` gives to every step."""
        g, v = self.global_batch, self.readers
        return g * (reader + 1) // v - g * reader // v

    def run_length(self, reader: int) -> int:
        return self.steps_per_epoch * self.take(reader)

    def run_start(self, reader: int) -> int:
        left_out = self.num_samples - self.steps_per_epoch * self.global_batch
        return self.steps_per_epoch * (self.global_batch * reader // self.readers) + left_out * reader // self.readers

    def readers_of(self, rank: int, world_size: int) -> range:
        """The readers rank `rank` of `world_size` serves (check_world_size first)."""
        per = self.readers // world_size
        return range(rank * per, (rank + 1) * per)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, steps already taken in it) after `step` steps."""
        return divmod(step, self.steps_per_epoch)

    def segments(self, seed: int, epoch: int, readers: list[int] | range) -> list[list[Segment]]:
        """The shard segments of each of `readers`' runs this epoch, in read order."""
        order = shard_order(len(self.samples_per_shard), seed, epoch)
        counts = self.samples_per_shard[order]
        ends = np.cumsum(counts)
        return [_cut(order, counts, ends, self.run_start(v), self.run_length(v)) for v in readers]


@dataclass(frozen=True)
class EpochPlan:
    """The evaluation plan: one run per (rank, DataLoader worker) slot (see the module docstring)."""

    samples_per_shard: np.ndarray
    world_size: int
    num_workers: int  # DataLoader workers per rank (0 counts as 1: the main process is the one worker)
    batch_size: int
    drop_last: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples_per_shard", _counts(self.samples_per_shard))
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
        return shard_order(len(self.samples_per_shard), seed, epoch)

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
        return _cut(order, counts, ends, slot * int(ends[-1]) // self.num_slots, self.samples_per_slot)
