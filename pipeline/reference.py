"""A Markdown configuration reference generated from the config models (docs/CONFIG.md is this output; a test
keeps it current)."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import RunConfig
from pipeline.transfer.config import TransferRunConfig

__all__ = ["config_reference"]


def _type_name(annotation) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, dotted + ".")
            continue
        if field.is_required():
            default = "**required**"
        elif field.default_factory is not None:
            default = f"`{field.default_factory()!r}`"
        else:
            default = f"`{field.default!r}`" if field.default is not PydanticUndefined else ""
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        type_name = _type_name(ann).replace("|", "\\|")
        rows.append(f"| `{dotted}` | `{type_name}` | {default} | {desc} |")
    return rows


def config_reference() -> str:
    """The reference for pretraining (`RunConfig`) and transfer (`TransferRunConfig`) configs."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the config models by `vitpipe config reference` (a test checks this file is current).",
        "Every key below can be set in YAML or overridden with `--set key=value`; unknown keys are errors.",
    ]
    for title, cls in (("Pretraining (`vitpipe pretrain`)", RunConfig), ("Transfer (`vitpipe transfer`)", TransferRunConfig)):
        out += ["", f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|", *_rows(cls, "")]
    return "\n".join(out) + "\n"
