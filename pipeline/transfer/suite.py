"""A suite of transfer tasks run as one job (VTAB-1k's 19 tasks: configs/transfer/vtab/). Every `*.yaml` in a folder
(except `_*` bases) is a task; each runs as its own Ray job (the submission `vitpipe submit transfer` makes), at most
`max_concurrent` at a time, while one parent MLflow run in the tasks' experiment holds them: each task's run is
created nested under it (`tracking.parent_run_id`). When every task has ended the parent logs each task's final
top-1 and its means per `transfer.group` and over all tasks, and ends FINISHED, or FAILED naming the failed tasks
(the means over the tasks that succeeded are logged all the same, with their count).

    suite = load_suite("configs/transfer/vtab", overrides)      # every task validated before anything starts
    result = run_suite(suite, source="models:/vit-b16-i21k@latest", max_concurrent=4)

Metrics of the parent, `<P>` being the folder's name (`vtab`): `<P>/<task>`, `<P>/<group>` and `<P>/<group>_tasks`,
`<P>/mean` (over tasks, as VTAB reports it), `<P>/tasks` (succeeded) and `<P>/tasks_failed`; its `suite/results.json`
artifact is the table of tasks, jobs, runs and top-1.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.launch import submit as S
from pipeline.launch.checks import check_storage, check_world_sizes
from pipeline.tracking.config import TrackingConfig, resolve_tracking_uri
from pipeline.tracking.registry import resolve_version
from pipeline.tracking.run import TrackedRun, child_runs
from pipeline.transfer.config import TransferRunConfig

__all__ = ["METRIC", "SuiteTask", "TransferSuite", "TaskOutcome", "SuiteResult", "SuiteFailed", "load_suite",
           "suite_metrics", "run_suite", "default_suite_name"]

log = logging.getLogger(__name__)

METRIC = "final/top1"  # what each task's run logs and the suite averages
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a task or suite name that is also a clean metric/job-id part
_RESERVED = ("mean", "tasks", "tasks_failed")


@dataclass(frozen=True)
class SuiteTask:
    key: str  # the file's stem: its metric `<P>/<key>`, its run's name
    path: Path
    group: str | None
    cfg: TransferRunConfig  # validated with the suite's overrides

    @property
    def source(self) -> str | None:
        return self.cfg.transfer.source


@dataclass(frozen=True)
class TransferSuite:
    folder: Path
    prefix: str  # the folder's name: the metrics' prefix
    tasks: tuple[SuiteTask, ...]
    overrides: tuple[str, ...]
    tracking: TrackingConfig  # the parent run's: the tasks' own (they share sink, server and experiment)

    @property
    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in self.tasks:
            if t.group:
                out.setdefault(t.group, []).append(t.key)
        return out


@dataclass
class TaskOutcome:
    key: str
    group: str | None
    job_id: str | None = None
    status: str | None = None  # the Ray job's final status
    run_id: str | None = None  # the task's (child) MLflow run
    top1: float | None = None  # set only for a task that succeeded
    error: str | None = None  # why it counts as failed

    @property
    def ok(self) -> bool:
        return self.top1 is not None


@dataclass
class SuiteResult:
    name: str
    run_id: str | None
    metrics: dict[str, float]
    outcomes: list[TaskOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[TaskOutcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> dict[str, Any]:
        return {"suite": self.name, "run_id": self.run_id, "metrics": self.metrics,
                "tasks": [asdict(o) for o in self.outcomes], "failed": [o.key for o in self.failed]}


class SuiteFailed(Exception):
    """Some tasks of the suite failed (the others' means were logged); the parent run ends FAILED."""

    def __init__(self, result: SuiteResult):
        self.result = result
        failed = "; ".join(f"{o.key} ({o.error})" for o in result.failed)
        super().__init__(
            f"transfer suite {result.name}: {len(result.failed)} of {len(result.outcomes)} tasks failed: {failed}. "
            f"The means over the {len(result.outcomes) - len(result.failed)} that succeeded are logged to run "
            f"{result.run_id}."
        )


def load_suite(folder: str | Path, overrides: Iterable[str] = ()) -> TransferSuite:
    """Every task config of `folder`, validated with `overrides` (what `--set` gives every task), and the checks
    that need no service: storage and world sizes (what a submission checks), names fit metric keys, the tasks log to
    one MLflow experiment, they fine-tune (a suite averages final/top1). Raises a ConfigError naming the folder or
    the task's file. The one validation of the tasks: run_suite submits them with these configs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"transfer suite {folder}: no such folder (give the folder of task configs, e.g. "
                          "configs/transfer/vtab)")
    paths = sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))
    if not paths:
        raise ConfigError(f"transfer suite {folder}: no task configs in it (*.yaml files; _*.yaml are bases)")
    prefix = folder.resolve().name
    if not _KEY.match(prefix):
        raise ConfigError(f"transfer suite {folder}: its name {prefix!r} is the metrics' prefix and must be letters, "
                          "digits, '_', '-' or '.'")
    overrides = tuple(overrides)
    tasks = []
    for path in paths:
        if not _KEY.match(path.stem):
            raise ConfigError(f"{path}: a task's file name is its metric name: use letters, digits, '_', '-', '.'")
        try:
            cfg = load_config(path, overrides, TransferRunConfig)
            check_storage(cfg)
            check_world_sizes(cfg)
        except ConfigError as e:
            raise ConfigError(f"transfer suite task {path}: {e}") from None
        if cfg.transfer.mode == "fewshot":
            raise ConfigError(f"{path}: transfer.mode is fewshot, which logs no {METRIC}: a suite's tasks fine-tune "
                              "(finetune or linear_probe)")
        if cfg.tracking.sink != "mlflow":
            raise ConfigError(f"{path}: tracking.sink is {cfg.tracking.sink!r}; a suite reads each task's {METRIC} "
                              "from its MLflow run: set tracking.sink=mlflow")
        tasks.append(SuiteTask(path.stem, path, cfg.transfer.group, cfg))
    first = tasks[0]
    for t in tasks[1:]:
        for key in ("tracking_uri", "experiment"):
            mine, theirs = getattr(t.cfg.tracking, key), getattr(first.cfg.tracking, key)
            if mine != theirs:
                raise ConfigError(f"{t.path}: tracking.{key} {mine!r} differs from {theirs!r} of {first.path}: a "
                                  "suite's task runs are nested under one parent run, in one experiment")
    groups = {t.group for t in tasks if t.group}
    names = [t.key for t in tasks] + sorted(groups) + [f"{g}_tasks" for g in sorted(groups)] + list(_RESERVED)
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"transfer suite {folder}: {', '.join(clash)} would name two metrics (task files, "
                          f"transfer.group values and {', '.join(_RESERVED)} share `{prefix}/...`): rename one")
    tracking = first.cfg.tracking.model_copy(update={"registered_model": None, "run_name": None,
                                                     "parent_run_id": None})
    return TransferSuite(folder, prefix, tuple(tasks), overrides, tracking)


def suite_metrics(prefix: str, outcomes: Iterable[TaskOutcome]) -> dict[str, float]:
    """The parent run's metrics from the tasks' outcomes: per task, per group and overall means of the top-1 of
    the tasks that succeeded, and the counts. Pure."""
    outcomes = list(outcomes)
    ok = [o for o in outcomes if o.ok]
    metrics: dict[str, float] = {f"{prefix}/{o.key}": o.top1 for o in ok}
    for group in sorted({o.group for o in outcomes if o.group}):
        values = [o.top1 for o in ok if o.group == group]
        if values:
            metrics[f"{prefix}/{group}"] = sum(values) / len(values)
        metrics[f"{prefix}/{group}_tasks"] = float(len(values))
    if ok:
        metrics[f"{prefix}/mean"] = sum(o.top1 for o in ok) / len(ok)
    metrics[f"{prefix}/tasks"] = float(len(ok))
    metrics[f"{prefix}/tasks_failed"] = float(len(outcomes) - len(ok))
    return metrics


def default_suite_name(suite: TransferSuite) -> str:
    """`<folder name>-<UTC time>`: a fresh name per run of the suite (task runs' storage folders and job ids
    derive from it and must not exist yet)."""
    return f"{suite.prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def run_suite(suite: TransferSuite, *, source: str | None = None, name: str | None = None,
              address: str | None = None, max_concurrent: int = 1, working_dir: bool = True,
              poll_s: float = 2.0) -> SuiteResult:
    """The whole suite (see the module docstring). Before the parent run or any job exists: the source model(s)
    are looked up in the registry, every task's submission is built (from the config load_suite validated; its
    file inside the project when that is uploaded) and the job ids are checked free. Task `key` runs as Ray job `<name>-<key>`, named `<name>-<key>`
    (its storage folder) with the MLflow run name `key` nested under the parent run `name`. Raises SuiteFailed
    (parent FAILED) when a task failed; a SIGTERM or Ctrl-C stops the running tasks' jobs (parent KILLED)."""
    if max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    name = name or default_suite_name(suite)
    if not _KEY.match(name):
        raise ConfigError(f"suite name {name!r}: use letters, digits, '_', '-' or '.' (it prefixes job ids)")
    sources = {t.key: source or t.source for t in suite.tasks}
    for t in suite.tasks:
        if not sources[t.key]:
            raise ConfigError(f"{t.path}: no source model: set transfer.source or pass --from models:/NAME@ALIAS")

    job_ids = {t.key: f"{name}-{t.key}" for t in suite.tasks}  # also the task's run name (its storage folder)

    def submission(task: SuiteTask, parent_run_id: str) -> S.Submission:
        # quoted: --set values are YAML, and an id or name of digits would parse as a number. The task's config was
        # validated by load_suite; these overrides only name its run and nest it under the suite's.
        overrides = [*suite.overrides, f"name='{job_ids[task.key]}'", f"tracking.run_name='{task.key}'",
                     f"tracking.parent_run_id='{parent_run_id}'"]
        sub = S.build_submission("transfer", [str(task.path)], overrides, job_args=["--from", sources[task.key]],
                                 working_dir=working_dir, config=task.cfg)
        sub.metadata.update(suite=name, suite_task=task.key, run_name=job_ids[task.key])
        return sub

    for task in suite.tasks:
        submission(task, "0" * 32)  # raises what the real submission would (a path outside the uploaded project)
    for uri in sorted(set(sources.values())):
        resolve_version(uri, suite.tracking.tracking_uri)  # RegistryError: lists the registered models
    client = S.job_client(address)
    taken = sorted(set(job_ids.values()) & {j["submission_id"] for j in S.list_jobs(client)})
    if taken:
        raise ConfigError(f"Ray jobs {', '.join(taken)} already exist on the cluster: give the suite another --name")

    outcomes = {t.key: TaskOutcome(t.key, t.group) for t in suite.tasks}
    tags = {"suite.folder": str(suite.folder), "suite.tasks": str(len(suite.tasks)),
            "suite.source": ",".join(sorted(set(sources.values())))}
    with _sigterm_exits(), TrackedRun.open(suite.tracking, name, tags=tags) as run:
        run.log_params({"suite": {"folder": str(suite.folder), "source": tags["suite.source"],
                                  "max_concurrent": max_concurrent, "overrides": " ".join(suite.overrides),
                                  "tasks": {t.key: t.group or "-" for t in suite.tasks}}})
        _run_jobs(client, suite.tasks, lambda t: S.submit(client, submission(t, run.run_id), job_ids[t.key]),
                  outcomes, max_concurrent, poll_s)
        children = {c["name"]: c for c in child_runs(resolve_tracking_uri(suite.tracking.tracking_uri), run.run_id)}
        for task in suite.tasks:
            _read_result(outcomes[task.key], children.get(task.key))
        result = SuiteResult(name, run.run_id, suite_metrics(suite.prefix, outcomes.values()),
                             list(outcomes.values()))
        run.log_metrics(result.metrics, step=0)
        run.log_dict(result.summary(), "suite/results.json")
        log.info("suite %s: %s", name, ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items())))
        if result.failed:
            run.set_tags({"suite.failed_tasks": ",".join(o.key for o in result.failed)})
            raise SuiteFailed(result)
    return result


