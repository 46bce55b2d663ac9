"""
What a response-cache hit costs in the executor, on the memory and SQLite caches
(Redis and PostgreSQL when reachable), against a call answered by an in-process
`FakeProvider` (no HTTP) in the same run.

Each row is ``await executor.run(prompt, ctx)`` with ``ctx.cache_ttl`` set and the
answer already cached: the key's hash, the lookup, the response and the ``cache_hit``
record (to a memory telemetry backend).  Bars: a hit under 50 µs on
the memory cache and under 300 µs on SQLite.

Run: ``python -m benchmarks.bench_cache [--quick]``
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks._common import (
    BenchResult,
    async_timeit,
    delete_redis_keys,
    drop_schemas,
    peer_version,
    scratch_dir,
    script_main,
    summarize,
)
from empathy_models import EmpathyLLMExecutor, ExecutionContext, cache_from_url
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.testing import FakeProvider

REDIS_URL = os.environ.get("EMPATHY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
POSTGRES_DSN = os.environ.get(
    "EMPATHY_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
BARS = {"memory": 50.0, "SQLite": 300.0}
CTX = ExecutionContext(workflow="bench", stage="cache", temperature=0, cache_ttl=3600)
PLAIN = ExecutionContext(workflow="bench", stage="cache", temperature=0)
PROMPT = "Summarize the GCRA algorithm in two sentences."


async def _reachable(url: str) -> bool:
    try:
        async with cache_from_url(url) as cache:
            await cache.get("0" * 64)
        return True
    except Exception:
        return False


async def run(quick: bool = False) -> BenchResult:
    repeats, inner = (2, 150) if quick else (9, 3_000)
    result = BenchResult(
        name="cache",
        title="Response-cache hit in the executor (µs per run)",
        columns=["median µs", "p99 µs", "bar µs", "vs a FakeProvider call"],
    )
    tmp = scratch_dir("empathy-bench-")
    tag = uuid.uuid4().hex[:10]
    caches = {"memory": "memory://", "SQLite": f"sqlite:///{tmp / 'cache.db'}"}
    # each probed where it will be used (a probe opens the store, which creates its
    # tables): under this run's prefix and in its schema, removed at the end
    redis = f"{REDIS_URL}?prefix=empathy-bench-{tag}:"
    if peer_version("empathy-models-redis") and await _reachable(redis):
        caches["Redis"] = redis
    else:
        result.skipped["Redis"] = "Redis or empathy-models-redis unavailable"
    postgres = f"{POSTGRES_DSN}?schema=empathy_bench_{tag}"
    if peer_version("empathy-models-postgres") and await _reachable(postgres):
        caches["PostgreSQL"] = postgres
    else:
        result.skipped["PostgreSQL"] = "PostgreSQL or empathy-models-postgres unavailable"

    stack = contextlib.AsyncExitStack()
    cases: dict[str, Callable[[], Awaitable[Any]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = await stack.enter_async_context(
            EmpathyLLMExecutor(
                [FakeProvider(name="openai")], telemetry_store=MemoryTelemetryBackend()
            )
        )

    async def called() -> None:
        await plain.run(PROMPT, PLAIN)

    baseline = "no cache: a FakeProvider call"
    cases[baseline] = called
    for label, url in caches.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            executor = await stack.enter_async_context(
                EmpathyLLMExecutor(
                    [FakeProvider(name="openai")],
                    telemetry_store=MemoryTelemetryBackend(capacity=1_000),
                    cache=url,
                )
            )
        first = await executor.run(PROMPT, CTX)
        assert not first.cached

        async def hit(ex: EmpathyLLMExecutor = executor) -> None:
            response = await ex.run(PROMPT, CTX)
            assert response.cached

        cases[f"{label} cache: hit"] = hit

    try:
        for fn in cases.values():
            await async_timeit(fn, repeats=1, inner=min(inner, 100))
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                samples[name].extend(await async_timeit(fn, repeats=1, inner=inner))
        medians = {name: summarize(s) for name, s in samples.items()}
    finally:
        await stack.aclose()
        await _drop(caches)
    base = medians[baseline]["median"]
    for name, stats in medians.items():
        label = name.split(" cache")[0]
        bar = BARS.get(label) if name != baseline else None
        result.add(
            name,
            **{
                "median µs": stats["median"],
                "p99 µs": stats["p99"],
                "bar µs": bar,
                "vs a FakeProvider call": None
                if name == baseline
                else f"{stats['median'] / base:.2f}x",
            },
        )
        if bar is not None and stats["median"] >= bar:
            result.notes.append(
                f"{name}: median {stats['median']:.1f} µs misses the {bar:g} µs bar"
            )
    result.data = {"medians": medians, "repeats": repeats, "inner": inner, "bars": BARS}
    return result


async def _drop(caches: dict[str, str]) -> None:
    """Remove what the run wrote on the shared Redis and PostgreSQL servers."""
    if "Redis" in caches:
        await delete_redis_keys(REDIS_URL, caches["Redis"].split("prefix=", 1)[1])
    if "PostgreSQL" in caches:
        await drop_schemas(POSTGRES_DSN, [caches["PostgreSQL"].split("schema=", 1)[1]])


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
