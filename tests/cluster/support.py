"""Helpers of the cluster tests: `vitpipe` as a user runs it (or in the background), job ids and statuses from its output, the tiny IDX
source files the shards job converts, MLflow lookups by run name."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
VITPIPE = [sys.executable, "-m", "pipeline.cli"]


def vitpipe(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`vitpipe ARGS` from the project root with the stack's client environment; its output is printed (pytest -s)."""
    try:
        r = subprocess.run([*VITPIPE, *args], capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"vitpipe {' '.join(args[:2])} still running after {timeout} s:\n{out[-6000:]}")
    print(r.stdout[-3000:], r.stderr[-2000:], sep="\n")
    return r


def vitpipe_popen(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`vitpipe ARGS` started in the background (stdout and stderr together, as text)."""
    return subprocess.Popen([*VITPIPE, *args], env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def submitted(r: subprocess.CompletedProcess) -> str:
    ids = [line.split()[-1] for line in r.stdout.splitlines() if line.startswith("submitted:")]
    assert ids, "no job was submitted:\n" + r.stdout[-3000:] + r.stderr[-3000:]
    return ids[0]


def status(job: str, env: dict[str, str]) -> str:
    r = vitpipe(["jobs", "status", job, "--json"], env, timeout=60)
    return json.loads(r.stdout)["status"]


def succeeded(r: subprocess.CompletedProcess, env: dict[str, str]) -> str:
    """The job id, after checking `--follow` exited 0 and `vitpipe jobs status` says SUCCEEDED."""
    job = submitted(r)
    assert r.returncode == 0, f"job {job} failed:\n" + r.stdout[-6000:] + r.stderr[-3000:]
    assert status(job, env) == "SUCCEEDED"
    return job


def worker_ips(job_logs: str) -> set[str]:
    """The node addresses of Ray Train's worker group, from the controller's 'Started training worker group'."""
    return set(re.findall(r"\(ip=([0-9.]+), pid=\d+\) world_rank=\d+", job_logs))


def run_by_name(tracking_uri: str, experiment: str, name: str):
    """The one MLflow run of that name in that experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"runs named {name}: {[r.info.run_id for r in runs]}"
    return runs[0]


def wait_for(check, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _write_idx(path: Path, arr: np.ndarray) -> str:
    """A gzipped IDX file (MNIST's format) of uint8 values."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())
    return str(path)


def source_files(tmp_path: Path) -> dict[str, str]:
    """Tiny IDX files for the shards jobs: a slice of Fashion-MNIST (the Debian package) for pretraining, and
    scikit-learn's digits at 28 px for the transfer."""
    from pipeline.commands.demo_data import digits_28px, find_fashion_mnist
    from pipeline.data.sources import read_idx

    fm = find_fashion_mnist()
    digits, digit_labels = digits_28px()
    if fm is None:  # the demo's fallback: digits for pretraining too
        pre = {"train": (digits[:512], digit_labels[:512]), "val": (digits[512:768], digit_labels[512:768])}
    else:
        tr_x, tr_y = read_idx(str(fm["train_images"])), read_idx(str(fm["train_labels"]))
        te_x, te_y = read_idx(str(fm["test_images"])), read_idx(str(fm["test_labels"]))
        pre = {"train": (tr_x[:512], tr_y[:512]), "val": (te_x[:256], te_y[:256])}
    order = np.random.default_rng(0).permutation(len(digits))
    digits, digit_labels = digits[order], digit_labels[order]
    sets = {**pre, "digits-train": (digits[:384], digit_labels[:384]),
            "digits-test": (digits[384:640], digit_labels[384:640])}
    out = {}
    for name, (x, y) in sets.items():
        out[f"{name}-images"] = _write_idx(tmp_path / f"{name}-images-idx3-ubyte.gz", x)
        out[f"{name}-labels"] = _write_idx(tmp_path / f"{name}-labels-idx1-ubyte.gz", y)
    return out
