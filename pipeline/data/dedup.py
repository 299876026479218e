"""Test-set de-duplication (the paper's Sec. 4.1, after BiT): perceptual hashes of every downstream test image, a
streaming scan of the pretraining shards against them, and the exclusion list the loader honours.

The hash: 256-bit pHash (`imagehash.phash(hash_size=16)`: the sign of the 16x16 lowest DCT frequencies of a 64x64
greyscale thumbnail), matched at Hamming distance <= 32 (DEFAULT_THRESHOLD) against each test image and eight crops
of it ("views": centred crops of 1.5, 3, 4.5 and 6 % per side and the four 3 % corner crops), since pHash tolerates
re-encoding and resizing well but not a crop of more than ~1 %. Measured on Fashion-MNIST (28 px, the hardest case
we have: objects of one kind centred on black; all 10,000 test images indexed, 1,000 of them transformed, crops
taken after a 4x upscale), fraction found at distance <= 32:
  exact copy 1.000 | JPEG q75 0.997, q50 0.965 | 4x upscale + JPEG q90 1.000 | downscale to 20 px 1.000
  centred crop 2 % 1.000, 5 % 0.998 | one side 2 % 0.949, 4 % 0.790 | corner 4 % 0.945
  random crop per side 0-3 % 0.969, 0-5 % 0.801
and 880 of the 60,000 training images (1.5 %) flagged: the nearest of them (<= 24 bits) are the same product photo
in both splits, the rest near-identical products on black. At <= 28 bits: 295 flagged, q50 0.929, random 0-3 %
0.923; at <= 36: 2,200 flagged, 0.979, 0.990. Excluding ~1 % of a pretraining set costs little, training on a test
image is what the exclusion is there to prevent: the threshold leans to recall. The 64-bit hashes were rejected on
the same data: pHash-64 puts 34 % of the training images within 8 bits of one of 2,000 test images; pHash-64 +
dHash-64 (sum <= 8) flags 0.4 % of them against 1,000 test images and still misses 10 % of q40 re-encodes and 86 %
of 3 % crops. Not caught: mirrored copies, crops beyond ~5 %, rotations, heavy edits.

Matching is a vectorised Hamming distance (XOR + popcount over packed uint64 words) of each chunk of scanned
images against every view of every test image: test sets are <= 100k images, so the index is at most ~29 MB and a
brute-force pass costs ~4 ms per scanned image on one core at 100k test images (~0.5 ms at 10k; the decode and
hash of a scanned image ~0.3-1 ms). Shards are streamed (one sample in memory at a time) through
pipeline.data.storage, one call of a `map` per shard (pipeline.data.maps: here, or one Ray task per shard).

The exclusion list is `exclude.json` in the pretraining manifest's folder, written atomically; a rerun replaces it
(to exclude several test sets, name them all in one run). It records the manifest's sha256, the test sets, the hash
and threshold, and per excluded sample its shard, key, position, the test set and key it matched, the view and
the distance. The loader finds it next to the manifest, refuses one made for another manifest, and skips the
listed samples (counter `excluded_samples`).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.config import StorageConfig
from pipeline.data.manifest import Manifest, load_dataset_spec
from pipeline.data.maps import Map, local_map
from pipeline.data.samples import iter_tar_samples
from pipeline.data.storage import Storage, open_url, parent_url, url_join, write_atomic
from pipeline.data.transforms import IMAGE_KEYS

__all__ = ["EXCLUDE_NAME", "EXCLUDE_FORMAT", "HASH_KIND", "DEFAULT_THRESHOLD", "VIEWS", "HashIndex", "Exclusions",
           "image_hash", "view_hashes", "hamming", "hash_test_shard", "scan_shard", "dedup", "load_exclusions"]

log = logging.getLogger(__name__)

EXCLUDE_NAME = "exclude.json"
EXCLUDE_FORMAT = "vitpipe-exclude/1"
HASH_KIND = "phash256"
HASH_SIZE = 16  # imagehash's hash_size: HASH_SIZE**2 bits
WORDS = HASH_SIZE * HASH_SIZE // 64
DEFAULT_THRESHOLD = 32
# (name, (left, top, right, bottom) fractions cropped off) of each test image, the first the image itself
VIEWS: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("full", (0.0, 0.0, 0.0, 0.0)),
    ("centre1.5", (0.015,) * 4), ("centre3", (0.03,) * 4), ("centre4.5", (0.045,) * 4), ("centre6", (0.06,) * 4),
    ("corner-tl3", (0.03, 0.03, 0.0, 0.0)), ("corner-tr3", (0.0, 0.03, 0.03, 0.0)),
    ("corner-bl3", (0.03, 0.0, 0.0, 0.03)), ("corner-br3", (0.0, 0.0, 0.03, 0.03)),
)
_VIEW_MIN_SIDE = 112  # small test images are upscaled first, so a 1.5 % crop is a pixel or more
_DRAFT_SIDE = 256  # JPEGs are decoded at a reduced DCT scale no smaller than this: the hash sees 64x64 anyway
_CHUNK = 256  # scanned images matched at once
_MATCH_CELLS = 1 << 19  # query x index cells per vectorised step (4 MB of XORs: in cache, measured fastest)


def _gray(data: bytes):
    img = Image.open(io.BytesIO(data))
    img.draft("L", (_DRAFT_SIDE, _DRAFT_SIDE))  # JPEG only: a cheaper decode, still far above the hash's 64 px
    return img.convert("L")


def image_hash(img) -> np.ndarray:
    """A PIL image -> its 256-bit pHash as 4 uint64 words."""
    import imagehash

    bits = imagehash.phash(img, hash_size=HASH_SIZE).hash.reshape(-1)
    return np.packbits(bits).view(">u8").astype(np.uint64)


def view_hashes(img) -> np.ndarray:
    """A test image -> the hashes of its VIEWS, uint64 [len(VIEWS), 4]."""
    img = img.convert("L")
    out = [image_hash(img)]  # the image as stored: an exact copy is at distance 0
    if min(img.size) < _VIEW_MIN_SIDE:
        s = _VIEW_MIN_SIDE / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
    w, h = img.size
    for _, (l, t, r, b) in VIEWS[1:]:
        out.append(image_hash(img.crop((round(w * l), round(h * t), w - round(w * r), h - round(h * b)))))
    return np.stack(out)


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    return _BYTE_BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def hamming(queries: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Bit distances uint16 [m, n] between hashes uint64 [m, W] and [n, W]."""
    out = np.zeros((len(queries), len(index)), np.uint16)
    for w in range(queries.shape[1]):
        out += _popcount(queries[:, None, w] ^ index[None, :, w])
    return out


@dataclass
class HashIndex:
    """Every view of every test image, word-major: `words` uint64 [4, n], `image` (row of the test image) and
    `view` [n]; a query matches when its nearest view is at most `threshold` bits away."""

    words: np.ndarray
    image: np.ndarray
    view: np.ndarray
    threshold: int = DEFAULT_THRESHOLD

    @classmethod
    def from_views(cls, views: np.ndarray, threshold: int = DEFAULT_THRESHOLD) -> "HashIndex":
        """From view hashes uint64 [images, views, 4] (view_hashes of each test image, stacked)."""
        n, v, w = views.shape
        return cls(words=np.ascontiguousarray(views.reshape(n * v, w).T),
                   image=np.repeat(np.arange(n, dtype=np.int32), v), view=np.tile(np.arange(v, dtype=np.uint8), n),
                   threshold=threshold)

    def __len__(self) -> int:
        return self.words.shape[1]

    def match(self, queries: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(query row, test image row, view, distance) of the nearest view of each query that matches.

        Blocks of the index small enough to stay in cache; the first two words' distance (a lower bound of the
        whole) picks the few candidates whose other words are compared at all."""
        t, (nw, n), m = self.threshold, self.words.shape, len(queries)
        best_d = np.full(m, t + 1, np.int32)
        best_j = np.zeros(m, np.int64)
        block = max(256, _MATCH_CELLS // max(1, m))
        q0, q1 = queries[:, 0, None], queries[:, 1, None]
        for s in range(0, n, block):
            d = _popcount(q0 ^ self.words[0, None, s:s + block])
            d += _popcount(q1 ^ self.words[1, None, s:s + block])
            r, c = np.nonzero(d <= t)
            if not len(r):
                continue
            total = d[r, c].astype(np.int32)
            for w in range(2, nw):
                total += _popcount(queries[r, w] ^ self.words[w, s + c])
            keep = total < best_d[r]
            r, c, total = r[keep], c[keep] + s, total[keep]
            if not len(r):
                continue
            order = np.lexsort((c, total, r))  # per query: the nearest first, then the lowest index
            r, c, total = r[order], c[order], total[order]
            first = np.r_[True, r[1:] != r[:-1]]
            best_d[r[first]], best_j[r[first]] = total[first], c[first]
        hit = np.flatnonzero(best_d <= t)
        return [(int(q), int(self.image[best_j[q]]), int(self.view[best_j[q]]), int(best_d[q])) for q in hit]


def _image_bytes(sample: dict) -> bytes | None:
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, RuntimeError)  # what the loader skips a shard for


def _shard_error(url: str, e: Exception) -> ValueError:
    return ValueError(f"cannot read shard {url} ({type(e).__name__}: {e}): a de-duplication must see every image; "
                      "check it with `vitpipe shards verify` and run again")


def hash_test_shard(url: str, storage: StorageConfig) -> dict[str, Any]:
    """One test shard, streamed: {"keys", "hashes" uint64 [k, len(VIEWS), 4], "unreadable"}."""
    keys, hashes, unreadable = [], [], 0
    try:
        with open_url(url, "rb", storage) as f:
            for sample in iter_tar_samples(f):
                data = _image_bytes(sample)
                try:
                    h = view_hashes(_gray(data)) if data is not None else None
                except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken image
                    log.warning("test image %s in %s does not decode (%s); it cannot be matched", sample["__key__"],
                                url, e)
                    h = None
                if h is None:
                    unreadable += 1
                    continue
                keys.append(sample["__key__"])
                hashes.append(h)
    except _SHARD_ERRORS as e:
        raise _shard_error(url, e) from None
    arr = np.stack(hashes) if hashes else np.zeros((0, len(VIEWS), WORDS), np.uint64)
    return {"keys": keys, "hashes": arr, "unreadable": unreadable}


def scan_shard(url: str, storage: StorageConfig, index: HashIndex) -> dict[str, Any]:
    """One pretraining shard, streamed and matched in chunks: {"matches": [(key, position in shard, test image row,
    view, distance)], "samples", "unreadable"}. Undecodable images are counted (the loader skips them anyway)."""
    matches: list[tuple[str, int, int, int, int]] = []
    keys: list[tuple[str, int]] = []
    hashes: list[np.ndarray] = []
    samples = unreadable = 0

    def flush() -> None:
        if hashes:
            for q, image, view, d in index.match(np.stack(hashes)):
                matches.append((keys[q][0], keys[q][1], image, view, d))
        keys.clear()
        hashes.clear()

    try:
        with open_url(url, "rb", storage) as f:
            for pos, sample in enumerate(iter_tar_samples(f)):
                samples += 1
                data = _image_bytes(sample)
                try:
                    hashes.append(image_hash(_gray(data)))
                except Exception:  # noqa: BLE001 - no image member, or one PIL cannot decode
                    unreadable += 1
                    continue
                keys.append((sample["__key__"], pos))
                if len(hashes) >= _CHUNK:
                    flush()
    except _SHARD_ERRORS as e:
        raise _shard_error(url, e) from None
    flush()
    return {"matches": matches, "samples": samples, "unreadable": unreadable}


def _load_against(specs: list[str], storage: StorageConfig) -> list[Manifest]:
    out = []
    for spec in specs:
        try:
            out.append(load_dataset_spec(spec, Storage(storage)))
        except ValueError as e:
            raise ValueError(f"test set {spec}: {e}") from None
    return out


def dedup(dataset: str, against: list[str], storage: StorageConfig | None = None, *,
          threshold: int = DEFAULT_THRESHOLD, map: Map = local_map, progress: bool = True) -> dict[str, Any]:
    """Finds the samples of `dataset` (a manifest) that are near-duplicates of an image of any `against` test set and
    writes `exclude.json` next to its manifest. Every manifest is read before any image is. Each shard is one call
    of `map` (here, one after another; `pipeline.launch.fanout.ray_map` for `--ray`), the index shipped once as its
    `shared` argument. Returns a summary with the list's "url". See the module docstring."""
    import imagehash

    storage = storage or StorageConfig()
    if not against:
        raise ValueError("dedup: name at least one test set (--against TEST_MANIFEST)")
    if not 0 <= threshold < HASH_SIZE * HASH_SIZE:
        raise ValueError(f"dedup: threshold must be in 0..{HASH_SIZE * HASH_SIZE - 1} bits, got {threshold}")
    m = load_dataset_spec(dataset, Storage(storage))
    if not m.exact_counts:
        raise ValueError(f"dedup: {dataset!r} is a shard pattern; de-duplication needs a manifest (a dataset written "
                         "by `vitpipe shards write`), next to which its exclusion list is written")
    tests = _load_against(against, storage)
    for spec, t in zip(against, tests):
        if t.url == m.url:
            raise ValueError(f"dedup: test set {spec} is the pretraining dataset itself")

    test_shards = [(url, storage) for t in tests for url in t.shards]
    hashed = map(hash_test_shard, test_shards, desc="hashing test sets", progress=progress)
    test_keys: list[tuple[int, str]] = []  # (test set, key) per test image row
    per_set_unreadable = [0] * len(tests)
    shard_set = [i for i, t in enumerate(tests) for _ in t.shards]
    blocks = []
    for s, h in zip(shard_set, hashed):
        test_keys += [(s, k) for k in h["keys"]]
        per_set_unreadable[s] += h["unreadable"]
        blocks.append(h["hashes"])
    all_views = np.concatenate(blocks) if blocks else np.zeros((0, len(VIEWS), WORDS), np.uint64)
    if not len(all_views):
        raise ValueError(f"dedup: no decodable image in the test sets {', '.join(against)}")
    index = HashIndex.from_views(all_views, threshold)
    log.info("indexed %d test images (%d hashes) from %d test set(s)", len(all_views), len(index), len(tests))

    scans = map(scan_shard, [(url, storage) for url in m.shards], desc=f"scanning {m.name or m.url}",
                progress=progress, shared=index)
    offsets = np.concatenate([[0], np.cumsum(m.samples_per_shard)[:-1]])
    shard_names = [s["url"] for s in m.raw["shards"]]
    excluded = []
    for shard, scan in enumerate(scans):
        for key, pos, image, view, d in scan["matches"]:
            test_set, test_key = test_keys[image]
            excluded.append({"shard": shard, "shard_url": shard_names[shard], "key": key,
                             "index": int(offsets[shard]) + pos, "test_set": test_set, "test_key": test_key,
                             "view": VIEWS[view][0], "distance": d})
    per_set = [sum(1 for e in excluded if e["test_set"] == i) for i in range(len(tests))]
    doc = {
        "format": EXCLUDE_FORMAT,
        "manifest": m.url,
        "manifest_sha256": m.checksum,
        "against": [{"url": t.url, "name": t.name, "split": t.split, "sha256": t.checksum,
                     "images": sum(1 for s, _ in test_keys if s == i), "unreadable_images": per_set_unreadable[i],
                     "excluded": per_set[i]} for i, t in enumerate(tests)],
        "hash": {"kind": HASH_KIND, "library": f"imagehash {imagehash.__version__}", "bits": HASH_SIZE * HASH_SIZE,
                 "threshold": threshold, "views": [name for name, _ in VIEWS]},
        "scanned": {"shards": m.num_shards, "samples": sum(s["samples"] for s in scans),
                    "unreadable_images": sum(s["unreadable"] for s in scans)},
        "num_excluded": len(excluded),
        "excluded": excluded,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    url = url_join(parent_url(m.url), EXCLUDE_NAME)
    write_atomic(url, json.dumps(doc, indent=1).encode(), storage)
    log.info("%d of %d samples of %s excluded -> %s", len(excluded), doc["scanned"]["samples"], m.url, url)
    return {"url": url, "num_excluded": len(excluded), "scanned": doc["scanned"], "against": doc["against"]}


@dataclass
class Exclusions:
    """A loaded exclusion list: sample keys to skip per shard index of the manifest."""

    url: str
    sha256: str
    keys: dict[int, frozenset[str]]

    @property
    def count(self) -> int:
        return sum(len(k) for k in self.keys.values())


def load_exclusions(manifest: Manifest, storage: Storage | None = None) -> Exclusions | None:
    """The exclusion list next to `manifest`, or None when there is none (or the dataset is a shard pattern).
    Raises a ValueError when it is unreadable, malformed or was made for another manifest."""
    if not manifest.exact_counts or not manifest.url:
        return None
    url = url_join(parent_url(manifest.url), EXCLUDE_NAME)
    try:
        blob = (storage or Storage()).read_bytes(url)
    except FileNotFoundError:
        return None
    except PermissionError as e:  # S3 answers 403, not 404, for a missing key to a reader without ListBucket
        log.warning("cannot tell whether %s exists (%s); no samples excluded", url, e)
        return None
    except Exception as e:
        raise ValueError(f"cannot read the exclusion list {url}: {type(e).__name__}: {e}") from None
    try:
        doc = json.loads(blob)
        if doc.get("format") != EXCLUDE_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {EXCLUDE_FORMAT!r}")
        by_shard: dict[int, set[str]] = {}
        for e in doc["excluded"]:
            shard = int(e["shard"])
            if not 0 <= shard < manifest.num_shards:
                raise ValueError(f"shard {shard} outside the manifest's {manifest.num_shards}")
            by_shard.setdefault(shard, set()).add(str(e["key"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"invalid exclusion list {url}: {e}; write it again with `vitpipe shards dedup`") from None
    if manifest.checksum and doc.get("manifest_sha256") != manifest.checksum:
        raise ValueError(f"exclusion list {url} was made for another version of {manifest.url} (the manifest "
                         "changed since): run `vitpipe shards dedup` again, or delete the list")
    return Exclusions(url=url, sha256=hashlib.sha256(blob).hexdigest(),
                      keys={s: frozenset(k) for s, k in by_shard.items()})
