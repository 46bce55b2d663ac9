"""
MemoryTelemetryBackend's evidence: records are rolled into minute buckets when the
evidence is read, and what eviction drops from the ring stays in the buckets.  Its
writes are idempotent by call_id over the records it holds.
"""

from __future__ import annotations

import gc
import weakref
from datetime import UTC, datetime, timedelta

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    Outcome,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import ConfigurationError
from empathy_models.testing.clock import FakeClock


def _record(i: int, outcome: Outcome = Outcome.SUCCESS) -> LLMCallRecord:
    return LLMCallRecord(
        provider="openai",
        model="gpt-x",
        outcome=outcome,
        workflow="wf",
        stage="s",
        latency_ms=100.0 + i,
        input_tokens=10,
        output_tokens=20 + i,
        cost_usd=0.001,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
    )


async def test_evicted_records_stay_in_the_evidence() -> None:
    backend = MemoryTelemetryBackend(capacity=5)
    with pytest.warns(ResourceWarning, match="full"):
        for i in range(12):
            await backend.record(_record(i, Outcome.FAILURE if i % 4 == 0 else Outcome.SUCCESS))
    assert len(backend) == 5 and backend.evicted == 7
    batch = await backend.evidence()
    assert sum(b.samples for b in batch.buckets) == 12
    assert sum(b.successes for b in batch.buckets) == 9
    assert sum(b.output_tokens for b in batch.buckets) == sum(20 + i for i in range(12) if i % 4)
    # only the five records still in the ring are aggregated
    (performance,) = await backend.aggregate()
    assert performance.sample_size == 5


async def test_evidence_read_in_steps_sees_each_record_once() -> None:
    backend = MemoryTelemetryBackend()
    for i in range(3):
        await backend.record(_record(i))
    first = await backend.evidence()
    assert sum(b.samples for b in first.buckets) == 3
    assert (await backend.evidence(after_version=first.version)).buckets == ()
    for i in range(3, 70):  # into the next minute's bucket too
        await backend.record(_record(i))
    second = await backend.evidence(after_version=first.version)
    assert second.version > first.version
    # the changed buckets, in full: the first minute's holds its first three records too
    assert sum(b.samples for b in second.buckets) == 70
    assert {b.bucket_start.minute for b in second.buckets} == {0, 1}
    assert (await backend.evidence(after_version=second.version)).buckets == ()


async def test_the_backend_holds_no_more_records_than_its_capacity() -> None:
    # nothing reads the evidence here: records evicted from the ring are not kept
    # anywhere else (only their buckets are)
    backend = MemoryTelemetryBackend(capacity=5)
    alive = []
    with pytest.warns(ResourceWarning, match="full"):
        for i in range(40):
            record = _record(i)
            alive.append(weakref.ref(record))
            await backend.record(record)
            del record
    gc.collect()
    assert sum(ref() is not None for ref in alive) == 5
    assert sum(b.samples for b in (await backend.evidence()).buckets) == 40


async def test_a_record_whose_rollup_fails_leaves_the_rest_of_its_batch_in_the_evidence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryTelemetryBackend()
    odd = _record(99)
    # a naive timestamp the validators would refuse, set behind their back: its rollup fails
    object.__setattr__(odd, "timestamp", datetime(2026, 1, 1))
    await backend.record_many([_record(0), odd, *(_record(i) for i in range(1, 10))])
    with caplog.at_level("WARNING", logger="empathy_models.telemetry"):
        batch = await backend.evidence()
    assert sum(b.samples for b in batch.buckets) == 10
    assert f"record {odd.call_id} is left out of the evidence" in caplog.text
    assert len(backend) == 11  # the record itself is kept
    await backend.record(_record(10))
    assert sum(b.samples for b in (await backend.evidence()).buckets) == 11


