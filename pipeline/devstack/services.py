"""The stack's servers beside Ray: an S3 endpoint (moto, unless the user names one) and `mlflow server`, and the
environment that points the stack's processes, and every job on it, at them."""

from __future__ import annotations

import os
from typing import Any

import boto3
from botocore.exceptions import ClientError

from pipeline.devstack.processes import BIN

__all__ = ["MOTO_CREDENTIALS", "service_env", "moto_command", "mlflow_command", "mlflow_env", "ensure_bucket"]

# moto accepts any credentials; these placeholders are not secrets and are what stack clients use against it.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "vitpipe-local", "AWS_SECRET_ACCESS_KEY": "vitpipe-local"}


def service_env(*, s3_endpoint: str, mlflow_uri: str, token_path: str, s3_managed: bool) -> dict[str, str]:
    """Environment every process of the stack (and every job on it) should see. Includes the moto placeholder
    credentials when the stack runs moto; real credentials are inherited, never written here."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token_path,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.setdefault("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    if s3_managed:
        env.update(MOTO_CREDENTIALS)
    return env


def moto_command(host: str, port: int) -> list[str]:
    return [str(BIN / "python"), "-m", "moto.server", "-H", host, "-p", str(port)]


def mlflow_command(*, host: str, port: int, backend_store_uri: str, artifacts_destination: str) -> list[str]:
    # MLflow 3 refuses the UI's own API calls from origins other than localhost: allow the address it serves on
    origins = f"http://{host}:{port},http://localhost:{port},http://127.0.0.1:{port}"
    return [
        str(BIN / "mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
        "--cors-allowed-origins", origins,
    ]


def mlflow_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def ensure_bucket(endpoint: str, bucket: str, env: dict[str, str], s3_managed: bool) -> None:
    """Creates `bucket` at `endpoint` unless it exists; moto's placeholder credentials when the stack runs moto,
    the environment's otherwise."""
    kwargs: dict[str, Any] = {"endpoint_url": endpoint, "region_name": env["AWS_DEFAULT_REGION"]}
    if s3_managed:
        kwargs.update(aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3 = boto3.client("s3", **kwargs)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)
