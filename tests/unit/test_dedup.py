"""pipeline.data.dedup without services: Hamming distances, the test index's nearest-view match, the hash of views,
and the exclusion list as the loader reads it (local shards)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pipeline.data.dedup as dd
from pipeline.data.config import DataConfig
from pipeline.data.dedup import EXCLUDE_FORMAT, EXCLUDE_NAME, VIEWS, HashIndex, hamming, load_exclusions
from pipeline.data.loader import build_loader
from pipeline.data.manifest import load_dataset_spec
from pipeline.data.writer import write_array_shards


def _bits(x: np.ndarray) -> int:
    return sum(bin(int(v)).count("1") for v in x)


def test_hamming_is_the_bit_count_of_the_xor_with_or_without_numpy_bitwise_count(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, (5, 4), dtype=np.uint64) | np.uint64(1 << 63)
    b = rng.integers(0, 2**63, (7, 4), dtype=np.uint64)
    want = np.array([[_bits(x ^ y) for y in b] for x in a])
    assert (hamming(a, b) == want).all()
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2: the byte table
    assert (hamming(a, b) == want).all()


def test_the_index_gives_the_nearest_view_within_the_threshold_across_blocks(monkeypatch):
    rng = np.random.default_rng(1)
    views = rng.integers(0, 2**63, (300, len(VIEWS), 4), dtype=np.uint64)
    queries = rng.integers(0, 2**63, (6, 4), dtype=np.uint64)
    flip = np.uint64(0b1111)  # 4 bits in each word: 16 bits away
    queries[0] = views[7, 3] ^ flip
    queries[1] = views[299, 8] ^ (flip >> np.uint64(1))  # 12 bits away
    queries[2] = views[150, 0]
    queries[3] = views[42, 1] ^ np.uint64(0xFF)  # 32 bits away: on the threshold
    queries[4] = views[42, 1] ^ np.uint64(0x1FF)  # 36 bits: outside
    want = [(0, 7, 3, 16), (1, 299, 8, 12), (2, 150, 0, 0), (3, 42, 1, 32)]
    index = HashIndex.from_views(views, threshold=32)
    assert index.match(queries) == want
    monkeypatch.setattr(dd, "_MATCH_CELLS", 64)  # many small blocks, candidates in several of them
    assert index.match(queries) == want
    # the brute-force reference agrees on the nearest distance of every query
    d = hamming(queries, views.reshape(-1, 4)).min(1)
    assert [int(x) for x in d[:4]] == [16, 12, 0, 32] and d[4] > 32 and d[5] > 32
    assert HashIndex.from_views(views, threshold=11).match(queries) == [(2, 150, 0, 0)]


def test_view_hashes_start_with_the_image_itself_and_survive_a_reencode():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("china.jpg")).resize((160, 120))
    views = dd.view_hashes(photo)
    assert views.shape == (len(VIEWS), 4) and views.dtype == np.uint64
    assert (views[0] == dd.image_hash(photo.convert("L"))).all()
    import io

    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=50)
    copy = dd.image_hash(dd._gray(buf.getvalue()))
    assert hamming(copy[None], views[:1])[0, 0] <= 8
    assert len({v.tobytes() for v in views}) == len(VIEWS)  # each crop hashes differently


def _dataset(tmp_path, n=48, per_shard=10):
    images = np.random.default_rng(0).integers(0, 256, (n, 16, 16), dtype=np.uint8)
    return write_array_shards(images, np.arange(n) % 10, str(tmp_path / "ds"), samples_per_shard=per_shard)


def _write_exclusions(url: str, keys: dict[int, list[str]], **over) -> None:
    m = load_dataset_spec(url)
    doc = {"format": EXCLUDE_FORMAT, "manifest_sha256": m.checksum,
           "excluded": [{"shard": s, "key": k} for s, ks in keys.items() for k in ks], **over}
    with open(url.rsplit("/", 1)[0] + "/" + EXCLUDE_NAME, "w") as f:
        json.dump(doc, f)


def test_exclusions_missing_stale_or_malformed(tmp_path):
    url = _dataset(tmp_path)
    m = load_dataset_spec(url)
    assert load_exclusions(m) is None
    _write_exclusions(url, {0: ["00000001"], 2: ["00000020", "00000021"]})
    ex = load_exclusions(m)
    assert ex.count == 3 and ex.keys[2] == {"00000020", "00000021"} and ex.url.endswith(EXCLUDE_NAME)
    _write_exclusions(url, {0: ["00000001"]}, manifest_sha256="0" * 64)
    with pytest.raises(ValueError, match="another version of .*dedup"):
        load_exclusions(m)
    _write_exclusions(url, {9: ["x"]})
    with pytest.raises(ValueError, match="invalid exclusion list .*shard 9 outside"):
        load_exclusions(m)
    (tmp_path / "ds" / EXCLUDE_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="invalid exclusion list"):
        build_loader(url, DataConfig(train=url, num_workers=0), None, batch_size=4, image_size=8)
    pattern = load_dataset_spec(str(tmp_path / "ds" / "train-{000000..000004}.tar") + "|48")
    assert load_exclusions(pattern) is None  # a shard pattern has no folder of its own


@pytest.mark.parametrize("world,num_workers", [(1, 0), (2, 2)])
def test_an_evaluation_split_counts_every_sample_not_excluded_exactly_once(tmp_path, world, num_workers):
    """drop_last=False pads with repeats marked not valid; an excluded sample must not shift which are which."""
    url = _dataset(tmp_path, n=37)
    drop = {0: ["00000000", "00000004"], 3: ["00000031"]}
    _write_exclusions(url, drop)
    runs = []
    for rank in range(world):
        loader = build_loader(url, DataConfig(train=url, num_workers=num_workers, shuffle_buffer=4), None,
                              batch_size=4, image_size=8, train=False, drop_last=False, rank=rank, world_size=world)
        runs.append((loader, list(loader)))
    assert len({len(b) for _, b in runs}) == 1
    valid = [k for _, batches in runs for b in batches for k, v in zip(b["key"], b["valid"]) if v]
    assert sorted(valid) == sorted(f"{i:08d}" for i in range(37) if i not in (0, 4, 31))
    assert sum(loader.counters()["excluded_samples"] for loader, _ in runs) == 3


def test_a_shard_that_cannot_be_read_fails_the_scan_naming_it(tmp_path):
    """A silently skipped shard would leave its duplicates in: the scan stops instead, and writes no list."""
    from pipeline.data.dedup import dedup

    digits = np.random.default_rng(2).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test = write_array_shards(digits[:4], np.zeros(4, int), str(tmp_path / "test"), samples_per_shard=4)
    pre = write_array_shards(digits, np.zeros(12, int), str(tmp_path / "pre"), samples_per_shard=4)
    shard = tmp_path / "pre" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])  # cut inside the first member
    with pytest.raises(ValueError, match=r"cannot read shard .*train-000001\.tar .*vitpipe shards verify"):
        dedup(pre, [test], progress=False)
    assert not (tmp_path / "pre" / EXCLUDE_NAME).exists()
    with pytest.raises(ValueError, match="is the pretraining dataset itself"):
        dedup(pre, [pre], progress=False)
