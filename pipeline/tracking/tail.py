"""Following a running MLflow run from the console: `MetricsTail` prints its metrics as the workers log them (the
workers' sinks write to MLflow only), in the lines the job itself prints. Read-only; mlflow is imported inside
functions."""

from __future__ import annotations

import re
import threading
from typing import Callable

from pipeline.tracking.console import progress_line

__all__ = ["MetricsTail", "evaluation_line"]

_FEWSHOT = re.compile(r"^fewshot/(?P<name>.+)_(?P<k>\d+)shot$")  # not the _std, _log2_l2, _images companions


class MetricsTail(threading.Thread):
    """Prints the running MLflow run's metrics (the newest RUNNING run named `run_name` in `experiment`) as the
    workers log them: the job's progress line (pipeline.tracking.console.progress_line) once per logging interval,
    and an evaluation line at each evaluation step."""

    KEYS = ("train/loss", "perf/images_per_s", "perf/data_wait_fraction", "scaling/world_size", "val/loss",
            "val/prec1")

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, total_steps: int,
                 say: Callable[[str], None], interval_s: float = 2.0, indent: str = "  "):
        super().__init__(daemon=True, name=f"metrics-tail-{run_name}")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.total, self.say, self.interval, self.indent = total_steps, say, interval_s, indent
        self.run_id: str | None = None
        self._printed = 0
        # (step, ms) of the first step the workers logged (scaling/world_size: at the first step of every attempt):
        # the ETA extrapolates the time per step since then, as the job's own progress line does
        self._start: tuple[int, int] | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        self.poll()  # what arrived since the last poll

    def poll(self) -> None:
        try:
            self._poll()
        except Exception:  # noqa: BLE001 - sqlite busy, run not created yet: the next poll catches up
            pass

    def _poll(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        if self.run_id is None:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                return
            runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{self.run_name}' and "
                                      "attributes.status = 'RUNNING'", order_by=["attributes.start_time DESC"],
                                      max_results=1)
            if not runs:
                return
            self.run_id = runs[0].info.run_id
        latest = client.get_run(self.run_id).data.metrics
        keys = [k for k in self.KEYS if k in latest] + [k for k in latest if _FEWSHOT.match(k)]
        history = {key: client.get_metric_history(self.run_id, key) for key in keys}
        if self._start is None:
            logged = [(m.step, m.timestamp) for ms in history.values() for m in ms]
            self._start = min(logged) if logged else None
        by_step: dict[int, dict[str, float]] = {}
        stamps: dict[int, int] = {}
        for key, ms in history.items():
            for m in ms:
                if m.step > self._printed:
                    by_step.setdefault(m.step, {})[key] = m.value
                    stamps[m.step] = max(stamps.get(m.step, 0), m.timestamp)
        for step in sorted(by_step):
            m = by_step[step]  # one step's metrics arrive together (the sink writes them in one batch)
            if "train/loss" in m and self._start is not None:
                elapsed = (stamps[step] - self._start[1]) / 1000
                self.say(self.indent + progress_line(step, self.total, m, elapsed, self._start[0]))
            evaluated = evaluation_line(m)
            if evaluated:
                self.say(f"{self.indent}step {step}: {evaluated}")
            self._printed = step


def evaluation_line(metrics: dict[str, float]) -> str:
    """`val loss 1.872  top-1 30.5%  few-shot fmnist 1-shot 27.6%  5-shot 33.9%`, or "" when `metrics` holds no
    evaluation."""
    parts = []
    if "val/loss" in metrics:
        parts.append(f"val loss {metrics['val/loss']:.4f}")
    if "val/prec1" in metrics:
        parts.append(f"top-1 {metrics['val/prec1']:.1%}")
    shots: dict[str, list[tuple[int, float]]] = {}
    for key, value in metrics.items():
        m = _FEWSHOT.match(key)
        if m:
            shots.setdefault(m["name"], []).append((int(m["k"]), value))
    for name, accs in sorted(shots.items()):
        parts.append(f"few-shot {name} " + "  ".join(f"{k}-shot {v:.1%}" for k, v in sorted(accs)))
    return "  ".join(parts)
