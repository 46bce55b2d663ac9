"""`auth reset` racing a save never loses the save; backups are pruned."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from empathy_models.auth import AuthStrategy, list_auth_strategy_backups, reset_auth_strategy


def _markers(file: Path) -> set[str]:
    found = set()
    for candidate in [file, *list_auth_strategy_backups(file)]:
        try:
            found.add(json.loads(candidate.read_text())["metadata"]["m"])
        except FileNotFoundError:
            continue
    return found


def test_a_save_racing_a_reset_is_never_lost(tmp_path: Path) -> None:
    file = tmp_path / "auth_strategy.json"
    lost = []
    for i in range(200):
        AuthStrategy(metadata={"m": f"old{i}"}).save(file)
        barrier = threading.Barrier(2)

        def save(i: int = i, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            AuthStrategy(metadata={"m": f"new{i}"}).save(file)

        def reset(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            reset_auth_strategy(file, keep_backups=10_000)

        threads = [threading.Thread(target=save), threading.Thread(target=reset)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if f"new{i}" not in _markers(file):
            lost.append(i)
    assert lost == []


_SAVER = """
import sys
from empathy_models.auth import AuthStrategy
for i in range(300):
    AuthStrategy(metadata={"m": f"p{i}"}).save(sys.argv[1])
"""
_RESETTER = """
import sys
from empathy_models.auth import reset_auth_strategy
for i in range(300):
    reset_auth_strategy(sys.argv[1], keep_backups=100_000)
"""


def test_two_processes_saving_and_resetting_lose_nothing(tmp_path: Path) -> None:
    file = tmp_path / "auth_strategy.json"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(file)]) for code in (_SAVER, _RESETTER)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    # every save landed whole somewhere: the last one in the file or in a backup, and
    # every backup (and the file) parses
    assert "p299" in _markers(file)
    for backup in list_auth_strategy_backups(file):
        assert AuthStrategy.load_existing(backup) is not None


def test_backups_are_pruned_to_the_retention_limit(tmp_path: Path) -> None:
    file = tmp_path / "auth_strategy.json"
    made = []
    for i in range(30):
        AuthStrategy(metadata={"m": f"s{i}"}).save(file)
        made.append(reset_auth_strategy(file))
    backups = list_auth_strategy_backups(file)
    assert len(backups) == 20
    assert backups == list(reversed(made))[:20]  # the newest are kept
    AuthStrategy().save(file)
    reset_auth_strategy(file, keep_backups=3)
    assert len(list_auth_strategy_backups(file)) == 3
