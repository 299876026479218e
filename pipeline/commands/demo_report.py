"""What `vitpipe demo` reports: its figures as they are gathered (`DemoResult`, one `TaskResult` per downstream
task), the stage headers and result lines (`Stages`), the machine it ran on (`machine_line`), the verdict on each
fine-tune vs scratch gap (`gap_verdict`), and the summary table with the MLflow UI hint at the end
(`format_summary`)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.commands.demo_data import DemoPlan
from pipeline.tracking.run import ui_url

__all__ = ["StageTime", "TaskResult", "DemoResult", "Stages", "machine_line", "gap_verdict", "format_summary"]

PROBES = ("pretrained", "random", "pixels")


@dataclass
class StageTime:
    name: str
    seconds: float


@dataclass
class TaskResult:
    """One downstream task's figures: top-1 of the fine-tunes and of the from-scratch runs, one per seed (paired: the
    same seed gives both the same data order), and the ridge probes (features -> top-1)."""

    finetune: list[float] = field(default_factory=list)
    scratch: list[float] = field(default_factory=list)
    probe: dict[str, float] = field(default_factory=dict)  # "pretrained", "random" (init), "pixels"
    run_ids: dict[str, str] = field(default_factory=dict)  # "finetune", "scratch": seed 0's MLflow run
    registered: str | None = None                          # models:/NAME/VERSION of seed 0's fine-tune, if any

    @property
    def gaps(self) -> list[float]:
        """Fine-tune minus scratch top-1, seed by seed."""
        return [a - b for a, b in zip(self.finetune, self.scratch)]


@dataclass
class DemoResult:
    workdir: Path
    tracking_uri: str
    pretrain_data: str = ""                 # "fashion-mnist" or "digits" (fallback)
    machine: str = ""                       # machine_line(): where the figures come from
    stages: list[StageTime] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)          # split -> samples
    classes: dict[str, list[str]] = field(default_factory=dict)  # "pretrain" and each task -> class names
    pretrain: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, TaskResult] = field(default_factory=dict)  # in the order they ran

    @property
    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000"

    @property
    def ui_link(self) -> str:
        """The pretraining experiment in the model-training view of what `ui_command` serves."""
        return ui_url("http://127.0.0.1:5000", self.pretrain.get("experiment_id"))


def machine_line(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """"<CPU model>, <N> cores, torch <version>": the machine the demo's figures come from (the CPU count is what
    the OS reports, hyper-threads included)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path(cpuinfo).read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                model = " ".join(line.split(":", 1)[1].split())
                break
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch_version}"


def gap_verdict(task: str, gaps: Sequence[float]) -> str:
    """The line on fine-tune vs scratch for `task`, from their paired per-seed top-1 gaps (fractions). A win or a
    loss only when the mean gap is more than 2 standard errors (std / sqrt(N)) from zero, the spread being the
    seeds' own; otherwise no clear difference. One seed has no spread to judge by: it draws no conclusion."""
    n = len(gaps)
    if n == 0:
        return f"fine-tune vs training from scratch on {task}: no paired runs"
    mean = float(np.mean(gaps)) * 100
    if n == 1:
        return (f"fine-tune vs training from scratch: {mean:+.1f} points top-1 on {task} from 1 seed: "
                "no conclusion drawn (one seed gives no spread to judge the gap by)")
    std = float(np.std(gaps, ddof=1)) * 100
    gap = f"{mean:+.1f} ± {std:.1f} points"
    if abs(mean) > 2 * std / math.sqrt(n):
        if mean > 0:
            return f"fine-tuning beats training from scratch: {gap} top-1 on {task} ({n} seeds, paired; > 2 SE)"
        return (f"NOTE: fine-tuning did NOT beat training from scratch: {gap} top-1 on {task} ({n} seeds, paired; "
                "scratch ahead by > 2 SE)")
    return f"fine-tune vs training from scratch on {task}: no clear difference ({gap}, {n} seeds, paired)"


class Stages:
    """Numbered stages: a header as each starts, `[demo i/n] done in S s` as it ends; results go in between,
    indented (`say`). Each stage's time lands in `result.stages` under the header's first word."""

    def __init__(self, result: DemoResult, say: Callable[[str], None], total: int):
        self.result, self.say, self.total, self.index = result, say, total, 0

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.index += 1
        self.say(f"\n[demo {self.index}/{self.total}] {title}")
        t = time.perf_counter()
        yield
        dt = time.perf_counter() - t
        self.result.stages.append(StageTime(title.split(":")[0], dt))
        self.say(f"[demo {self.index}/{self.total}] done in {dt:.1f} s")


