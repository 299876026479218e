"""`vitpipe shards dedup` on the moto S3 server: Fashion-MNIST test images planted in a pretraining set as near-
duplicates (exact copy, JPEG re-encode, resized, slightly cropped) among real non-duplicates (other Fashion-MNIST
images of the same classes, sklearn digits), found serially and as Ray tasks; the loader skipping what was found.
Recall and false positives are printed (pytest -s)."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.config import DataConfig
from pipeline.data.dedup import EXCLUDE_NAME, HASH_KIND
from pipeline.data.loader import build_train_loader
from pipeline.data.sources import Source, SourceItem, png_bytes, read_idx
from pipeline.data.storage import Storage, get_filesystem
from pipeline.data.writer import write_array_shards, write_shards

pytestmark = pytest.mark.integration

FMNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (make setup installs it)
N_TEST = 40  # the downstream test set: Fashion-MNIST t10k[:40]
N_PLANTED = 20  # of which t10k[:20] are planted, once per variant
N_DIGITS_TEST = 10  # a second test set: sklearn digits[:10], digits[:3] planted as exact copies
PER_SHARD = 50


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


VARIANTS = {  # 28 px uint8 -> (encoded bytes, extension)
    "exact": lambda a: (png_bytes(a), "png"),  # the bytes the test shard holds
    "jpeg-q60": lambda a: (_jpeg(Image.fromarray(a), 60), "jpg"),
    "resized-up4": lambda a: (_jpeg(Image.fromarray(a).resize((112, 112), Image.Resampling.BICUBIC), 90), "jpg"),
    "resized-down20": lambda a: (png_bytes(np.asarray(Image.fromarray(a).resize((20, 20), Image.Resampling.BILINEAR))),
                                 "png"),
    "crop-centre3pct": lambda a: (_jpeg(_crop(Image.fromarray(a).resize((112, 112), Image.Resampling.BICUBIC),
                                              .03, .03, .03, .03), 90), "jpg"),
    "crop-side2pct": lambda a: (_jpeg(_crop(Image.fromarray(a).resize((112, 112), Image.Resampling.BICUBIC),
                                            0, 0, .02, 0), 90), "jpg"),
}


class _Items(Source):
    """Encoded images with chosen keys, as the writer's source."""

    kind = "planted"
    class_names = [str(i) for i in range(10)]

    def __init__(self, items: list[SourceItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def item(self, i: int) -> SourceItem:
        return self.items[i]


def _digits28() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    up = [np.asarray(Image.fromarray((x * 255 / 16).astype(np.uint8)).resize((28, 28), Image.Resampling.BICUBIC))
          for x in d.images]
    return np.stack(up), d.target


@pytest.fixture(scope="module")
def data():
    """(test images, test digits, pretraining items, expected matches {key: (test set, test key)})."""
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; make setup does)")
    test = read_idx(str(FMNIST / "t10k-images-idx3-ubyte.gz"))
    test_labels = read_idx(str(FMNIST / "t10k-labels-idx1-ubyte.gz"))
    train = read_idx(str(FMNIST / "train-images-idx3-ubyte.gz"))[:200]
    train_labels = read_idx(str(FMNIST / "train-labels-idx1-ubyte.gz"))[:200]
    digits, digit_labels = _digits28()
    items, expected = [], {}
    for i in range(N_PLANTED):
        for name, make in VARIANTS.items():
            blob, ext = make(test[i])
            key = f"dup-{name}-{i:04d}"
            items.append(SourceItem(key, blob, ext, int(test_labels[i])))
            expected[key] = (0, f"{i:08d}")
    for i in range(3):
        key = f"dup-digit-exact-{i:04d}"
        items.append(SourceItem(key, png_bytes(digits[i]), "png", int(digit_labels[i])))
        expected[key] = (1, f"{i:08d}")
    # non-duplicates: same classes and sources, other images
    items += [SourceItem(f"neg-fmnist-train-{i:04d}", png_bytes(a), "png", int(y))
              for i, (a, y) in enumerate(zip(train, train_labels))]
    items += [SourceItem(f"neg-fmnist-test-{i:04d}", png_bytes(test[i]), "png", int(test_labels[i]))
              for i in range(1000, 1037)]
    items += [SourceItem(f"neg-digit-{i:04d}", _jpeg(Image.fromarray(digits[i]), 90), "jpg", int(digit_labels[i]))
              for i in range(100, 140)]
    assert len(items) == 400  # 2 ranks x 2 workers x 25 batches of 4: the loader's plan takes every sample
    order = np.random.default_rng(0).permutation(len(items))  # planted copies spread over the shards
    return test[:N_TEST], digits[:N_DIGITS_TEST], [items[j] for j in order], expected


@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3

    name = f"dedup-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def storage(s3_server):
    from tests.fixtures.s3 import make_storage_config

    return make_storage_config(s3_server)


@pytest.fixture(scope="module")
def test_sets(data, bucket, storage):
    test, digits, _, _ = data
    fm = write_array_shards(test, np.zeros(len(test), int), f"s3://{bucket}/fmnist/test", name="fmnist",
                            split="test", samples_per_shard=16, storage=storage)
    dg = write_array_shards(digits, np.zeros(len(digits), int), f"s3://{bucket}/digits/test", name="digits",
                            split="test", samples_per_shard=16, storage=storage)
    return fm, dg


def _write_pretrain(data, dest: str, storage) -> str:
    return write_shards(_Items(data[2]), dest, name="planted", samples_per_shard=PER_SHARD, storage=storage,
                        progress=False)


def _read_json(url: str, storage) -> dict:
    fs, path = get_filesystem(url, storage)
    return json.loads(fs.cat_file(path))


def _nearest(items: list[SourceItem], test_images: np.ndarray) -> dict[str, int]:
    """key -> bits to the nearest view of any test image (the margin a threshold has), by the library's own hashes."""
    from pipeline.data.dedup import HashIndex, _gray, image_hash, view_hashes

    index = HashIndex.from_views(np.stack([view_hashes(_gray(png_bytes(a))) for a in test_images]), threshold=255)
    found = index.match(np.stack([image_hash(_gray(it.data)) for it in items]))
    return {items[q].key: d for q, _, _, d in found}


def _report(doc: dict, data, expected: dict, test_images: np.ndarray) -> tuple[float, list[str], list[str]]:
    """Prints recall per variant, the false positives and the nearest non-duplicate; returns (recall, missed,
    false positives)."""
    found = {e["key"]: e for e in doc["excluded"]}
    by_variant: dict[str, list[bool]] = {}
    for key in expected:
        by_variant.setdefault(key.rsplit("-", 1)[0][4:], []).append(key in found)
    negatives = [it for it in data[2] if it.key not in expected]
    false_pos = sorted(k for k in found if k not in expected)
    missed = sorted(k for k in expected if k not in found)
    threshold = doc["hash"]["threshold"]
    print(f"\n[dedup] {HASH_KIND} <= {threshold} bits, {len(doc['hash']['views'])} views per test image; "
          f"test sets of {[a['images'] for a in doc['against']]} images")
    for name, hits in by_variant.items():
        dists = sorted(found[k]["distance"] for k in expected if k in found and k.startswith(f"dup-{name}-"))
        print(f"[dedup]   recall {name:16s} {sum(hits)}/{len(hits)}  distances {dists}")
    recall = (len(expected) - len(missed)) / len(expected)
    print(f"[dedup]   recall {recall:.3f} ({len(expected) - len(missed)}/{len(expected)}), missed {missed}")
    print(f"[dedup]   false positives {len(false_pos)}/{len(negatives)} non-duplicates: "
          f"{[(k, found[k]['test_key'], found[k]['distance']) for k in false_pos]}")
    near = sorted(_nearest(negatives, test_images).items(), key=lambda kv: kv[1])[:3]
    print(f"[dedup]   nearest non-duplicates (bits; threshold {threshold}): {near}")
    return recall, missed, false_pos


@pytest.fixture(scope="module")
def pretrain(data, bucket, storage):
    return _write_pretrain(data, f"s3://{bucket}/planted/train", storage)


@pytest.fixture(scope="module")
def serial_run(pretrain, test_sets, s3_server):
    """`vitpipe shards dedup` against the Fashion-MNIST test set, in this process."""
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["shards", "dedup", pretrain, "--against", test_sets[0], "--endpoint-url", s3_server,
                   "--no-progress"])
    return rc, out.getvalue()


