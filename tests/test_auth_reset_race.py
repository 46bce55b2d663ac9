"""`auth reset` racing a save never loses the save; backups are pruned; concurrent
`auth setup` runs never lose each other's changes."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from empathy_models.auth import (
    AuthStrategy,
    list_auth_strategy_backups,
    reset_auth_strategy,
    restore_auth_strategy,
)
from empathy_models.cli import main


def _markers(file: Path) -> set[str]:
    found = set()
    for candidate in [file, *list_auth_strategy_backups(file)]:
        try:
            found.add(json.loads(candidate.read_text())["metadata"]["m"])
        except FileNotFoundError:
            continue
    return found


@pytest.mark.slow
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


def _setup_in_rounds(barrier: Any, directory: str, option: str, value: str, rounds: int) -> None:
    """`auth setup --file <directory>/s<round>.json <option> <value>`, once per round."""
    for round_ in range(rounds):
        barrier.wait(timeout=60)
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["auth", "setup", "--file", f"{directory}/s{round_}.json", option, value])
        assert code == 0


@pytest.mark.multiprocess
def test_two_processes_setting_different_fields_both_land(tmp_path: Path) -> None:
    # two `auth setup` processes each change one field of the same file at the same
    # moment: setup keeps the fields it does not change, so both changes must be there
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    rounds = 30
    workers = [
        context.Process(
            target=_setup_in_rounds, args=(barrier, str(tmp_path), option, value, rounds)
        )
        for option, value in (("--small", "300"), ("--tier", "max"))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    lost = []
    for round_ in range(rounds):
        saved = AuthStrategy.load(tmp_path / f"s{round_}.json")
        if (saved.small_module_threshold, saved.subscription_tier.value) != (300, "max"):
            lost.append(round_)
    assert lost == []


def _save_and_reset(barrier: Any, file: str, rounds: int) -> None:
    barrier.wait(timeout=60)
    for i in range(rounds):
        AuthStrategy(metadata={"m": f"r{i}"}).save(file)
        reset_auth_strategy(file, keep_backups=1)


def _restore(barrier: Any, file: str, rounds: int, report: str) -> None:
    failures = []
    barrier.wait(timeout=60)
    for _ in range(rounds):
        try:
            restore_auth_strategy(file)
        except Exception as exc:
            failures.append(repr(exc))
    Path(report).write_text(json.dumps(failures))


@pytest.mark.multiprocess
def test_a_restore_racing_resets_that_prune_backups_always_restores(tmp_path: Path) -> None:
    # a reset keeping one backup prunes the others while a restore runs: the restore
    # brings back a backup that is there (there always is one), it never fails
    file = tmp_path / "auth_strategy.json"
    AuthStrategy().save(file)
    reset_auth_strategy(file)
    report = tmp_path / "failures.json"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_save_and_reset, args=(barrier, str(file), 300)),
        context.Process(target=_restore, args=(barrier, str(file), 300, str(report))),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert json.loads(report.read_text()) == []
