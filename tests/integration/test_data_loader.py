"""The streaming loader over real shards, on a local folder and on the moto S3 server (over HTTP via s3fs)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.config import DataConfig
from pipeline.data.loader import build_loader, build_train_loader
from pipeline.data.storage import Storage, get_filesystem
from pipeline.data.writer import write_array_shards

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(base URL, StorageConfig) of an empty dataset location, on local disk or on the S3 test server."""
    if request.param == "local":
        from pipeline.data.config import StorageConfig

        return str(tmp_path / "data"), StorageConfig()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/data", request.getfixturevalue("storage_config")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16), dtype=np.uint8)


def _write(base: str, storage, n: int, per_shard: int, name: str = "ds") -> str:
    return write_array_shards(_images(n), np.arange(n) % 10, f"{base}/{name}", samples_per_shard=per_shard,
                              storage=storage)


def _data(url: str, **kw) -> DataConfig:
    kw.setdefault("num_workers", 2)
    kw.setdefault("shuffle_buffer", 8)
    return DataConfig(train=url, **kw)


def _run(url, storage, data, world=2, **kw):
    out = []
    for rank in range(world):
        loader = build_loader(url, data, Storage(storage), batch_size=4, image_size=12, rank=rank, world_size=world, **kw)
        out.append((loader, list(loader)))
    return out


def test_round_trip_disjoint_complete_across_ranks_and_workers(store):
    base, storage = store
    url = _write(base, storage, 96, 13)  # 96 = 2 ranks x 2 workers x 6 batches x 4; shards of 13 (uneven)
    runs = _run(url, storage, _data(url))
    keys = [k for _, batches in runs for b in batches for k in b["key"]]
    assert len(keys) == 96 and len(set(keys)) == 96
    for loader, batches in runs:
        assert len(batches) == len(loader) == 12
        b = batches[0]
        # uint8 until the device normalises it (pipeline.data.transforms.to_model_input)
        assert b["image"].shape == (4, 3, 12, 12) and b["image"].dtype == torch.uint8
        assert b["label"].dtype == torch.int64 and set(b) == {"image", "label", "key", "valid", "index", "aug"}
        assert all(bool(bb["valid"].all()) for bb in batches)  # drop_last: no padding
        # `index`: the sample's position in the manifest (keys are its number here)
        assert all(int(k) == int(i) for bb in batches for k, i in zip(bb["key"], bb["index"]))
        assert all(int(k) % 10 == int(l) for bb in batches for k, l in zip(bb["key"], bb["label"]))
        assert loader.counters()["skipped_samples"] == 0


def test_equal_batch_counts_with_uneven_and_too_few_shards(tmp_path):
    from pipeline.data.config import StorageConfig

    storage = StorageConfig()
    uneven = write_array_shards(_images(70), np.zeros(70, int), str(tmp_path / "u"), samples_per_shard=30)
    few = write_array_shards(_images(50), np.zeros(50, int), str(tmp_path / "f"), samples_per_shard=50)
    for url in (uneven, few):  # 3 shards (30, 30, 10) and 1 shard, for 3 ranks x 2 workers = 6 readers
        runs = _run(url, storage, _data(url), world=3)
        counts = {len(batches) for _, batches in runs}
        assert counts == {len(runs[0][0])} and len(runs[0][0]) > 0
        keys = [k for _, batches in runs for b in batches for k in b["key"]]
        assert len(keys) == len(set(keys))


@pytest.mark.parametrize("world,num_workers", [(1, 0), (1, 2), (2, 0), (2, 2), (3, 1)])
def test_an_evaluation_split_counts_every_sample_once(tmp_path, world, num_workers):
    """drop_last=False pads every rank to equal batch counts with repeats and marks them invalid: the valid samples
    over all ranks and workers are the split, each exactly once (37 images: no multiple of anything here)."""
    from pipeline.data.config import StorageConfig

    url = write_array_shards(_images(37), np.arange(37) % 10, str(tmp_path / "eval"), samples_per_shard=10)
    runs = _run(url, StorageConfig(), _data(url, num_workers=num_workers), world=world, train=False, drop_last=False)
    assert len({len(batches) for _, batches in runs}) == 1  # the same batch count on every rank
    valid = [k for _, batches in runs for b in batches for k, v in zip(b["key"], b["valid"]) if v]
    assert sorted(int(k) for k in valid) == list(range(37))
    padded = sum(len(b["key"]) for _, batches in runs for b in batches) - 37
    assert padded == len(runs) * len(runs[0][1]) * 4 - 37


