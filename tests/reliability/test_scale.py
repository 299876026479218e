"""Scale by simulation: the paper's compute from `vitpipe plan`, a JFT-sized manifest (30,000 shards, 300M
samples) planned for 512 ranks (1,536 virtual readers, 8 DataLoader workers asked) within bounds of time and memory,
per-worker state that does not grow with the manifest, and flat loader memory over a long streaming run. Bound
checks, not benchmarks."""

from __future__ import annotations

import gc
import json
import pickle
import statistics
import time
import tracemalloc

import numpy as np
import psutil
import pytest

from pipeline.cli import main
from pipeline.data.storage import Storage

JFT_IMAGES = 303_000_000
RANKS, WORKERS, READERS, GLOBAL, MICRO = 512, 8, 1536, 4096, 8


# --- the paper's compute, through the CLI -----------------------------------------------------------------------
@pytest.mark.parametrize("config,epochs,exaflops", [
    # Table 6 of the paper: ViT-B/16 7 epochs of JFT-300M = 224 exaFLOPs; ViT-H/14 14 epochs = 4262 exaFLOPs
    ("configs/pretrain/vit-b16-jft.yaml", 7, 224),
    ("configs/pretrain/vit-h14-jft.yaml", 14, 4262),
])
def test_plan_json_matches_the_papers_compute(config, epochs, exaflops, capsys):
    steps = round(JFT_IMAGES * epochs / 4096)
    rc = main(["plan", config, "--json", "--no-manifest", "--num-samples", str(JFT_IMAGES), "--gpus", "256",
               "--set", f"train.steps={steps}"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert plan["total_exaflops"] == pytest.approx(exaflops, rel=0.02)
    assert plan["epochs"] == pytest.approx(epochs, rel=1e-3)
    assert plan["train_gflops_per_image"] == pytest.approx(3 * plan["forward_gflops_per_image"])
    assert plan["global_batch"] == 4096 and plan["steps"] == steps


# --- a JFT-sized manifest ---------------------------------------------------------------------------------------
def _write_manifest(path, num_shards: int, samples_per_shard: int) -> str:
    from pipeline.data.manifest import MANIFEST_FORMAT

    shards = [{"url": f"s3://datasets/jft300m/train/jft-{i:06d}.tar", "samples": samples_per_shard,
               "bytes": samples_per_shard * 110_000} for i in range(num_shards)]
    path.write_text(json.dumps({
        "format": MANIFEST_FORMAT, "name": "jft-sim", "split": "train", "label_type": "multi",
        "num_classes": 18291, "num_samples": num_shards * samples_per_shard, "shards": shards,
    }))
    return str(path)


def _rank_loader(manifest, rank: int):
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import TrainLoader

    data = DataConfig(train=manifest.url, num_workers=WORKERS, virtual_readers=READERS)
    return TrainLoader(manifest, data, Storage(), global_batch=GLOBAL, micro_batch=MICRO, image_size=224,
                       rank=rank, world_size=RANKS)


def _plan_rank(url: str, rank: int):
    """What a rank does at the start of an epoch: read the manifest, build its loader, plan its readers' runs."""
    from pipeline.data.manifest import load_dataset_spec

    manifest = load_dataset_spec(url)
    loader = _rank_loader(manifest, rank)
    segments = loader.plan.segments(0, 0, loader.readers)
    return manifest, loader, segments


def _producer(loader):
    """What one epoch hands to this rank's DataLoader workers."""
    return loader._epoch_producer(0, 0, [0] * len(loader.readers))


def _worker_state_bytes(loader) -> int:
    """Bytes of what one epoch hands to this rank's DataLoader workers (pickled, as a spawned worker gets it)."""
    return len(pickle.dumps(_producer(loader)))


@pytest.fixture(scope="module")
def jft_manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("jft-sim")
    return {n: _write_manifest(root / f"manifest-{n}.json", n, 10_000) for n in (3_000, 30_000)}


def test_jft_manifest_plans_across_512_ranks_quickly_and_small(jft_manifests):
    url = jft_manifests[30_000]
    _plan_rank(url, 0)  # warm imports
    t0 = time.perf_counter()
    manifest, loader, segments = _plan_rank(url, 137)
    elapsed = time.perf_counter() - t0
    tracemalloc.start()
    try:
        _plan_rank(url, 137)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\n30k shards / {manifest.num_samples / 1e6:.0f}M samples: rank plan {elapsed * 1e3:.0f} ms, "
          f"peak {peak / 2**20:.1f} MiB traced")
    assert manifest.num_shards == 30_000 and manifest.num_samples == 300_000_000
    assert elapsed < 1.0, f"planning one rank took {elapsed:.2f} s"
    assert peak < 200 * 2**20, f"planning one rank peaked at {peak / 2**20:.0f} MiB"

    # the split itself: 3 readers per rank (so 3 DataLoader workers, not 8), each reading exactly its run, every
    # rank a 1/512 share of every step; the readers of several ranks (first, neighbours, middle, last) never read
    # the same sample twice
    assert loader.readers == [411, 412, 413] and loader.workers == 3 and loader.accumulation == 1
    assert loader.steps_per_epoch == 300_000_000 // GLOBAL
    taken: dict[int, list[tuple[int, int]]] = {}
    for rank in (0, 1, 137, 256, 511):
        other = _rank_loader(manifest, rank)
        assert sum(other.plan.take(v) for v in other.readers) == GLOBAL // RANKS
        for v, segs in zip(other.readers, other.plan.segments(0, 0, other.readers)):
            assert sum(take for _, _, take in segs) == other.plan.run_length(v)
            for shard, skip, take in segs:
                taken.setdefault(shard, []).append((skip, skip + take))
    for shard, runs in taken.items():
        runs.sort()
        assert all(a[1] <= b[0] for a, b in zip(runs, runs[1:])), f"shard {shard} read twice: {runs}"


def test_worker_state_does_not_grow_with_the_manifest(jft_manifests):
    """Per-worker state is O(own shards): 10x the shards (same readers) may add the few extra shard runs each
    reader now spans, never the manifest."""
    from pipeline.data.manifest import load_dataset_spec

    figures = {}
    for n, url in sorted(jft_manifests.items()):
        manifest = load_dataset_spec(url)
        loader = _rank_loader(manifest, 3)
        own = _producer(loader)
        tracemalloc.start()
        try:
            loader.plan.segments(0, 0, loader.readers)
            plan_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        figures[n] = {
            "state": _worker_state_bytes(loader), "own_shards": len(own.shards),
            "own_runs": sum(len(st.segments) for st in own.streams), "manifest_urls": len(pickle.dumps(manifest.shards)),
            "plan_peak": plan_peak,
        }
    small, big = figures[3_000], figures[30_000]
    print(f"\nper-rank worker state: {small['state']} B at 3k shards ({small['own_runs']} runs), {big['state']} B "
          f"at 30k ({big['own_runs']} runs); manifest URL list {big['manifest_urls'] / 2**20:.1f} MiB; transient "
          f"plan peak {small['plan_peak'] / 1024:.0f} / {big['plan_peak'] / 1024:.0f} KiB")
    assert big["state"] < big["manifest_urls"] / 10, figures
    # the growth is explained by the extra runs the readers span (a URL and a tuple each), not by 27k more shards
    extra = big["own_shards"] - small["own_shards"]
    assert big["state"] - small["state"] <= 200 * extra + 2048, figures


# --- a long streaming run ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from pipeline.data.writer import write_array_shards

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 16, 16)).astype(np.uint8)
    return write_array_shards(images, rng.integers(0, 4, 48), str(tmp_path_factory.mktemp("tiny") / "train"),
                              name="tiny", split="train", class_names=list("abcd"), samples_per_shard=8)


