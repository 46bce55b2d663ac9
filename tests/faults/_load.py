"""Records for the fault tests, a steady producer that times every ``record()`` call."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from empathy_models import LLMCallRecord
from empathy_models.abc import TelemetryBackend

T0 = datetime(2026, 3, 1, tzinfo=UTC)
WORKER = Path(__file__).with_name("_worker.py")


def sqlite_rows(db: Path) -> int:
    """How many calls the SQLite file ``db`` holds (read with the stdlib, not the backend)."""
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0])
    finally:
        conn.close()


def record(label: str, i: int) -> LLMCallRecord:
    return LLMCallRecord(
        provider="anthropic",
        model="claude-fake-haiku",
        outcome="success",
        call_id=f"{label}-{i:07d}",
        timestamp=T0 + timedelta(microseconds=i),
        workflow="faults",
        stage=label,
        latency_ms=float(i % 997),
        input_tokens=i % 500,
        output_tokens=i % 80,
    )


class Producer:
    """
    Records ``burst`` records, then sleeps ``pause`` seconds, for as long as asked: about
    3,000 records a second, the rate of the issue's measurements.
    """

    def __init__(self, backend: TelemetryBackend, label: str, burst: int = 15) -> None:
        self.backend = backend
        self.label = label
        self.burst = burst
        self.produced = 0
        self.worst = 0.0  # the longest record() call, in seconds (reported, not judged)
        # record() calls that gave the event loop a turn: ones that waited for something
        # (the store, room in the queue) rather than only queueing or spilling
        self.suspended = 0

    async def run(self, seconds: float, pause: float = 0.005) -> None:
        loop = asyncio.get_running_loop()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(self.burst):
                turns: list[None] = []
                # runs only if the loop gets a turn, i.e. only if record() suspends
                marker = loop.call_soon(turns.append, None)
                start = time.perf_counter()
                await self.backend.record(record(self.label, self.produced))
                self.worst = max(self.worst, time.perf_counter() - start)
                marker.cancel()
                self.suspended += bool(turns)
                self.produced += 1
            await asyncio.sleep(pause)
