"""WebDataset tar shards: writing them from a source (sequentially or as Ray tasks) with a manifest written last,
resuming an interrupted write, reading samples back out of a tar stream, and verifying shards against their manifest.

Resuming: while a write is under way, `{dest}/.progress/` holds the plan (what defines the shards) and one record per
finished shard (its size and sha256, written after the shard itself); a rerun keeps the shards whose stored bytes
match their record and writes the others. The records go once the manifest is written.

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
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.data.config import StorageConfig
from pipeline.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, Manifest, load_dataset_spec
from pipeline.data.sources import ArraySource, Source, SourceItem, json_bytes, png_bytes
from pipeline.data.storage import HashingWriter, Storage, digest, get_filesystem, open_url, url_join, write_atomic
from pipeline.data.tar import iter_members

__all__ = ["EncodeOptions", "write_shards", "write_array_shards", "iter_tar_samples", "verify_shards",
           "encode_item", "DEFAULT_SHARD_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 1_000_000_000
PROGRESS_DIR = ".progress"  # {dest}/.progress/: plan.json + one record per finished shard, while a write is under way
PROGRESS_FORMAT = "vitpipe-shards-progress/1"


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


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _record_url(dest: str, shard: str) -> str:
    return url_join(dest, f"{PROGRESS_DIR}/{shard}.json")


def _read_json(url: str, storage: StorageConfig) -> dict[str, Any] | None:
    """The JSON object at `url`, or None when there is none."""
    fs, path = get_filesystem(url, storage)
    try:
        blob = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(blob)
    except ValueError:
        raise ValueError(f"{url} is not valid JSON; delete it (or pass --overwrite) and write again") from None
    return data if isinstance(data, dict) else None


def _write_one_shard(source: Source, start: int, stop: int, dest: str, shard: str, opts: EncodeOptions,
                     storage: StorageConfig, plan_id: str, progress=None) -> dict[str, Any]:
    """Writes source items [start, stop) as the tar shard `{dest}/{shard}` (undecodable items are skipped and
    counted), then its progress record: a shard without a record is incomplete and a resumed write redoes it."""
    import webdataset as wds

    written = skipped = 0
    sink = HashingWriter(open_url(url_join(dest, shard), "wb", storage))
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
    info = {"url": shard, "samples": written, "bytes": sink.bytes, "sha256": sink.digest()["sha256"],
            "skipped": skipped}
    # Only after close(): on S3 that is when the object exists (object stores have no rename to commit with).
    write_atomic(_record_url(dest, shard), json.dumps({**info, "start": start, "stop": stop, "plan": plan_id}).encode(),
                storage)
    return info


def _write_shard_range(source: Source, shard_ids: list[int], bounds: list[tuple[int, int]], dest: str, prefix: str,
                       opts: EncodeOptions, storage: StorageConfig, plan_id: str) -> list[dict[str, Any]]:
    return [_write_one_shard(source, a, b, dest, _shard_name(prefix, s), opts, storage, plan_id)
            for s, (a, b) in zip(shard_ids, bounds)]


def _check_shard(dest: str, record: dict[str, Any], storage: StorageConfig) -> str | None:
    """None when the stored shard is the one its progress record describes (size, then sha256 of its bytes), else
    what is wrong with it."""
    url = url_join(dest, record["url"])
    fs, path = get_filesystem(url, storage)
    try:
        stored = {"size": fs.size(path), "sha256": None}
        if stored["size"] == record["bytes"]:
            stored = digest(url, storage)
    except FileNotFoundError:
        return f"{url}: missing"
    except Exception as e:
        return f"{url}: unreadable ({type(e).__name__}: {e})"
    if stored["size"] != record["bytes"]:
        return f"{url}: {stored['size']} bytes, recorded {record['bytes']}"
    if stored["sha256"] != record["sha256"]:
        return f"{url}: sha256 {stored['sha256'][:12]}..., recorded {record['sha256'][:12]}..."
    return None


def _check_shards(dest: str, records: list[dict[str, Any]], storage: StorageConfig) -> list[str | None]:
    return [_check_shard(dest, r, storage) for r in records]


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
    write_atomic(url, json.dumps(manifest, indent=1).encode(), storage)
    return url


# What defines the shards' content (and the manifest's), with the option that sets each: a resumed write must agree
# on all of them with the interrupted one, and a complete dataset's manifest records them under "writer".
_PLAN_OPTIONS = {
    "source": "SOURCE", "source_items": "SOURCE (item count)", "label_type": "SOURCE (label type)",
    "class_names": "--class-names", "samples_per_shard": "--samples-per-shard",
    "shard_bytes": "--shard-bytes (the derived samples per shard)",
    "encode": "--max-side/--quality/--reencode/--raw-format",
    "prefix": "--prefix", "name": "--name", "split": "--split",
}


def _plan_of_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    w = raw.get("writer") or {}
    return {"source": w.get("source"), "source_items": w.get("source_items"), "label_type": raw.get("label_type"),
            "class_names": raw.get("class_names"), "samples_per_shard": w.get("samples_per_shard"),
            "shard_bytes": w.get("shard_bytes"), "encode": w.get("encode"), "prefix": w.get("prefix"),
            "name": raw.get("name"), "split": raw.get("split")}


def _plan_mismatch(recorded: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    def show(v: Any) -> str:
        text = "(not given)" if v is None else json.dumps(v, sort_keys=True)
        return text if len(text) <= 100 else text[:97] + "..."

    return [f"{_PLAN_OPTIONS[k]}: recorded {show(recorded.get(k))}, now {show(v)}"
            for k, v in plan.items() if recorded.get(k) != v]


def _discard_progress(dest: str, storage: StorageConfig) -> None:
    fs, path = get_filesystem(url_join(dest, PROGRESS_DIR), storage)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # left over it is harmless: a rerun finds the manifest and does nothing
        log.warning("could not remove the progress records %s: %s: %s", url_join(dest, PROGRESS_DIR),
                    type(e).__name__, e)


def _read_records(dest: str, storage: StorageConfig, plan_id: str,
                  bounds: list[tuple[int, int]], prefix: str) -> dict[int, dict[str, Any]]:
    """shard index -> its progress record, for the records of this plan (others are ignored: the shard is redone)."""
    fs, path = get_filesystem(url_join(dest, PROGRESS_DIR), storage)
    fs.invalidate_cache()
    try:
        found = [p for p in fs.find(path) if p.endswith(".tar.json")]
    except FileNotFoundError:
        found = []
    if not found:
        return {}
    index = {_shard_name(prefix, s): s for s in range(len(bounds))}
    records = {}
    for p, blob in fs.cat(found, on_error="omit").items():
        try:
            r = json.loads(blob)
            s = index.get(r["url"])
            if s is not None and r["plan"] == plan_id and (r["start"], r["stop"]) == bounds[s]:
                records[s] = r
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable progress record %s", p)
    return records


def _settle_plan(source: Source, dest: str, *, name: str, split: str, prefix: str, samples_per_shard: int | None,
                 shard_bytes: int, encode: EncodeOptions, storage: StorageConfig,
                 overwrite: bool) -> dict[str, Any] | None:
    """The plan of this write (what defines its shards), checked against what `dest` already holds: None when that
    is a complete dataset of the same plan (nothing to do); ValueError, before anything is written, when it is a
    dataset or an interrupted write of another plan. A fresh plan is recorded as `.progress/plan.json`."""
    manifest_url, plan_url = url_join(dest, MANIFEST_NAME), url_join(dest, f"{PROGRESS_DIR}/plan.json")
    if overwrite:
        fs, path = get_filesystem(manifest_url, storage)
        if fs.exists(path):  # first: a manifest must never describe shards that are being replaced
            fs.rm_file(path)
        _discard_progress(dest, storage)
    existing = _read_json(manifest_url, storage)
    recorded = _read_json(plan_url, storage)
    if recorded is not None:
        recorded.pop("format", None)
    earlier = _plan_of_manifest(existing) if existing is not None else recorded
    if samples_per_shard is not None:
        spc, sized_by = samples_per_shard, None
    elif earlier is not None and earlier.get("shard_bytes") == shard_bytes and earlier.get("samples_per_shard"):
        spc, sized_by = int(earlier["samples_per_shard"]), shard_bytes  # the earlier probe's answer: same bounds
    else:
        spc, sized_by = _estimate_samples_per_shard(source, encode, shard_bytes), shard_bytes
    plan = json.loads(json.dumps({  # as it reads back from JSON, to compare with a recorded one
        "source": source.describe(), "source_items": len(source), "label_type": source.label_type,
        "class_names": source.class_names, "samples_per_shard": spc, "shard_bytes": sized_by,
        "encode": asdict(encode), "prefix": prefix, "name": name, "split": split}))
    if existing is not None:
        diff = _plan_mismatch(earlier, plan)
        if diff:
            raise ValueError(f"{manifest_url} already describes a dataset written with other arguments ("
                             + "; ".join(diff) + "). Write to another folder, or pass --overwrite to replace it")
        log.info("%s is complete and was written with these arguments: nothing to do (`vitpipe shards verify` "
                 "re-checks its shards)", manifest_url)
        _discard_progress(dest, storage)  # left over if the writer stopped right after the manifest
        return None
    if recorded is None:
        write_atomic(plan_url, json.dumps({"format": PROGRESS_FORMAT, **plan}, indent=1).encode(), storage)
        return plan
    diff = _plan_mismatch(recorded, plan)
    if diff:
        raise ValueError(f"{dest} holds an interrupted write with other arguments (" + "; ".join(diff)
                         + "). Re-run with the recorded arguments to resume it, or pass --overwrite to discard it and "
                         f"start over (or delete {dest})")
    return plan


def write_shards(source: Source, dest: str, *, name: str = "dataset", split: str = "train", prefix: str | None = None,
                 samples_per_shard: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 encode: EncodeOptions | None = None, storage: StorageConfig | None = None, use_ray: bool = False,
                 ray_tasks: int | None = None, progress: bool = True, overwrite: bool = False) -> str:
    """Writes `source` as tar shards `{dest}/{prefix}-NNNNNN.tar` plus `{dest}/manifest.json` (last, atomically).

    Shard size is by sample count, or by bytes (`shard_bytes`, default ~1 GB: the count is derived from the mean
    encoded size of a probe of 32 items, so shards come out near, not exactly at, that size). With `use_ray`, groups
    of shards are written by Ray tasks (the caller's Ray cluster; ray.init() if none). Returns the manifest URL.

    Resumable: each finished shard leaves a record (size, sha256) under `{dest}/.progress/`, next to the run's plan.
    Called again after a crash with the same arguments, it keeps the recorded shards whose stored bytes still match,
    writes the rest, then the manifest, and removes `.progress/`. Different arguments are refused before anything
    is written, as is a complete dataset written with different arguments (a matching one is left as it is);
    `overwrite=True` discards both and starts over.
    """
    storage = storage or StorageConfig()
    encode = encode or EncodeOptions()
    prefix = prefix or split
    n = len(source)
    if n == 0:
        raise ValueError(f"source {source.describe()} has no samples")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    plan = _settle_plan(source, dest, name=name, split=split, prefix=prefix, samples_per_shard=samples_per_shard,
                        shard_bytes=shard_bytes, encode=encode, storage=storage, overwrite=overwrite)
    if plan is None:
        return url_join(dest, MANIFEST_NAME)
    spc = plan["samples_per_shard"]
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]

    num_shards = math.ceil(n / spc)
    bounds = [(s * spc, min(n, (s + 1) * spc)) for s in range(num_shards)]
    records = _read_records(dest, storage, plan_id, bounds, prefix)
    shards = _verify_recorded(records, dest, storage, use_ray, ray_tasks, progress)
    reused = len(shards)
    todo = [s for s in range(num_shards) if s not in shards]
    if records:
        log.info("resuming %s: %d recorded shards verified and kept, %d rewritten (damaged), %d to write", dest,
                 reused, len(records) - reused, len(todo))
    todo_samples = sum(bounds[s][1] - bounds[s][0] for s in todo)
    log.info("writing %d samples as %d shards of <= %d samples to %s", todo_samples, len(todo), spc, dest)

    from tqdm.auto import tqdm

    if use_ray and todo:
        shards.update(_write_with_ray(source, todo, bounds, dest, prefix, encode, storage, plan_id, ray_tasks,
                                      progress))
    elif todo:
        with tqdm(total=todo_samples, unit="img", desc=f"shards -> {dest}", disable=not progress) as bar:
            for s in todo:
                a, b = bounds[s]
                shards[s] = _write_one_shard(source, a, b, dest, _shard_name(prefix, s), encode, storage, plan_id,
                                             bar)
    infos = [{k: shards[s][k] for k in ("url", "samples", "bytes", "sha256")} for s in range(num_shards)]
    manifest = {
        "format": MANIFEST_FORMAT, "name": name, "split": split,
        "num_samples": sum(s["samples"] for s in infos), "num_shards": num_shards,
        "num_classes": len(source.class_names) if source.class_names is not None else None,
        "class_names": source.class_names, "label_type": source.label_type,
        "shards": infos, "skipped_source_items": sum(shards[s]["skipped"] for s in range(num_shards)),
        "writer": {**{k: plan[k] for k in ("source", "source_items", "samples_per_shard", "shard_bytes", "encode",
                                           "prefix")}, "ray": use_ray},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    url = write_manifest(dest, manifest, storage)
    log.info("%s: %d shards reused, %d written", url, reused, len(todo))
    _discard_progress(dest, storage)
    return url


def _verify_recorded(records: dict[int, dict[str, Any]], dest: str, storage: StorageConfig, use_ray: bool,
                     ray_tasks: int | None, progress: bool) -> dict[int, dict[str, Any]]:
    """The recorded shards whose stored bytes match their record (re-read in full: a shard cut short or altered
    since is redone). Checked by Ray tasks with `use_ray` (the bytes are read where they are cheapest to read)."""
    if not records:
        return {}
    ids = sorted(records)
    if use_ray:
        problems = _ray_map(_check_shards, ids, lambda g: (dest, [records[s] for s in g], storage), ray_tasks,
                            f"verify {dest} (ray)", progress)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound: a few streams at once hide the latency
            problems = dict(zip(ids, pool.map(lambda s: _check_shard(dest, records[s], storage), ids)))
    for s in ids:
        if problems[s] is not None:
            log.warning("recorded shard will be rewritten: %s", problems[s])
    return {s: records[s] for s in ids if problems[s] is None}


def _ray():
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before `import ray`: stay on 127.0.0.1
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    return ray


def _ray_map(fn, ids: list[int], task_args, ray_tasks: int | None, desc: str, progress: bool) -> dict[int, Any]:
    """Runs `fn(*task_args(group))` as one Ray task per group of `ids` (strided: even shares); each returns one
    result per id of its group. Returns id -> result."""
    ray = _ray()
    from tqdm.auto import tqdm

    tasks = ray_tasks or max(1, min(len(ids), int(ray.available_resources().get("CPU", 1)) * 2))
    remote = ray.remote(fn)
    pending = {remote.remote(*task_args(g)): g for g in (ids[k::tasks] for k in range(tasks)) if g}
    results: dict[int, Any] = {}
    with tqdm(total=len(ids), unit="shard", desc=desc, disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                for s, result in zip(pending.pop(ref), ray.get(ref)):
                    results[s] = result
                    bar.update(1)
    return results


def _write_with_ray(source, todo, bounds, dest, prefix, encode, storage, plan_id, ray_tasks,
                    progress) -> dict[int, dict[str, Any]]:
    source_ref = _ray().put(source)
    return _ray_map(_write_shard_range, todo,
                    lambda g: (source_ref, g, [bounds[s] for s in g], dest, prefix, encode, storage, plan_id),
                    ray_tasks, f"shards -> {dest} (ray)", progress)


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
    sharing a key form a sample). The first `skip` samples are passed over without keeping their data; at most
    `take` samples are yielded. A truncated or corrupt tar raises tarfile.TarError (or EOFError/OSError)."""
    if take is not None and take <= 0:
        return
    state = {"key": None, "index": -1}

    def wanted(name: str) -> bool:
        parts = _member_key(name)
        if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
            return False
        if parts[0] != state["key"]:
            state["key"], state["index"] = parts[0], state["index"] + 1
        return state["index"] >= skip

    yielded = 0
    current: dict[str, Any] | None = None
    for name, body in iter_members(fileobj, wanted):
        if body is None:
            continue
        key, ext = _member_key(name)
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
                yielded += 1
                if take is not None and yielded >= take:
                    return
            current = {"__key__": key}
        current[ext.lower()] = body
    if current is not None:
        yield current


def verify_shards(manifest_or_url: Manifest | str, storage: StorageConfig | None = None,
                  count_samples: bool = True) -> list[str]:
    """Checks every shard's bytes and sha256 (and sample count) against the manifest; returns the problems found."""
    storage = storage or StorageConfig()
    m = manifest_or_url if isinstance(manifest_or_url, Manifest) else load_dataset_spec(manifest_or_url,
                                                                                        Storage(storage))
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
