"""Ray job entrypoint of a pretraining run: `python -m jobs.pretrain CONFIG... [--set k=v ...] [--resume]`.

Runs on the cluster's driver (submitted with `vitpipe submit pretrain ...`, which connects through $RAY_ADDRESS):
checks the config, trains with DeepSpeed workers under Ray Train, exports the final model to
<storage>/<name>/final and logs it to MLflow. Exit codes: 0 done, 2 bad input (reported before any worker
started), 143 stopped (SIGTERM, `vitpipe jobs stop`: every rank committed a checkpoint at the same step; submit
again with --resume), 1 failure during the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="+", help="YAML config file(s)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.config import RunConfig, load_config
    from pipeline.errors import ConfigError, RunStopped
    from pipeline.pretrain import run_pretraining

    try:
        cfg = load_config(args.config, args.overrides, RunConfig)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"pretrain job: {e}", file=sys.stderr)
        return 2
    try:
        result = run_pretraining(cfg, resume=args.resume)
    except ConfigError as e:  # preflight: nothing started
        print(f"pretrain job: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"pretrain job: {e}", file=sys.stderr)
        return e.exit_code
    # the job's result on one line: it ends what `vitpipe submit --follow` shows
    print(json.dumps({"name": result.name, "run_id": result.run_id, "final_checkpoint": result.final_checkpoint,
                      "step": result.step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
