"""The names of our model checkpoint format, owned here (no torch import) so the registry, the CLI and the
checkpoint code agree: a checkpoint is a folder holding `model.safetensors` + `model.json`."""

from __future__ import annotations

__all__ = ["WEIGHTS_FILE", "CONFIG_FILE", "CHECKPOINT_FILES", "FORMAT"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"  # written last: a folder without it is an incomplete checkpoint
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE)
FORMAT = "vitpipe-model/1"  # model.json's "format", the safetensors metadata and the registry's format tag
