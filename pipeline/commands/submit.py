"""`vitpipe submit pretrain|transfer|transfer-suite|shards|command`: run a job on a Ray cluster via the Job
Submission SDK."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from pipeline.commands import add_config_args
from pipeline.commands.run import reported_cluster_errors as _reported
from pipeline.commands.transfer import add_suite_args, suite_job_args
from pipeline.tracking.console import quiet_ray_logger

if TYPE_CHECKING:
    from pipeline.launch.submit import Submission

__all__ = ["register", "build_job_submission"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard address, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--no-working-dir", dest="working_dir", action="store_false",
                   help="do not upload the project: the cluster image has vitpipe installed")
    p.add_argument("--follow", action="store_true", help="stream the job's logs; exit 0 if it SUCCEEDED, else 1")
    p.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    p.add_argument("--dry-run", action="store_true", help="validate and print what would be submitted")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a job to a Ray cluster (config validated locally first)")
    ksub = p.add_subparsers(dest="kind", metavar="KIND", required=True)

    pre = ksub.add_parser("pretrain", help="python -m jobs.pretrain CONFIG [--set ...] [--resume]")
    add_config_args(pre)
    pre.add_argument("--resume", action="store_true", help="resume from the run's latest committed checkpoint")
    _common(pre)

    tr = ksub.add_parser("transfer", help="python -m jobs.transfer CONFIG --from models:/NAME@ALIAS [--set ...]")
    add_config_args(tr)
    tr.add_argument("--from", dest="source", required=True, help="pretrained model: models:/NAME@ALIAS or a path")
    _common(tr)

    ts = ksub.add_parser("transfer-suite", help="python -m jobs.transfer_suite DIR [--from models:/NAME@ALIAS] "
                         "[--set ...]: the suite's driver as a job; it submits one transfer job per task")
    add_suite_args(ts)
    _common(ts)

    sh = ksub.add_parser("shards", help="python -m jobs.make_shards ARGS... (arguments after -- are passed through)")
    sh.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments of jobs.make_shards, after --")
    _common(sh)

    cmd = ksub.add_parser("command", help="any entrypoint, after --, with the same working dir and environment")
    cmd.add_argument("job_args", nargs=argparse.REMAINDER, help="the entrypoint, after --")
    _common(cmd)
    for sp in (pre, tr, ts, sh, cmd):
        sp.set_defaults(func=_reported(_submit))


def build_job_submission(kind: str, configs: list[str] = (), overrides: list[str] = (),
                         **kwargs: Any) -> Submission:
    """What `vitpipe submit KIND` submits (pipeline.launch.submit.build_submission: the config validated, entrypoint
    and runtime env). A transfer suite is loaded here, every task validated once, and handed to the launcher as the
    submission's config: the launcher knows jobs, not suites."""
    from pipeline.launch import submit as S
    from pipeline.transfer.suite import load_suite

    suite = None
    if kind == "transfer-suite":
        if len(configs) != 1:
            raise ValueError("submit transfer-suite: give one folder of task configs, e.g. configs/transfer/vtab")
        suite = load_suite(configs[0], overrides)
    return S.build_submission(kind, configs, overrides, config=suite, **kwargs)


def _submit(args: argparse.Namespace) -> int:
    from pipeline.launch import submit as S

    job_args = [a for a in getattr(args, "job_args", []) or []]
    if job_args and job_args[0] == "--":
        job_args = job_args[1:]
    if args.kind == "pretrain" and args.resume:
        job_args.append("--resume")
    if args.kind == "transfer":
        job_args += ["--from", args.source]
    if args.kind == "transfer-suite":
        job_args += suite_job_args(args)
    configs = [args.folder] if args.kind == "transfer-suite" else getattr(args, "config", []) or []
    sub = build_job_submission(
        args.kind, configs, getattr(args, "overrides", []) or [],
        job_args=job_args, working_dir=args.working_dir,
    )
    address = args.address or S.default_address() or "(none)"
    shown = S.redact(sub.runtime_env)
    if args.dry_run or args.verbose:
        print(f"address:     {address}")
        print(f"entrypoint:  {sub.entrypoint}")
        if "working_dir" in shown:
            print(f"working_dir: {shown.pop('working_dir')} (excluding {' '.join(shown.pop('excludes', []))})")
        print("runtime_env: " + json.dumps(shown, indent=2, sort_keys=True))
    else:  # what a user checks before the job's own lines: what travels with it (secrets redacted), on one line
        shown.pop("excludes", None)
        print("runtime_env: " + json.dumps(shown, sort_keys=True))
    if args.dry_run:
        return 0
    client = S.job_client(args.address)
    if not args.verbose:
        quiet_ray_logger()  # packaging and uploading the working dir, the log stream's websocket
    job_id = S.submit(client, sub, args.submission_id)
    print(f"submitted:   {job_id}", flush=True)
    if not args.follow:
        print(f"follow with: vitpipe jobs logs {job_id} --follow --address {address}")
        return 0
    status = S.follow(client, job_id, out=sys.stdout, scrub=S.secret_scrubber(sub.runtime_env), quiet=not args.verbose)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return S.exit_code(status)
