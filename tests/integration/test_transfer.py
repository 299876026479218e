"""Pretrain a tiny model -> registered with lineage -> transfer from the registry at another resolution -> the
fine-tuned model registered, linked to its source, with accuracy and figures. Real S3 (moto server), real mlflow
server, real Ray + DeepSpeed on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE_PRETRAIN = str(ROOT / "configs/pretrain/smoke.yaml")
SMOKE_TRANSFER = str(ROOT / "configs/transfer/smoke.yaml")


def _digits(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits upsampled to 28x28 RGB uint8 (real images, shipped offline)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images[offset:offset + n]).float()[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    img = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0, :, :, None].expand(-1, -1, -1, 3)
    return img.contiguous().numpy(), d.target[offset:offset + n]


@pytest.fixture(scope="module")
def digits(s3_server, s3_bucket_module):
    from pipeline.data.writer import write_array_shards
    from tests.fixtures.s3 import make_storage_config

    storage = make_storage_config(s3_server)
    names = [str(i) for i in range(10)]
    out = {}
    for split, (n, off) in {"train": (320, 0), "test": (160, 1000)}.items():
        x, y = _digits(n, off)
        out[split] = write_array_shards(x, y, f"s3://{s3_bucket_module}/digits/{split}", name="digits", split=split,
                                        class_names=names, samples_per_shard=80, storage=storage)
    return out


@pytest.fixture(scope="module")
def s3_bucket_module(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="transfer-test")
    return "transfer-test"


@pytest.fixture(scope="module")
def pretrained(mlflow_server, digits, tmp_path_factory):
    """A tiny pretraining run (4 steps, 2 workers) that registers vit-smoke and sets @champion."""
    from pipeline.config import load_config
    from pipeline.pretrain import run_pretraining

    storage = tmp_path_factory.mktemp("pretrain-runs")
    cfg = load_config(SMOKE_PRETRAIN, [
        f"data.train={digits['train']}", f"scaling.storage_path={storage}", "train.steps=4",
        "train.checkpoint_every=4", "tracking.sink=mlflow", f"tracking.tracking_uri={mlflow_server.url}",
        "tracking.registered_model=vit-smoke", "tracking.register_alias=champion",
    ])
    result = run_pretraining(cfg)
    assert result.registered is not None, "pretraining did not register its final checkpoint"
    return result


def _transfer_args(digits, storage, *extra):
    return ["transfer", SMOKE_TRANSFER, "--set", f"data.train={digits['train']}", f"data.val={digits['test']}",
            f"scaling.storage_path={storage}", *extra]


def test_pretraining_registers_a_version_with_lineage(pretrained, digits, mlflow_uri):
    from pipeline.tracking.registry import resolve_version

    v = resolve_version("models:/vit-smoke@champion")
    assert v.version == pretrained.registered.version and v.run_id == pretrained.run_id
    for key in ("dataset.url", "dataset.checksum", "steps", "images_seen", "resolution", "config_hash",
                "code_version", "run_id"):
        assert v.tags.get(key), f"lineage tag {key} missing: {v.tags}"
    assert v.tags["resolution"] == "28" and v.tags["steps"] == "4"
    assert v.tags["dataset.checksum"] not in ("", "unknown")  # the manifest's own checksum, not a placeholder
    # the files are logged once: as the run's pyfunc model "final", which the version points at
    from mlflow import MlflowClient

    logged = MlflowClient(mlflow_uri).get_logged_model(v.source.removeprefix("models:/"))
    assert logged.source_run_id == pretrained.run_id and logged.name == "final"
    assert v.description.startswith(f"pretrained on {digits['train']} for 4 steps"), v.description
    # the registered model, created by its first version, carries that version's description too
    assert MlflowClient(mlflow_uri).get_registered_model("vit-smoke").description == v.description


def test_finetune_from_the_registry_at_a_new_resolution(pretrained, digits, mlflow_uri, tmp_path, capsys):
    from mlflow import MlflowClient

    from pipeline.tracking.registry import download_checkpoint, resolve_version

    rc = main(_transfer_args(digits, tmp_path / "runs", "tracking.register_alias=candidate",
              "--from", "models:/vit-smoke@champion"))
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out[out.index("{"):])
    # the adapted initial weights reached the workers through the run's storage folder, removed after training
    run_dir = tmp_path / "runs" / "transfer-smoke"
    assert (run_dir / "final" / "model.json").is_file() and not (run_dir / "init").exists()
    assert 0.0 <= summary["metrics"]["final/top1"] <= 1.0
    assert summary["metrics"]["final/eval_images"] == 4 * 16  # transfer.final_eval_batches x micro_batch

    ft = resolve_version("models:/vit-smoke-transfer@candidate")
    src = resolve_version("models:/vit-smoke@champion")
    assert ft.tags["source.model"] == "vit-smoke" and ft.tags["source.version"] == src.version
    assert ft.tags["source.run_id"] == src.run_id and ft.tags["resolution"] == "32"
    assert ft.run_id == summary["run_id"]
    assert ft.description.startswith(f"finetune of {src.uri} (run {src.run_id}) on {digits['train']}"), ft.description

    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["run_id"])
    assert run.data.tags["source.model"] == "vit-smoke"
    assert run.data.tags["source.version"] == src.version
    assert run.data.metrics["final/top1"] == summary["metrics"]["final/top1"]
    assert run.data.params["train.optim.name"] == "sgd"
    pngs = {a.path for a in client.list_artifacts(summary["run_id"], "plots")}
    assert pngs == {"plots/attention_rollout.png", "plots/pos_embed_similarity.png", "plots/confusion_matrix.png"}
    local = client.download_artifacts(summary["run_id"], "plots/attention_rollout.png", str(tmp_path))
    assert Path(local).read_bytes()[:4] == b"\x89PNG"

    # the fine-tuned checkpoint: 32 px (8x8 grid + class token), 10-class head, no pre-logits
    from pipeline.model.checkpoint import load_checkpoint

    sd, cfg, _ = load_checkpoint(download_checkpoint(ft.uri, tmp_path / "ft")[0])
    assert (cfg.image_size, cfg.num_classes, cfg.pre_logits) == (32, 10, None)
    assert sd["pos_embed"].shape[1] == 1 + 8 * 8 and "pre_logits.fc.weight" not in sd


def test_fewshot_mode_needs_no_training(pretrained, digits, mlflow_uri, tmp_path, capsys):
    from mlflow import MlflowClient

    rc = main(_transfer_args(digits, tmp_path / "runs", "transfer.mode=fewshot", "train.fewshot_shots=[1,5]",
                             "transfer.keep_pre_logits=true", "--from", "models:/vit-smoke/1"))
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out + captured.err
    metrics = json.loads(out[out.index("{"):])["metrics"]
    assert {"fewshot/1shot", "fewshot/5shot", "fewshot/5shot_std", "fewshot/5shot_log2_l2"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("fewshot/1shot", "fewshot/5shot", "fewshot/5shot_std"))
    assert -10 <= metrics["fewshot/5shot_log2_l2"] <= 15  # the regulariser leave-one-out chose from the grid
    # evaluated by the Ray workers (each embedding its share), nothing trained: no checkpoint; the adapted weights
    # they loaded from the run's folder are removed
    run_dir = tmp_path / "runs" / "transfer-smoke"
    assert not list(run_dir.glob("checkpoint_*")) and not (run_dir / "init").exists()
    client = MlflowClient(mlflow_uri)
    run = client.get_run(json.loads(out[out.index("{"):])["run_id"])
    assert {k: run.data.metrics[k] for k in metrics} == metrics  # logged by rank 0 through the run's sink


@pytest.mark.parametrize(
    "source, extra, message",
    [
        ("models:/no-such-model@champion", [], r"no registered model named 'no-such-model'.*registered models: .*vit-smoke"),
        ("models:/vit-smoke/99", [], r"'vit-smoke' has no version 99; versions: .*aliases: @champion"),
        ("models:/vit-smoke@nightly", [], r"has no alias 'nightly'"),
        ("vit-smoke", [], r"is not models:/NAME/VERSION or models:/NAME@ALIAS"),
        ("models:/vit-smoke@champion", ["model.image_size=30"], r"image_size 30 is not a multiple of .*patch size 4"),
        ("models:/vit-smoke@champion", ["model.num_classes=5"], r"has 10 classes but model.num_classes is 5"),
    ],
)
def test_bad_input_is_refused_before_any_worker_starts(pretrained, digits, mlflow_uri, tmp_path, capsys, source,
                                                       extra, message):
    import re

    rc = main(_transfer_args(digits, tmp_path / "runs", *extra, "--from", source))
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_linear_probe_trains_only_the_head(pretrained, digits, mlflow_uri, tmp_path, capsys):
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.tracking.registry import download_checkpoint

    rc = main(_transfer_args(digits, tmp_path / "runs", "transfer.mode=linear_probe", "transfer.plots=false",
                             "name=probe-smoke", "tracking.registered_model=vit-smoke-probe",
                             "--from", "models:/vit-smoke@champion"))
    out = capsys.readouterr().out
    assert rc == 0, out
    src, _, _ = load_checkpoint(download_checkpoint("models:/vit-smoke@champion", tmp_path / "src")[0])
    ft, _, _ = load_checkpoint(download_checkpoint("models:/vit-smoke-probe@latest", tmp_path / "ft")[0])
    for k in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight", "norm.weight"):
        torch.testing.assert_close(ft[k], src[k], rtol=0, atol=0)
    assert ft["head.weight"].abs().sum() > 0  # started at zero, trained
