"""Loader throughput against the per-core decode + augment limit (not a test; prints figures and ratios).

  (1) decode + train augmentation in a tight loop over JPEG bytes already in memory, one thread (the per-core limit)
  (2) our StreamingLoader over local shards, 1 DataLoader worker
  (3) our StreamingLoader over the moto S3 server (a separate `moto_server` process on 127.0.0.1), 1 worker
Targets: (2)/(1) >= 0.9 and (3)/(1) >= 0.9.

  .venv/bin/python benchmarks/loader.py [--images 640] [--size 224] [--batch 32]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpegs(n: int) -> list[bytes]:
    """500x375 q90 JPEGs cut from the two real photos scikit-learn ships (the figures in ENVIRONMENT.md use these)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = photos[i % 2]
        y, x = rng.integers(0, p.shape[0] - 375 + 1), rng.integers(0, p.shape[1] - 500 + 1)
        crop = p[y:y + 375, x:x + 500]
        if i % 4 >= 2:
            crop = crop[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


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


def loader_rate(url: str, storage, size: int, batch: int, epochs: int) -> float:
    """Samples/s over `epochs` epochs, from the first batch on (the first worker's start-up excluded; later epochs'
    worker start-ups included)."""
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader

    loader = build_loader(url, DataConfig(train=url, num_workers=1, shuffle_buffer=256), storage, batch_size=batch,
                          image_size=size)
    n, t0 = 0, None
    for _ in range(epochs):
        for b in loader:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += len(b["key"])
    return n / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of one tight-loop run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is reported; "
                    "the machine is shared, so single runs are noisy)")
    args = ap.parse_args()

    from pipeline.data.config import StorageConfig
    from pipeline.data.shards import write_array_shards  # noqa: F401  (import cost outside the timings)
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import Source, SourceItem

    jpegs = make_jpegs(args.images)

    class Jpegs(Source):
        kind, class_names = "bench", [str(i) for i in range(10)]

        def __len__(self):
            return len(jpegs)

        def item(self, i):
            return SourceItem(key=f"{i:08d}", data=jpegs[i], ext="jpg", label=i % 10)

    print(f"{len(jpegs)} JPEGs 500x375 q90, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB; "
          f"RandomResizedCrop {args.size} + flip; batch {args.batch}; 1 worker; cpus {os.cpu_count()}")
    med = lambda f: float(np.median([f() for _ in range(args.repeats)]))  # noqa: E731
    r1 = med(lambda: tight_loop(jpegs, args.size, args.seconds))
    print(f"(1) decode + augment, tight loop, 1 thread : {r1:8.1f} samples/s")

    tmp = Path(tempfile.mkdtemp(prefix="vitpipe-bench-"))
    moto = None
    try:
        local = write_shards(Jpegs(), str(tmp / "local"), samples_per_shard=64, progress=False)
        r2 = med(lambda: loader_rate(local, StorageConfig(), args.size, args.batch, args.epochs))
        print(f"(2) loader, local shards                 : {r2:8.1f} samples/s   (2)/(1) = {r2 / r1:.2f}")

        port = free_port()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                 str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        storage = StorageConfig(endpoint_url=endpoint)
        from pipeline.data.storage import get_filesystem

        fs, _ = get_filesystem("s3://bench", storage)
        fs.mkdir("bench")
        remote = write_shards(Jpegs(), "s3://bench/ds", samples_per_shard=64, storage=storage, progress=False)
        r3 = med(lambda: loader_rate(remote, storage, args.size, args.batch, args.epochs))
        print(f"(3) loader, moto S3 server               : {r3:8.1f} samples/s   (3)/(1) = {r3 / r1:.2f}")
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
