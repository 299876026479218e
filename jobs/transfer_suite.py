"""Ray job entrypoint of a transfer suite: `python -m jobs.transfer_suite DIR [--from MODEL_URI] [--set k=v ...]
[--max-concurrent N] [--name NAME] [--no-working-dir]`.

Runs on the cluster's driver (submitted with `vitpipe submit transfer-suite ...`): validates every task config of
DIR, submits one transfer job per task to its own cluster (the dashboard address is looked up from the cluster),
at most N at a time, under the suite's parent MLflow run, and logs the group and overall means when all have
ended. Exit codes: 0 every task succeeded, 1 a task failed (the others' means are logged), 2 bad input (reported
before any task's job started), 143 stopped (SIGTERM: the running tasks' jobs are stopped too).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from pipeline.commands.transfer import add_suite_args, run_and_report_suite

    parser = argparse.ArgumentParser(prog="jobs.transfer_suite", description=__doc__.splitlines()[0])
    add_suite_args(parser)
    parser.add_argument("--address", default=None, help="Ray dashboard address (default: this job's cluster)")
    parser.add_argument("--no-working-dir", dest="working_dir", action="store_false")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.errors import ConfigError
    from pipeline.launch.submit import cluster_address, default_address
    from pipeline.transfer.suite import load_suite

    try:
        suite = load_suite(args.folder, args.overrides)
        address = args.address or default_address() or cluster_address()
        return run_and_report_suite(suite, args, address=address, prog="transfer suite")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"transfer suite: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
