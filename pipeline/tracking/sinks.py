"""Metrics sinks: where a worker's per-step metrics (and a few params and artifacts) go. The training loop only ever
talks to a `MetricsSink`, built from the run's `RunRef` (below); MLflow is one implementation
(leader-only, lazily imported, non-blocking: a background thread ships batches and keeps them buffered while the
server is unreachable)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from pipeline.tracking.console import say

__all__ = ["RunRef", "MetricsSink", "NullSink", "StdoutSink", "MlflowSink", "build_sink", "flatten_params"]

log = logging.getLogger(__name__)

# MLflow's log_batch limits (per request)
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000


class RunRef(BaseModel):
    """What a worker needs to log to the run (pickled into it): no client, no credentials."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sink: Literal["null", "stdout", "mlflow"] = "null"
    tracking_uri: str | None = None
    run_id: str | None = None
    flush_every_s: float = Field(5.0, gt=0)


class MetricsSink:
    """The interface; also the null sink (every method does nothing)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Run parameters (nested mappings are flattened to dotted keys)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalar metrics at an optimizer step."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or directory; it must exist until `close()` returns."""

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact (e.g. the generated DeepSpeed config)."""

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None:
        """A picture (a PNG file, which must exist until `close()` returns) as step `step` of the image series
        `key`: the MLflow UI's image view shows the series evolve over the steps."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Run tags (e.g. an event of the run, shown on the run's overview page)."""

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits (at most `timeout_s`) until what was logged so far is shipped; True if it was."""
        return True

    def close(self, timeout_s: float = 60.0) -> None:
        """Ships what is buffered (waiting at most `timeout_s`) and stops."""


class NullSink(MetricsSink):
    pass


class StdoutSink(MetricsSink):
    """Human-readable lines on stdout (one per logged step), each written once (see console.say)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten_params(params)
        say(f"[params] {len(flat)} parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(flat.items())))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        body = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        say(f"[step {step}] {body}")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        say(f"[artifact] {path}")

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        say(f"[artifact] {artifact_file}: {json.dumps(data, sort_keys=True)}")

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None:
        say(f"[image] {key} step {step}: {path}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        say("[tags] " + ", ".join(f"{k}={v}" for k, v in sorted(tags.items())))


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class MlflowSink(MetricsSink):
    """Logs to one MLflow run through a background thread. Nothing here blocks the training step: calls append to
    a buffer; the thread ships it every `flush_every_s` and, when the server cannot be reached, keeps it and
    retries with backoff (so a restarting tracking server costs no metrics)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 5.0):
        from mlflow.tracking import MlflowClient  # lazy: only the leader that logs needs mlflow

        self.run_id = run_id
        self._client = MlflowClient(tracking_uri)
        self._flush_every_s = flush_every_s
        self._lock = threading.Lock()
        self._metrics: list[Any] = []
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[tuple[str, str | None]] = []
        self._images: list[tuple[str, str, int]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._staging = tempfile.mkdtemp(prefix="vitpipe-sink-")
        self._failing_since: float | None = None
        self._shipping = False
        self._thread = threading.Thread(target=self._run, name="mlflow-sink", daemon=True)
        self._thread.start()

    # -- producer side (training thread) -----------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: str(v)[:_MAX_PARAM_VALUE] for k, v in flatten_params(params).items()}
        with self._lock:
            self._params.update(flat)
        self._wake.set()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        with self._lock:
            self._tags.update({k: str(v)[:_MAX_PARAM_VALUE] for k, v in tags.items()})
        self._wake.set()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key=k, value=float(v), timestamp=now, step=int(step))
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        with self._lock:
            self._metrics.extend(batch)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        with self._lock:
            self._artifacts.append((str(path), artifact_path))
        self._wake.set()

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        dest = Path(self._staging) / artifact_file
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(data, indent=2, sort_keys=True))
        parent = str(Path(artifact_file).parent)
        self.log_artifact(dest, None if parent == "." else parent)

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None:
        with self._lock:
            self._images.append((str(path), key, int(step)))
        self._wake.set()

    def flush(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._pending() or self._shipping:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            self._wake.set()
            time.sleep(0.02)
        return True

    def close(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        left = self._pending()
        if left:
            log.error("mlflow sink: %d items could not be shipped to run %s before close", left, self.run_id)
        shutil.rmtree(self._staging, ignore_errors=True)

    # -- background thread -------------------------------------------------------------------------------
    def _pending(self) -> int:
        with self._lock:
            return (len(self._metrics) + len(self._params) + len(self._tags) + len(self._artifacts)
                    + len(self._images))

    def _run(self) -> None:
        backoff = 0.0
        while True:
            self._wake.wait(max(self._flush_every_s, backoff))
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self._ship()
                backoff = 0.0
                if self._failing_since is not None:
                    log.warning("mlflow sink: tracking server reachable again; buffered metrics shipped")
                    self._failing_since = None
            except Exception as e:  # the server is down or slow: keep the buffer, retry later
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("mlflow sink: cannot reach the tracking server (%s); buffering and retrying", e)
                backoff = min(30.0, max(1.0, backoff * 2))
                if stopping:
                    # close(): keep trying until its timeout abandons us (the thread is a daemon)
                    time.sleep(min(backoff, 2.0))
                    self._wake.set()
                    continue
            if stopping and not self._pending():
                return

    def _ship(self) -> None:
        from mlflow.entities import Param, RunTag

        with self._lock:
            params, self._params = self._params, {}
            tags, self._tags = self._tags, {}
            metrics, self._metrics = self._metrics, []
            artifacts, self._artifacts = self._artifacts, []
            images, self._images = self._images, []
            self._shipping = True
        try:
            items = sorted(params.items())
            while items:
                chunk, items = items[:_MAX_PARAMS_PER_BATCH], items[_MAX_PARAMS_PER_BATCH:]
                self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
                for k, _ in chunk:
                    params.pop(k)
            if tags:
                self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())],
                                       synchronous=True)
                tags = {}
            while metrics:
                chunk = metrics[:_MAX_METRICS_PER_BATCH]
                self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                metrics = metrics[_MAX_METRICS_PER_BATCH:]
            while artifacts:
                path, artifact_path = artifacts[0]
                if os.path.isdir(path):
                    self._client.log_artifacts(self.run_id, path, artifact_path)
                else:
                    self._client.log_artifact(self.run_id, path, artifact_path)
                artifacts.pop(0)
            while images:
                from PIL import Image

                path, key, step = images[0]
                with Image.open(path) as im:
                    picture = im.convert("RGB")
                self._client.log_image(self.run_id, picture, key=key, step=step, synchronous=True)
                images.pop(0)
        finally:  # whatever was not shipped goes back in front of what arrived meanwhile
            with self._lock:
                self._params = {**params, **self._params}
                self._tags = {**tags, **self._tags}
                self._metrics = metrics + self._metrics
                self._artifacts = artifacts + self._artifacts
                self._images = images + self._images
                self._shipping = False


def build_sink(run: RunRef, rank: int) -> MetricsSink:
    """The sink rank `rank` logs to: rank 0 logs to the run (`TrackedRun.ref`), the others get a null sink. A sink
    never creates a run: the job's driver owns it."""
    if rank != 0 or run.sink == "null":
        return NullSink()
    if run.sink == "stdout":
        return StdoutSink()
    if not run.run_id or not run.tracking_uri:
        raise ValueError(f"an MLflow sink needs the run's id and tracking URI, got {run!r}")
    return MlflowSink(run.tracking_uri, run.run_id, run.flush_every_s)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"optim": {"lr": 1e-3}}} -> {"train.optim.lr": 1e-3}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = v
    return out
