"""Real distributed pretraining: Ray Train (local cluster on 127.0.0.1) + DeepSpeed ZeRO on CPU/gloo, shards and
run storage on the S3 test server, tracking on the real MLflow server. A tiny ViT (vit_pico4, 16 px), a few steps.

Runs (each ~20-40 s on 2 cores), shared through module fixtures:
  zero2        2 workers, ZeRO-2, augmented data, 4 steps per epoch (checkpoints land mid-epoch), val + few-shot
  interrupted  the zero2 run stopped by a SIGTERM to a worker (every rank commits a checkpoint at the same step, the
               run ends KILLED), resumed, then rank 1 dies hard after step 5 (restarted from the step-3
               checkpoint): zero2's losses at every step, one MLflow run
  (refused)    the zero2 run again without --resume, or resumed with another model: refused before anything starts
The engine's modes themselves (every ZeRO stage, bf16/fp16, offload, the sigmoid loss, gradient accumulation) run
on the same loop without Ray: test_engine_modes.py.
"""

from __future__ import annotations

import json
import math
import tempfile

import pytest

from tests.fixtures.faults import CLASSES, read_record, synthetic
from tests.fixtures.hooks import FaultHooks

pytestmark = pytest.mark.integration

SMOKE = "configs/pretrain/smoke.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def buckets(s3_server):
    from tests.fixtures.s3 import ensure_buckets

    return ensure_buckets(s3_server, "pretrain-data", "pretrain-runs")


