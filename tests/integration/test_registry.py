"""The model registry against a real `mlflow server` (sqlite store, artifacts proxied to the S3 test server)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.cli import main
from pipeline.lineage import import_weights
from pipeline.model import build_model
from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
from pipeline.tracking.registry import (
    RegistryError,
    describe_model,
    download_checkpoint,
    list_models,
    resolve_version,
    set_alias,
)
from tests.fixtures.mlflow import register_in_new_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pico_checkpoint(tmp_path_factory):
    model = build_model("vit_pico4", image_size=28, num_classes=10, pre_logits=64)
    with torch.no_grad():
        model.head.weight.normal_()  # not the zero init, so a round trip is a real check
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d, model, extra={"note": "test"})
    (d / "train_state.rank0.json").write_text("{}")  # a checkpoint folder may hold more; only our 2 files go
    return d


def test_register_resolve_download_round_trip(mlflow_uri, pico_checkpoint, tmp_path):
    tags = {"dataset.url": "s3://b/fmnist/train/manifest.json", "steps": "20"}
    v1 = register_in_new_run(pico_checkpoint, name="reg-roundtrip", alias="champion", tags=tags)
    v2 = register_in_new_run(pico_checkpoint, name="reg-roundtrip", alias="latest", tags=tags)
    assert (v1.version, v2.version) == ("1", "2")
    assert v1.source.startswith("models:/m-")  # a logged (pyfunc) model of the run: tests/integration/test_pyfunc.py

    assert resolve_version("models:/reg-roundtrip@champion").version == "1"
    assert resolve_version("models:/reg-roundtrip@latest").version == "2"  # implicit: the highest version
    assert resolve_version("models:/reg-roundtrip/2").tags["steps"] == "20"

    local, version = download_checkpoint("models:/reg-roundtrip@champion", tmp_path)
    assert sorted(p.name for p in local.iterdir()) == ["model.json", "model.safetensors"]
    sd, cfg, extra = load_checkpoint(local)
    want, want_cfg, _ = load_checkpoint(pico_checkpoint)
    assert cfg == want_cfg and extra == {"note": "test"}
    for k in want:
        torch.testing.assert_close(sd[k], want[k], rtol=0, atol=0)

    listed = {m["name"]: m for m in list_models()}
    assert listed["reg-roundtrip"]["latest_version"] == 2
    assert listed["reg-roundtrip"]["aliases"] == {"champion": "1"}
    set_alias("reg-roundtrip", 2, "champion")
    assert describe_model("reg-roundtrip")["aliases"] == {"champion": "2"}


def test_registry_show_prints_the_lineage_chain_back_to_the_pretraining_data(mlflow_uri, pico_checkpoint, capsys):
    manifest = "s3://b/i21k/train/manifest.json"
    pre = register_in_new_run(pico_checkpoint, name="lin-pre", alias="champion",
                              tags={"dataset.url": manifest, "dataset.checksum": "sha256:abc123", "steps": "900"})
    ft = register_in_new_run(pico_checkpoint, name="lin-ft", tags={
        "dataset.url": "s3://b/cifar/train/manifest.json", "dataset.checksum": "sha256:def456", "steps": "50",
        "source.model": "lin-pre", "source.version": pre.version, "source.run_id": pre.run_id})
    ft2 = register_in_new_run(pico_checkpoint, name="lin-ft2", tags={
        "dataset.url": "s3://b/pets/train", "source.model": "lin-ft", "source.version": ft.version,
        "source.run_id": ft.run_id})
    chain = describe_model("lin-ft2")["versions"][0]["lineage"]
    assert [c["uri"] for c in chain] == ["models:/lin-ft2/1", "models:/lin-ft/1", "models:/lin-pre/1"]
    assert chain[-1]["dataset.url"] == manifest and chain[-1]["dataset.checksum"] == "sha256:abc123"
    assert [c["run_id"] for c in chain] == [ft2.run_id, ft.run_id, pre.run_id]

    assert main(["registry", "show", "lin-ft2"]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    at = lines.index("lineage:")
    assert lines[at + 1].startswith("models:/lin-ft2/1") and "data s3://b/pets/train" in lines[at + 1]
    assert lines[at + 2].startswith("<- models:/lin-ft/1") and "50 steps" in lines[at + 2]
    assert lines[at + 3].startswith("<- models:/lin-pre/1") and f"data {manifest} (checksum sha256:abc123)" in lines[
        at + 3]
    assert main(["registry", "show", "lin-pre", "--tracking-uri", mlflow_uri]) == 0  # the URI after the action too
    assert "aliases @champion" in capsys.readouterr().out


def test_unknown_names_versions_and_aliases_list_what_exists(mlflow_uri, pico_checkpoint):
    register_in_new_run(pico_checkpoint, name="reg-errors", alias="prod")
    with pytest.raises(RegistryError, match=r"no registered model named 'nope'.*registered models: .*reg-errors"):
        resolve_version("models:/nope@prod")
    with pytest.raises(RegistryError, match=r"'reg-errors' has no version 7; versions: 1; aliases: @prod -> 1"):
        resolve_version("models:/reg-errors/7")
    with pytest.raises(RegistryError, match=r"has no alias 'staging'; versions: 1; aliases: @prod -> 1"):
        resolve_version("models:/reg-errors@staging")
    with pytest.raises(RegistryError, match=r"has no version 9"):
        set_alias("reg-errors", 9, "prod")
    with pytest.raises(RegistryError, match=r"MLflow reserves it"):
        set_alias("reg-errors", 1, "latest")


def test_an_entry_that_is_not_our_checkpoint_is_refused_before_download(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("foreign") or client.create_experiment("foreign")
    run_id = client.create_run(getattr(exp, "experiment_id", exp)).info.run_id
    (tmp_path / "model.pkl").write_bytes(b"not ours")
    client.log_artifacts(run_id, str(tmp_path), "model")
    client.create_registered_model("reg-foreign")
    client.create_model_version("reg-foreign", f"runs:/{run_id}/model", run_id)
    with pytest.raises(RegistryError, match=r"not a vitpipe checkpoint: missing model.safetensors, model.json; "
                                            r"it holds: model.pkl"):
        download_checkpoint("models:/reg-foreign/1", tmp_path / "dl")
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())


def test_import_timm_weights_and_the_registry_cli(mlflow_uri, tmp_path, capsys):
    from safetensors.torch import save_file

    from pipeline.model.weights import export_state_dict

    model = build_model("vit_pico4", image_size=32, num_classes=5)
    timm_sd = export_state_dict(model.state_dict(), "timm", model.cfg)
    save_file(timm_sd, str(tmp_path / "pico_timm.safetensors"))

    assert main(["registry", "import", "--source", "timm", str(tmp_path / "pico_timm.safetensors"), "reg-imported",
                 "--alias", "base"]) == 0
    assert "registered models:/reg-imported/1" in capsys.readouterr().out
    v = resolve_version("models:/reg-imported@base")
    assert v.tags["import.source"] == "timm" and v.tags["model.variant"] == "vit_pico4"
    assert v.tags["resolution"] == "32" and len(v.tags["import.sha256"]) == 64
    local, _ = download_checkpoint(v.uri, tmp_path / "dl")
    sd, cfg, _ = load_checkpoint(local)
    assert (cfg.name, cfg.image_size, cfg.num_classes) == ("vit_pico4", 32, 5)
    torch.testing.assert_close(sd["pos_embed"], model.state_dict()["pos_embed"])

    assert main(["registry", "list", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert "reg-imported" in names
    assert main(["registry", "show", "reg-imported"]) == 0
    assert "import.source = timm" in capsys.readouterr().out
    assert main(["registry", "alias", "reg-imported", "1", "prod"]) == 0
    assert "models:/reg-imported@prod -> version 1" in capsys.readouterr().out
    assert main(["registry", "show", "no-such-model"]) == 2
    assert "registered models:" in capsys.readouterr().err


def test_the_registry_survives_a_server_restart(mlflow_server, mlflow_uri, pico_checkpoint):
    v = register_in_new_run(pico_checkpoint, name="reg-restart", alias="prod")
    mlflow_server.stop()
    assert not mlflow_server.healthy()
    mlflow_server.start()
    assert mlflow_server.url == mlflow_uri
    assert resolve_version("models:/reg-restart@prod").source == v.source


def test_tracked_run_owns_the_run_lifecycle(mlflow_uri):
    """The only creator of experiments and runs: model-training experiments, FINISHED / FAILED / KILLED endings,
    a resumed run RUNNING again under its own id, an unknown resume id starting a new run that says so."""
    from mlflow import MlflowClient

    from pipeline.errors import RunStopped
    from pipeline.tracking.config import TrackingConfig
    from pipeline.tracking.run import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TrackedRun

    client = MlflowClient(mlflow_uri)
    client.create_experiment("track-old")  # made elsewhere, without the kind tag
    tracking = TrackingConfig(sink="mlflow", tracking_uri=mlflow_uri, experiment="track-new")
    with TrackedRun.open(tracking, "ok", tags={"k": "v"}) as ok:
        ok.log_params({"a": {"b": 1}})
        ok.log_metrics({"m": 0.5}, 2)
        ok.set_tags({"t": 1})
        assert client.get_run(ok.run_id).info.status == "RUNNING"
    run = client.get_run(ok.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a.b": "1"} and run.data.metrics == {"m": 0.5}
    assert run.data.tags["k"] == "v" and run.data.tags["t"] == "1" and run.info.run_name == "ok"
    for name in ("track-new", "track-old"):
        with TrackedRun.open(tracking.model_copy(update={"experiment": name}), "tagged"):
            pass
        assert client.get_experiment_by_name(name).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    with pytest.raises(RuntimeError), TrackedRun.open(tracking, "failed") as failed:
        raise RuntimeError("boom")
    assert client.get_run(failed.run_id).info.status == "FAILED"
    with pytest.raises(RunStopped), TrackedRun.open(tracking, "stopped") as stopped:
        raise RunStopped("stopped", 3, "s3://b/runs/stopped/checkpoint_00000003")
    assert client.get_run(stopped.run_id).info.status == "KILLED"

    with TrackedRun.open(tracking, "stopped", resume_id=stopped.run_id) as resumed:
        assert resumed.resumed and resumed.run_id == stopped.run_id
        assert client.get_run(stopped.run_id).info.status == "RUNNING"
    assert client.get_run(stopped.run_id).info.status == "FINISHED"
    with TrackedRun.open(tracking, "elsewhere", resume_id="0" * 32) as fresh:
        assert not fresh.resumed and fresh.run_id != "0" * 32
    assert client.get_run(fresh.run_id).data.tags["vitpipe.resumed_from"] == "0" * 32
