"""Shard writing and reading on local disk: sources, encodings, the tar layout, manifest, verification."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.config import AugmentConfig
from pipeline.data.manifest import load_dataset_spec
from pipeline.data.samples import EncodeOptions, iter_tar_samples
from pipeline.data.sources import ArraySource, ImageFolderSource, open_source, read_idx
from pipeline.data.transforms import build_transform, decode_image, normalize
from pipeline.data.verify import verify_shards
from pipeline.data.writer import write_array_shards, write_shards


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (np.linspace(0, 255, w * h * 3).reshape(h, w, 3) + rng.integers(0, 30, (h, w, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_plain_tarfile_shards_in_webdataset_layout_are_read(tmp_path):
    path = tmp_path / "plain-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(5):
            for ext, data in (("jpg", _jpeg(8, 8, i)), ("cls", str(i).encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"dir/sample{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("__meta__.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f))
    assert [s["__key__"] for s in samples] == [f"dir/sample{i}" for i in range(5)]
    assert set(samples[0]) == {"__key__", "jpg", "cls", "json"}
    with open(path, "rb") as f:
        part = list(iter_tar_samples(f, skip=2, take=2))
    assert [s["cls"] for s in part] == [b"2", b"3"]


def test_array_shards_manifest_and_verify(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (23, 12, 12), dtype=np.uint8)
    url = write_array_shards(images, np.arange(23) % 4, str(tmp_path / "ds"), name="toy", split="val",
                             class_names=list("abcd"), samples_per_shard=10)
    m = load_dataset_spec(url)
    assert m.samples_per_shard == [10, 10, 3] and m.class_names == list("abcd") and m.split == "val"
    raw = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert raw["shards"][0]["url"] == "val-000000.tar"  # relative: the dataset folder can move
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in raw["shards"])
    with open(m.shards[0], "rb") as f:
        first = next(iter_tar_samples(f))
    decoded = np.asarray(Image.open(io.BytesIO(first["png"])))
    assert np.array_equal(decoded, images[0]) and first["cls"] == b"0"  # grayscale stored losslessly as PNG
    assert json.loads(first["json"])["class_name"] == "a"
    assert verify_shards(url) == []
    shard = tmp_path / "ds" / "val-000001.tar"
    blob = bytearray(shard.read_bytes())
    blob[2000] ^= 0xFF
    shard.write_bytes(bytes(blob))
    problems = verify_shards(url)
    assert len(problems) == 1 and "val-000001.tar: sha256" in problems[0]


def test_image_folder_reencode_and_shard_bytes(tmp_path):
    root = tmp_path / "imgs"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            (root / name / f"img.{i}.jpeg").write_bytes(_jpeg(120, 80, 10 * c + i))
    (root / "dog" / "notes.txt").write_text("not an image")
    source = ImageFolderSource(str(root))
    assert source.class_names == ["cat", "dog"] and len(source) == 12
    url = write_shards(source, str(tmp_path / "out"), name="pets", encode=EncodeOptions(max_side=64, quality=80),
                       shard_bytes=20_000, progress=False)
    m = load_dataset_spec(url)
    assert m.num_samples == 12 and m.num_shards > 1
    with open(m.shards[0], "rb") as f:
        s = next(iter_tar_samples(f))
    assert "." not in s["__key__"] and max(Image.open(io.BytesIO(s["jpg"])).size) == 64
    assert json.loads(s["json"])["source"].startswith("cat/")
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderSource(str(root / "cat"))


def _idx(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def test_idx_source_and_table_sources(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    (tmp_path / "imgs-idx3-ubyte.gz").write_bytes(_idx(images))
    (tmp_path / "labels-idx1-ubyte.gz").write_bytes(_idx(np.arange(7) % 3))
    assert np.array_equal(read_idx(str(tmp_path / "imgs-idx3-ubyte.gz")), images)
    src = open_source(str(tmp_path / "imgs-idx3-ubyte.gz"), labels=str(tmp_path / "labels-idx1-ubyte.gz"))
    assert src.kind == "idx" and len(src) == 7 and src.class_names == ["0", "1", "2"]
    (tmp_path / "trunc-idx3-ubyte").write_bytes(gzip.decompress(_idx(images))[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "trunc-idx3-ubyte"))

    for i in range(3):
        (tmp_path / f"p{i}.jpg").write_bytes(_jpeg(16, 16, i))
    (tmp_path / "multi.csv").write_text("path,labels\np0.jpg,cat;dog\np1.jpg,dog\np2.jpg,\n")
    multi = open_source(str(tmp_path / "multi.csv"))
    assert multi.label_type == "multi" and multi.class_names == ["cat", "dog"]
    assert [multi.item(i).label for i in range(3)] == [[0, 1], [1], []]
    (tmp_path / "single.jsonl").write_text("".join(json.dumps({"path": f"p{i}.jpg", "label": i}) + "\n"
                                                   for i in range(3)))
    single = open_source(str(tmp_path / "single.jsonl"))
    assert single.label_type == "single" and single.item(2).label == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [str(tmp_path / "p0.jpg")], "label": ["bird"]}), tmp_path / "t.parquet")
    assert open_source(str(tmp_path / "t.parquet")).class_names == ["bird"]
    url = write_shards(multi, str(tmp_path / "mds"), samples_per_shard=2, progress=False)
    with open(load_dataset_spec(url).shards[0], "rb") as f:
        assert json.loads(next(iter_tar_samples(f))["labels.json"]) == [0, 1]
    (tmp_path / "bad.csv").write_text("file_name,label\na.jpg,1\n")
    with pytest.raises(ValueError, match="needs a 'path'"):
        open_source(str(tmp_path / "bad.csv"))


def test_decode_and_transforms():
    gray = io.BytesIO()
    Image.fromarray(np.full((10, 14), 200, np.uint8)).save(gray, format="PNG")
    img = decode_image(gray.getvalue(), in_chans=3)
    assert img.shape == (3, 10, 14) and img.dtype == torch.uint8 and int(img[1, 0, 0]) == 200
    assert decode_image(gray.getvalue(), in_chans=1).shape == (1, 10, 14)
    with pytest.raises(Exception):
        decode_image(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    rgb = decode_image(_jpeg(50, 40))
    assert build_transform(24, train=True)(rgb).shape == (3, 24, 24)
    assert build_transform(24, train=False)(rgb).shape == (3, 24, 24)
    batch = torch.stack([torch.zeros(3, 4, 4, dtype=torch.uint8), torch.full((3, 4, 4), 255, dtype=torch.uint8)])
    x = normalize(batch)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    y = normalize(batch, AugmentConfig(normalize="imagenet"))
    assert torch.allclose(y[0, 0], torch.full((4, 4), -0.485 / 0.229))
    with pytest.raises(ValueError):
        AugmentConfig(scale=(0.5, 0.1))


class _Interrupted(ArraySource):
    """The same items as ArraySource, but the writer is stopped (as by Ctrl-C) when it reaches item `stop_at`."""

    def __init__(self, *args, stop_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at

    def item(self, i: int):
        if i == self.stop_at:
            raise KeyboardInterrupt
        return super().item(i)


def _content(url: str) -> dict:
    raw = json.loads(open(url).read())
    raw.pop("created")
    return raw


def test_interrupted_write_resumes_keeping_intact_shards_and_redoing_damaged_ones(tmp_path, caplog):
    images = np.random.default_rng(0).integers(0, 256, (23, 12, 12), dtype=np.uint8)
    labels = np.arange(23) % 4
    reference = write_array_shards(images, labels, str(tmp_path / "ref"), samples_per_shard=4)
    dest = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        write_shards(_Interrupted(images, labels, stop_at=14), str(dest), name="arrays", samples_per_shard=4,
                     encode=EncodeOptions(raw_format="png"), progress=False)
    assert not (dest / "manifest.json").exists()
    records = sorted(p.name for p in (dest / ".progress").iterdir())
    assert records == ["plan.json", "train-000000.tar.json", "train-000001.tar.json", "train-000002.tar.json"]
    assert (dest / "train-000003.tar").exists()  # the shard being written when stopped: no record, so redone
    kept = {n: (dest / n).stat().st_mtime_ns for n in ("train-000000.tar", "train-000001.tar")}
    damaged = dest / "train-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024])  # cut short after its record was written

    with pytest.raises(ValueError, match=r"interrupted write with other arguments \(--samples-per-shard: "
                                         r"recorded 4, now 5\).*--overwrite"):
        write_shards(ArraySource(images, labels), str(dest), name="arrays", samples_per_shard=5, progress=False)
    assert sorted(p.name for p in (dest / ".progress").iterdir()) == records  # refused before writing anything

    with caplog.at_level("INFO", logger="pipeline.data"):
        url = write_shards(ArraySource(images, labels), str(dest), name="arrays", samples_per_shard=4,
                           progress=False)
    assert "2 recorded shards verified and kept, 1 rewritten (damaged), 4 to write" in caplog.text
    assert "train-000002.tar: " in caplog.text and "2 shards reused, 4 written" in caplog.text
    assert {n: (dest / n).stat().st_mtime_ns for n in kept} == kept
    assert _content(url) == _content(reference)
    assert not (dest / ".progress").exists() and verify_shards(url) == []


def test_complete_dataset_is_left_alone_or_refused_or_overwritten(tmp_path, monkeypatch, caplog):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            (root / c / f"{i}.jpg").write_bytes(_jpeg(40, 30, i))
    source = ImageFolderSource(str(root))
    url = write_shards(source, str(tmp_path / "out"), shard_bytes=9_000, progress=False)
    manifest = tmp_path / "out" / "manifest.json"
    before = manifest.stat().st_mtime_ns

    import pipeline.data.resume as resume

    def no_probe(*_a, **_k):
        raise AssertionError("the samples per shard of the earlier write must be reused, not probed again")

    monkeypatch.setattr(resume, "_estimate_samples_per_shard", no_probe)
    with caplog.at_level("INFO", logger="pipeline.data"):
        assert write_shards(source, str(tmp_path / "out"), shard_bytes=9_000, progress=False) == url
    assert "nothing to do" in caplog.text and manifest.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match=r"already describes a dataset written with other arguments "
                                         r"\(--max-side/--quality/--reencode/--raw-format: .*--overwrite"):
        write_shards(source, str(tmp_path / "out"), shard_bytes=9_000, encode=EncodeOptions(quality=50),
                     progress=False)
    monkeypatch.undo()
    url = write_shards(source, str(tmp_path / "out"), samples_per_shard=3, overwrite=True, progress=False)
    assert load_dataset_spec(url).samples_per_shard == [3, 3, 3, 1] and verify_shards(url) == []
