"""`vitpipe registry list|show|alias|import`: the MLflow model registry of our checkpoints."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list, inspect, alias and import registered models (MLflow registry)")
    uri_help = "MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow.db"
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    rsub = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a = rsub.add_parser(name, help=help)
        # also after the action (`registry show NAME --tracking-uri URI`), as users type it
        a.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=uri_help)
        return a

    ls = action("list", "registered models with their latest version and aliases")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
    show = action("show", "a model's versions: description, aliases, lineage chain back to the pretraining data, tags")
    show.add_argument("name", help="registered model name (`vitpipe registry list`)")
    show.add_argument("--json", action="store_true", help="the same as JSON (each version's lineage under \"lineage\")")
    show.set_defaults(func=_show)
    alias = action("alias", "point ALIAS at VERSION of NAME")
    alias.add_argument("name")
    alias.add_argument("version")
    alias.add_argument("alias")
    alias.set_defaults(func=_alias)
    imp = action("import", "register externally pretrained weights (converted to our checkpoint)")
    imp.add_argument("--source", required=True, choices=["timm", "npz", "hf"], help="layout of the weights file")
    imp.add_argument("file", help=".safetensors, .npz, .bin/.pt/.pth (never unpickled)")
    imp.add_argument("name", help="registered model name")
    imp.add_argument("--variant", default=None, help="ViT variant (default: inferred from the weights)")
    imp.add_argument("--image-size", type=int, default=None, help="resolution the weights were trained at")
    imp.add_argument("--alias", default=None, help="alias to set on the new version")
    imp.add_argument("--experiment", default="vit-import")
    imp.add_argument("--normalize", choices=["inception", "imagenet"], default="inception",
                     help="input normalisation the weights expect (default inception: pixels scaled to [-1, 1], "
                          "as big_vision, timm and HF ViTs use)")
    imp.set_defaults(func=_import)


def _list(args: argparse.Namespace) -> int:
    from pipeline.tracking.registry import list_models

    models = list_models(args.tracking_uri)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no registered models")
        return 0
    print(f"{'NAME':40} {'LATEST':>6} {'VERSIONS':>8}  ALIASES")
    for m in models:
        aliases = " ".join(f"@{a}={v}" for a, v in sorted(m["aliases"].items()))
        print(f"{m['name']:40} {m['latest_version'] or '-':>6} {m['versions']:>8}  {aliases}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from pipeline.tracking.registry import describe_model

    info = describe_model(args.name, args.tracking_uri)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(info["aliases"].items())) or "(none)"
    print(f"{info['name']}  aliases: {aliases}")
    for v in info["versions"]:
        print(f"  version {v['version']}  run {v['run_id']}  source {v['source']}"
              + (f"  aliases {' '.join('@' + a for a in v['aliases'])}" if v["aliases"] else ""))
        if v["description"]:
            print(f"    {v['description']}")
        print("    lineage:")
        for depth, link in enumerate(v["lineage"]):
            arrow = "  " + "  " * depth + ("<- " if depth else "")
            if link.get("missing"):
                print(f"    {arrow}{link['uri']} (no longer registered)")
                continue
            steps = f", {link['steps']} steps" if link["steps"] else ""
            print(f"    {arrow}{link['uri']}  run {link['run_id']}{steps}  data {link['dataset.url']} "
                  f"(checksum {link['dataset.checksum']})")
        print("    tags:")
        for k, val in sorted(v["tags"].items()):
            print(f"      {k} = {val}")
    return 0


def _alias(args: argparse.Namespace) -> int:
    from pipeline.tracking.registry import set_alias

    v = set_alias(args.name, args.version, args.alias, args.tracking_uri)
    print(f"models:/{v.name}@{args.alias} -> version {v.version}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from pipeline.lineage import import_weights

    model_cfg = None
    if args.variant or args.image_size:
        from pipeline.model.weights import infer_config, read_weights

        inferred = infer_config(read_weights(args.file), args.source)
        fields = {k: v for k, v in (("name", args.variant), ("image_size", args.image_size)) if v}
        model_cfg = inferred.model_copy(update=fields)
    v = import_weights(
        args.file, args.name, source=args.source, model_cfg=model_cfg, tracking_uri=args.tracking_uri,
        experiment=args.experiment, alias=args.alias, normalize=args.normalize,
    )
    print(f"registered {v.uri} from {args.file} (run {v.run_id})")
    return 0
