"""Ray job entrypoint that writes tar shards in parallel: `python -m jobs.make_shards ARGS` or `... JOB.yaml`.

ARGS are those of `vitpipe shards write` (SOURCE DEST [--labels ...] [--samples-per-shard N] ...); a YAML file
instead holds the same options as a mapping (`source:`, `dest:`, `samples_per_shard:`, ...). Shard groups are
written by Ray tasks on the cluster this job runs on ($RAY_ADDRESS), or on a local Ray bound to 127.0.0.1
(`--num-cpus N`). Submitted again with the same arguments after a failure, it resumes: the shards already finished
(and verified) are kept, only the missing ones become tasks (see `write_shards`); other arguments are refused unless
`--overwrite`. Exit codes: 0 done (prints the manifest URL), 2 bad input (reported before any task started), 1
failure.
"""

from __future__ import annotations

import sys

from pipeline.commands.run import configure_logging, run_command
from pipeline.commands.shards import run_write_job


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    return run_command(run_write_job, list(sys.argv[1:] if argv is None else argv), "make_shards job")


if __name__ == "__main__":
    sys.exit(main())
