"""
Where empathy-models keeps its files: `empathy_home` (``$EMPATHY_HOME``, default
``~/.empathy``), resolved at call time.
"""

from __future__ import annotations

import os
from pathlib import Path

from .exceptions import ConfigurationError

__all__ = ["empathy_home"]


def empathy_home() -> Path:
    """
    The directory empathy-models keeps its files in, resolved now.

    ``$EMPATHY_HOME`` when set and non-empty (``~`` expanded), else ``~/.empathy``.
    The directory is not created here.
    """
    configured = os.environ.get("EMPATHY_HOME", "").strip()
    try:
        if configured:
            return Path(configured).expanduser()
        return Path.home() / ".empathy"
    except RuntimeError:  # no home directory for that user (or for this one)
        raise ConfigurationError(
            f"cannot find the home directory for EMPATHY_HOME={configured!r}: set "
            "EMPATHY_HOME to a full path"
            if configured
            else "cannot find a home directory for ~/.empathy: set EMPATHY_HOME to a full path"
        ) from None
