"""The MLflow UI as a person sees it, on the single-node stack (no root needed): a pretraining job submitted with
`vitpipe submit pretrain --follow` (its output: one progress line per interval, no Ray noise), then headless
Chromium renders the stack's MLflow server in a fresh profile and the test asserts on the DOM: the experiment's
runs in the model-training view, the run's train/loss chart and its pictures (the image series the few-shot
evaluations logged), its artifacts, and the registered version page with its lineage tags and alias. The stack
allows its own origins; this test sets nothing for CORS. Screenshots are kept in tests/e2e/artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.ray_stack import write_digit_splits

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "e2e" / "artifacts"
VITPIPE = [sys.executable, "-m", "pipeline.cli"]
EXPERIMENT, MODEL, RUN = "vit-ui", "vit-ui", "ui-pretrain"
STEPS = 4
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's (make setup), driven by Playwright


def _text(page) -> str:
    return re.sub(r"\s+", " ", page.inner_text("body"))


def _search_charts(page, query: str, shows: str) -> None:
    """Types `query` in the run page's chart search (which opens the sections holding matching charts; the UI
    collapses all but the first when a run has many) and waits until `shows` is visible."""
    box = page.get_by_placeholder("Search metric charts")
    box.fill(query)
    page.get_by_text(shows).first.wait_for()


@pytest.fixture(scope="module")
def submitted(local_stack, tmp_path_factory):
    """Digits shards on the stack's S3 and a pretraining job on them, submitted and followed as a user does."""
    data = f"s3://{local_stack.bucket}/ui-test"
    splits = write_digit_splits(local_stack, data, {"train": (0, 256), "val": (1000, 1064)})
    args = ["submit", "pretrain", "configs/pretrain/smoke.yaml", "--follow", "--set", f"name={RUN}",
            f"data.train={splits['train']}", f"data.val={splits['val']}", f"data.fewshot_train={splits['train']}",
            f"data.fewshot_test={splits['val']}", "data.num_workers=0", f"train.steps={STEPS}",
            "train.log_every=1", "train.eval_every=2", "train.fewshot_every=2", "train.fewshot_shots=[1,2]",
            "train.checkpoint_every=4", "train.global_batch=32", "train.micro_batch=16",
            f"scaling.storage_path={data}/runs", "tracking.sink=mlflow", f"tracking.experiment={EXPERIMENT}",
            f"tracking.registered_model={MODEL}", "tracking.register_alias=champion"]
    r = subprocess.run([*VITPIPE, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, **local_stack.env()})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def test_submit_follow_shows_one_progress_line_per_interval(submitted):
    out = submitted.stdout
    progress = [line for line in out.splitlines() if re.search(rf"\bstep \d+/{STEPS} \(\d+%\)", line)]
    assert [re.search(rf"step (\d+)/{STEPS}", line)[1] for line in progress] == ["1", "2", "3", "4"], out[-4000:]
    for noise in ("Reporting training result", "Failed to query Ray Train Controller actor state", "FutureWarning"):
        assert noise not in out + submitted.stderr, noise


def test_submit_follow_shows_the_jobs_own_lines_not_the_libraries(submitted):
    """Besides its progress lines, the followed job shows at most 10: what was submitted, the job id, the run link,
    the worker group, the saved and registered model, the result, the final status. Ray's packaging, botocore's
    credential lookup, DeepSpeed's and torch's accelerator probes, gloo and MLflow stay in Ray's log files."""
    lines = (submitted.stdout + submitted.stderr).splitlines()
    other = [line for line in lines if not re.search(rf"\bstep \d+/{STEPS} \(\d+%\)", line)]
    assert len(other) <= 10, f"{len(other)} lines besides the progress lines:\n" + "\n".join(other)
    for noise in ("Ignoring upload to cluster", "hostname of the client socket cannot be retrieved",
                  "Found credentials in environment variables", "Setting accelerator to CPU",
                  "No CUDA runtime is found", "Downloading artifacts", "Runtime env is setting up", " INFO mlflow"):
        assert noise not in submitted.stdout + submitted.stderr, noise
    # what the user acts on is there: the job id, the run's link, the result, the status
    assert re.search(r"MLflow run \w+ \(experiment vit-ui\): http\S+", submitted.stdout), other
    assert re.search(r"^submitted: +raysubmit_\w+$", submitted.stdout, re.M) and "SUCCEEDED" in submitted.stderr


