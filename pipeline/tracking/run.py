"""One owner for a tracked run. A job-level driver opens a `TrackedRun` as a context manager; it is the only code
that creates an MLflow experiment or run. It resumes the run a checkpoint recorded, hands the workers a `RunRef`
(what their metrics sinks log to), logs the driver's own params, metrics and artifacts, registers models, and
ends the run FINISHED, FAILED or KILLED (stopped, SIGTERM, Ctrl-C).

    with TrackedRun.open(cfg.tracking, cfg.name) as run:
        result = fit(cfg, run=run.ref)          # workers log through build_sink(run.ref, rank)
        run.register(final_dir, name=...)

Three variants, chosen by `tracking.sink` like the sinks: null (nothing), stdout (printed), mlflow. mlflow is
imported inside methods only.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import RunStopped
from pipeline.tracking.config import TrackingConfig, resolve_tracking_uri
from pipeline.tracking.registry import RegisteredVersion, register_checkpoint
from pipeline.tracking.sinks import (
    _MAX_METRICS_PER_BATCH,
    _MAX_PARAM_VALUE,
    _MAX_PARAMS_PER_BATCH,
    MetricsSink,
    RunRef,
    StdoutSink,
    build_sink,
    flatten_params,
)

__all__ = [
    "TrackedRun", "StdoutRun", "MlflowRun", "end_status", "ui_url", "metric_history",
    "EXPERIMENT_KIND_TAG", "EXPERIMENT_KIND", "PARENT_RUN_TAG", "child_runs",
]

log = logging.getLogger(__name__)

# MLflow 3's UI opens an experiment in its GenAI view unless it is tagged as a model-training experiment
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow nests a run under the run this tag names
PARENT_RUN_TAG = "mlflow.parentRunId"


def end_status(exc: BaseException | None) -> str:
    """The status a run ends with when its `with` block exits with `exc`."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (RunStopped, KeyboardInterrupt)):
        return "KILLED"
    if isinstance(exc, SystemExit):  # Ray's driver turns SIGTERM into sys.exit(15)
        return "FINISHED" if exc.code in (None, 0) else "KILLED"
    return "FAILED"


