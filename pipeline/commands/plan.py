"""`vitpipe plan CONFIG`: compute, memory, wall time and input bandwidth of a pretraining run, by arithmetic."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from pipeline.commands import add_config_args

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="estimate FLOPs, memory, wall time and input bandwidth of a pretraining config")
    add_config_args(p)
    p.add_argument("--gpus", type=int, default=None,
                   help="number of GPUs (default: scaling.num_workers, its max when elastic)")
    p.add_argument("--gpu-type", default="h100", help="h100 | h100-pcie | h200 | a100 | l40s | ... (16-bit dense peak; pipeline.train.throughput.GPUS)")
    p.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--num-samples", type=int, default=None, help="dataset size (default: read from the manifest)")
    p.add_argument("--bytes-per-sample", type=float, default=None, help="mean stored bytes per sample")
    p.add_argument("--decode-rate", type=float, default=None,
                   help="images/s one CPU core decodes + augments (default: 934, measured by benchmarks/loader.py)")
    p.add_argument("--no-manifest", action="store_true", help="do not read the dataset manifest")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from pipeline.capacity import format_plan, make_plan
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    num_samples, bytes_per_sample = args.num_samples, args.bytes_per_sample
    if not args.no_manifest and (num_samples is None or bytes_per_sample is None):
        num_samples, bytes_per_sample = _from_dataset(cfg, num_samples, bytes_per_sample)
    plan = make_plan(
        cfg,
        gpus=args.gpus if args.gpus is not None else cfg.scaling.max_workers,
        gpu_type=args.gpu_type,
        mfu=args.mfu,
        num_samples=num_samples,
        bytes_per_sample=bytes_per_sample,
        **({} if args.decode_rate is None else {"decode_rate": args.decode_rate}),
    )
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0


def _from_dataset(cfg, num_samples, bytes_per_sample):
    """Sample count from the brace pattern's `|N` suffix without I/O; the manifest (if reachable) for the rest."""
    spec = cfg.data.train
    if "|" in spec and num_samples is None:
        num_samples = int(spec.rsplit("|", 1)[1])
    if num_samples is not None and bytes_per_sample is not None:
        return num_samples, bytes_per_sample
    try:
        from pipeline.data.manifest import load_dataset_spec
        from pipeline.data.storage import Storage

        m = load_dataset_spec(spec, Storage(cfg.storage))
    except Exception as e:  # planning works offline; the dataset is optional
        print(f"note: dataset {spec} not read ({type(e).__name__}); give --num-samples/--bytes-per-sample")
        return num_samples, bytes_per_sample
    return num_samples or m.num_samples, bytes_per_sample or getattr(m, "bytes_per_sample", None)
