"""The worker's training loop in this process (world size 1, real DeepSpeed on gloo, local shards), without Ray:
a non-finite loss stops the run naming the step; what a transfer job hands the loop (weights adapted on the driver
by pipeline.model.weights.adapt_state_dict: resampled position embedding, new head; frozen backbone) with SGD; a
stop request; the final export round trip."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.data.storage import Storage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    from tests.fixtures.s3 import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.data.writer import write_array_shards

    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 64)
    images = rng.integers(0, 256, (64, 16, 16)).astype(np.uint8)
    return write_array_shards(images, labels, str(root / "train"), name="tiny", split="train",
                              class_names=list("abcd"), samples_per_shard=32)


def _cfg(shards, tmp_path, *over):
    from pipeline.config import load_config

    return load_config("configs/pretrain/smoke.yaml", [
        "model.image_size=16", "model.num_classes=4", f"data.train={shards}", "data.num_workers=0",
        "train.global_batch=16", "train.micro_batch=16", "train.steps=3", "train.log_every=1",
        "train.checkpoint_every=100", "scaling.num_workers=1", f"scaling.storage_path={tmp_path}/runs",
        "tracking.sink=stdout", *over,
    ])


def _train(cfg, init=None, restore_dir=None, keep_dir=None, run=None, interrupt=None, hooks=None):
    """Runs the loop; every reported checkpoint must be complete; the last one is copied to `keep_dir`."""
    import shutil

    from pipeline.launch.driver import run_url
    from pipeline.tracking.sinks import RunRef
    from pipeline.train.checkpoint import is_complete
    from pipeline.train.loop import run_training
    from pipeline.train.spec import WorkerSpec

    reports = []

    def report(metrics, checkpoint_dir, step, before_marker=None):
        assert checkpoint_dir is None or is_complete(checkpoint_dir)
        reports.append(step)
        if checkpoint_dir is not None:  # the report owns the folder (pipeline.train.loop.Report)
            if keep_dir is not None:
                shutil.copytree(checkpoint_dir, keep_dir / f"step{step}")
            shutil.rmtree(checkpoint_dir)

    spec = WorkerSpec(config=cfg, run_url=run_url(cfg), run=run or RunRef(sink=cfg.tracking.sink), init=init,
                      **({"hooks": hooks} if hooks is not None else {}))
    last = run_training(spec, rank=0, world_size=1, restore_dir=restore_dir, report=report,
                        **({"interrupt": interrupt} if interrupt else {}))
    return last, reports


def test_non_finite_loss_stops_naming_the_step(process_group, shards, tmp_path):
    # an absurd learning rate with clipping off blows the weights up within a step or two
    cfg = _cfg(shards, tmp_path, "train.optim.lr=1e30", "train.optim.grad_clip=0", "train.schedule.warmup_steps=0",
               "train.zero.stage=0")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \((nan|inf)\) at step [23]"):
        _train(cfg)


def test_init_from_adapted_checkpoint_with_frozen_backbone_and_sgd(process_group, shards, tmp_path):
    """What the transfer job asks of the worker: start from a model checkpoint adapted on the driver (another
    resolution, a new zero-initialised head, pre-logits dropped), frozen backbone, SGD with momentum; only the
    head moves."""
    from pipeline.model import build_model
    from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.model.weights import adapt_state_dict
    from pipeline.train.checkpoint import export_final, read_train_state
    from pipeline.train.spec import InitSpec

    torch.manual_seed(1)
    source = build_model("vit_pico4", image_size=8, num_classes=7, pre_logits=32)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the init the worker would draw itself

    cfg = _cfg(shards, tmp_path, "train.optim.name=sgd", "train.optim.momentum=0.9", "train.optim.lr=0.1",
               "train.optim.weight_decay=0", "train.zero.stage=1", "model.pre_logits=null",
               "train.checkpoint_every=3")
    save_checkpoint(tmp_path / "init", adapt_state_dict(source.state_dict(), source.cfg, cfg.model), cfg.model)
    init = InitSpec(checkpoint=str(tmp_path / "init"), freeze_backbone=True)
    last, reports = _train(cfg, init, keep_dir=tmp_path / "kept")
    assert reports == [3] and np.isfinite(last["train/loss"])

    kept = tmp_path / "kept" / "step3"
    export_final(kept, read_train_state(kept, 0)["model"], tmp_path / "final")
    sd, model_cfg, extra = load_checkpoint(tmp_path / "final")
    assert model_cfg.image_size == 16 and model_cfg.num_classes == 4 and model_cfg.pre_logits is None
    assert "pre_logits.fc.weight" not in sd
    assert sd["head.weight"].shape == (4, 64) and sd["head.weight"].abs().sum() > 0  # the head trained
    # the frozen backbone is the source's, with the position embedding resampled from 2x2 to 4x4 patches
    torch.testing.assert_close(sd["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])
    assert sd["pos_embed"].shape == (1, 1 + 16, 64)
    torch.testing.assert_close(sd["pos_embed"][:, :1], source.pos_embed.detach()[:, :1])  # class token row kept
    assert extra["step"] == 3


def test_init_checkpoint_that_does_not_fit_is_a_clear_error(process_group, shards, tmp_path):
    from pipeline.model import build_model
    from pipeline.model.checkpoint import save_checkpoint
    from pipeline.train.spec import InitSpec

    save_checkpoint(tmp_path / "other", build_model("vit_pico4", image_size=16, num_classes=7))
    cfg = _cfg(shards, tmp_path)
    with pytest.raises(ValueError, match=r"init checkpoint .*other does not fit the run's model.*adapt_state_dict.*"
                                         r"key 'head.weight' has shape \[7, 64\], vit_pico4 needs \[4, 64\]"):
        _train(cfg, InitSpec(checkpoint=str(tmp_path / "other")))


def test_stop_request_checkpoints_the_current_step(process_group, shards, tmp_path):
    """A stop vote at step 2 of 5: the loop checkpoints step 2 (not a checkpoint_every step), reports it as
    stopped and returns; the checkpoint holds the resolved run config."""
    from pipeline.train.checkpoint import read_train_state

    cfg = _cfg(shards, tmp_path, "train.steps=5", "train.checkpoint_every=4")
    calls = []

    def interrupt():
        calls.append(1)
        return "stop" if len(calls) >= 2 else None

    last, reports = _train(cfg, keep_dir=tmp_path / "kept", interrupt=interrupt)
    assert last["stopped"] is True and last["interrupt"] == "stop" and last["step"] == 2 and reports == [2]
    state = read_train_state(tmp_path / "kept" / "step2", 0)
    assert state["step"] == 2 and state["config"] == cfg.model_dump(mode="json")
    # a run restored at its last step has nothing left to train (fit then exports that checkpoint)
    done = _cfg(shards, tmp_path, "train.steps=2", "train.checkpoint_every=4")
    last, reports = _train(done, restore_dir=str(tmp_path / "kept" / "step2"))
    assert last == {"step": 2, "stopped": False} and reports == []


def test_resume_in_process_continues_exactly(process_group, shards, tmp_path):
    """Save at step 2, continue to 4 from that checkpoint: the same losses as 4 uninterrupted steps, logged to
    the same MLflow run (a local sqlite store: real MLflow)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.run import TrackedRun
    from pipeline.train.checkpoint import read_train_state

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(shards, tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.zero.stage=2",
               "tracking.sink=mlflow", f"tracking.tracking_uri={uri}", "tracking.flush_every_s=0.2")
    with TrackedRun.open(cfg.tracking, cfg.name) as run:
        _train(cfg, keep_dir=tmp_path / "kept", run=run.ref)
    saved = read_train_state(tmp_path / "kept" / "step2", 0)
    assert saved["run_id"] == run.run_id  # the checkpoint carries the run identity
    with TrackedRun.open(cfg.tracking, cfg.name, resume_id=saved["run_id"]) as again:
        _, reports = _train(cfg, restore_dir=str(tmp_path / "kept" / "step2"), run=again.ref)
    assert reports == [4] and again.resumed and again.run_id == run.run_id
    hist = MlflowClient(uri).get_metric_history(run.run_id, "train/loss")
    by_step: dict[int, list[float]] = {}
    for m in hist:
        by_step.setdefault(m.step, []).append(m.value)
    assert sorted(by_step) == [1, 2, 3, 4]
    assert [len(by_step[s]) for s in (1, 2, 3, 4)] == [1, 1, 2, 2]  # 3 and 4 again after the resume
    for step in (3, 4):
        assert by_step[step][0] == pytest.approx(by_step[step][1], rel=1e-6)