def test_dedup_finds_every_planted_near_duplicate_and_no_other_image(serial_run, pretrain, test_sets, data,
                                                                     storage):
    rc, out = serial_run
    assert rc == 0, out
    url = out.strip().splitlines()[-1]
    assert url == pretrain.rsplit("/", 1)[0] + "/" + EXCLUDE_NAME
    assert "400 samples in 8 shards" in out
    doc = _read_json(url, storage)
    expected = {k: v for k, v in data[3].items() if v[0] == 0}  # the digits' test set was not named
    recall, missed, false_pos = _report(doc, data, expected, data[0])
    assert recall == 1.0 and not missed
    assert false_pos == []
    for e in doc["excluded"]:  # each names the test image it copies, within the threshold
        assert (e["test_set"], e["test_key"]) == expected[e["key"]]
        assert 0 <= e["distance"] <= doc["hash"]["threshold"] and e["view"] in doc["hash"]["views"]
        assert e["shard_url"].startswith("train-") and 0 <= e["index"] < 400
    assert doc["hash"]["kind"] == HASH_KIND and doc["hash"]["bits"] == 256
    assert doc["against"][0]["url"] == test_sets[0] and doc["against"][0]["images"] == N_TEST
    assert doc["scanned"] == {"shards": 8, "samples": 400, "unreadable_images": 0}
    assert doc["num_excluded"] == len(expected)


