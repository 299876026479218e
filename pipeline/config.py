"""Composes the component configs into one typed `RunConfig` and loads it from YAML.

A YAML file may name a `base:` file (or a list of them, paths relative to the file) that it extends; mappings
merge recursively, everything else is replaced. Dotted overrides (`train.optim.lr=3e-4`) are applied last, their
values parsed as YAML. Validation errors name the file that set the field, the dotted field, the bad value and
what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.data.config import DataConfig, StorageConfig, resolve_readers
from pipeline.errors import ConfigError
from pipeline.launch.config import ScalingConfig
from pipeline.model.config import ModelConfig
from pipeline.tracking.config import TrackingConfig
from pipeline.train.config import TrainConfig
from pipeline.transfer.config import TransferRunConfig

__all__ = ["RunConfig", "load_config", "load_yaml_tree", "apply_overrides", "config_hash", "validate",
           "config_class"]


class RunConfig(BaseModel):
    """Everything one pretraining run needs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("vit", description="run name; also the default checkpoint folder name")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _resolve_readers(self) -> "RunConfig":
        # the resolved number is what the run records (params, checkpoints): it fixes the sample order
        self.data.virtual_readers = resolve_readers(self.data, self.train.global_batch)
        return self


_Origins = dict[str, str]  # dotted key -> where it was set


def _merge(base: dict, over: dict, origins: _Origins, source: str, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, source, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
            _record(value, origins, source, dotted)
    return out


def _record(value: Any, origins: _Origins, source: str, dotted: str) -> None:
    origins[dotted] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record(v, origins, source, f"{dotted}.{k}")


def load_yaml_tree(path: str | Path, origins: _Origins | None = None, _seen: tuple[Path, ...] = ()) -> dict:
    """Reads a YAML config and its `base:` chain into one merged mapping."""
    origins = {} if origins is None else origins
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"config inheritance cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_tree = load_yaml_tree(path.parent / base, origins, (*_seen, resolved))
        merged = _merge(merged, base_tree, {}, str(path))
    return _merge(merged, data, origins, str(path))


def apply_overrides(tree: dict, overrides: Iterable[str], origins: _Origins | None = None) -> dict:
    """Applies `a.b.c=value` overrides (value parsed as YAML) to a config mapping."""
    origins = {} if origins is None else origins
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
        _record(value, origins, "--set", key)
    return tree


def _format_errors(err: ValidationError, origins: _Origins, default_source: str) -> str:
    lines = []
    for e in err.errors(include_url=False):
        dotted = ".".join(str(p) for p in e["loc"])
        where = origins.get(dotted) or _nearest_origin(dotted, origins) or default_source
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `vitpipe config schema` lists the allowed keys)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = "" if e["type"] == "missing" or isinstance(e["input"], dict) else f" (got {e['input']!r})"
        lines.append(f"  {where}: {dotted}: {msg}{got}")
    return "invalid configuration:\n" + "\n".join(lines)


def _nearest_origin(dotted: str, origins: _Origins) -> str | None:
    parts = dotted.split(".")
    while parts:
        parts.pop()
        if ".".join(parts) in origins:
            return origins[".".join(parts)]
    return None


def validate(model_cls: type[BaseModel], tree: dict, origins: _Origins | None = None, source: str = "config"):
    """Validates a mapping into `model_cls`, turning pydantic's error into a ConfigError that names file and field."""
    try:
        return model_cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origins or {}, source)) from None


def load_config(
    paths: str | Path | Iterable[str | Path],
    overrides: Iterable[str] = (),
    model_cls: type[BaseModel] = RunConfig,
) -> Any:
    """Loads YAML file(s) (later files extend earlier ones), applies dotted overrides, validates."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ConfigError("no config file given")
    origins: _Origins = {}
    tree: dict = {}
    for p in paths:
        tree = _merge(tree, load_yaml_tree(p, origins), {}, str(p))
    tree = apply_overrides(tree, overrides, origins)
    return validate(model_cls, tree, origins, str(paths[-1]))


def config_hash(cfg: BaseModel) -> str:
    """A stable short hash of a resolved config (for lineage tags)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_class(paths: list[str]) -> type[BaseModel]:
    """The config model of a file list: transfer configs carry a `transfer:` section (TransferRunConfig);
    everything else is a pretraining RunConfig."""
    if "transfer" in load_yaml_tree(paths[-1]):
        return TransferRunConfig
    return RunConfig
