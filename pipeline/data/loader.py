"""The streaming, resumable, per-rank data loader over tar shards.

Each (rank, DataLoader worker) slot reads the run of samples the epoch plan gives it (pipeline.data.epochs), shuffles
them in a bounded buffer whose RNG is seeded by (seed, epoch, slot), decodes + augments, and yields exactly
`batches_per_slot` batches. Every worker yields the same number of batches, so torch's round-robin over workers
is a fixed interleaving and every rank yields the same `len(loader)` batches.

Exact resume: each batch carries its worker's position (samples taken out of the shuffle buffer) and batch count;
the loader records them as batches are handed out. A restored loader replays each worker's stream up to its
position without decoding (shard bytes are read again, images are not decoded) and rotates the worker roles so
the next batch comes from the worker whose turn it was. Augmentation is seeded per batch, so images match too.
A state from a different world size, worker count or batch size cannot be mapped sample-exactly (yet): the epoch
in progress restarts from its beginning (a state taken at an epoch's end starts the next epoch), counters carried
over, with a warning.

Bad data is skipped and counted, never fatal: an undecodable image or a missing/malformed label skips the sample;
a truncated tar yields what it had; an unreadable shard (after storage retries) is skipped (`on_error: fail`
raises instead). A slot left short of samples reads its runs again (a refill pass) so batch counts never change.
Samples listed in the exclusion list next to the manifest (`exclude.json`, near-duplicates of downstream test images
found by `vitpipe shards dedup`, pipeline.data.dedup) are dropped before the shuffle buffer and counted once per epoch
as `excluded_samples`; the slot is refilled the same way.

GPU decoding (`data.decode_device: cuda`): the workers only check each image's header and hand the batch over
encoded; the loader decodes it on the GPU (torchvision's batched nvJPEG) and augments it there with the same seeded
draws, so resume stays exact (pixels may differ from libjpeg's in the last bit).

A batch is {"image": uint8 [B, C, S, S] (normalised on the device: pipeline.data.transforms.to_model_input),
"label", "key", "valid": bool [B], "index": int64 [B]}. `valid` is False for the repeats that pad an evaluation
split (drop_last=False) to equal batch counts and for refill repeats: metrics count the valid samples only, so
every sample of a split counts exactly once over all ranks. `index` is the sample's position in the manifest (a
world-size-independent order for gathered features).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import tarfile
import time
from itertools import count
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.data.config import DataConfig, StorageConfig
from pipeline.data.dedup import load_exclusions
from pipeline.data.manifest import Manifest, load_dataset_spec
from pipeline.data.epochs import EpochPlan, Segment
from pipeline.data.shards import iter_tar_samples
from pipeline.data.storage import ReadAhead, io_counters, open_url
from pipeline.data.transforms import IMAGE_KEYS, build_transform, check_image, decode_batch, decode_image

__all__ = ["build_loader", "StreamingLoader", "COUNTER_NAMES", "BAD_DATA_NAMES", "TELEMETRY_NAMES"]

log = logging.getLogger(__name__)

# bad data and storage: what a run logs as data/<name>, summed over ranks
BAD_DATA_NAMES = ("skipped_samples", "bad_images", "bad_labels", "skipped_shards", "truncated_shards", "retries",
                  "excluded_samples")
# input telemetry: bytes read from storage, samples handed out, and the milliseconds the workers spent producing
# them (reading, decoding, augmenting; not waiting for the consumer): the loader's own capacity
TELEMETRY_NAMES = ("bytes_read", "samples", "busy_ms")
COUNTER_NAMES = BAD_DATA_NAMES + TELEMETRY_NAMES
_META = 3  # role, position, batches done; counters follow
# DataLoader workers are forked where the OS can: a process that was itself spawned (torch.multiprocessing ranks,
# pipeline.launch.local) would otherwise spawn them too, re-importing torch and the pipeline (seconds) for every
# pass over a split. They touch no CUDA, so forking a process that uses a GPU is safe.
_WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class _SlotStream(torch.utils.data.IterableDataset):
    """What one DataLoader worker runs. Holds no storage client (each process opens its own, lazily), and only
    this rank's shard runs for the epoch (`segments[role]`, indexing `shards`): O(own shards), not the manifest."""

    def __init__(self, *, shards: list[str], offsets: list[int], segments: list[list[Segment]], own: list[int],
                 excluded: list[frozenset[str]], batch_size: int, batches_per_slot: int, seed: int, epoch: int,
                 rank: int, positions: list[int], batches_done: list[int], rotation: int, data: DataConfig,
                 storage: StorageConfig, image_size: int, in_chans: int, train: bool, label_type: str,
                 num_classes: int | None, defer_decode: bool):
        self.shards, self.segments, self.seed, self.epoch, self.rank = shards, segments, seed, epoch, rank
        self.offsets, self.own, self.excluded = offsets, own, excluded
        self.workers, self.batch_size, self.batches_per_slot = len(segments), batch_size, batches_per_slot
        self.positions, self.batches_done, self.rotation = positions, batches_done, rotation
        self.data, self.storage = data, storage
        self.image_size, self.in_chans, self.train = image_size, in_chans, train
        self.label_type, self.num_classes = label_type, num_classes
        self.defer_decode = defer_decode

    # --- raw samples --------------------------------------------------------------------------------------------
    def _read_segment(self, shard: int, skip: int, take: int, counters: dict[str, int],
                      ahead: ReadAhead | None, k: int) -> Iterator[dict]:
        url, got = self.shards[shard], 0
        try:
            with (ahead.open(k) if ahead is not None else open_url(url, "rb", self.storage)) as f:
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

    def _raw(self, role: int, counters: dict[str, int]) -> Iterator[dict]:
        """Shuffled raw samples of this slot: pass 0 is the plan's run; later passes (only reached when skipped
        samples left the slot short) read the same run again in another order. Each pass's shards are read ahead
        of decoding in a background thread (`storage.read_ahead_blocks`)."""
        segments = self.segments[role]
        slot = self.rank * self.workers + role
        rng = random.Random(_seed(self.seed, self.epoch, slot, 1))
        size = self.data.shuffle_buffer
        blocks = self.storage.read_ahead_blocks
        seq = 0
        for p in count():
            segs = segments if p == 0 else random.Random(_seed(self.seed, self.epoch, slot, 2, p)).sample(
                segments, len(segments))
            before = counters["skipped_samples"]
            emitted = 0
            buf: list[dict] = []
            ahead = ReadAhead([self.shards[seg[0]] for seg in segs], self.storage, blocks=blocks) if blocks else None
            try:
                for k, seg in enumerate(segs):
                    drop = self.excluded[seg[0]]
                    for sample in self._read_segment(*seg, counters, ahead, k):
                        # the slot's own samples: the first of its run's first pass (the rest are padding repeats)
                        own = p == 0 and seq < self.own[role]
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
                    f"rank {self.rank} worker {role}: none of its {len(segs)} shard runs gave a readable sample "
                    f"({counters['skipped_samples'] - before} skipped, {counters['excluded_samples']} excluded); "
                    "check the shards with `vitpipe shards verify` and the exclusion list next to the manifest")

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

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        role = (wid + self.rotation) % self.workers
        pos, done = self.positions[role], self.batches_done[role]
        bs, total = self.batch_size, self.batches_per_slot
        counters = dict.fromkeys(COUNTER_NAMES, 0)
        start_io = io_counters()

        def count_io() -> None:
            now = io_counters()
            for k in ("retries", "bytes_read"):
                counters[k] = now[k] - start_io[k]

        raw = self._raw(role, counters)
        for _ in range(pos):  # resume: replay the stream without decoding
            next(raw)
        count_io()
        base = dict(counters)  # what the replay counted was already counted before the state was taken
        transform = build_transform(self.image_size, self.train, self.data.augment)
        slot = self.rank * self.workers + role
        in_worker = info is not None
        while done < total:
            t0 = time.perf_counter()
            images, labels, keys, own, index = [], [], [], [], []
            aug_seed = _seed(self.seed, self.epoch, slot, 3, done)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(aug_seed)
                while len(images) < bs:
                    sample = next(raw)
                    pos += 1
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
                    images.append(image if self.defer_decode else transform(image))
                    labels.append(label)
                    keys.append(sample["__key__"])
                    own.append(sample["__own__"])
                    index.append(sample["__index__"])
            done += 1
            batch = {"encoded": images, "aug_seed": aug_seed} if self.defer_decode else {
                "image": _stack(images, in_worker)}
            count_io()
            counters["samples"] += bs
            counters["busy_ms"] += round((time.perf_counter() - t0) * 1000)
            # One tensor crosses to the training process through shared memory (each costs a file-descriptor
            # round trip to this worker); the small fields travel pickled and become tensors there (_as_tensors).
            yield {
                **batch,
                "label": torch.stack(labels) if self.label_type == "multi" else labels,  # multi-hot: a tensor
                "key": keys,
                "valid": own,
                "index": index,
                "_meta": [role, pos, done] + [counters[k] - base[k] for k in COUNTER_NAMES],
            }


