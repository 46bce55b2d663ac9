"""
Telemetry: records per second into each backend, the raw ``sqlite3.executemany``
ceiling on the same schema, and the call-path cost of recording one call.

* Throughput: ``record()`` N records one by one (as the executor does), then ``flush()``;
  the clock stops when every record is durable.
* Ceiling: ``executemany`` of N pre-built rows into a table created by our own backend
  (same columns and indexes), one transaction, no conversion.
* Call path: the time of one ``await backend.record(rec)`` while the queue has room.
* Throughput against ``max_batch`` (plotted when matplotlib is installed).

Run: ``python -m benchmarks.bench_telemetry [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks._common import (
    RESULTS_DIR,
    BenchResult,
    peer_version,
    summarize,
    write_result,
)
from empathy_models import LLMCallRecord, ModelTier, Outcome, telemetry_from_url
from empathy_models.abc import TelemetryBackend

POSTGRES_DSN = os.environ.get(
    "EMPATHY_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


def make_records(n: int) -> list[LLMCallRecord]:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    models = ("claude-haiku-4-5", "claude-sonnet-4-5", "gpt-4o-mini", "gpt-4.1")
    return [
        LLMCallRecord(
            provider="anthropic" if i % 4 < 2 else "openai",
            model=models[i % 4],
            outcome=Outcome.SUCCESS if i % 10 else Outcome.FAILURE,
            timestamp=base + timedelta(milliseconds=i),
            workflow=f"wf{i % 3}",
            stage=f"stage{i % 5}",
            task_type="summarize",
            tier=ModelTier.CHEAP,
            input_tokens=100 + i % 50,
            output_tokens=200 + i % 70,
            cost_usd=0.0001 * (i % 7),
            price_version="2026-01",
            latency_ms=50.0 + i % 100,
            attempt=1,
            request_id=f"req{i}",
        )
        for i in range(n)
    ]


async def _throughput(backend: TelemetryBackend, records: list[LLMCallRecord]) -> float:
    async with backend:
        t0 = time.perf_counter()
        for r in records:
            await backend.record(r)
        await backend.flush()
        elapsed = time.perf_counter() - t0
    return len(records) / elapsed


async def _call_path(backend: TelemetryBackend, records: list[LLMCallRecord]) -> list[float]:
    samples: list[float] = []
    async with backend:
        for chunk in range(0, len(records), 500):
            batch = records[chunk : chunk + 500]
            t0 = time.perf_counter_ns()
            for r in batch:
                await backend.record(r)
            samples.append((time.perf_counter_ns() - t0) / len(batch) / 1000.0)
            await backend.flush()
    return samples


def _ceiling(path: Path, records: list[LLMCallRecord]) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    columns = [row[1] for row in conn.execute("PRAGMA table_info(llm_calls)") if row[1] != "id"]
    insert = (
        f"INSERT INTO llm_calls ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
    )
    sample = {
        "ts_us": 1_767_225_600_000_000,
        "fallback_used": 0,
        "exploration": 0,
        "fallback_chain": "[]",
        "metadata": "{}",
        "attempt": 1,
        "input_tokens": 100,
        "output_tokens": 200,
        "cost_usd": 0.0001,
        "latency_ms": 50.0,
        "task_type": "summarize",
        "provider": "anthropic",
        "model": "claude-haiku-4-5",
        "outcome": "success",
        "call_id": "x",
    }

    def value(column: str, i: int) -> object:
        if column == "call_id":
            return f"call{i}"
        if column in ("workflow", "stage"):
            return f"{column}{i % 5}"
        return sample.get(column)

    rows = [tuple(value(c, i) for c in columns) for i in range(len(records))]
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(insert, rows)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return len(rows) / elapsed


async def _postgres_reachable() -> bool:
    if not peer_version("empathy-models-postgres"):
        return False
    try:
        import asyncpg

        conn = await asyncio.wait_for(asyncpg.connect(POSTGRES_DSN), 2)
        await conn.close()
        return True
    except Exception:
        return False


async def run(quick: bool = False) -> BenchResult:
    n = 5_000 if quick else 50_000
    repeats = 3 if quick else 5
    records = make_records(n)
    tmp = Path(tempfile.mkdtemp(prefix="empathy-bench-tel-"))
    result = BenchResult(
        name="telemetry",
        title=f"Telemetry throughput ({n:,} records) and call-path cost",
        columns=["records/s (median)", "vs raw executemany", "record() p50 µs", "record() p99 µs"],
    )

    def sqlite_url(tag: str) -> str:
        return f"sqlite:///{tmp / f'{tag}.db'}"

    factories: dict[str, Any] = {
        "null://": lambda i: telemetry_from_url("null://"),
        "memory://": lambda i: telemetry_from_url("memory://"),
        "SQLite (batched, default)": lambda i: telemetry_from_url(sqlite_url(f"tp{i}")),
    }
    if await _postgres_reachable():
        schema = f"bench_{os.getpid()}"
        factories["PostgreSQL (batched)"] = lambda i: telemetry_from_url(
            POSTGRES_DSN, schema=f"{schema}_{i}"
        )
    else:
        result.skipped["PostgreSQL"] = "not reachable or empathy-models-postgres not installed"

    throughput: dict[str, list[float]] = {k: [] for k in factories}
    for i in range(repeats):
        for name, make in factories.items():
            throughput[name].append(await _throughput(make(i), records))

    # the ceiling: same schema, created by our backend, raw executemany of pre-built rows
    ceiling: list[float] = []
    for i in range(repeats):
        path = tmp / f"ceiling{i}.db"
        async with telemetry_from_url(f"sqlite:///{path}") as b:
            await b.flush()
        ceiling.append(_ceiling(path, records))
    ceiling_median = statistics.median(ceiling)

    call_path: dict[str, dict[str, float]] = {}
    for name, make in factories.items():
        call_path[name] = summarize(await _call_path(make(100 + len(call_path)), records))

    result.add(
        "raw sqlite3.executemany (ceiling)",
        **{"records/s (median)": ceiling_median, "vs raw executemany": "1.00x"},
    )
    for name in factories:
        med = statistics.median(throughput[name])
        result.add(
            name,
            **{
                "records/s (median)": med,
                "vs raw executemany": f"{med / ceiling_median:.2f}x",
                "record() p50 µs": call_path[name]["median"],
                "record() p99 µs": call_path[name]["p99"],
            },
        )

    # throughput against batch size (SQLite)
    curve: dict[int, float] = {}
    for batch in (10, 100, 1_000, 5_000):
        from empathy_models.backends.sqlite import SQLiteTelemetryBackend

        runs = [
            await _throughput(
                SQLiteTelemetryBackend(tmp / f"batch{batch}_{i}.db", max_batch=batch),
                records,
            )
            for i in range(max(1, repeats - 1))
        ]
        curve[batch] = statistics.median(runs)
    result.data = {
        "throughput": throughput,
        "ceiling": ceiling,
        "call_path": call_path,
        "sqlite_throughput_by_batch": curve,
        "records": n,
    }
    result.notes.append(
        "SQLite throughput by max_batch: " + ", ".join(f"{b}: {v:,.0f}/s" for b, v in curve.items())
    )
    _plot(curve, ceiling_median)
    return result


def _plot(curve: dict[int, float], ceiling: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = sorted(curve)
    ax.plot(xs, [curve[x] for x in xs], marker="o", label="SQLiteTelemetryBackend")
    ax.axhline(ceiling, linestyle="--", color="grey", label="raw executemany ceiling")
    ax.set_xscale("log")
    ax.set_xlabel("max_batch (records per transaction)")
    ax.set_ylabel("records / s")
    ax.set_title("Telemetry throughput vs batch size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "telemetry_batch.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    write_result(asyncio.run(run(quick=args.quick)))


if __name__ == "__main__":
    main()
