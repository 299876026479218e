"""What `vitpipe demo` reports: its figures as they are gathered (`DemoResult`), the stage headers and result lines
(`Stages`), and the summary table with the MLflow UI hint at the end (`format_summary`)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.commands.demo_data import DemoPlan
from pipeline.tracking.run import ui_url

__all__ = ["StageTime", "DemoResult", "Stages", "format_summary"]


@dataclass
class StageTime:
    name: str
    seconds: float


@dataclass
class DemoResult:
    workdir: Path
    tracking_uri: str
    pretrain_data: str = ""                 # "fashion-mnist" or "digits" (fallback)
    stages: list[StageTime] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)          # split -> samples
    pretrain: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)  # "top1": first seed's, "seeds": every seed's
    scratch: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, float] = field(default_factory=dict)      # features -> ridge-probe top-1 on digits

    @property
    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000"

    @property
    def ui_link(self) -> str:
        """The pretraining experiment in the model-training view of what `ui_command` serves."""
        return ui_url("http://127.0.0.1:5000", self.pretrain.get("experiment_id"))

    @property
    def transfer_gain(self) -> float:
        """Mean over seeds of fine-tune minus scratch top-1 (paired by seed)."""
        return float(np.mean(self._gaps()))

    @property
    def transfer_gain_std(self) -> float | None:
        gaps = self._gaps()
        return float(np.std(gaps, ddof=1)) if len(gaps) > 1 else None

    def _gaps(self) -> list[float]:
        a = self.transfer.get("seeds") or [self.transfer["top1"]]
        b = self.scratch.get("seeds") or [self.scratch["top1"]]
        return [x - y for x, y in zip(a, b)]


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


def format_summary(result: DemoResult, plan: DemoPlan | None = None) -> str:
    """The summary table printed at the end of the demo, its verdicts, and how to open the MLflow UI on its store."""
    times = {s.name: s.seconds for s in result.stages}
    p, tr, sc = result.pretrain, result.transfer, result.scratch
    shots = "  ".join(f"{k}-shot {v:.1%}" for k, v in sorted(p.get("fewshot", {}).items()))
    d = result.data
    pr = result.probe
    probe = "  ".join(f"{k} {pr[k]:.1%}" for k in ("pretrained", "random", "pixels") if k in pr)
    rows = [
        ("1 data", times.get("data"), f"{result.pretrain_data}: train {d.get('train')}, val {d.get('val')}, "
         f"few-shot {d.get('fewshot-train')}/{d.get('fewshot-test')}; digits {d.get('digits-train')}/"
         f"{d.get('digits-test')}"),
        ("2 pretrain", times.get("pretrain"), f"{p.get('model')} {p.get('steps')} steps: loss "
         f"{p.get('first_loss', 0):.3f} -> {p.get('last_loss', 0):.3f}; "
         f"val top-1 {p.get('val_prec1', float('nan')):.1%}"),
        ("", None, f"few-shot ({result.pretrain_data}): {shots}"),
        ("3 transfer", times.get("transfer"), f"digits top-1 {_spread(tr.get('seeds', []))}  (from {p.get('source')})"),
        ("4 scratch", times.get("scratch"), f"digits top-1 {_spread(sc.get('seeds', []))}  (random init, same "
         "steps/batch/optimiser)"),
        ("5 probe", times.get("probe"), f"ridge probe on frozen features, digits top-1: {probe}"),
        ("6 registry", times.get("registry"), f"{p.get('registered')}, {tr.get('registered')}"),
        ("total", times.get("total"), ""),
    ]
    width = max(len(r[2]) for r in rows)
    lines = [f"vitpipe demo summary ({plan.name if plan else ''}; workdir {result.workdir})",
             f"{'stage':<11} {'wall':>8}  result", f"{'-' * 11} {'-' * 8}  {'-' * width}"]
    for name, secs, text in rows:
        lines.append(f"{name:<11} {(f'{secs:.1f} s' if secs is not None else ''):>8}  {text}".rstrip())
    lines.append("")
    few = [v for _, v in sorted(p.get("fewshot", {}).items())]
    if len(few) > 1 and any(b < a for a, b in zip(few, few[1:])):
        lines.append("NOTE: the few-shot accuracy does not rise with k on every step of the row above")
    if tr and sc:
        gain, std = result.transfer_gain, result.transfer_gain_std
        n = len(tr.get("seeds", [])) or 1
        spread_txt = f" ± {std * 100:.1f}" if std is not None else ""
        verdict = "fine-tuning beats training from scratch" if gain > 0 else \
            "NOTE: fine-tuning did NOT beat training from scratch"
        lines.append(f"{verdict}: {gain * 100:+.1f}{spread_txt} points top-1 on digits ({n} seed(s), paired)")
    if {"pretrained", "random", "pixels"} <= set(pr):
        for other, what in (("random", "the same network at random init"), ("pixels", "raw pixels")):
            diff = (pr["pretrained"] - pr[other]) * 100
            word = "better" if diff > 0 else "NOT better"
            lines.append(f"pretrained features probe {word} than {what}: {diff:+.1f} points")
    lines += ["", "MLflow UI on this demo's store:", f"  {result.ui_command}", f"  then open {result.ui_link}"]
    return "\n".join(lines)
