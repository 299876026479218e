"""WebDataset tar shards: writing them from a source (sequentially or as Ray tasks) with a manifest written last,
reading samples back out of a tar stream, and verifying shards against their manifest.

Layout of one sample (WebDataset convention): `KEY.jpg|png|...` (the image: original bytes passed through, or
re-encoded as JPEG when `max_side`/`reencode` ask for it; raw uint8 pixels such as IDX digits become lossless PNG),
`KEY.cls` (single label, decimal text) or `KEY.labels.json` (multi-label list of ints), `KEY.json` (metadata).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import math
import os
import tarfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.data.config import StorageConfig
from pipeline.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, Manifest, load_dataset_spec
from pipeline.data.sources import ArraySource, Source, SourceItem, json_bytes, png_bytes
from pipeline.data.storage import get_filesystem, open_url, url_join

__all__ = ["EncodeOptions", "write_shards", "write_array_shards", "iter_tar_samples", "verify_shards",
           "encode_item", "DEFAULT_SHARD_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 1_000_000_000


@dataclass
class EncodeOptions:
    """How images are stored: passed through unless `reencode` or the image is larger than `max_side`."""

    max_side: int | None = None
    quality: int = 90
    reencode: bool = False
    raw_format: str = "png"  # for raw pixels (IDX, arrays): "png" (lossless) or "jpg"

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.raw_format not in ("png", "jpg"):
            raise ValueError(f"raw_format must be 'png' or 'jpg', got {self.raw_format!r}")


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_item(item: SourceItem, opts: EncodeOptions) -> tuple[bytes, str, dict[str, Any]]:
    """Returns (image bytes, extension, extra metadata) for one source item."""
    from PIL import Image

    if item.pixels is not None:
        if opts.raw_format == "png":
            return png_bytes(item.pixels), "png", {}
        arr = item.pixels[..., 0] if item.pixels.ndim == 3 and item.pixels.shape[2] == 1 else item.pixels
        return _jpeg(Image.fromarray(arr), opts.quality), "jpg", {}
    assert item.data is not None
    if not opts.reencode and opts.max_side is None:
        return item.data, item.ext, {}
    img = Image.open(io.BytesIO(item.data))
    img.load()
    too_big = opts.max_side is not None and max(img.size) > opts.max_side
    if not (too_big or opts.reencode):
        return item.data, item.ext, {"width": img.width, "height": img.height}
    img = img.convert("L" if img.mode in ("L", "1", "I;16") else "RGB")
    if too_big:
        img.thumbnail((opts.max_side, opts.max_side), Image.Resampling.BICUBIC)
    return _jpeg(img, opts.quality), "jpg", {"width": img.width, "height": img.height}


def _sample_dict(item: SourceItem, opts: EncodeOptions, label_type: str) -> dict[str, Any]:
    data, ext, extra = encode_item(item, opts)
    sample: dict[str, Any] = {"__key__": item.key, ext: data, "json": json_bytes({**item.meta, **extra})}
    if label_type == "multi":
        sample["labels.json"] = json_bytes(sorted(set(int(x) for x in item.label or [])))
    else:
        sample["cls"] = str(int(item.label)).encode()
    return sample


class _HashingWriter:
    """Passes bytes through to the destination stream while counting and hashing them (no local copy)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _write_one_shard(source: Source, start: int, stop: int, url: str, opts: EncodeOptions,
                     storage: StorageConfig, progress=None) -> dict[str, Any]:
    """Writes source items [start, stop) as one tar shard at `url`; undecodable items are skipped and counted."""
    import webdataset as wds

    written = skipped = 0
    sink = _HashingWriter(open_url(url, "wb", storage))
    try:
        with wds.TarWriter(sink, encoder=False, mtime=0) as tw:
            for i in range(start, stop):
                try:
                    sample = _sample_dict(source.item(i), opts, source.label_type)
                except Exception as e:  # one bad image must not stop a multi-hour conversion
                    skipped += 1
                    log.warning("skipping source item %d: %s: %s", i, type(e).__name__, e)
                    continue
                tw.write(sample)
                written += 1
                if progress is not None:
                    progress.update(1)
    finally:
        sink.close()
    return {"url": url.rsplit("/", 1)[-1], "samples": written, "bytes": sink.bytes, "sha256": sink.sha.hexdigest(),
            "skipped": skipped}


