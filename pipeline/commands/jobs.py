"""`vitpipe jobs list|status|logs|stop`: inspect and control jobs on a Ray cluster."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.commands.run import reported_cluster_errors as _reported
from pipeline.tracking.console import FilteredStream, quiet_ray_logger

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    jsub = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    ls = jsub.add_parser("list", help="all jobs with their status")
    ls.add_argument("--json", action="store_true")
    st = jsub.add_parser("status", help="one job's details (runtime env redacted); exit 0 SUCCEEDED, 1 FAILED/STOPPED")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true")
    lg = jsub.add_parser("logs", help="a job's logs")
    lg.add_argument("job_id")
    lg.add_argument("--follow", action="store_true", help="stream until the job ends; exit code = its status")
    sp = jsub.add_parser("stop", help="stop a running job: a training job finishes its step on every rank, commits "
                         "a checkpoint and ends its MLflow run KILLED (continue it with submit ... --resume)")
    sp.add_argument("job_id")
    sp.add_argument("--wait", action="store_true", help="wait until it has stopped")
    sp.add_argument("--timeout", type=float, default=900.0, help="seconds --wait waits (default 900)")
    for q, fn in ((ls, _list), (st, _status), (lg, _logs), (sp, _stop)):
        q.add_argument("--address", help="Ray dashboard address, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
        q.set_defaults(func=_reported(fn))


def _list(args: argparse.Namespace) -> int:
    from pipeline.launch import submit as S

    rows = S.list_jobs(S.job_client(args.address))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in sorted(rows, key=lambda r: r["start_time"] or 0):
        print(f"{r['submission_id'] or '-':<28} {r['status']:<10} {r['entrypoint']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipeline.launch import submit as S

    d = S.job_details(S.job_client(args.address), args.job_id)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}")
    return 0 if d["status"] == "SUCCEEDED" else (1 if d["status"] in S.TERMINAL else 3)


def _logs(args: argparse.Namespace) -> int:
    from pipeline.launch import submit as S

    client = S.job_client(args.address)
    if not args.verbose:
        quiet_ray_logger()  # the log stream's websocket
    if args.follow:
        return S.exit_code(S.follow(client, args.job_id, out=sys.stdout, quiet=not args.verbose))
    text = client.get_job_logs(args.job_id)
    if args.verbose:
        sys.stdout.write(text)
    else:
        stream = FilteredStream(sys.stdout)
        stream.write(text)
        stream.close_line()
    return 0


def _stop(args: argparse.Namespace) -> int:
    from pipeline.launch import submit as S

    client = S.job_client(args.address)
    client.stop_job(args.job_id)
    print(f"stop requested: {args.job_id}", flush=True)
    if args.wait:
        print(f"{args.job_id}: {S.wait(client, args.job_id, timeout_s=args.timeout)}")
    return 0
