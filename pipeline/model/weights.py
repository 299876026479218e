"""Foreign weights as pure `state_dict -> state_dict` functions with an explicit `source=`.

Sources (and export targets):
  timm  timm's `VisionTransformer` (`class_token=False, global_pool="avg", fc_norm=False` for our "gap"); old timm
        checkpoints' `pre_logits.fc.*` map to our pre-logits layer.
  npz   the official JAX release of the original ViT (`embedding/kernel`, `cls`,
        `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/kernel`, `.../MlpBlock_3/Dense_0/...`,
        `pre_logits/kernel`, `head/kernel`), optionally under `opt/target/` or `params/`.
  hf    Hugging Face `ViTForImageClassification` (`vit.embeddings...`, `vit.encoder.layer.{i}...`, `classifier`);
        a bare `ViTModel` (no `vit.` prefix) imports too, its `pooler.dense` being the pre-logits layer.

Every key and shape is checked against what the target `ModelConfig` needs before anything is converted; a
missing, unexpected or wrongly shaped key is a `ValueError` naming it. The rules below are written once per
source as (our key, their keys, import, export), so export is the exact inverse of import.
"""

from __future__ import annotations

import functools
import math
import pickle
import re
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.model.config import ModelConfig
from pipeline.model.posembed import resample_pos_embed
from pipeline.model.variants import VARIANTS, get_variant
from pipeline.model.vit import VisionTransformer

__all__ = [
    "SOURCES", "convert_state_dict", "export_state_dict", "expected_shapes", "check_state_dict",
    "infer_config", "adapt_state_dict", "read_weights", "load_safetensors", "save_npz",
]

Source = Literal["timm", "npz", "hf"]
SOURCES: tuple[str, ...] = ("timm", "npz", "hf")
StateDict = dict[str, torch.Tensor]

_T = torch.Tensor
# (our key, their keys, theirs -> ours, ours -> theirs)
_Rule = tuple[str, tuple[str, ...], Callable[[list[_T]], _T], Callable[[_T], list[_T]]]


def _same(ours: str, theirs: str) -> _Rule:
    return ours, (theirs,), lambda ts: ts[0], lambda t: [t]


