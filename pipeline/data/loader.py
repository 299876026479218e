"""The streaming loaders over tar shards: `TrainLoader` (training steps, the same samples at any world size, resumable
exactly at another one) and `SplitLoader` (one rank's share of a split, pass after pass: evaluation, where every
sample counts exactly once at any world size).

Training (pipeline.data.epochs.ReaderPlan): each epoch is cut into V virtual readers; step k takes a fixed number of
samples from every reader, so the global batch of a step is a function of (seed, step). A rank serves its block of
readers; its DataLoader workers share them out (worker w serves the rank's readers w, w + n, ...) and each yields
one item per step: its readers' samples for that step. The loader puts a step's items back in reader order and
cuts them into `accumulation` micro-batches of `micro_batch`: the micro-batches of a step are the same whatever the
number of DataLoader workers, and their union over ranks is the same whatever the world size.

A reader's samples go through its own shuffle buffer (seeded by (seed, epoch, reader)) and each sample's augmentation
is seeded by (seed, epoch, reader, position): nothing depends on the rank or the DataLoader worker that serves it.
The loader's state is the step and, per reader, its position (samples taken out of its buffer). A restored loader,
at any world size, replays each of its readers' streams up to its position without decoding (shard bytes are read
again, images are not decoded). States of all the ranks of a checkpoint are merged first (`merge_states`).

A split (pipeline.data.epochs.EpochPlan): each (rank, DataLoader worker) slot reads its run and yields batches of
`batch_size`; every worker yields the same number of batches, so every rank yields the same `len(loader)` batches.

Reading, shuffling, decoding and the handling of bad data (skipped and counted, never fatal) are the workers'
(pipeline.data.streams).

GPU decoding (`data.decode_device: cuda`): the workers only check each image's header and hand the samples over
encoded; the loader decodes them on the GPU (torchvision's batched nvJPEG) and augments them there with the same
seeded draws, so resume stays exact (pixels may differ from libjpeg's in the last bit).

A batch is {"image": uint8 [B, C, S, S] (normalised on the device: pipeline.data.transforms.to_model_input),
"label", "key", "valid": bool [B], "index": int64 [B], "aug": int64 [B]}. `valid` is False for the repeats that pad
an evaluation split to equal batch counts and for refill repeats; `index` is the sample's position in the manifest (a
world-size-independent order for gathered features); `aug` is the seed of the sample's augmentation.
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.data.config import DataConfig, resolve_readers
from pipeline.data.dedup import load_exclusions
from pipeline.data.epochs import EpochPlan, ReaderPlan, Segment, check_world_size
from pipeline.data.manifest import Manifest, load_dataset_spec
from pipeline.data.storage import Storage
from pipeline.data.streams import COUNTER_NAMES, Producer, Stream, as_tensors
from pipeline.data.transforms import build_transform, decode_batch

__all__ = ["build_loader", "build_train_loader", "SplitLoader", "TrainLoader", "merge_states", "for_rank",
           "STATE_VERSION"]

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: the world-dependent plan of one run per (rank, DataLoader worker) slot
# DataLoader workers are forked where the OS can: a process that was itself spawned (torch.multiprocessing ranks,
# pipeline.launch.local) would otherwise spawn them too, re-importing torch and the pipeline (seconds) for every
# pass over a split. They touch no CUDA, so forking a process that uses a GPU is safe.
_WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class _Loader:
    """What the two loaders share: the manifest and its exclusion list, building and starting the workers over a
    set of streams, decoding on the device, and the counters."""

    def __init__(self, manifest: Manifest, data: DataConfig, storage: Storage, *, image_size: int,
                 in_chans: int, train: bool, num_classes: int | None, pin_memory: bool,
                 batch_decode_device: torch.device | str | None):
        if num_classes is None:
            num_classes = manifest.num_classes
        elif manifest.num_classes is not None and num_classes < manifest.num_classes:
            raise ValueError(f"num_classes={num_classes} but dataset {manifest.url} has {manifest.num_classes} "
                             "classes")
        if manifest.label_type == "multi" and not num_classes:
            raise ValueError(f"multi-label dataset {manifest.url}: num_classes is needed for multi-hot labels")
        self.manifest, self.data, self.storage = manifest, data, storage
        self.exclusions = load_exclusions(manifest, storage)  # once per loader: one small read, or a miss
        self.image_size, self.in_chans, self.train, self.num_classes = image_size, in_chans, train, num_classes
        self.pin_memory = pin_memory
        # set: workers only check each image's header, the batch is decoded and augmented here on that device
        self.batch_decode_device = None if batch_decode_device is None else torch.device(batch_decode_device)
        self._transform = build_transform(image_size, train, data.augment)  # validated now, not in a worker
        self._starts = np.concatenate([[0], np.cumsum(manifest.samples_per_shard)[:-1]])
        self._base_counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._epoch_counters: dict[int, dict[str, int]] = {}  # worker -> its counters in the current epoch

    # --- counters -----------------------------------------------------------------------------------------------
    def _fold_counters(self) -> None:
        for c in self._epoch_counters.values():
            for k in COUNTER_NAMES:
                self._base_counters[k] += c[k]
        self._epoch_counters = {}

    def counters(self) -> dict[str, int]:
        """Totals over every worker of this rank since the loader started (or since the restored state)."""
        out = dict(self._base_counters)
        for c in self._epoch_counters.values():
            for k in COUNTER_NAMES:
                out[k] += c[k]
        return out

    # --- workers ------------------------------------------------------------------------------------------------
    def _producer(self, runs: list[tuple[list[Segment], int, tuple[int, ...], int, int]], groups: list[list[int]],
                  items: int) -> Producer:
        """The workers' dataset over `runs` ((segments in manifest shard indexes, own, seed key, take, position) per
        stream): each worker receives only the shards its rank's runs touch, and their URLs."""
        urls: list[str] = []
        offsets: list[int] = []
        excluded: list[frozenset[str]] = []
        local: dict[int, int] = {}
        drops = self.exclusions.keys if self.exclusions else {}
        streams = []
        for segments, own, key, take, position in runs:
            segs = []
            for shard, skip, n in segments:
                if shard not in local:
                    local[shard] = len(urls)
                    urls.append(self.manifest.shards[shard])
                    offsets.append(int(self._starts[shard]))
                    excluded.append(drops.get(shard, frozenset()))
                segs.append((local[shard], skip, n))
            streams.append(Stream(segs, own, key, take, position))
        return Producer(shards=urls, offsets=offsets, excluded=excluded, streams=streams, groups=groups,
                        items=items, data=self.data, storage=self.storage, image_size=self.image_size,
                        in_chans=self.in_chans, train=self.train, label_type=self.manifest.label_type,
                        num_classes=self.num_classes, defer_decode=self.batch_decode_device is not None)

    def _start(self, producer: Producer, workers: int, pin_memory: bool) -> Iterator[dict[str, Any]]:
        """A started DataLoader iterator (its workers forked and producing) over `producer`."""
        return iter(torch.utils.data.DataLoader(
            producer, batch_size=None, num_workers=workers, pin_memory=pin_memory,
            multiprocessing_context=_WORKER_START if workers > 0 else None,
            prefetch_factor=self.data.prefetch_factor if workers > 0 else None, persistent_workers=False))

    def _received(self, item: dict[str, Any]) -> dict[str, Any]:
        """A worker's item as handed out (its small fields as tensors); returns its metadata, after recording the
        worker's counters."""
        meta = item.pop("_meta")
        self._epoch_counters[meta["group"]] = dict(zip(COUNTER_NAMES, meta["counters"]))
        as_tensors(item)
        return meta

    def _decode(self, batch: dict[str, Any]) -> None:
        """Deferred images decoded on `batch_decode_device` and augmented there with each sample's seeded draws (the
        same crops as CPU decoding). An image that passed the header check but does not decode is zeros, marked not
        valid and counted as a bad image."""
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch.pop("encoded")]
        images = decode_batch(encoded, self.batch_decode_device, self.in_chans)
        bad = [i for i, im in enumerate(images) if im is None]
        gen = torch.default_generator
        saved = gen.get_state()
        try:
            out = []
            for im, seed in zip(images, batch["aug"].tolist()):
                gen.manual_seed(seed)
                out.append(None if im is None else self._transform(im))
        finally:
            gen.set_state(saved)
        if bad:
            self._base_counters["bad_images"] += len(bad)
            like = next((o for o in out if o is not None), None)
            shape = like.shape if like is not None else (self.in_chans, self.image_size, self.image_size)
            out = [torch.zeros(shape, dtype=torch.uint8, device=self.batch_decode_device) if o is None else o
                   for o in out]
            batch["valid"][bad] = False
        batch["image"] = torch.stack(out)


