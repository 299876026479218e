"""Bad input, table-driven, through `vitpipe` itself (pipeline.cli.main): configs, CLI arguments, manifests,
registry URIs, checkpoints. Every case must exit 2 with one message that names the field or file and says what
to do, with no traceback, quickly, without starting anything: no child process appears, no run folder is
created, Ray is not initialised."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.cli import main

pytestmark = pytest.mark.integration

SMOKE = "configs/pretrain/smoke.yaml"
TRANSFER = "configs/transfer/smoke.yaml"


@dataclass
class Case:
    id: str
    argv: list[str]  # {placeholders} filled from the `world` fixture
    expect: list[str]  # regexes that must all appear in stderr
    needs: tuple[str, ...] = ()  # "s3", "mlflow"
    env: dict[str, str] = field(default_factory=dict)


def pretrain(*sets: str) -> list[str]:
    return ["pretrain", SMOKE, "--set", "data.train={data}", "scaling.storage_path={runs}", *sets]


def transfer(source: str, *sets: str) -> list[str]:
    return ["transfer", TRANSFER, "--from", source, "--workdir", "{tmp}/work", "--set", "data.train={data}",
            "data.val={data}", "scaling.storage_path={runs}", *sets]


CASES = [
    # --- configs --------------------------------------------------------------------------------------------
    Case("unknown-variant", pretrain("model.name=vit_q99"), [r"model\.name", r"unknown ViT variant 'vit_q99'",
                                                             r"known: .*vit_b16"]),
    Case("negative-batch", pretrain("train.global_batch=-4"), [r"--set: train\.global_batch", r"greater than 0",
                                                               r"got -4"]),
    Case("batch-not-divisible", pretrain("train.global_batch=48", "train.micro_batch=16"),
         [r"scaling\.num_workers=2: 2 workers cannot serve the training plan: train\.global_batch \(48\) is not a "
          r"multiple of train\.micro_batch \(16\) x 2", r"World sizes that work: 1, 3"]),
    Case("elastic-range-not-served", pretrain("scaling.num_workers=[2,4]", "data.virtual_readers=12"),
         [r"scaling\.num_workers=\[2, 4\]: the group may train on any of 2\.\.\.4 workers, but 3, 4 cannot serve the "
          r"training plan .*world sizes that work: 1, 2"]),
    Case("unknown-key", pretrain("train.optim.lrr=0.1"), [r"train\.optim\.lrr: unknown key", r"config schema"]),
    Case("missing-section", ["pretrain", "{cfg_no_train}"], [r"cfg_no_train\.yaml: train: required field is missing"]),
    Case("invalid-yaml", ["pretrain", "{cfg_bad_yaml}"], [r"bad\.yaml: not valid YAML"]),
    Case("config-not-found", ["pretrain", "{tmp}/nope.yaml"], [r"config file not found: .*nope\.yaml"]),
    Case("image-not-multiple-of-patch", pretrain("model.image_size=30"),
         [r"model\.image_size 30 is not a multiple of vit_pico4's patch size 4", r"28 or 32"]),
    Case("wrong-class-count", pretrain("model.num_classes=4"),
         [r"data\.train \(.*manifest\.json\) has 10 classes but model\.num_classes is 4",
          r"set model\.num_classes=10"]),
    Case("bad-override-syntax", pretrain("train.steps"), [r"--set 'train\.steps': expected dotted\.key=value"]),
    # --- CLI arguments --------------------------------------------------------------------------------------
    Case("pretrain-wrong-flag", ["pretrain", SMOKE, "--resumee"], [r"unrecognized arguments: --resumee"]),
    Case("model-info-unknown", ["model", "info", "vit_q99"], [r"unknown ViT variant 'vit_q99'"]),
    Case("plan-zero-gpus", ["plan", SMOKE, "--gpus", "0", "--no-manifest", "--num-samples", "1000"],
         [r"--gpus"]),
    # --- manifests ------------------------------------------------------------------------------------------
    Case("manifest-not-found", pretrain("data.train={tmp}/missing/manifest.json"),
         [r"dataset manifest not found: .*missing/manifest\.json", r"vitpipe shards write"]),
    Case("manifest-not-json", pretrain("data.train={bad_json_manifest}"),
         [r"invalid dataset manifest .*notjson/manifest\.json: not valid JSON"]),
    Case("manifest-count-mismatch", pretrain("data.train={mismatch_manifest}"),
         [r"invalid dataset manifest .*mismatch/manifest\.json: num_samples is 999 but the shards hold 32"]),
    Case("brace-pattern-without-count", pretrain("data.train=s3://b/x-{{000..009}}.tar"),
         [r"dataset pattern 's3://b/x-\{000\.\.009\}\.tar' has no sample count", r"\|NUM_SAMPLES"]),
    Case("brace-pattern-bad-count", pretrain("data.train=s3://b/x-{{000..009}}.tar|many"),
         [r"sample count 'many' is not an integer"]),
    Case("s3-manifest-malformed", pretrain("data.train={s3_bad_manifest}"),
         [r"invalid dataset manifest s3://.*/manifest\.json: not valid JSON"], needs=("s3",)),
    Case("s3-manifest-missing", pretrain("data.train=s3://{bucket}/nothing/manifest.json"),
         [r"dataset manifest not found: s3://.*/nothing/manifest\.json"], needs=("s3",)),
    Case("unreachable-endpoint", pretrain("data.train=s3://{bucket}/train/manifest.json",
                                          "storage.endpoint_url=http://127.0.0.1:{dead_port}", "storage.max_retries=0"),
         [r"cannot read dataset manifest s3://.*/train/manifest\.json \(endpoint http://127\.0\.0\.1:\d+\)",
          r"storage\.endpoint_url"], needs=("s3",)),
    # --- registry URIs --------------------------------------------------------------------------------------
    Case("uri-malformed", transfer("models:/a/b/c"), [r"model URI 'models:/a/b/c' is not models:/NAME/VERSION"]),
    Case("uri-unknown-name", transfer("models:/no-such-model@champion"),
         [r"no registered model named 'no-such-model'", r"registered models: .*badinput-src"], needs=("mlflow",)),
    Case("uri-unknown-version", transfer("models:/badinput-src/9"),
         [r"model 'badinput-src' has no version 9; versions: 1, 2", r"@champion -> 1"], needs=("mlflow",)),
    Case("uri-unknown-alias", transfer("models:/badinput-src@nope"),
         [r"has no alias 'nope'", r"aliases: @champion -> 1"], needs=("mlflow",)),
    Case("registry-unreachable", ["registry", "--tracking-uri", "http://127.0.0.1:{dead_port}", "list"],
         [r"127\.0\.0\.1:\d+", r"check the tracking URI"], env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}),
    # --- checkpoints ----------------------------------------------------------------------------------------
    Case("transfer-image-not-multiple-of-patch", transfer("models:/badinput-src@champion", "model.image_size=30"),
         [r"model\.image_size 30 is not a multiple of the source model vit_pico4's patch size 4", r"28 or 32"],
         needs=("mlflow",)),
    Case("registry-entry-without-model-json", transfer("models:/badinput-src/2"),
         [r"models:/badinput-src/2 .*is not a vitpipe checkpoint: missing model\.json"], needs=("mlflow",)),
    Case("convert-shape-mismatch", ["model", "convert", "--source", "timm", "{bad_shape_weights}", "{tmp}/out1",
                                    "--name", "vit_pico4"], [r"head\.bias", r"\b7\b.*\b10\b|\b10\b.*\b7\b"]),
    Case("convert-not-safetensors", ["model", "convert", "--source", "timm", "{garbage_safetensors}", "{tmp}/out2"],
         [r"garbage\.safetensors: not a valid safetensors file"]),
    Case("convert-missing-file", ["model", "convert", "--source", "timm", "{tmp}/none.safetensors", "{tmp}/out3"],
         [r"weights file not found: .*none\.safetensors"]),
    Case("registry-import-shape-mismatch", ["registry", "--tracking-uri", "{mlflow}", "import", "--source", "timm",
                                            "{bad_shape_weights}", "badinput-import", "--variant", "vit_pico4"],
         [r"head\.bias", r"\b7\b.*\b10\b|\b10\b.*\b7\b"], needs=("mlflow",)),
]


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Local files every case may point at (no services)."""
    import json

    import torch
    from safetensors.torch import save_file

    from pipeline.data.writer import write_array_shards
    from pipeline.model import build_model

    tmp = tmp_path_factory.mktemp("bad-input")
    rng = np.random.default_rng(0)
    data = write_array_shards(rng.integers(0, 256, (32, 16, 16)).astype(np.uint8), rng.integers(0, 10, 32),
                              str(tmp / "data"), name="ten", split="train", class_names=[str(i) for i in range(10)],
                              samples_per_shard=16)
    good = json.loads(Path(data).read_text())
    sd = build_model("vit_pico4", image_size=16, num_classes=10).state_dict()
    sd["head.bias"] = torch.zeros(7)  # the head's weight says 10 classes
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "bad_shape.safetensors"))
    (tmp / "garbage.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    from tests.fixtures.s3 import free_port

    return {
        "tmp": str(tmp), "runs": str(tmp / "runs"), "data": data,
        "cfg_no_train": _write(tmp / "cfg_no_train.yaml", "name: x\ndata:\n  train: /x\n"),
        "cfg_bad_yaml": _write(tmp / "bad.yaml", "model: [unclosed\n"),
        "bad_json_manifest": _write(tmp / "notjson" / "manifest.json", "{not json"),
        "mismatch_manifest": _write(tmp / "mismatch" / "manifest.json", json.dumps({**good, "num_samples": 999,
            "shards": [{**s, "url": str(tmp / "data" / s["url"])} for s in good["shards"]]})),
        "bad_shape_weights": str(tmp / "bad_shape.safetensors"),
        "garbage_safetensors": str(tmp / "garbage.safetensors"),
        "dead_port": str(free_port()),
    }


@pytest.fixture(scope="module")
def s3_world(s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="bad-input")
    s3.put_object(Bucket="bad-input", Key="broken/manifest.json", Body=b"\x00\x01 not json")
    return {"bucket": "bad-input", "s3_bad_manifest": "s3://bad-input/broken/manifest.json"}


@pytest.fixture(scope="module")
def mlflow_world(mlflow_server, tmp_path_factory):
    """badinput-src: version 1 a real vit_pico4 checkpoint (@champion), version 2 holding only the weights."""
    from mlflow import MlflowClient

    from pipeline.model import build_model
    from pipeline.model.checkpoint import save_checkpoint
    from tests.fixtures.mlflow import register_in_new_run

    ckpt = save_checkpoint(tmp_path_factory.mktemp("src"), build_model("vit_pico4", image_size=8, num_classes=3))
    register_in_new_run(ckpt, name="badinput-src", tracking_uri=mlflow_server.url, alias="champion",
                        experiment="bad-input")
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.get_experiment_by_name("bad-input").experiment_id).info.run_id
    client.log_artifact(run_id, str(ckpt / "model.safetensors"), "checkpoint")
    client.create_model_version("badinput-src", f"runs:/{run_id}/checkpoint", run_id=run_id)
    return {"mlflow": mlflow_server.url}


def _started_ray() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_early_and_clearly(case: Case, world, request, monkeypatch, capsys):
    values = dict(world)
    if "s3" in case.needs:
        values.update(request.getfixturevalue("s3_world"))
    if "mlflow" in case.needs:
        values.update(request.getfixturevalue("mlflow_world"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", values["mlflow"])
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    argv = [a.format(**values) for a in case.argv]
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    ray_before = _started_ray()

    t0 = time.monotonic()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err

    assert rc == 2, f"exit {rc}; stderr: {err}"
    for pattern in case.expect:
        assert re.search(pattern, err), f"{pattern!r} not in stderr: {err}"
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 12, err  # one message, not a log
    # nothing started: no new process, no run folder, no Ray; and it took seconds, not a job's worth
    new = [p for p in me.children(recursive=True) if p.pid not in children and p.is_running()
           and p.status() != psutil.STATUS_ZOMBIE]
    assert not new, [p.cmdline() for p in new]
    assert not Path(world["runs"]).exists()
    assert _started_ray() == ray_before
    assert elapsed < 20, f"took {elapsed:.1f} s to fail"
