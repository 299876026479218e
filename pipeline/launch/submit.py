"""Submitting our jobs to a Ray cluster through Ray's Job Submission SDK.

A submission = an entrypoint (`python -m jobs.pretrain CONFIG ...`) + a runtime environment: the project as
`working_dir` (or nothing, when the cluster image has the package installed) and the storage/MLflow settings of
the submitter's environment as env vars. Configs are validated here (unless the caller did), before anything is
uploaded; a transfer suite's folder comes validated by the command layer, which loads the suite. Credentials
travel only inside the runtime environment; everything printed goes through `redact`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from pipeline.config import RunConfig, config_class, load_config
from pipeline.errors import ConfigError
from pipeline.launch.checks import check_storage, check_world_sizes
from pipeline.tracking.console import FilteredStream
from pipeline.version import CODE_VERSION_ENV, code_version

__all__ = [
    "PROJECT_DIR", "JOB_MODULES", "FORWARDED_ENV", "WORKING_DIR_EXCLUDES", "Submission", "build_submission",
    "runtime_env_for", "redact", "secret_scrubber", "default_address", "job_client", "submit", "follow", "wait",
    "TERMINAL", "exit_code", "list_jobs", "job_details", "format_env", "cluster_address", "SUITE_STOP_GRACE_S",
]

PROJECT_DIR = Path(__file__).resolve().parents[2]
JOB_MODULES = {"pretrain": "jobs.pretrain", "transfer": "jobs.transfer", "shards": "jobs.make_shards",
               "transfer-suite": "jobs.transfer_suite"}
# a stopped suite driver only asks its running tasks' jobs to stop (each has its own scaling.stop_grace_s)
SUITE_STOP_GRACE_S = 60
# Forwarded from the submitter's environment when set. Names with a _SECRET_WORDS word are redacted on print.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_EXPERIMENT_NAME",
)
_SECRET_WORDS = {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIALS", "CREDENTIAL", "AUTH"}
# Patterns are gitignore-style relative to the project root; anchored with "/" so that e.g. pipeline/data/ stays.
WORKING_DIR_EXCLUDES = [
    "/.venv", "/.git", "/runs", "/data", "/demo-out", "/mlruns", "/mlartifacts", "/mlflow.db", "/.vitpipe-stack",
    "/.pytest_cache", "/build", "/dist", "*.egg-info", "__pycache__", "*.pyc", "*.safetensors", "*.tar",
    "*.ckpt", "*.pt",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    config: Any = None  # the validated config, when the job takes one


def _is_secret(name: str) -> bool:
    """AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_TOKEN... (by word, so TOKENIZERS_* is not)."""
    return bool(_SECRET_WORDS & set(name.upper().split("_")))


def redact(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to print: values of secret-looking env vars become '***'."""
    out = dict(runtime_env)
    if "env_vars" in out:
        out["env_vars"] = {k: ("***" if _is_secret(k) else v) for k, v in out["env_vars"].items()}
    return out


def runtime_env_for(
    *, working_dir: bool = True, project_dir: Path = PROJECT_DIR, environ: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    env_vars = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    env_vars.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env_vars.update(extra_env or {})
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if working_dir:
        # the uploaded copy has no .git: the job records the commit of the checkout it was submitted from
        env_vars.setdefault(CODE_VERSION_ENV, code_version(project_dir))
        runtime_env["working_dir"] = str(project_dir)
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return runtime_env


def _project_path(path: str, project_dir: Path, working_dir: bool, folder: bool = False) -> str:
    """A config path (a suite's folder of configs, with `folder`) as the job will see it: relative to the project
    root (the job's working dir)."""
    p = Path(path)
    if not (p.is_dir() if folder else p.is_file()):
        raise FileNotFoundError(f"{'config folder' if folder else 'config file'} not found: {path}")
    resolved = p.resolve()
    try:
        rel = resolved.relative_to(project_dir.resolve())
    except ValueError:
        if not working_dir:
            return str(path)  # an installed package: the path must exist on the cluster as given
        raise ValueError(
            f"config {path} is outside the project dir {project_dir}: only files inside it are uploaded with the "
            "job; copy it under configs/ (or use --no-working-dir with a path that exists on the cluster)"
        ) from None
    return rel.as_posix()


def _validate(kind: str, configs: list[str], overrides: list[str]) -> Any:
    """The validated config, with the checks that need no cluster: storage (placeholder, node-local path on GPUs) and
    the world sizes the training plan must serve."""
    if kind == "pretrain":
        cfg = load_config(configs, overrides, RunConfig)
    else:
        cls = config_class(configs)
        if cls is RunConfig:
            raise ConfigError(f"{configs[-1]}: a transfer config needs a `transfer:` section")
        cfg = load_config(configs, overrides, cls)
    check_storage(cfg)
    check_world_sizes(cfg)
    return cfg


def build_submission(
    kind: str,
    configs: list[str] = (),
    overrides: list[str] = (),
    *,
    job_args: list[str] = (),
    working_dir: bool = True,
    project_dir: Path = PROJECT_DIR,
    environ: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
    python: str = "python",
    config: Any = None,
) -> Submission:
    """Validates the config locally and builds entrypoint + runtime env. kind: pretrain | transfer | shards
    (shards passes `job_args` through to `jobs.make_shards`) | command (`job_args` is the whole entrypoint) |
    transfer-suite (`configs` is the one folder of task configs). `config`: what the caller validated already, kept
    as the submission's config and not validated again: for pretrain / transfer the config of `configs` and
    `overrides` (overrides it does not hold may only name the run), for transfer-suite the suite loaded from the
    folder (required: pipeline.transfer.suite.load_suite validates every task)."""
    runtime_env = runtime_env_for(working_dir=working_dir, project_dir=project_dir, environ=environ,
                                  extra_env=extra_env)
    metadata = {"vitpipe_kind": kind}
    cfg = config
    if kind == "command":
        if not job_args:
            raise ValueError("submit command: give the entrypoint after --, e.g. -- python -c 'print(1)'")
        entrypoint = shlex.join(job_args)
    elif kind in ("pretrain", "transfer"):
        if not configs:
            raise ValueError(f"submit {kind}: give a config file")
        paths = [_project_path(c, project_dir, working_dir) for c in configs]
        if cfg is None:
            cfg = _validate(kind, list(configs), list(overrides))
        # `ray job stop` sends SIGTERM and, after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s), SIGKILL; the job
        # needs the time to finish its step and commit a checkpoint (read by the job's supervisor, whose runtime
        # env is the job's)
        runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] = str(cfg.scaling.stop_grace_s)
        parts = [python, "-m", JOB_MODULES[kind], *paths]
        if overrides:
            parts += ["--set", *overrides]
        entrypoint = shlex.join([*parts, *job_args])
        metadata["config"] = ",".join(paths)
        metadata["run_name"] = str(getattr(cfg, "name", ""))
    elif kind == "shards":
        entrypoint = shlex.join([python, "-m", JOB_MODULES[kind], *configs, *job_args])
    elif kind == "transfer-suite":
        if len(configs) != 1 or cfg is None:
            raise ValueError("submit transfer-suite: give one folder of task configs (e.g. configs/transfer/vtab) "
                             "and, as `config`, the suite loaded from it")
        folder = _project_path(configs[0], project_dir, working_dir, folder=True)
        runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] = str(SUITE_STOP_GRACE_S)
        parts = [python, "-m", JOB_MODULES[kind], folder]
        if overrides:
            parts += ["--set", *overrides]
        if not working_dir:  # its tasks' jobs then run the installed package too
            parts.append("--no-working-dir")
        entrypoint = shlex.join([*parts, *job_args])
        metadata["config"] = folder
    else:
        raise ValueError(f"unknown job kind {kind!r}: one of pretrain, transfer, shards, command, transfer-suite")
    return Submission(entrypoint, runtime_env, metadata, cfg)


