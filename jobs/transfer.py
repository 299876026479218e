"""Ray job entrypoint of a transfer job: `python -m jobs.transfer CONFIG [--from MODEL_URI] [--set k=v ...]`.

`vitpipe transfer` on the cluster's driver (submitted with `vitpipe submit transfer ...`): resolves the registered
source model, checks everything, fine-tunes with the pretraining worker under Ray Train, evaluates, logs and
registers. Exit codes (pipeline.commands.run): 0 done, 2 bad input (one line, reported before any worker started),
143 stopped (SIGTERM), 1 failure during the run.
"""

from __future__ import annotations

import sys

from pipeline.cli import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("transfer job", ["transfer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
