"""What a loader's DataLoader workers run: the samples of a few *streams* (a training reader's or an evaluation
slot's run of the epoch, pipeline.data.epochs) read from their shards, shuffled in each stream's bounded buffer,
decoded, augmented and handed over in items.

A stream's shuffle buffer, refill passes and augmentation are seeded by its key (seed, epoch, reader or slot) and
each sample's position (how many samples were taken out of the stream's buffer before it), never by the process
that reads it: a stream continues exactly in another worker, on another rank, after a restore (`Stream.position`:
the stream is replayed up to it without decoding).

Bad data is skipped and counted, never fatal: an undecodable image or a missing/malformed label skips the sample
(its position is taken all the same); a truncated tar yields what it had; an unreadable shard (after storage
retries) is skipped (`on_error: fail` raises instead). A stream left short of samples reads its run again (a refill
pass), so item sizes never change. Samples listed in the exclusion list (pipeline.data.dedup) are dropped before the
shuffle buffer and counted once per epoch as `excluded_samples`.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
import time
from dataclasses import dataclass
from itertools import count
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.data.config import DataConfig
from pipeline.data.epochs import Segment
from pipeline.data.readahead import ReadAhead
from pipeline.data.retries import io_counters
from pipeline.data.samples import iter_tar_samples
from pipeline.data.storage import Storage
from pipeline.data.transforms import IMAGE_KEYS, build_transform, check_image, decode_image

__all__ = ["COUNTER_NAMES", "BAD_DATA_NAMES", "TELEMETRY_NAMES", "Producer", "Stream", "as_tensors"]

log = logging.getLogger(__name__)

# bad data and storage: what a run logs as data/<name>, summed over ranks
BAD_DATA_NAMES = ("skipped_samples", "bad_images", "bad_labels", "skipped_shards", "truncated_shards", "retries",
                  "excluded_samples")
# input telemetry: bytes read from storage, samples handed out, and the milliseconds the workers spent producing
# them (reading, decoding, augmenting; not waiting for the consumer): the loader's own capacity
TELEMETRY_NAMES = ("bytes_read", "samples", "busy_ms")
COUNTER_NAMES = BAD_DATA_NAMES + TELEMETRY_NAMES
_MASK64 = (1 << 64) - 1


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _sample_seed(base: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of a stream whose base seed is `base` (splitmix64: one
    cheap, well-mixed value per sample)."""
    z = (base + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Stream:
    """One reader's (training) or slot's (evaluation) samples for an epoch, as its DataLoader worker gets them."""

    segments: list[Segment]  # (index into the producer's shard list, skip, take)
    own: int                 # the first `own` samples of the run are its own (the rest pad an evaluation split)
    key: tuple[int, ...]     # (seed, epoch, reader or slot): seeds its shuffle, refill passes and augmentation
    take: int                # samples per item
    position: int = 0        # samples already taken out of its shuffle buffer (a resumed stream)


class Producer(torch.utils.data.IterableDataset):
    """What the DataLoader workers run: worker w yields `items` items, each with `take` decoded samples of every
    stream in `groups[w]`, in that order. Holds no storage client (each process opens its own, lazily) and only this
    rank's shard runs for the epoch (`shards` lists only the shards they touch): O(own shards), not the manifest."""

    def __init__(self, *, shards: list[str], offsets: list[int], excluded: list[frozenset[str]],
                 streams: list[Stream], groups: list[list[int]], items: int, data: DataConfig,
                 storage: Storage, image_size: int, in_chans: int, train: bool, label_type: str,
                 num_classes: int | None, defer_decode: bool):
        self.shards, self.offsets, self.excluded = shards, offsets, excluded
        self.streams, self.groups, self.items = streams, groups, items
        self.data, self.storage = data, storage
        self.image_size, self.in_chans, self.train = image_size, in_chans, train
        self.label_type, self.num_classes, self.defer_decode = label_type, num_classes, defer_decode

    # --- raw samples --------------------------------------------------------------------------------------------
    def _read_segment(self, shard: int, skip: int, take: int, counters: dict[str, int],
                      ahead: ReadAhead | None, k: int) -> Iterator[dict]:
        url, got = self.shards[shard], 0
        try:
            with (ahead.open(k) if ahead is not None else self.storage.open(url)) as f:
                for sample in iter_tar_samples(f, skip=skip, take=take):
                    sample["__index__"] = self.offsets[shard] + skip + got  # position in the manifest
                    got += 1
                    yield sample
        except (tarfile.TarError, EOFError, OSError, ValueError, RuntimeError) as e:
            if self.data.on_error == "fail":
                raise RuntimeError(f"unreadable shard {url}: {type(e).__name__}: {e}") from e
            truncated = got > 0 or isinstance(e, (tarfile.ReadError, EOFError))
            counters["truncated_shards" if truncated else "skipped_shards"] += 1
            log.warning("%s shard %s after %d of %d samples: %s: %s", "truncated" if truncated else "unreadable",
                        url, got, take, type(e).__name__, e)
        else:
            if got < take:  # the tar ended cleanly but early (cut at a member boundary, or a short shard)
                counters["truncated_shards"] += 1
                log.warning("shard %s ended after %d of the %d samples planned", url, got, take)
        if got < take:
            counters["skipped_samples"] += take - got

    def _raw(self, stream: Stream, counters: dict[str, int], read_ahead: int) -> Iterator[dict]:
        """Shuffled raw samples of one stream: pass 0 is its run; later passes (only reached when skipped samples
        left it short) read the same run again in another order. Each pass's shards are read ahead of decoding in a
        background thread (`read_ahead` blocks)."""
        rng = random.Random(_seed(*stream.key, 1))
        size = self.data.shuffle_buffer
        seq = 0
        for p in count():
            segs = stream.segments if p == 0 else random.Random(_seed(*stream.key, 2, p)).sample(
                stream.segments, len(stream.segments))
            before = counters["skipped_samples"]
            emitted = 0
            buf: list[dict] = []
            ahead = ReadAhead([self.shards[seg[0]] for seg in segs], self.storage.config, blocks=read_ahead) \
                if read_ahead else None
            try:
                for k, seg in enumerate(segs):
                    drop = self.excluded[seg[0]]
                    for sample in self._read_segment(*seg, counters, ahead, k):
                        # the stream's own samples: the first of its run's first pass (the rest are padding repeats)
                        own = p == 0 and seq < stream.own
                        seq += p == 0
                        if drop and sample["__key__"] in drop:
                            counters["excluded_samples"] += own  # once per epoch, not again in refill passes
                            continue
                        sample["__own__"] = own
                        if size <= 1:
                            emitted += 1
                            yield sample
                            continue
                        if len(buf) < size:
                            buf.append(sample)
                            continue
                        j = rng.randrange(size)
                        buf[j], sample = sample, buf[j]
                        emitted += 1
                        yield sample
            finally:
                if ahead is not None:
                    ahead.close()
            rng.shuffle(buf)
            emitted += len(buf)
            yield from buf
            if emitted == 0:
                raise RuntimeError(
                    f"stream {stream.key[2:]} of epoch {stream.key[1]}: none of its {len(segs)} shard runs gave a "
                    f"readable sample ({counters['skipped_samples'] - before} skipped, "
                    f"{counters['excluded_samples']} excluded); check the shards with `vitpipe shards verify` and "
                    "the exclusion list next to the manifest")

    # --- decoded samples ----------------------------------------------------------------------------------------
    def _label(self, sample: dict) -> Any:
        if self.label_type == "multi":
            labels = json.loads(sample["labels.json"])
            if not isinstance(labels, list) or not all(isinstance(x, int) for x in labels):
                raise ValueError(f"labels.json must be a list of ints, got {labels!r:.60}")
            target = torch.zeros(self.num_classes, dtype=torch.float32)
            if labels:
                idx = torch.tensor(labels)
                if idx.min() < 0 or idx.max() >= self.num_classes:
                    raise ValueError(f"label outside 0..{self.num_classes - 1}: {labels!r:.60}")
                target[idx] = 1.0
            return target
        label = int(sample["cls"].decode().strip())
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"label {label} outside 0..{self.num_classes}")
        return label

    def _decoded(self, cursor: "_Cursor", counters: dict[str, int]) -> tuple[dict, Any, Any, int]:
        """(sample, image or its encoded bytes, label, position) of the next sample of the stream that decodes and
        has a good label; the ones before it are skipped and counted."""
        while True:
            position = cursor.position
            sample = cursor.next()
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            try:
                if data is None:
                    raise ValueError("no image member")
                if self.defer_decode:  # the header only; decoded with its batch on the device
                    check_image(data)
                    image = data
                else:
                    image = decode_image(data, self.in_chans)
            except Exception as e:
                counters["bad_images"] += 1
                counters["skipped_samples"] += 1
                log.debug("skipping sample %s: undecodable image: %s", sample.get("__key__"), e)
                continue
            try:
                label = self._label(sample)
            except Exception as e:
                counters["bad_labels"] += 1
                counters["skipped_samples"] += 1
                log.debug("skipping sample %s: bad label: %s", sample.get("__key__"), e)
                continue
            return sample, image, label, position

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        group = self.groups[wid]
        counters = dict.fromkeys(COUNTER_NAMES, 0)
        start_io = io_counters()

        def count_io() -> None:
            now = io_counters()
            for k in ("retries", "bytes_read"):
                counters[k] = now[k] - start_io[k]

        read_ahead = self.storage.config.read_ahead_blocks
        if read_ahead and len(group) > 1:  # the worker's read-ahead memory, shared by its streams
            read_ahead = max(1, read_ahead // len(group))
        streams = [self.streams[s] for s in group]
        # resume: each stream replayed up to its position without decoding
        cursors = [_Cursor(self._raw(st, counters, read_ahead), st.position) for st in streams]
        count_io()
        base = dict(counters)  # what the replay counted was already counted before the state was taken
        transform = build_transform(self.image_size, self.train, self.data.augment)
        bases = [_seed(*st.key, 3) for st in streams]
        gen = torch.default_generator
        in_worker = info is not None
        for _ in range(self.items):
            t0 = time.perf_counter()
            images, labels, keys, own, index, aug = [], [], [], [], [], []
            saved = gen.get_state()  # the per-sample seeds below must not leak into the caller's RNG
            try:
                for st, cursor, seed_base in zip(streams, cursors, bases):
                    for _ in range(st.take):
                        sample, image, label, position = self._decoded(cursor, counters)
                        seed = _sample_seed(seed_base, position)
                        if not self.defer_decode:
                            gen.manual_seed(seed)
                            image = transform(image)
                        images.append(image)
                        labels.append(label)
                        keys.append(sample["__key__"])
                        own.append(sample["__own__"])
                        index.append(sample["__index__"])
                        aug.append(seed)
            finally:
                gen.set_state(saved)
            count_io()
            counters["samples"] += len(images)
            counters["busy_ms"] += round((time.perf_counter() - t0) * 1000)
            batch = {"encoded": images} if self.defer_decode else {"image": _stack(images, in_worker)}
            # One tensor crosses to the training process through shared memory (each costs a file-descriptor
            # round trip to this worker); the small fields travel pickled and become tensors there (as_tensors).
            yield {
                **batch,
                "label": torch.stack(labels) if self.label_type == "multi" else labels,  # multi-hot: a tensor
                "key": keys, "valid": own, "index": index, "aug": aug,
                "_meta": {"group": wid, "positions": [c.position for c in cursors],
                          "counters": [counters[k] - base[k] for k in COUNTER_NAMES]},
            }


class _Cursor:
    """A stream's shuffled raw samples and its position: how many were taken out of its shuffle buffer."""

    def __init__(self, raw: Iterator[dict], position: int = 0):
        self.raw, self.position = raw, 0
        for _ in range(position):
            self.next()

    def next(self) -> dict:
        sample = next(self.raw)
        self.position += 1
        return sample


def as_tensors(batch: dict[str, Any]) -> None:
    """A worker's item in the form the loader hands out: labels, valid, index and aug as tensors."""
    if not isinstance(batch["label"], torch.Tensor):
        batch["label"] = torch.tensor(batch["label"], dtype=torch.int64)
    batch["valid"] = torch.tensor(batch["valid"], dtype=torch.bool)
    batch["index"] = torch.tensor(batch["index"], dtype=torch.int64)
    batch["aug"] = torch.tensor(batch["aug"], dtype=torch.int64)


def _stack(images: list[torch.Tensor], in_worker: bool) -> torch.Tensor:
    """The item's image tensor; in a DataLoader worker it is built straight into shared memory (as torch's
    default_collate does), so handing it to the training process copies nothing more."""
    if not in_worker:
        return torch.stack(images)
    first = images[0]
    storage = first.untyped_storage()._new_shared(len(images) * first.numel() * first.element_size())
    out = first.new(storage).view(len(images), *first.shape)
    return torch.stack(images, out=out)
