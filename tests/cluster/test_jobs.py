"""End to end on the share-nothing cluster, through `vitpipe submit` as a user runs it: a shards job -> pretraining
with its two workers on two worker nodes -> a transfer job from the registry URI (its adapted initial weights reach
the workers through storage) -> the registry's lineage, the runs' metrics, the MLflow UI rendered by headless
Chromium. (Lost nodes, preemption, growing back and `vitpipe jobs stop`: test_elastic.py.)

The Chromium screenshot is kept in tests/e2e/artifacts/ (ignored by git) and its path printed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.data.storage import Storage
from tests.cluster.support import succeeded, vitpipe, worker_ips

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "e2e" / "artifacts"
PRETRAIN_CFG = "configs/demo/pretrain-quick.yaml"  # relative: submitted configs must lie inside the project
TRANSFER_CFG = "configs/demo/transfer-quick.yaml"
EXPERIMENT = "vit-e2e"
PRETRAINED, FINETUNED = "vit-e2e", "vit-e2e-digits"
PRETRAIN_RUN, TRANSFER_RUN = "e2e-pretrain", "e2e-transfer"
STEPS = 10
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--window-size=1600,1000", "--virtual-time-budget=15000",
]


def _common(cluster) -> list[str]:
    # 2 workers of 1 CPU on worker nodes of 1 CPU (the head has none): one worker per node, ZeRO-2 across the bridge
    return [f"scaling.storage_path=s3://{cluster.bucket}/e2e/runs", f"tracking.experiment={EXPERIMENT}",
            "scaling.cpus_per_worker=1"]


def _pretrain_args(cluster, datasets, name: str, *extra: str) -> list[str]:
    # model.num_classes: these shards hold all 10 classes (the demo's recipe pretrains on 6 of them)
    return [PRETRAIN_CFG, "--set", f"name={name}", f"data.train={datasets['train']}", f"data.val={datasets['val']}",
            f"data.fewshot_train={datasets['train']}", f"data.fewshot_test={datasets['val']}", "model.num_classes=10",
            f"train.steps={STEPS}",
            f"train.checkpoint_every={STEPS}", f"train.eval_every={STEPS}", f"train.fewshot_every={STEPS}",
            *_common(cluster), *extra]


@pytest.fixture(scope="module")
def pretrained(cluster, datasets):
    r = vitpipe(["submit", "pretrain", *_pretrain_args(cluster, datasets, PRETRAIN_RUN, "train.log_every=5",
                                                        f"tracking.registered_model={PRETRAINED}"), "--follow"],
                cluster.env())
    return r


@pytest.fixture(scope="module")
def finetuned(cluster, datasets, pretrained):
    succeeded(pretrained, cluster.env())
    return vitpipe(["submit", "transfer", TRANSFER_CFG, "--from", f"models:/{PRETRAINED}@champion", "--set",
                    f"name={TRANSFER_RUN}", f"data.train={datasets['digits-train']}",
                    f"data.val={datasets['digits-test']}", "train.steps=8", "train.checkpoint_every=8",
                    "train.eval_every=8", "train.log_every=4", f"tracking.registered_model={FINETUNED}",
                    *_common(cluster), "--follow"], cluster.env())


def test_shards_job_writes_the_dataset_from_the_bucket(cluster, datasets):
    succeeded(datasets["_job"], cluster.env())
    from pipeline.data.config import StorageConfig
    from pipeline.data.manifest import load_dataset_spec

    with pytest.MonkeyPatch.context() as m:
        for k, v in cluster.env().items():
            if k.startswith("AWS_"):
                m.setenv(k, v)
        manifest = load_dataset_spec(datasets["train"], Storage(StorageConfig(endpoint_url=cluster.s3_endpoint)))
    assert manifest.num_samples == 512 and manifest.num_shards == 4


def test_pretraining_runs_one_worker_per_worker_node_and_registers(cluster, pretrained):
    succeeded(pretrained, cluster.env())
    ips = worker_ips(pretrained.stdout)
    assert len(ips) == 2 and ips <= set(cluster.node_ips[1:]), (
        f"the 2 workers should run on two worker nodes of {cluster.node_ips[1:]}; job logs:\n{pretrained.stdout[-4000:]}")
    from mlflow import MlflowClient

    from pipeline.tracking.registry import resolve_version
    from pipeline.version import code_version

    uri = cluster.mlflow_uri
    pre = resolve_version(f"models:/{PRETRAINED}@champion", tracking_uri=uri)
    assert pre.version == "1" and pre.tags["model.variant"] == "vit_pico4"
    assert pre.tags["dataset.url"].startswith(f"s3://{cluster.bucket}/e2e/train")
    assert pre.tags["run_id"] == pre.run_id and pre.tags["steps"] == str(STEPS)
    # the job ran from an uploaded copy without .git; it names the commit of the checkout that submitted it
    assert pre.tags["code_version"] == code_version(), pre.tags["code_version"]
    client = MlflowClient(uri)
    run = client.get_run(pre.run_id)
    assert run.info.status == "FINISHED"
    assert {"train/loss", "val/prec1", "fewshot/fmnist_10shot"} <= set(run.data.metrics), run.data.metrics
    assert len(client.get_metric_history(pre.run_id, "train/loss")) == 2  # steps 5 and 10
    assert client.get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"


def test_transfer_from_the_registry_reaches_the_workers_through_storage(cluster, datasets, finetuned):
    succeeded(finetuned, cluster.env())
    from mlflow import MlflowClient

    from pipeline.tracking.registry import resolve_version

    uri = cluster.mlflow_uri
    pre = resolve_version(f"models:/{PRETRAINED}@champion", tracking_uri=uri)
    fine = resolve_version(f"models:/{FINETUNED}@champion", tracking_uri=uri)
    assert fine.version == "1"
    assert fine.tags["source.model"] == PRETRAINED and fine.tags["source.version"] == pre.version
    assert fine.tags["source.run_id"] == pre.run_id and fine.tags["dataset.url"] == datasets["digits-train"]
    run = MlflowClient(uri).get_run(fine.run_id)
    assert run.info.status == "FINISHED"
    assert {"train/loss", "final/top1"} <= set(run.data.metrics), run.data.metrics
    assert 0.0 <= run.data.metrics["final/top1"] <= 1.0
    import s3fs

    env = cluster.env()
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=cluster.s3_endpoint, skip_instance_cache=True)
    run_dir = f"{cluster.bucket}/e2e/runs/{TRANSFER_RUN}"
    assert fs.exists(f"{run_dir}/final/model.json") and not fs.exists(f"{run_dir}/init")  # init cleaned up


def _chromium(url: str, profile: Path, screenshot: Path | None = None) -> subprocess.CompletedProcess:
    args = [shutil.which("chromium") or "/usr/bin/chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    args.append(f"--screenshot={screenshot}" if screenshot else "--dump-dom")
    return subprocess.run([*args, url], capture_output=True, text=True, timeout=120)


def test_mlflow_ui_on_the_bridge_address_shows_the_runs(cluster, pretrained, finetuned, tmp_path):
    """The React app, served on the stack's bridge address (not localhost), loaded by headless Chromium in a fresh
    profile, as a user follows the links: the run link the pretraining job printed opens the run in the
    model-training view; the experiment's link lists both runs. The stack allows that origin itself."""
    import re

    if shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium is not installed (make setup installs it as root)")
    from mlflow import MlflowClient

    from pipeline.tracking.run import ui_url

    printed = re.search(rf"MLflow run (\w+) \(experiment {EXPERIMENT}\): (http\S+)", pretrained.stdout)
    assert printed, pretrained.stdout[-3000:]
    run_id, link = printed.groups()
    assert link.startswith(cluster.mlflow_uri) and link.endswith(f"/runs/{run_id}?workflowType=machine_learning")
    dom = _chromium(link, tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the model-training view's sidebar links the model registry; the GenAI view's lists judges instead
    ml_view = lambda html: "Model registry" in html and "Judges" not in html  # noqa: E731
    assert PRETRAIN_RUN in dom.stdout and "train/loss" in dom.stdout and ml_view(dom.stdout), link

    exp = MlflowClient(cluster.mlflow_uri).get_experiment_by_name(EXPERIMENT)
    page = ui_url(cluster.mlflow_uri, exp.experiment_id)
    dom = _chromium(page, tmp_path / "profile2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mlflow-ui.html").write_text(dom.stdout)
    for run_name in (PRETRAIN_RUN, TRANSFER_RUN):
        assert run_name in dom.stdout, f"the MLflow UI page {page} does not show run {run_name}"
    assert ml_view(dom.stdout), f"{page} did not open the model-training view"
    shot = ARTIFACTS / "mlflow-ui.png"
    shot.unlink(missing_ok=True)
    r = _chromium(page, tmp_path / "profile3", screenshot=shot)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, f"{shot}: {len(png)} bytes"
    print(f"MLflow UI screenshot: {shot}")