def _write_shard_range(source: Source, shard_ids: list[int], bounds: list[tuple[int, int]], dest: str, prefix: str,
                       opts: EncodeOptions, storage: StorageConfig) -> list[dict[str, Any]]:
    return [_write_one_shard(source, a, b, url_join(dest, _shard_name(prefix, s)), opts, storage)
            for s, (a, b) in zip(shard_ids, bounds)]


def _tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")


def _estimate_samples_per_shard(source: Source, opts: EncodeOptions, shard_bytes: int, probe: int = 32) -> int:
    n = min(len(source), probe)
    idx = np.linspace(0, len(source) - 1, n).astype(int) if n else []
    sizes = []
    for i in idx:
        try:
            sizes.append(_tar_bytes(_sample_dict(source.item(int(i)), opts, source.label_type)))
        except Exception:
            continue
    mean = float(np.mean(sizes)) if sizes else 100_000.0
    return max(1, int(shard_bytes // mean))


def write_manifest(dest: str, manifest: dict[str, Any], storage: StorageConfig) -> str:
    """Writes manifest.json atomically: one PUT on object stores, write-then-rename on local disks."""
    url = url_join(dest, MANIFEST_NAME)
    blob = json.dumps(manifest, indent=1).encode()
    fs, path = get_filesystem(url, storage)
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = path + ".tmp"
        fs.pipe_file(tmp, blob)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, blob)
    return url


def write_shards(source: Source, dest: str, *, name: str = "dataset", split: str = "train", prefix: str | None = None,
                 samples_per_shard: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 encode: EncodeOptions | None = None, storage: StorageConfig | None = None, use_ray: bool = False,
                 ray_tasks: int | None = None, progress: bool = True) -> str:
    """Writes `source` as tar shards `{dest}/{prefix}-NNNNNN.tar` plus `{dest}/manifest.json` (last, atomically).

    Shard size is by sample count, or by bytes (`shard_bytes`, default ~1 GB: the count is derived from the mean
    encoded size of a probe of 32 items, so shards come out near, not exactly at, that size). With `use_ray`, groups
    of shards are written by Ray tasks (the caller's Ray cluster; ray.init() if none). Returns the manifest URL.
    """
    storage = storage or StorageConfig()
    encode = encode or EncodeOptions()
    prefix = prefix or split
    n = len(source)
    if n == 0:
        raise ValueError(f"source {source.describe()} has no samples")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    spc = samples_per_shard or _estimate_samples_per_shard(source, encode, shard_bytes)
    num_shards = math.ceil(n / spc)
    bounds = [(s * spc, min(n, (s + 1) * spc)) for s in range(num_shards)]
    log.info("writing %d samples as %d shards of <= %d samples to %s", n, num_shards, spc, dest)

    from tqdm.auto import tqdm

    if use_ray:
        shards = _write_with_ray(source, bounds, dest, prefix, encode, storage, ray_tasks, progress)
    else:
        shards = []
        with tqdm(total=n, unit="img", desc=f"shards -> {dest}", disable=not progress) as bar:
            for s, (a, b) in enumerate(bounds):
                shards.append(_write_one_shard(source, a, b, url_join(dest, _shard_name(prefix, s)), encode, storage,
                                               bar))
    skipped = sum(s.pop("skipped") for s in shards)
    manifest = {
        "format": MANIFEST_FORMAT, "name": name, "split": split,
        "num_samples": sum(s["samples"] for s in shards), "num_shards": len(shards),
        "num_classes": len(source.class_names) if source.class_names is not None else None,
        "class_names": source.class_names, "label_type": source.label_type,
        "shards": shards, "skipped_source_items": skipped,
        "writer": {"source": source.describe(), "samples_per_shard": spc, "shard_bytes": shard_bytes,
                   "encode": asdict(encode), "prefix": prefix, "ray": use_ray},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return write_manifest(dest, manifest, storage)


def _write_with_ray(source, bounds, dest, prefix, encode, storage, ray_tasks, progress) -> list[dict[str, Any]]:
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before `import ray`: stay on 127.0.0.1
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    tasks = ray_tasks or max(1, min(len(bounds), int(ray.available_resources().get("CPU", 1)) * 2))
    groups = [list(range(len(bounds)))[g::tasks] for g in range(tasks)]
    groups = [g for g in groups if g]
    remote = ray.remote(_write_shard_range)
    source_ref = ray.put(source)
    pending = {remote.remote(source_ref, g, [bounds[s] for s in g], dest, prefix, encode, storage): g for g in groups}
    results: dict[int, dict[str, Any]] = {}
    with tqdm(total=len(bounds), unit="shard", desc=f"shards -> {dest} (ray)", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                for s, info in zip(pending.pop(ref), ray.get(ref)):
                    results[s] = info
                    bar.update(1)
    return [results[s] for s in range(len(bounds))]


def write_array_shards(images: np.ndarray, labels: Any, dest_url: str, *, name: str = "arrays", split: str = "train",
                       class_names: list[str] | None = None, samples_per_shard: int = 1000,
                       storage: StorageConfig | None = None, image_format: str = "png",
                       label_type: str | None = None, progress: bool = False) -> str:
    """uint8 arrays [N,H,W] / [N,H,W,C] + labels -> shards + manifest under `dest_url`. Returns the manifest URL."""
    source = ArraySource(images, labels, class_names, label_type)
    return write_shards(source, dest_url, name=name, split=split, samples_per_shard=samples_per_shard,
                        encode=EncodeOptions(raw_format=image_format), storage=storage, progress=progress)


def _member_key(name: str) -> tuple[str, str] | None:
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1:]


def iter_tar_samples(fileobj, *, skip: int = 0, take: int | None = None) -> Iterator[dict[str, Any]]:
    """Yields samples `{"__key__": KEY, EXT: bytes, ...}` from a tar stream in WebDataset layout (consecutive members
    sharing a key form a sample). The first `skip` samples are passed over without extracting their data; at most
    `take` samples are yielded. A truncated or corrupt tar raises tarfile.TarError (or EOFError/OSError)."""
    if take is not None and take <= 0:
        return
    seen = yielded = 0
    current: dict[str, Any] | None = None
    current_idx = -1
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            parts = _member_key(member.name)
            if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
                continue
            key, ext = parts
            if current is None or current["__key__"] != key:
                if current is not None and current_idx >= skip:
                    yield current
                    yielded += 1
                    if take is not None and yielded >= take:
                        return
                current = {"__key__": key}
                current_idx = seen
                seen += 1
            if current_idx >= skip:
                f = tar.extractfile(member)
                current[ext.lower()] = f.read() if f is not None else b""
            tar.members = []  # stream mode: keep memory flat
    if current is not None and current_idx >= skip:
        yield current


def verify_shards(manifest_or_url: Manifest | str, storage: StorageConfig | None = None,
                  count_samples: bool = True) -> list[str]:
    """Checks every shard's bytes and sha256 (and sample count) against the manifest; returns the problems found."""
    storage = storage or StorageConfig()
    m = manifest_or_url if isinstance(manifest_or_url, Manifest) else load_dataset_spec(manifest_or_url, storage)
    problems = []
    for i, url in enumerate(m.shards):
        sha, size = hashlib.sha256(), 0
        try:
            with open_url(url, "rb", storage) as f:
                tee = _TeeReader(f, sha)
                n = sum(1 for _ in iter_tar_samples(tee)) if count_samples else 0
                while tee.read(1 << 20):
                    pass
                size = tee.bytes
        except Exception as e:
            problems.append(f"{url}: unreadable ({type(e).__name__}: {e})")
            continue
        if m.shard_bytes and size != m.shard_bytes[i]:
            problems.append(f"{url}: {size} bytes, manifest says {m.shard_bytes[i]}")
        if m.shard_sha256 and sha.hexdigest() != m.shard_sha256[i]:
            problems.append(f"{url}: sha256 {sha.hexdigest()[:12]}..., manifest says {m.shard_sha256[i][:12]}...")
        if count_samples and m.exact_counts and n != m.samples_per_shard[i]:
            problems.append(f"{url}: {n} samples, manifest says {m.samples_per_shard[i]}")
    return problems


class _TeeReader(io.RawIOBase):
    def __init__(self, f, sha):
        self.f, self.sha, self.bytes = f, sha, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.sha.update(data)
        self.bytes += len(data)
        return len(data)
