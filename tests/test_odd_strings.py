"""
Values past what a store holds as given: text with a lone surrogate (as Python decodes
bytes that are not UTF-8) or a NUL character, an integer past 64 bits.  The in-memory,
SQLite and PostgreSQL telemetry backends answer the same for them, whether the store kept
a record's text as given or made it safe.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from empathy_models import LLMCallRecord, Outcome, telemetry_from_url

NOW = datetime(2026, 3, 1, tzinfo=UTC)

SURROGATE = "caf\udce9"
"""``café`` typed in a Latin-1 terminal, as Python decodes it."""

NUL = "n\x00ul"


def _urls(tmp_path: Path, private_postgres: Callable[[], str | None]) -> list[str]:
    # every backend at hand: PostgreSQL when EMPATHY_TEST_POSTGRES_DSN names one (a
    # schema of this test's own, dropped afterwards)
    urls = ["memory://", f"sqlite:///{tmp_path}/calls.db"]
    postgres = private_postgres()
    if postgres is not None:
        urls.append(postgres)
    return urls


def _record(n: int, *, workflow: str = "wf", stage: str = "st", model: str = "m") -> LLMCallRecord:
    return LLMCallRecord(
        provider="p",
        model=model,
        outcome=Outcome.SUCCESS,
        call_id=f"c{n}",
        workflow=workflow,
        stage=stage,
        latency_ms=10.0 + n,
        timestamp=NOW - timedelta(minutes=n),
    )


RECORDS = [
    _record(0),
    _record(1, workflow=SURROGATE),
    _record(2, stage=SURROGATE),
    _record(3, model=SURROGATE),
    _record(4, workflow=NUL),  # SQLite stores a NUL as given ...
    _record(5, workflow=NUL, stage=SURROGATE),  # ... but escaped in a record made safe
    _record(6, model=NUL),
]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("workflow", SURROGATE, {"c1"}),
        ("stage", SURROGATE, {"c2", "c5"}),
        ("model", SURROGATE, {"c3"}),
        ("workflow", NUL, {"c4", "c5"}),
        ("model", NUL, {"c6"}),
        ("workflow", "wf", {"c0", "c2", "c3", "c6"}),
    ],
)
async def test_a_filter_on_unstorable_text_finds_the_records_written_with_it(
    tmp_path: Path,
    private_postgres: Callable[[], str | None],
    field: str,
    value: str,
    expected: set[str],
) -> None:
    for url in _urls(tmp_path, private_postgres):
        async with telemetry_from_url(url) as backend:
            await backend.record_many(RECORDS)
            await backend.flush()
            f = {field: value}
            recent = await backend.recent(
                limit=100, workflow=f.get("workflow"), stage=f.get("stage"), model=f.get("model")
            )
            assert {r.call_id for r in recent} == expected, url
            if field == "model":
                continue
            perf = await backend.aggregate(
                workflow=f.get("workflow"), stage=f.get("stage"), since=NOW - timedelta(days=1)
            )
            assert sum(p.sample_size for p in perf) == len(expected), url


async def test_a_limit_past_64_bits_reads_every_record(
    tmp_path: Path, private_postgres: Callable[[], str | None]
) -> None:
    for url in _urls(tmp_path, private_postgres):
        async with telemetry_from_url(url) as backend:
            await backend.record_many(RECORDS[:1])
            assert [r.call_id for r in await backend.recent(limit=2**64)] == ["c0"], url