def _run_jobs(client, tasks: Iterable[SuiteTask], submit: Callable[[SuiteTask], str],
              outcomes: dict[str, TaskOutcome], max_concurrent: int, poll_s: float) -> None:
    """Submits the tasks' jobs in order, never more than `max_concurrent` unfinished at once, until all have
    ended. Whatever interrupts it (a stop, an error) stops the jobs still running."""
    pending, running = list(tasks), {}
    try:
        while pending or running:
            while pending and len(running) < max_concurrent:
                task = pending.pop(0)
                job_id = submit(task)
                running[task.key] = job_id
                outcomes[task.key].job_id = job_id
                log.info("task %s: submitted job %s (%d running, %d waiting)", task.key, job_id, len(running),
                         len(pending))
            time.sleep(poll_s)
            for key, job_id in list(running.items()):
                status = str(client.get_job_status(job_id).value)
                if status in S.TERMINAL:
                    del running[key]
                    outcomes[key].status = status
                    if status != "SUCCEEDED":
                        outcomes[key].error = _job_error(client, job_id, status)
                    log.info("task %s: job %s %s", key, job_id, status)
    except BaseException:
        for key, job_id in running.items():
            outcomes[key].status, outcomes[key].error = "STOPPED", f"job {job_id} stopped with the suite"
            try:
                client.stop_job(job_id)
                log.warning("task %s: stopping job %s", key, job_id)
            except Exception as e:  # noqa: BLE001 - stop the others whatever one says
                log.error("task %s: could not stop job %s: %s", key, job_id, e)
        raise


