"""Fixtures every test module may use.  Keep this file small: helpers go in test modules."""

from __future__ import annotations

import os
import signal
import zlib
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


SLOW_SHARE: Final = "EMPATHY_TEST_SLOW_SHARE"
"""
``K/N`` (e.g. ``2/3``): of the tests marked ``slow``, only the K-th of N shares runs (a
test's share is fixed by its node id), the others are skipped, saying so.  Unset (a
user's run): every test runs.  CI runs its three Pythons' suites side by side on two
cores with a share each (`.ci/run`): every slow test runs once, on one of the Pythons,
and no suite carries all of them.
"""


def _slow_share() -> tuple[int, int] | None:
    """`SLOW_SHARE` read as (K, N), or None when unset; anything else is a usage error."""
    given = os.environ.get(SLOW_SHARE, "").strip()
    if not given:
        return None
    k, _, n = given.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise pytest.UsageError(f"{SLOW_SHARE}={given!r}: expected K/N with 1 <= K <= N, e.g. 2/3")
    return int(k), int(n)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """
    Tests marked ``slow`` run first.  pytest-xdist hands tests out in this order, two at
    a time (``--maxschedchunk`` in pyproject.toml), so the long ones spread over the
    workers from the start instead of one of them, reached late, keeping a worker busy
    after the others are done.  Slow tests outside the `SLOW_SHARE` are skipped.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    share = _slow_share()
    if share is None:
        return
    k, n = share
    why = f"{SLOW_SHARE}={k}/{n}: a slow test of another share (CI runs each share once)"
    for item in items:
        if item.get_closest_marker("slow") is None:
            break  # the slow ones come first
        if zlib.crc32(item.nodeid.encode()) % n != k - 1:
            item.add_marker(pytest.mark.skip(reason=why))
