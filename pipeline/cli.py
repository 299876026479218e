"""`vitpipe`: the command line. Thin: parse arguments, load the config, call the library.

Each area registers its own subcommands from `pipeline/commands/<area>.py` (a `register(subparsers)` function);
heavy imports (torch, ray, mlflow, deepspeed) happen inside the command, not here, so `--help` stays fast. The Ray
job entrypoints (jobs/*.py) run the same commands through `job_main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from pipeline import __version__
from pipeline.commands.run import configure_logging, run_command
from pipeline.tracking.console import quiet_console

__all__ = ["main", "job_main", "build_parser"]

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
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    args.prog = f"vitpipe {args.command}"  # what its one-line messages start with (the command's own ones too)
    func = args.func
    if args.command in _RAY_DRIVERS and not args.verbose:
        func = _quietly(func)
    return run_command(func, args, args.prog)


def job_main(prog: str, argv: list[str]) -> int:
    """The body of a Ray job entrypoint (jobs/*.py): `argv` is a `vitpipe` command line (`["pretrain", CONFIG,
    ...]`), parsed by the same parser and run by the same command as `vitpipe` runs it, its errors mapped to the
    same exit codes (pipeline.commands.run) and reported as `PROG: message`, the job's last line. Nothing is
    filtered: the job's output is Ray's log of it."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    args.prog = prog
    return run_command(args.func, args, prog)


def _quietly(func: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int | None]:
    """`func` with this terminal's copy of what Ray forwards cleared of its noise (the streams are restored before
    run_command prints an error)."""

    def run(args: argparse.Namespace) -> int | None:
        with quiet_console():
            return func(args)

    return run


if __name__ == "__main__":
    sys.exit(main())
