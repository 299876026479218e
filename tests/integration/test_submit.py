"""`vitpipe submit` / `vitpipe jobs` against a real single-node stack (Ray with token auth, moto S3, MLflow)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
VITPIPE = [sys.executable, "-m", "pipeline.cli"]
FAKE_SECRET = "FAKEsecretKEY/do-not-print/0123456789"


def _run(args: list[str], stack, extra_env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.env(), **(extra_env or {})}
    return subprocess.run([*VITPIPE, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_command_job_follow_succeeds_and_hides_the_secret(local_stack):
    digest = hashlib.sha256(FAKE_SECRET.encode()).hexdigest()
    # The job proves it got the project (working_dir), the stack's endpoints and the secret, without printing it.
    code = (
        "import hashlib, os, pathlib, pipeline.data.config;"
        f"assert hashlib.sha256(os.environ['AWS_SECRET_ACCESS_KEY'].encode()).hexdigest() == '{digest}';"
        "assert not pathlib.Path('.venv').exists() and pathlib.Path('pipeline/launch/submit.py').is_file();"
        "print('JOB-OK', os.environ['AWS_ENDPOINT_URL'], os.environ['MLFLOW_TRACKING_URI']);"
        "print('env names:', sorted(k for k in os.environ if k.startswith('AWS_')))"
    )
    r = _run(["submit", "command", "--follow", "--", "python", "-c", code], local_stack,
             {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"JOB-OK {local_stack.s3_endpoint} {local_stack.mlflow_uri}" in r.stdout  # logs were streamed
    assert '"AWS_SECRET_ACCESS_KEY": "***"' in r.stdout  # the printed runtime env is redacted
    assert FAKE_SECRET not in out
    job_id = next(l.split()[-1] for l in r.stdout.splitlines() if l.startswith("submitted:"))

    logs = _run(["jobs", "logs", job_id], local_stack)
    assert "JOB-OK" in logs.stdout and FAKE_SECRET not in logs.stdout
    status = _run(["jobs", "status", job_id, "--json"], local_stack)
    assert status.returncode == 0
    details = json.loads(status.stdout)
    assert details["status"] == "SUCCEEDED"
    assert details["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert FAKE_SECRET not in status.stdout
    listing = _run(["jobs", "list"], local_stack)
    assert job_id in listing.stdout and "SUCCEEDED" in listing.stdout


def test_failing_job_exits_1(local_stack):
    r = _run(["submit", "command", "--follow", "--", "python", "-c", "import sys; print('about to fail'); sys.exit(3)"],
             local_stack)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "about to fail" in r.stdout and "FAILED" in r.stderr
    job_id = next(l.split()[-1] for l in r.stdout.splitlines() if l.startswith("submitted:"))
    assert _run(["jobs", "status", job_id], local_stack).returncode == 1


def test_without_token_the_cluster_refuses(local_stack):
    """Token auth is really on: a client without the token gets a clear refusal (exit 2), not a submitted job."""
    from pipeline.launch.submit import build_submission, job_client

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update({k: v for k, v in local_stack.env().items() if not k.startswith("RAY_AUTH")})
    env["HOME"] = "/nonexistent"  # no ~/.ray/auth_token either
    r = subprocess.run([*VITPIPE, "jobs", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "401" in r.stderr or "uthenticat" in r.stderr, r.stderr[-2000:]
    # with the stack's token the same client works
    os.environ.update(RAY_AUTH_TOKEN_PATH=local_stack.token_path)
    try:
        client = job_client(local_stack.dashboard_url)
        assert isinstance(client.list_jobs(), list)
    finally:
        os.environ.pop("RAY_AUTH_TOKEN_PATH")
    assert build_submission  # same module the CLI uses


def test_submit_shards_job_writes_to_the_stack_s3(local_stack, tmp_path):
    from PIL import Image

    src = tmp_path / "images"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 100 if cls == "cat" else 200, 0)).save(src / cls / f"{i}.png")
    dest = f"s3://{local_stack.bucket}/test-submit/shards"
    r = _run(["submit", "shards", "--follow", "--", str(src), dest, "--samples-per-shard", "4", "--no-progress"],
             local_stack)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    import s3fs

    env = local_stack.env()
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=local_stack.s3_endpoint)
    files = fs.ls(dest.removeprefix("s3://"))
    assert any(f.endswith("manifest.json") for f in files), files
    assert sum(f.endswith(".tar") for f in files) == 2, files
