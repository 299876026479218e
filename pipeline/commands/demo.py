"""`vitpipe demo [--workdir DIR] [--quick]`: the whole pipeline end to end on real images on this machine. The demo
itself is demo_steps.py (stages), demo_data.py (data, workdir) and demo_report.py (results, summary) beside this."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["register", "demo_environment"]

# What the demo's process runs on, whatever the shell says.
EMBEDDED = {"MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
            "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "vitpipe" / "torch_extensions")}
# Unless -v: the libraries' routine lines stay off the console (each read where the library starts or logs)
QUIET = {
    "RAY_LOGGER_LEVEL": "warning",  # "Started a local Ray instance."
    "RAY_AUTH_MODE": "token",  # Ray's default for a new local cluster; chosen explicitly, Ray does not warn about it
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # creating the store's tables, validating the model's input example
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars on every registry read
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end demo: Fashion-MNIST shards (4 classes held out) -> ViT pretraining (ZeRO-2, 2 Ray "
        "workers, MLflow) -> registry -> transfer onto the held-out classes and onto digits vs from scratch",
        description="Runs the whole mission on embedded defaults: shards in a local folder, a sqlite MLflow store "
        "and a local Ray on 127.0.0.1, all under --workdir. Each run starts clean (runs/, mlflow.db, mlartifacts/, "
        "transfer/ are removed) and reuses shards/ written by an earlier run of the same size. Prints each stage, "
        "its training progress and results, a summary table and the command that opens the MLflow UI on the store "
        "(vitpipe -v demo: every library's log lines and the Ray workers' output as well).",
    )
    p.add_argument("--workdir", default="demo-out", help="where everything goes (default: ./demo-out)")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller version with one seed (~4 min on 2 cores; what the tests run)")
    p.add_argument("--worker-logs", action="store_true",
                   help="stream the Ray workers' own output too (default: it stays in Ray's log files, "
                   "/tmp/ray/session_latest/logs/)")
    p.set_defaults(func=_demo)


@contextlib.contextmanager
def demo_environment(say: Callable[[str], None], quiet: bool = True) -> Iterator[None]:
    """For the duration: a local Ray on loopback and the demo's own MLflow store (RAY_ADDRESS and MLFLOW_TRACKING_URI
    are ignored), and with `quiet` only the libraries' warnings and errors (this process's log level included)."""
    keys = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", *EMBEDDED, *QUIET)
    saved = {k: os.environ.get(k) for k in keys}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        if saved[k]:
            say(f"  note: ignoring ${k}={saved[k]} (the demo runs on embedded defaults)")
        os.environ.pop(k, None)
    for k, v in {**EMBEDDED, **(QUIET if quiet else {})}.items():
        os.environ.setdefault(k, v)
    root = logging.getLogger()
    level = root.level
    if quiet:
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _demo(args: argparse.Namespace) -> int:
    verbose = getattr(args, "verbose", False)
    with demo_environment(lambda line: print(line, flush=True), quiet=not verbose):
        # imported here, after the environment is set: it brings torch, and ray and mlflow read theirs on import
        from pipeline.commands.demo_steps import run_demo

        run_demo(args.workdir, quick=args.quick, worker_logs=args.worker_logs or verbose)
    return 0
