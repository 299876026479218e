"""The per-epoch plan: disjoint, complete, equal per slot, deterministic, O(shards)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.epochs import EpochPlan, ReaderPlan, check_world_size, servable_world_sizes


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


# --- the training plan: virtual readers -------------------------------------------------------------------------
def _reader_samples(plan: ReaderPlan, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    return [[(shard, skip + i) for shard, skip, take in segs for i in range(take)]
            for segs in plan.segments(seed, epoch, range(plan.readers))]


@pytest.mark.parametrize("counts,readers,batch", [([7, 30, 3, 16, 0, 40], 12, 24), ([96], 5, 16),
                                                  ([10] * 9 + [6], 48, 48), ([13] * 8, 7, 50)])
def test_readers_take_the_whole_batch_disjointly_every_step(counts, readers, batch):
    plan = ReaderPlan(np.array(counts), readers=readers, global_batch=batch)
    takes = [plan.take(v) for v in range(readers)]
    assert sum(takes) == batch and max(takes) - min(takes) <= 1 and min(takes) >= 1
    runs = _reader_samples(plan, seed=1, epoch=0)
    assert [len(r) for r in runs] == [plan.steps_per_epoch * t for t in takes]
    flat = [s for r in runs for s in r]
    assert len(set(flat)) == len(flat) and all(0 <= i < counts[sh] for sh, i in flat)
    n = sum(counts)
    assert plan.steps_per_epoch == n // batch and n - len(flat) == n % batch  # only what fills no step is left out
    assert _reader_samples(plan, 1, 0) == runs
    if len(counts) > 1:  # the shard order is drawn per epoch (the readers' buffers shuffle within: the loader's)
        assert _reader_samples(plan, 1, 1) != runs


def test_a_rank_serves_a_block_of_readers_worth_its_share_of_every_step():
    plan = ReaderPlan(np.full(10, 17), readers=12, global_batch=36)  # takes of 3
    for world in (1, 2, 3, 4, 6, 12):
        blocks = [plan.readers_of(r, world) for r in range(world)]
        assert sorted(v for b in blocks for v in b) == list(range(12))
        assert {sum(plan.take(v) for v in b) for b in blocks} == {36 // world}
    uneven = ReaderPlan(np.full(10, 17), readers=12, global_batch=30)  # takes of 2 and 3, rank shares still equal
    assert {sum(uneven.take(v) for v in uneven.readers_of(r, 3)) for r in range(3)} == {10}
    assert plan.locate(0) == (0, 0) and plan.locate(plan.steps_per_epoch + 2) == (1, 2)


def test_world_sizes_the_plan_cannot_serve_are_refused_naming_the_fields_and_what_works():
    assert servable_world_sizes(48, 96, 16) == [1, 2, 3, 6]
    check_world_size(3, 48, 96, 16)
    with pytest.raises(ValueError, match=r"data.virtual_readers \(48\) is not a multiple of 5.*1, 2, 3, 6"):
        check_world_size(5, 48, 96, 16)
    with pytest.raises(ValueError, match=r"train.global_batch \(96\) is not a multiple of train.micro_batch \(16\) x 4"):
        check_world_size(4, 48, 96, 16)
    with pytest.raises(ValueError, match="exceeds train.global_batch"):
        ReaderPlan(np.full(10, 10), readers=20, global_batch=16)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ReaderPlan(np.full(2, 10), readers=4, global_batch=32)


def test_a_jft_sized_reader_plan_is_computed_per_rank_quickly():
    import time

    counts = np.random.default_rng(0).integers(9_000, 11_000, size=30_000)
    plan = ReaderPlan(counts, readers=1536, global_batch=4096)
    t0 = time.perf_counter()
    segs = plan.segments(7, 2, plan.readers_of(300, 512))
    elapsed = time.perf_counter() - t0
    assert [sum(t for _, _, t in s) for s in segs] == [plan.run_length(v) for v in plan.readers_of(300, 512)]
    assert elapsed < 1.0, elapsed
