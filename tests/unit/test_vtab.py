"""VTAB-1k as one suite: the 19 shipped task recipes (classes, groups, the paper's recipe), the suite's loader and
its refusals, the parent run's means, the job scheduler's stop, the suite's submission."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.transfer.config import TransferRunConfig
from pipeline.transfer.suite import TaskOutcome, _run_jobs, load_suite, suite_metrics

ROOT = Path(__file__).resolve().parents[2]
VTAB = ROOT / "configs" / "transfer" / "vtab"
STORAGE = "scaling.storage_path=s3://b/runs"
# VTAB-1k (Zhai et al. 2019) task -> (group, classes)
TASKS = {
    "caltech101": ("natural", 102), "cifar100": ("natural", 100), "dtd": ("natural", 47),
    "flowers102": ("natural", 102), "pets": ("natural", 37), "sun397": ("natural", 397), "svhn": ("natural", 10),
    "camelyon": ("specialized", 2), "eurosat": ("specialized", 10), "resisc45": ("specialized", 45),
    "retinopathy": ("specialized", 5),
    "clevr-count": ("structured", 8), "clevr-dist": ("structured", 6), "dmlab": ("structured", 6),
    "dsprites-loc": ("structured", 16), "dsprites-ori": ("structured", 16), "kitti-dist": ("structured", 4),
    "smallnorb-azim": ("structured", 18), "smallnorb-elev": ("structured", 9),
}


def _top_keys(text: str) -> list[str]:
    import yaml

    return list(yaml.safe_load(text))


def test_the_folder_holds_the_19_tasks():
    assert sorted(p.stem for p in VTAB.glob("*.yaml") if not p.name.startswith("_")) == sorted(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_recipe(task):
    path = VTAB / f"{task}.yaml"
    cfg = load_config(path, (), TransferRunConfig)
    group, classes = TASKS[task]
    assert (cfg.transfer.group, cfg.model.num_classes) == (group, classes)
    assert cfg.data.train == f"s3://datasets/vtab-1k/{task}/train800val200/manifest.json"
    assert cfg.data.val == f"s3://datasets/vtab-1k/{task}/test/manifest.json"
    t = cfg.train
    assert (t.optim.lr, t.steps, t.global_batch, cfg.model.image_size) == (0.01, 2500, 512, 384)
    assert (t.optim.name, t.optim.momentum, t.optim.weight_decay, t.optim.grad_clip) == ("sgd", 0.9, 0.0, 1.0)
    assert t.schedule.decay == "cosine" and t.schedule.warmup_steps < t.steps
    assert cfg.transfer.mode == "finetune" and cfg.transfer.source and cfg.tracking.registered_model is None
    text = path.read_text()
    assert f"vitpipe transfer configs/transfer/vtab/{task}.yaml" in text.split("\nbase:")[0]
    assert set(_top_keys(text)) == {"base", "name", "transfer", "model", "data"}  # the rest is in _vtab.yaml


def test_the_suite_loads_the_three_groups():
    suite = load_suite(VTAB, [STORAGE])
    assert suite.prefix == "vtab" and [t.key for t in suite.tasks] == sorted(TASKS)
    assert {g: len(keys) for g, keys in suite.groups.items()} == {"natural": 7, "specialized": 4, "structured": 8}
    assert all(t.cfg.scaling.storage_path == "s3://b/runs" for t in suite.tasks)  # --set reaches every task
    assert suite.tracking.experiment == "vit-transfer" and suite.tracking.registered_model is None


def test_the_old_single_task_recipe_is_caltech101():
    cfg = load_config(ROOT / "configs/transfer/vtab.yaml", (), TransferRunConfig)
    assert (cfg.name, cfg.model.num_classes, cfg.transfer.group) == ("vtab", 102, "natural")
    assert "caltech101" in cfg.data.train and cfg.tracking.registered_model == "vit-b16-i21k-vtab"


# ---------------------------------------------------------------- refusals
def _task(folder: Path, key: str, text: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.yaml"
    path.write_text(f"base: {ROOT / 'configs/transfer/smoke.yaml'}\n{text}")
    return path


def test_a_missing_or_empty_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"nope: no such folder"):
        load_suite(tmp_path / "nope")
    (tmp_path / "_base.yaml").write_text("transfer: {}\n")
    with pytest.raises(ConfigError, match=r"no task configs in it"):
        load_suite(tmp_path)


def test_an_invalid_task_is_refused_naming_its_file(tmp_path):
    _task(tmp_path / "s", "good")
    bad = _task(tmp_path / "s", "bad", "transfer: {group: Natural}\n")
    with pytest.raises(ConfigError, match=rf"(?s)transfer suite task {bad}: .*transfer.group: .*lowercase letters"):
        load_suite(tmp_path / "s")
    bad.write_text(bad.read_text().replace("Natural", "natural") + "transfer: {mode: fewshot}\n")
    with pytest.raises(ConfigError, match=rf"{bad}: transfer.mode is fewshot"):
        load_suite(tmp_path / "s")
    bad.write_text(f"base: {ROOT / 'configs/transfer/smoke.yaml'}\ntracking: {{experiment: elsewhere}}\n")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 's' / 'good.yaml'}: tracking.experiment 'vit-transfer-smoke' "
                                          rf"differs from 'elsewhere' of {bad}"):
        load_suite(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"tracking.sink is 'stdout'"):
        load_suite(tmp_path / "s", ["tracking.sink=stdout", "tracking.registered_model=null"])
    with pytest.raises(ConfigError, match=r"storage_path is the recipe's placeholder"):
        load_suite(VTAB)


def test_names_that_would_share_a_metric_are_refused(tmp_path):
    _task(tmp_path / "s", "natural", "transfer: {group: natural}\n")
    with pytest.raises(ConfigError, match=r"natural would name two metrics"):
        load_suite(tmp_path / "s")
    _task(tmp_path / "t", "mean")
    with pytest.raises(ConfigError, match=r"mean would name two metrics"):
        load_suite(tmp_path / "t")


# ---------------------------------------------------------------- the parent's metrics
def test_means_per_group_and_over_the_tasks_that_succeeded():
    outcomes = [TaskOutcome("a", "natural", top1=0.5), TaskOutcome("b", "natural", top1=0.7),
                TaskOutcome("c", "structured", top1=0.2), TaskOutcome("d", "structured", error="job FAILED"),
                TaskOutcome("e", "specialized", error="job FAILED"), TaskOutcome("f", None, top1=0.1)]
    m = suite_metrics("vtab", outcomes)
    assert m == pytest.approx({
        "vtab/a": 0.5, "vtab/b": 0.7, "vtab/c": 0.2, "vtab/f": 0.1,
        "vtab/natural": 0.6, "vtab/natural_tasks": 2, "vtab/structured": 0.2, "vtab/structured_tasks": 1,
        "vtab/specialized_tasks": 0,  # no mean for a group with no result
        "vtab/mean": (0.5 + 0.7 + 0.2 + 0.1) / 4, "vtab/tasks": 4, "vtab/tasks_failed": 2,
    })
    assert suite_metrics("s", [TaskOutcome("x", "g", error="FAILED")]) == {"s/g_tasks": 0, "s/tasks": 0,
                                                                            "s/tasks_failed": 1}


# ---------------------------------------------------------------- the scheduler
class _Status:
    def __init__(self, value: str):
        self.value = value


class _Jobs:
    """What _run_jobs asks of Ray's JobSubmissionClient: each job runs for `polls` status calls."""

    def __init__(self, polls: int = 2):
        self.polls, self.asked, self.stopped, self.running, self.most = polls, {}, [], set(), 0

    def submit(self, task) -> str:
        job = f"job-{task.key}"
        self.asked[job] = 0
        self.running.add(job)
        self.most = max(self.most, len(self.running))
        return job

    def get_job_status(self, job: str) -> _Status:
        self.asked[job] += 1
        if self.asked[job] >= self.polls:
            self.running.discard(job)
            return _Status("SUCCEEDED")
        return _Status("RUNNING")

    def stop_job(self, job: str) -> None:
        self.stopped.append(job)