def _linear(ours: str, theirs: str) -> _Rule:  # JAX Dense kernel [in, out] <-> torch Linear weight [out, in]
    return ours, (theirs,), lambda ts: ts[0].T, lambda t: [t.T]


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter name and shape `build_model(cfg)` has (built on the meta device: no memory, fast)."""
    return dict(_expected_shapes(cfg.name, cfg.image_size, cfg.in_chans, cfg.num_classes, cfg.classifier,
                                 cfg.pre_logits))


@functools.lru_cache(maxsize=64)
def _expected_shapes(name, image_size, in_chans, num_classes, classifier, pre_logits) -> dict[str, torch.Size]:
    cfg = ModelConfig(name=name, image_size=image_size, in_chans=in_chans, num_classes=num_classes,
                      classifier=classifier, pre_logits=pre_logits)
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _rules(source: str, cfg: ModelConfig) -> list[_Rule]:
    v = get_variant(cfg.name)
    d, h, hd = v.width, v.heads, v.head_dim
    token = cfg.classifier == "token"
    rules: list[_Rule] = []
    if source == "timm":
        return [_same(k, k) for k in expected_shapes(cfg)]
    if source == "npz":
        rules += [
            ("patch_embed.proj.weight", ("embedding/kernel",),
             lambda ts: ts[0].permute(3, 2, 0, 1), lambda t: [t.permute(2, 3, 1, 0)]),
            _same("patch_embed.proj.bias", "embedding/bias"),
            _same("pos_embed", "Transformer/posembed_input/pos_embedding"),
        ]
        if token:
            rules.append(_same("cls_token", "cls"))
        for i in range(v.depth):
            b, o = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
            mha = o + "MultiHeadDotProductAttention_1/"
            qkv = tuple(f"{mha}{n}/" for n in ("query", "key", "value"))
            rules += [
                _same(b + "norm1.weight", o + "LayerNorm_0/scale"),
                _same(b + "norm1.bias", o + "LayerNorm_0/bias"),
                (b + "attn.qkv.weight", tuple(p + "kernel" for p in qkv),
                 lambda ts: torch.cat([t.reshape(d, d).T for t in ts]),
                 lambda t: [c.T.reshape(d, h, hd) for c in t.chunk(3)]),
                (b + "attn.qkv.bias", tuple(p + "bias" for p in qkv),
                 lambda ts: torch.cat([t.reshape(d) for t in ts]),
                 lambda t: [c.reshape(h, hd) for c in t.chunk(3)]),
                (b + "attn.proj.weight", (mha + "out/kernel",),
                 lambda ts: ts[0].reshape(d, d).T, lambda t: [t.T.reshape(h, hd, d)]),
                _same(b + "attn.proj.bias", mha + "out/bias"),
                _same(b + "norm2.weight", o + "LayerNorm_2/scale"),
                _same(b + "norm2.bias", o + "LayerNorm_2/bias"),
                _linear(b + "mlp.fc1.weight", o + "MlpBlock_3/Dense_0/kernel"),
                _same(b + "mlp.fc1.bias", o + "MlpBlock_3/Dense_0/bias"),
                _linear(b + "mlp.fc2.weight", o + "MlpBlock_3/Dense_1/kernel"),
                _same(b + "mlp.fc2.bias", o + "MlpBlock_3/Dense_1/bias"),
            ]
        rules += [_same("norm.weight", "Transformer/encoder_norm/scale"),
                  _same("norm.bias", "Transformer/encoder_norm/bias")]
        if cfg.pre_logits:
            rules += [_linear("pre_logits.fc.weight", "pre_logits/kernel"), _same("pre_logits.fc.bias", "pre_logits/bias")]
        if cfg.num_classes:
            rules += [_linear("head.weight", "head/kernel"), _same("head.bias", "head/bias")]
        return rules
    if source == "hf":
        if not token:
            raise ValueError("Hugging Face ViT always has a [class] token; classifier='gap' has no hf layout")
        e = "vit.embeddings."
        rules += [
            _same("patch_embed.proj.weight", e + "patch_embeddings.projection.weight"),
            _same("patch_embed.proj.bias", e + "patch_embeddings.projection.bias"),
            _same("cls_token", e + "cls_token"),
            _same("pos_embed", e + "position_embeddings"),
        ]
        for i in range(v.depth):
            b, o = f"blocks.{i}.", f"vit.encoder.layer.{i}."
            att = o + "attention.attention."
            for kind in ("weight", "bias"):
                rules += [
                    (b + f"attn.qkv.{kind}", tuple(f"{att}{n}.{kind}" for n in ("query", "key", "value")),
                     lambda ts: torch.cat(ts), lambda t: list(t.chunk(3))),
                    _same(b + f"norm1.{kind}", o + f"layernorm_before.{kind}"),
                    _same(b + f"attn.proj.{kind}", o + f"attention.output.dense.{kind}"),
                    _same(b + f"norm2.{kind}", o + f"layernorm_after.{kind}"),
                    _same(b + f"mlp.fc1.{kind}", o + f"intermediate.dense.{kind}"),
                    _same(b + f"mlp.fc2.{kind}", o + f"output.dense.{kind}"),
                ]
        rules += [_same("norm.weight", "vit.layernorm.weight"), _same("norm.bias", "vit.layernorm.bias")]
        if cfg.pre_logits:
            rules += [_same(f"pre_logits.fc.{k}", f"vit.pooler.dense.{k}") for k in ("weight", "bias")]
        if cfg.num_classes:
            rules += [_same(f"head.{k}", f"classifier.{k}") for k in ("weight", "bias")]
        return rules
    raise ValueError(f"unknown weights source {source!r}; expected one of {', '.join(SOURCES)}")


_HINTS = {
    "fc_norm.": "timm model pools with fc_norm; our 'gap' applies the final norm before pooling "
                "(timm: class_token=False, global_pool='avg', fc_norm=False)",
    "reg_token": "register tokens are not part of the paper's ViT",
    "norm_pre.": "a pre-encoder norm (CLIP-style) is not part of the paper's ViT",
    "attn.q_norm.": "qk-norm is not part of the paper's ViT",
    "ls1.": "layer scale is not part of the paper's ViT",
    "cls_token": "the checkpoint has a [class] token but the config says classifier='gap'",
    "cls": "the checkpoint has a [class] token but the config says classifier='gap'",
    "pre_logits": "the checkpoint has a pre-logits layer; set pre_logits to its width or drop it explicitly",
    "pooler.": "the checkpoint has a pooler (pre-logits) layer; set pre_logits to its width",
}


def _normalise_keys(sd: dict, source: str) -> dict:
    """Strip the wrappers a source's files come in: npz `opt/target/` or `params/`, HF without `vit.`."""
    if source == "npz":
        for prefix in ("opt/target/", "params/"):
            if "embedding/kernel" not in sd and f"{prefix}embedding/kernel" in sd:
                return {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
    if source == "hf" and not any(k.startswith("vit.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        return {(k if k.startswith("classifier.") else "vit." + k): t for k, t in sd.items()}
    if source == "timm" and sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        return {k.removeprefix("module."): t for k, t in sd.items()}
    return sd


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _check(theirs: dict, want: dict[str, torch.Size], source: str, cfg: ModelConfig) -> None:
    missing = [k for k in want if k not in theirs]
    unexpected = [k for k in theirs if k not in want]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for k in unexpected[:8]:
        hint = next((h for p, h in _HINTS.items() if p in k), None)
        problems.append(f"unexpected key {k!r}" + (f" ({hint})" if hint else ""))
    if len(unexpected) > 8:
        problems.append(f"... and {len(unexpected) - 8} more unexpected keys")
    for k, shape in want.items():
        if k in theirs and tuple(theirs[k].shape) != tuple(shape):
            problems.append(f"key {k!r} has shape {list(theirs[k].shape)}, {cfg.name} needs {list(shape)}")
    if problems:
        raise ValueError(
            f"{source} weights do not fit {cfg.name} (image_size={cfg.image_size}, classifier={cfg.classifier}, "
            f"num_classes={cfg.num_classes}, pre_logits={cfg.pre_logits}): " + "; ".join(problems[:12])
        )


def _foreign_shapes(source: str, cfg: ModelConfig) -> tuple[list[_Rule], dict[str, torch.Size]]:
    rules = _rules(source, cfg)
    ours = expected_shapes(cfg)
    want: dict[str, torch.Size] = {}
    for our_key, their_keys, _, export in rules:
        for k, t in zip(their_keys, export(torch.empty(ours[our_key], device="meta"))):
            want[k] = t.shape
    return rules, want


def convert_state_dict(sd: dict, source: Source, cfg: ModelConfig) -> StateDict:
    """A foreign state dict (`source` = "timm" | "npz" | "hf"; values tensors or numpy arrays) -> ours for `cfg`.
    Checks every key and shape first; raises ValueError naming each mismatch."""
    if source not in SOURCES:
        raise ValueError(f"unknown weights source {source!r}; expected one of {', '.join(SOURCES)}")
    theirs = {k: _as_tensor(t) for k, t in _normalise_keys(dict(sd), source).items()}
    rules, want = _foreign_shapes(source, cfg)
    _check(theirs, want, source, cfg)
    out = {ours: imp([theirs[k] for k in keys]).contiguous() for ours, keys, imp, _ in rules}
    check_state_dict(out, cfg)
    return out


def export_state_dict(sd: StateDict, target: Source, cfg: ModelConfig) -> StateDict:
    """Our state dict -> the `target` layout (tensors; `save_npz` writes the npz one). Inverse of convert."""
    check_state_dict(sd, cfg)
    out: StateDict = {}
    for ours, keys, _, exp in _rules(target, cfg):
        for k, t in zip(keys, exp(sd[ours])):
            out[k] = t.contiguous()
    return out


def check_state_dict(sd: dict, cfg: ModelConfig) -> None:
    """Raises ValueError naming every missing, unexpected or wrongly shaped key of our own layout."""
    _check(sd, expected_shapes(cfg), "vitpipe", cfg)


def save_npz(sd: StateDict, path: str | Path, cfg: ModelConfig) -> None:
    """Writes our weights as an .npz in the official JAX layout (float32)."""
    arrays = {k: t.detach().cpu().float().numpy() for k, t in export_state_dict(sd, "npz", cfg).items()}
    np.savez(path, **arrays)


# -- reading files and inferring the architecture ---------------------------------------------------------------

def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors, .npz (no pickles allowed) or .bin/.pt/.pth (torch.load weights_only) file.
    A checkpoint dict wrapping the weights under `state_dict`/`model`/`module` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        except ValueError as e:  # numpy refuses object arrays (pickles) with allow_pickle=False
            raise ValueError(f"{path}: refused, not a plain .npz of arrays ({e}); vitpipe never unpickles") from None
    if suffix in (".bin", ".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's own message suggests weights_only=False, i.e. running the file's code: never do that here.
            found = re.search(r"Unsupported[^\n]*", str(e))
            first = found.group(0).split(". ")[0][:160] if found else type(e).__name__
            raise ValueError(
                f"{path}: refused to load: it holds pickled Python objects other than tensors ({first}). vitpipe "
                "never unpickles arbitrary objects; convert the weights to .safetensors where the file is trusted"
            ) from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(t, torch.Tensor) for t in obj.values()):
            raise ValueError(f"{path} does not hold a flat dict of tensors (a state dict)")
        return dict(obj)
    raise ValueError(f"{path}: unsupported weights file type {suffix!r}; use .safetensors, .npz, .bin, .pt or .pth")


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file; a file that is not one (e.g. a pickle renamed) is a ValueError."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None


# Where each source keeps the few tensors whose shapes determine the architecture.
_PROBES = {
    "timm": dict(patch="patch_embed.proj.weight", pos="pos_embed", cls="cls_token", fc1="blocks.{i}.mlp.fc1.weight",
                 block=r"blocks\.(\d+)\.", pre="pre_logits.fc.weight", head="head.weight"),
    "npz": dict(patch="embedding/kernel", pos="Transformer/posembed_input/pos_embedding", cls="cls",
                fc1="Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/kernel", block=r"Transformer/encoderblock_(\d+)/",
                pre="pre_logits/kernel", head="head/kernel",
                heads="Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"),
    "hf": dict(patch="vit.embeddings.patch_embeddings.projection.weight", pos="vit.embeddings.position_embeddings",
               cls="vit.embeddings.cls_token", fc1="vit.encoder.layer.{i}.intermediate.dense.weight",
               block=r"vit\.encoder\.layer\.(\d+)\.", pre="vit.pooler.dense.weight", head="classifier.weight"),
}


def infer_config(sd: dict, source: Source, **overrides) -> ModelConfig:
    """The ModelConfig a foreign state dict was trained as: variant from (width, depth, MLP, patch), image size
    from the position-embedding grid, classifier from the [class] token, head and pre-logits from their shapes.
    The number of heads cannot be read from timm/HF weights: the registered variant's count is assumed.
    `overrides` (ModelConfig fields such as drop rates) are applied on top."""
    if source not in SOURCES:
        raise ValueError(f"unknown weights source {source!r}; expected one of {', '.join(SOURCES)}")
    sd = _normalise_keys(dict(sd), source)
    p = _PROBES[source]
    if p["patch"] not in sd or p["pos"] not in sd:
        raise ValueError(f"cannot infer the variant: {source} weights lack {p['patch']!r} or {p['pos']!r}; "
                         "is --source right? pass --name")
    patch = _as_tensor(sd[p["patch"]]).shape
    # conv weight [D, C, P, P] (timm, hf) or JAX kernel [P, P, C, D] (npz)
    width, chans, ps = (patch[3], patch[2], patch[0]) if source == "npz" else (patch[0], patch[1], patch[2])
    depth = len({int(m.group(1)) for k in sd if (m := re.match(p["block"], k))})
    fc1 = _as_tensor(sd[p["fc1"].format(i=0)]).shape if depth else None
    mlp = (fc1[1] if source == "npz" else fc1[0]) if fc1 is not None else None
    matches = [n for n, v in VARIANTS.items()
               if (v.width, v.depth, v.mlp_dim, v.patch_size) == (width, depth, mlp, ps)]
    if source == "npz" and p["heads"] in sd:
        heads = _as_tensor(sd[p["heads"]]).shape[1]
        matches = [n for n in matches if VARIANTS[n].heads == heads]
    if len(matches) != 1:
        raise ValueError(
            f"no registered variant has width {width}, depth {depth}, MLP {mlp}, patch {ps} (from the {source} "
            f"weights); pass --name. Known: {', '.join(sorted(VARIANTS))}"
        )
    prefix = 1 if p["cls"] in sd else 0
    rows = _as_tensor(sd[p["pos"]]).shape[-2] - prefix
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"position embedding has {rows} patch rows, not a square grid; pass --image-size")
    pre = _as_tensor(sd[p["pre"]]).shape if p["pre"] in sd else None
    head = _as_tensor(sd[p["head"]]).shape if p["head"] in sd else None
    fields = dict(
        name=matches[0], image_size=side * ps, in_chans=chans, classifier="token" if prefix else "gap",
        pre_logits=(pre[1] if source == "npz" else pre[0]) if pre is not None else None,
        num_classes=(head[1] if source == "npz" else head[0]) if head is not None else 0,
    )
    return ModelConfig(**{**fields, **overrides})


def adapt_state_dict(sd: StateDict, cfg: ModelConfig, new_cfg: ModelConfig) -> StateDict:
    """Our weights for `cfg` -> weights for `new_cfg` of the same variant and classifier, for fine-tuning: the
    position embedding is resampled to the new grid, a head of a different size is replaced by a zero one, a
    pre-logits layer the new config lacks is dropped. Everything else must match."""
    check_state_dict(sd, cfg)
    if (cfg.name, cfg.classifier, cfg.in_chans) != (new_cfg.name, new_cfg.classifier, new_cfg.in_chans):
        raise ValueError(
            f"cannot adapt {cfg.name}/{cfg.classifier}/{cfg.in_chans}ch weights to "
            f"{new_cfg.name}/{new_cfg.classifier}/{new_cfg.in_chans}ch: only image size, head and pre-logits change"
        )
    out = dict(sd)
    if new_cfg.image_size != cfg.image_size:
        g = new_cfg.image_size // get_variant(new_cfg.name).patch_size
        out["pos_embed"] = resample_pos_embed(sd["pos_embed"], (g, g), 1 if cfg.classifier == "token" else 0)
    if new_cfg.pre_logits != cfg.pre_logits:
        if new_cfg.pre_logits:
            raise ValueError(f"weights have pre_logits={cfg.pre_logits}; cannot create a {new_cfg.pre_logits} layer")
        out.pop("pre_logits.fc.weight", None)
        out.pop("pre_logits.fc.bias", None)
    feats_changed = (new_cfg.pre_logits or 0) != (cfg.pre_logits or 0)
    if new_cfg.num_classes != cfg.num_classes or feats_changed:
        out.pop("head.weight", None)
        out.pop("head.bias", None)
        if new_cfg.num_classes:
            feats = new_cfg.pre_logits or get_variant(new_cfg.name).width
            ref = sd["pos_embed"]
            out["head.weight"] = torch.zeros(new_cfg.num_classes, feats, dtype=ref.dtype)
            out["head.bias"] = torch.full((new_cfg.num_classes,), new_cfg.head_bias_init, dtype=ref.dtype)
    check_state_dict(out, new_cfg)
    return out