def test_the_ui_shows_runs_charts_pictures_artifacts_and_the_version(local_stack, submitted):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make setup installs Debian's chromium)")
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    from pipeline.tracking.run import ui_url

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = local_stack.mlflow_uri
    client = MlflowClient(base)
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([exp.experiment_id], f"attributes.run_name = '{RUN}'")[0]
    version = client.get_model_version_by_alias(MODEL, "champion")
    run_page = f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    ml = "?workflowType=machine_learning"  # the model-training view (see pipeline.tracking.run.ui_url)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1600, "height": 1100}).new_page()  # a fresh profile
        page.set_default_timeout(30_000)
        # every request the UI made that the server refused (a CORS 403 would show here); the UI's probe for a
        # logged-in user answers 404 on a server without the auth app, which it expects
        failed: list[str] = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}")
                if r.status >= 400 and not r.url.endswith("/mlflow/users/current") else None)

        try:
            # the experiment's runs, in the model-training view (the link `vitpipe` prints)
            page.goto(ui_url(base, exp.experiment_id))
            page.get_by_text(RUN).first.wait_for()
            assert "Model registry" in _text(page) and "Judges" not in _text(page), "not the model-training view"
            page.screenshot(path=str(ARTIFACTS / "mlflow-ui-experiment.png"), full_page=True)

            # the run's model metrics: the train/loss chart, and the pictures of its few-shot evaluations at a step
            page.goto(f"{run_page}/model-metrics{ml}")
            page.get_by_text("pictures", exact=True).first.wait_for()
            _search_charts(page, "train/loss", f"{RUN} (train/loss)")  # the loss chart's legend
            page.screenshot(path=str(ARTIFACTS / "mlflow-ui-run-loss.png"), full_page=True)
            _search_charts(page, "pictures/", "pictures/attention_rollout")
            page.get_by_text("pictures/pos_embed_similarity").first.wait_for()
            steps = page.locator("input[type=number]")  # each image card's step box
            assert steps.count() == 2, steps.count()
            for i in range(2):
                steps.nth(i).fill(str(STEPS))
                steps.nth(i).press("Enter")
                steps.nth(i).press("Tab")
            for series in ("attention_rollout", "pos_embed_similarity"):
                img = page.locator(f'img[src*="pictures~{series}%2Bstep%2B{STEPS}%2B"]').first
                img.wait_for()
                page.wait_for_function("el => el.complete", arg=img.element_handle())
                assert img.evaluate("el => el.naturalWidth") > 100, f"{series}: the picture did not load"
            # open the attention-rollout card full-screen, as a user looking at the picture does
            page.get_by_role("button", name="Close").first.click()  # the assistant panel
            menu = page.get_by_test_id("experiment-view-compare-runs-card-menu").first
            menu.locator("xpath=preceding::button[1]").click()  # the card's full-screen button
            big = page.get_by_role("dialog").locator('img[src*="pictures~attention_rollout"]').first
            big.wait_for()
            page.wait_for_function("el => el.complete && el.naturalWidth > 100", arg=big.element_handle())
            big.scroll_into_view_if_needed()  # below the params MLflow lists on every image card (showRunParams)
            page.screenshot(path=str(ARTIFACTS / "mlflow-ui-run-pictures.png"))
            big.screenshot(path=str(ARTIFACTS / "mlflow-ui-attention-rollout.png"))
            page.keyboard.press("Escape")

            # its artifacts: the image series' files and the DeepSpeed config
            page.goto(f"{run_page}/artifacts{ml}")
            page.get_by_text("deepspeed_config.json").first.wait_for()
            assert "images" in _text(page)

            # the registered version: its lineage tags, alias, description, the logged model and its schema
            page.goto(f"{base}/#/models/{MODEL}/versions/{version.version}{ml}")
            page.get_by_text("dataset.checksum").first.wait_for()
            shown = _text(page)
            for text in ("dataset.url", "code_version", "steps", "@ champion", "pretrained on", "Source Model",
                         "Schema", "Inputs (1)", "Outputs (1)"):
                assert text in shown, f"version page: {text!r} not shown: {shown[:2000]}"
            page.screenshot(path=str(ARTIFACTS / "mlflow-ui-model-version.png"), full_page=True)
        except Exception:  # what the page showed, for the failure report
            page.screenshot(path=str(ARTIFACTS / "mlflow-ui-failure.png"), full_page=True)
            (ARTIFACTS / "mlflow-ui-failure.txt").write_text(f"{page.url}\nfailed: {failed}\n{_text(page)}\n")
            raise
        finally:
            browser.close()
    assert not failed, f"the UI's requests that failed: {failed}"
    for name in ("experiment", "run-loss", "run-pictures", "model-version"):
        png = (ARTIFACTS / f"mlflow-ui-{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, name
    print(f"MLflow UI screenshots: {ARTIFACTS}/mlflow-ui-*.png")
