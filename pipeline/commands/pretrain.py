"""`vitpipe pretrain CONFIG... [--set k=v ...] [--resume] [--address ADDR]`: distributed pretraining on Ray."""

from __future__ import annotations

import argparse
import json

from pipeline.commands import add_config_args

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a ViT with DeepSpeed ZeRO workers under Ray Train",
        description="Runs a pretraining config on Ray: connects to --address / $RAY_ADDRESS or starts a local "
        "Ray on 127.0.0.1. The run lives at <scaling.storage_path>/<name>; --resume continues it from its latest "
        "committed checkpoint (same MLflow run). A SIGTERM stops every worker after its current step with a committed "
        "checkpoint (exit 143; --resume continues it).",
    )
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its latest checkpoint")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from pipeline.config import RunConfig, load_config
    from pipeline.pretrain import run_pretraining

    cfg = load_config(args.config, args.overrides, RunConfig)
    result = run_pretraining(cfg, resume=args.resume, address=args.address)
    # the result on one line: as a Ray job's last line, it ends what `vitpipe submit --follow` shows
    print(json.dumps({
        "name": result.name, "run_id": result.run_id, "final_checkpoint": result.final_checkpoint,
        "checkpoint": result.checkpoint, "step": result.step,
        "train/loss": result.metrics.get("train/loss"),
        "registered": getattr(result.registered, "uri", None) if result.registered else None,
    }))
    return 0
