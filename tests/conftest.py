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
# the venv's tools first, as the Makefile (an activated venv) has them: torch builds DeepSpeed's ops with the first
# `ninja` on PATH, and a second ninja (Debian's) on another process's PATH would make every switch a rebuild
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__"
)
