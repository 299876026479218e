"""The launch path without a cluster: storage checks (placeholder, node-local paths on GPUs or several nodes), what
crosses to the workers (one pickled WorkerSpec; no DS_ACCELERATOR on GPU clusters), the torch backend, and what a
resume may change."""

from __future__ import annotations

import functools
import pickle
import re
from pathlib import Path

import cloudpickle
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.launch.checks import check_storage
from pipeline.launch.driver import check_cluster, worker_env
from pipeline.pretrain import _check_resume, resume_changes
from pipeline.tracking.sinks import RunRef
from pipeline.train.hooks import TrainHooks
from pipeline.train.spec import InitSpec, WorkerSpec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/pretrain/smoke.yaml")
PAPER = str(ROOT / "configs/pretrain/vit-b16-i21k.yaml")


def test_the_paper_recipes_refuse_to_run_until_storage_is_set(capsys):
    cfg = load_config(PAPER)  # shows and plans fine ...
    with pytest.raises(ConfigError, match=r"scaling\.storage_path is the recipe's placeholder '<set .*>': set it"):
        check_storage(cfg)  # ... but does not run
    assert main(["submit", "pretrain", PAPER, "--dry-run"]) == 2
    assert "scaling.storage_path is the recipe's placeholder" in capsys.readouterr().err
    assert main(["submit", "transfer", str(ROOT / "configs/transfer/imagenet.yaml"), "--from", "models:/m@a",
                 "--dry-run", "--set", "scaling.storage_path=s3://b/runs"]) == 0
    check_storage(load_config(PAPER, ["scaling.storage_path=s3://bucket/runs"]))


@pytest.mark.parametrize("path, shared, ok", [
    ("./runs", False, False), ("/mnt/runs", False, False), ("file:///mnt/runs", False, False),
    ("/mnt/lustre/runs", True, True), ("s3://bucket/runs", False, True), ("gs://bucket/runs", False, True),
])
def test_a_node_local_directory_needs_one_node_or_a_shared_filesystem(path, shared, ok):
    cfg = load_config(SMOKE, [f"scaling.storage_path={path}", f"scaling.shared_filesystem={shared}"])
    check_cluster(cfg, nodes=1)  # one machine: its own disk is fine
    gpu = load_config(SMOKE, [f"scaling.storage_path={path}", f"scaling.shared_filesystem={shared}",
                              "scaling.use_gpu=true"])
    if ok:
        check_cluster(cfg, nodes=3)
        check_storage(gpu)
        return
    with pytest.raises(ConfigError, match=re.escape(f"scaling.storage_path {path!r} is a directory on the driver's "
                                                    "machine, but the Ray cluster has 3 nodes")) as e:
        check_cluster(cfg, nodes=3)
    assert "scaling.storage_path=s3://BUCKET/runs" in str(e.value) and "shared_filesystem=true" in str(e.value)
    with pytest.raises(ConfigError, match=r"scaling\.use_gpu runs workers on GPU nodes that do not share it"):
        check_storage(gpu)


def test_gpu_decoding_needs_gpu_workers(capsys):
    check_storage(load_config(SMOKE, ["data.decode_device=cuda", "scaling.use_gpu=true",
                                      "scaling.storage_path=s3://b/r"]))
    with pytest.raises(ConfigError, match=r"data\.decode_device is 'cuda' but scaling\.use_gpu is false"):
        check_storage(load_config(SMOKE, ["data.decode_device=cuda"]))
    assert main(["submit", "pretrain", SMOKE, "--dry-run", "--set", "data.decode_device=cuda"]) == 2
    assert "data.decode_device is 'cuda'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"data\.decode_device"):
        load_config(SMOKE, ["data.decode_device=gpu"])  # only cpu or cuda


