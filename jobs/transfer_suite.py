"""Ray job entrypoint of a transfer suite: `python -m jobs.transfer_suite DIR [--from MODEL_URI] [--set k=v ...]
[--max-concurrent N] [--name NAME] [--no-working-dir]`.

`vitpipe transfer-suite` on the cluster's driver (submitted with `vitpipe submit transfer-suite ...`): validates
every task config of DIR, submits one transfer job per task to its own cluster (the dashboard address is looked up
from the cluster), at most N at a time, under the suite's parent MLflow run, and logs the group and overall means
when all have ended. Exit codes: 0 every task succeeded, 1 a task failed (the others' means are logged), 2 bad input
(reported before any task's job started), 143 stopped (SIGTERM: the running tasks' jobs are stopped too).
"""

from __future__ import annotations

import sys

from pipeline.cli import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("transfer suite", ["transfer-suite", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
