"""Where a checkpoint came from: the tags a pretraining or transfer run puts on what it registers, and the
import of foreign weights (timm, big_vision, HF) as a registered version with the file's digest as its lineage.

Kept above the registry adapter (pipeline.tracking.registry), which stays a plain MLflow client: this module knows
the run configs, the model converters and the checkpoint format.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import RunConfig, config_hash
from pipeline.errors import RegistryError
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.config import ModelConfig
from pipeline.model.weights import convert_state_dict, infer_config, read_weights
from pipeline.tracking.config import TrackingConfig, resolve_tracking_uri
from pipeline.tracking.registry import RegisteredVersion
from pipeline.tracking.run import TrackedRun
from pipeline.transfer.config import TransferRunConfig
from pipeline.version import code_version

__all__ = ["lineage_tags", "import_weights"]


def lineage_tags(
    cfg: RunConfig | TransferRunConfig,
    *,
    run_id: str | None,
    step: int | None = None,
    images_seen: int | None = None,
    dataset: Any = None,
    model_cfg: ModelConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Tags that say where a checkpoint came from. `cfg` is the resolved RunConfig (or TransferRunConfig);
    `dataset` a data Manifest (anything with `.url` and `.checksum`), or None to record the configured URL;
    `model_cfg` the checkpoint's ModelConfig when it is not `cfg.model` (transfer jobs)."""
    model_cfg = model_cfg or cfg.model
    tags: dict[str, Any] = {
        "dataset.url": getattr(dataset, "url", None) or cfg.data.train,
        "dataset.checksum": getattr(dataset, "checksum", None) or "unknown",
        "resolution": model_cfg.image_size,
        "model.variant": model_cfg.name,
        "config_hash": config_hash(cfg),
        "code_version": code_version(),
        "run_id": run_id or "",
    }
    if step is not None:
        tags["steps"] = step
    if images_seen is not None:
        tags["images_seen"] = images_seen
    tags.update(extra or {})
    return {k: str(v) for k, v in tags.items() if v is not None}


def import_weights(
    file: str | Path,
    name: str,
    *,
    source: str,
    model_cfg: Any = None,
    tracking_uri: str | None = None,
    experiment: str = "vit-import",
    alias: str | None = "latest",
    normalize: str = "inception",
) -> RegisteredVersion:
    """Converts foreign weights (timm, big_vision .npz, HF) with the model's converters into our checkpoint,
    logs it to a new run and registers it as a version of `name`. `model_cfg` None = inferred from the weights;
    `normalize`: the input normalisation the weights were trained with (big_vision's and timm's/HF's ViTs
    scale pixels to [-1, 1]: inception)."""
    file = Path(file)
    if source not in ("timm", "npz", "hf"):
        raise RegistryError(f"--source {source!r}: expected timm, npz or hf")
    state_dict = read_weights(file)
    model_cfg = model_cfg or infer_config(state_dict, source)
    converted = convert_state_dict(state_dict, source=source, cfg=model_cfg)
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    tags = {
        "import.file": file.name,
        "import.source": source,
        "import.sha256": digest.hexdigest(),
        "resolution": model_cfg.image_size,
        "model.variant": model_cfg.name,
        "config_hash": config_hash(model_cfg),
        "code_version": code_version(),
    }
    tracking = TrackingConfig(sink="mlflow", tracking_uri=resolve_tracking_uri(tracking_uri), experiment=experiment)
    with TrackedRun.open(tracking, f"import-{name}") as run:
        run.log_params({k: tags[k] for k in ("import.file", "import.source", "import.sha256", "model.variant",
                                             "resolution")})
        with tempfile.TemporaryDirectory(prefix="vitpipe-import-") as tmp:
            save_checkpoint(tmp, converted, model_cfg, {"imported_from": file.name, "source": source})
            version = run.register(tmp, name=name, alias=alias, tags={**tags, "run_id": run.run_id},
                                   normalize=normalize,
                                   description=f"{source} weights imported from {file.name} (sha256 "
                                               f"{tags['import.sha256'][:12]})")
    return version
