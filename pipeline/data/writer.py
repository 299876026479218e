"""Writing a source as WebDataset tar shards plus their manifest (written last, atomically), resuming an interrupted
write (pipeline.data.resume), one shard after another here or as the calls of a fan-out `map` (pipeline.data.maps).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.data.config import StorageConfig
from pipeline.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from pipeline.data.maps import Map
from pipeline.data.resume import discard_progress, read_records, settle_plan, verify_recorded, write_record
from pipeline.data.samples import EncodeOptions, sample_dict
from pipeline.data.sources import ArraySource, Source
from pipeline.data.storage import HashingWriter, open_url, url_join, write_atomic

__all__ = ["DEFAULT_SHARD_BYTES", "write_shards", "write_array_shards", "write_manifest"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 1_000_000_000


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


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
                    sample = sample_dict(source.item(i), opts, source.label_type)
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
    write_record(dest, info, start, stop, plan_id, storage)  # only after close(): the shard is stored whole
    return info


def _shard_call(start: int, stop: int, dest: str, shard: str, opts: EncodeOptions, storage: StorageConfig,
                plan_id: str, source: Source) -> dict[str, Any]:
    """One shard as a fan-out's call: the source comes last, as the map's `shared` argument."""
    return _write_one_shard(source, start, stop, dest, shard, opts, storage, plan_id)


def write_manifest(dest: str, manifest: dict[str, Any], storage: StorageConfig) -> str:
    """Writes manifest.json atomically: one PUT on object stores, write-then-rename on local disks."""
    url = url_join(dest, MANIFEST_NAME)
    write_atomic(url, json.dumps(manifest, indent=1).encode(), storage)
    return url


def write_shards(source: Source, dest: str, *, name: str = "dataset", split: str = "train", prefix: str | None = None,
                 samples_per_shard: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 encode: EncodeOptions | None = None, storage: StorageConfig | None = None, map: Map | None = None,
                 progress: bool = True, overwrite: bool = False) -> str:
    """Writes `source` as tar shards `{dest}/{prefix}-NNNNNN.tar` plus `{dest}/manifest.json` (last, atomically).

    Shard size is by sample count, or by bytes (`shard_bytes`, default ~1 GB: the count is derived from the mean
    encoded size of a probe of 32 items, so shards come out near, not exactly at, that size). Returns the manifest
    URL. Without `map` the shards are written here, one after another, under a bar counting images (a shard of a
    GB takes minutes: a bar counting shards would stand still); with one (`pipeline.launch.fanout.ray_map` for
    `--ray`), each shard is one of its calls, the source shipped once as `shared`, and the manifest's writer.ray
    says so.

    Resumable (pipeline.data.resume): each finished shard leaves a record (size, sha256) under `{dest}/.progress/`,
    next to the run's plan. Called again after a crash with the same arguments, it keeps the recorded shards whose
    stored bytes still match, writes the rest, then the manifest, and removes `.progress/`. Different arguments are
    refused before anything is written, as is a complete dataset written with different arguments (a matching one
    is left as it is); `overwrite=True` discards both and starts over.
    """
    storage = storage or StorageConfig()
    encode = encode or EncodeOptions()
    prefix = prefix or split
    n = len(source)
    if n == 0:
        raise ValueError(f"source {source.describe()} has no samples")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    plan = settle_plan(source, dest, name=name, split=split, prefix=prefix, samples_per_shard=samples_per_shard,
                       shard_bytes=shard_bytes, encode=encode, storage=storage, overwrite=overwrite)
    if plan is None:
        return url_join(dest, MANIFEST_NAME)
    spc = plan["samples_per_shard"]
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]

    num_shards = math.ceil(n / spc)
    bounds = [(s * spc, min(n, (s + 1) * spc)) for s in range(num_shards)]
    names = [_shard_name(prefix, s) for s in range(num_shards)]
    records = read_records(dest, storage, plan_id, bounds, names)
    shards = verify_recorded(records, dest, storage, map, progress)
    reused = len(shards)
    todo = [s for s in range(num_shards) if s not in shards]
    if records:
        log.info("resuming %s: %d recorded shards verified and kept, %d rewritten (damaged), %d to write", dest,
                 reused, len(records) - reused, len(todo))
    todo_samples = sum(bounds[s][1] - bounds[s][0] for s in todo)
    log.info("writing %d samples as %d shards of <= %d samples to %s", todo_samples, len(todo), spc, dest)

    if map is not None and todo:
        calls = [(*bounds[s], dest, names[s], encode, storage, plan_id) for s in todo]
        shards.update(zip(todo, map(_shard_call, calls, desc=f"shards -> {dest}", progress=progress, shared=source)))
    elif todo:
        with tqdm(total=todo_samples, unit="img", desc=f"shards -> {dest}", disable=not progress) as bar:
            for s in todo:
                shards[s] = _write_one_shard(source, *bounds[s], dest, names[s], encode, storage, plan_id, bar)
    infos = [{k: shards[s][k] for k in ("url", "samples", "bytes", "sha256")} for s in range(num_shards)]
    manifest = {
        "format": MANIFEST_FORMAT, "name": name, "split": split,
        "num_samples": sum(s["samples"] for s in infos), "num_shards": num_shards,
        "num_classes": len(source.class_names) if source.class_names is not None else None,
        "class_names": source.class_names, "label_type": source.label_type,
        "shards": infos, "skipped_source_items": sum(shards[s]["skipped"] for s in range(num_shards)),
        "writer": {**{k: plan[k] for k in ("source", "source_items", "samples_per_shard", "shard_bytes", "encode",
                                           "prefix")}, "ray": map is not None},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    url = write_manifest(dest, manifest, storage)
    log.info("%s: %d shards reused, %d written", url, reused, len(todo))
    discard_progress(dest, storage)
    return url


def write_array_shards(images: np.ndarray, labels: Any, dest_url: str, *, name: str = "arrays", split: str = "train",
                       class_names: list[str] | None = None, samples_per_shard: int = 1000,
                       storage: StorageConfig | None = None, image_format: str = "png",
                       label_type: str | None = None, progress: bool = False) -> str:
    """uint8 arrays [N,H,W] / [N,H,W,C] + labels -> shards + manifest under `dest_url`. Returns the manifest URL."""
    source = ArraySource(images, labels, class_names, label_type)
    return write_shards(source, dest_url, name=name, split=split, samples_per_shard=samples_per_shard,
                        encode=EncodeOptions(raw_format=image_format), storage=storage, progress=progress)
