"""
The interfaces implementers build on: `TelemetryBackend` checks every query's
arguments once, before an implementation sees them, and the plugins under
``backends/`` build on public names of the core only.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from empathy_models import ConfigurationError, LLMCallRecord
from empathy_models.abc import TelemetryBackend
from empathy_models.evidence import EvidenceBatch
from empathy_models.exceptions import BackendClosedError, RecordValidationError
from empathy_models.records import ModelPerformance

ROOT = Path(__file__).resolve().parents[1]
NAIVE = datetime(2026, 1, 1)
AWARE = datetime(2026, 1, 1, tzinfo=UTC)


class Minimal(TelemetryBackend):
    """The least a backend implements; it remembers what reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        self.calls.append(("record_many", {"n": len(records)}))

    async def _aggregate(self, **kwargs: Any) -> list[ModelPerformance]:
        self.calls.append(("aggregate", kwargs))
        return []

    async def _recent(self, **kwargs: Any) -> list[LLMCallRecord]:
        self.calls.append(("recent", kwargs))
        return []

    async def _purge(self, *, before: datetime) -> int:
        self.calls.append(("purge", {"before": before}))
        return 0


async def test_valid_arguments_reach_the_implementation_with_every_keyword() -> None:
    async with Minimal() as backend:
        await backend.aggregate(workflow="w", since=AWARE)
        await backend.recent(limit=0, model="m")
        await backend.purge(before=AWARE)
    assert backend.calls == [
        (
            "aggregate",
            {"workflow": "w", "stage": None, "since": AWARE, "until": None, "per_stage": True},
        ),
        (
            "recent",
            {
                "limit": 0,
                "workflow": None,
                "stage": None,
                "model": "m",
                "since": None,
                "until": None,
                "samples_only": False,
            },
        ),
        ("purge", {"before": AWARE}),
    ]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda b: b.aggregate(since=NAIVE), RecordValidationError, "since"),
        (lambda b: b.aggregate(until="yesterday"), RecordValidationError, "until"),
        (lambda b: b.recent(limit=-1), ConfigurationError, "limit"),
        (lambda b: b.recent(limit=True), ConfigurationError, "limit"),
        (lambda b: b.recent(since=NAIVE), RecordValidationError, "since"),
        (lambda b: b.recent(until=NAIVE), RecordValidationError, "until"),
        (lambda b: b.recent(samples_only=1), ConfigurationError, "samples_only"),
        (lambda b: b.evidence(after_version=-1), ConfigurationError, "after_version"),
        (lambda b: b.evidence(until=NAIVE), RecordValidationError, "until"),
        (lambda b: b.purge(before=NAIVE), RecordValidationError, "before"),
        (lambda b: b.purge(before=None), RecordValidationError, "before"),
    ],
)
async def test_bad_arguments_are_refused_before_the_implementation_runs(
    call: Any, error: type[Exception], match: str
) -> None:
    async with Minimal() as backend:
        with pytest.raises(error, match=match):
            await call(backend)
    assert backend.calls == []


async def test_a_backend_without_rollups_says_so_and_a_closed_one_refuses() -> None:
    backend = Minimal()
    async with backend:
        with pytest.raises(NotImplementedError, match="Minimal keeps no evidence rollups"):
            await backend.evidence()
    for call in (backend.aggregate(), backend.recent(), backend.purge(before=AWARE)):
        with pytest.raises(BackendClosedError) as closed:
            await call
        # its state in words, and what to do
        assert "is closed (aclose() was called, or its `async with` block ended)" in str(
            closed.value
        )
        assert "build a new one" in str(closed.value)
    assert backend.calls == []


