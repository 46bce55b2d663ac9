"""Fixtures every test module may use.  Keep this file small: helpers go in test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from empathy_models.testing.clock import FakeClock


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
