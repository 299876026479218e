"""`vitpipe stack up|down|status|env|cut-node|restore-node|restart-node`: the local Ray + S3 + MLflow stack."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.devstack import NetnsError, Stack, StackError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="start/stop a local stack: Ray cluster (1..N nodes), S3 endpoint, MLflow server")
    ssub = p.add_subparsers(dest="stack_command", metavar="ACTION", required=True)
    up = ssub.add_parser("up", help="start the stack and wait until it is healthy")
    up.add_argument("--nodes", type=int, default=1,
                    help="Ray nodes; >1 (root) emulates machines that share nothing: each node in its own network "
                    "namespace on --subnet and its own mount namespace (private /tmp, HOME, working dir, caches); "
                    "the head (node 0) runs drivers and takes no workers")
    up.add_argument("--subnet", default="10.213.0.0/24", help="private /24 for multi-node mode")
    up.add_argument("--ray-port", type=int, default=6379, help="GCS port (0 = any free port)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / job submission port")
    up.add_argument("--s3-port", type=int, default=9000, help="port of the moto S3 server")
    up.add_argument("--mlflow-port", type=int, default=5000)
    up.add_argument("--s3-endpoint", default=os.environ.get("VITPIPE_STACK_S3_ENDPOINT"),
                    help="use this S3 endpoint (MinIO, AWS...) instead of starting moto; credentials from the "
                    "environment (default: $VITPIPE_STACK_S3_ENDPOINT)")
    up.add_argument("--bucket", default="vitpipe", help="bucket for data and MLflow artifacts (created if missing)")
    up.add_argument("--backend-store-uri", help="MLflow backend store, e.g. postgresql://... (default: sqlite)")
    up.add_argument("--cpus-per-node", type=int, default=2)
    up.add_argument("--head-cpus", type=int, default=None,
                    help="CPUs Ray may use on the head (default: 0 with several nodes, --cpus-per-node with one)")
    up.add_argument("--object-store-mb", type=int, default=512)
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health")
    up.set_defaults(func=_up)
    for name, fn, text in (
        ("down", _down, "stop everything `up` started (and nothing else)"),
        ("status", _status, "health of each part; exit 0 if all healthy, 1 otherwise"),
        ("env", _env, "print export lines for this stack (no secrets): eval $(vitpipe stack env)"),
    ):
        q = ssub.add_parser(name, help=text)
        q.set_defaults(func=fn)
    for name, fn, text in (
        ("cut-node", _cut, "take node I's network link down (multi-node)"),
        ("restore-node", _restore, "bring node I's link back up"),
        ("restart-node", _restart, "restart node I's Ray processes (a node Ray declared dead cannot rejoin)"),
    ):
        q = ssub.add_parser(name, help=text)
        q.add_argument("node", type=int, help="node index (0 = head)")
        q.set_defaults(func=fn)
    for q in ssub.choices.values():
        q.add_argument("--workdir", default=".", help="where the stack's state lives (.vitpipe-stack/)")
        q.set_defaults(func=_reported(q.get_default("func")))


def _reported(fn):
    """Stack and namespace failures are situations to explain, not tracebacks: print them, exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (StackError, NetnsError) as e:
            print(f"vitpipe stack {args.stack_command}: {e}", file=sys.stderr)
            return 2

    return run



def _load(args):
    return Stack.load(args.workdir)


def _up(args: argparse.Namespace) -> int:
    stack = Stack.up(
        args.workdir, nodes=args.nodes, subnet=args.subnet, s3_endpoint=args.s3_endpoint, bucket=args.bucket,
        ports={"ray": args.ray_port, "dashboard": args.dashboard_port, "s3": args.s3_port, "mlflow": args.mlflow_port},
        backend_store_uri=args.backend_store_uri, cpus_per_node=args.cpus_per_node, head_cpus=args.head_cpus,
        object_store_mb=args.object_store_mb, timeout_s=args.timeout,
    )
    print(f"stack up: {stack.nodes} Ray node(s) {', '.join(stack.node_ips)}")
    print(f"  dashboard / jobs  {stack.dashboard_url}")
    print(f"  S3                {stack.s3_endpoint}  (bucket {stack.bucket})")
    print(f"  MLflow            {stack.mlflow_uri}")
    print(f"  logs              {stack.state_dir(stack.workdir) / 'logs'}")
    print("use it from a shell:  eval $(vitpipe stack env" + (f" --workdir {args.workdir})" if args.workdir != "." else ")"))
    return 0


def _down(args: argparse.Namespace) -> int:
    try:
        stack = _load(args)
    except StackError as e:
        print(f"nothing to stop: {e}")
        return 0
    stopped = stack.down()
    print("stopped: " + (", ".join(stopped) or "nothing was running"))
    return 0


def _status(args: argparse.Namespace) -> int:
    st = _load(args).status()
    print(json.dumps(st, indent=2))
    return 0 if st["healthy"] else 1


def _env(args: argparse.Namespace) -> int:
    # here, not at the top: pipeline.launch.submit loads the tracking and model code, which `--help` need not
    from pipeline.launch.submit import format_env

    print(format_env(_load(args).env()))
    return 0


def _cut(args: argparse.Namespace) -> int:
    _load(args).cut_node(args.node)
    print(f"node {args.node}: link down")
    return 0


def _restore(args: argparse.Namespace) -> int:
    _load(args).restore_node(args.node)
    print(f"node {args.node}: link up")
    return 0


def _restart(args: argparse.Namespace) -> int:
    _load(args).restart_node(args.node)
    print(f"node {args.node}: restarted and alive")
    return 0
