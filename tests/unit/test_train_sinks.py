"""Metrics sinks and the tracked run's pieces that need no server: parameter flattening, leader-only selection,
stdout format, how a run ends, the worker's reference to the run."""

from __future__ import annotations

import pickle

import pytest

from pipeline.errors import RunStopped
from pipeline.tracking.config import TrackingConfig, resolve_tracking_uri
from pipeline.tracking.run import TrackedRun, end_status
from pipeline.tracking.sinks import MlflowSink, NullSink, RunRef, StdoutSink, build_sink, flatten_params


def test_flatten_params():
    flat = flatten_params({"name": "x", "train": {"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "steps": 3},
                           "empty": {}})
    assert flat == {"name": "x", "train.optim.lr": 1e-3, "train.optim.betas": [0.9, 0.999], "train.steps": 3,
                    "empty": {}}


def test_only_rank_zero_logs_and_a_sink_never_creates_a_run(tmp_path):
    ref = RunRef(sink="mlflow", tracking_uri=f"sqlite:///{tmp_path}/never.db", run_id="abc")
    # ranks other than 0 never touch MLflow (no database file appears)
    assert isinstance(build_sink(ref, rank=1), NullSink)
    assert not (tmp_path / "never.db").exists()
    assert isinstance(build_sink(RunRef(sink="null"), rank=0), NullSink)
    assert isinstance(build_sink(RunRef(sink="stdout"), rank=0), StdoutSink)
    with pytest.raises(ValueError, match="needs the run's id"):
        build_sink(RunRef(sink="mlflow", tracking_uri=ref.tracking_uri), rank=0)
    assert MlflowSink is not None and not (tmp_path / "never.db").exists()


def test_stdout_sink(capsys):
    sink = StdoutSink()
    sink.log_metrics({"train/loss": 2.302585, "perf/images_per_s": 120.0}, step=10)
    sink.log_params({"train": {"steps": 5}})
    out = capsys.readouterr().out
    assert "[step 10] train/loss 2.303  perf/images_per_s 120" in out
    assert "train.steps=5" in out


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://h:1") == "http://h:1"


@pytest.mark.parametrize("exc, status", [
    (None, "FINISHED"), (RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
    (RunStopped("r", 3, "s3://b/r/checkpoint_00000003"), "KILLED"), (SystemExit(15), "KILLED"),
    (SystemExit(0), "FINISHED"),
])
def test_how_a_run_ends(exc, status):
    assert end_status(exc) == status


def test_run_ref_crosses_processes_without_a_client():
    ref = RunRef(sink="mlflow", tracking_uri="http://10.0.0.1:5000", run_id="abc", flush_every_s=0.5)
    assert pickle.loads(pickle.dumps(ref)) == ref
    with pytest.raises(ValueError):
        RunRef(sink="mlflow", client=object())  # only ids and URIs


def test_registering_needs_the_mlflow_sink():
    with pytest.raises(ValueError, match=r"registered_model 'm' needs the MLflow run .*tracking\.sink=mlflow"):
        TrackingConfig(sink="stdout", registered_model="m")


def test_stdout_run_prints_and_ends(capsys):
    with TrackedRun.open(TrackingConfig(sink="stdout"), "r1") as run:
        run.log_metrics({"final/top1": 0.5}, 3)
    out = capsys.readouterr().out
    assert "[run] r1 (new)" in out and "[step 3] final/top1 0.5" in out and "[run] r1 FINISHED" in out
    assert run.status == "FINISHED" and run.run_id is None
