"""
The evidence-rollup tests of `TelemetryBackendContract` and `assert_same_buckets`, the
bucket comparison backends' own tests use too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import anyio
import anyio.lowlevel
import pytest

from ...abc import TelemetryBackend
from ...backends import telemetry_from_url
from ...evidence import (
    BUCKET_SECONDS,
    ROW_FIELDS,
    EvidenceBatch,
    EvidenceBucket,
    rollup,
    sorted_buckets,
)
from ...exceptions import BackendClosedError, ConfigurationError, RecordValidationError
from ...records import LLMCallRecord, Outcome
from ._aggregate import _aggregation_dataset
from ._base import _base_time, _record, _TelemetryTests

__all__ = ["assert_same_buckets"]

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
    Assert that two lists of evidence buckets are the same.

    The same keys in the order of `EvidenceBatch.buckets`, counts exactly equal, float
    sums within a relative 1e-9 (backends may add in another order), bucket starts in
    UTC.

    Args:
        got: as `TelemetryBackend.evidence` returned them.
        want: for example `empathy_models.evidence.rollup` of the records stored.
        what: names the read in the failure message.
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


class _EvidenceTests(_TelemetryTests):
    """
    `TelemetryBackend.evidence`: equal to `empathy_models.evidence.rollup` of everything
    stored, incremental reads with one or two writers, windows, purge, NULL and empty
    workflows and stages, records at the calendar's first and last microseconds,
    argument checks.
    """

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
        # the rows the router reads: the same buckets, sums as plain numbers
        assert len(batch.rows) == len(batch.buckets)
        odd = [
            (row[:4], type(x).__name__)
            for row in batch.rows
            for x in row[4 : len(ROW_FIELDS)]
            if not isinstance(x, int | float)
        ]
        assert not odd, f"evidence().rows: sums that are not int or float: {odd[:3]}"
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

    async def test_huge_costs_in_one_minute_are_kept_and_summed_finite(
        self, telemetry: TelemetryBackend
    ) -> None:
        # $1.7e308 is a valid cost: several in one arm and minute, written apart and
        # together, are all stored, and the bucket's cost sum stays finite (a cost counts
        # for at most 1e300 in it, as in the aggregate's averages)
        self._needs_evidence()
        minute = _base_time().replace(second=10)
        records = [
            _record(minute + timedelta(seconds=i), cost_usd=1.7e308, call_id=f"huge-{i}")
            for i in range(3)
        ]
        await telemetry.record(records[0])
        await telemetry.flush()
        await telemetry.record_many(records[1:])
        await telemetry.flush()
        assert len(await telemetry.recent(limit=10)) == 3
        (bucket,) = (await telemetry.evidence()).buckets
        assert bucket.samples == 3 and math.isclose(bucket.cost_usd, 3e300)
        assert_same_buckets([bucket], rollup(records), "huge costs")

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

    async def test_the_first_and_last_microseconds_of_the_calendar_are_kept(
        self, telemetry: TelemetryBackend
    ) -> None:
        self._needs_evidence()
        first = datetime(1, 1, 1, tzinfo=UTC)
        last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        last_minute = last.replace(second=0, microsecond=0)
        tick = timedelta(microseconds=1)
        ends = [
            _record(first, call_id="first"),
            _record(first + tick, call_id="first+1us"),
            _record(last - tick, call_id="last-1us", outcome=Outcome.FAILURE),
            _record(last, call_id="last", ttft_ms=5.0),
        ]
        ordinary = _evidence_records(random.Random(9999), _base_time(), 20, "mid")
        records = [ends[0], *ordinary, *ends[1:]]  # one batch: the ends beside the others
        await telemetry.record_many(records)
        await telemetry.flush()
        stored = await telemetry.recent(limit=100)
        assert sorted(r.call_id for r in stored) == sorted(r.call_id for r in records)
        assert {r.call_id: r.timestamp for r in stored if r.call_id in ("first", "last")} == {
            "first": first,
            "last": last,
        }
        batch = await telemetry.evidence()
        assert_same_buckets(batch.buckets, rollup(records), "evidence() at the calendar's ends")
        assert batch.buckets[0].bucket_start == first
        assert batch.buckets[-1].bucket_start == last_minute
        assert (batch.buckets[-1].samples, batch.buckets[-1].successes) == (2, 1)
        top = (await telemetry.evidence(since=last_minute)).buckets
        assert_same_buckets(top, rollup(ends[2:]), "evidence(since=the last minute)")
        bottom = (await telemetry.evidence(until=first + timedelta(minutes=1))).buckets
        assert_same_buckets(bottom, rollup(ends[:2]), "evidence(until=year 1's first minute)")
        # the first minute's bucket ends after the cutoff: its records go, it stays
        assert await telemetry.purge(before=first + timedelta(seconds=30)) == 2
        assert_same_buckets(
            (await telemetry.evidence()).buckets, rollup(records), "after purging year 1"
        )
        assert await telemetry.purge(before=last) == len(records) - 3
        assert [r.call_id for r in await telemetry.recent()] == ["last"]
        kept = (await telemetry.evidence()).buckets
        assert_same_buckets(kept, rollup(ends[2:]), "after purging up to the last microsecond")

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