def test_ds_accelerator_is_never_forwarded_to_gpu_workers():
    environ = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": "/cache/ops", "AWS_SECRET_ACCESS_KEY": "s"}
    cpu = worker_env(load_config(SMOKE), environ)
    gpu = worker_env(load_config(SMOKE, ["scaling.use_gpu=true", "scaling.storage_path=s3://b/r"]), environ)
    assert cpu == {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": "/cache/ops"}
    assert gpu == {"TORCH_EXTENSIONS_DIR": "/cache/ops"}  # and never credentials


def test_nccl_on_gpus_gloo_on_cpus():
    from pipeline.launch.driver import build_trainer

    for use_gpu, backend in ((True, "nccl"), (False, "gloo")):
        cfg = load_config(SMOKE, [f"scaling.use_gpu={use_gpu}", "scaling.storage_path=s3://b/runs"])
        trainer = build_trainer(cfg, lambda: None)
        assert trainer.backend_config.backend == backend
        assert trainer.scaling_config.use_gpu is use_gpu


def test_the_worker_spec_crosses_whole_and_typed(tmp_path):
    from pipeline.launch.worker import train_worker

    cfg = load_config(SMOKE, [f"scaling.storage_path={tmp_path}"])
    spec = WorkerSpec(config=cfg, run_url=f"{tmp_path}/smoke", run=RunRef(sink="stdout"),
                      init=InitSpec(checkpoint="s3://b/runs/x/init", freeze_backbone=True))
    back = pickle.loads(pickle.dumps(spec))
    same = lambda a, b: a.model_dump(exclude={"hooks"}) == b.model_dump(exclude={"hooks"})  # noqa: E731
    assert same(back, spec) and back.config == cfg and type(back.hooks) is TrainHooks
    fn = cloudpickle.loads(cloudpickle.dumps(functools.partial(train_worker, spec, None)))  # what Ray ships
    assert same(fn.args[0], spec)
    with pytest.raises(ValueError):
        WorkerSpec(config=cfg, run_url="x", hooks="tests.fixtures.hooks:FaultHooks")  # an object, not a name
    with pytest.raises(ValueError):
        InitSpec(checkpoint="s3://b/x", reset_head=True)  # adaptation happens on the driver


def test_what_a_resume_may_change(caplog):
    saved = load_config(SMOKE).model_dump(mode="json")
    more = load_config(SMOKE, ["train.steps=40", "scaling.num_workers=1", "train.optim.lr=1e-4",
                               "model.drop_path_rate=0.1"])
    assert resume_changes(saved, more) == [("model.drop_path_rate", 0.0, 0.1), ("scaling.num_workers", 2, 1),
                                           ("train.optim.lr", 3e-3, 1e-4), ("train.steps", 20, 40)]
    with caplog.at_level("INFO", logger="pipeline.pretrain"):
        _check_resume(saved, more, "s3://b/runs/smoke/checkpoint_00000010")  # reported, allowed
    levels = {r.getMessage(): r.levelname for r in caplog.records}
    assert levels == {"--resume: model.drop_path_rate changed 0.0 -> 0.1": "WARNING",
                      "--resume: scaling.num_workers changed 2 -> 1": "INFO",
                      "--resume: train.optim.lr changed 0.003 -> 0.0001": "WARNING",
                      "--resume: train.steps changed 20 -> 40": "INFO"}
    for key, value in (("data.virtual_readers", 16), ("train.global_batch", 128), ("data.seed", 1)):
        other = load_config(SMOKE, [f"{key}={value}"])
        with pytest.raises(ConfigError, match=rf"--resume: checkpoint s3://b/runs/smoke/checkpoint_00000010 was "
                                              rf"trained with another order of the samples \({key}: "):
            _check_resume(saved, other, "s3://b/runs/smoke/checkpoint_00000010")
    legacy = {**saved, "data": {k: v for k, v in saved["data"].items() if k != "virtual_readers"}}
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.pretrain"):
        _check_resume(legacy, load_config(SMOKE, ["train.global_batch=128"]), "s3://b/runs/old/checkpoint_00000010")
    assert any("predates the elastic data plan: it continues at its step with 48 virtual readers" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    wider = load_config(SMOKE, ["model.name=vit_nano4"])
    with pytest.raises(ConfigError, match=r"--resume: checkpoint s3://b/runs/smoke/checkpoint_00000010 holds "
                                          r"another model \(model\.name: 'vit_pico4' -> 'vit_nano4'\)"):
        _check_resume(saved, wider, "s3://b/runs/smoke/checkpoint_00000010")


def test_only_the_tracking_package_creates_mlflow_runs_and_no_test_switch_is_left():
    """The run has one owner (pipeline/tracking/run.py); the product has no fault injection."""
    created = re.compile(r"MlflowClient\(|\.create_run\(|\.create_experiment\(|mlflow\.start_run|set_terminated")
    offenders = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if not rel.startswith("pipeline/tracking/") and created.search(text):
            offenders.append(rel)
        if "VITPIPE_TEST_FAULT" in text or re.search(r"\bfault=", text):
            offenders.append(rel)
    assert offenders == []
    run_owner = [p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py")
                 if re.search(r"\.create_run\(|\.create_experiment\(|set_terminated", p.read_text())]
    assert run_owner == ["pipeline/tracking/run.py"]

