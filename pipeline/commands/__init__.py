"""Subcommands of `vitpipe`, one module per area, each exposing `register(subparsers)`; how a command ends (its exit
code) is decided in one place, `pipeline.commands.run`. The demo_*.py modules are `vitpipe demo`'s steps, not
subcommands: an example built on the library's public calls."""

from __future__ import annotations

import argparse

__all__ = ["add_config_args"]


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The config arguments shared by every command that runs something: CONFIG [CONFIG...] --set k=v ..."""
    p.add_argument("config", nargs="+", help="YAML config file(s); later files extend earlier ones")
    p.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="dotted overrides, e.g. --set train.optim.lr=3e-4 model.name=vit_b16",
    )

