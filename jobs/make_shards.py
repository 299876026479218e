"""Ray job entrypoint that writes tar shards in parallel: `python -m jobs.make_shards ARGS` or `... JOB.yaml`.

ARGS are those of `vitpipe shards write` (SOURCE DEST [--labels ...] [--samples-per-shard N] ...); a YAML file
instead holds the same options as a mapping (`source:`, `dest:`, `samples_per_shard:`, ...). Shard groups are
written by Ray tasks on the cluster this job runs on ($RAY_ADDRESS), or on a local Ray bound to 127.0.0.1.
Submitted again with the same arguments after a failure, it resumes: the shards already finished (and verified) are
kept, only the missing ones become tasks (see `write_shards`); other arguments are refused unless `--overwrite`.
Exit codes: 0 done (prints the manifest URL), 2 bad input (reported before any task started), 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.commands.shards import add_write_args, run_write
    from pipeline.launch.fanout import connect_ray

    parser = argparse.ArgumentParser(prog="jobs.make_shards", description=__doc__.splitlines()[0])
    add_write_args(parser)
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored with $RAY_ADDRESS)")
    try:
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            argv = yaml_to_argv(argv[0])
        args = parser.parse_args(argv)
        args.ray = True
        connect_ray(num_cpus=args.num_cpus)  # $RAY_ADDRESS, else a local Ray on 127.0.0.1
        return run_write(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"make_shards job: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
