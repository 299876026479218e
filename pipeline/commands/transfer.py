"""`vitpipe transfer CONFIG --from models:/NAME@ALIAS`: fine-tune (or few-shot evaluate) a registered model.
`vitpipe transfer-suite DIR --from ...`: every task config of a folder (VTAB-1k: configs/transfer/vtab) as its own
Ray job, at most N at a time, under one parent MLflow run that logs the group and overall means."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.commands import add_config_args
from pipeline.commands.run import reported_cluster_errors as _reported

__all__ = ["register", "add_suite_args", "suite_job_args"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transfer", help="fine-tune / linear-probe / few-shot evaluate a registered model on a downstream dataset"
    )
    add_config_args(p)
    p.add_argument(
        "--from", dest="source", default=None, metavar="MODEL_URI",
        help="models:/NAME@ALIAS or models:/NAME/VERSION (default: transfer.source in the config)",
    )
    p.add_argument("--workdir", default=None, help="keep downloaded/adapted/final checkpoints here (default: temp)")
    p.set_defaults(func=_run)

    s = sub.add_parser(
        "transfer-suite", help="a folder of transfer tasks (VTAB-1k: configs/transfer/vtab), one Ray job per task, "
        "under one parent MLflow run with the group means",
    )
    add_suite_args(s)
    s.add_argument("--address", help="Ray dashboard address, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS; in "
                   "a Ray job, the job's own cluster)")
    s.add_argument("--no-working-dir", dest="working_dir", action="store_false",
                   help="do not upload the project with each task's job: the cluster has vitpipe installed")
    s.set_defaults(func=_reported(_run_suite))


def add_suite_args(p: argparse.ArgumentParser) -> None:
    """The suite's own arguments (shared with `vitpipe submit transfer-suite`)."""
    p.add_argument("folder", metavar="DIR", help="folder of task configs (*.yaml; _*.yaml are their bases)")
    p.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="dotted overrides applied to every task, e.g. --set scaling.storage_path=s3://BUCKET/runs",
    )
    p.add_argument("--from", dest="source", default=None, metavar="MODEL_URI",
                   help="models:/NAME@ALIAS or models:/NAME/VERSION for every task (default: each transfer.source)")
    p.add_argument("--max-concurrent", type=int, default=1, metavar="N",
                   help="task jobs running at once (default 1): what the cluster holds side by side")
    p.add_argument("--name", default=None,
                   help="the suite's run name; task jobs are <name>-<task> (default: <DIR name>-<UTC time>)")


def suite_job_args(args: argparse.Namespace) -> list[str]:
    """The suite's arguments again, for its driver's entrypoint (python -m jobs.transfer_suite DIR ...)."""
    out = ["--max-concurrent", str(args.max_concurrent)]
    if args.source:
        out += ["--from", args.source]
    if args.name:
        out += ["--name", args.name]
    return out


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.transfer.config import TransferRunConfig
    from pipeline.transfer.runner import run_transfer

    cfg = load_config(args.config, args.overrides, TransferRunConfig)
    result = run_transfer(cfg, source=args.source, workdir=args.workdir)
    # the result on one line: as a Ray job's last line, it ends what `vitpipe submit --follow` shows
    print(json.dumps({"run_id": result.run_id, "metrics": result.metrics, "artifacts": result.artifacts,
                      "registered": result.registered.uri if result.registered else None}))
    return 0


def _run_suite(args: argparse.Namespace) -> int:
    """Loads (validates) the suite once and runs it from this process; prints its summary (JSON): exit 0, or 1 with
    the failed tasks named on stderr. Also the suite's Ray job (jobs.transfer_suite): there the cluster to submit the
    tasks' jobs to is the job's own."""
    from pipeline.launch.submit import cluster_address, default_address
    from pipeline.transfer.suite import SuiteFailed, load_suite, run_suite

    suite = load_suite(args.folder, args.overrides)
    address = args.address or default_address() or cluster_address()
    try:
        result = run_suite(suite, source=args.source, name=args.name, address=address,
                           max_concurrent=args.max_concurrent, working_dir=args.working_dir)
    except SuiteFailed as e:
        print(json.dumps(e.result.summary(), indent=2))
        print(f"{args.prog}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary(), indent=2))
    return 0