def test_the_training_loader_skips_excluded_samples_with_equal_steps_per_rank(serial_run, pretrain, data, storage):
    assert serial_run[0] == 0
    excluded = {e["key"] for e in _read_json(pretrain.rsplit("/", 1)[0] + "/" + EXCLUDE_NAME, storage)["excluded"]}
    assert len(excluded) == len(VARIANTS) * N_PLANTED
    everything = {it.key for it in data[2]}
    dc = DataConfig(train=pretrain, num_workers=2, shuffle_buffer=16, seed=1, virtual_readers=8)
    loaders = [build_train_loader(pretrain, dc, Storage(storage), global_batch=8, micro_batch=4, image_size=16, rank=r,
                                  world_size=2) for r in range(2)]
    assert [loader.steps_per_epoch for loader in loaders] == [50, 50]
    batches = []
    for loader in loaders:  # one epoch: each rank's 50 steps of one micro-batch (excluded samples are refilled)
        steps = loader.steps()
        batches.append([b for _ in range(loader.steps_per_epoch) for b in next(steps)])
    keys = [k for run in batches for b in run for k in b["key"]]
    assert not set(keys) & excluded
    assert set(keys) == everything - excluded and len(keys) == 400  # every other sample, the gap filled by repeats
    counters = [loader.counters() for loader in loaders]
    assert sum(c["excluded_samples"] for c in counters) == len(excluded)  # each counted once, on its own rank
    assert all(c["skipped_samples"] == 0 and c["bad_images"] == 0 for c in counters)
    assert loaders[0].state_dict()["exclusions_checksum"] == loaders[0].exclusions.sha256
    print(f"\n[dedup] loader: {len(excluded)} excluded, counters {[c['excluded_samples'] for c in counters]}, "
          f"{len(batches[0])} micro-batches on each rank")


def test_a_missing_test_manifest_is_one_line_naming_it_before_any_scan(pretrain, test_sets, bucket, s3_server,
                                                                      storage, capsys, monkeypatch):
    import pipeline.data.dedup as dedup_module

    def no_scan(*_a, **_k):
        raise AssertionError("a shard was read before every manifest was")

    monkeypatch.setattr(dedup_module, "hash_test_shard", no_scan)
    monkeypatch.setattr(dedup_module, "scan_shard", no_scan)
    missing = f"s3://{bucket}/no-such/test"
    rc = main(["shards", "dedup", pretrain, "--against", test_sets[0], missing, "--endpoint-url", s3_server,
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    print(f"\n[dedup] {err}")
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{missing}/manifest.json" in err and "not found" in err and "test set" in err


def test_dedup_as_ray_tasks_against_two_test_sets_matches_the_serial_scan(fault_ray, data, bucket, storage,
                                                                           test_sets, s3_server, capsys):
    from pipeline.data.dedup import dedup

    url = _write_pretrain(data, f"s3://{bucket}/planted-ray/train", storage)
    assert main(["shards", "dedup", url, "--against", *test_sets, "--ray", "--endpoint-url", s3_server,
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    with_ray = _read_json(out.strip().splitlines()[-1], storage)
    recall, missed, false_pos = _report(with_ray, data, data[3], np.concatenate([data[0], data[1]]))
    assert recall == 1.0 and false_pos == []
    assert {e["key"]: (e["test_set"], e["test_key"]) for e in with_ray["excluded"]} == data[3]
    assert [a["url"] for a in with_ray["against"]] == list(test_sets)
    serial = dedup(url, list(test_sets), storage, progress=False)
    assert serial["url"] == out.strip().splitlines()[-1]
    again = _read_json(serial["url"], storage)
    drop = ("created",)
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in with_ray.items() if k not in drop}