def _steps(url, storage, data, *, world: int, steps: int, start: dict | None = None, global_batch: int = 24,
           micro_batch: int = 4, image_size: int = 12) -> tuple[list[dict[str, tuple]], list[dict]]:
    """Every rank's TrainLoader at `world` for `steps` steps (from `start`, a merged state): per step, the sorted
    (key, augmentation seed, pixel sum, valid) of its samples over all ranks; and each rank's state at the end."""
    from pipeline.data.loader import for_rank

    out: list[list[tuple]] = [[] for _ in range(steps)]
    states = []
    for rank in range(world):
        loader = build_train_loader(url, data, Storage(storage), global_batch=global_batch, micro_batch=micro_batch,
                                    image_size=image_size, rank=rank, world_size=world)
        if start is not None:
            loader.load_state_dict(for_rank(start, rank))
        it = loader.steps()
        for s in range(steps):
            micro = next(it)
            assert len(micro) == global_batch // (world * micro_batch)
            for b in micro:
                assert len(b["key"]) == micro_batch and b["image"].shape[0] == micro_batch
                for k, a, img, v in zip(b["key"], b["aug"].tolist(), b["image"], b["valid"].tolist()):
                    out[s].append((k, a, int(img.sum()), v))
        states.append(loader.state_dict())
    return [sorted(step) for step in out], states


