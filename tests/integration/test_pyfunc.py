"""A registered version is an MLflow pyfunc model logged from code: `mlflow.pyfunc.load_model` and
`mlflow models serve` run it against the real `mlflow server` (artifacts on the S3 test server), on real images
(scikit-learn's digit scans), and nothing in it is a pickle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.commands.demo_data import digits_28px
from pipeline.data.config import AugmentConfig
from pipeline.data.transforms import normalize
from pipeline.model import build_model
from pipeline.model.checkpoint import load_model, save_checkpoint
from tests.fixtures.mlflow import register_in_new_run
from tests.fixtures.s3 import free_port

pytestmark = pytest.mark.integration


def _random_model(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("vit_pico4", image_size=28, in_chans=3, **kwargs)
    with torch.no_grad():  # not the zero head init, so the outputs are a real check
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _digits_rgb(n: int) -> np.ndarray:
    images, _ = digits_28px(28)
    return np.repeat(images[:n, :, :, None], 3, axis=3)  # uint8 [n, 28, 28, 3]


def _reference(checkpoint: Path, images: np.ndarray, mode: str) -> np.ndarray:
    """The project's own path: load_model + the training loop's normalisation."""
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), AugmentConfig(normalize=mode))
    with torch.inference_mode():
        return load_model(checkpoint).eval()(x).numpy()


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    ckpt = save_checkpoint(tmp_path_factory.mktemp("pyfunc"), _random_model(0, num_classes=10))
    version = register_in_new_run(ckpt, name="pyfunc-digits", alias="champion", tracking_uri=mlflow_server.url,
                                  experiment="pyfunc")
    return ckpt, version


def test_pyfunc_load_returns_the_projects_logits(mlflow_uri, registered, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    ckpt, version = registered
    assert version.source.startswith("models:/m-")
    model = mlflow.pyfunc.load_model("models:/pyfunc-digits@champion")
    images = _digits_rgb(16)
    logits = model.predict(images)
    want = _reference(ckpt, images, "imagenet")
    assert logits.dtype == np.float32 and logits.shape == (16, 10)
    assert np.abs(want).max() > 0.1  # a real model, not zeros
    assert np.abs(logits - want).max() < 1e-5
    sig = model.metadata.signature
    assert sig.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "uint8", "shape": (-1, 28, 28, 3)}
    assert sig.outputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 10)}

    # the version page shows a logged model of the run, with an input example; no file is a pickle
    client = MlflowClient(mlflow_uri)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == version.run_id
    run = client.get_run(version.run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location, dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "input_example.json", "artifacts/model.safetensors",
            "artifacts/model.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model.pkl" not in mlmodel


def test_pyfunc_headless_model_returns_features_with_its_normalisation(mlflow_uri, tmp_path):
    import mlflow

    ckpt = save_checkpoint(tmp_path / "ckpt", _random_model(1, num_classes=0))
    from pipeline.tracking.config import TrackingConfig
    from pipeline.tracking.run import TrackedRun

    with TrackedRun.open(TrackingConfig(sink="mlflow", tracking_uri=mlflow_uri, experiment="pyfunc"), "feat") as run:
        run.register(ckpt, name="pyfunc-features", normalize="inception")
    images = _digits_rgb(4)
    features = mlflow.pyfunc.load_model("models:/pyfunc-features@latest").predict(images)
    want = _reference(ckpt, images, "inception")
    assert features.shape == want.shape and want.shape[1] > 10
    assert np.abs(features - want).max() < 1e-5
    assert np.abs(want - _reference(ckpt, images, "imagenet")).max() > 1e-3  # the normalisation is in force


def test_mlflow_models_serve_scores_a_real_image(mlflow_uri, registered, tmp_path):
    ckpt, _ = registered
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/pyfunc-digits@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"mlflow models serve exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no /ping answer in 180 s:\n{log_path.read_text()}"
            time.sleep(1)
        images = _digits_rgb(2)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            predictions = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
        want = _reference(ckpt, images, "imagenet")
        assert predictions.shape == (2, 10)
        assert np.abs(predictions - want).max() < 1e-4  # through JSON
        assert predictions.argmax(1).tolist() == want.argmax(1).tolist()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_database_store_registers_and_loads_the_pyfunc_model(tmp_path, monkeypatch):
    """A sqlite store (the demo's, `mlflow ui --backend-store-uri sqlite:///...`): its registry resolves the
    logged model through the process-wide tracking URI, which nothing here has set."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = save_checkpoint(tmp_path / "ckpt", _random_model(2, num_classes=10))
    version = register_in_new_run(ckpt, name="pyfunc-sqlite", alias="champion", tracking_uri=uri,
                                  experiment="pyfunc-sqlite")
    assert version.source.startswith("models:/m-")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # restored as it was
    mlflow.set_tracking_uri(uri)
    try:
        logits = mlflow.pyfunc.load_model("models:/pyfunc-sqlite@champion").predict(_digits_rgb(3))
    finally:
        mlflow.set_tracking_uri(None)
    assert np.abs(logits - _reference(ckpt, _digits_rgb(3), "imagenet")).max() < 1e-5
