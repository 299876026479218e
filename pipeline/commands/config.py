"""`vitpipe config show|validate`: print or check a resolved config."""

from __future__ import annotations

import argparse
import json

import yaml

from pipeline.commands import add_config_args
from pipeline.config import RunConfig, config_class, load_config

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or validate configs")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config (bases merged, overrides applied, defaults filled)")
    add_config_args(show)
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(func=_show)
    schema = csub.add_parser("schema", help="print the JSON schema of the config (every key, type and default)")
    schema.add_argument("--kind", choices=["pretrain", "transfer"], default="pretrain")
    schema.set_defaults(func=_schema)
    ref = csub.add_parser("reference", help="print the Markdown configuration reference (docs/CONFIG.md)")
    ref.set_defaults(func=_reference)
    val = csub.add_parser("validate", help="validate config files; exit 2 on the first invalid one")
    val.add_argument("config", nargs="+")
    val.set_defaults(func=_validate)


def _show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, config_class(args.config))
    data = cfg.model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _schema(args: argparse.Namespace) -> int:
    if args.kind == "transfer":
        from pipeline.transfer.config import TransferRunConfig as cls
    else:
        cls = RunConfig
    print(json.dumps(cls.model_json_schema(), indent=2))
    return 0


def _reference(args: argparse.Namespace) -> int:
    from pipeline.reference import config_reference

    print(config_reference(), end="")
    return 0


def _validate(args: argparse.Namespace) -> int:
    for path in args.config:
        load_config([path], (), config_class([path]))
        print(f"ok  {path}")
    return 0
