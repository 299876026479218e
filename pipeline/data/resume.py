"""The progress of a shard write, which lets an interrupted one resume: its plan and one record per finished shard,
kept under `{dest}/.progress/` while the write is under way.

The plan (`.progress/plan.json`) is what defines the shards: the source, the samples per shard, the encoding, the
names. A rerun must agree with it on every field (`settle_plan` refuses otherwise, before anything is written, and
names the option that differs); a complete dataset's manifest records the same fields under "writer", so a rerun
onto one is a no-op or a refusal. A record (`.progress/SHARD.json`: its samples, size, sha256, item range and plan
id) is written after its shard; a rerun keeps the shards whose stored bytes still match their record
(`verify_recorded`) and writes the others. The writer removes `.progress/` once the manifest is written.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.data.config import StorageConfig
from pipeline.data.manifest import MANIFEST_NAME
from pipeline.data.maps import Map
from pipeline.data.samples import EncodeOptions, sample_dict, tar_bytes
from pipeline.data.sources import Source
from pipeline.data.storage import digest, get_filesystem, url_join, write_atomic

__all__ = ["PROGRESS_DIR", "PROGRESS_FORMAT", "settle_plan", "write_record", "read_records", "check_shard",
           "verify_recorded", "discard_progress"]

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"  # {dest}/.progress/: plan.json + one record per finished shard, while a write is under way
PROGRESS_FORMAT = "vitpipe-shards-progress/1"

# What defines the shards' content (and the manifest's), with the option that sets each: a resumed write must agree
# on all of them with the interrupted one, and a complete dataset's manifest records them under "writer".
_PLAN_OPTIONS = {
    "source": "SOURCE", "source_items": "SOURCE (item count)", "label_type": "SOURCE (label type)",
    "class_names": "--class-names", "samples_per_shard": "--samples-per-shard",
    "shard_bytes": "--shard-bytes (the derived samples per shard)",
    "encode": "--max-side/--quality/--reencode/--raw-format",
    "prefix": "--prefix", "name": "--name", "split": "--split",
}


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


def _estimate_samples_per_shard(source: Source, opts: EncodeOptions, shard_bytes: int, probe: int = 32) -> int:
    n = min(len(source), probe)
    idx = np.linspace(0, len(source) - 1, n).astype(int) if n else []
    sizes = []
    for i in idx:
        try:
            sizes.append(tar_bytes(sample_dict(source.item(int(i)), opts, source.label_type)))
        except Exception:
            continue
    mean = float(np.mean(sizes)) if sizes else 100_000.0
    return max(1, int(shard_bytes // mean))


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


def discard_progress(dest: str, storage: StorageConfig) -> None:
    """Removes `{dest}/.progress/` (a failure is only logged: left over, a rerun finds the manifest and stops)."""
    fs, path = get_filesystem(url_join(dest, PROGRESS_DIR), storage)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # left over it is harmless: a rerun finds the manifest and does nothing
        log.warning("could not remove the progress records %s: %s: %s", url_join(dest, PROGRESS_DIR),
                    type(e).__name__, e)


def settle_plan(source: Source, dest: str, *, name: str, split: str, prefix: str, samples_per_shard: int | None,
                shard_bytes: int, encode: EncodeOptions, storage: StorageConfig,
                overwrite: bool) -> dict[str, Any] | None:
    """The plan of this write (what defines its shards), checked against what `dest` already holds: None when that
    is a complete dataset of the same plan (nothing to do); ValueError, before anything is written, when it is a
    dataset or an interrupted write of another plan. A fresh plan is recorded as `.progress/plan.json`.

    Sized by bytes, the samples per shard come from the mean encoded size of a probe of 32 items, or from the
    earlier write of the same `shard_bytes` (so a rerun cuts the same shards)."""
    manifest_url, plan_url = url_join(dest, MANIFEST_NAME), url_join(dest, f"{PROGRESS_DIR}/plan.json")
    if overwrite:
        fs, path = get_filesystem(manifest_url, storage)
        if fs.exists(path):  # first: a manifest must never describe shards that are being replaced
            fs.rm_file(path)
        discard_progress(dest, storage)
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
        discard_progress(dest, storage)  # left over if the writer stopped right after the manifest
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


def write_record(dest: str, info: dict[str, Any], start: int, stop: int, plan_id: str,
                 storage: StorageConfig) -> None:
    """Records a finished shard (`info`: its url, samples, bytes, sha256, skipped), which must already be stored
    whole: on S3 an object exists once its upload is closed (object stores have no rename to commit with)."""
    blob = json.dumps({**info, "start": start, "stop": stop, "plan": plan_id}).encode()
    write_atomic(_record_url(dest, info["url"]), blob, storage)


def read_records(dest: str, storage: StorageConfig, plan_id: str, bounds: list[tuple[int, int]],
                 names: list[str]) -> dict[int, dict[str, Any]]:
    """shard index -> its progress record, for the records of this plan whose shard `names[s]` covers `bounds[s]`
    (others are ignored: the shard is redone)."""
    fs, path = get_filesystem(url_join(dest, PROGRESS_DIR), storage)
    fs.invalidate_cache()
    try:
        found = [p for p in fs.find(path) if p.endswith(".tar.json")]
    except FileNotFoundError:
        found = []
    if not found:
        return {}
    index = {name: s for s, name in enumerate(names)}
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


def check_shard(dest: str, record: dict[str, Any], storage: StorageConfig) -> str | None:
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


def verify_recorded(records: dict[int, dict[str, Any]], dest: str, storage: StorageConfig, map: Map | None,
                    progress: bool) -> dict[int, dict[str, Any]]:
    """The recorded shards whose stored bytes match their record (re-read in full: a shard cut short or altered
    since is redone). Checked by `map`'s calls when given (a fan-out reads the bytes where they are cheapest to
    read), else by 8 threads here: the check is I/O bound, a few streams at once hide the latency."""
    if not records:
        return {}
    ids = sorted(records)
    if map is not None:
        problems = dict(zip(ids, map(check_shard, [(dest, records[s], storage) for s in ids], desc=f"verify {dest}",
                                     progress=progress)))
    else:
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = dict(zip(ids, pool.map(lambda s: check_shard(dest, records[s], storage), ids)))
    for s in ids:
        if problems[s] is not None:
            log.warning("recorded shard will be rewritten: %s", problems[s])
    return {s: records[s] for s in ids if problems[s] is None}
