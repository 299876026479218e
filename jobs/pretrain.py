"""Ray job entrypoint of a pretraining run: `python -m jobs.pretrain CONFIG... [--set k=v ...] [--resume]`.

`vitpipe pretrain` on the cluster's driver (submitted with `vitpipe submit pretrain ...`; Ray sets $RAY_ADDRESS):
checks the config, trains with DeepSpeed workers under Ray Train, exports the final model to
<storage>/<name>/final and logs it to MLflow. Exit codes (pipeline.commands.run): 0 done, 2 bad input (one line,
reported before any worker started), 143 stopped (SIGTERM, `vitpipe jobs stop`: every rank committed a checkpoint
at the same step; submit again with --resume), 1 failure during the run.
"""

from __future__ import annotations

import sys

from pipeline.cli import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("pretrain job", ["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