@pytest.fixture(scope="module")
def datasets(buckets, s3_server):
    from pipeline.data.writer import write_array_shards
    from tests.fixtures.s3 import make_storage_config

    storage = make_storage_config(s3_server)
    names = {"train": (128, 0, 16), "val": (64, 1, 32)}
    out = {}
    for split, (n, seed, per_shard) in names.items():
        images, labels = synthetic(n, seed)
        out[split] = write_array_shards(
            images, labels, f"s3://pretrain-data/synth/{split}", name="synth", split=split,
            class_names=[str(i) for i in range(CLASSES)], samples_per_shard=per_shard, storage=storage,
        )
    return out


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A local Ray on 127.0.0.1, started after the S3 server so workers inherit its environment. Shared: later
    modules that call connect_ray() reuse it."""
    from pipeline.launch.fanout import connect_ray

    connect_ray()
    yield


def _cfg(name, datasets, s3_server, mlflow_uri, *over):
    from pipeline.config import load_config

    return load_config(SMOKE, [
        f"name={name}",
        "model.image_size=16",
        f"model.num_classes={CLASSES}",
        f"data.train={datasets['train']}",
        f"data.val={datasets['val']}",
        "data.num_workers=0",
        "data.shuffle_buffer=64",
        # 8 readers, each on one whole shard: the telemetry check below compares the bytes read with the shards' (a
        # reader that starts mid-shard also reads the samples before its run: a tar has no index)
        "data.virtual_readers=8",
        "data.augment.scale=[0.5,1.0]",
        f"storage.endpoint_url={s3_server}",
        f"train.steps={STEPS}",
        "train.global_batch=32",
        "train.micro_batch=16",
        "train.optim.lr=3e-3",
        "train.schedule.warmup_steps=1",
        "train.schedule.decay=constant",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.eval_every=3",
        "train.eval_batches=2",
        "scaling.num_workers=2",
        "scaling.storage_path=s3://pretrain-runs/runs",
        "scaling.max_failures=1",
        "tracking.sink=mlflow",
        f"tracking.tracking_uri={mlflow_uri}",
        "tracking.experiment=test-pretrain",
        "tracking.flush_every_s=0.5",
        *over,
    ])


def _history(uri, run_id, key="train/loss") -> dict[int, float]:
    """step -> value (the last one logged for a step)."""
    from mlflow.tracking import MlflowClient

    hist = sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in hist}


def _counts(uri, run_id, key="train/loss") -> dict[int, int]:
    """step -> how many times it was logged."""
    from collections import Counter

    from mlflow.tracking import MlflowClient

    return dict(Counter(m.step for m in MlflowClient(uri).get_metric_history(run_id, key)))


@pytest.fixture(scope="module")
def zero2(ray_cluster, datasets, s3_server, mlflow_server, tmp_path_factory):
    from pipeline.pretrain import run_pretraining

    cfg = _cfg("zero2", datasets, s3_server, mlflow_server.url, "train.zero.stage=2",
               f"data.fewshot_train={datasets['train']}", f"data.fewshot_test={datasets['val']}",
               "train.fewshot_every=6", "train.fewshot_shots=[1,2]")
    record = tmp_path_factory.mktemp("zero2") / "record"
    result = run_pretraining(cfg, hooks=FaultHooks(record=str(record)))
    return cfg, result, [read_record(record, r) for r in (0, 1)]


def test_zero2_trains_and_tracks(zero2, buckets, mlflow_server):
    from mlflow.tracking import MlflowClient

    from pipeline.data.storage import Storage
    from pipeline.model.checkpoint import load_checkpoint

    cfg, result, records = zero2
    for rank in (0, 1):  # what the Ray workers' engines ran
        facts = next(e["engine"] for e in records[rank] if e["event"] == "start")
        assert facts["zero_stage"] == 2 and facts["optimizer"] == "AdamW" and facts["param_dtype"] == "torch.float32"
    losses = _history(mlflow_server.url, result.run_id)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert (losses[STEPS] + losses[STEPS - 1]) / 2 < losses[1] - 0.15, losses  # it learns
    # checkpoints (every rank's shard + committed markers) and the final model are in the bucket
    keys = [o["Key"] for o in buckets.list_objects_v2(Bucket="pretrain-runs", Prefix="runs/zero2/")["Contents"]]
    for step in (3, 6):
        d = f"runs/zero2/checkpoint_{step:08d}/"
        assert {d + "COMMITTED.rank0", d + "COMMITTED.rank1", d + "train_state.rank1.json"} <= set(keys)
        assert any(k.startswith(d + f"step{step:08d}/") and "optim_states" in k for k in keys)
    assert result.final_checkpoint == "s3://pretrain-runs/runs/zero2/final"
    with Storage(cfg.storage).fetch_dir(result.final_checkpoint) as local:
        sd, model_cfg, extra = load_checkpoint(local)
    assert model_cfg == cfg.model and extra["step"] == STEPS and extra["run_id"] == result.run_id
    # MLflow: params (flattened config), metrics, few-shot, the DeepSpeed config and the final model
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(result.run_id)
    assert run.data.params["train.zero.stage"] == "2"
    assert run.data.params["model.name"] == "vit_pico4"
    m = run.data.metrics
    for key in ("train/lr", "train/grad_norm", "perf/images_per_s", "perf/data_wait_fraction", "val/loss",
                "val/prec1", "fewshot/synth_1shot", "fewshot/synth_2shot", "data/skipped_samples"):
        assert key in m, key
    assert 0.0 <= m["fewshot/synth_2shot"] <= 1.0 and 0.0 <= m["val/prec1"] <= 1.0
    # input telemetry: what the loaders read from the S3 server, per sample, against the shards' own sizes (the
    # ranks read whole shards; the last step's window may be short, so only the totals are compared exactly)
    from pipeline.data.manifest import load_dataset_spec

    manifest = load_dataset_spec(cfg.data.train, Storage(cfg.storage))
    assert m["data/bytes_read"] > 0 and m["perf/store_mb_per_s"] >= 0 and m["perf/loader_samples_per_s"] > 0
    assert 0.5 < m["data/bytes_per_sample"] / manifest.bytes_per_sample < 2.0, (m, manifest.bytes_per_sample)
    assert sorted(_history(mlflow_server.url, result.run_id, "val/loss")) == [3, 6]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"deepspeed_config.json", "final"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "final")} == {"final/model.json",
                                                                               "final/model.safetensors"}
    with tempfile.TemporaryDirectory() as tmp:
        ds = json.loads(open(client.download_artifacts(result.run_id, "deepspeed_config.json", tmp)).read())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 32
    assert run.info.status == "FINISHED"
    # pictures of what it learns, at every few-shot evaluation: MLflow image series with their steps, bounded
    import re

    shots: dict[tuple[str, int], int] = {}
    for a in client.list_artifacts(result.run_id, "images"):
        m_ = re.fullmatch(r"images/pictures~(\w+)\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+(\+compressed)?\.(png|webp)",
                          a.path)
        assert m_, a.path
        shots[(m_[1], int(m_[2]))] = shots.get((m_[1], int(m_[2])), 0) + a.file_size
    fewshot_steps = sorted({s for s in range(1, STEPS + 1) if s % 6 == 0} | {STEPS})
    assert sorted(shots) == [(k, s) for k in ("attention_rollout", "pos_embed_similarity") for s in fewshot_steps]
    for s in fewshot_steps:
        assert 5_000 < sum(v for (k, st), v in shots.items() if st == s) < 400_000, shots
    assert run.data.tags.get("mlflow.loggedImages") == "True"


def _committed(buckets, name: str) -> dict[int, set[int]]:
    """step -> the ranks whose commit marker is in the run's checkpoint folder of that step."""
    from pipeline.train.checkpoint import step_of

    out: dict[int, set[int]] = {}
    for o in buckets.list_objects_v2(Bucket="pretrain-runs", Prefix=f"runs/{name}/")["Contents"]:
        parts = o["Key"].split("/")
        if len(parts) == 4 and parts[3].startswith("COMMITTED.rank"):
            out.setdefault(step_of(parts[2]), set()).add(int(parts[3].removeprefix("COMMITTED.rank")))
    return out


