"""The per-epoch plan: disjoint, complete, equal per slot, deterministic, O(shards)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.epochs import EpochPlan


def _samples(plan: EpochPlan, seed: int, epoch: int) -> dict[tuple[int, int], list[tuple[int, int]]]:
    out = {}
    for r in range(plan.world_size):
        for w in range(plan.workers):
            out[r, w] = [(shard, skip + i) for shard, skip, take in plan.segments(seed, epoch, r, w)
                         for i in range(take)]
    return out


@pytest.mark.parametrize("counts", [[7, 30, 3, 16, 0, 40], [96], [10] * 9 + [6]])
def test_slots_disjoint_equal_and_cover_all_but_the_remainder(counts):
    plan = EpochPlan(np.array(counts), world_size=2, num_workers=2, batch_size=4)
    per_slot = _samples(plan, seed=1, epoch=0)
    flat = [s for v in per_slot.values() for s in v]
    assert all(len(v) == plan.samples_per_slot for v in per_slot.values())
    assert len(set(flat)) == len(flat), "a sample was given to two slots"
    assert all(0 <= i < counts[shard] for shard, i in flat)
    n = sum(counts)
    assert n - len(flat) < plan.num_slots * plan.batch_size  # only a remainder that cannot fill a batch is dropped
    assert plan.batches_per_rank == plan.batches_per_slot * 2


def test_complete_coverage_when_divisible_and_padding_without_drop_last():
    plan = EpochPlan(np.array([5, 11, 16]), world_size=2, num_workers=2, batch_size=2)  # 32 = 4 slots x 4 x 2
    flat = [s for v in _samples(plan, 0, 3).values() for s in v]
    assert sorted(flat) == sorted((sh, i) for sh, c in enumerate([5, 11, 16]) for i in range(c))
    padded = EpochPlan(np.array([5, 11, 17]), world_size=2, num_workers=2, batch_size=2, drop_last=False)
    flat = [s for v in _samples(padded, 0, 3).values() for s in v]
    assert len(set(flat)) == 33 and len(flat) == padded.num_slots * padded.samples_per_slot


def test_fewer_shards_than_slots_splits_a_shard():
    plan = EpochPlan(np.array([40]), world_size=2, num_workers=4, batch_size=5)
    per_slot = _samples(plan, 0, 0)
    assert all(len(v) == 5 for v in per_slot.values())
    assert len({s for v in per_slot.values() for s in v}) == 40


def test_order_depends_on_seed_and_epoch_only():
    plan = EpochPlan(np.full(50, 10), world_size=1, num_workers=1, batch_size=10)
    assert plan.segments(0, 0, 0, 0) == plan.segments(0, 0, 0, 0)
    assert plan.segments(0, 0, 0, 0) != plan.segments(0, 1, 0, 0)
    assert plan.segments(0, 0, 0, 0) != plan.segments(1, 0, 0, 0)


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochPlan(np.array([3, 3]), world_size=2, num_workers=2, batch_size=4)
    with pytest.raises(ValueError, match="non-negative"):
        EpochPlan(np.array([]), world_size=1, num_workers=0, batch_size=1)


def test_large_plan_is_per_rank_and_consistent():
    counts = np.random.default_rng(0).integers(400, 600, size=30_000)
    plan = EpochPlan(counts, world_size=512, num_workers=8, batch_size=16)
    segs = [plan.segments(7, 2, 300, w) for w in range(8)]
    assert all(sum(t for _, _, t in s) == plan.samples_per_slot for s in segs)
    shards = {sh for s in segs for sh, _, _ in s}
    assert 8 <= len(shards) <= 8 * (plan.samples_per_slot // 400 + 2)
