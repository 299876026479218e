"""The ViT variant registry: the paper's Table 1 (B, L, H) plus Ti and S (DeiT/AugReg), at several patch sizes,
and two tiny variants for tests and the CPU demo. Users choose a variant by name (`vit_b16`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Variant", "VARIANTS", "get_variant"]


@dataclass(frozen=True)
class Variant:
    """The architecture of one ViT: hidden size D, layers L, attention heads, MLP size and patch size P."""

    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int
    timm_name: str | None = None  # timm's model with the same architecture (for parity / parameter counts)

    @property
    def family(self) -> str:
        return _FAMILY_NAMES[(self.width, self.depth)]

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


# name -> (width, depth, heads, mlp)
_FAMILIES = {
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
    "h": (1280, 32, 16, 5120),
}
_FAMILY_NAMES = {(w, d): k for k, (w, d, _, _) in _FAMILIES.items()}
_TIMM_FAMILY = {"ti": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}
# Patch sizes per family; each is a model someone has trained (paper, AugReg, DINO, timm).
_PATCHES = {"ti": (8, 16, 32), "s": (8, 14, 16, 32), "b": (8, 14, 16, 32), "l": (14, 16, 32), "h": (14, 16)}
# (family, patch) pairs timm 1.0.31 registers as `vit_{family}_patch{P}_224` (checked against `timm.list_models`;
# Ti/8, S/14, B/14 and H/16 have no plain class-token counterpart there: their timm relatives are DINOv2 models
# with register tokens / layer scale, or a GAP model at 448 px).
_IN_TIMM = {
    ("ti", 16), ("s", 8), ("s", 16), ("s", 32), ("b", 8), ("b", 16), ("b", 32), ("l", 14), ("l", 16), ("l", 32),
    ("h", 14),
}

VARIANTS: dict[str, Variant] = {}
for _fam, (_w, _d, _h, _m) in _FAMILIES.items():
    for _p in _PATCHES[_fam]:
        _timm = f"vit_{_TIMM_FAMILY[_fam]}_patch{_p}_224" if (_fam, _p) in _IN_TIMM else None
        VARIANTS[f"vit_{_fam}{_p}"] = Variant(_w, _d, _h, _m, _p, _timm)

# Tiny variants for tests and the 2-core CPU demo (28-32 px inputs, patch 4).
VARIANTS["vit_pico4"] = Variant(width=64, depth=2, heads=2, mlp_dim=128, patch_size=4)
VARIANTS["vit_nano4"] = Variant(width=128, depth=4, heads=4, mlp_dim=512, patch_size=4)
_FAMILY_NAMES.update({(64, 2): "pico", (128, 4): "nano"})


def get_variant(name: str) -> Variant:
    """The registered variant called `name`; a ValueError listing the known names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown ViT variant {name!r}; known: {', '.join(sorted(VARIANTS))}") from None
