"""Checking a written dataset: every shard's bytes, sha256 and sample count against its manifest, each shard read
once from start to end (`vitpipe shards verify`)."""

from __future__ import annotations

import hashlib
import io

from pipeline.data.config import StorageConfig
from pipeline.data.manifest import Manifest, load_dataset_spec
from pipeline.data.samples import iter_tar_samples
from pipeline.data.storage import Storage, open_url

__all__ = ["verify_shards"]


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
    """Reads through `f`, hashing and counting every byte read: the tar reader and the checksum share one pass."""

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