class SlowToClose(Minimal):
    """A backend whose `_aclose` waits for ``let_go``, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.let_go = asyncio.Event()
        self.closes = 0

    async def _aclose(self) -> None:
        self.closes += 1
        await self.let_go.wait()


async def test_an_aclose_while_another_is_closing_waits_for_it_and_closes_once() -> None:
    backend = SlowToClose()
    await backend.__aenter__()
    first = asyncio.create_task(backend.aclose())
    await asyncio.sleep(0)
    second = asyncio.create_task(backend.aclose())
    await asyncio.sleep(0.05)
    assert not second.done()  # returned only once the backend is closed
    backend.let_go.set()
    await asyncio.gather(first, second)
    assert backend.closes == 1 and backend.closed
    await backend.aclose()
    assert backend.closes == 1


class BeforeSamplesOnly(Minimal):
    """A backend written before ``recent(samples_only=)``: it keeps records in a list."""

    def __init__(self, records: Sequence[LLMCallRecord]) -> None:
        super().__init__()
        self.records = list(records)

    # the signature of a backend written before samples_only, on purpose
    async def _recent(  # type: ignore[override]
        self,
        *,
        limit: int,
        workflow: str | None,
        stage: str | None,
        model: str | None,
        since: datetime | None,
    ) -> list[LLMCallRecord]:
        self.calls.append(("recent", {"limit": limit}))
        return sorted(self.records, key=lambda r: r.timestamp, reverse=True)[:limit]


async def test_a_backend_without_samples_only_is_read_until_enough_samples_are_found() -> None:
    # 12 calls, then 50 answers from the cache: the newest 10 samples lie behind them
    records = [
        LLMCallRecord(
            provider="p",
            model="m",
            outcome="success" if i < 12 else "cache_hit",
            timestamp=AWARE + timedelta(seconds=i),
            call_id=f"c{i:02d}",
        )
        for i in range(62)
    ]
    async with BeforeSamplesOnly(records) as backend:
        got = await backend.recent(limit=10, samples_only=True)
        every = await backend.recent(limit=100, samples_only=True)
        plain = await backend.recent(limit=3)
    assert [r.call_id for r in got] == [f"c{i:02d}" for i in range(11, 1, -1)]
    assert [r.call_id for r in every] == [f"c{i:02d}" for i in range(11, -1, -1)]
    assert [r.call_id for r in plain] == ["c61", "c60", "c59"]


class BeforeUntil(Minimal):
    """A backend written before ``recent(until=)`` (it takes ``samples_only``)."""

    def __init__(self, records: Sequence[LLMCallRecord]) -> None:
        super().__init__()
        self.records = list(records)

    # the signature of a backend written before until, on purpose
    async def _recent(  # type: ignore[override]
        self,
        *,
        limit: int,
        workflow: str | None,
        stage: str | None,
        model: str | None,
        since: datetime | None,
        samples_only: bool,
    ) -> list[LLMCallRecord]:
        self.calls.append(("recent", {"limit": limit}))
        kept = [r for r in self.records if not samples_only or r.outcome.is_sample]
        return sorted(kept, key=lambda r: r.timestamp, reverse=True)[:limit]


@pytest.mark.parametrize("backend_type", [BeforeUntil, BeforeSamplesOnly])
async def test_a_backend_without_until_is_read_until_enough_earlier_records_are_found(
    backend_type: type[BeforeUntil] | type[BeforeSamplesOnly],
) -> None:
    # 20 calls before ``until`` (every third a cache hit), then 100 after it: the newest
    # 5 before ``until`` lie behind those
    records = [
        LLMCallRecord(
            provider="p",
            model="m",
            outcome="cache_hit" if i % 3 == 2 else "success",
            timestamp=AWARE + timedelta(seconds=i),
            call_id=f"c{i:03d}",
        )
        for i in range(120)
    ]
    until = records[20].timestamp
    async with backend_type(records) as backend:
        got = await backend.recent(limit=5, until=until)
        samples = await backend.recent(limit=5, until=until, samples_only=True)
        every = await backend.recent(limit=1000, until=until)
        none = await backend.recent(limit=0, until=until)
    assert [r.call_id for r in got] == [f"c{i:03d}" for i in range(19, 14, -1)]
    assert [r.call_id for r in samples] == ["c019", "c018", "c016", "c015", "c013"]
    assert [r.call_id for r in every] == [f"c{i:03d}" for i in range(19, -1, -1)]
    assert none == []


async def test_the_built_in_backends_refuse_the_same_arguments() -> None:
    from empathy_models.backends import MemoryTelemetryBackend, NullTelemetryBackend
    from empathy_models.backends.batching import BatchingTelemetryBackend

    for backend in (
        NullTelemetryBackend(),
        MemoryTelemetryBackend(),
        BatchingTelemetryBackend(MemoryTelemetryBackend()),
    ):
        async with backend:
            with pytest.raises(ConfigurationError, match="limit"):
                await backend.recent(limit=-1)
            with pytest.raises(RecordValidationError, match="since"):
                await backend.aggregate(since=NAIVE)
            assert isinstance(await backend.evidence(since=AWARE), EvidenceBatch)


def _core_imports(path: Path) -> list[str]:
    """The ``empathy_models`` modules and names ``path`` imports (any nesting)."""
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "empathy_models":
                out.extend(f"{node.module}:{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names if a.name.split(".")[0] == "empathy_models")
    return out


def test_the_plugins_import_only_public_names_of_the_core() -> None:
    sources = sorted((ROOT / "backends").glob("*/empathy_models_*/**/*.py"))
    assert len(sources) >= 4, sources  # both plugins' packages were found
    private = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources
        for name in _core_imports(path)
        if any(part.startswith("_") for part in name.replace(":", ".").split("."))
    ]
    assert private == []


async def test_capabilities_say_what_a_backend_does() -> None:
    from empathy_models import EmpathyLLMExecutor
    from empathy_models.backends import (
        MemoryStateStore,
        MemoryTelemetryBackend,
        NullStateStore,
        NullTelemetryBackend,
    )
    from empathy_models.backends.batching import BatchingTelemetryBackend
    from empathy_models.backends.sqlite import SQLiteStateStore
    from empathy_models.testing.fakes import FakeProvider

    class Waiting(MemoryStateStore):
        """A subclass may wait (I/O, locks): it is not taken as in-process."""

    assert MemoryStateStore().in_process and NullStateStore().in_process
    assert not Waiting().in_process
    assert not SQLiteStateStore(":memory:").in_process
    assert MemoryTelemetryBackend().stores_records
    assert not NullTelemetryBackend().stores_records
    assert not BatchingTelemetryBackend(NullTelemetryBackend()).stores_records
    # the executor keeps records only where the backend does, whatever wraps it
    for store, kept in (
        (BatchingTelemetryBackend(NullTelemetryBackend()), False),
        (BatchingTelemetryBackend(MemoryTelemetryBackend()), True),
    ):
        async with EmpathyLLMExecutor([FakeProvider(name="openai")], telemetry_store=store) as ex:
            assert ex.telemetry_enabled is kept
