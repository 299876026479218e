"""The Ray job entrypoints submitted with Ray's own client, as a user of a RayJob or `ray job submit` runs them
(`ray job submit --runtime-env cluster/runtime_env.yaml -- python -m jobs.pretrain CONFIG ...`), on the single-node
stack: bad input (a dataset manifest that does not exist) ends the job with exit code 2 and one last line naming
the manifest, no traceback; the same mapping as `vitpipe` (pipeline.commands.run)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def source_model(local_stack, tmp_path_factory) -> str:
    """A registered vit_pico4 (28 px) for the transfer job to start from: it resolves and loads the source before
    it reads the datasets."""
    from pipeline.model import build_model
    from pipeline.model.checkpoint import save_checkpoint
    from tests.fixtures.mlflow import register_in_new_run
    from tests.fixtures.ray_stack import stack_credentials

    with stack_credentials(local_stack):
        ckpt = save_checkpoint(tmp_path_factory.mktemp("src"),
                               build_model("vit_pico4", image_size=28, num_classes=10, pre_logits=64))
        register_in_new_run(ckpt, name="entrypoint-src", alias="champion", tracking_uri=local_stack.mlflow_uri,
                            experiment="entrypoint-src")
    return "models:/entrypoint-src@champion"


def _ray_job_submit(stack, job_id: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([RAY, "job", "submit", "--address", stack.dashboard_url, "--submission-id", job_id,
                        "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint],
                       cwd=ROOT, env={**os.environ, **stack.env()}, capture_output=True, text=True, timeout=400)
    print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
    return r


@pytest.mark.parametrize("job", ["pretrain", "transfer"])
def test_a_missing_manifest_fails_the_job_with_exit_2_and_one_line(job, local_stack, tmp_path, request):
    from pipeline.launch.submit import job_client

    missing = f"{tmp_path}/missing/manifest.json"
    if job == "pretrain":
        entrypoint = ["python", "-m", "jobs.pretrain", "configs/pretrain/smoke.yaml", "--set",
                      f"data.train={missing}"]
    else:
        entrypoint = ["python", "-m", "jobs.transfer", "configs/transfer/smoke.yaml", "--from",
                      request.getfixturevalue("source_model"), "--set", f"data.train={missing}",
                      f"data.val={missing}"]
    job_id = f"entrypoint-{job}-{uuid.uuid4().hex[:8]}"
    r = _ray_job_submit(local_stack, job_id, entrypoint)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # Ray's client: the job FAILED

    with pytest.MonkeyPatch.context() as m:
        m.setenv("RAY_AUTH_TOKEN_PATH", local_stack.token_path)
        client = job_client(local_stack.dashboard_url)
        info = client.get_job_info(job_id)
        logs = client.get_job_logs(job_id)
    assert str(info.status.value) == "FAILED" and info.driver_exit_code == 2, (info, logs[-3000:])
    assert "Traceback" not in logs, logs[-3000:]
    last = [line for line in logs.splitlines() if line.strip()][-1]
    assert last.startswith(f"{job} job: dataset manifest not found: {missing} ("), logs[-3000:]
