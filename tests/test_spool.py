"""The telemetry spool: what goes through it is replayed into its store, as written."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from empathy_models import LLMCallRecord
from empathy_models.abc import TelemetryBackend
from empathy_models.backends.batching import BatchingTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.evidence import EvidenceBatch
from empathy_models.exceptions import TelemetryError
from empathy_models.records import ModelPerformance

BASE = datetime(2026, 2, 1, tzinfo=UTC)


def _records(n: int, prefix: str = "r", **fields: object) -> list[LLMCallRecord]:
    return [
        LLMCallRecord(
            provider="p",
            model="m",
            outcome="success",
            call_id=f"{prefix}{i}",
            timestamp=BASE + timedelta(seconds=i),
            latency_ms=float(i),
            **fields,  # type: ignore[arg-type]
        )
        for i in range(n)
    ]


class ThirdPartyStore(TelemetryBackend):
    """
    A persistent backend as a third party writes one: neither a ``spool_target`` nor a
    ``__repr__`` of its own (the store is an unbatched SQLite file underneath).
    """

    def __init__(self, path: Path, *, down: bool = False) -> None:
        self._db = SQLiteTelemetryBackend(path, batch=False)
        self.down = down

    @property
    def persistent(self) -> bool:
        return True

    async def _aopen(self) -> None:
        await self._db.__aenter__()

    async def _aclose(self) -> None:
        await self._db.aclose()

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        if self.down:
            raise TelemetryError("the store is down", target="third-party")
        await self._db.record_many(records)

    async def _recent(self, **query: object) -> list[LLMCallRecord]:
        return await self._db.recent(**query)  # type: ignore[arg-type]

    async def _aggregate(self, **query: object) -> list[ModelPerformance]:
        return await self._db.aggregate(**query)  # type: ignore[arg-type]

    async def _spend(self, **query: object) -> dict[tuple[str | None, str | None, str], float]:
        return await self._db.spend(**query)  # type: ignore[arg-type]

    async def _evidence(self, **query: object) -> EvidenceBatch:
        return await self._db.evidence(**query)  # type: ignore[arg-type]

    async def _purge(self, **query: object) -> int:
        return await self._db.purge(**query)  # type: ignore[arg-type]


async def test_a_third_party_store_replays_the_spool_another_instance_left(
    tmp_path: Path,
) -> None:
    # its default repr names the object ("<... object at 0x7f...>"), not the store: a
    # spool named after it was one per instance, which no later process ever replayed
    db = tmp_path / "calls.db"
    records = _records(5)
    first = BatchingTelemetryBackend(ThirdPartyStore(db, down=True), close_timeout=0.1)
    async with first:
        await first.record_many(records)
    assert first.spooled == 5  # not written within close_timeout: spooled
    async with BatchingTelemetryBackend(ThirdPartyStore(db)) as again:  # the next process
        stored = await again.recent(limit=100)
    assert sorted(r.call_id for r in stored) == sorted(r.call_id for r in records)
