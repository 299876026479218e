"""`vitpipe shards write|inspect|verify|dedup`: turn an image source into tar shards + manifest, look at them, check
them, and exclude the near-duplicates of downstream test images from a pretraining set. With `--ray`, the writer and
de-duplication get pipeline.launch.fanout's `ray_map` as their `map`. The data modules (numpy, fsspec, pydantic, ...)
are imported inside the commands, so that `vitpipe --help` stays fast."""

from __future__ import annotations

import argparse
import functools
import json
import logging

import yaml

from pipeline.data.maps import local_map
from pipeline.launch.fanout import connect_ray, ray_map

__all__ = ["register", "add_storage_args", "add_write_args", "storage_from_args", "run_write", "run_dedup",
           "run_write_job", "yaml_to_argv"]

log = logging.getLogger(__name__)


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage (credentials come from the standard AWS environment / profiles)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
    g.add_argument("--region", help="S3 region (default: $AWS_DEFAULT_REGION / profile)")
    g.add_argument("--profile", help="AWS profile name")
    g.add_argument("--anon", action="store_true", help="anonymous (unsigned) access")


def storage_from_args(args: argparse.Namespace):
    from pipeline.data.config import StorageConfig

    return StorageConfig(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile, anon=args.anon)


def add_write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="ImageFolder dir, IDX images file (with --labels), or a .csv/.parquet/.jsonl table")
    p.add_argument("dest", help="destination folder URL (s3://bucket/ds/train or a local dir)")
    p.add_argument("--labels", help="IDX labels file (for an IDX images source)")
    p.add_argument("--kind", default="auto", choices=["auto", "imagefolder", "idx", "table"])
    p.add_argument("--name", default="dataset", help="dataset name recorded in the manifest")
    p.add_argument("--split", default="train")
    p.add_argument("--prefix", help="shard file prefix (default: the split)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="samples per shard")
    size.add_argument("--shard-bytes", type=float, default=1e9, help="target shard size in bytes (default 1e9)")
    p.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this (JPEG)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG")
    p.add_argument("--raw-format", default="png", choices=["png", "jpg"], help="encoding of raw pixels (IDX)")
    p.add_argument("--class-names", help="comma-separated class names (default: folder names / label values)")
    p.add_argument("--ray", action="store_true", help="write shards in parallel as Ray tasks")
    p.add_argument("--ray-tasks", type=int, help="number of Ray tasks (default: 2 x cluster CPUs)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard what DEST holds (a manifest, an interrupted write's records) and write afresh; "
                   "without it an interrupted write is resumed and a complete one left as it is")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write, inspect and verify WebDataset tar shards")
    ssub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    w = ssub.add_parser("write", help="write a source as tar shards + manifest.json (written last, atomically); "
                        "run again with the same arguments, it resumes an interrupted write")
    add_write_args(w)
    w.set_defaults(func=run_write)
    i = ssub.add_parser("inspect", help="summarise a dataset (manifest URL or 'pattern|N') and show a few samples")
    i.add_argument("dataset")
    i.add_argument("--samples", type=int, default=3, help="samples of the first shard to list")
    add_storage_args(i)
    i.set_defaults(func=_inspect)
    v = ssub.add_parser("verify", help="check every shard's size, sha256 and sample count against the manifest")
    v.add_argument("dataset")
    v.add_argument("--no-count", action="store_true", help="skip counting samples (checksums only)")
    add_storage_args(v)
    v.set_defaults(func=_verify)
    d = ssub.add_parser("dedup", help="find the near-duplicates of downstream test images in a pretraining dataset "
                        "and write its exclusion list (exclude.json next to the manifest; the loader skips them)")
    d.add_argument("dataset", help="pretraining dataset: manifest URL (or the folder holding it)")
    d.add_argument("--against", nargs="+", required=True, metavar="TEST_MANIFEST",
                   help="downstream test sets (manifest URLs or 'pattern|N'); name them all in one run: a rerun "
                   "replaces the list")
    d.add_argument("--threshold", type=int,
                   help="Hamming distance in bits of the 256-bit pHash (default 32; see pipeline/data/dedup.py)")
    d.add_argument("--ray", action="store_true", help="hash and scan the shards as Ray tasks (one per shard)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_args(d)
    d.set_defaults(func=run_dedup)


def run_write(args: argparse.Namespace) -> int:
    from pipeline.data.samples import EncodeOptions
    from pipeline.data.sources import open_source
    from pipeline.data.writer import write_shards

    storage = storage_from_args(args)
    class_names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    source = open_source(args.source, labels=args.labels, kind=args.kind, class_names=class_names, storage=storage)
    encode = EncodeOptions(max_side=args.max_side, quality=args.quality, reencode=args.reencode,
                           raw_format=args.raw_format)
    url = write_shards(source, args.dest, name=args.name, split=args.split, prefix=args.prefix,
                       samples_per_shard=args.samples_per_shard, shard_bytes=int(args.shard_bytes), encode=encode,
                       storage=storage, map=_write_map(args), progress=not args.no_progress, overwrite=args.overwrite)
    print(url)
    return 0


def _write_map(args: argparse.Namespace):
    """`--ray`: the shards dealt into --ray-tasks tasks (default, and with 0: 2 x the cluster's CPUs); else None, the
    writer's own loop here."""
    if not args.ray:
        return None
    return functools.partial(ray_map, max_tasks=args.ray_tasks or None, per_cpu=2)


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.data.manifest import load_dataset_spec
    from pipeline.data.samples import iter_tar_samples
    from pipeline.data.storage import Storage, open_url

    storage = storage_from_args(args)
    m = load_dataset_spec(args.dataset, Storage(storage))
    summary = {"url": m.url, "name": m.name, "split": m.split, "shards": m.num_shards, "samples": m.num_samples,
               "label_type": m.label_type, "num_classes": m.num_classes,
               "class_names": (m.class_names or [])[:20], "bytes_per_sample": m.bytes_per_sample,
               "first_shard": m.shards[0], "last_shard": m.shards[-1]}
    print(json.dumps(summary, indent=1))
    if args.samples > 0:
        with open_url(m.shards[0], "rb", storage) as f:
            for s in iter_tar_samples(f, take=args.samples):
                parts = {k: (len(v) if k not in ("cls", "json", "labels.json") else v.decode()[:120])
                         for k, v in s.items() if k != "__key__"}
                print(f"{s['__key__']}: {parts}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.data.verify import verify_shards

    problems = verify_shards(args.dataset, storage_from_args(args), count_samples=not args.no_count)
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print(f"{len(problems)} problem(s) in {args.dataset}")
        return 1
    print(f"ok  {args.dataset}")
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    from pipeline.data.dedup import DEFAULT_THRESHOLD, dedup

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    out = dedup(args.dataset, args.against, storage_from_args(args), threshold=threshold,
                map=ray_map if args.ray else local_map, progress=not args.no_progress)
    for t in out["against"]:
        print(f"{t['url']}: {t['images']} test images, {t['excluded']} pretraining samples matched"
              + (f" ({t['unreadable_images']} undecodable test images)" if t["unreadable_images"] else ""))
    scanned = out["scanned"]
    print(f"{out['num_excluded']} of {scanned['samples']} samples in {scanned['shards']} shards excluded"
          + (f" ({scanned['unreadable_images']} undecodable, left to the loader)" if scanned["unreadable_images"]
             else ""))
    print(out["url"])
    return 0


def run_write_job(argv: list[str]) -> int:
    """`python -m jobs.make_shards ARGS | JOB.yaml` (a Ray job): `shards write` ARGS, the shards written by Ray tasks on
    the cluster the job runs on ($RAY_ADDRESS), or on a local Ray of --num-cpus bound to 127.0.0.1. JOB.yaml holds
    the same options as a mapping (`yaml_to_argv`)."""
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_to_argv(argv[0])
    parser = argparse.ArgumentParser(prog="jobs.make_shards", description="write tar shards as Ray tasks")
    add_write_args(parser)
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored with $RAY_ADDRESS)")
    args = parser.parse_args(argv)
    args.ray = True
    connect_ray(num_cpus=args.num_cpus)  # $RAY_ADDRESS, else a local Ray on 127.0.0.1
    return run_write(args)


def yaml_to_argv(path: str) -> list[str]:
    """A YAML mapping of `vitpipe shards write` options -> argv (positional source/dest first)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or "source" not in data or "dest" not in data:
        raise ValueError(f"{path}: expected a mapping with at least 'source' and 'dest'")
    argv = [str(data.pop("source")), str(data.pop("dest"))]
    for key, value in data.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv
