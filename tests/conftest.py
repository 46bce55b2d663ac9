"""Fixtures every test module may use.  Keep this file small: helpers go in test modules."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
from hypothesis import HealthCheck, settings

from empathy_models.testing.clock import FakeClock

from ._namespaces import drop_namespace, private_url
from ._precompile import ahead_of_workers

# Property tests judge values, not speed: on a machine busy with other workers (CI runs
# the suite beside other jobs) drawing inputs or running an example can take seconds,
# which Hypothesis would otherwise report as a failure (too_slow, a deadline exceeded).
settings.register_profile(
    "empathy-tests", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("empathy-tests")


@pytest.fixture(autouse=True)
def empathy_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own ``$EMPATHY_HOME`` (telemetry spools, auth files)."""
    home = tmp_path / "empathy-home"
    monkeypatch.setenv("EMPATHY_HOME", str(home))
    return home


@pytest.fixture
def fake_clock() -> FakeClock:
    """A `FakeClock` at 2026-01-01T00:00:00Z that moves only when the test moves it."""
    return FakeClock()


@pytest.fixture
def private_postgres() -> Iterator[Callable[[], str | None]]:
    """
    ``make()``: a URL of the server ``EMPATHY_TEST_POSTGRES_DSN`` names, narrowed to a
    schema of this test's own (each call a new one, all dropped afterwards), or ``None``
    when the variable is not set.
    """
    made: list[str] = []

    def make() -> str | None:
        dsn = os.environ.get("EMPATHY_TEST_POSTGRES_DSN")
        if not dsn:
            return None
        made.append(private_url(dsn))
        return made[-1]

    yield make
    for url in made:
        drop_namespace(url)


@pytest.fixture
def interruptible_children() -> Iterator[None]:
    """
    The child processes the test starts see Ctrl-C (SIGINT) even when this process
    ignores it, as a POSIX shell makes a script's background job (``pytest ... &``) do:
    an ignored SIGINT is inherited across ``exec``, and the children would ignore it too.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def pytest_configure(config: pytest.Config) -> None:
    """A whole-suite run on xdist workers: compile the code once, before they start."""
    ahead_of_workers(config)


SKIP_MARKERS: Final = "EMPATHY_TEST_SKIP_MARKERS"
"""
Tests with any of these markers (comma-separated: ``slow``, ``multiprocess``) are
skipped, saying so.  Unset (a user's run): none is.  CI sets it for its newer Pythons,
whose suites run beside the oldest's full one on two cores (`.ci/run`).
"""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """
    Tests marked ``slow`` run first.  pytest-xdist hands tests out in this order, two at
    a time (``--maxschedchunk`` in pyproject.toml), so the long ones spread over the
    workers from the start instead of one of them, reached late, keeping a worker busy
    after the others are done.  Tests marked as `SKIP_MARKERS` names are skipped.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    names = {n.strip() for n in os.environ.get(SKIP_MARKERS, "").split(",") if n.strip()}
    if not names:
        return
    known = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    if names - known:
        raise pytest.UsageError(
            f"{SKIP_MARKERS} names {', '.join(sorted(names - known))}, not a registered "
            f"marker ({', '.join(sorted(known))})"
        )
    for item in items:
        marked = sorted(n for n in names if item.get_closest_marker(n) is not None)
        if marked:
            why = f"{SKIP_MARKERS}={','.join(sorted(names))}: a {marked[0]} test"
            item.add_marker(pytest.mark.skip(reason=why))
