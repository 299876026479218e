"""`vitpipe`: the command line. Thin: parse arguments, load the config, call the library.

Each area registers its own subcommands from `pipeline/commands/<area>.py` (a `register(subparsers)` function);
heavy imports (torch, ray, mlflow, deepspeed) happen inside the command, not here, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline import __version__
from pipeline.errors import ConfigError, RunStopped
from pipeline.tracking.console import quiet_console

__all__ = ["main", "build_parser"]

# Order = order in `vitpipe --help`. A module that is not there yet is skipped.
_COMMAND_MODULES = (
    "config", "model", "shards", "pretrain", "transfer", "registry", "submit", "jobs", "stack", "plan", "demo",
)
# Commands that drive Ray from this process: what Ray forwards from workers is shown without its known-harmless
# noise (pipeline.tracking.console.NOISE) unless -v; Ray's log files keep every line.
_RAY_DRIVERS = {"pretrain", "transfer", "transfer-suite", "demo"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpipe",
        description="Distributed ViT pretraining and transfer: WebDataset shards on object storage, "
        "DeepSpeed ZeRO workers under Ray Train, MLflow tracking and model registry.",
    )
    parser.add_argument("--version", action="version", version=f"vitpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and every line Ray forwards (by default its known-harmless noise is "
                             "dropped from what you see)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pipeline.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"pipeline.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command in _RAY_DRIVERS and not args.verbose:
            with quiet_console():
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"vitpipe {args.command}: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"vitpipe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except RunStopped as e:  # SIGTERM: every rank committed a checkpoint at the same step
        print(f"vitpipe {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `vitpipe model list | head`: the reader went away; not an error of ours
        sys.stdout = None
        return 0
    except Exception as e:
        # An unreachable or refusing tracking server / object store is explained in one line, not a traceback
        # (matched by module: neither mlflow nor botocore is imported here).
        hint = _SERVICE_HINTS.get(type(e).__module__.split(".")[0])
        if args.verbose or hint is None:
            raise
        print(f"vitpipe {args.command}: error: {type(e).__name__}: {e} ({hint})", file=sys.stderr)
        return 2


_SERVICE_HINTS = {
    "mlflow": "check the tracking URI: tracking.tracking_uri, --tracking-uri or $MLFLOW_TRACKING_URI",
    "botocore": "check storage.endpoint_url / $AWS_ENDPOINT_URL and the credentials",
}


if __name__ == "__main__":
    sys.exit(main())
