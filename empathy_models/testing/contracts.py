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

Time: stores take time from their own clock (an injected one for memory; the wall clock
or the server's time for SQLite, Redis and PostgreSQL).  The few time-dependent store
tests use policies of 0.2 s and call the ``advance_clock`` fixture, an async callable
``advance(seconds)`` that by default waits that long (`anyio.sleep`); a subclass whose
store has an injected `FakeClock` overrides it to move that clock instead, so those
tests take no time at all.
"""

from __future__ import annotations

import itertools
import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final, NoReturn

import anyio
import anyio.lowlevel
import attrs
import pytest
import pytest_asyncio

from ..abc import CircuitStateStore, TelemetryBackend
from ..backends import state_store_from_url, telemetry_from_url
from ..circuit import BreakerPolicy
from ..evidence import BUCKET_SECONDS, EvidenceBatch, EvidenceBucket, rollup, sorted_buckets
from ..exceptions import (
    BackendClosedError,
    BackendError,
    ConfigurationError,
    RecordValidationError,
)
from ..records import (
    Admission,
    CircuitBreakerState,
    CircuitState,
    LLMCallRecord,
    ModelPerformance,
    ModelTier,
    Outcome,
    OutcomeReport,
    Ticket,
)
from .cache_contracts import ResponseCacheContract as ResponseCacheContract
from .quota_contracts import QuotaStoreContract as QuotaStoreContract

__all__ = [
    "AdvanceClock",
    "CircuitStateStoreContract",
    "QuotaStoreContract",
    "ResponseCacheContract",
    "TelemetryBackendContract",
    "assert_same_buckets",
]

AdvanceClock = Callable[[float], Awaitable[None]]
"""``await advance(seconds)``: let the store's clock move forward by at least ``seconds``."""

# --------------------------------------------------------------------------- helpers


def _fail_override(cls: type, fixture: str) -> NoReturn:
    pytest.fail(
        f"{cls.__name__} must override the {fixture!r} fixture "
        "(return the URL of an empty backend)",
        pytrace=False,
    )


def _record(
    ts: datetime,
    *,
    model: str = "model-a",
    provider: str = "provider-a",
    outcome: Outcome = Outcome.SUCCESS,
    workflow: str | None = "wf",
    stage: str | None = "stage",
    **fields: Any,
) -> LLMCallRecord:
    return LLMCallRecord(
        provider=provider,
        model=model,
        outcome=outcome,
        timestamp=ts,
        workflow=workflow,
        stage=stage,
        **fields,
    )


def _base_time() -> datetime:
    # Relative to now (and whole seconds) so that no backend treats the data as
    # expired, yet far enough back that nothing collides with "now".
    return datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)


def _rich_record(ts: datetime) -> LLMCallRecord:
    """A record in which every field differs from its default, with awkward text."""
    return LLMCallRecord(
        provider="anthropic",
        model="claude-'quoted'-\"model\"",
        outcome=Outcome.RATE_LIMITED,
        call_id=f"call-{uuid.uuid4().hex}",
        request_id="req-0001",
        timestamp=ts.replace(microsecond=123456),
        workflow="wörkflow; DROP TABLE calls;--",
        stage="stage\nwith newline",
        task_type="summarize",
        tier=ModelTier.PREMIUM,
        input_tokens=1_234_567,
        output_tokens=8_901,
        cost_usd=0.123456789,
        actual_cost_usd=0.0625,
        price_version="2026-01-01",
        latency_ms=1234.5678,
        ttft_ms=12.25,
        error_type="RateLimitedError",
        error_message="429 Too Many Requests; retry after 'soon' \u2014 \u6f22\u5b57",
        status_code=429,
        attempt=3,
        fallback_used=True,
        fallback_chain=("anthropic:claude-a", "openai:gpt-b"),
        original_provider="openai",
        original_model="gpt-b",
        exploration=True,
        routing_propensity=0.125,
        breaker_generation=7,
        circuit_state=CircuitState.HALF_OPEN,
        user_id="user-1",
        session_id="session-1",
        metadata={"text": "x", "int": 3, "float": 2.5, "flag": True, "nothing": None},
        prompt_text="hello \U0001f30d",
        response_text="bye\tthen\r\nnothing",
    )


def _assert_same_record(got: LLMCallRecord, want: LLMCallRecord) -> None:
    diffs = [
        f"{f.name}: stored {getattr(want, f.name)!r}, read back {getattr(got, f.name)!r}"
        for f in attrs.fields(LLMCallRecord)
        if getattr(got, f.name) != getattr(want, f.name)
    ]
    assert not diffs, "fields changed in the round trip:\n  " + "\n  ".join(diffs)
    assert got.timestamp.utcoffset() == timedelta(0), "timestamps must read back in UTC"


_SAMPLES = frozenset({"success", "failure", "rate_limited", "fatal"})


