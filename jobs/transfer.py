"""Ray job entrypoint of a transfer job: `python -m jobs.transfer CONFIG [--from MODEL_URI] [--set k=v ...]`.

Runs on the cluster's driver (submitted with `vitpipe submit transfer ...`): resolves the registered source model,
checks everything, fine-tunes with the pretraining worker under Ray Train, evaluates, logs and registers.
Exit codes: 0 done, 2 bad input (reported before any worker started), 143 stopped (SIGTERM), 1 failure during
the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.transfer", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="+", help="YAML config file(s)")
    parser.add_argument("--from", dest="source", default=None, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.config import load_config
    from pipeline.errors import ConfigError, RunStopped
    from pipeline.transfer.config import TransferRunConfig
    from pipeline.transfer.runner import run_transfer

    try:
        cfg = load_config(args.config, args.overrides, TransferRunConfig)
        result = run_transfer(cfg, source=args.source, workdir=args.workdir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"transfer job: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"transfer job: {e}", file=sys.stderr)
        return e.exit_code
    summary = {"run_id": result.run_id, "metrics": result.metrics, "artifacts": result.artifacts,
               "registered": result.registered.uri if result.registered else None}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
