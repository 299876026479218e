"""Following a running MLflow run from the console: `MetricsTail` prints its metrics as the workers log them (the
workers' sinks write to MLflow only). Read-only; mlflow is imported inside functions."""

from __future__ import annotations

import threading
from typing import Callable

__all__ = ["MetricsTail"]


class MetricsTail(threading.Thread):
    """Prints the running MLflow run's metrics (the newest RUNNING run named `run_name` in `experiment`) as the
    workers log them: the workers' sink writes to MLflow only, this makes the steps visible on the console."""

    KEYS = ("train/loss", "train/lr", "perf/images_per_s", "val/loss", "val/prec1")

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, total_steps: int, label: str,
                 say: Callable[[str], None], interval_s: float = 2.0):
        super().__init__(daemon=True, name=f"metrics-tail-{label}")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.total, self.label, self.say, self.interval = total_steps, label, say, interval_s
        self.run_id: str | None = None
        self._printed = 0
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
        keys = [k for k in self.KEYS if k in latest] + sorted(
            (k for k in latest if k.startswith("fewshot/")), key=lambda k: (len(k), k))  # 1shot before 10shot
        by_step: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in client.get_metric_history(self.run_id, key):
                if m.step > self._printed:
                    by_step.setdefault(m.step, {})[key] = m.value
        for step in sorted(by_step):
            if "train/loss" not in by_step[step] and step != max(by_step):
                continue
            self.say(f"  [{self.label}] step {step:>4}/{self.total}  " + "  ".join(
                f"{k.split('/', 1)[1] if k.startswith(('train/', 'perf/')) else k} {_fmt(v)}"
                for k, v in by_step[step].items()))
            self._printed = step


def _fmt(v: float) -> str:
    return f"{v:.3e}" if 0 < abs(v) < 1e-2 else f"{v:.4g}"
