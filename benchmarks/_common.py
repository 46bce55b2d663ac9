"""
Shared plumbing for the benchmark scripts: timing loops, summaries, machine facts,
markdown tables and JSON output.

Every figure is a median (and p99) over repeats; every comparison is a ratio against
a baseline measured in the same run, on the same machine, in the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "BenchResult",
    "Row",
    "async_timeit",
    "machine_info",
    "markdown_table",
    "peer_version",
    "script_main",
    "summarize",
    "timeit",
    "write_result",
]

RESULTS_DIR = Path(os.environ.get("EMPATHY_BENCH_RESULTS", Path(__file__).parent / "results"))


def peer_version(dist: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {
        name: peer_version(name)
        for name in (
            "empathy-models",
            "aiohttp",
            "aiosqlite",
            "anyio",
            "attrs",
            "cattrs",
            "redis",
            "asyncpg",
            "litellm",
            "pybreaker",
            "aiobreaker",
            "purgatory",
            "circuitbreaker",
        )
    }
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "packages": {k: v for k, v in versions.items() if v is not None},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def scratch_dir(prefix: str) -> Path:
    """A new private directory for a benchmark's files, removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median and p99 (nearest rank) of per-operation times, in the samples' unit."""
    ordered = sorted(samples)
    n = len(ordered)
    p99 = ordered[min(n - 1, max(0, int(0.99 * n + 0.5) - 1))]
    return {"median": statistics.median(ordered), "p99": p99, "n": float(n)}


def timeit(fn: Callable[[], object], *, repeats: int, inner: int) -> list[float]:
    """Per-call time in microseconds for ``repeats`` runs of ``inner`` calls each."""
    out: list[float] = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter_ns() - t0) / inner / 1000.0)
    finally:
        if gc_was:
            gc.enable()
    return out


async def async_timeit(
    fn: Callable[[], Awaitable[object]], *, repeats: int, inner: int
) -> list[float]:
    """Per-await time in microseconds for ``repeats`` runs of ``inner`` sequential awaits."""
    out: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            await fn()
        out.append((time.perf_counter_ns() - t0) / inner / 1000.0)
        await asyncio.sleep(0)
    return out


@dataclass
class Row:
    name: str
    values: dict[str, Any]


@dataclass
class BenchResult:
    """What one script produces: rows for the table, notes, skipped peers, extra data."""

    name: str
    title: str
    columns: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, **values: Any) -> None:
        self.rows.append(Row(name, values))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "machine": machine_info(),
            "columns": self.columns,
            "rows": [{"name": r.name, **r.values} for r in self.rows],
            "notes": self.notes,
            "skipped": self.skipped,
            "data": self.data,
        }

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", markdown_table(self.columns, self.rows)]
        if self.skipped:
            lines.append("")
            lines.extend(f"- skipped {k}: {v}" for k, v in sorted(self.skipped.items()))
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"
    return "" if value is None else str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    header = ["", *columns]
    body = [[r.name, *(_fmt(r.values.get(c)) for c in columns)] for r in rows]
    widths = [max([len(h), *(len(b[i]) for b in body)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(b) for b in body)
    return "\n".join(out)


def write_result(result: BenchResult) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under the results directory; print the table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{result.name}.json"
    path.write_text(json.dumps(result.to_json(), indent=2, default=str), encoding="utf-8")
    (RESULTS_DIR / f"{result.name}.md").write_text(result.markdown(), encoding="utf-8")
    print(result.markdown())
    return path


def script_main(
    doc: str | None,
    run: Callable[[bool], Coroutine[Any, Any, BenchResult]],
    argv: list[str] | None,
) -> None:
    """The command line of a benchmark script whose only option is ``--quick``."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    write_result(asyncio.run(run(args.quick)))


async def delete_redis_keys(url: str, prefix: str) -> None:
    """Delete the keys under ``prefix`` that a run wrote on the Redis server at ``url``."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def drop_schemas(dsn: str, schemas: Sequence[str]) -> None:
    """Drop the PostgreSQL ``schemas`` a run wrote into (at ``dsn``)."""
    if not schemas:
        return
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