def test_each_steps_global_batch_is_the_same_at_any_world_size_and_worker_count(store):
    """The samples of every step (keys), their augmentation seeds and the augmented pixels are the same for world
    sizes 1, 2 and 3 and for 0, 1 and 2 DataLoader workers, over an epoch boundary (100 samples in shards of 13:
    4 steps of 24 per epoch, 9 steps)."""
    base, storage = store
    url = _write(base, storage, 100, 13)
    data = lambda nw: _data(url, num_workers=nw, shuffle_buffer=5, virtual_readers=12, seed=3)  # noqa: E731
    reference, _ = _steps(url, storage, data(0), world=1, steps=9)
    assert all(len({key for key, *_ in step}) == 24 for step in reference)
    assert reference[0] != reference[4]  # another epoch, another order
    for world, workers in [(1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]:
        got, _ = _steps(url, storage, data(workers), world=world, steps=9)
        assert got == reference, (world, workers)
    with pytest.raises(ValueError, match=r"4 workers cannot serve.*train.global_batch \(24\).*World sizes that work: "
                                         r"1, 2, 3, 6"):
        _steps(url, storage, data(0), world=4, steps=1)


@pytest.fixture(scope="module", params=["local", "s3"])
def resume_case(request, tmp_path_factory):
    """A 100-image set with bad samples, on local disk or S3, and its uninterrupted 9-step run on one rank: written
    and computed once, read by each world-size pair."""
    from pipeline.data.config import StorageConfig
    from tests.fixtures.s3 import ensure_buckets, make_storage_config

    if request.param == "local":
        base, storage = str(tmp_path_factory.mktemp("resume") / "data"), StorageConfig()
    else:
        s3_server = request.getfixturevalue("s3_server")
        ensure_buckets(s3_server, "loader-resume", region_name="us-east-1")
        base, storage = "s3://loader-resume/data", make_storage_config(s3_server)
    url = _write(base, storage, 100, 13)
    _corrupt(url, storage)
    data = _data(url, num_workers=1, shuffle_buffer=5, virtual_readers=12, seed=5)
    reference, _ = _steps(url, storage, data, world=1, steps=9)
    return url, storage, data, reference


@pytest.mark.parametrize("first,then", [(2, 1), (2, 3), (3, 2)])
def test_resume_at_another_world_size_continues_at_the_exact_next_sample(resume_case, first, then):
    """Stopped after 6 steps on `first` ranks (an epoch and a half, bad samples skipped on the way), the merged
    state continues on `then` ranks with the uninterrupted run's samples, augmentation and pixels."""
    from pipeline.data.loader import merge_states

    url, storage, data, reference = resume_case
    part, states = _steps(url, storage, data, world=first, steps=6)
    merged = merge_states(states)
    assert merged["step"] == 6 and len(merged["positions"]) == 12
    rest, _ = _steps(url, storage, data, world=then, steps=3, start=merged)
    assert part + rest == reference
    assert sum(c["bad_images"] + c["bad_labels"] for c in (s["counters"] for s in states)) >= 1


def test_decoding_per_batch_on_the_device_gives_the_workers_images_and_resumes_exactly(tmp_path):
    """data.decode_device=cuda's path (workers check headers, the loader decodes each batch and augments it with
    the workers' seeded draws) run with the CPU as the device: JPEG and PNG shards give the images that decoding in
    the workers gives, bit for bit, training crops included; resume is exact; a JPEG whose body is broken is zeros,
    masked and counted. On a machine without CUDA the setting itself is refused, naming it."""
    from pipeline.data.config import StorageConfig
    from pipeline.data.loader import SplitLoader, TrainLoader, merge_states
    from pipeline.data.manifest import load_dataset_spec

    storage = StorageConfig()
    rgb = np.random.default_rng(1).integers(0, 256, (48, 20, 20, 3), dtype=np.uint8)
    for fmt in ("jpg", "png"):
        url = write_array_shards(rgb, np.arange(48) % 10, str(tmp_path / fmt), samples_per_shard=7,
                                 image_format=fmt)
        data, m = _data(url, seed=3, virtual_readers=4), load_dataset_spec(url, Storage(storage))
        for train in (True, False):
            kw = dict(batch_size=4, image_size=12, rank=0, world_size=2, train=train)
            workers = list(SplitLoader(m, data, Storage(storage), **kw))
            on_device = SplitLoader(m, data, Storage(storage), batch_decode_device="cpu", **kw)
            got = list(on_device)
            assert [b["key"] for b in got] == [b["key"] for b in workers] and len(got) == 6
            assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, workers)), (fmt, train)
            assert all(bool(b["valid"].all()) for b in got) and on_device.counters()["bad_images"] == 0
        # training steps: decoded in the workers, or on the device and resumed after 2 steps on another world size
        kw = dict(global_batch=8, micro_batch=4, image_size=12)
        it = TrainLoader(m, data, Storage(storage), **kw).steps()
        reference = [b for _ in range(5) for b in next(it)]
        parts = [TrainLoader(m, data, Storage(storage), batch_decode_device="cpu", rank=r, world_size=2, **kw)
                 for r in range(2)]
        firsts = [[next(it) for _ in range(2)] for it in (p.steps() for p in parts)]
        resumed = TrainLoader(m, data, Storage(storage), batch_decode_device="cpu", **kw)
        resumed.load_state_dict(merge_states([p.state_dict() for p in parts]))
        it = resumed.steps()
        got = [b for s in range(2) for r in range(2) for b in firsts[r][s]] + [b for _ in range(3) for b in next(it)]
        assert sorted(k for b in got[:4] for k in b["key"]) == sorted(k for b in reference[:4] for k in b["key"])
        assert [b["key"] for b in got[4:]] == [b["key"] for b in reference[4:]]
        by_key = lambda batches: {k: img for b in batches for k, img in zip(b["key"], b["image"])}  # noqa: E731
        want = by_key(reference)
        assert all(torch.equal(img, want[k]) for k, img in by_key(got).items()), fmt
    # a JPEG with a valid header and a broken body passes the workers' check and fails on the device
    folder = str(tmp_path / "jpg")
    _edit_members(f"{folder}/train-000000.tar", storage, {"00000002.jpg": lambda body: body[:200] + bytes(300)})
    url = f"{folder}/manifest.json"
    broken = SplitLoader(load_dataset_spec(url, Storage(storage)), _data(url, seed=3), Storage(storage),
                         batch_decode_device="cpu", batch_size=4, image_size=12, world_size=1, train=False)
    batches = list(broken)
    masked = [(k, bool(v)) for b in batches for k, v in zip(b["key"], b["valid"]) if k == "00000002"]
    assert masked == [("00000002", False)] and broken.counters()["bad_images"] == 1
    assert sum(int(b["valid"].sum()) for b in batches) == 47
    with pytest.raises(ValueError, match="data.decode_device"):
        build_loader(url, _data(url, decode_device="cuda"), Storage(storage), batch_size=4, image_size=12)


