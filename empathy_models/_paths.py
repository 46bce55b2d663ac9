"""
Where empathy-models keeps its files: `empathy_home` (``$EMPATHY_HOME``, default
``~/.empathy``), resolved at call time.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["empathy_home"]


def empathy_home() -> Path:
    """
    The directory empathy-models keeps its files in, resolved now.

    ``$EMPATHY_HOME`` when set and non-empty (``~`` expanded), else ``~/.empathy``.
    The directory is not created here.
    """
    configured = os.environ.get("EMPATHY_HOME", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".empathy"