def _spread(accs: list[float]) -> str:
    if len(accs) < 2:
        return f"{accs[0]:.1%} (1 seed)" if accs else "n/a"
    return f"{np.mean(accs):.1%} ± {np.std(accs, ddof=1) * 100:.1f} ({len(accs)} seeds)"


def _task_rows(result: DemoResult, what: Callable[[str, TaskResult], str]) -> list[str]:
    """One result text per task, the first for the stage's own line and the others for lines under it."""
    return [what(name, t) for name, t in result.tasks.items()] or ["n/a"]


def format_summary(result: DemoResult, plan: DemoPlan | None = None) -> str:
    """The summary table printed at the end of the demo, its verdicts, and how to open the MLflow UI on its store.
    Its first line names the machine the figures come from."""
    times = {s.name: s.seconds for s in result.stages}
    p, d = result.pretrain, result.data
    shots = "  ".join(f"{k}-shot {v:.1%}" for k, v in sorted(p.get("fewshot", {}).items()))
    seen = len(result.classes.get("pretrain", [])) or "?"
    tasks = "; ".join(f"{t} {d.get(f'{t}-train')}/{d.get(f'{t}-test')}" for t in result.tasks)

    def probes(task: str, t: TaskResult) -> str:
        return f"ridge probe on frozen features, {task} top-1: " + "  ".join(
            f"{k} {t.probe[k]:.1%}" for k in PROBES if k in t.probe)

    registered = [p.get("registered")] + [t.registered for t in result.tasks.values() if t.registered]
    stage_rows: list[tuple[str, list[str]]] = [
        ("1 data", [f"{result.pretrain_data} ({seen} classes): train {d.get('train')}, val {d.get('val')}, few-shot "
                    f"{d.get('fewshot-train')}/{d.get('fewshot-test')}; {tasks}"]),
        ("2 pretrain", [f"{p.get('model')} {p.get('steps')} steps: loss {p.get('first_loss', 0):.3f} -> "
                        f"{p.get('last_loss', 0):.3f}; val top-1 {p.get('val_prec1', float('nan')):.1%}",
                        f"few-shot ({result.pretrain_data}): {shots}"]),
        ("3 transfer", _task_rows(result, lambda n, t: f"{n} top-1 {_spread(t.finetune)}  (from {p.get('source')})")),
        ("4 scratch", _task_rows(result, lambda n, t: f"{n} top-1 {_spread(t.scratch)}  (random init, same "
                                 "steps/batch/optimiser)")),
        ("5 probe", _task_rows(result, probes)),
        ("6 registry", [", ".join(map(str, registered))]),
    ]
    rows = [(name if i == 0 else "", times.get(name.split()[1]) if i == 0 else None, text)
            for name, texts in stage_rows for i, text in enumerate(texts)]
    rows.append(("total", times.get("total"), ""))
    width = max(len(r[2]) for r in rows)
    head = f"vitpipe demo summary ({plan.name if plan else ''}"
    head += f"; on {result.machine}" if result.machine else ""
    lines = [f"{head}; workdir {result.workdir})", f"{'stage':<11} {'wall':>8}  result",
             f"{'-' * 11} {'-' * 8}  {'-' * width}"]
    for name, secs, text in rows:
        lines.append(f"{name:<11} {(f'{secs:.1f} s' if secs is not None else ''):>8}  {text}".rstrip())
    lines.append("")
    few = [v for _, v in sorted(p.get("fewshot", {}).items())]
    if len(few) > 1 and any(b < a for a, b in zip(few, few[1:])):
        lines.append("NOTE: the few-shot accuracy does not rise with k on every step of the row above")
    for task, t in result.tasks.items():
        if t.finetune and t.scratch:
            lines.append(gap_verdict(task, t.gaps))
        if set(PROBES) <= set(t.probe):
            # one pass over one test split each: no seeds to average, the sign is what the run measured
            for other, what in (("random", "the same network at random init"), ("pixels", "raw pixels")):
                diff = (t.probe["pretrained"] - t.probe[other]) * 100
                word = "better" if diff > 0 else "NOT better"
                lines.append(f"pretrained features probe {word} than {what}: {diff:+.1f} points on {task}")
    lines += ["", "MLflow UI on this demo's store:", f"  {result.ui_command}", f"  then open {result.ui_link}"]
    return "\n".join(lines)
