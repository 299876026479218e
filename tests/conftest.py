"""Shared test set-up. Fixtures live in tests/fixtures/<name>.py (one file per real service) and are loaded here."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

# Settings every test process (and the Ray/DeepSpeed workers they start) should see.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# one DeepSpeed op cache per venv, as the Makefile does (ops built against another venv are rebuilt on every load)
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    str(Path.home() / ".cache/vitpipe/torch_extensions" / hashlib.md5(sys.prefix.encode()).hexdigest()[:12]),
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__"
)
