"""Metrics sinks that need no server: parameter flattening, leader-only selection, stdout format."""

from __future__ import annotations

from pipeline.tracking.config import TrackingConfig
from pipeline.tracking.sinks import MlflowSink, NullSink, StdoutSink, build_sink, flatten_params, resolve_tracking_uri


def test_flatten_params():
    flat = flatten_params({"name": "x", "train": {"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "steps": 3},
                           "empty": {}})
    assert flat == {"name": "x", "train.optim.lr": 1e-3, "train.optim.betas": [0.9, 0.999], "train.steps": 3,
                    "empty": {}}


def test_only_rank_zero_logs(tmp_path):
    cfg = TrackingConfig(sink="mlflow", tracking_uri=f"sqlite:///{tmp_path}/never.db")
    # ranks other than 0 never touch MLflow (no run is created, no database file appears)
    assert isinstance(build_sink(cfg, rank=1, run_id="abc"), NullSink)
    assert not (tmp_path / "never.db").exists()
    assert isinstance(build_sink(TrackingConfig(sink="null"), rank=0), NullSink)
    assert isinstance(build_sink(TrackingConfig(sink="stdout"), rank=0), StdoutSink)
    assert MlflowSink is not None


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
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="http://h:1")) == "http://h:1"