def _job_error(client, job_id: str, status: str) -> str:
    """`job ID FAILED, exit 2: <its last line of output>` (Ray's message holds the tail of the job's logs; our
    entrypoints print why they failed last)."""
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    lines = [line.strip() for line in re.split(r"[\r\n]+", info.message or "") if line.strip()]
    exit_text = f", exit {code}" if code is not None else ""
    return f"job {job_id} {status}{exit_text}" + (f": {lines[-1][-500:]}" if lines else "")


def _read_result(outcome: TaskOutcome, child: dict[str, Any] | None) -> None:
    """The task's top-1 from its run, or why it has none."""
    if outcome.status != "SUCCEEDED":
        return
    if child is None:
        outcome.error = f"job {outcome.job_id} SUCCEEDED but no MLflow run named {outcome.key!r} is nested under " \
                        "the suite's run (do the tasks log to the same tracking server?)"
        return
    outcome.run_id = child["run_id"]
    if child["status"] != "FINISHED" or METRIC not in child["metrics"]:
        outcome.error = f"run {child['run_id']} is {child['status']} with no {METRIC}"
        return
    outcome.top1 = float(child["metrics"][METRIC])


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """A SIGTERM (`vitpipe jobs stop` of a submitted suite) exits like Ray's job drivers do (SystemExit 143):
    the running tasks are stopped and the parent run ends KILLED. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
