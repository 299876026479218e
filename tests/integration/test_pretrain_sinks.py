"""The MLflow metrics sink against the real MLflow server: params/metrics/artifacts arrive, logging never blocks,
and a server that goes away for a while costs no metrics (buffered, retried, shipped when it is back)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_mlflow_sink_survives_server_restart(mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.config import TrackingConfig
    from pipeline.tracking.run import TrackedRun
    from pipeline.tracking.sinks import build_sink

    # fail fast inside the background thread while the server is down (MLflow's own retries take minutes)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    tracking = TrackingConfig(sink="mlflow", tracking_uri=mlflow_server.url, experiment="test-sinks",
                              flush_every_s=0.2)
    run = TrackedRun.open(tracking, "sink-outage").__enter__()  # ended below, after the outage
    run_id = run.run_id
    sink = build_sink(run.ref, rank=0)
    client = MlflowClient(mlflow_server.url)
    try:
        sink.log_params({"train": {"optim": {"lr": 0.001}}, "name": "sink-outage"})
        sink.log_dict({"zero_optimization": {"stage": 2}}, "deepspeed_config.json")
        sink.log_metrics({"train/loss": 2.0}, step=1)
        assert sink.flush(timeout_s=30)

        mlflow_server.stop()
        t = time.perf_counter()
        for step in (2, 3, 4):
            sink.log_metrics({"train/loss": 2.0 - step / 10, "train/lr": 1e-3}, step=step)
        assert time.perf_counter() - t < 0.5  # never waits for the server
        assert not sink.flush(timeout_s=1.0)  # the server is down: still buffered
    finally:
        if not mlflow_server.running:
            mlflow_server.start()
    sink.close(timeout_s=60)
    run.__exit__(None, None, None)

    hist = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert hist == pytest.approx({1: 2.0, 2: 1.8, 3: 1.7, 4: 1.6})
    run = client.get_run(run_id)
    assert run.data.params["train.optim.lr"] == "0.001"
    assert "deepspeed_config.json" in {a.path for a in client.list_artifacts(run_id)}