async def test_a_replayed_call_is_stored_and_counted_once() -> None:
    # writes are idempotent by call_id, as in SQLite and PostgreSQL: a call reported
    # again (a replay) after a refresh is counted once by the router, live and restarted
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    registry = ModelRegistry(
        models=(
            ModelInfo(
                id="gpt-x",
                provider="openai",
                tier="cheap",
                input_price_per_mtok=0.4,
                output_price_per_mtok=1.6,
                context_window=128_000,
                max_output_tokens=8192,
            ),
        ),
        price_version="dup-test",
    )
    call = _record(1)  # stamped after the first refresh begins
    async with (
        MemoryTelemetryBackend() as store,
        AdaptiveModelRouter(registry, store, clock=clock, refresh_interval=None) as live,
    ):
        for _ in range(2):
            await store.record(call)
            live.record_outcome(call)
            await live.refresh()
            clock.advance(5.0)
        assert len(await store.recent(limit=10)) == 1
        sizes = [live.get_best_model("wf", "s").candidates[0].sample_size]
        async with AdaptiveModelRouter(registry, store, clock=clock, refresh_interval=None) as new:
            sizes.append(new.get_best_model("wf", "s").candidates[0].sample_size)
    assert sizes == [1, 1]


async def test_only_the_ids_of_the_records_held_are_kept() -> None:
    # the ids are bounded by the capacity: a call written again once its first record
    # was dropped from the ring, or purged, is stored again
    backend = MemoryTelemetryBackend(capacity=3)
    records = [_record(i) for i in range(5)]
    await backend.record_many(records[:3])
    await backend.record_many([records[0], records[2]])
    assert len(backend) == 3 and backend.evicted == 0
    with pytest.warns(ResourceWarning, match="full"):
        await backend.record_many(records[3:])  # drops records 0 and 1
    await backend.record(records[0])
    assert [r.call_id for r in await backend.recent()] == [records[i].call_id for i in (4, 3, 0)]
    assert backend.evicted == 3  # record 2 made room for record 0 again
    assert await backend.purge(before=records[4].timestamp) == 2
    await backend.record_many([records[3], records[4]])
    assert [r.call_id for r in await backend.recent()] == [records[i].call_id for i in (4, 3)]


def _minute(m: int) -> LLMCallRecord:
    return LLMCallRecord(
        provider="openai",
        model="gpt-x",
        outcome=Outcome.SUCCESS,
        workflow="wf",
        stage="s",
        latency_ms=100.0,
        input_tokens=10,
        output_tokens=20,
        cost_usd=0.001,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=m),
    )


async def _per_minute(backend: MemoryTelemetryBackend, days: int) -> list[LLMCallRecord]:
    """One call a minute for ``days`` days from 2026-01-01; the last day's returned."""
    last: list[LLMCallRecord] = []
    for day in range(days):
        last = [_minute(day * 1440 + m) for m in range(1440)]
        await backend.record_many(last)
    return last


async def test_evidence_older_than_the_retention_is_dropped_once_the_ring_is_full() -> None:
    # one bucket a minute: without a horizon the buckets outgrow the ring for ever
    backend = MemoryTelemetryBackend(capacity=1000, evidence_days=1)
    with pytest.warns(ResourceWarning, match="full"):
        last_day = await _per_minute(backend, 10)
    buckets = (await backend.evidence()).buckets
    # the last day (the retention) and at most two rings' worth of older minutes
    assert 1440 <= len(buckets) <= 1440 + 2 * 1000
    # what a window within the retention asks for is all there
    since = last_day[-1].timestamp - timedelta(days=1) + timedelta(minutes=1)
    window = (await backend.evidence(since=since)).buckets
    assert [b.bucket_start for b in window] == [r.timestamp for r in last_day]


@pytest.mark.slow
async def test_the_default_retention_is_a_month() -> None:
    backend = MemoryTelemetryBackend(capacity=1000)
    assert backend.evidence_days == 31
    with pytest.warns(ResourceWarning, match="full"):
        await _per_minute(backend, 40)
    assert 31 * 1440 <= len((await backend.evidence()).buckets) <= 31 * 1440 + 2 * 1000


async def test_a_held_record_keeps_its_evidence_whatever_its_age() -> None:
    backend = MemoryTelemetryBackend(capacity=1000, evidence_days=1)
    old = _minute(0)  # day 0's first minute, written after day 2: held for 999 more writes
    with pytest.warns(ResourceWarning, match="full"):
        await _per_minute(backend, 3)
        await backend.record(old)
        for m in range(999):
            await backend.record(_minute(3 * 1440 + m))
    buckets = (await backend.evidence()).buckets
    assert (buckets[0].bucket_start, buckets[0].samples) == (old.timestamp, 1)
    assert buckets[1].bucket_start > old.timestamp + timedelta(days=1)


def test_evidence_days_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="evidence_days must be"):
        MemoryTelemetryBackend(evidence_days=0)
    assert MemoryTelemetryBackend(evidence_days=None).evidence_days is None
