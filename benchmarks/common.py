"""What the benchmarks share: real JPEGs, a moto S3 server in its own process, free ports."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.sources import Source, SourceItem  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_jpegs(n: int, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """q90 JPEGs (width x height) cut from the two real photos scikit-learn ships (the figures in ENVIRONMENT.md
    use 500x375 ones)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    w, h = size
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = photos[i % 2]
        y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
        crop = p[y:y + h, x:x + w]
        if i % 4 >= 2:
            crop = crop[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class JpegSource(Source):
    """JPEG bytes as a shard-writer source, labels i % 10."""

    kind, class_names = "bench", [str(i) for i in range(10)]

    def __init__(self, jpegs: list[bytes]):
        self.jpegs = jpegs

    def __len__(self) -> int:
        return len(self.jpegs)

    def item(self, i: int) -> SourceItem:
        return SourceItem(key=f"{i:08d}", data=self.jpegs[i], ext="jpg", label=i % 10)


@contextlib.contextmanager
def moto_server(bucket: str = "bench") -> Iterator[tuple[subprocess.Popen, str]]:
    """(process, endpoint URL) of a `moto_server` on 127.0.0.1 with `bucket` created; test credentials are put in
    this process's environment (Ray workers started after inherit them)."""
    from pipeline.data.config import StorageConfig
    from pipeline.data.storage import get_filesystem

    port = free_port()
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **creds}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        fs, _ = get_filesystem(f"s3://{bucket}", StorageConfig(endpoint_url=endpoint))
        fs.mkdir(bucket)
        yield proc, endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