def _loader(url: str, num_workers: int):
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_train_loader

    data = DataConfig(train=url, num_workers=num_workers, shuffle_buffer=4, prefetch_factor=2, virtual_readers=4)
    return build_train_loader(url, data, Storage(), global_batch=8, micro_batch=4, image_size=16, in_chans=3)


def test_worker_memory_is_flat_over_30_epochs(tiny_shards):
    """num_workers=1 (one worker serving the 4 readers): the DataLoader worker's unique memory (USS) early in every
    epoch and this process's RSS at every epoch boundary stay flat over 30 epochs of 6 shards."""
    loader = _loader(tiny_shards, 1)
    me = psutil.Process()
    epochs, worker_uss, main_rss, pids = 30, [], [], set()
    others = {p.pid for p in me.children()}  # e.g. a session's mlflow server
    steps = loader.steps()
    for epoch in range(epochs):
        for i in range(loader.steps_per_epoch):
            micro = next(steps)
            assert len(micro) == 2
            if i == 1:  # the epoch's workers only (the next epoch's start near its end)
                kids = [k for k in me.children() if k.pid not in others]
                assert len(kids) == 1, kids
                pids.add(kids[0].pid)
                worker_uss.append(kids[0].memory_full_info().uss)
        main_rss.append(me.memory_info().rss)
    assert loader.steps_per_epoch == 6 and loader.epoch == epochs and loader.counters()["skipped_samples"] == 0
    mib = 2**20
    base_w, base_m = statistics.median(worker_uss[2:6]), statistics.median(main_rss[2:6])
    print(f"\nworker USS {worker_uss[1] / mib:.1f} -> {worker_uss[-1] / mib:.1f} MiB (max {max(worker_uss) / mib:.1f}),"
          f" main RSS {main_rss[1] / mib:.1f} -> {main_rss[-1] / mib:.1f} MiB over {epochs} epochs, "
          f"{len(pids)} worker processes")
    assert len(pids) == epochs  # one worker process per epoch, each gone with its epoch
    assert max(worker_uss[6:]) - base_w < 16 * mib, [round(u / mib, 1) for u in worker_uss]
    assert max(main_rss[6:]) - base_m < 24 * mib, [round(r / mib, 1) for r in main_rss]


def test_in_process_loader_memory_is_flat_over_30_epochs(tiny_shards):
    """num_workers=0 under tracemalloc: what Python holds at each epoch boundary does not grow."""
    loader = _loader(tiny_shards, 0)
    steps = loader.steps()
    for _ in range(loader.steps_per_epoch):  # first epoch: caches, lazy imports, the filesystem
        next(steps)
    tracemalloc.start()
    try:
        held = []
        for _ in range(30):
            for _ in range(loader.steps_per_epoch):
                next(steps)
            gc.collect()  # reference cycles freed late make a sawtooth, not growth
            held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    growth = max(held[5:]) - max(held[:5])
    print(f"\ntraced memory at epoch boundaries: {held[0] / 1024:.0f} KiB -> {held[-1] / 1024:.0f} KiB "
          f"(growth after epoch 5: {growth / 1024:.1f} KiB)")
    assert growth < 256 * 1024, [round(h / 1024) for h in held]
