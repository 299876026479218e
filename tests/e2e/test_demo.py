"""End to end on real parts: the local stack with two Ray nodes in network namespaces (moto S3 and an mlflow
server on the bridge), jobs submitted with `vitpipe submit` (shards -> pretraining on both nodes -> transfer from
the registry URI), the registry's lineage, the runs' metrics, and the MLflow UI rendered by headless Chromium.
Then `vitpipe demo --quick` in a temporary workdir.

The Chromium screenshot is kept in tests/e2e/artifacts/ (ignored by git) and its path printed."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.ray_stack import multinode_available

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
VITPIPE = [sys.executable, "-m", "pipeline.cli"]
SUBNET = "10.213.6.0/24"  # not the one tests/integration/test_stack.py uses
PRETRAIN_CFG = "configs/demo/pretrain-quick.yaml"  # relative: submitted configs must lie inside the project
TRANSFER_CFG = "configs/demo/transfer-quick.yaml"
EXPERIMENT = "vit-e2e"
PRETRAINED, FINETUNED = "vit-e2e", "vit-e2e-digits"
PRETRAIN_RUN, TRANSFER_RUN = "e2e-pretrain", "e2e-transfer"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--window-size=1600,1000", "--virtual-time-budget=15000",
]


# -- helpers ----------------------------------------------------------------------------------------------------
def _vitpipe(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run([*VITPIPE, *args], capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"vitpipe {' '.join(args[:2])} still running after {timeout} s:\n{out[-6000:]}")
    print(r.stdout[-3000:], r.stderr[-2000:], sep="\n")
    return r


def _submitted(r: subprocess.CompletedProcess) -> str:
    ids = [line.split()[-1] for line in r.stdout.splitlines() if line.startswith("submitted:")]
    assert ids, "no job was submitted:\n" + r.stdout[-3000:] + r.stderr[-3000:]
    return ids[0]


def _succeeded(r: subprocess.CompletedProcess, env: dict[str, str]) -> str:
    """The job id, after checking `--follow` exited 0 and `vitpipe jobs status` says SUCCEEDED."""
    job = _submitted(r)
    assert r.returncode == 0, f"job {job} failed:\n" + r.stdout[-6000:] + r.stderr[-3000:]
    status = _vitpipe(["jobs", "status", job, "--json"], env, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED", status.stdout[-2000:]
    return job


def _write_idx(path: Path, arr: np.ndarray) -> str:
    """A gzipped IDX file (MNIST's format) of uint8 values."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())
    return str(path)


def _source_files(tmp_path: Path) -> dict[str, str]:
    """Tiny IDX files for the shards jobs: a slice of Fashion-MNIST (the Debian package) for pretraining, and
    scikit-learn's digits at 28 px for the transfer."""
    from pipeline.data.sources import read_idx
    from pipeline.demo import digits_28px, find_fashion_mnist

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
    sets = {**pre, "digits-train": (digits[:384], digit_labels[:384]), "digits-test": (digits[384:640],
                                                                                      digit_labels[384:640])}
    out = {}
    for name, (x, y) in sets.items():
        out[f"{name}-images"] = _write_idx(tmp_path / f"{name}-images-idx3-ubyte.gz", x)
        out[f"{name}-labels"] = _write_idx(tmp_path / f"{name}-labels-idx1-ubyte.gz", y)
    return out


def _worker_ips(job_logs: str) -> set[str]:
    """The node addresses of Ray Train's worker group, from the controller's 'Started training worker group'."""
    return set(re.findall(r"\(ip=([0-9.]+), pid=\d+\) world_rank=\d+", job_logs))


def _chromium(url: str, tmp_path: Path, screenshot: Path | None = None) -> subprocess.CompletedProcess:
    args = [shutil.which("chromium") or "/usr/bin/chromium", *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    args.append(f"--screenshot={screenshot}" if screenshot else "--dump-dom")
    return subprocess.run([*args, url], capture_output=True, text=True, timeout=120)


# -- the stack ----------------------------------------------------------------------------------------------------
def test_jobs_on_two_nodes_registry_lineage_and_mlflow_ui(stack_factory, tmp_path, monkeypatch):
    reason = multinode_available()
    if reason:
        pytest.skip(reason)
    from pipeline.launch.netns import Subnet

    # MLflow 3's server refuses the UI's own API calls (403 "Blocked cross-origin request") when the page's origin
    # is not localhost; the multi-node stack serves on the bridge address, so allow exactly that origin. The
    # server inherits this from our environment (the stack passes --cors-allowed-origins nowhere yet).
    monkeypatch.setenv("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS", f"http://{Subnet(SUBNET).host_ip}:*")
    stack = stack_factory(nodes=2, subnet=SUBNET, ports={"s3": 0, "mlflow": 0}, cpus_per_node=2)
    env = stack.env()
    files = _source_files(tmp_path)
    data = f"s3://{stack.bucket}/e2e"

    # 1. a shards job: the pretraining IDX files -> tar shards on the stack's S3 (written by Ray tasks on the
    # cluster). The three small eval/transfer splits are written from here with the same writer (a job each
    # would add ~15 s apiece and test nothing more).
    dest = f"{data}/train"
    r = _vitpipe(["submit", "shards", "--follow", "--", files["train-images"], dest, "--labels", files["train-labels"],
                  "--name", "fashion-mnist", "--split", "train", "--samples-per-shard", "128", "--no-progress"], env)
    _succeeded(r, env)
    manifests = {"train": f"{dest}/manifest.json"}
    from pipeline.data.config import StorageConfig
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import IdxSource

    storage = StorageConfig(endpoint_url=stack.s3_endpoint)
    with monkeypatch.context() as m:
        for k, v in env.items():
            if k.startswith("AWS_"):
                m.setenv(k, v)
        for split in ("val", "digits-train", "digits-test"):
            name = "digits" if split.startswith("digits") else "fashion-mnist"
            src = IdxSource(files[f"{split}-images"], files[f"{split}-labels"])
            manifests[split] = write_shards(src, f"{data}/{split}", name=name, split=split, samples_per_shard=128,
                                            storage=storage, progress=False)

    # 2. pretraining: 2 workers of 2 CPUs on nodes of 2 CPUs -> one worker per node; ZeRO-2 across the bridge
    runs = f"s3://{stack.bucket}/e2e/runs"
    common = [f"scaling.storage_path={runs}", f"tracking.experiment={EXPERIMENT}", "scaling.cpus_per_worker=2"]
    r = _vitpipe(["submit", "pretrain", PRETRAIN_CFG, "--set", f"name={PRETRAIN_RUN}",
                  f"data.train={manifests['train']}", f"data.val={manifests['val']}",
                  f"data.fewshot_train={manifests['train']}", f"data.fewshot_test={manifests['val']}",
                  "train.steps=10", "train.checkpoint_every=10", "train.eval_every=10", "train.fewshot_every=10",
                  "train.log_every=5", f"tracking.registered_model={PRETRAINED}", *common, "--follow"], env)
    _succeeded(r, env)
    assert _worker_ips(r.stdout) == set(stack.node_ips), (
        f"the 2 workers should run one per node {stack.node_ips}; job logs:\n{r.stdout[-4000:]}")

    # 3. transfer from the registry URI onto digits
    source = f"models:/{PRETRAINED}@champion"
    r = _vitpipe(["submit", "transfer", TRANSFER_CFG, "--from", source, "--set", f"name={TRANSFER_RUN}",
                  f"data.train={manifests['digits-train']}", f"data.val={manifests['digits-test']}",
                  "train.steps=8", "train.checkpoint_every=8", "train.eval_every=8", "train.log_every=4",
                  f"tracking.registered_model={FINETUNED}", *common, "--follow"], env)
    _succeeded(r, env)

    # 4. the registry: both versions, with lineage linking the fine-tuned model to its source
    from mlflow import MlflowClient

    from pipeline.tracking.registry import resolve_version

    uri = stack.mlflow_uri
    pre = resolve_version(source, tracking_uri=uri)
    fine = resolve_version(f"models:/{FINETUNED}@champion", tracking_uri=uri)
    assert pre.version == "1" and fine.version == "1"
    assert pre.tags["dataset.url"].startswith(data) and pre.tags["model.variant"] == "vit_pico4"
    assert pre.tags["run_id"] == pre.run_id and pre.tags["steps"] == "10"
    assert fine.tags["source.registered_model"] == PRETRAINED and fine.tags["source.version"] == pre.version
    assert fine.tags["source.run_id"] == pre.run_id and fine.tags["dataset.url"] == manifests["digits-train"]

    # 5. the runs' metrics, logged from the workers through the tracking server
    client = MlflowClient(uri)
    pre_run, fine_run = client.get_run(pre.run_id), client.get_run(fine.run_id)
    assert pre_run.info.status == fine_run.info.status == "FINISHED"
    assert {"train/loss", "val/prec1", "fewshot/fmnist_10shot"} <= set(pre_run.data.metrics), pre_run.data.metrics
    assert len(client.get_metric_history(pre.run_id, "train/loss")) == 2  # steps 5 and 10
    assert {"train/loss", "final/top1"} <= set(fine_run.data.metrics), fine_run.data.metrics
    assert 0.0 <= fine_run.data.metrics["final/top1"] <= 1.0

    # 6. the MLflow UI (a React app) rendered by headless Chromium: the experiment's page lists both runs
    exp = client.get_experiment_by_name(EXPERIMENT)
    # MLflow 3 opens experiments in its GenAI view; the runs table is the "Model training" workflow's page
    page = f"{uri}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    dom = _chromium(page, tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mlflow-ui.html").write_text(dom.stdout)
    for run_name in (PRETRAIN_RUN, TRANSFER_RUN):
        assert run_name in dom.stdout, f"the MLflow UI page {page} does not show run {run_name}"
    shot = ARTIFACTS / "mlflow-ui.png"
    shot.unlink(missing_ok=True)
    r = _chromium(page, tmp_path, screenshot=shot)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, f"{shot}: {len(png)} bytes"
    print(f"MLflow UI screenshot: {shot}")


# -- the demo -----------------------------------------------------------------------------------------------------
def test_demo_quick_prints_the_summary(tmp_path):
    workdir = tmp_path / "demo"
    r = subprocess.run([*VITPIPE, "demo", "--quick", "--workdir", str(workdir)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=420, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    out = r.stdout
    assert r.returncode == 0, out[-5000:] + r.stderr[-5000:]
    for i in range(1, 6):
        assert f"[demo {i}/5] done in" in out
    summary = out[out.index("vitpipe demo summary"):]
    rows = {line.split()[1] for line in summary.splitlines() if re.match(r"^\d \w+\s+[\d.]+ s ", line)}
    assert rows == {"data", "pretrain", "transfer", "scratch", "registry"}, summary
    assert re.search(r"loss [\d.]+ -> [\d.]+", summary) and "1-shot" in summary, summary
    top1 = re.findall(r"digits top-1 ([\d.]+)%", summary)
    assert len(top1) == 2 and all(0 <= float(a) <= 100 for a in top1), summary
    db = workdir / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000" in summary

    # the store the UI command opens holds what the table reports
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    names = {m.name for m in client.search_registered_models()}
    assert {"vit-demo", "vit-demo-digits"} <= names
    scratch = client.search_runs([client.get_experiment_by_name("vit-demo-transfer").experiment_id],
                                 "attributes.run_name = 'demo-transfer-quick-scratch'")
    assert len(scratch) == 1 and f"{scratch[0].data.metrics['final/top1']:.1%}" == f"{float(top1[1]) / 100:.1%}"
