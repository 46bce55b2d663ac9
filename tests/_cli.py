"""The CLI as users run it: ``python -m empathy_models`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(
    home: Path, *args: str, cwd: Path | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """
    Run ``python -m empathy_models *args`` with ``EMPATHY_HOME=home``, no
    ``EMPATHY_CONFIG`` from the caller's environment, and stdin not a terminal.
    """
    env = {k: v for k, v in os.environ.items() if k != "EMPATHY_CONFIG"}
    env["EMPATHY_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "empathy_models", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=110,
        check=False,
    )
