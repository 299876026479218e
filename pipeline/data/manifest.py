"""A dataset's manifest: the one file a reader starts from (shards, sample counts, classes, checksums).

Accepted dataset specs: a manifest URL (`s3://b/i21k/train/manifest.json`, or the directory holding it), or a
brace pattern with a total sample count (`s3://b/i21k-{000000..013999}.tar|14197122`, samples spread evenly over
the shards; append `|multi` for multi-label shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import braceexpand

from pipeline.data.storage import Storage, parent_url, url_join

__all__ = ["Manifest", "load_dataset_spec", "MANIFEST_FORMAT", "MANIFEST_NAME"]

MANIFEST_FORMAT = "vitpipe-shards/1"
MANIFEST_NAME = "manifest.json"


@dataclass
class Manifest:
    shards: list[str]  # absolute URLs
    samples_per_shard: list[int]
    class_names: list[str] | None = None
    num_classes: int | None = None
    label_type: str = "single"  # "single" | "multi"
    name: str = ""
    split: str = ""
    url: str = ""
    checksum: str = ""
    shard_bytes: list[int] | None = None
    shard_sha256: list[str] | None = None
    exact_counts: bool = True  # False for a brace pattern: counts per shard are an even spread of the total
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(sum(self.samples_per_shard))

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def bytes_per_sample(self) -> float | None:
        if not self.shard_bytes or not self.num_samples:
            return None
        return sum(self.shard_bytes) / self.num_samples


def _invalid(where: str, what: str) -> ValueError:
    return ValueError(f"invalid dataset manifest {where}: {what}")


def _parse_pattern(spec: str) -> Manifest:
    parts = spec.split("|")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("single", "multi")):
        raise ValueError(f"dataset pattern {spec!r}: expected 'URL-{{000000..000099}}.tar|NUM_SAMPLES[|multi]'")
    pattern, count = parts[0], parts[1]
    try:
        total = int(count)
    except ValueError:
        raise ValueError(f"dataset pattern {spec!r}: sample count {count!r} is not an integer") from None
    shards = list(braceexpand.braceexpand(pattern))
    if not shards or total < len(shards):
        raise ValueError(f"dataset pattern {spec!r}: {len(shards)} shards but {total} samples (need >= 1 per shard)")
    base, extra = divmod(total, len(shards))
    counts = [base + (1 if i < extra else 0) for i in range(len(shards))]
    return Manifest(shards=shards, samples_per_shard=counts, label_type=parts[2] if len(parts) == 3 else "single",
                    url=spec, checksum=hashlib.sha256(spec.encode()).hexdigest(), exact_counts=False)


def parse_manifest(data: dict, url: str, checksum: str = "") -> Manifest:
    """Validates a manifest mapping; relative shard URLs are resolved against the manifest's folder."""
    if not isinstance(data, dict):
        raise _invalid(url, "top level must be a JSON object")
    fmt = data.get("format")
    if fmt != MANIFEST_FORMAT:
        raise _invalid(url, f"format is {fmt!r}, expected {MANIFEST_FORMAT!r} (write it with `vitpipe shards write`)")
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _invalid(url, "'shards' must be a non-empty list")
    base = parent_url(url)
    urls, counts, sizes, sums = [], [], [], []
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("url"), str):
            raise _invalid(url, f"shards[{i}] must be an object with a 'url'")
        n = s.get("samples")
        if not isinstance(n, int) or n < 0:
            raise _invalid(url, f"shards[{i}].samples must be a non-negative integer, got {n!r}")
        urls.append(url_join(base, s["url"]))
        counts.append(n)
        sizes.append(s.get("bytes"))
        sums.append(s.get("sha256"))
    total = data.get("num_samples")
    if total != sum(counts):
        raise _invalid(url, f"num_samples is {total!r} but the shards hold {sum(counts)}")
    label_type = data.get("label_type", "single")
    if label_type not in ("single", "multi"):
        raise _invalid(url, f"label_type must be 'single' or 'multi', got {label_type!r}")
    class_names = data.get("class_names")
    num_classes = data.get("num_classes", len(class_names) if class_names else None)
    if class_names is not None and (not isinstance(class_names, list) or len(class_names) != num_classes):
        raise _invalid(url, f"class_names ({class_names!r:.80}) do not match num_classes={num_classes!r}")
    return Manifest(
        shards=urls, samples_per_shard=counts, class_names=class_names, num_classes=num_classes,
        label_type=label_type, name=data.get("name", ""), split=data.get("split", ""), url=url, checksum=checksum,
        shard_bytes=sizes if all(isinstance(b, int) for b in sizes) else None,
        shard_sha256=sums if all(isinstance(h, str) for h in sums) else None, raw=data,
    )


def load_dataset_spec(spec: str, storage: Storage | None = None) -> Manifest:
    """Reads a dataset: a manifest URL (or its folder), or 'pattern|num_samples'. Raises a ValueError naming the
    URL and the problem when the manifest is missing or invalid."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a manifest URL or 'pattern|num_samples', got {spec!r}")
    spec = spec.strip()
    if "|" in spec:
        return _parse_pattern(spec)
    if re.search(r"\{[^{}]*\.\.[^{}]*\}", spec):
        raise ValueError(f"dataset pattern {spec!r} has no sample count: append it, "
                         "'URL-{000000..000099}.tar|NUM_SAMPLES' (or point at the dataset's manifest.json)")
    url = spec if spec.endswith(".json") else url_join(spec, MANIFEST_NAME)
    try:
        # read_bytes retries a body cut off mid-read (a connection reset), like the loader's shard reads
        blob = (storage or Storage()).read_bytes(url)
    except FileNotFoundError:
        raise ValueError(f"dataset manifest not found: {url} (write the dataset with `vitpipe shards write`, "
                         "or give 'pattern|num_samples')") from None
    except Exception as e:  # unreachable endpoint, no credentials, access denied: botocore's types vary
        endpoint = (storage.config.endpoint_url if storage else None) or os.environ.get("AWS_ENDPOINT_URL") or "default"
        raise ValueError(f"cannot read dataset manifest {url} (endpoint {endpoint}): {type(e).__name__}: {e}; "
                         "check storage.endpoint_url / $AWS_ENDPOINT_URL and the credentials") from None
    try:
        data = json.loads(blob)
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary junk
        raise _invalid(url, f"not valid JSON ({e})") from None
    return parse_manifest(data, url, hashlib.sha256(blob).hexdigest())
