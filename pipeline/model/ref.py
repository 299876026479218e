"""Model registry references, `models:/NAME/VERSION` and `models:/NAME@ALIAS`, parsed without MLflow.

Configs validate a transfer job's `transfer.source` with this before anything talks to a tracking server; the
registry adapter (pipeline.tracking.registry) resolves a parsed reference to a version. `latest` (any case, as
version or alias) is the highest version, as MLflow itself resolves `models:/NAME/latest`; it is never set as an
alias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import RegistryError

__all__ = ["ModelRef", "parse_model_uri", "LATEST"]

_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[A-Za-z0-9_\-]+))$")
# MLflow reserves the alias "latest" (any case) and itself resolves models:/NAME/latest to the highest version;
# we treat @latest the same way, so "latest" as a configured alias is implicit and never set.
LATEST = "latest"


@dataclass(frozen=True)
class ModelRef:
    """A parsed `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}@{self.alias}"


def parse_model_uri(uri: str) -> ModelRef:
    """Parses `models:/NAME/VERSION` or `models:/NAME@ALIAS`; anything else is a RegistryError saying the forms."""
    m = _URI_RE.match(uri.strip()) if isinstance(uri, str) else None
    if m and (m["version"] == LATEST or (m["alias"] or "").lower() == LATEST):
        return ModelRef(m["name"], None, LATEST)
    if not m:
        raise RegistryError(
            f"model URI {uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS "
            "(e.g. models:/vit-b16-i21k@latest or models:/vit-b16-i21k/3)"
        )
    return ModelRef(m["name"], m["version"], m["alias"])