def test_final_export_is_the_same_model_for_every_zero_stage(process_group, shards, tmp_path):
    """Stage 0 (module state only), 1, 2 and 3 (sharded fp32 masters) consolidate to the same fp32 weights.

    SGD, not Adam: the attention's key bias gets an exactly-zero gradient under stage 0 but ~1e-10 of reduction
    noise under ZeRO, which Adam's normalisation turns into a 1e-5 step; that would measure the optimizer's
    conditioning, not the export."""
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.train.checkpoint import export_final, read_train_state

    exported = {}
    for stage in (0, 1, 2, 3):
        cfg = _cfg(shards, tmp_path, f"train.zero.stage={stage}", "train.steps=2", "train.checkpoint_every=2",
                   "train.schedule.warmup_steps=0", "train.optim.name=sgd", "train.optim.lr=0.1")
        kept = tmp_path / f"z{stage}"
        _train(cfg, keep_dir=kept)
        export_final(kept / "step2", read_train_state(kept / "step2", 0)["model"], tmp_path / f"final{stage}")
        exported[stage] = load_checkpoint(tmp_path / f"final{stage}")[0]
    for stage in (0, 1, 2, 3):
        assert exported[stage].keys() == exported[0].keys()
        for k in exported[0]:
            torch.testing.assert_close(exported[stage][k], exported[0][k], rtol=1e-5, atol=1e-6)
    # and training moved the weights (a zero-initialised head that is still zero would prove nothing)
    assert exported[0]["head.weight"].abs().sum() > 0


def test_synthetic_data_trains_every_step_on_the_first_real_batch(process_group, shards, tmp_path):
    """data.synthetic (the memory-fed reference of benchmarks/data_wait.py): the loop runs as usual, every step on
    the micro-batches of the loader's first step."""
    from pipeline.data.loader import build_train_loader
    from tests.fixtures.faults import read_record
    from tests.fixtures.hooks import FaultHooks

    cfg = _cfg(shards, tmp_path, "data.synthetic=true", "train.steps=4")
    record = tmp_path / "record"
    last, reports = _train(cfg, hooks=FaultHooks(record=str(record)))
    steps = [e for e in read_record(record, 0) if e["event"] == "step"]
    loader = build_train_loader(cfg.data.train, cfg.data, Storage(cfg.storage), global_batch=cfg.train.global_batch,
                                micro_batch=cfg.train.micro_batch, image_size=16)
    first = [k for batch in next(loader.steps()) for k in batch["key"]]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(e["keys"] == first for e in steps)
    assert last["step"] == 4 and reports == [4] and last["perf/store_mb_per_s"] == 0.0
