"""Where a report comes from: the source revision it was made with."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_revision() -> str:
    """The git commit of the source tree darkspec runs from, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
