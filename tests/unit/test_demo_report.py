"""The demo's report (pipeline/commands/demo_report.py) on made-up figures: the fine-tune vs scratch verdict (a win or
a loss only beyond 2 standard errors, no conclusion from 1 seed), the machine line, and a summary table that keeps
the lines tests/e2e/test_demo.py matches. The demo recipes resolve with the overrides the demo sets. No Ray."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.commands.demo_data import CONFIG_DIR, HELDOUT_TASK, PLANS
from pipeline.commands.demo_report import DemoResult, StageTime, TaskResult, format_summary, gap_verdict, machine_line
from pipeline.config import RunConfig, load_config
from pipeline.transfer.config import TransferRunConfig


def test_a_gap_beyond_two_standard_errors_is_a_win():
    line = gap_verdict("digits", [0.10, 0.12, 0.08, 0.11, 0.09])
    assert line == ("fine-tuning beats training from scratch: +10.0 ± 1.6 points top-1 on digits "
                    "(5 seeds, paired; > 2 SE)")


def test_a_negative_gap_beyond_two_standard_errors_is_a_loss():
    line = gap_verdict(HELDOUT_TASK, [-0.05, -0.06, -0.04, -0.05, -0.05])
    assert line.startswith("NOTE: fine-tuning did NOT beat training from scratch: -5.0 ± 0.7 points top-1 on "
                           "fmnist-heldout (5 seeds, paired;")


def test_a_gap_within_two_standard_errors_is_no_clear_difference():
    line = gap_verdict("digits", [0.05, -0.04, 0.06, -0.05, 0.01])
    assert line == ("fine-tune vs training from scratch on digits: no clear difference "
                    "(+0.6 ± 5.0 points, 5 seeds, paired)")
    assert "beat" not in line


@pytest.mark.parametrize("mean_over_std, clear", [(1.05, True), (0.95, False)])
def test_the_threshold_is_two_standard_errors_of_the_mean(mean_over_std, clear):
    # 4 seeds: the standard error is std / 2, so 2 SE is one std
    d = 0.01
    std = d * math.sqrt(4 / 3)
    gaps = [mean_over_std * std + x for x in (d, -d, d, -d)]
    assert np.std(gaps, ddof=1) == pytest.approx(std)
    assert gap_verdict("digits", gaps).startswith("fine-tuning beats") is clear


def test_one_seed_states_the_gap_and_draws_no_conclusion():
    line = gap_verdict("digits", [0.25])
    assert line.startswith("fine-tune vs training from scratch: +25.0 points top-1 on digits from 1 seed: "
                           "no conclusion drawn")
    assert "beats" not in line and "NOT" not in line


def test_identical_seeds_with_a_gap_are_a_win():
    assert gap_verdict("digits", [0.02, 0.02, 0.02]).startswith("fine-tuning beats")


def test_the_machine_line_names_the_cpu_the_cores_and_torch(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Fake  CPU 9000 @ 3.00GHz\n\nprocessor\t: 1\n"
                       "model name\t: Fake  CPU 9000 @ 3.00GHz\n")
    assert re.fullmatch(r"Fake CPU 9000 @ 3\.00GHz, \d+ cores, torch \S+", machine_line(cpuinfo))
    assert re.fullmatch(r".+, \d+ cores, torch \S+", machine_line(tmp_path / "absent"))


def _result(tasks: dict[str, TaskResult]) -> DemoResult:
    r = DemoResult(Path("/tmp/demo"), "sqlite:////tmp/demo/mlflow.db", pretrain_data="fashion-mnist",
                   machine="Fake CPU 9000, 2 cores, torch 2.5.1")
    r.stages = [StageTime(n, 1.5) for n in ("data", "pretrain", "transfer", "scratch", "probe", "registry", "total")]
    r.data = {"train": 2000, "val": 512, "fewshot-train": 300, "fewshot-test": 300}
    for t in tasks:
        r.data.update({f"{t}-train": 300, f"{t}-test": 297})
    r.classes = {"pretrain": ["a"] * 6}
    r.pretrain = {"model": "vit_pico4", "steps": 30, "first_loss": 1.8, "last_loss": 1.1, "val_prec1": 0.6,
                  "fewshot": {1: 0.4, 5: 0.5, 10: 0.55}, "registered": "models:/vit-demo/1",
                  "source": "models:/vit-demo@champion", "experiment_id": "1"}
    r.tasks = tasks
    return r


def _quick_tasks() -> dict[str, TaskResult]:
    return {HELDOUT_TASK: TaskResult([0.91], [0.85], {"pretrained": 0.93, "random": 0.88, "pixels": 0.9}),
            "digits": TaskResult([0.62], [0.58], {"pretrained": 0.8, "random": 0.85, "pixels": 0.9},
                                 registered="models:/vit-demo-digits/1")}


def test_the_summary_keeps_the_lines_the_e2e_test_matches():
    summary = format_summary(_result(_quick_tasks()), PLANS["quick"])
    rows = {line.split()[1] for line in summary.splitlines() if re.match(r"^\d \w+\s+[\d.]+ s ", line)}
    assert rows == {"data", "pretrain", "transfer", "scratch", "probe", "registry"}, summary
    assert re.search(r"loss [\d.]+ -> [\d.]+", summary) and "1-shot" in summary
    assert re.findall(r"digits top-1 ([\d.]+)%", summary) == ["62.0", "58.0"]
    assert re.search(r"digits top-1: pretrained 80\.0%  random 85\.0%  pixels 90\.0%", summary)
    assert re.findall(r"fmnist-heldout top-1 ([\d.]+)%", summary) == ["91.0", "85.0"]
    assert re.search(r"fmnist-heldout top-1: pretrained 93\.0%  random 88\.0%  pixels 90\.0%", summary)
    for task, gap in ((HELDOUT_TASK, "+6.0"), ("digits", "+4.0")):
        assert f"fine-tune vs training from scratch: {gap} points top-1 on {task} from 1 seed: no conclusion" in summary
    assert "pretrained features probe better than raw pixels: +3.0 points on fmnist-heldout" in summary
    assert "pretrained features probe NOT better than raw pixels: -10.0 points on digits" in summary
    assert "pretrained features probe NOT better than the same network at random init: -5.0 points on digits" in summary
    assert re.search(r"pretrained features probe (NOT )?better than raw pixels: [+-][\d.]+ points", summary)
    assert summary.splitlines()[0] == ("vitpipe demo summary (quick; on Fake CPU 9000, 2 cores, torch 2.5.1; "
                                       "workdir /tmp/demo)")
    assert "models:/vit-demo/1, models:/vit-demo-digits/1" in summary
    assert "mlflow ui --backend-store-uri sqlite:////tmp/demo/mlflow.db --host 127.0.0.1 --port 5000" in summary


def test_the_summary_states_the_tasks_in_the_order_they_ran_with_their_verdicts():
    tasks = {HELDOUT_TASK: TaskResult([0.95, 0.94, 0.96, 0.95, 0.95], [0.90, 0.91, 0.90, 0.89, 0.90]),
             "digits": TaskResult([0.80, 0.70, 0.82, 0.75, 0.78], [0.78, 0.74, 0.80, 0.72, 0.79])}
    lines = format_summary(_result(tasks), PLANS["full"]).splitlines()
    transfer = next(i for i, line in enumerate(lines) if line.startswith("3 transfer"))
    assert "fmnist-heldout top-1 95.0% ± 0.7 (5 seeds)" in lines[transfer]
    assert lines[transfer + 1].split()[0] == "digits" and "(5 seeds)" in lines[transfer + 1]
    verdicts = [line for line in lines if "training from scratch" in line]
    assert verdicts == [
        "fine-tuning beats training from scratch: +5.0 ± 1.2 points top-1 on fmnist-heldout (5 seeds, paired; > 2 SE)",
        "fine-tune vs training from scratch on digits: no clear difference (+0.4 ± 2.9 points, 5 seeds, paired)",
    ]


def test_the_digits_fallback_summary_has_no_held_out_rows():
    summary = format_summary(_result({"digits": _quick_tasks()["digits"]}), PLANS["quick"])
    assert HELDOUT_TASK not in summary and len(re.findall(r"digits top-1 ([\d.]+)%", summary)) == 2


def test_the_demo_recipes_resolve_with_the_overrides_the_demo_sets():
    pre = load_config(CONFIG_DIR / "pretrain-quick.yaml", [], RunConfig)
    assert pre.model.num_classes == 6
    held = load_config(CONFIG_DIR / "transfer-quick.yaml", ["model.num_classes=4", "data.augment.hflip=true",
                                                             "tracking.registered_model=null", "transfer.plots=false"],
                       TransferRunConfig)
    assert held.model.num_classes == 4 and held.data.augment.hflip and held.tracking.registered_model is None
    digits = load_config(CONFIG_DIR / "transfer-quick.yaml", [], TransferRunConfig)
    assert digits.model.num_classes == 10 and not digits.data.augment.hflip
    assert digits.tracking.registered_model == "vit-demo-digits" and digits.name == "demo-transfer-quick"
    assert PLANS["full"].seeds == 5 and PLANS["quick"].seeds == 1
