"""`vitpipe transfer CONFIG --from models:/NAME@ALIAS`: fine-tune (or few-shot evaluate) a registered model."""

from __future__ import annotations

import argparse
import json

from pipeline.commands import add_config_args

__all__ = ["register"]


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


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.transfer.config import TransferRunConfig
    from pipeline.transfer.job import run_transfer

    cfg = load_config(args.config, args.overrides, TransferRunConfig)
    result = run_transfer(cfg, source=args.source, workdir=args.workdir)
    out = {"run_id": result.run_id, "metrics": result.metrics, "artifacts": result.artifacts}
    if result.registered is not None:
        out["registered"] = result.registered.uri
    print(json.dumps(out, indent=2))
    return 0