def _nearest_rank(values: Sequence[float], percent: int) -> float | None:
    """Nearest-rank percentile with exact integer arithmetic: the ceil(p*n)-th smallest."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return None
    rank = max(1, -(-percent * n // 100))
    return ordered[rank - 1]


GroupKey = tuple[str | None, str | None, str]


def _brute_force(
    records: Iterable[LLMCallRecord],
    *,
    workflow: str | None = None,
    stage: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    per_stage: bool = True,
) -> dict[GroupKey, dict[str, Any]]:
    """The aggregation, computed independently of every backend."""
    groups: dict[GroupKey, list[LLMCallRecord]] = {}
    for r in records:
        if r.outcome.value not in _SAMPLES:
            continue
        if workflow is not None and r.workflow != workflow:
            continue
        if stage is not None and r.stage != stage:
            continue
        if since is not None and not r.timestamp >= since:
            continue
        if until is not None and not r.timestamp < until:
            continue
        key = (r.workflow, r.stage if per_stage else None, r.model)
        groups.setdefault(key, []).append(r)
    out: dict[GroupKey, dict[str, Any]] = {}
    for key, rows in groups.items():
        ok = [r for r in rows if r.outcome.value == "success"]
        latencies = [r.latency_ms for r in ok]
        ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        out[key] = {
            "provider": rows[0].provider,
            "tier": rows[0].tier,
            "sample_size": len(rows),
            "successes": len(ok),
            "latency_p50_ms": _nearest_rank(latencies, 50),
            "latency_p95_ms": _nearest_rank(latencies, 95),
            "avg_latency_ms": math.fsum(latencies) / len(latencies) if latencies else None,
            "ttft_p50_ms": _nearest_rank(ttfts, 50),
            "ttft_p95_ms": _nearest_rank(ttfts, 95),
            "avg_cost_usd": math.fsum(r.cost_usd for r in rows) / len(rows),
            "avg_input_tokens": sum(r.input_tokens for r in ok) / len(ok) if ok else 0.0,
            "avg_output_tokens": sum(r.output_tokens for r in ok) / len(ok) if ok else 0.0,
            "first_seen": min(r.timestamp for r in rows),
            "last_seen": max(r.timestamp for r in rows),
        }
    return out


def _close(actual: float | None, expected: float | None) -> bool:
    if actual is None or expected is None:
        return actual is expected
    return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9)


def _assert_aggregate(
    got: list[ModelPerformance], want: dict[GroupKey, dict[str, Any]], query: str
) -> None:
    by_key: dict[GroupKey, ModelPerformance] = {}
    for perf in got:
        key = (perf.workflow, perf.stage, perf.model)
        assert key not in by_key, f"{query}: group {key} returned twice"
        by_key[key] = perf
    assert set(by_key) == set(want), (
        f"{query}: groups differ; missing {sorted(set(want) - set(by_key), key=str)}, "
        f"unexpected {sorted(set(by_key) - set(want), key=str)}"
    )
    problems: list[str] = []
    for key, expected in want.items():
        perf = by_key[key]
        for name, value in expected.items():
            actual = getattr(perf, name)
            same = (
                _close(actual, value)
                if name.startswith("avg_")
                else (actual == value and (value is None) == (actual is None))
            )
            if not same:
                problems.append(f"{key} {name}: expected {value!r}, got {actual!r}")
    assert not problems, f"{query}: aggregation differs from brute force:\n  " + "\n  ".join(
        problems
    )
    complete = [
        (perf.workflow, perf.stage, perf.model)
        for perf in got
        if perf.workflow is not None and perf.stage is not None
    ]
    assert complete == sorted(complete), f"{query}: groups not sorted by (workflow, stage, model)"


def _aggregation_dataset(base: datetime) -> list[LLMCallRecord]:
    rng = random.Random(20261125)
    models = [
        ("anthropic", "m-cheap", ModelTier.CHEAP),
        ("anthropic", "m-capable", ModelTier.CAPABLE),
        ("openai", "m-premium", ModelTier.PREMIUM),
    ]
    outcomes = [
        *[Outcome.SUCCESS] * 12,
        Outcome.FAILURE,
        Outcome.FAILURE,
        Outcome.RATE_LIMITED,
        Outcome.FATAL,
        Outcome.IGNORED,
        Outcome.CANCELLED,
        Outcome.REJECTED,
        Outcome.NOT_SENT,
    ]
    records: list[LLMCallRecord] = []
    for i in range(480):
        provider, model, tier = rng.choice(models)
        if records and rng.random() < 0.1:
            ts = rng.choice(records).timestamp  # ties in time
        else:
            ts = base + timedelta(
                seconds=rng.randrange(0, 10 * 86_400), microseconds=rng.randrange(0, 10**6)
            )
        latency = (
            rng.choice([120.0, 250.5, 999.0])
            if rng.random() < 0.3
            else round(rng.uniform(20.0, 5000.0), 3)
        )
        records.append(
            _record(
                ts,
                provider=provider,
                model=model,
                tier=tier,
                outcome=rng.choice(outcomes),
                workflow=rng.choice(["wf-a", "wf-b", "wf-b", None]),
                stage=rng.choice(["plan", "write", "write", None]),
                latency_ms=latency,
                cost_usd=round(rng.uniform(0.0, 0.05), 6),
                input_tokens=rng.randrange(0, 20_000),
                output_tokens=rng.randrange(0, 4_000),
                call_id=f"agg-{i:04d}",
            )
        )
    return records


_BUCKET_COUNTS: Final = (
    "samples",
    "successes",
    "latency_n",
    "ttft_n",
    "input_tokens",
    "output_tokens",
)
_BUCKET_SUMS: Final = (
    "latency_log_sum",
    "latency_log_sq_sum",
    "ttft_log_sum",
    "ttft_log_sq_sum",
    "cost_usd",
)

BucketKey = tuple[str | None, str | None, str, datetime]


def assert_same_buckets(
    got: Sequence[EvidenceBucket], want: Iterable[EvidenceBucket], what: str
) -> None:
    """
    Assert that ``got`` (as `TelemetryBackend.evidence` returned them) are ``want`` (for
    example `empathy_models.evidence.rollup` of the records stored): the same keys in the
    order of `EvidenceBatch.buckets`, counts exactly equal, float sums within a relative
    1e-9 (backends may add in another order), bucket starts in UTC.  ``what`` names the
    read in the failure message.
    """
    expected = sorted_buckets(want)
    assert [b.key for b in got] == [b.key for b in expected], (
        f"{what}: bucket keys differ or are out of order; missing "
        f"{sorted({b.key for b in expected} - {b.key for b in got}, key=str)[:5]}, unexpected "
        f"{sorted({b.key for b in got} - {b.key for b in expected}, key=str)[:5]}"
    )
    problems: list[str] = []
    for b, w in zip(got, expected, strict=True):
        problems.extend(
            f"{b.key} {name}: expected {getattr(w, name)}, got {getattr(b, name)}"
            for name in _BUCKET_COUNTS
            if getattr(b, name) != getattr(w, name)
        )
        problems.extend(
            f"{b.key} {name}: expected {getattr(w, name)!r}, got {getattr(b, name)!r}"
            for name in _BUCKET_SUMS
            if not math.isclose(getattr(b, name), getattr(w, name), rel_tol=1e-9, abs_tol=1e-9)
        )
        if b.bucket_start.utcoffset() != timedelta(0):
            problems.append(f"{b.key}: bucket_start must be in UTC")
    assert not problems, f"{what}: buckets differ from rollup():\n  " + "\n  ".join(problems[:20])


class _IncrementalReader:
    """
    Reads `TelemetryBackend.evidence` the way the router does: each batch's buckets
    replace the held ones by key, and the batch's version is passed back next time.
    Checks that versions never go back, that every bucket returned is newer than the
    version passed, and that no change (a key at a version) is returned twice.
    """

    def __init__(self, backend: TelemetryBackend) -> None:
        self.backend = backend
        self.version = 0
        self.held: dict[BucketKey, EvidenceBucket] = {}
        self.seen: set[tuple[BucketKey, int]] = set()
        self.reads = 0

    async def poll(self) -> EvidenceBatch:
        batch = await self.backend.evidence(after_version=self.version)
        self.reads += 1
        assert batch.version >= self.version, (
            f"the store's version went back from {self.version} to {batch.version}"
        )
        for b in batch.buckets:
            assert self.version < b.version <= batch.version, (
                f"bucket {b.key} at version {b.version} returned by "
                f"evidence(after_version={self.version}) in a batch at {batch.version}"
            )
            change = (b.key, b.version)
            assert change not in self.seen, f"change {change} returned twice"
            self.seen.add(change)
            self.held[b.key] = b
        self.version = batch.version
        return batch

    def buckets(self) -> list[EvidenceBucket]:
        return sorted_buckets(self.held.values())


def _evidence_records(rng: random.Random, base: datetime, n: int, tag: str) -> list[LLMCallRecord]:
    """Records over 30 minutes: every outcome, NULL and '' workflows and stages."""
    return [
        _record(
            base
            + timedelta(
                seconds=rng.randrange(0, 30 * BUCKET_SECONDS), microseconds=rng.randrange(10**6)
            ),
            model=rng.choice(["m-1", "m-2", "m-3"]),
            outcome=rng.choice(list(Outcome)),
            workflow=rng.choice([None, "", "wf"]),
            stage=rng.choice([None, "s"]),
            latency_ms=rng.choice([0.0, 0.5, rng.uniform(1.0, 4000.0)]),
            ttft_ms=rng.choice([None, rng.uniform(0.0, 300.0)]),
            cost_usd=rng.uniform(0.0, 0.01),
            input_tokens=rng.randrange(0, 5000),
            output_tokens=rng.randrange(0, 900),
            call_id=f"{tag}-{i}",
        )
        for i in range(n)
    ]


async def _store_per_minute(
    telemetry: TelemetryBackend, start: datetime, *, minutes: int, seconds: Sequence[int]
) -> list[LLMCallRecord]:
    """Store one record at each of ``seconds`` past each of ``minutes`` minutes after ``start``."""
    records = [
        _record(start + timedelta(minutes=m, seconds=s), model=f"m{m % 2}", call_id=f"pm{m}-{s}")
        for m in range(minutes)
        for s in seconds
    ]
    await telemetry.record_many(records)
    await telemetry.flush()
    return records


# --------------------------------------------------------------------------- telemetry


@pytest.mark.asyncio
class TelemetryBackendContract:
    """
    The contract of `TelemetryBackend`.  Override the ``telemetry_url`` fixture.

    Covers: every field surviving record -> recent; newest-first order, limit and
    filters; aggregation against a brute-force computation (sample outcomes only,
    nearest-rank p50/p95 over successes, averages, per-stage or not, ``since``
    inclusive and ``until`` exclusive); purge; 100 concurrent writers with exact
    counts; flush then read; idempotent close; use after close; naive datetimes;
    evidence rollups (equal to `empathy_models.evidence.rollup` of every record stored,
    incremental reads with one or two writers, windows, purge, NULL workflow / stage).
    """

    stores_records: ClassVar[bool] = True
    """False for a backend that accepts records and keeps none (``null://``)."""

    keeps_evidence: ClassVar[bool] = True
    """False for a backend whose ``evidence()`` raises `NotImplementedError`."""

    @pytest.fixture
    def telemetry_url(self) -> str:
        """The URL of an empty backend; subclasses must override this fixture."""
        _fail_override(type(self), "telemetry_url")

    @pytest.fixture
    def telemetry_options(self) -> dict[str, Any]:
        """Keyword options passed to `telemetry_from_url`; none by default."""
        return {}

    @pytest_asyncio.fixture(loop_scope="function")
    async def telemetry(
        self, telemetry_url: str, telemetry_options: dict[str, Any]
    ) -> AsyncIterator[TelemetryBackend]:
        """The backend under test, built from the URL, entered and closed after the test."""
        backend = telemetry_from_url(telemetry_url, **telemetry_options)
        async with backend:
            yield backend

    def _needs_records(self) -> None:
        if not self.stores_records:
            pytest.skip(f"{type(self).__name__}: the backend keeps no records")

    def _needs_evidence(self) -> None:
        self._needs_records()
        if not self.keeps_evidence:
            pytest.skip(f"{type(self).__name__}: the backend keeps no evidence rollups")

    # -- round trip and ordering ---------------------------------------------------

    async def test_every_field_survives_record_then_recent(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_records()
        base = _base_time()
        rich = _rich_record(base)
        plain = LLMCallRecord(provider="p", model="m", outcome="failure", timestamp=base)
        minimal_fields = {"provider", "model", "outcome", "call_id", "timestamp"}
        for f in attrs.fields(LLMCallRecord):
            if f.name not in minimal_fields:
                assert getattr(rich, f.name) != getattr(plain, f.name), (
                    f"the contract's rich record leaves {f.name!r} at its default; "
                    "give it a distinctive value so the round trip checks it"
                )
        await telemetry.record(rich)
        await telemetry.record(plain)
        await telemetry.flush()
        got = await telemetry.recent(limit=10)
        assert [r.call_id for r in got] == [rich.call_id, plain.call_id]
        _assert_same_record(got[0], rich)
        _assert_same_record(got[1], plain)

    async def test_recent_is_newest_first_and_honours_limit(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_records()
        base = _base_time()
        records = [
            _record(base + timedelta(minutes=i, microseconds=i), call_id=f"r{i:02d}")
            for i in range(30)
        ]
        shuffled = records[:]
        random.Random(7).shuffle(shuffled)
        for r in shuffled[:10]:
            await telemetry.record(r)
        await telemetry.record_many(shuffled[10:])
        await telemetry.flush()
        newest_first = [r.call_id for r in reversed(records)]
        assert [r.call_id for r in await telemetry.recent(limit=5)] == newest_first[:5]
        assert [r.call_id for r in await telemetry.recent()] == newest_first
        assert [r.call_id for r in await telemetry.recent(limit=1000)] == newest_first
        assert await telemetry.recent(limit=0) == []

    async def test_recent_filters_by_workflow_stage_model_and_since(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_records()
        base = _base_time()
        records = [
            _record(
                base + timedelta(minutes=i),
                workflow=("wf-a", "wf-b")[i % 2],
                stage=("plan", "write", "review")[i % 3],
                model=("m1", "m2")[(i // 2) % 2],
                call_id=f"f{i:02d}",
            )
            for i in range(36)
        ]
        await telemetry.record_many(records)
        await telemetry.flush()
        since = records[17].timestamp
        for workflow in (None, "wf-a"):
            for stage in (None, "write"):
                for model in (None, "m2"):
                    for start in (None, since):
                        want = [
                            r.call_id
                            for r in reversed(records)
                            if (workflow is None or r.workflow == workflow)
                            and (stage is None or r.stage == stage)
                            and (model is None or r.model == model)
                            and (start is None or r.timestamp >= start)
                        ]
                        got = await telemetry.recent(
                            limit=100, workflow=workflow, stage=stage, model=model, since=start
                        )
                        assert [r.call_id for r in got] == want, (
                            f"recent(workflow={workflow!r}, stage={stage!r}, "
                            f"model={model!r}, since={start})"
                        )
        assert await telemetry.recent(workflow="no-such-workflow") == []

    # -- aggregation ---------------------------------------------------------------

    async def test_aggregate_matches_brute_force(self, telemetry: TelemetryBackend) -> None:
        self._needs_records()
        records = _aggregation_dataset(_base_time())
        await telemetry.record_many(records[:200])
        for r in records[200:260]:
            await telemetry.record(r)
        await telemetry.record_many(records[260:])
        await telemetry.flush()
        times = sorted({r.timestamp for r in records})
        since, until = times[100], times[300]
        queries: list[dict[str, Any]] = [
            {},
            {"workflow": "wf-a"},
            {"workflow": "wf-b", "stage": "write"},
            {"stage": "plan"},
            {"since": since},
            {"until": until},
            {"since": since, "until": until},
            {"since": since, "until": since},
            {"per_stage": False},
            {"workflow": "wf-b", "per_stage": False, "since": since},
            {"workflow": "no-such-workflow"},
        ]
        for query in queries:
            got = await telemetry.aggregate(**query)
            _assert_aggregate(got, _brute_force(records, **query), f"aggregate({query})")

    async def test_aggregate_since_is_inclusive_and_until_exclusive(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_records()
        base = _base_time()
        t = [base + timedelta(hours=i) for i in range(3)]
        await telemetry.record_many(
            [
                _record(t[0], latency_ms=10.0),
                _record(t[1], latency_ms=20.0),
                _record(t[2], latency_ms=30.0),
            ]
        )
        await telemetry.flush()
        (perf,) = await telemetry.aggregate(since=t[1], until=t[2])
        assert (perf.sample_size, perf.latency_p50_ms) == (1, 20.0)
        assert perf.first_seen == perf.last_seen == t[1]
        assert await telemetry.aggregate(since=t[2], until=t[2]) == []
        (everything,) = await telemetry.aggregate(since=t[0])
        assert everything.sample_size == 3
        assert [r.timestamp for r in await telemetry.recent(since=t[1])] == [t[2], t[1]]

    async def test_aggregate_of_no_successes_has_no_latency(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_records()
        base = _base_time()
        await telemetry.record_many(
            [
                _record(base, outcome=Outcome.FAILURE, latency_ms=900.0, cost_usd=0.01),
                _record(base + timedelta(seconds=1), outcome=Outcome.FATAL, cost_usd=0.03),
                _record(base + timedelta(seconds=2), outcome=Outcome.CANCELLED),
            ]
        )
        await telemetry.flush()
        (perf,) = await telemetry.aggregate()
        assert (perf.sample_size, perf.successes) == (2, 0)
        assert perf.latency_p50_ms is None and perf.latency_p95_ms is None
        assert perf.avg_latency_ms is None
        assert math.isclose(perf.avg_cost_usd, 0.02)
        assert (perf.avg_input_tokens, perf.avg_output_tokens) == (0.0, 0.0)
        assert perf.success_rate == 0.0

    # -- purge, concurrency, flush ---------------------------------------------------

    async def test_purge_deletes_only_older_records(self, telemetry: TelemetryBackend) -> None:
        self._needs_records()
        base = _base_time()
        records = [_record(base + timedelta(hours=i), call_id=f"p{i}") for i in range(10)]
        await telemetry.record_many(records)
        await telemetry.flush()
        cutoff = records[4].timestamp
        assert await telemetry.purge(before=cutoff) == 4
        kept = await telemetry.recent(limit=100)
        assert [r.call_id for r in kept] == [f"p{i}" for i in range(9, 3, -1)]
        assert await telemetry.purge(before=cutoff) == 0
        (perf,) = await telemetry.aggregate()
        assert perf.sample_size == 6

    async def test_concurrent_writers_are_counted_exactly(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_records()
        base = _base_time()
        expected: dict[str, list[int]] = {}  # model -> [samples, successes]
        written: set[str] = set()

        async def writer(task: int) -> None:
            batch = []
            for j in range(3):
                model = f"m{task % 4}"
                ok = (task + j) % 3 != 0
                rec = _record(
                    base + timedelta(seconds=task, milliseconds=j),
                    model=model,
                    outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                    call_id=f"w{task:03d}-{j}",
                )
                counts = expected.setdefault(model, [0, 0])
                counts[0] += 1
                counts[1] += int(ok)
                written.add(rec.call_id)
                batch.append(rec)
            await telemetry.record(batch[0])
            await telemetry.record_many(batch[1:])

        async with anyio.create_task_group() as tg:
            for task in range(100):
                tg.start_soon(writer, task)
        await telemetry.flush()
        got = await telemetry.recent(limit=1000)
        assert len(got) == 300
        assert {r.call_id for r in got} == written
        perf = {p.model: (p.sample_size, p.successes) for p in await telemetry.aggregate()}
        assert perf == {model: (n, ok) for model, (n, ok) in expected.items()}

    async def test_flush_then_read_sees_every_record(self, telemetry: TelemetryBackend) -> None:
        self._needs_records()
        base = _base_time()
        records = [_record(base + timedelta(seconds=i)) for i in range(50)]
        await telemetry.record_many(records)
        await telemetry.flush()
        await telemetry.flush()  # flushing twice is harmless
        assert len(await telemetry.recent(limit=100)) == 50
        (perf,) = await telemetry.aggregate()
        assert perf.sample_size == 50
        await telemetry.record(_record(base + timedelta(seconds=60)))
        await telemetry.flush()
        assert len(await telemetry.recent(limit=100)) == 51

    async def test_a_persistent_backend_keeps_records_across_reopen(
        self, telemetry: TelemetryBackend, telemetry_url: str, telemetry_options: dict[str, Any]
    ) -> None:
        self._needs_records()
        if not telemetry.persistent:
            pytest.skip(f"{type(telemetry).__name__} is not persistent")
        base = _base_time()
        rich = _rich_record(base)
        others = [_record(base + timedelta(seconds=i + 1)) for i in range(9)]
        await telemetry.record(rich)
        await telemetry.record_many(others)
        await telemetry.aclose()  # no flush: closing must flush
        async with telemetry_from_url(telemetry_url, **telemetry_options) as reopened:
            got = await reopened.recent(limit=100)
            assert len(got) == 10
            _assert_same_record(got[-1], rich)

    # -- evidence rollups ----------------------------------------------------------------

    async def test_evidence_equals_the_rollup_of_everything_stored(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_evidence()
        records = _aggregation_dataset(_base_time())
        empty = await telemetry.evidence()
        assert empty.buckets == ()
        await telemetry.record_many(records[:200])
        for r in records[200:230]:
            await telemetry.record(r)
        await telemetry.record_many(records[230:])
        await telemetry.flush()
        batch = await telemetry.evidence()
        assert_same_buckets(batch.buckets, rollup(records), "evidence()")
        assert batch.version > empty.version
        assert all(0 < b.version <= batch.version for b in batch.buckets)
        again = await telemetry.evidence(after_version=batch.version)
        assert again.buckets == () and again.version == batch.version

    async def test_evidence_skips_outcomes_that_are_not_samples(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_evidence()
        base = _base_time()
        not_samples = [o for o in Outcome if not o.is_sample]
        await telemetry.record_many(
            [_record(base + timedelta(seconds=i), outcome=o) for i, o in enumerate(not_samples)]
        )
        await telemetry.flush()
        assert len(await telemetry.recent()) == len(not_samples) > 0
        assert (await telemetry.evidence()).buckets == ()
        await telemetry.record(
            _record(base, outcome=Outcome.FAILURE, cost_usd=0.5, latency_ms=70.0)
        )
        await telemetry.flush()
        (bucket,) = (await telemetry.evidence()).buckets
        assert (bucket.samples, bucket.successes, bucket.latency_n) == (1, 0, 0)
        assert bucket.cost_usd == 0.5 and bucket.latency_log_sum == 0.0

    async def test_evidence_keeps_null_and_empty_workflows_and_stages_apart(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_evidence()
        start = _base_time().replace(second=0)
        arms: list[tuple[str | None, str | None]] = [
            (None, None),
            ("", ""),
            (None, ""),
            ("", None),
            ("wf", None),
            (None, "s"),
            ("wf", "s"),
        ]
        records: list[LLMCallRecord] = []
        for round_ in range(3):  # later rounds add to the buckets the first one created
            batch = [
                _record(
                    start + timedelta(seconds=round_ * 10 + i),
                    workflow=wf,
                    stage=st,
                    latency_ms=10.0 * (i + 1),
                    input_tokens=i + 1,
                )
                for i, (wf, st) in enumerate(arms)
                for _ in range(i + 1)
            ]
            records += batch
            await telemetry.record_many(batch)
            await telemetry.flush()
        buckets = (await telemetry.evidence()).buckets
        assert len(buckets) == len(arms), [b.key for b in buckets]
        assert_same_buckets(buckets, rollup(records), "NULL and '' workflows and stages")
        counts = {(b.workflow, b.stage): b.samples for b in buckets}
        assert counts == {arm: 3 * (i + 1) for i, arm in enumerate(arms)}

    async def test_evidence_since_and_until_select_bucket_starts(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_evidence()
        start = _base_time().replace(second=0)
        records = await _store_per_minute(telemetry, start, minutes=6, seconds=(0, 59))
        assert len((await telemetry.evidence()).buckets) == 6
        minute = timedelta(minutes=1)
        windows: list[tuple[datetime | None, datetime | None]] = [
            (start + 2 * minute, None),
            (None, start + 2 * minute),
            (start + 2 * minute, start + 4 * minute),
            # bounds inside a minute: that bucket starts before since / before until
            (
                start + 2 * minute + timedelta(seconds=30),
                start + 4 * minute + timedelta(microseconds=1),
            ),
            (start + 3 * minute, start + 3 * minute),
            (start + 10 * minute, None),
        ]
        for since, until in windows:
            got = (await telemetry.evidence(since=since, until=until)).buckets
            in_window = [
                r
                for r in records
                if (since is None or r.timestamp.replace(second=0) >= since)
                and (until is None or r.timestamp.replace(second=0) < until)
            ]
            assert_same_buckets(got, rollup(in_window), f"evidence(since={since}, until={until})")

    async def test_incremental_evidence_returns_each_change_once_and_misses_none(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_evidence()
        rng = random.Random(20261203)
        base = _base_time()
        reader = _IncrementalReader(telemetry)
        stored: list[LLMCallRecord] = []
        for round_ in range(12):
            batch = _evidence_records(rng, base, rng.randrange(1, 60), f"inc{round_}")
            stored += batch
            if round_ % 3 == 0:
                for r in batch:
                    await telemetry.record(r)
            else:
                await telemetry.record_many(batch)
            await telemetry.flush()
            before = reader.version
            got = await reader.poll()
            assert {b.key for b in got.buckets} == {b.key for b in rollup(batch)}, (
                f"round {round_}: evidence(after_version={before}) must return exactly the "
                "buckets that the round's records changed"
            )
            assert_same_buckets(reader.buckets(), rollup(stored), f"after round {round_}")
        assert (await reader.poll()).buckets == ()

    async def test_incremental_evidence_with_two_writers_and_a_polling_reader(
        self, telemetry: TelemetryBackend, telemetry_url: str, telemetry_options: dict[str, Any]
    ) -> None:
        self._needs_evidence()
        rng = random.Random(7)
        base = _base_time()
        # a persistent backend is shared: the second writer is a second instance with its
        # own connection; any other backend is written by two tasks at once
        second = (
            telemetry_from_url(telemetry_url, **telemetry_options) if telemetry.persistent else None
        )
        written: list[LLMCallRecord] = []
        reader = _IncrementalReader(telemetry)
        done = anyio.Event()

        async def writer(backend: TelemetryBackend, tag: str) -> None:
            for i in range(15):
                batch = _evidence_records(rng, base, rng.randrange(1, 40), f"{tag}{i}")
                written.extend(batch)
                await backend.record_many(batch)
                await backend.flush()
                await anyio.lowlevel.checkpoint()

        async def poll() -> None:
            while not done.is_set():
                await reader.poll()
                await anyio.sleep(0.001)

        try:
            if second is not None:
                await second.__aenter__()
            async with anyio.create_task_group() as tg:
                tg.start_soon(poll)
                async with anyio.create_task_group() as writers:
                    writers.start_soon(writer, telemetry, "a")
                    writers.start_soon(writer, second or telemetry, "b")
                done.set()
        finally:
            if second is not None:
                await second.aclose()
        await reader.poll()
        assert reader.reads >= 2
        assert_same_buckets(reader.buckets(), rollup(written), "incremental reads")
        assert_same_buckets((await telemetry.evidence()).buckets, rollup(written), "a full read")

    async def test_purge_drops_the_buckets_that_ended_by_the_cutoff(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_evidence()
        start = _base_time().replace(second=0)
        await _store_per_minute(telemetry, start, minutes=4, seconds=(10, 50))
        # minute 0 ends at 1:00, before the cutoff; minute 1 straddles it and is kept whole
        assert await telemetry.purge(before=start + timedelta(minutes=1, seconds=30)) == 3
        got = (await telemetry.evidence()).buckets
        assert [(b.bucket_start, b.samples) for b in got] == [
            (start + timedelta(minutes=m), 2) for m in (1, 2, 3)
        ]
        # a cutoff on a bucket boundary drops the bucket that ends there
        assert await telemetry.purge(before=start + timedelta(minutes=3)) == 3
        got = (await telemetry.evidence()).buckets
        assert [b.bucket_start for b in got] == [start + timedelta(minutes=3)]

    async def test_evidence_arguments_are_checked(self, telemetry: TelemetryBackend) -> None:
        if not self.keeps_evidence:
            pytest.skip(f"{type(self).__name__}: the backend keeps no evidence rollups")
        naive = datetime(2026, 1, 1, 12, 0)
        with pytest.raises(RecordValidationError, match="since"):
            await telemetry.evidence(since=naive)
        with pytest.raises(RecordValidationError, match="until"):
            await telemetry.evidence(until=naive)
        for bad in (-1, True, 1.5, "3"):
            with pytest.raises(ConfigurationError, match="after_version"):
                await telemetry.evidence(after_version=bad)  # type: ignore[arg-type]
        await telemetry.aclose()
        with pytest.raises(BackendClosedError):
            await telemetry.evidence()

    # -- lifecycle and input checks ------------------------------------------------------

    async def test_aclose_is_idempotent(self, telemetry: TelemetryBackend) -> None:
        await telemetry.record(_record(_base_time()))
        await telemetry.aclose()
        await telemetry.aclose()
        assert telemetry.closed

    async def test_use_after_close_raises_backend_closed(self, telemetry: TelemetryBackend) -> None:
        await telemetry.aclose()
        rec = _record(_base_time())
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("record", lambda: telemetry.record(rec)),
            ("record_many", lambda: telemetry.record_many([rec])),
            ("aggregate", lambda: telemetry.aggregate()),
            ("recent", lambda: telemetry.recent()),
            ("purge", lambda: telemetry.purge(before=datetime.now(UTC))),
        ]
        for name, call in calls:
            with pytest.raises(BackendClosedError) as info:
                await call()
            assert isinstance(info.value, BackendError), name

    async def test_naive_datetimes_are_rejected(self, telemetry: TelemetryBackend) -> None:
        naive = datetime(2026, 1, 1, 12, 0)
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("since", lambda: telemetry.aggregate(since=naive)),
            ("until", lambda: telemetry.aggregate(until=naive)),
            ("since", lambda: telemetry.recent(since=naive)),
            ("before", lambda: telemetry.purge(before=naive)),
        ]
        for name, call in calls:
            with pytest.raises(RecordValidationError, match=name) as info:
                await call()
            assert isinstance(info.value, ValueError)

    async def test_the_backend_says_whether_it_keeps_records(
        self, telemetry: TelemetryBackend
    ) -> None:
        # the executor and the router read only from a backend that keeps records
        assert telemetry.stores_records is self.stores_records

    async def test_a_backend_that_keeps_nothing_reads_empty(
        self, telemetry: TelemetryBackend
    ) -> None:
        if self.stores_records:
            pytest.skip("the backend keeps records; the tests above apply")
        base = _base_time()
        await telemetry.record(_rich_record(base))
        await telemetry.record_many([_record(base + timedelta(seconds=i)) for i in range(5)])
        await telemetry.flush()
        assert await telemetry.recent(limit=100) == []
        assert await telemetry.aggregate() == []
        if self.keeps_evidence:
            assert (await telemetry.evidence()).buckets == ()
        assert await telemetry.purge(before=base + timedelta(days=1)) == 0


# --------------------------------------------------------------------------- circuit state

#: Trips after 3 consecutive failures; the failure-rate rule is out of reach.
_TRIP3 = BreakerPolicy(
    consecutive_failures=3,
    minimum_calls=1_000,
    recovery_seconds=0.2,
    max_recovery_seconds=0.2,
    probe_lease_seconds=30.0,
    window_seconds=3_600.0,
)


def _policy(**changes: Any) -> BreakerPolicy:
    return attrs.evolve(_TRIP3, **changes)


def _report(ticket: Ticket | None, outcome: Outcome = Outcome.FAILURE) -> OutcomeReport:
    assert ticket is not None, "an admitted call must carry a ticket"
    return OutcomeReport(ticket=ticket, outcome=outcome, error=f"{outcome.value} (contract)")


async def _admitted(store: CircuitStateStore, key: str, policy: BreakerPolicy) -> Ticket:
    admission = await store.admit(key, policy)
    assert admission.admitted, f"{key!r} should admit, got {admission.state.state.value}"
    assert admission.ticket is not None
    return admission.ticket


async def _fail(
    store: CircuitStateStore, key: str, policy: BreakerPolicy, times: int
) -> CircuitBreakerState:
    state = await store.snapshot(key)
    for _ in range(times):
        ticket = await _admitted(store, key, policy)
        state = await store.record(key, policy, [_report(ticket)])
    return state


async def _wait_for_probe(
    store: CircuitStateStore,
    key: str,
    policy: BreakerPolicy,
    rejected: Admission,
    advance: AdvanceClock,
) -> Ticket:
    """Let the open time pass, then take the first half-open probe (bounded polling)."""
    admission = rejected
    for _ in range(20):
        assert not admission.admitted
        assert admission.retry_after is not None, "an OPEN circuit must say when to retry"
        await advance(admission.retry_after + 0.02)
        admission = await store.admit(key, policy)
        if admission.admitted:
            assert admission.ticket is not None
            return admission.ticket
    raise AssertionError(f"{key!r} never admitted a probe; last state {admission.state}")


@pytest.mark.asyncio
class CircuitStateStoreContract:
    """
    The contract of `CircuitStateStore`.  Override the ``state_store_url`` fixture.

    Covers: unseen keys read CLOSED; tripping at the threshold; stale tickets dropped;
    generation strictly increasing on transitions; OPEN -> HALF_OPEN after the recovery
    time; probe lease exclusivity under 100 concurrent admits; lease expiry; force,
    snapshot, snapshot_all and reset; isolation between keys; 100 concurrent outcome
    reports counted exactly; idempotent close; use after close; naive datetimes.
    """

    keeps_state: ClassVar[bool] = True
    """False for a pass-through store that admits everything (``null://``)."""

    @pytest.fixture
    def state_store_url(self) -> str:
        """The URL of an empty store; subclasses must override this fixture."""
        _fail_override(type(self), "state_store_url")

    @pytest.fixture
    def state_store_options(self) -> dict[str, Any]:
        """Keyword options passed to `state_store_from_url`; none by default."""
        return {}

    @pytest.fixture
    def advance_clock(self) -> AdvanceClock:
        """
        ``await advance(seconds)`` makes the store's clock pass ``seconds``.

        Default: wait that long (`anyio.sleep`), for stores on the wall clock or server
        time.  Override it for a store built with a `FakeClock` (``clock.sleep``).
        """
        return anyio.sleep

    @pytest_asyncio.fixture(loop_scope="function")
    async def state_store(
        self, state_store_url: str, state_store_options: dict[str, Any]
    ) -> AsyncIterator[CircuitStateStore]:
        """The store under test, built from the URL, entered and closed after the test."""
        store = state_store_from_url(state_store_url, **state_store_options)
        async with store:
            yield store

    def _needs_state(self) -> None:
        if not self.keeps_state:
            pytest.skip(f"{type(self).__name__}: the store keeps no state")

    # -- basics ------------------------------------------------------------------------

    async def test_an_unseen_key_reads_closed_at_generation_zero(
        self, state_store: CircuitStateStore
    ) -> None:
        state = await state_store.snapshot("never-seen")
        assert (state.key, state.state, state.generation) == ("never-seen", CircuitState.CLOSED, 0)
        assert state.failure_count == 0 and not state.is_open and state.probes_in_flight == 0

    async def test_closed_admits_with_a_ticket_of_the_current_generation(
        self, state_store: CircuitStateStore
    ) -> None:
        admission = await state_store.admit("k", _TRIP3)
        assert admission.admitted and admission.retry_after is None
        assert admission.ticket is not None
        assert admission.ticket.key == "k" and admission.ticket.lease_id is None
        assert admission.ticket.generation == (await state_store.snapshot("k")).generation

    async def test_trips_exactly_at_the_threshold(self, state_store: CircuitStateStore) -> None:
        self._needs_state()
        below = await _fail(state_store, "one-by-one", _TRIP3, 2)
        assert below.state is CircuitState.CLOSED and below.failure_count == 2
        assert below.generation == 0, "counting failures is not a transition"
        tripped = await _fail(state_store, "one-by-one", _TRIP3, 1)
        assert tripped.state is CircuitState.OPEN and tripped.is_open
        assert tripped.generation == 1
        assert tripped.opened_at is not None and tripped.open_until is not None
        rejected = await state_store.admit("one-by-one", _TRIP3)
        assert not rejected.admitted and rejected.ticket is None
        assert rejected.state.state is CircuitState.OPEN
        assert rejected.retry_after is not None
        assert 0 < rejected.retry_after <= _TRIP3.recovery_seconds + 1e-6

        # the same three failures reported as one batch trip the breaker too
        tickets = [await _admitted(state_store, "batch", _TRIP3) for _ in range(3)]
        batch = await state_store.record("batch", _TRIP3, [_report(t) for t in tickets])
        assert batch.state is CircuitState.OPEN and batch.generation == 1

    async def test_a_success_ends_the_failure_streak(self, state_store: CircuitStateStore) -> None:
        self._needs_state()
        await _fail(state_store, "k", _TRIP3, 2)
        ok = await state_store.record(
            "k", _TRIP3, [_report(await _admitted(state_store, "k", _TRIP3), Outcome.SUCCESS)]
        )
        assert ok.failure_count == 0
        state = await _fail(state_store, "k", _TRIP3, 2)
        assert state.state is CircuitState.CLOSED and state.failure_count == 2

    async def test_outcomes_that_are_not_samples_change_nothing(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        await _fail(state_store, "k", _TRIP3, 2)
        for outcome in (o for o in Outcome if not o.is_sample):
            ticket = await _admitted(state_store, "k", _TRIP3)
            state = await state_store.record("k", _TRIP3, [_report(ticket, outcome)])
            assert state.state is CircuitState.CLOSED and state.failure_count == 2, outcome

    # -- generations -----------------------------------------------------------------

    async def test_a_stale_ticket_is_dropped(self, state_store: CircuitStateStore) -> None:
        self._needs_state()
        policy = _policy(consecutive_failures=1)
        # a reset must outdate tickets even of a key that never changed generation
        fresh = await _admitted(state_store, "fresh", policy)
        await state_store.reset("fresh")
        after_fresh = await state_store.record("fresh", policy, [_report(fresh)])
        assert after_fresh.state is CircuitState.CLOSED and after_fresh.failure_count == 0

        old = await _admitted(state_store, "k", policy)
        forced = await state_store.force("k", CircuitState.CLOSED)
        assert forced.generation > old.generation
        after = await state_store.record("k", policy, [_report(old)])
        assert after.state is CircuitState.CLOSED and after.failure_count == 0
        assert after.generation == forced.generation

        before_reset = await _admitted(state_store, "k", policy)
        await state_store.reset("k")
        after_reset = await state_store.record("k", policy, [_report(before_reset)])
        assert after_reset.state is CircuitState.CLOSED and after_reset.failure_count == 0
        snap = await state_store.snapshot("k")
        assert snap.state is CircuitState.CLOSED and snap.failure_count == 0

    async def test_generation_strictly_increases_on_every_transition(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        seen = [(await state_store.snapshot("k")).generation]
        seen.append((await _fail(state_store, "k", _TRIP3, 3)).generation)  # CLOSED -> OPEN
        targets = (
            CircuitState.FORCED_OPEN,
            CircuitState.DISABLED,
            CircuitState.CLOSED,
            CircuitState.FORCED_OPEN,
            CircuitState.CLOSED,
        )
        seen.extend([(await state_store.force("k", target)).generation for target in targets])
        assert all(a < b for a, b in itertools.pairwise(seen)), seen
        assert (await state_store.snapshot("k")).generation == seen[-1]

    # -- time: recovery, probes, leases ------------------------------------------------

    async def test_open_becomes_half_open_after_recovery_and_a_probe_success_closes(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        opened = await _fail(state_store, "k", _TRIP3, 3)
        rejected = await state_store.admit("k", _TRIP3)
        probe = await _wait_for_probe(state_store, "k", _TRIP3, rejected, advance_clock)
        assert probe.lease_id is not None and probe.lease_expires_ts is not None
        assert probe.generation == opened.generation + 1
        half_open = await state_store.snapshot("k")
        assert half_open.state is CircuitState.HALF_OPEN and half_open.probes_in_flight == 1
        second = await state_store.admit("k", _TRIP3)
        assert not second.admitted and second.state.state is CircuitState.HALF_OPEN
        assert second.retry_after is not None and second.retry_after > 0
        closed = await state_store.record("k", _TRIP3, [_report(probe, Outcome.SUCCESS)])
        assert closed.state is CircuitState.CLOSED and not closed.is_open
        assert closed.generation == probe.generation + 1
        assert (await state_store.admit("k", _TRIP3)).admitted

    async def test_half_open_grants_exactly_the_probe_count_under_concurrency(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        policy = _policy(half_open_probes=3)
        await _fail(state_store, "k", policy, 3)
        admission = await state_store.admit("k", policy)
        results: list[Admission] = []

        async def admit() -> None:
            results.append(await state_store.admit("k", policy))

        for _ in range(5):
            assert admission.retry_after is not None
            await advance_clock(admission.retry_after + 0.05)
            results.clear()
            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(admit)
            if any(r.state.state is not CircuitState.OPEN for r in results):
                break
            admission = min(results, key=lambda r: r.retry_after or 0.0)
        granted = [r.ticket for r in results if r.admitted and r.ticket is not None]
        assert len(results) == 100
        assert len(granted) == policy.half_open_probes, (
            f"{len(granted)} of 100 concurrent admits got a probe lease; "
            f"expected exactly {policy.half_open_probes}"
        )
        assert len({t.lease_id for t in granted}) == len(granted)
        assert all(not r.admitted and r.retry_after for r in results if r.ticket is None)
        snap = await state_store.snapshot("k")
        assert snap.state is CircuitState.HALF_OPEN and snap.probes_in_flight == 3

        # one probe fails: OPEN again, and the other probes' tickets are now stale
        reopened = await state_store.record("k", policy, [_report(granted[0])])
        assert reopened.state is CircuitState.OPEN
        assert reopened.generation == granted[0].generation + 1
        late = await state_store.record("k", policy, [_report(granted[1], Outcome.SUCCESS)])
        assert late.state is CircuitState.OPEN and late.generation == reopened.generation

    async def test_an_expired_probe_lease_frees_its_slot(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        policy = _policy(probe_lease_seconds=0.2)
        await _fail(state_store, "k", policy, 3)
        first = await _wait_for_probe(
            state_store, "k", policy, await state_store.admit("k", policy), advance_clock
        )
        blocked = await state_store.admit("k", policy)
        assert not blocked.admitted and blocked.retry_after is not None
        assert 0 < blocked.retry_after <= policy.probe_lease_seconds + 1e-6
        await advance_clock(blocked.retry_after + 0.02)
        # the first probe reports after its lease expired: too late to count
        late = await state_store.record("k", policy, [_report(first, Outcome.SUCCESS)])
        assert late.state is CircuitState.HALF_OPEN, "an expired probe must not close"
        second = await _admitted(state_store, "k", policy)
        assert second.lease_id is not None and second.lease_id != first.lease_id
        closed = await state_store.record("k", policy, [_report(second, Outcome.SUCCESS)])
        assert closed.state is CircuitState.CLOSED

    async def test_forced_open_until_a_time_then_probes(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        held = await state_store.force("k", CircuitState.FORCED_OPEN, reason="maintenance")
        assert held.updated_at_ts is not None, "a transition records the store's time"
        until = datetime.fromtimestamp(held.updated_at_ts + 0.2, UTC)
        timed = await state_store.force("k", CircuitState.FORCED_OPEN, until=until)
        assert timed.state is CircuitState.FORCED_OPEN and timed.open_until is not None
        rejected = await state_store.admit("k", _TRIP3)
        assert not rejected.admitted and rejected.retry_after is not None
        assert 0 < rejected.retry_after <= 0.2 + 1e-6
        probe = await _wait_for_probe(state_store, "k", _TRIP3, rejected, advance_clock)
        assert probe.lease_id is not None
        assert (await state_store.snapshot("k")).state is CircuitState.HALF_OPEN

    # -- manual control and isolation --------------------------------------------------

    async def test_force_snapshot_snapshot_all_and_reset(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        await _fail(state_store, "c", _TRIP3, 2)  # keys touched out of order on purpose
        held = await state_store.force("a", CircuitState.FORCED_OPEN, reason="maintenance")
        assert held.state is CircuitState.FORCED_OPEN and held.reason == "maintenance"
        snap = await state_store.snapshot("a")
        assert (snap.state, snap.generation, snap.reason) == (
            held.state,
            held.generation,
            held.reason,
        )
        rejected = await state_store.admit("a", _TRIP3)
        assert not rejected.admitted and rejected.retry_after is None, "held until reset"

        disabled = await state_store.force("b", CircuitState.DISABLED)
        assert disabled.state is CircuitState.DISABLED and not disabled.is_open
        after_failures = await _fail(state_store, "b", _TRIP3, 10)
        assert after_failures.state is CircuitState.DISABLED, "DISABLED never trips"

        everything = await state_store.snapshot_all()
        assert [s.key for s in everything] == ["a", "b", "c"]
        assert [s.state for s in everything] == [
            CircuitState.FORCED_OPEN,
            CircuitState.DISABLED,
            CircuitState.CLOSED,
        ]
        assert everything[2].failure_count == 2

        await state_store.reset("a")
        assert (await state_store.snapshot("a")).state is CircuitState.CLOSED
        assert (await state_store.admit("a", _TRIP3)).admitted
        assert (await state_store.snapshot("b")).state is CircuitState.DISABLED
        assert (await state_store.snapshot("c")).failure_count == 2

        await state_store.reset()
        for state in await state_store.snapshot_all():
            assert state.state is CircuitState.CLOSED and state.failure_count == 0, state
        for key in ("a", "b", "c"):
            assert (await state_store.snapshot(key)).state is CircuitState.CLOSED

        closed = await state_store.force("a", CircuitState.CLOSED, reason="by hand")
        assert closed.state is CircuitState.CLOSED

    async def test_keys_are_isolated(self, state_store: CircuitStateStore) -> None:
        self._needs_state()
        await _fail(state_store, "provider-a", _TRIP3, 3)
        await _fail(state_store, "provider-b", _TRIP3, 2)
        assert (await state_store.snapshot("provider-a")).state is CircuitState.OPEN
        b = await state_store.snapshot("provider-b")
        assert (b.state, b.failure_count, b.generation) == (CircuitState.CLOSED, 2, 0)
        assert (await state_store.admit("provider-b", _TRIP3)).admitted
        assert not (await state_store.admit("provider-a", _TRIP3)).admitted
        await state_store.reset("provider-a")
        assert (await state_store.snapshot("provider-b")).failure_count == 2
        await state_store.force("provider-b", CircuitState.FORCED_OPEN)
        assert (await state_store.snapshot("provider-a")).state is CircuitState.CLOSED
        assert (await state_store.snapshot("provider-a:model-x")).generation == 0

    async def test_concurrent_outcomes_are_counted_exactly(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        policy = _policy(consecutive_failures=1_000)

        async def call(key: str, outcome: Outcome) -> None:
            ticket = await _admitted(state_store, key, policy)
            await state_store.record(key, policy, [_report(ticket, outcome)])

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(call, "failing", Outcome.FAILURE)
                tg.start_soon(call, "healthy", Outcome.SUCCESS)
        failing = await state_store.snapshot("failing")
        assert failing.state is CircuitState.CLOSED
        assert (failing.failure_count, failing.window_calls, failing.window_failures) == (
            100,
            100,
            100,
        )
        healthy = await state_store.snapshot("healthy")
        assert (healthy.failure_count, healthy.window_calls, healthy.window_failures) == (
            0,
            100,
            0,
        )

    async def test_a_shared_store_shows_one_instance_to_another(
        self,
        state_store: CircuitStateStore,
        state_store_url: str,
        state_store_options: dict[str, Any],
    ) -> None:
        self._needs_state()
        if not state_store.shared:
            pytest.skip(f"{type(state_store).__name__} is not shared between instances")
        async with state_store_from_url(state_store_url, **state_store_options) as other:
            ticket = await _admitted(state_store, "k", _TRIP3)
            forced = await other.force("k", CircuitState.FORCED_OPEN, reason="from another")
            seen = await state_store.snapshot("k")
            assert (seen.state, seen.generation) == (CircuitState.FORCED_OPEN, forced.generation)
            assert not (await state_store.admit("k", _TRIP3)).admitted
            await other.reset("k")
            stale = await state_store.record("k", _TRIP3, [_report(ticket)])
            assert stale.state is CircuitState.CLOSED and stale.failure_count == 0
            assert [s.key for s in await other.snapshot_all()] == ["k"]

    # -- lifecycle and input checks ------------------------------------------------------

    async def test_aclose_is_idempotent(self, state_store: CircuitStateStore) -> None:
        await state_store.admit("k", _TRIP3)
        await state_store.aclose()
        await state_store.aclose()
        assert state_store.closed

    async def test_use_after_close_raises_backend_closed(
        self, state_store: CircuitStateStore
    ) -> None:
        ticket = await _admitted(state_store, "k", _TRIP3)
        await state_store.aclose()
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("admit", lambda: state_store.admit("k", _TRIP3)),
            ("record", lambda: state_store.record("k", _TRIP3, [_report(ticket)])),
            ("force", lambda: state_store.force("k", CircuitState.FORCED_OPEN)),
            ("snapshot", lambda: state_store.snapshot("k")),
            ("snapshot_all", lambda: state_store.snapshot_all()),
            ("reset", lambda: state_store.reset("k")),
            ("reset all", lambda: state_store.reset()),
        ]
        for name, call in calls:
            with pytest.raises(BackendClosedError) as info:
                await call()
            assert isinstance(info.value, BackendError), name

    async def test_a_naive_until_is_rejected(self, state_store: CircuitStateStore) -> None:
        with pytest.raises(RecordValidationError, match="until") as info:
            await state_store.force("k", CircuitState.FORCED_OPEN, until=datetime(2030, 1, 1, 0, 0))
        assert isinstance(info.value, ValueError)
        state = await state_store.snapshot("k")
        assert (state.state, state.generation) == (CircuitState.CLOSED, 0)

    async def test_a_store_that_keeps_nothing_admits_everything(
        self, state_store: CircuitStateStore
    ) -> None:
        if self.keeps_state:
            pytest.skip("the store keeps state; the tests above apply")
        policy = _policy(consecutive_failures=1)
        for _ in range(20):
            ticket = await _admitted(state_store, "k", policy)
            state = await state_store.record("k", policy, [_report(ticket, Outcome.FATAL)])
            assert state.state is CircuitState.CLOSED
        await state_store.force("k", CircuitState.FORCED_OPEN)
        assert (await state_store.admit("k", policy)).admitted
        assert await state_store.snapshot_all() == []
        await state_store.reset()
