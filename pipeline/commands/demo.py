"""`vitpipe demo [--workdir DIR] [--quick]`: the whole pipeline end to end on real images on this machine."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end demo: Fashion-MNIST shards -> ViT pretraining (ZeRO-2, 2 Ray workers, MLflow) -> "
        "registry -> transfer onto digits vs from scratch",
        description="Runs the whole mission on embedded defaults: shards in a local folder, a sqlite MLflow store "
        "and a local Ray on 127.0.0.1, all under --workdir. Each run starts clean (runs/, mlflow.db, mlartifacts/, "
        "transfer/ are removed) and reuses shards/ written by an earlier run of the same size. Prints a summary "
        "table and the command that opens the MLflow UI on the store.",
    )
    p.add_argument("--workdir", default="demo-out", help="where everything goes (default: ./demo-out)")
    p.add_argument("--quick", action="store_true", help="a much smaller version (~1-2 min; what the tests run)")
    p.add_argument("--worker-logs", action="store_true",
                   help="stream the Ray workers' own output too (default: only stages and metrics)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    run_demo(args.workdir, quick=args.quick, worker_logs=args.worker_logs)
    return 0
