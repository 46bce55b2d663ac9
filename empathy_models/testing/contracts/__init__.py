"""
Contract suites: the behaviour every `TelemetryBackend` and `CircuitStateStore` owes.

The same tests run against the built-in backends, the SQLite, Redis and PostgreSQL
backends and any third-party one.  Subclass a contract in a test module (the subclass
name must start with ``Test`` so pytest collects it) and override one fixture that
returns the backend's URL; the contract builds the backend with `telemetry_from_url` /
`state_store_from_url`, enters ``async with``, and closes it after the test::

    from empathy_models.testing.contracts import (
        CircuitStateStoreContract,
        TelemetryBackendContract,
    )

    class TestMyTelemetry(TelemetryBackendContract):
        @pytest.fixture
        def telemetry_url(self, tmp_path):
            return f"mydb:///{tmp_path}/calls.db"

    class TestMyStateStore(CircuitStateStoreContract):
        @pytest.fixture
        def state_store_url(self, tmp_path):
            return f"mydb:///{tmp_path}/state.db"

Requirements: pytest, pytest-asyncio and anyio (the ``test`` extra of empathy-models);
the tests carry the ``asyncio`` mark, so they run with ``asyncio_mode`` strict or auto.
The URL must name an *empty* backend for every test (a fresh file, a flushed database):
the contracts count everything they read.  Extra constructor options go in the
``telemetry_options`` / ``state_store_options`` fixtures (for example an injected clock).

Capabilities, as class attributes of the subclass:

* ``TelemetryBackendContract.stores_records`` (default true): false for a backend that
  accepts records and keeps none, like ``null://``; the tests of what is stored are
  skipped and a test that reads return nothing runs instead.
* ``TelemetryBackendContract.keeps_evidence`` (default true): false for a backend
  whose `TelemetryBackend.evidence` raises `NotImplementedError`; the evidence tests
  (buckets equal to `empathy_models.evidence.rollup` of everything stored, incremental
  reads that return each change once and miss none, windows, purge) are skipped.
* ``CircuitStateStoreContract.keeps_state`` (default true): false for a pass-through
  store, like ``null://``.
* What a backend claims about itself is held to: its
  `TelemetryBackend.stores_records` must equal the contract's ``stores_records``; a
  telemetry backend whose `TelemetryBackend.persistent` is true must keep records across
  close and reopen; a
  store whose ``shared`` is true must show one instance's transitions to another built
  from the same URL.

A store that announces changes (`CircuitStateStore.change_feed`, as the Redis and
PostgreSQL stores do) also subclasses `ChangeFeedContract`, overriding
``state_store_url`` and ``cut_change_feed`` (ends the feed's subscription from the
server's side): every new generation announced before the next sync, views confirmed
past their TTL, changes elsewhere seen at once, nothing confirmed across a broken
subscription.

Time: stores take time from their own clock (an injected one for memory; the wall clock
or the server's time for SQLite, Redis and PostgreSQL).  The few time-dependent store
tests use policies of 0.2 s and call the ``advance_clock`` fixture, an async callable
``advance(seconds)`` that by default waits that long (`anyio.sleep`); a subclass whose
store has an injected `FakeClock` overrides it to move that clock instead, so those
tests take no time at all.

A clock stepped back (an NTP correction): the clock-step tests (open ends, probe
leases, closed windows and healthy time; budget holds) run where the subclass says how
to step its store's clock, in the ``step_state_clock`` / ``step_quota_clock`` fixture
(`StepStateClock`, `StepQuotaClock`; ``None`` by default, and the tests skip).  A store
built with an injected clock returns ``stepping(clock)``; a server's clock cannot be
stepped, so a test of a server store moves every time the store holds instead
(`written_ahead` gives a breaker state as a clock that far ahead would have written it).

A store that forgets idle keys (``key_ttl``, as the memory and Redis stores have) says
how to make them idle past their time in the ``expire_state_keys`` fixture
(`ExpireStateKeys`; ``None`` by default, and those tests skip): such a key must read,
count and list as a key never written, whether or not anything swept it yet.
"""

from __future__ import annotations

try:
    import pytest_asyncio  # noqa: F401  (the suites' fixtures are its)
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        "the contract suites of empathy_models.testing.contracts run under pytest with "
        f"pytest-asyncio, and {missing.name} is not installed: pip install pytest "
        "pytest-asyncio",
        name=missing.name,
    ) from missing

from ._cache import ResponseCacheContract as ResponseCacheContract
from ._change_feed import (
    ChangeFeedContract as ChangeFeedContract,
    CutChangeFeed as CutChangeFeed,
)
from ._clock_step import (
    StepQuotaClock as StepQuotaClock,
    StepStateClock as StepStateClock,
    stepping as stepping,
    written_ahead as written_ahead,
)
from ._evidence import assert_same_buckets as assert_same_buckets
from ._idle_keys import ExpireStateKeys as ExpireStateKeys
from ._quota import QuotaStoreContract as QuotaStoreContract
from ._state import (
    AdvanceClock as AdvanceClock,
    CircuitStateStoreContract as CircuitStateStoreContract,
)
from ._telemetry import TelemetryBackendContract as TelemetryBackendContract

__all__ = [
    "AdvanceClock",
    "ChangeFeedContract",
    "CircuitStateStoreContract",
    "CutChangeFeed",
    "ExpireStateKeys",
    "QuotaStoreContract",
    "ResponseCacheContract",
    "StepQuotaClock",
    "StepStateClock",
    "TelemetryBackendContract",
    "assert_same_buckets",
    "stepping",
    "written_ahead",
]
