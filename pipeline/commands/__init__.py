"""Subcommands of `vitpipe`, one module per area, each exposing `register(subparsers)`. The demo_*.py modules are
`vitpipe demo`'s steps, not subcommands: an example built on the library's public calls."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_config_args", "reported_cluster_errors"]


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The config arguments shared by every command that runs something: CONFIG [CONFIG...] --set k=v ..."""
    p.add_argument("config", nargs="+", help="YAML config file(s); later files extend earlier ones")
    p.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="dotted overrides, e.g. --set train.optim.lr=3e-4 model.name=vit_b16",
    )


def reported_cluster_errors(fn):
    """Wraps a cluster command: an unreachable or refusing cluster is explained in one line (exit 2), not a
    traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except Exception as e:  # noqa: BLE001 - ray's AuthenticationError is imported lazily, matched by name
            if getattr(args, "verbose", False) or not (
                isinstance(e, (ConnectionError, RuntimeError)) or type(e).__name__ == "AuthenticationError"
            ):
                raise
            print(f"vitpipe {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2

    return run
