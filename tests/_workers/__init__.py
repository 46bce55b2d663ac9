"""
Child processes for the multiprocess tests: each worker script in this folder talks
JSON lines over its pipes; `Child` is the shipped harness
(`empathy_models.testing._child.JsonLinesChild`) run on one of these scripts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from empathy_models.testing._child import JsonLinesChild

__all__ = ["Child"]


class Child(JsonLinesChild):
    """One worker process (``script`` with ``args``) and its JSON-lines conversation."""

    def __init__(self, script: Path, *args: str) -> None:
        super().__init__(
            [sys.executable, str(script), *args], name=f"{script.stem} {' '.join(args)}"
        )