class TrackedRun:
    """The null variant and the interface: everything is accepted and dropped; `run_id` is None."""

    def __init__(self, tracking: TrackingConfig, name: str, *, resume_id: str | None = None,
                 tags: Mapping[str, Any] | None = None):
        self.tracking = tracking
        self.name = tracking.run_name or name
        self.resume_id = resume_id
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self.status: str | None = None  # set when the run ended

    @staticmethod
    def open(tracking: TrackingConfig, name: str, *, resume_id: str | None = None,
             tags: Mapping[str, Any] | None = None) -> "TrackedRun":
        """The variant `tracking.sink` names. Nothing is created until the `with` block is entered."""
        cls = {"null": TrackedRun, "stdout": StdoutRun, "mlflow": MlflowRun}[tracking.sink]
        return cls(tracking, name, resume_id=resume_id, tags=tags)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "TrackedRun":
        self._start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.status = end_status(exc)
        try:
            self._end(self.status)
        except Exception as e:  # noqa: BLE001 - never mask what ended the run
            if exc is None:
                raise
            log.error("could not mark run %s %s: %s", self.run_id, self.status, e)
        return False

    def _start(self) -> None:
        pass

    def _end(self, status: str) -> None:
        pass

    @property
    def ref(self) -> RunRef:
        """What the workers' sinks log to (crosses to them inside their WorkerSpec)."""
        return RunRef(sink="null")

    def sink(self, rank: int) -> MetricsSink:
        """The metrics sink of rank `rank` in this process (workers build theirs from `ref`)."""
        return build_sink(self.ref, rank)

    # -- the driver's own logging --------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters (nested mappings are flattened to dotted keys)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalar metrics at `step`."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A local file or directory."""

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Run tags."""

    def register(self, checkpoint_dir: str | Path, *, name: str, alias: str | None = None,
                 tags: Mapping[str, Any] | None = None, artifact_path: str = "checkpoint",
                 description: str | None = None, normalize: str = "imagenet") -> RegisteredVersion:
        """Logs a model checkpoint folder to this run as a pyfunc model and registers it as a new version of
        `name`; `normalize` is the input normalisation the model expects (data.augment.normalize)."""
        raise ValueError(f"registering {name!r} needs tracking.sink=mlflow (this run's sink is "
                         f"{self.tracking.sink!r})")


class StdoutRun(TrackedRun):
    """Human-readable lines on stdout."""

    @property
    def ref(self) -> RunRef:
        return RunRef(sink="stdout")

    def _start(self) -> None:
        print(f"[run] {self.name} ({'resumed' if self.resume_id else 'new'})", flush=True)

    def _end(self, status: str) -> None:
        print(f"[run] {self.name} {status}", flush=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        StdoutSink().log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        StdoutSink().log_metrics(metrics, step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        StdoutSink().log_artifact(path, artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        StdoutSink().log_dict(data, artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        print("[tags] " + ", ".join(f"{k}={v}" for k, v in sorted(tags.items())), flush=True)


class MlflowRun(TrackedRun):
    """A run on an MLflow tracking server (or a local store)."""

    def __init__(self, tracking: TrackingConfig, name: str, **kwargs: Any):
        super().__init__(tracking, name, **kwargs)
        self.tracking_uri = resolve_tracking_uri(tracking.tracking_uri)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    @property
    def ref(self) -> RunRef:
        if self.run_id is None:
            raise RuntimeError("the MLflow run is created when its `with` block is entered")
        return RunRef(sink="mlflow", tracking_uri=self.tracking_uri, run_id=self.run_id,
                      flush_every_s=self.tracking.flush_every_s)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name, client = self.tracking.experiment, self.client
        exp = client.get_experiment_by_name(name)
        if exp is None:
            root = self.tracking.artifact_root
            location = f"{root.rstrip('/')}/{name}" if root else None
            try:
                return client.create_experiment(name, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as e:  # created meanwhile by another driver
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(name)
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    def _start(self) -> None:
        from mlflow.exceptions import MlflowException

        client = self.client
        if self.resume_id:
            try:
                client.get_run(self.resume_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("run %s recorded in the checkpoint is not on %s; starting a new MLflow run",
                            self.resume_id, self.tracking_uri)
            else:
                client.update_run(self.resume_id, status="RUNNING")
                self.run_id, self.resumed = self.resume_id, True
                self.experiment_id = client.get_run(self.run_id).info.experiment_id
                log.info("MLflow run %s resumed: %s", self.run_id, self.ui_url or self.tracking_uri)
                return
        tags = dict(self.tags)
        if self.resume_id:
            tags["vitpipe.resumed_from"] = self.resume_id
        if self.tracking.parent_run_id:  # nested under it in the UI (a suite's task under the suite's run)
            tags[PARENT_RUN_TAG] = self.tracking.parent_run_id
        self.experiment_id = self._experiment_id()
        run = client.create_run(self.experiment_id, run_name=self.name, tags=tags)
        self.run_id = run.info.run_id
        log.info("MLflow run %s (experiment %s): %s", self.run_id, self.tracking.experiment,
                 self.ui_url or self.tracking_uri)

    @property
    def ui_url(self) -> str | None:
        """The run's page in the MLflow UI of an HTTP tracking server, in the model-training view."""
        if self.run_id is None or not self.tracking_uri.startswith(("http://", "https://")):
            return None
        return ui_url(self.tracking_uri, self.experiment_id, self.run_id)

    def _end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = sorted((k, str(v)[:_MAX_PARAM_VALUE]) for k, v in flatten_params(params).items())
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            chunk = items[i:i + _MAX_PARAMS_PER_BATCH]
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + _MAX_METRICS_PER_BATCH], synchronous=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def register(self, checkpoint_dir: str | Path, *, name: str, alias: str | None = None,
                 tags: Mapping[str, Any] | None = None, artifact_path: str = "checkpoint",
                 description: str | None = None, normalize: str = "imagenet") -> RegisteredVersion:
        return register_checkpoint(checkpoint_dir, run_id=self.run_id, name=name, tracking_uri=self.tracking_uri,
                                   alias=alias, tags=tags, artifact_path=artifact_path, description=description,
                                   normalize=normalize)


def ui_url(base: str, experiment_id: str | None, run_id: str | None = None) -> str:
    """A link into the MLflow UI at `base` (the server, or what `mlflow ui` serves) that opens the model-training
    view: MLflow 3.17's UI shows the GenAI view unless the URL (or the browser's remembered sidebar switch) says
    otherwise, whatever the experiment's kind tag."""
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") if experiment_id else "experiments"
    return f"{base.rstrip('/')}/#/{page}?workflowType=machine_learning"


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of `key`, in step then logging order (read-only)."""
    from mlflow import MlflowClient

    hist = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def child_runs(tracking_uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs nested under `parent_run_id` (tag mlflow.parentRunId, in the parent's experiment), read-only: for
    each its run_id, name, status, latest metrics and tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs += [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                  "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)} for r in page]
        token = page.token
        if not token:
            return runs
