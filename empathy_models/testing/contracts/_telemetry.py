"""
`TelemetryBackendContract`: the fixtures a backend's test module overrides, and the
tests of records (round trip, order, filters, purge, concurrency, flush, reopen) and of
the backend's lifecycle; the aggregation and evidence tests come from their mixins.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import attrs
import pytest
import pytest_asyncio

from ...abc import TelemetryBackend
from ...backends import telemetry_from_url
from ...evidence import rollup
from ...exceptions import BackendClosedError, BackendError, RecordValidationError
from ...records import LLMCallRecord, Outcome
from ._aggregate import _AggregateTests
from ._base import (
    _assert_same_record,
    _base_time,
    _fail_override,
    _record,
    _rich_record,
    _TelemetryTests,
)
from ._evidence import _EvidenceTests, assert_same_buckets

__all__ = ["TelemetryBackendContract"]


class _RecordTests(_TelemetryTests):
    """Every field through record -> recent, newest-first order, limit and filters."""

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

    async def test_recent_until_reads_the_newest_records_before_it(
        self, telemetry: TelemetryBackend
    ) -> None:
        # ``until`` is exclusive: the ``limit`` newest records before it come back however
        # many later ones there are (a what-if over a past window reads them)
        self._needs_records()
        base = _base_time()
        records = [
            _record(
                base + timedelta(seconds=10 * i),
                outcome=Outcome.CACHE_HIT if i % 5 == 4 else Outcome.SUCCESS,
                stage=("plan", "write")[i % 2],
                call_id=f"u{i:02d}",
            )
            for i in range(60)
        ]
        await telemetry.record_many(records)
        await telemetry.flush()
        until = records[20].timestamp
        since = records[5].timestamp
        for stage in (None, "write"):
            for start in (None, since):
                for samples_only in (False, True):
                    for limit in (0, 3, 100):
                        want = [
                            r.call_id
                            for r in reversed(records)
                            if r.timestamp < until
                            and (start is None or r.timestamp >= start)
                            and (stage is None or r.stage == stage)
                            and (not samples_only or r.outcome.is_sample)
                        ][:limit]
                        got = await telemetry.recent(
                            limit=limit,
                            stage=stage,
                            since=start,
                            until=until,
                            samples_only=samples_only,
                        )
                        assert [r.call_id for r in got] == want, (
                            f"recent(limit={limit}, stage={stage!r}, since={start}, "
                            f"until={until}, samples_only={samples_only})"
                        )
        assert await telemetry.recent(until=records[0].timestamp) == []
        assert len(await telemetry.recent(limit=100, until=base + timedelta(days=1))) == 60

    async def test_spend_sums_the_cost_of_every_outcome(self, telemetry: TelemetryBackend) -> None:
        # what the calls cost, cancelled streams and other attempts `aggregate` leaves
        # out included, per (workflow, stage, model); "" and None are the same group
        self._needs_records()
        base = _base_time()
        kinds = list(Outcome)
        records = [
            _record(
                base + timedelta(seconds=i),
                outcome=kinds[i % len(kinds)],
                workflow=(None, "", "wf")[i % 3],
                stage=("write", None, "")[(i // 3) % 3],
                model=("m1", "m2")[i % 2],
                cost_usd=0.001 * (i % 7),
                call_id=f"p{i:02d}",
            )
            for i in range(90)
        ]
        records.append(_record(base + timedelta(seconds=95), cost_usd=1.7e308, call_id="huge"))
        await telemetry.record_many(records)
        await telemetry.flush()
        times = (None, records[30].timestamp, records[70].timestamp)
        for workflow in (None, "", "wf"):
            for stage in (None, "", "write"):
                for since, until in ((None, None), (times[1], times[2]), (times[2], None)):
                    want: dict[tuple[str | None, str | None, str], float] = {}
                    for r in records:
                        if (
                            (workflow is None or (r.workflow or "") == workflow)
                            and (stage is None or (r.stage or "") == stage)
                            and (since is None or r.timestamp >= since)
                            and (until is None or r.timestamp < until)
                        ):
                            key = (r.workflow or None, r.stage or None, r.model)
                            want[key] = want.get(key, 0.0) + min(r.cost_usd, 1e300)
                    got = await telemetry.spend(
                        workflow=workflow, stage=stage, since=since, until=until
                    )
                    where = f"spend({workflow=}, {stage=}, {since=}, {until=})"
                    assert set(got) == set(want), where
                    for key, cost in want.items():
                        assert got[key] == pytest.approx(cost, rel=1e-9, abs=1e-15), where

    async def test_recent_samples_only_reads_past_records_that_are_not_samples(
        self, telemetry: TelemetryBackend
    ) -> None:
        # the ``limit`` newest samples (success, failure, rate_limited, fatal), however
        # many cache hits, cancelled or refused calls are newer
        self._needs_records()
        base = _base_time()
        kinds = list(Outcome)
        records = [
            _record(
                base + timedelta(seconds=i),
                outcome=kinds[i % len(kinds)] if i < 40 else Outcome.CACHE_HIT,
                stage=("plan", "write")[i % 2],
                call_id=f"s{i:02d}",
            )
            for i in range(70)
        ]
        await telemetry.record_many(records)
        await telemetry.flush()
        for stage in (None, "write"):
            for limit in (0, 3, 100):
                want = [
                    r.call_id
                    for r in reversed(records)
                    if r.outcome.is_sample and (stage is None or r.stage == stage)
                ][:limit]
                got = await telemetry.recent(
                    limit=limit, workflow="wf", stage=stage, samples_only=True
                )
                assert [r.call_id for r in got] == want, f"stage={stage!r}, limit={limit}"
        every = await telemetry.recent(limit=100, samples_only=False)
        assert len(every) == 70

    async def test_an_empty_workflow_or_stage_filter_finds_the_records_without_one(
        self, telemetry: TelemetryBackend
    ) -> None:
        # a call without a workflow (or stage) may be recorded with None or "": both
        # are the one group `aggregate` reports as None, and the filter "" finds both
        self._needs_records()
        base = _base_time()
        names = (None, "", "x")
        records = [
            _record(
                base + timedelta(seconds=i),
                workflow=names[i % 3],
                stage=names[(i // 3) % 3],
                outcome=Outcome.FAILURE if i % 2 else Outcome.SUCCESS,
                call_id=f"e{i:02d}",
            )
            for i in range(36)
        ]
        await telemetry.record_many(records)
        await telemetry.flush()
        for workflow in (None, "", "x"):
            for stage in (None, "", "x"):
                want = [
                    r
                    for r in reversed(records)
                    if (workflow is None or (r.workflow or "") == workflow)
                    and (stage is None or (r.stage or "") == stage)
                ]
                got = await telemetry.recent(limit=100, workflow=workflow, stage=stage)
                where = f"workflow={workflow!r}, stage={stage!r}"
                assert [r.call_id for r in got] == [r.call_id for r in want], where
                perfs = await telemetry.aggregate(
                    workflow=workflow, stage=stage, per_stage=stage is not None
                )
                assert sum(p.sample_size for p in perfs) == len(want), where
                if workflow is not None:
                    assert {p.workflow or "" for p in perfs} == {workflow}, where


class _StorageTests(_TelemetryTests):
    """Purge, concurrent writers, flush, and a persistent backend's reopen."""

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

    async def test_a_call_written_again_is_stored_once(self, telemetry: TelemetryBackend) -> None:
        # writes are idempotent by call_id (a replayed spool, a retried batch): a record
        # whose call_id is stored is skipped, the first written kept; in one batch too
        self._needs_records()
        base = _base_time()
        first = _record(base, call_id="once-a", latency_ms=10.0)
        other = _record(base + timedelta(seconds=1), call_id="once-b", outcome=Outcome.FAILURE)
        await telemetry.record(first)
        await telemetry.flush()
        again = attrs.evolve(first, outcome=Outcome.FAILURE, latency_ms=99.0)
        await telemetry.record_many([other, again, other])
        await telemetry.record(first)
        await telemetry.flush()
        got = await telemetry.recent(limit=10)
        assert [r.call_id for r in got] == ["once-b", "once-a"]
        _assert_same_record(got[1], first)
        (perf,) = await telemetry.aggregate()
        assert (perf.sample_size, perf.successes) == (2, 1)
        if self.keeps_evidence:
            buckets = (await telemetry.evidence()).buckets
            assert_same_buckets(buckets, rollup([first, other]), "a call written again")

    async def test_long_names_are_stored_and_hold_up_no_other_record(
        self, telemetry: TelemetryBackend
    ) -> None:
        # nothing bounds a name's length (an ExecutionContext takes a 3,000-character
        # stage): a record whose names are long and incompressible is stored and found
        # like any other, and the records written with it are stored too (a database
        # index entry has a size limit).  A twin differing in the last character only
        # is another arm and another call.
        self._needs_records()
        base = _base_time()
        rng = random.Random(11)
        fields = ("workflow", "stage", "model", "provider", "call_id")
        names: dict[str, Any] = {
            f: f + "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(3_000)) for f in fields
        }
        long_one = attrs.evolve(_record(base + timedelta(seconds=1), ttft_ms=5.0), **names)
        twin = attrs.evolve(
            _record(base + timedelta(seconds=2)),
            **{f: v[:-1] + "x" for f, v in names.items()},
        )
        before = _record(base, call_id="short-before")
        after = _record(base + timedelta(seconds=3), call_id="short-after")
        await telemetry.record_many([before, long_one, twin, after])
        await telemetry.record(attrs.evolve(long_one, latency_ms=99.0))  # again: stored once
        await telemetry.flush()
        got = await telemetry.recent(limit=10)
        assert [r.call_id for r in got] == [r.call_id for r in (after, twin, long_one, before)]
        _assert_same_record(got[2], long_one)
        _assert_same_record(got[1], twin)
        found = await telemetry.recent(
            workflow=names["workflow"], stage=names["stage"], model=names["model"]
        )
        assert [r.call_id for r in found] == [long_one.call_id]
        perf = await telemetry.aggregate(workflow=names["workflow"], stage=names["stage"])
        assert [(p.model, p.provider, p.sample_size) for p in perf] == [
            (names["model"], names["provider"], 1)
        ]
        assert len(await telemetry.aggregate()) == 3
        if self.keeps_evidence:
            buckets = (await telemetry.evidence()).buckets
            assert_same_buckets(buckets, rollup([before, long_one, twin, after]), "long names")

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


# pytest collects inherited tests base first (the reverse of the method resolution order),
# so the groups are listed last first and run as: records, aggregation, storage,
# evidence, then the lifecycle tests below
@pytest.mark.asyncio
class TelemetryBackendContract(_EvidenceTests, _StorageTests, _AggregateTests, _RecordTests):
    """
    The contract of `TelemetryBackend`.  Override the ``telemetry_url`` fixture.

    Covers: every field surviving record -> recent; newest-first order, limit and
    filters; aggregation against a brute-force computation (sample outcomes only,
    nearest-rank p50/p95 over successes, averages, per-stage or not, ``since``
    inclusive and ``until`` exclusive, extreme values); purge; writes idempotent by
    ``call_id``; names and ids of any length stored among other records; 100
    concurrent writers with exact counts; flush then read; idempotent close; use after
    close; naive datetimes; evidence rollups (equal to `empathy_models.evidence.rollup`
    of every record stored, incremental reads with one or two writers, windows, purge,
    NULL workflow / stage, huge costs summed finite).

    Capabilities are the class attributes ``stores_records`` and ``keeps_evidence``
    (see the package doc).
    """

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
            ("until", lambda: telemetry.recent(until=naive)),
            ("since", lambda: telemetry.spend(since=naive)),
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
