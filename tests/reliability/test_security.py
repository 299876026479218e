"""Security checks: credentials given through the environment never reach MLflow, artifacts, checkpoints, logs
or printed configs; the services we start listen on 127.0.0.1 only; pickled weights are refused, never run.

One real pretraining (1 Ray worker, DeepSpeed on gloo, shards and run storage on the S3 test server, tracking and
registration on the real MLflow server) runs in a child process whose environment carries distinctive fake
credentials; everything it produced is then scanned for them, and its process tree's listening sockets are
watched while it runs."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.cli import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "configs/pretrain/smoke.yaml"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAVPLEAKCHECK7Q2ZX",
    "AWS_SECRET_ACCESS_KEY": "vpSecretKey/LeakCheck+9f3a7c1e5b2d4",
    "AWS_SESSION_TOKEN": "vpSessionToken-LeakCheck-4b8e1d0a6c",
    "MLFLOW_TRACKING_TOKEN": "vp-mlflow-token-LeakCheck-71c3e9",
}
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _leaks(text: str | bytes, where: str) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return [f"{name} in {where}" for name, value in SECRETS.items() if value in text]


# --- one real run with credentials in the environment -----------------------------------------------------------
def _listening(pids: set[int]) -> set[tuple[str, str, int]]:
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                name = "?"
            out.add((name, c.laddr.ip, c.laddr.port))
    return out


def _tree(pid: int) -> set[int]:
    try:
        p = psutil.Process(pid)
        return {pid, *(c.pid for c in p.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


@pytest.fixture(scope="module")
def secret_run(s3_server, mlflow_server, tmp_path_factory):
    """`vitpipe pretrain` (smoke model, 1 Ray worker, 2 steps, registration) in a child process with the fake
    credentials set; yields what it printed, where its Ray logs went, its MLflow run and every listening socket
    its process tree opened."""
    import boto3

    from pipeline.data.writer import write_array_shards
    from tests.fixtures.s3 import make_storage_config

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="security")
    rng = np.random.default_rng(0)
    manifest = write_array_shards(
        rng.integers(0, 256, (32, 16, 16)).astype(np.uint8), rng.integers(0, 4, 32), "s3://security/data/train",
        name="sec", split="train", class_names=list("abcd"), samples_per_shard=16,
        storage=make_storage_config(s3_server))
    ray_tmp = tempfile.mkdtemp(prefix="vp-sec-", dir="/tmp")  # short: Ray's unix sockets live there
    env = {**os.environ, **SECRETS, "RAY_TMPDIR": ray_tmp, "AWS_ENDPOINT_URL": s3_server}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "pipeline.cli", "pretrain", SMOKE, "--set", "name=secret-run",
            "model.image_size=16", "model.num_classes=4", f"data.train={manifest}", "data.num_workers=0",
            "data.shuffle_buffer=0", "train.steps=2", "train.global_batch=16", "train.micro_batch=16",
            "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=1", "train.zero.stage=1",
            "scaling.num_workers=1", "scaling.storage_path=s3://security/runs", "tracking.sink=mlflow",
            f"tracking.tracking_uri={mlflow_server.url}", "tracking.experiment=security",
            "tracking.registered_model=security-model", "tracking.flush_every_s=0.2"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: set[tuple[str, str, int]] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(_listening(_tree(proc.pid)))
            done.wait(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    result = json.loads(text[text.rindex("\n{") + 1:])
    yield {"output": text, "ray_tmp": Path(ray_tmp), "result": result, "listening": seen,
           "mlflow": mlflow_server.url, "s3": s3}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_credentials_never_reach_tracking_artifacts_checkpoints_or_logs(secret_run, tmp_path):
    import mlflow.artifacts
    from mlflow import MlflowClient

    result = secret_run["result"]
    assert result["run_id"] and result["registered"] == "models:/security-model/1", result
    leaks = _leaks(secret_run["output"], "the driver output (with the Ray workers' logs)")
    assert "train/loss" in secret_run["output"] or result["train/loss"] is not None

    # every file Ray wrote for this session (raylet, GCS, workers, Train controller logs)
    ray_files = [p for p in secret_run["ray_tmp"].rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix in (".log", ".out", ".err") for p in ray_files), "no Ray logs found"
    for p in ray_files:
        leaks += _leaks(p.read_bytes(), f"Ray log {p.name}")

    # MLflow: the run (params, tags, metric names, every artifact downloaded), the registered version, the model
    client = MlflowClient(secret_run["mlflow"])
    run = client.get_run(result["run_id"])
    assert run.data.params and "train.zero.stage" in run.data.params
    leaks += _leaks(json.dumps(run.data.params), "MLflow params")
    leaks += _leaks(json.dumps(run.data.tags), "MLflow run tags")
    leaks += _leaks(json.dumps(sorted(run.data.metrics)), "MLflow metric names")
    leaks += _leaks(json.dumps(client.get_experiment(run.info.experiment_id).tags), "MLflow experiment tags")
    local = Path(client.download_artifacts(result["run_id"], "", str(tmp_path / "artifacts")))
    version = client.get_model_version("security-model", "1")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))  # the registered pyfunc model
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location,
                                                         dst_path=str(tmp_path / "model"),
                                                         tracking_uri=secret_run["mlflow"]))
    artifacts = [p for p in [*local.rglob("*"), *model_dir.rglob("*")] if p.is_file()]
    assert {"deepspeed_config.json", "model.safetensors", "model.json", "MLmodel"} <= {p.name for p in artifacts}
    for p in artifacts:
        leaks += _leaks(p.read_bytes(), f"MLflow artifact {p.name}")
    leaks += _leaks(json.dumps({**logged.params, **logged.tags}), "the logged model's params and tags")
    leaks += _leaks(json.dumps({**version.tags, "d": version.description, "s": version.source}),
                    "the registered model version")

    # the run folder in storage: ZeRO checkpoints, train_state (resolved config, loader state), the final model
    s3 = secret_run["s3"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="security", Prefix="runs/secret-run/")["Contents"]]
    assert any(k.endswith("train_state.rank0.json") for k in keys) and any(k.endswith("final/model.json")
                                                                          for k in keys)
    for k in keys:
        leaks += _leaks(s3.get_object(Bucket="security", Key=k)["Body"].read(), f"s3://security/{k}")
    assert not leaks, leaks


def test_the_run_shows_one_progress_line_per_interval_and_no_ray_noise(secret_run):
    """The same `vitpipe pretrain` run, as its user reads it: each logging interval is one progress line, printed
    once; Ray Train's echo of every report and its State API polling are not shown, but stay in Ray's logs."""
    import re

    text = secret_run["output"]
    progress = [line for line in text.splitlines() if re.search(r"\bstep \d+/2 \(\d+%\)", line)]
    assert [re.search(r"step (\d+)/2", line)[1] for line in progress] == ["1", "2"], progress
    assert all(k in progress[0] for k in ("loss ", " img/s", "data wait ", "ETA ")), progress[0]
    for noise in ("Reporting training result", "Failed to query Ray Train Controller actor state", "FutureWarning"):
        assert noise not in text, noise
    ray_logs = b"".join(p.read_bytes() for p in secret_run["ray_tmp"].rglob("*")
                        if p.is_file() and not p.is_symlink() and p.suffix in (".log", ".out", ".err"))
    assert b"Reporting training result" in ray_logs  # filtered from the terminal only


def test_printed_configs_and_dry_run_hide_credentials(monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    assert main(["config", "show", SMOKE]) == 0
    assert main(["config", "show", "configs/transfer/smoke.yaml", "--json"]) == 0
    shown = capsys.readouterr()
    assert "vit_pico4" in shown.out
    assert main(["submit", "pretrain", SMOKE, "--dry-run", "--address", "http://127.0.0.1:1"]) == 0
    dry = capsys.readouterr()
    # the credentials are forwarded to the job (the cluster needs them), but printed redacted
    env_vars = json.loads(dry.out.split("runtime_env: ", 1)[1])["env_vars"]
    assert {env_vars[k] for k in SECRETS} == {"***"}, env_vars
    assert not _leaks(shown.out + shown.err + dry.out + dry.err, "printed output")


# --- services bind 127.0.0.1 ------------------------------------------------------------------------------------
def _exposed(seen):
    return sorted((n, ip, port) for n, ip, port in seen if ip not in LOOPBACK)


def test_run_processes_listen_on_loopback_only(secret_run):
    """Everything the pretraining's process tree listened on while it ran: the local Ray (GCS, raylet, object
    manager, dashboard agent, runtime-env agent, every worker's gRPC server) binds 127.0.0.1. The one exception,
    torch.distributed's TCPStore in the Train worker, is the known defect below."""
    seen = secret_run["listening"]
    names = {name for name, _, _ in seen}
    assert any("gcs" in n for n in names) and any("raylet" in n for n in names), seen
    assert any("RayTrainWorker" in n for n in names), seen
    store_ports = {port for n, ip, port in _exposed(seen) if "RayTrainWorker" in n}
    others = [(n, ip, port) for n, ip, port in _exposed(seen) if port not in store_ports]
    assert not others, f"listening beyond loopback: {others}"