def test_sigterm_stop_and_worker_failure_both_resume_exactly(zero2, ray_cluster, datasets, s3_server,
                                                             mlflow_server, buckets, tmp_path):
    """The zero2 run, interrupted twice, must end with zero2's losses at every step, in one MLflow run:
    1. SIGTERM to worker rank 1 after step 1: its stop vote reaches every rank in step 2's all-reduce, so both
       commit a checkpoint at step 2 (not a checkpoint_every step) and stop; the run ends KILLED (RunStopped).
    2. --resume from step 2; rank 1 dies hard after step 5: Ray restarts the group from the step-3 checkpoint
       (mid-epoch), which re-runs steps 4-5 and finishes step 6; the run ends FINISHED.
    (A SIGTERM to the job's driver is `vitpipe jobs stop`: tests/cluster/test_jobs.py.)"""
    from mlflow.tracking import MlflowClient

    from pipeline.errors import RunStopped
    from pipeline.pretrain import run_pretraining

    cfg = _cfg("interrupted", datasets, s3_server, mlflow_server.url, "train.zero.stage=2",
               f"data.fewshot_train={datasets['train']}", f"data.fewshot_test={datasets['val']}",
               "train.fewshot_every=6", "train.fewshot_shots=[1,2]")
    client = MlflowClient(mlflow_server.url)

    term = FaultHooks(signals=[{"step": 1, "rank": 1, "marker": str(tmp_path / "term")}], step_sleep_s=0.3)
    with pytest.raises(RunStopped, match=r"stopped \(SIGTERM on a worker\) at step 2") as stopped:
        run_pretraining(cfg, hooks=term)
    assert stopped.value.step == 2 and stopped.value.checkpoint.endswith("/interrupted/checkpoint_00000002")
    assert stopped.value.exit_code == 143
    runs = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id],
                              filter_string="attributes.run_name = 'interrupted'")
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    run_id = runs[0].info.run_id
    assert _committed(buckets, "interrupted") == {2: {0, 1}}  # one checkpoint, every rank, at the stop step

    killed = tmp_path / "killed"
    result = run_pretraining(cfg, resume=True, hooks=FaultHooks(kills=[{"step": 5, "rank": 1,
                                                                       "marker": str(killed)}]))
    assert killed.exists(), "the fault was not injected"
    assert result.step == STEPS and result.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    ref, got = _history(mlflow_server.url, zero2[1].run_id), _history(mlflow_server.url, run_id)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert math.isclose(got[step], ref[step], rel_tol=1e-5), (step, got[step], ref[step])
    # steps 1-3 ran once: neither the stop nor the restart started over (4-5 ran again after the restart)
    counts = _counts(mlflow_server.url, run_id)
    assert [counts[s] for s in (1, 2, 3)] == [1, 1, 1], counts


def test_an_existing_run_needs_resume_and_a_resume_needs_the_same_model(zero2, ray_cluster, mlflow_server):
    """Refused before any tracked run or worker exists. (A resume that extends train.steps, on another world size,
    is tests/reliability/test_faults_worker.py's; a stopped run's resume is test_sigterm_stop_... above.)"""
    from mlflow.tracking import MlflowClient

    from pipeline.errors import ConfigError
    from pipeline.pretrain import run_pretraining

    cfg, first, _ = zero2
    runs_before = len(MlflowClient(mlflow_server.url).search_runs(
        [MlflowClient(mlflow_server.url).get_experiment_by_name("test-pretrain").experiment_id]))
    with pytest.raises(ConfigError, match=r"run 'zero2' already exists at s3://pretrain-runs/runs/zero2; pass "
                                          r"--resume to continue it"):
        run_pretraining(cfg)
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_classes": 5})})
    with pytest.raises(ConfigError, match=r"--resume: checkpoint .*zero2/checkpoint_00000006 holds another model "
                                          r"\(model\.num_classes: 4 -> 5\)"):
        run_pretraining(other, resume=True)
    client = MlflowClient(mlflow_server.url)
    assert len(client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id])) == runs_before
    assert client.get_run(first.run_id).info.status == "FINISHED"