def _auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Ray 2.60 clusters use token auth by default. The token comes from $RAY_AUTH_TOKEN, the file at
    $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (unless RAY_AUTH_MODE=disabled); sent as a bearer header."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def default_address(environ: dict[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = environ.get(key, "")
        if value.startswith(("http://", "https://")):
            return value
    return None


def cluster_address(environ: dict[str, str] | None = None) -> str | None:
    """Inside a Ray job's driver (a suite submitting its tasks' jobs): the dashboard URL of the job's own cluster,
    looked up from its GCS at $RAY_ADDRESS, which Ray sets for every job's driver. None outside a Ray job."""
    environ = os.environ if environ is None else environ
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in environ or not environ.get("RAY_ADDRESS"):
        return None
    from ray.dashboard.utils import ray_address_to_api_server_url

    return ray_address_to_api_server_url(environ["RAY_ADDRESS"])


def job_client(address: str | None = None):
    """A JobSubmissionClient for the dashboard at `address` (http://HEAD:8265; default $RAY_API_SERVER_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    address = address or default_address()
    if not address:
        raise ValueError(
            "no Ray address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS "
            "(`eval $(vitpipe stack env)` sets it for the local stack)"
        )
    return JobSubmissionClient(address, headers=_auth_headers())


def submit(client, sub: Submission, submission_id: str | None = None) -> str:
    return client.submit_job(
        entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, metadata=sub.metadata, submission_id=submission_id
    )


def wait(client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Polls until the job is terminal; returns its status name."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def follow(client, job_id: str, out: TextIO = sys.stdout, scrub: Callable[[str], str] | None = None,
           quiet: bool = True) -> str:
    """Streams the job's logs to `out` until it ends; returns the final status name. `quiet` drops Ray's
    known-harmless lines (pipeline.tracking.console.NOISE; the job's log file in Ray keeps them)."""
    sink = FilteredStream(out) if quiet else out

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sink.write(scrub(chunk) if scrub else chunk)
            sink.flush()

    try:
        asyncio.run(_tail())
    finally:
        if quiet:
            sink.close_line()
    return wait(client, job_id)


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def secret_scrubber(runtime_env: dict[str, Any]) -> Callable[[str], str]:
    """Replaces the values of the secret env vars we sent, should a job print them."""
    values = [v for k, v in runtime_env.get("env_vars", {}).items() if _is_secret(k) and len(v) >= 4]

    def scrub(text: str) -> str:
        for v in values:
            text = text.replace(v, "***")
        return text

    return scrub


def list_jobs(client) -> list[dict[str, Any]]:
    rows = []
    for job in client.list_jobs():
        rows.append({
            "submission_id": job.submission_id, "status": str(job.status.value), "entrypoint": job.entrypoint,
            "start_time": job.start_time, "end_time": job.end_time, "message": job.message,
        })
    return rows


def job_details(client, job_id: str) -> dict[str, Any]:
    info = client.get_job_info(job_id)
    return {
        "submission_id": info.submission_id, "status": str(info.status.value), "entrypoint": info.entrypoint,
        "message": info.message, "start_time": info.start_time, "end_time": info.end_time,
        "metadata": info.metadata, "runtime_env": redact(info.runtime_env or {}),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }


def format_env(env: dict[str, str], keys: Iterable[str] | None = None) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items() if keys is None or k in keys)