class _Task:
    def __init__(self, key: str):
        self.key, self.group = key, None


def test_never_more_jobs_than_allowed_and_all_of_them_run():
    jobs, tasks = _Jobs(), [_Task(k) for k in "abcde"]
    outcomes = {t.key: TaskOutcome(t.key, None) for t in tasks}
    _run_jobs(jobs, tasks, jobs.submit, outcomes, max_concurrent=2, poll_s=0)
    assert jobs.most == 2 and sorted(jobs.asked) == [f"job-{k}" for k in "abcde"]
    assert {o.status for o in outcomes.values()} == {"SUCCEEDED"}


def test_an_interrupted_suite_stops_the_jobs_still_running():
    jobs, tasks = _Jobs(polls=10**9), [_Task(k) for k in "abc"]
    outcomes = {t.key: TaskOutcome(t.key, None) for t in tasks}
    calls = iter(range(10**9))

    def status(job):  # the stop (SIGTERM -> SystemExit 143) arrives while two run
        if next(calls) == 3:
            raise SystemExit(143)
        return _Status("RUNNING")

    jobs.get_job_status = status
    with pytest.raises(SystemExit):
        _run_jobs(jobs, tasks, jobs.submit, outcomes, max_concurrent=2, poll_s=0)
    assert sorted(jobs.stopped) == ["job-a", "job-b"]
    assert [outcomes[k].status for k in "abc"] == ["STOPPED", "STOPPED", None]


# ---------------------------------------------------------------- submission
def test_the_submitted_suite_runs_its_driver_with_the_same_arguments():
    from pipeline.commands.submit import build_job_submission
    from pipeline.launch import submit as S

    sub = build_job_submission("transfer-suite", ["configs/transfer/vtab"], [STORAGE],
                               job_args=["--max-concurrent", "4", "--from", "models:/m@a"], environ={})
    assert sub.entrypoint == ("python -m jobs.transfer_suite configs/transfer/vtab --set scaling.storage_path=s3://b/runs "
                              "--max-concurrent 4 --from models:/m@a")
    assert sub.runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(S.SUITE_STOP_GRACE_S)
    assert sub.metadata["vitpipe_kind"] == "transfer-suite" and len(sub.config.tasks) == 19
    with pytest.raises(ConfigError, match="placeholder"):
        build_job_submission("transfer-suite", ["configs/transfer/vtab"], [], environ={})


def test_the_cli_refuses_bad_input_before_any_cluster_call(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["transfer-suite", str(tmp_path / "none"), "--from", "models:/m@a"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["submit", "transfer-suite", str(VTAB), "--from", "models:/m@a", "--dry-run"]) == 2
    assert "placeholder" in capsys.readouterr().err
    assert main(["transfer-suite", str(VTAB), "--set", STORAGE, "--max-concurrent", "0", "--address",
                 "http://127.0.0.1:9"]) == 2
    assert "--max-concurrent must be at least 1" in capsys.readouterr().err