def _edit_members(shard_url: str, storage, edits: dict) -> None:
    """Rewrites a tar shard in place with `edits[member name](bytes)` applied to those members."""
    fs, path = get_filesystem(shard_url, storage)
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            body = src.extractfile(member).read()
            if member.name in edits:
                body = edits[member.name](body)
            member.size = len(body)
            dst.addfile(member, io.BytesIO(body))
    fs.pipe_file(path, out.getvalue())


def _corrupt(url: str, storage) -> None:
    """Shard 0: one undecodable image, one non-integer and one out-of-range label; shard 1 cut in half."""
    fs, path = get_filesystem(url, storage)
    folder = path.rsplit("/", 1)[0]
    _edit_members(url.rsplit("/", 1)[0] + "/train-000000.tar", storage, {
        "00000001.png": lambda _: b"\x89PNG\r\n\x1a\n garbage", "00000002.cls": lambda _: b"seven",
        "00000003.cls": lambda _: b"99"})
    half = fs.cat_file(f"{folder}/train-000001.tar")
    fs.pipe_file(f"{folder}/train-000001.tar", half[: len(half) // 2])


def test_bad_samples_and_truncated_or_missing_shards_are_skipped_and_counted(store):
    base, storage = store
    url = _write(base, storage, 60, 10)
    _corrupt(url, storage)
    fs, path = get_filesystem(url, storage)
    fs.rm_file(path.rsplit("/", 1)[0] + "/train-000005.tar")
    runs = _run(url, storage, _data(url, num_workers=1), world=1)
    loader, batches = runs[0]
    assert len(batches) == len(loader) == 15  # refill passes keep the batch count
    c = loader.counters()
    # 18 of 60 planned samples are lost, so the worker reads its runs again: bad data is met (and counted) again
    assert c["bad_images"] >= 1 and c["bad_labels"] >= 2
    assert c["truncated_shards"] >= 1 and c["skipped_shards"] >= 1
    assert c["skipped_samples"] >= 3 + 10 + 1  # bad samples + missing shard + the lost half of the cut one
    keys = {k for b in batches for k in b["key"]}
    assert not keys & {"00000001", "00000002", "00000003"}
    fail = build_loader(url, _data(url, num_workers=0, on_error="fail"), Storage(storage), batch_size=4, image_size=12)
    with pytest.raises(RuntimeError, match="unreadable shard"):
        list(fail)


def test_missing_manifest_fails_before_workers(store):
    base, storage = store
    with pytest.raises(ValueError, match="manifest not found"):
        build_loader(f"{base}/nothing/manifest.json", _data("x"), Storage(storage), batch_size=4, image_size=12)


def test_multi_label_gives_multi_hot(tmp_path):
    labels = [[i % 5, (i + 1) % 5] for i in range(32)]
    url = write_array_shards(_images(32), labels, str(tmp_path / "m"), samples_per_shard=8,
                             class_names=list("abcde"))
    loader = build_loader(url, _data(url, num_workers=0), None, batch_size=8, image_size=12)
    b = next(iter(loader))
    assert b["label"].dtype == torch.float32 and b["label"].shape == (8, 5)
    assert torch.all(b["label"].sum(1) == 2)


def test_s3_retries_through_a_faulty_proxy_are_counted(s3_bucket, storage_config, faulty_proxy):
    from tests.fixtures.s3 import make_storage_config

    url = _write(f"s3://{s3_bucket}", storage_config, 48, 6)
    proxy = faulty_proxy(fail_fraction=0.1, reset_fraction=0.2, slow_fraction=0.05, delay_s=0.1, seed=3)
    flaky = make_storage_config(proxy.url, read_block_size=2048)  # small ranged reads: many requests
    loader = build_loader(url, _data(url, num_workers=1, shuffle_buffer=0), Storage(flaky), batch_size=4, image_size=12)
    keys = sorted(k for b in loader for k in b["key"])
    assert keys == [f"{i:08d}" for i in range(48)]
    c = loader.counters()
    assert proxy.counts["slowdown_503"] > 0 and proxy.counts["resets"] > 0
    assert c["retries"] >= proxy.counts["resets"] and c["skipped_shards"] == 0


def test_a_checkpoint_fetched_through_a_faulty_proxy_arrives_whole(s3_bucket, storage_config, faulty_proxy):
    """What the driver's final export does: the checkpoint's files downloaded one by one, a body cut off half-way
    retried (fsspec's recursive get would fail the export)."""
    import os

    from pipeline.data.retries import io_counters
    from pipeline.data.storage import Storage, get_filesystem
    from tests.fixtures.s3 import make_storage_config

    url = f"s3://{s3_bucket}/runs/r1/checkpoint_00000004"
    files = {"COMMITTED.rank0": b"{}", "step00000004/mp_rank_00_model_states.pt": os.urandom(300_000),
             "step00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(200_000)}
    fs, root = get_filesystem(url, storage_config)
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)
    proxy = faulty_proxy(reset_fraction=0.5, seed=1, reset_first=1)
    before = io_counters()["retries"]
    with Storage(make_storage_config(proxy.url)).fetch_dir(url) as local:
        got = {str(p.relative_to(local)): p.read_bytes() for p in Path(local).rglob("*") if p.is_file()}
    assert got == files
    # (a cut-off listing is retried by botocore, a cut-off body by the reader: both counted)
    assert proxy.counts["resets"] > 0 and io_counters()["retries"] - before >= proxy.counts["resets"], proxy.counts


def test_plain_webdataset_reads_our_shards(store):
    import webdataset as wds

    from pipeline.data.manifest import load_dataset_spec
    from pipeline.data.storage import register_wds_opener

    base, storage = store
    url = _write(base, storage, 20, 8)
    register_wds_opener(storage)
    m = load_dataset_spec(url, Storage(storage))
    ds = wds.WebDataset(m.shards, shardshuffle=False, nodesplitter=wds.split_by_node).decode("pil").to_tuple(
        "png", "cls")
    samples = list(ds)
    assert len(samples) == 20 and samples[3][1] == 3 and samples[0][0].size == (16, 16)


def test_training_steps_start_each_epochs_workers_early(store):
    """`steps()` forks the next epoch's workers while the current epoch's last steps are consumed; the steps are
    those of a loader without DataLoader workers."""
    base, storage = store
    url = _write(base, storage, 48, 8)
    kw = dict(global_batch=8, micro_batch=4, image_size=16)
    expected, _ = _steps(url, storage, _data(url, num_workers=0, virtual_readers=4), world=1, steps=15, **kw)
    loader = build_train_loader(url, _data(url, num_workers=2, virtual_readers=4), Storage(storage), **kw)
    stream = loader.steps()
    got, prestarted_at = [], None
    for s in range(15):
        got.append({k: a for b in next(stream) for k, a in zip(b["key"], b["aug"].tolist())})
        if prestarted_at is None and loader._prestarted is not None:
            prestarted_at = s + 1
    assert [sorted(step.items()) for step in got] == [sorted((k, a) for k, a, *_ in step) for step in expected]
    # started before the first epoch (6 steps) ended, while its last prefetched steps were still to be handed out
    assert prestarted_at is not None and prestarted_at < loader.steps_per_epoch, prestarted_at