def _as_tensors(batch: dict[str, Any]) -> None:
    """A worker's batch in the form the loader hands out: labels, valid and index as tensors."""
    if not isinstance(batch["label"], torch.Tensor):
        batch["label"] = torch.tensor(batch["label"], dtype=torch.int64)
    batch["valid"] = torch.tensor(batch["valid"], dtype=torch.bool)
    batch["index"] = torch.tensor(batch["index"], dtype=torch.int64)


def _stack(images: list[torch.Tensor], in_worker: bool) -> torch.Tensor:
    """The batch tensor; in a DataLoader worker it is built straight into shared memory (as torch's default_collate
    does), so handing it to the training process copies nothing more."""
    if not in_worker:
        return torch.stack(images)
    first = images[0]
    storage = first.untyped_storage()._new_shared(len(images) * first.numel() * first.element_size())
    out = first.new(storage).view(len(images), *first.shape)
    return torch.stack(images, out=out)


class StreamingLoader:
    """Per-rank loader: iterate for one epoch of `len(loader)` batches; state_dict()/load_state_dict() resume
    exactly (same world size, workers and batch size). See the module docstring."""

    def __init__(self, manifest: Manifest, data: DataConfig, storage: StorageConfig, *, batch_size: int,
                 image_size: int, in_chans: int = 3, train: bool = True, rank: int = 0, world_size: int = 1,
                 num_classes: int | None = None, drop_last: bool = True, pin_memory: bool = False,
                 batch_decode_device: torch.device | str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if num_classes is None:
            num_classes = manifest.num_classes
        elif manifest.num_classes is not None and num_classes < manifest.num_classes:
            raise ValueError(f"num_classes={num_classes} but dataset {manifest.url} has {manifest.num_classes} "
                             "classes")
        if manifest.label_type == "multi" and not num_classes:
            raise ValueError(f"multi-label dataset {manifest.url}: num_classes is needed for multi-hot labels")
        self.manifest, self.data, self.storage = manifest, data, storage
        self.exclusions = load_exclusions(manifest, storage)  # once per loader: one small read, or a miss
        self.batch_size, self.image_size, self.in_chans, self.train = batch_size, image_size, in_chans, train
        self.rank, self.world_size, self.num_classes, self.drop_last = rank, world_size, num_classes, drop_last
        self.pin_memory = pin_memory
        # set: workers only check each image's header, the batch is decoded and augmented here on that device
        self.batch_decode_device = None if batch_decode_device is None else torch.device(batch_decode_device)
        self._transform = build_transform(image_size, train, data.augment)  # validated now, not in a worker
        self.plan = EpochPlan(np.asarray(manifest.samples_per_shard), world_size, data.num_workers, batch_size,
                              drop_last)
        self.epoch = 0
        self._reset_epoch_position()
        self._base_counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._prestarted: tuple[int, Iterator[dict[str, Any]]] | None = None  # (epoch, its started workers)

    # --- epochs and state ---------------------------------------------------------------------------------------
    def _reset_epoch_position(self) -> None:
        w = self.plan.workers
        self._batches = 0
        self._positions, self._worker_batches = [0] * w, [0] * w
        self._epoch_counters = [dict.fromkeys(COUNTER_NAMES, 0) for _ in range(w)]

    def __len__(self) -> int:
        return self.plan.batches_per_rank

    @property
    def batches_per_epoch(self) -> int:
        return len(self)

    def set_epoch(self, epoch: int) -> None:
        """Moves to `epoch` (from its start), unless the loader is already in it (e.g. resumed mid-epoch)."""
        if epoch != self.epoch:
            self._fold_counters()
            self.epoch = epoch
            self._reset_epoch_position()

    def _fold_counters(self) -> None:
        for c in self._epoch_counters:
            for k in COUNTER_NAMES:
                self._base_counters[k] += c[k]
        self._epoch_counters = [dict.fromkeys(COUNTER_NAMES, 0) for _ in range(self.plan.workers)]

    def counters(self) -> dict[str, int]:
        """Totals over every worker of this rank since the loader started (or since the restored state)."""
        out = dict(self._base_counters)
        for c in self._epoch_counters:
            for k in COUNTER_NAMES:
                out[k] += c[k]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1, "epoch": self.epoch, "batches": self._batches, "positions": list(self._positions),
            "worker_batches": list(self._worker_batches), "counters": self.counters(), "rank": self.rank,
            "world_size": self.world_size, "num_workers": self.data.num_workers, "batch_size": self.batch_size,
            "seed": self.data.seed, "manifest_checksum": self.manifest.checksum,
            "exclusions_checksum": self.exclusions.sha256 if self.exclusions else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"not a loader state (version 1): {str(state)[:80]}")
        self._base_counters = {k: int(state.get("counters", {}).get(k, 0)) for k in COUNTER_NAMES}
        self.epoch = int(state["epoch"])
        self._reset_epoch_position()
        same = (state["world_size"], state["num_workers"], state["batch_size"]) == (
            self.world_size, self.data.num_workers, self.batch_size)
        if state.get("manifest_checksum") != self.manifest.checksum:
            log.warning("loader state was taken on another manifest (%s); resuming anyway",
                        state.get("manifest_checksum"))
        if state.get("exclusions_checksum") != (self.exclusions.sha256 if self.exclusions else None):
            log.warning("loader state was taken with another exclusion list (%s, now %s): the resumed stream "
                        "differs from the one interrupted", state.get("exclusions_checksum"),
                        self.exclusions.url if self.exclusions else "none")
        if state.get("seed") != self.data.seed:
            log.warning("loader state seed %s differs from data.seed %s", state.get("seed"), self.data.seed)
        if not same:
            # A state taken after the last batch of an epoch has finished that epoch: continue with the next one
            # rather than repeating it.
            old = EpochPlan(np.asarray(self.manifest.samples_per_shard), int(state["world_size"]),
                            int(state["num_workers"]), int(state["batch_size"]), self.drop_last)
            if int(state["batches"]) >= old.batches_per_rank:
                self.epoch += 1
            log.warning("loader state from world_size=%s num_workers=%s batch=%s cannot be mapped exactly to "
                        "world_size=%s num_workers=%s batch=%s: epoch %d starts from its beginning",
                        state["world_size"], state["num_workers"], state["batch_size"], self.world_size,
                        self.data.num_workers, self.batch_size, self.epoch)
            return
        self._batches = int(state["batches"])
        self._positions = [int(p) for p in state["positions"]]
        self._worker_batches = [int(b) for b in state["worker_batches"]]

    # --- iteration ----------------------------------------------------------------------------------------------
    def _dataset(self, next_epoch: bool = False) -> _SlotStream:
        """The workers' stream for the rest of the current epoch, or (`next_epoch`) for the next one from its start.
        This rank's runs for the epoch are computed once here; each worker receives only those and their URLs."""
        epoch = self.epoch + 1 if next_epoch else self.epoch
        positions = [0] * self.plan.workers if next_epoch else list(self._positions)
        worker_batches = [0] * self.plan.workers if next_epoch else list(self._worker_batches)
        batches = 0 if next_epoch else self._batches
        urls: list[str] = []
        offsets: list[int] = []
        local: dict[int, int] = {}
        segments = []
        excluded: list[frozenset[str]] = []
        drops = self.exclusions.keys if self.exclusions else {}
        starts = np.concatenate([[0], np.cumsum(self.manifest.samples_per_shard)[:-1]])
        for role in range(self.plan.workers):
            run = []
            for shard, skip, take in self.plan.segments(self.data.seed, epoch, self.rank, role):
                if shard not in local:
                    local[shard] = len(urls)
                    urls.append(self.manifest.shards[shard])
                    offsets.append(int(starts[shard]))
                    excluded.append(drops.get(shard, frozenset()))
                run.append((local[shard], skip, take))
            segments.append(run)
        return _SlotStream(
            shards=urls, offsets=offsets, segments=segments, excluded=excluded,
            own=[self.plan.own_samples(self.rank, w) for w in range(self.plan.workers)], batch_size=self.plan.batch_size,
            batches_per_slot=self.plan.batches_per_slot, seed=self.data.seed, epoch=epoch, rank=self.rank,
            positions=positions, batches_done=worker_batches,
            rotation=batches % self.plan.workers, data=self.data, storage=self.storage,
            image_size=self.image_size, in_chans=self.in_chans, train=self.train,
            label_type=self.manifest.label_type, num_classes=self.num_classes,
            defer_decode=self.batch_decode_device is not None)

    def _decode(self, batch: dict[str, Any]) -> None:
        """A deferred batch's images decoded on `batch_decode_device` and augmented there with the same seeded
        draws a worker makes (the same crops as CPU decoding). An image that passed the header check but does not
        decode is zeros, marked not valid and counted as a bad image."""
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch.pop("encoded")]
        images = decode_batch(encoded, self.batch_decode_device, self.in_chans)
        bad = [i for i, im in enumerate(images) if im is None]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(batch.pop("aug_seed")))
            out = [None if im is None else self._transform(im) for im in images]
        if bad:
            self._base_counters["bad_images"] += len(bad)
            like = next((o for o in out if o is not None), None)
            shape = like.shape if like is not None else (self.in_chans, self.image_size, self.image_size)
            out = [torch.zeros(shape, dtype=torch.uint8, device=self.batch_decode_device) if o is None else o
                   for o in out]
            batch["valid"][bad] = False
        batch["image"] = torch.stack(out)

    def _workers(self, next_epoch: bool = False) -> Iterator[dict[str, Any]]:
        """A started DataLoader iterator (its workers forked and producing) over `_dataset(next_epoch)`."""
        nw = self.data.num_workers
        return iter(torch.utils.data.DataLoader(
            self._dataset(next_epoch), batch_size=None, num_workers=nw, pin_memory=self.pin_memory,
            multiprocessing_context=_WORKER_START if nw > 0 else None,
            prefetch_factor=self.data.prefetch_factor if nw > 0 else None, persistent_workers=False))

    def _iterate(self, batches: Iterator[dict[str, Any]], prestart: bool) -> Iterator[dict[str, Any]]:
        """The current epoch's batches from `batches`, recorded as handed out. `prestart`: once the epoch's last
        batches are in flight, the next epoch's workers are started (`self._prestarted`), so its first batch is
        ready when this epoch ends instead of waiting for the workers' start-up."""
        ahead = max(1, self.data.num_workers) * self.data.prefetch_factor
        for batch in batches:
            meta = batch.pop("_meta")
            _as_tensors(batch)
            role = meta[0]
            self._positions[role], self._worker_batches[role] = meta[1], meta[2]
            self._epoch_counters[role] = dict(zip(COUNTER_NAMES, meta[_META:]))
            self._batches += 1
            if "encoded" in batch:
                self._decode(batch)
            if prestart and self._prestarted is None and self.data.num_workers > 0 and \
                    len(self) - self._batches <= ahead:
                self._prestarted = (self.epoch + 1, self._workers(next_epoch=True))
            yield batch
        if self._batches >= len(self):
            self.set_epoch(self.epoch + 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch (the rest of it, after a restore): `len(self)` batches in total. When the epoch is done the
        loader moves on to the next one."""
        if self._batches >= len(self):
            self.set_epoch(self.epoch + 1)
        yield from self._iterate(self._workers(), prestart=False)

    def infinite(self) -> Iterator[dict[str, Any]]:
        """Batches forever, epoch after epoch; each epoch's workers start while the previous epoch's last batches
        are consumed."""
        self._prestarted = None
        while True:
            if self._batches >= len(self):
                self.set_epoch(self.epoch + 1)
            started, self._prestarted = self._prestarted, None
            if started is not None and started[0] == self.epoch and self._batches == 0:
                batches = started[1]
            else:
                batches = self._workers()
            yield from self._iterate(batches, prestart=True)


def build_loader(manifest_or_url: Manifest | str, data: DataConfig, storage: StorageConfig | None = None, *,
                 batch_size: int, image_size: int, in_chans: int = 3, train: bool = True, rank: int = 0,
                 world_size: int = 1, num_classes: int | None = None, drop_last: bool = True,
                 pin_memory: bool = False) -> StreamingLoader:
    """Builds this rank's loader. The manifest is read and checked here, before any worker starts. `pin_memory`:
    batches land in page-locked memory (for a CUDA device: the copy to it can then overlap compute).
    `data.decode_device: cuda` decodes each batch on this process's current GPU (refused without CUDA)."""
    storage = storage or StorageConfig()
    decode_on = None
    if data.decode_device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("data.decode_device is 'cuda' but this machine has no CUDA device: set "
                             "data.decode_device=cpu (decoding in the DataLoader workers)")
        decode_on = torch.device("cuda", torch.cuda.current_device())
    manifest = manifest_or_url if isinstance(manifest_or_url, Manifest) else load_dataset_spec(manifest_or_url,
                                                                                                storage)
    return StreamingLoader(manifest, data, storage, batch_size=batch_size, image_size=image_size,
                           in_chans=in_chans, train=train, rank=rank, world_size=world_size,
                           num_classes=num_classes, drop_last=drop_last, pin_memory=pin_memory,
                           batch_decode_device=decode_on)