@pytest.mark.xfail(strict=True, reason="DEFECT: torch.distributed's TCPStore (MASTER_PORT, created by Ray Train's "
                   "process-group setup in the worker) listens on the wildcard address '::' even though MASTER_ADDR "
                   "is 127.0.0.1; torch offers no bind address, only a pre-bound master_listen_fd")
def test_torch_distributed_store_listens_on_loopback(secret_run):
    assert not _exposed(secret_run["listening"]), _exposed(secret_run["listening"])


def test_test_services_listen_on_loopback_only(s3_server, mlflow_server):
    """The moto S3 server process and the mlflow server process tree."""
    from tests.fixtures.s3 import s3_server_pid

    s3_port = int(s3_server.rsplit(":", 1)[1])
    sockets = _listening(_tree(s3_server_pid(s3_server)))
    assert any(port == s3_port for _, _, port in sockets), sockets
    assert all(ip in LOOPBACK for _, ip, _ in sockets), sockets
    assert mlflow_server.running
    sockets = _listening(_tree(mlflow_server._proc.pid))
    assert any(port == mlflow_server.port for _, _, port in sockets), sockets
    assert all(ip in LOOPBACK for _, ip, _ in sockets), sockets


# --- pickles are refused, never executed ------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates `path`: proof that a loader ran code from the file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@pytest.fixture
def payloads(tmp_path):
    """The same payload as a plain pickle (.bin), via torch.save (.pt, .pth) and renamed to model.safetensors."""
    import torch

    marker = tmp_path / "PWNED"
    files = {}
    (tmp_path / "in").mkdir()
    files["bin"] = tmp_path / "in" / "model.bin"
    files["bin"].write_bytes(pickle.dumps({"patch_embed.proj.weight": _Payload(marker)}))
    for ext in ("pt", "pth"):
        files[ext] = tmp_path / "in" / f"model.{ext}"
        torch.save({"state_dict": {"cls_token": _Payload(marker)}}, files[ext])
    files["safetensors"] = tmp_path / "in" / "model.safetensors"
    shutil.copy(files["pt"], files["safetensors"])
    assert not marker.exists()
    return marker, files


