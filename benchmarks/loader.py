"""Loader throughput against the decode + augment limit (not a test; prints figures and ratios).

  (1) decode + train augmentation in a tight loop over JPEG bytes already in memory: 1 process (the per-core
      limit), or W processes side by side for W workers (the W-core limit; processes, as the loader's workers are)
  (2) our training loader (TrainLoader) over local shards, W DataLoader workers
  (3) our training loader over the moto S3 server (its own `moto_server` process on 127.0.0.1), W workers
Targets: (2)/(1) >= 0.9 and (3)/(2) >= 0.97, for W = 1 and W = 2.

Each round runs (1), (2), (3) in a rotated order (round r starts with the r-th), for W = 1 then W = 2; the figures
are the medians over the rounds. Loader rates are steady-state: counted from each epoch's first batch (the
workers' start-up per epoch is printed apart: it is paid once per epoch, hours apart at ImageNet scale). Where the
time goes is printed beside: the workers' own production time per sample (reading + parsing + decoding +
augmenting, from the loader's busy_ms counter) against the tight loop's, and the moto server's CPU use (on this
2-core machine it shares the cores with the workers).

  .venv/bin/python benchmarks/loader.py [--images 1280] [--size 224] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import JpegSource, make_jpegs, moto_server  # noqa: E402


def tight_loop(jpegs: list[bytes], size: int, seconds: float) -> float:
    import torch

    from pipeline.data.transforms import build_transform, decode_image

    torch.set_num_threads(1)
    tf = build_transform(size, train=True)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tf(decode_image(jpegs[n % len(jpegs)]))
        n += 1
    return n / (time.perf_counter() - t0)


def _tight_child(args) -> float:
    jpegs, size, seconds, offset = args
    return tight_loop(jpegs[offset:] + jpegs[:offset], size, seconds)


def tight_parallel(jpegs: list[bytes], size: int, seconds: float, procs: int) -> float:
    """Samples/s of `procs` tight loops in forked processes at once (summed)."""
    if procs == 1:
        return tight_loop(jpegs, size, seconds)
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        return float(sum(pool.map(_tight_child, [(jpegs, size, seconds, i * 7) for i in range(procs)])))


def loader_rate(url: str, storage, size: int, batch: int, epochs: int, workers: int) -> dict:
    """Steady-state samples/s over `epochs` epochs (each epoch counted from its first batch), the mean time to an
    epoch's first batch, and the workers' production time per sample."""
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_train_loader
    from pipeline.data.storage import Storage

    loader = build_train_loader(url, DataConfig(train=url, num_workers=workers, shuffle_buffer=256), Storage(storage),
                                global_batch=batch, micro_batch=batch, image_size=size)
    steps = loader.steps()
    n, busy, starts = 0, 0.0, []
    for _ in range(epochs):
        t_start, t0 = time.perf_counter(), None
        for _ in range(loader.steps_per_epoch):
            step = next(steps)
            if t0 is None:
                t0 = time.perf_counter()
                starts.append(t0 - t_start)
                continue
            n += sum(len(b["key"]) for b in step)
        busy += time.perf_counter() - t0
    c = loader.counters()
    return {"rate": n / busy, "start_s": float(np.mean(starts)), "busy_ms": c["busy_ms"] / c["samples"],
            "mb": c["bytes_read"] / 1e6}


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1280)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of one tight-loop run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    from pipeline.data.config import StorageConfig
    from pipeline.data.writer import write_shards

    jpegs = make_jpegs(args.images)
    print(f"{len(jpegs)} JPEGs 500x375 q90, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB; "
          f"RandomResizedCrop {args.size} + flip; batch {args.batch}; {args.epochs} epochs per loader run; "
          f"cpus {os.cpu_count()}; {args.rounds} rounds, rotated order")
    tmp = Path(tempfile.mkdtemp(prefix="vitpipe-bench-"))
    with moto_server() as (moto, endpoint):
        s3 = StorageConfig(endpoint_url=endpoint)
        local = write_shards(JpegSource(jpegs), str(tmp / "local"), samples_per_shard=64, progress=False)
        remote = write_shards(JpegSource(jpegs), "s3://bench/ds", samples_per_shard=64, storage=s3, progress=False)

        for w in args.workers:
            runs: dict[str, list] = {"tight": [], "local": [], "s3": []}
            moto_cpu = []

            def s3_run():
                c0, t0 = _cpu_s(moto.pid), time.perf_counter()
                r = loader_rate(remote, s3, args.size, args.batch, args.epochs, w)
                moto_cpu.append((_cpu_s(moto.pid) - c0) / (time.perf_counter() - t0))
                return r

            steps = [("tight", lambda: tight_parallel(jpegs, args.size, args.seconds, w)),
                     ("local", lambda: loader_rate(local, StorageConfig(), args.size, args.batch, args.epochs, w)),
                     ("s3", s3_run)]
            for r in range(args.rounds):
                for name, fn in steps[r % 3:] + steps[:r % 3]:
                    runs[name].append(fn())
            med = lambda xs: float(np.median(xs))  # noqa: E731
            r1 = med(runs["tight"])
            r2, r3 = med([x["rate"] for x in runs["local"]]), med([x["rate"] for x in runs["s3"]])
            print(f"\n-- {w} worker(s) --")
            print(f"(1) decode + augment, tight loop, {w} process(es): {r1:8.1f} samples/s   "
                  f"({1e3 * w / r1:.2f} ms/sample per core)   runs {[round(x) for x in runs['tight']]}")
            for label, key, rate, ref, name in (("(2) loader, local shards   ", "local", r2, r1, "(2)/(1)"),
                                                ("(3) loader, moto S3 server ", "s3", r3, r2, "(3)/(2)")):
                xs = runs[key]
                print(f"{label}                   : {rate:8.1f} samples/s   {name} = {rate / ref:.2f}   "
                      f"runs {[round(x['rate']) for x in xs]}")
                print(f"      workers' production time {med([x['busy_ms'] for x in xs]):.2f} ms/sample "
                      f"(tight loop {1e3 * w / r1:.2f}); epoch start-up {med([x['start_s'] for x in xs]):.2f} s; "
                      f"{med([x['mb'] for x in xs]) / args.epochs:.1f} MB read per epoch")
            print(f"      moto server CPU during (3): {med(moto_cpu):.2f} cores (of {os.cpu_count()})")
            print(f"targets: (2)/(1) >= 0.9: {'met' if r2 / r1 >= 0.9 else 'MISSED'}; "
                  f"(3)/(2) >= 0.97: {'met' if r3 / r2 >= 0.97 else 'MISSED'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
