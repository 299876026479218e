"""`vitpipe transfer-suite` on the single-node stack (Ray with token auth, moto S3, an MLflow server): a folder of
three tiny digits tasks in two groups, from a registered vit_pico4, runs as three Ray jobs, at most two at once,
their runs nested under one parent run that logs the group and overall means of their final top-1. The suite
submitted as a Ray job itself (`vitpipe submit transfer-suite`) finds its cluster from inside and, with a task
that fails, ends FAILED naming it. Bad input is refused before any job exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VITPIPE = [sys.executable, "-m", "pipeline.cli"]
SOURCE = "models:/suite-src@champion"
EXPERIMENT = "vit-suite-test"
# what `--set` gives every task: one 1-CPU worker each (two tasks fit the stack's 2 CPUs side by side), two steps,
# one final eval batch, no pictures, nothing registered
COMMON = ["train.steps=2", "train.global_batch=16", "train.micro_batch=16", "train.log_every=1",
          "train.checkpoint_every=2", "train.eval_every=2", "scaling.num_workers=1", "transfer.plots=false",
          "transfer.final_eval_batches=1", "tracking.registered_model=null", f"tracking.experiment={EXPERIMENT}"]


def _vitpipe(args: list[str], stack, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([*VITPIPE, *args], capture_output=True, text=True, env={**os.environ, **stack.env()},
                       cwd=ROOT, timeout=timeout)
    print(r.stdout[-3000:], r.stderr[-4000:], sep="\n")
    return r


@pytest.fixture(scope="module")
def world(local_stack, tmp_path_factory):
    """Digits shards on the stack's S3 (a train split, three eval splits: the tasks' top-1 differ),
    `suite-src@champion` (a fresh vit_pico4 at 28 px: transfer needs weights,
    not good ones), and a writer of task folders."""
    from pipeline.model import build_model
    from pipeline.model.checkpoint import save_checkpoint
    from tests.fixtures.mlflow import register_in_new_run
    from tests.fixtures.ray_stack import stack_credentials, write_digit_splits

    data = f"s3://{local_stack.bucket}/suite-test"
    splits = write_digit_splits(local_stack, data, {"train": (0, 128), "test-a": (1000, 1064),
                                                    "test-b": (1100, 1164), "test-c": (1200, 1264)})
    with stack_credentials(local_stack):
        ckpt = save_checkpoint(tmp_path_factory.mktemp("src"),
                               build_model("vit_pico4", image_size=28, num_classes=10, pre_logits=64))
        register_in_new_run(ckpt, name="suite-src", alias="champion", tracking_uri=local_stack.mlflow_uri,
                            experiment="suite-src")

    def folder(name: str, tasks: dict[str, tuple[str | None, str]]) -> Path:
        """tmp/<name>/vtab/<task>.yaml for task -> (group, val split URL), on the smoke transfer recipe."""
        d = tmp_path_factory.mktemp(name) / "vtab"
        d.mkdir()
        for key, (group, val) in tasks.items():
            lines = [f"base: {ROOT / 'configs/transfer/smoke.yaml'}", f"name: suite-{key}",
                     f"data: {{train: {splits['train']}, val: {val}}}"]
            if group:
                lines.append(f"transfer: {{group: {group}}}")
            (d / f"{key}.yaml").write_text("\n".join(lines) + "\n")
        return d

    overrides = [*COMMON, f"scaling.storage_path={data}/runs"]
    return {"splits": splits, "folder": folder, "overrides": overrides, "data": data}


def _suite_jobs(stack, suite: str) -> list:
    from pipeline.launch.submit import job_client

    with pytest.MonkeyPatch.context() as m:
        m.setenv("RAY_AUTH_TOKEN_PATH", stack.token_path)
        jobs = job_client(stack.dashboard_url).list_jobs()
    return [j for j in jobs if (j.metadata or {}).get("suite") == suite]


def _most_at_once(jobs) -> int:
    """The most jobs between submission and end at any moment (Ray's start_time / end_time, ms)."""
    events = sorted([(j.start_time, 1) for j in jobs] + [(j.end_time, -1) for j in jobs])  # an end sorts first
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_three_tasks_two_at_a_time_nested_under_the_means(local_stack, world):
    from mlflow import MlflowClient

    splits = world["splits"]
    folder = world["folder"]("ok", {"digits-a": ("natural", splits["test-a"]),
                                    "digits-b": ("natural", splits["test-b"]),
                                    "digits-c": ("structured", splits["test-c"])})
    r = _vitpipe(["transfer-suite", str(folder), "--from", SOURCE, "--max-concurrent", "2", "--no-working-dir",
                  "--name", "suite-ok", "--set", *world["overrides"]], local_stack)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["failed"] == [] and summary["suite"] == "suite-ok"

    client = MlflowClient(local_stack.mlflow_uri)
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "suite-ok"
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert parent.info.experiment_id == exp.experiment_id
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    top1 = {c.info.run_name: c.data.metrics["final/top1"] for c in children}
    assert sorted(top1) == ["digits-a", "digits-b", "digits-c"]
    assert all(c.info.status == "FINISHED" for c in children), [(c.info.run_name, c.info.status) for c in children]
    assert all(0.0 <= v <= 1.0 for v in top1.values()), top1
    # the children are the transfer jobs' own runs: tagged with their source, one storage folder each
    assert {c.data.tags["source.uri"] for c in children} == {"models:/suite-src/1"}
    assert {c.data.params["name"] for c in children} == {f"suite-ok-digits-{k}" for k in "abc"}

    m = parent.data.metrics
    want = {"vtab/digits-a": top1["digits-a"], "vtab/digits-b": top1["digits-b"], "vtab/digits-c": top1["digits-c"],
            "vtab/natural": (top1["digits-a"] + top1["digits-b"]) / 2, "vtab/structured": top1["digits-c"],
            "vtab/mean": sum(top1.values()) / 3, "vtab/tasks": 3, "vtab/tasks_failed": 0,
            "vtab/natural_tasks": 2, "vtab/structured_tasks": 1}
    assert m == pytest.approx(want), m

    jobs = _suite_jobs(local_stack, "suite-ok")
    assert sorted(j.submission_id for j in jobs) == [f"suite-ok-digits-{k}" for k in "abc"]
    assert {str(j.status.value) for j in jobs} == {"SUCCEEDED"}
    assert _most_at_once(jobs) == 2, [(j.submission_id, j.start_time, j.end_time) for j in jobs]


def test_submitted_suite_with_a_failing_task_ends_failed_naming_it(local_stack, world):
    """The suite's driver as a Ray job: it looks its cluster up from inside, submits the task, and the task that
    fails (its eval split does not exist) leaves the parent run FAILED, the job FAILED, the counts logged."""
    from mlflow import MlflowClient

    folder = world["folder"]("bad", {"digits-gone": ("natural", f"{world['data']}/nope/manifest.json")})
    r = _vitpipe(["submit", "transfer-suite", str(folder), "--from", SOURCE, "--no-working-dir", "--name",
                  "suite-bad", "--follow", "--set", *world["overrides"]], local_stack)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert ("1 of 1 tasks failed: digits-gone (job suite-bad-digits-gone FAILED, exit 2: transfer job: dataset "
            "manifest not found") in r.stdout, r.stdout[-4000:]
    client = MlflowClient(local_stack.mlflow_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent, = client.search_runs([exp.experiment_id], "attributes.run_name = 'suite-bad'")
    assert parent.info.status == "FAILED" and parent.data.tags["suite.failed_tasks"] == "digits-gone"
    assert parent.data.metrics == {"vtab/tasks": 0, "vtab/tasks_failed": 1, "vtab/natural_tasks": 0}
    assert [str(j.status.value) for j in _suite_jobs(local_stack, "suite-bad")] == ["FAILED"]


@pytest.mark.parametrize("case", ["unknown source", "invalid task", "empty folder"])
def test_bad_input_is_refused_before_any_job(local_stack, world, case):
    folder = world["folder"]("refused", {"digits-a": ("natural", world["splits"]["test-a"])})
    source, expect = SOURCE, None
    if case == "unknown source":
        source, expect = "models:/no-such-model@champion", "no registered model named 'no-such-model'"
    elif case == "invalid task":
        (folder / "digits-z.yaml").write_text((folder / "digits-a.yaml").read_text() + "train: {stepz: 3}\n")
        expect = f"{folder / 'digits-z.yaml'}: train.stepz: unknown key"
    else:
        for p in folder.glob("*.yaml"):
            p.unlink()
        expect = "no task configs in it"
    name = f"suite-refused-{case.split()[0]}"
    r = _vitpipe(["transfer-suite", str(folder), "--from", source, "--no-working-dir", "--name", name, "--set",
                  *world["overrides"]], local_stack, timeout=120)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert _suite_jobs(local_stack, name) == []
    from mlflow import MlflowClient

    client = MlflowClient(local_stack.mlflow_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        assert client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'") == []