class SplitLoader(_Loader):
    """One rank's share of a split: iterate for one pass of `len(loader)` batches (see the module docstring); every
    pass reads the next epoch's order. Evaluation reads with drop_last=False (every sample exactly once)."""

    def __init__(self, manifest: Manifest, data: DataConfig, storage: Storage, *, batch_size: int,
                 image_size: int, in_chans: int = 3, train: bool = True, rank: int = 0, world_size: int = 1,
                 num_classes: int | None = None, drop_last: bool = True, pin_memory: bool = False,
                 batch_decode_device: torch.device | str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        super().__init__(manifest, data, storage, image_size=image_size, in_chans=in_chans, train=train,
                         num_classes=num_classes, pin_memory=pin_memory, batch_decode_device=batch_decode_device)
        self.batch_size, self.rank, self.world_size, self.drop_last = batch_size, rank, world_size, drop_last
        self.plan = EpochPlan(np.asarray(manifest.samples_per_shard), world_size, data.num_workers, batch_size,
                              drop_last)
        self.epoch = 0

    def __len__(self) -> int:
        return self.plan.batches_per_rank

    def _epoch_producer(self, epoch: int) -> Producer:
        plan, seed = self.plan, self.data.seed
        runs = [(plan.segments(seed, epoch, self.rank, w), plan.own_samples(self.rank, w),
                 (seed, epoch, plan.slot(self.rank, w)), plan.batch_size, 0) for w in range(plan.workers)]
        return self._producer(runs, [[w] for w in range(plan.workers)], plan.batches_per_slot)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One pass over the split: `len(self)` batches, the rank's slots' batches in turn."""
        producer = self._epoch_producer(self.epoch)
        for batch in self._start(producer, self.data.num_workers, self.pin_memory):
            self._received(batch)
            if "encoded" in batch:
                self._decode(batch)
            yield batch
        self._fold_counters()
        self.epoch += 1


class TrainLoader(_Loader):
    """One rank's training input: `steps()` yields, step after step, the rank's micro-batches of that step (see the
    module docstring). state_dict()/load_state_dict() resume exactly at any world size the plan serves."""

    def __init__(self, manifest: Manifest, data: DataConfig, storage: Storage, *, global_batch: int,
                 micro_batch: int, image_size: int, in_chans: int = 3, rank: int = 0, world_size: int = 1,
                 num_classes: int | None = None, pin_memory: bool = False, train: bool = True,
                 batch_decode_device: torch.device | str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        readers = resolve_readers(data, global_batch)
        check_world_size(world_size, readers, global_batch, micro_batch)
        super().__init__(manifest, data, storage, image_size=image_size, in_chans=in_chans, train=train,
                         num_classes=num_classes, pin_memory=pin_memory, batch_decode_device=batch_decode_device)
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.plan = ReaderPlan(np.asarray(manifest.samples_per_shard), readers, global_batch)
        self.readers = list(self.plan.readers_of(rank, world_size))
        self.accumulation = global_batch // (world_size * micro_batch)
        k = len(self.readers)
        self.workers = min(max(1, data.num_workers), k)
        if data.num_workers > self.workers:
            log.info("data.num_workers=%d but this rank serves %d virtual readers: %d DataLoader workers",
                     data.num_workers, k, self.workers)
        self.groups = [list(range(w, k, self.workers)) for w in range(self.workers)]
        # where each reader's samples sit in its worker's item, in reader order: (worker, offset, count)
        self._layout = []
        for w, group in enumerate(self.groups):
            offset = 0
            for j in group:
                self._layout.append((j, w, offset, self.plan.take(self.readers[j])))
                offset += self.plan.take(self.readers[j])
        self._layout = [entry[1:] for entry in sorted(self._layout)]
        self.step = 0  # steps handed out
        self._positions = [0] * k  # per reader: samples taken out of its buffer in the current epoch
        self._prestarted: tuple[int, Iterator[dict[str, Any]]] | None = None  # (epoch, its started workers)

    @property
    def epoch(self) -> int:
        return self.plan.locate(self.step)[0]

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def plan_key(self) -> dict[str, Any]:
        """What fixes the sample order: a state taken under another plan cannot continue exactly."""
        return {"readers": self.plan.readers, "global_batch": self.plan.global_batch, "seed": self.data.seed}

    # --- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, **self.plan_key(), "step": self.step,
            "positions": {str(v): p for v, p in zip(self.readers, self._positions)}, "counters": self.counters(),
            "manifest_checksum": self.manifest.checksum,
            "exclusions_checksum": self.exclusions.sha256 if self.exclusions else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues where `state` left off: a state of any world size (`merge_states` of every rank's), with the
        positions of this rank's readers. A state from before the elastic plan (version 1) continues at its step
        with each reader's position as if no sample had been skipped (not exact: said once, with a warning)."""
        if not isinstance(state, dict) or state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"not a loader state (version {STATE_VERSION}): {str(state)[:80]}")
        if state["version"] == STATE_VERSION:
            saved = {k: state.get(k) for k in self.plan_key()}
            if saved != self.plan_key():
                changed = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self.plan_key().items() if saved[k] != v)
                raise ValueError(f"the loader state was taken under another sample plan ({changed}): the sample order "
                                 "would change; set data.virtual_readers, train.global_batch and data.seed back to "
                                 "the checkpoint's values to continue it")
        if state.get("manifest_checksum") != self.manifest.checksum:
            log.warning("loader state was taken on another manifest (%s); resuming anyway",
                        state.get("manifest_checksum"))
        if state.get("exclusions_checksum") != (self.exclusions.sha256 if self.exclusions else None):
            log.warning("loader state was taken with another exclusion list (%s, now %s): the resumed stream "
                        "differs from the one interrupted", state.get("exclusions_checksum"),
                        self.exclusions.url if self.exclusions else "none")
        self._base_counters = {k: int(state.get("counters", {}).get(k, 0)) for k in COUNTER_NAMES}
        self._epoch_counters = {}
        self.step = int(state["step"])
        done = self.plan.locate(self.step)[1]
        positions = state.get("positions")
        if state["version"] != STATE_VERSION or positions is None:
            self._positions = [done * self.plan.take(v) for v in self.readers]
            return
        missing = [v for v in self.readers if str(v) not in positions]
        if missing and done:
            raise ValueError(f"the loader state holds no position for virtual readers {missing[:5]} (a state of one "
                             "rank only? merge every rank's state with merge_states)")
        self._positions = [int(positions.get(str(v), 0)) if done else 0 for v in self.readers]

    # --- iteration ----------------------------------------------------------------------------------------------
    def _epoch_producer(self, epoch: int, done: int, positions: list[int]) -> Producer:
        seed = self.data.seed
        segments = self.plan.segments(seed, epoch, self.readers)
        runs = [(segs, self.plan.run_length(v), (seed, epoch, v), self.plan.take(v), pos)
                for v, segs, pos in zip(self.readers, segments, positions)]
        return self._producer(runs, self.groups, self.plan.steps_per_epoch - done)

    def _workers(self, epoch: int, done: int, positions: list[int]) -> Iterator[dict[str, Any]]:
        nw = self.workers if self.data.num_workers > 0 else 0
        return self._start(self._epoch_producer(epoch, done, positions), nw, self.pin_memory and self.workers == 1)

    def _assemble(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One step's worker items -> its micro-batches: the samples in reader order, cut into `accumulation`
        micro-batches of `micro_batch`."""
        if len(items) == 1:
            step = items[0]
        else:
            step = {}
            for name in ("label", "valid", "index", "aug", "image"):
                if name not in items[0]:
                    continue
                parts = [items[w][name][o:o + n] for w, o, n in self._layout]
                out = None
                if name == "image" and self.pin_memory:
                    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype,
                                      pin_memory=True)
                step[name] = torch.cat(parts, out=out) if out is not None else torch.cat(parts)
            for name in ("key", "encoded"):
                if name in items[0]:
                    step[name] = [x for w, o, n in self._layout for x in items[w][name][o:o + n]]
        if "encoded" in step:
            self._decode(step)
        m = self.micro_batch
        return [{name: value[i * m:(i + 1) * m] for name, value in step.items()} for i in range(self.accumulation)]

    def steps(self) -> Iterator[list[dict[str, Any]]]:
        """The rank's micro-batches of each step, step after step, epoch after epoch. Each epoch's workers start
        while the previous epoch's last steps are consumed. Closing the generator (or dropping it) stops the
        workers at once: none is left reading storage behind a loader that is done."""
        self._prestarted = None
        ahead = self.data.prefetch_factor
        items: Iterator[dict[str, Any]] | None = None
        started = None
        try:
            while True:
                epoch, done = self.plan.locate(self.step)
                started, self._prestarted = self._prestarted, None
                if started is not None and started[0] == epoch and done == 0:
                    items = started[1]
                else:
                    items = self._workers(epoch, done, self._positions)
                while done < self.plan.steps_per_epoch:
                    got = [next(items) for _ in range(self.workers)]
                    for w, item in enumerate(got):
                        meta = self._received(item)
                        if meta["group"] != w:  # the DataLoader hands items out round-robin over the workers
                            raise RuntimeError(f"step {self.step}: worker {meta['group']}'s item arrived in "
                                               f"worker {w}'s turn")
                        for j, position in zip(self.groups[w], meta["positions"]):
                            self._positions[j] = position
                    micro = self._assemble(got)
                    self.step += 1
                    done += 1
                    if done == self.plan.steps_per_epoch:  # the epoch is over: the next one starts from its beginning
                        self._fold_counters()
                        self._positions = [0] * len(self.readers)
                    elif self.data.num_workers > 0 and self._prestarted is None and \
                            self.plan.steps_per_epoch - done <= ahead:
                        self._prestarted = (epoch + 1, self._workers(epoch + 1, 0, [0] * len(self.readers)))
                    yield micro
        finally:
            # the last references to the DataLoader iterators: their workers are shut down here, not at exit
            items = started = self._prestarted = None


def merge_states(states: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One loader state from every rank's (a checkpoint's), for any new world size: the readers' positions
    together, the counters summed (the new rank 0 carries them; `for_rank`). All must be at the same step."""
    states = [s for s in states if s is not None]
    if not states:
        return None
    if len({int(s.get("step", -1)) for s in states if s.get("version") == STATE_VERSION}) > 1:
        raise ValueError(f"loader states at different steps: {sorted({s.get('step') for s in states})}")
    merged = dict(states[0])
    positions: dict[str, int] = {}
    for s in states:
        positions.update(s.get("positions") or {})
    merged["positions"] = positions if states[0].get("version") == STATE_VERSION else None
    names = set().union(*(s.get("counters", {}) for s in states))
    merged["counters"] = {k: sum(int(s.get("counters", {}).get(k, 0)) for s in states) for k in names}
    return merged


def for_rank(merged: dict[str, Any], rank: int) -> dict[str, Any]:
    """The merged state as rank `rank` loads it: rank 0 carries the run's counters, the others start at zero (the
    totals logged, summed over ranks, stay right)."""
    return merged if rank == 0 else {**merged, "counters": {}}


def build_loader(manifest_or_url: Manifest | str, data: DataConfig, storage: Storage | None = None, *,
                 batch_size: int, image_size: int, in_chans: int = 3, train: bool = True, rank: int = 0,
                 world_size: int = 1, num_classes: int | None = None, drop_last: bool = True,
                 pin_memory: bool = False) -> SplitLoader:
    """Builds this rank's loader of a split (`SplitLoader`; evaluation: train=False, drop_last=False). The manifest
    is read and checked here, before any worker starts. `pin_memory`: batches land in page-locked memory (for a CUDA device: the copy to it can then overlap
    compute). `data.decode_device: cuda` decodes each batch on this process's current GPU (refused without CUDA)."""
    storage = storage or Storage()
    manifest = _manifest(manifest_or_url, storage)
    return SplitLoader(manifest, data, storage, batch_size=batch_size, image_size=image_size, in_chans=in_chans,
                       train=train, rank=rank, world_size=world_size, num_classes=num_classes, drop_last=drop_last,
                       pin_memory=pin_memory, batch_decode_device=_decode_device(data))


def build_train_loader(manifest_or_url: Manifest | str, data: DataConfig, storage: Storage | None = None, *,
                       global_batch: int, micro_batch: int, image_size: int, in_chans: int = 3, rank: int = 0,
                       world_size: int = 1, num_classes: int | None = None, pin_memory: bool = False,
                       train: bool = True) -> TrainLoader:
    """Builds this rank's training input (`TrainLoader`), refusing a world size the plan cannot serve. The manifest
    is read and checked here, before any worker starts."""
    storage = storage or Storage()
    manifest = _manifest(manifest_or_url, storage)
    return TrainLoader(manifest, data, storage, global_batch=global_batch, micro_batch=micro_batch,
                       image_size=image_size, in_chans=in_chans, rank=rank, world_size=world_size,
                       num_classes=num_classes, pin_memory=pin_memory, train=train,
                       batch_decode_device=_decode_device(data))


def _manifest(manifest_or_url: Manifest | str, storage: Storage) -> Manifest:
    return manifest_or_url if isinstance(manifest_or_url, Manifest) else load_dataset_spec(manifest_or_url, storage)


def _decode_device(data: DataConfig) -> torch.device | None:
    if data.decode_device != "cuda":
        return None
    if not torch.cuda.is_available():
        raise ValueError("data.decode_device is 'cuda' but this machine has no CUDA device: set "
                         "data.decode_device=cpu (decoding in the DataLoader workers)")
    return torch.device("cuda", torch.cuda.current_device())
