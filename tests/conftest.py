"""Fixtures every test module may use.  Keep this file small: helpers go in test modules."""

from __future__ import annotations

import pytest

from empathy_models.testing.clock import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    """A `FakeClock` at 2026-01-01T00:00:00Z that moves only when the test moves it."""
    return FakeClock()
