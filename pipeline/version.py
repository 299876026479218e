"""What code a run ran: the package version plus the commit of the checkout it came from."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pipeline import __version__

__all__ = ["CODE_VERSION_ENV", "code_version"]

CODE_VERSION_ENV = "VITPIPE_CODE_VERSION"


def code_version(root: Path | None = None) -> str:
    """pipeline.__version__ plus the git commit of the source tree when it is a git checkout (+dirty when
    pipeline/ has uncommitted changes). A tree that is not a checkout (a Ray job's uploaded working dir) reports
    what `vitpipe submit` computed in the checkout it was submitted from ($VITPIPE_CODE_VERSION), else the bare
    package version."""
    root = root or Path(__file__).resolve().parents[1]
    fallback = os.environ.get(CODE_VERSION_ENV) or __version__
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return fallback
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "pipeline"],
            capture_output=True, text=True, timeout=5,
        )
        suffix = "+dirty" if dirty.stdout.strip() else ""
        return f"{__version__}+g{sha.stdout.strip()}{suffix}"
    except (OSError, subprocess.SubprocessError):
        return fallback
