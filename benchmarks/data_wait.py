"""Data wait in the real training loop (not a test; prints figures and ratios).

A 2-worker Ray Train + DeepSpeed ZeRO-2 run of the project's own loop (pipeline.launch.driver.fit ->
pipeline.train.loop.run_training: loader, counters, logging, checkpoint at the end) streaming JPEG shards from the
moto S3 server (its own process on 127.0.0.1), 1 DataLoader worker per rank; the model is sized so that its step
takes about as long as one loader worker needs for a micro-batch. Against it, the same run fed from memory
(`data.synthetic`: the first micro-batch, decoded once, at every step). Printed: perf/data_wait_fraction as the
run logs it (the last logging window, after a warm-up window), the step times of both runs, and the loader's
own capacity (perf/loader_samples_per_s) against what the step consumes.
Target: data wait <= 2% of step time whenever loader throughput >= step throughput.

    .venv/bin/python benchmarks/data_wait.py [--rounds 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vitpipe" / "torch_extensions"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
from common import JpegSource, make_jpegs, moto_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(args, train_url: str, endpoint: str, runs_dir: Path, name: str, synthetic: bool) -> dict:
    from pipeline.config import load_config
    from pipeline.launch.driver import fit
    from pipeline.tracking.sinks import RunRef

    window = args.steps // 2
    cfg = load_config(ROOT / "configs/pretrain/smoke.yaml", [
        f"name={name}", f"model.name={args.variant}", f"model.image_size={args.image_size}", "model.num_classes=10",
        f"data.train={train_url}", "data.num_workers=1", "data.shuffle_buffer=64", f"data.synthetic={synthetic}",
        f"storage.endpoint_url={endpoint}", f"train.micro_batch={args.micro}", f"train.global_batch={2 * args.micro}",
        f"train.steps={2 * window}", f"train.log_every={window}", f"train.checkpoint_every={10 * args.steps}",
        f"train.eval_every={10 * args.steps}", "train.schedule.warmup_steps=0", "train.zero.stage=2",
        "scaling.num_workers=2", f"scaling.storage_path={runs_dir}", "tracking.sink=null",
    ])
    result = fit(cfg, run=RunRef(sink="null"))
    return result.metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="vit_pico4")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--jpeg-size", type=int, nargs=2, default=[256, 192], metavar=("W", "H"))
    ap.add_argument("--micro", type=int, default=32, help="micro batch per rank")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40, help="steps per run: a warm-up window, then the measured one")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from pipeline.data.config import StorageConfig
    from pipeline.data.writer import write_shards
    from pipeline.launch.fanout import connect_ray

    jpegs = make_jpegs(args.images, tuple(args.jpeg_size))
    runs_dir = Path(tempfile.mkdtemp(prefix="vitpipe-bench-wait-"))
    with moto_server() as (_, endpoint):
        url = write_shards(JpegSource(jpegs), "s3://bench/wait", samples_per_shard=128,
                           storage=StorageConfig(endpoint_url=endpoint), progress=False)
        connect_ray()
        s3, mem = [], []
        for r in range(args.rounds):  # the order flips each round
            for synthetic in ((False, True) if r % 2 == 0 else (True, False)):
                m = run(args, url, endpoint, runs_dir, f"wait-{r}-{'mem' if synthetic else 's3'}-{time.time_ns()}",
                        synthetic)
                (mem if synthetic else s3).append(m)
                print(f"round {r} {'memory' if synthetic else 'S3    '}: step {m['perf/step_time_s'] * 1e3:6.1f} ms, "
                      f"data wait {100 * m['perf/data_wait_fraction']:5.2f}%", flush=True)
    shutil.rmtree(runs_dir, ignore_errors=True)
    med = lambda xs, k: float(np.median([x[k] for x in xs]))  # noqa: E731
    step_s3, step_mem = med(s3, "perf/step_time_s"), med(mem, "perf/step_time_s")
    wait = med(s3, "perf/data_wait_fraction")
    capacity = med(s3, "perf/loader_samples_per_s")
    consumed = med(s3, "perf/images_per_s") / 2
    print(f"\n{args.variant} {args.image_size} px, micro batch {args.micro} per rank, 2 Ray workers (ZeRO-2, fp32, gloo), "
          f"1 loader worker each; {len(jpegs)} JPEGs {args.jpeg_size[0]}x{args.jpeg_size[1]} on the moto S3 server; "
          f"median of {args.rounds} rounds, last {args.steps // 2}-step window of each run")
    print(f"  streaming from S3 : step {step_s3 * 1e3:7.1f} ms   perf/data_wait_fraction {100 * wait:5.2f}%   "
          f"store {med(s3, 'perf/store_mb_per_s'):.1f} MB/s")
    print(f"  fed from memory   : step {step_mem * 1e3:7.1f} ms   perf/data_wait_fraction "
          f"{100 * med(mem, 'perf/data_wait_fraction'):5.2f}%")
    print(f"  S3 step / memory step = {step_s3 / step_mem:.3f}")
    print(f"  loader capacity {capacity:.0f} samples/s per rank vs {consumed:.0f} consumed per rank "
          f"(capacity / consumption = {capacity / consumed:.2f}; the workers share 2 cores with the ranks and moto)")
    keeps_up = capacity >= consumed
    print(f"target data wait <= 2% when the loader keeps up: loader {'keeps up' if keeps_up else 'does NOT keep up'}; "
          f"data wait {100 * wait:.2f}% {'met' if wait <= 0.02 else 'MISSED'}")


if __name__ == "__main__":
    main()
