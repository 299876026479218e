"""`vitpipe model list|info|convert`: the variant registry, one variant's size and compute, and weight import."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="list ViT variants, show one, convert foreign weights")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    ls = msub.add_parser("list", help="table of registered variants (params with a 1000-class head, forward GFLOPs at 224 px)")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ls.set_defaults(func=_list)

    info = msub.add_parser("info", help="architecture, parameters and FLOPs of one variant")
    info.add_argument("name")
    info.add_argument("--image-size", type=int, default=224)
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--classifier", choices=["token", "gap"], default="token")
    info.add_argument("--pre-logits", type=int, default=None, help="width of the tanh pre-logits layer")
    info.set_defaults(func=_info)

    conv = msub.add_parser(
        "convert", help="import timm / official JAX .npz / Hugging Face weights into a vitpipe checkpoint directory",
        description="IN is a .safetensors, .npz or .bin/.pt/.pth file (loaded without unpickling). The variant, "
        "image size, classifier and head are inferred from the weights' shapes unless given. A different "
        "--image-size resamples the position embedding; a different --num-classes replaces the head by a "
        "zero-initialised one (fine-tuning preparation).",
    )
    conv.add_argument("--source", choices=["timm", "npz", "hf"], required=True)
    conv.add_argument("input", metavar="IN")
    conv.add_argument("output", metavar="OUT", help="directory to write model.safetensors + model.json into")
    conv.add_argument("--name", help="variant name (default: inferred from the weights)")
    conv.add_argument("--image-size", type=int, help="target resolution (default: the checkpoint's)")
    conv.add_argument("--num-classes", type=int, help="target head size (default: the checkpoint's; 0 = no head)")
    conv.add_argument("--drop-pre-logits", action="store_true", help="drop the pre-logits layer (fine-tuning)")
    conv.set_defaults(func=_convert)


def _list(args: argparse.Namespace) -> int:
    from pipeline.model.flops import forward_flops, param_count
    from pipeline.model.variants import VARIANTS

    rows = []
    for name, v in VARIANTS.items():
        rows.append(dict(
            name=name, width=v.width, depth=v.depth, heads=v.heads, mlp=v.mlp_dim, patch=v.patch_size,
            params=param_count(name, 224), gflops_224=forward_flops(name, 224) / 1e9, timm=v.timm_name or "",
        ))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    head = f"{'name':<10} {'width':>5} {'depth':>5} {'heads':>5} {'mlp':>5} {'patch':>5} {'params':>9} " \
           f"{'GFLOPs@224':>10}  timm"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<10} {r['width']:>5} {r['depth']:>5} {r['heads']:>5} {r['mlp']:>5} {r['patch']:>5} "
              f"{r['params'] / 1e6:>8.2f}M {r['gflops_224']:>10.2f}  {r['timm']}")
    print("params with a 1000-class head and no pre-logits; GFLOPs = forward per image (1 MAC = 2 FLOPs), "
          "matrix products only; training = 3x")
    return 0


def _info(args: argparse.Namespace) -> int:
    from pipeline.model.config import ModelConfig, check_image_size
    from pipeline.model.flops import forward_flops, param_count
    from pipeline.model.variants import get_variant

    v = get_variant(args.name)
    check_image_size(args.image_size, args.name, "--image-size")  # before the config's own (pydantic-worded) error
    cfg = ModelConfig(name=args.name, image_size=args.image_size, num_classes=args.num_classes,
                      classifier=args.classifier, pre_logits=args.pre_logits)
    grid = cfg.image_size // v.patch_size
    fwd = forward_flops(cfg)
    lines = {
        "variant": args.name, "width": v.width, "depth": v.depth, "heads": v.heads, "head_dim": v.head_dim,
        "mlp": v.mlp_dim, "patch": v.patch_size, "image_size": cfg.image_size, "grid": f"{grid}x{grid}",
        "tokens": grid * grid + (cfg.classifier == "token"), "classifier": cfg.classifier,
        "pre_logits": cfg.pre_logits, "num_classes": cfg.num_classes, "params": f"{param_count(cfg):,}",
        "forward GFLOPs/image": f"{fwd / 1e9:.2f} ({fwd / 2e9:.2f} GMACs)",
        "training GFLOPs/image": f"{3 * fwd / 1e9:.2f}", "timm": v.timm_name or "-",
    }
    for k, val in lines.items():
        print(f"{k:<22} {val}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pipeline.model.checkpoint import save_checkpoint
    from pipeline.model.config import ModelConfig, check_image_size
    from pipeline.model.variants import get_variant
    from pipeline.model.weights import adapt_state_dict, convert_state_dict, infer_config, read_weights

    raw = read_weights(args.input)
    src_fields = {"name": args.name} if args.name else {}
    if args.name:
        get_variant(args.name)
    src_cfg = infer_config(raw, args.source, **src_fields)
    sd = convert_state_dict(raw, args.source, src_cfg)
    updates: dict = {}
    if args.image_size is not None:
        updates["image_size"] = args.image_size
    if args.num_classes is not None:
        updates["num_classes"] = args.num_classes
    if args.drop_pre_logits:
        updates["pre_logits"] = None
    check_image_size(updates.get("image_size", src_cfg.image_size), src_cfg.name, "--image-size")
    target = ModelConfig.model_validate({**src_cfg.model_dump(), **updates})
    sd = adapt_state_dict(sd, src_cfg, target)
    out = save_checkpoint(args.output, sd, target, extra={
        "converted_from": {"source": args.source, "file": str(args.input), "model": src_cfg.model_dump(mode="json")},
    })
    changes = []
    if target.image_size != src_cfg.image_size:
        changes.append(f"position embedding resampled {src_cfg.image_size}->{target.image_size} px")
    if target.num_classes != src_cfg.num_classes:
        changes.append(f"head replaced ({src_cfg.num_classes}->{target.num_classes} classes, zero-initialised)")
    if target.pre_logits != src_cfg.pre_logits:
        changes.append("pre-logits dropped")
    print(f"wrote {out} ({target.name}, {target.image_size} px, classifier={target.classifier}, "
          f"num_classes={target.num_classes}, pre_logits={target.pre_logits}, {len(sd)} tensors)"
          + ("; " + "; ".join(changes) if changes else ""))
    return 0