@pytest.mark.parametrize("ext", ["bin", "pt", "pth", "safetensors"])
def test_model_convert_refuses_pickles(payloads, ext, tmp_path, capsys):
    marker, files = payloads
    rc = main(["model", "convert", "--source", "timm", str(files[ext]), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and str(files[ext]) in err, err
    assert ("refused" if ext != "safetensors" else "not a valid safetensors file") in err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert not marker.exists(), "the pickle ran"
    assert not (tmp_path / "out").exists()


def test_load_checkpoint_refuses_pickles(payloads, tmp_path):
    from pipeline.model import build_model
    from pipeline.model.checkpoint import load_checkpoint, save_checkpoint

    marker, files = payloads
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model("vit_pico4", image_size=8, num_classes=3))
    # 1) the weights replaced by a pickle under our file name
    shutil.copy(files["pt"], ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        load_checkpoint(ckpt)
    # 2) only a pickle beside model.json: never looked at
    (ckpt / "model.safetensors").unlink()
    shutil.copy(files["pt"], ckpt / "model.pt")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        load_checkpoint(ckpt)
    assert not marker.exists(), "the pickle ran"


def test_registry_import_refuses_pickles(payloads, mlflow_uri, capsys):
    from mlflow import MlflowClient

    marker, files = payloads
    for ext in ("bin", "pth"):
        rc = main(["registry", "--tracking-uri", mlflow_uri, "import", "--source", "timm", str(files[ext]),
                   f"evil-import-{ext}"])
        err = capsys.readouterr().err
        assert rc == 2 and "refused" in err and str(files[ext]) in err, err
    assert not marker.exists(), "the pickle ran"
    names = {m.name for m in MlflowClient(mlflow_uri).search_registered_models()}
    assert not {"evil-import-bin", "evil-import-pth"} & names  # nothing half-registered


def _register_artifacts(client, name: str, files: dict[str, Path]) -> str:
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        for dest, src in files.items():
            shutil.copy(src, Path(tmp) / dest)
            client.log_artifact(run_id, str(Path(tmp) / dest), "checkpoint")
    client.create_registered_model(name)
    return client.create_model_version(name, f"runs:/{run_id}/checkpoint", run_id=run_id).version


def test_registry_versions_holding_pickles_are_refused(payloads, mlflow_uri, tmp_path, capsys):
    """A registered version whose artifacts are a pickle (beside, or instead of, our safetensors): `vitpipe
    transfer --from` and download_checkpoint + load_checkpoint refuse it before any worker starts."""
    from mlflow import MlflowClient

    from pipeline.errors import RegistryError
    from pipeline.model import build_model
    from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.tracking.registry import download_checkpoint

    marker, files = payloads
    good = save_checkpoint(tmp_path / "good", build_model("vit_pico4", image_size=8, num_classes=3))
    client = MlflowClient(mlflow_uri)
    tag = os.urandom(3).hex()
    beside = _register_artifacts(client, f"evil-beside-{tag}", {"model.json": good / "model.json",
                                                                "model.pt": files["pt"]})
    renamed = _register_artifacts(client, f"evil-renamed-{tag}", {"model.json": good / "model.json",
                                                                  "model.safetensors": files["pt"]})
    common = ["--set", "data.train=/nonexistent/train", "data.val=/nonexistent/val",
              f"scaling.storage_path={tmp_path}/runs", "--workdir", str(tmp_path / "work")]
    rc = main(["transfer", "configs/transfer/smoke.yaml", "--from", f"models:/evil-beside-{tag}/{beside}",
               *common])
    err = capsys.readouterr().err
    assert rc == 2 and "missing model.safetensors" in err and "model.pt" in err, err
    rc = main(["transfer", "configs/transfer/smoke.yaml", "--from", f"models:/evil-renamed-{tag}/{renamed}",
               *common])
    err = capsys.readouterr().err
    assert rc == 2 and "not a loadable vitpipe checkpoint" in err and "not a valid safetensors file" in err, err
    assert not (tmp_path / "runs").exists()  # no run was started

    with pytest.raises(RegistryError, match="missing model.safetensors"):
        download_checkpoint(f"models:/evil-beside-{tag}/{beside}", tmp_path / "dl1")
    local, _ = download_checkpoint(f"models:/evil-renamed-{tag}/{renamed}", tmp_path / "dl2")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(local)
    assert not marker.exists(), "the pickle ran"
