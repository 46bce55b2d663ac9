"""
What a spend budget and a rate limit add to one call, on each quota store, against
what the circuit breaker adds on the same store.

Per store (memory; SQLite; Redis and PostgreSQL when reachable), three rows, each one
harness coroutine doing the per-call work around an ``await noop()``:

* ``breaker``: ``async with CircuitBreaker(store).guard(key)`` (CLOSED path; shared
  stores answer from a local view and write successes behind);
* ``budget``: the executor's `Limiter` reserving a call's estimate in one budget and
  settling it at its cost: two atomic store operations per call;
* ``rate limit``: the `Limiter` taking a place in an RPM and a TPM schedule (limits
  so high that nobody waits) and giving unused tokens back: three operations.

Overhead = row - baseline (a bare ``await noop()``), both measured in this run; the
last column is the overhead as a multiple of the breaker's on the same store.  Budgets
and rate limits must be exact across processes, so unlike the breaker they go to the
store on every call: that is the price of the guarantee, and what this table shows.

Run: ``python -m benchmarks.bench_limits [--quick]``
"""

from __future__ import annotations

import contextlib
import os
import uuid
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
from empathy_models import Budget, CircuitBreaker, ExecutionContext, ModelInfo, RateLimit
from empathy_models.limits import Limiter, quota_store_from_url

REDIS_URL = os.environ.get("EMPATHY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
POSTGRES_DSN = os.environ.get(
    "EMPATHY_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
BASELINE = "baseline: await noop()"
MODEL = ModelInfo(
    id="bench-model",
    provider="bench",
    tier="cheap",
    input_price_per_mtok=1.0,
    output_price_per_mtok=4.0,
    context_window=128_000,
    max_output_tokens=4096,
)
CONTEXT = ExecutionContext(workflow="bench")


async def noop() -> None:
    return None


async def _reachable(url: str) -> bool:
    try:
        store = quota_store_from_url(url)
    except Exception:
        return False
    try:
        async with store:
            await store.limit_overrides()
        return True
    except Exception:
        return False


async def run(quick: bool = False) -> BenchResult:
    repeats, inner = (2, 50) if quick else (9, 2_000)
    result = BenchResult(
        name="limits",
        title="Budget and rate-limit cost per call, against the breaker on the same store (µs)",
        columns=["median µs", "p99 µs", "overhead µs", "vs breaker, same store"],
    )
    tmp = scratch_dir("empathy-bench-")
    tag = uuid.uuid4().hex[:10]
    stores: dict[str, str] = {"memory": "memory://", "SQLite": f"sqlite:///{tmp / 'q.db'}"}
    # each probed where it will be used (a probe opens the store, which creates its
    # tables): under this run's prefix and in its schema, removed at the end
    redis = f"{REDIS_URL}?prefix=empathy-bench-{tag}:"
    if peer_version("empathy-models-redis") and await _reachable(redis):
        stores["Redis"] = redis
    else:
        result.skipped["Redis"] = "Redis or empathy-models-redis unavailable"
    postgres = f"{POSTGRES_DSN}?schema=empathy_bench_{tag}"
    if peer_version("empathy-models-postgres") and await _reachable(postgres):
        stores["PostgreSQL"] = postgres
    else:
        result.skipped["PostgreSQL"] = "PostgreSQL or empathy-models-postgres unavailable"

    cases: dict[str, Callable[[], Awaitable[object]]] = {}
    stack = contextlib.AsyncExitStack()

    async def baseline() -> None:
        await noop()

    cases[BASELINE] = baseline
    groups: dict[str, str] = {}
    for label, url in stores.items():
        breaker = await stack.enter_async_context(CircuitBreaker(url))

        async def guarded(b: CircuitBreaker = breaker) -> None:
            async with b.guard("bench"):
                await noop()

        budget_store = await stack.enter_async_context(quota_store_from_url(url))
        budgets = Limiter([Budget(limit_usd=1e6)], None, budget_store)

        async def budgeted(limiter: Limiter = budgets) -> None:
            hold = await limiter.admit(CONTEXT, MODEL, 100, 100, None)
            assert hold is not None
            await noop()
            hold.cost_usd, hold.tokens = 0.0003, 120
            await limiter.settle(hold)

        rates = Limiter(
            None, {"bench": RateLimit(rpm=10**9, tpm=10**12)}, budget_store, max_wait=1.0
        )

        async def limited(limiter: Limiter = rates) -> None:
            hold = await limiter.admit(CONTEXT, MODEL, 100, 100, None)
            assert hold is not None
            await noop()
            hold.cost_usd, hold.tokens = 0.0003, 120
            await limiter.settle(hold)

        per_store: dict[str, Callable[[], Awaitable[object]]] = {
            "breaker": guarded,
            "budget": budgeted,
            "rate limit": limited,
        }
        for kind, fn in per_store.items():
            cases[f"{label}: {kind}"] = fn
            groups[f"{label}: {kind}"] = label

    medians: dict[str, dict[str, float]] = {}
    try:
        for fn in cases.values():
            await async_timeit(fn, repeats=1, inner=min(inner, 100))  # warm up
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                samples[name].extend(await async_timeit(fn, repeats=1, inner=inner))
        medians = {name: summarize(s) for name, s in samples.items()}
    finally:
        await stack.aclose()
        await _drop(stores)

    base = medians[BASELINE]["median"]
    for name, stats in medians.items():
        overhead = stats["median"] - base
        ratio: Any = None
        group = groups.get(name)
        if group is not None and not name.endswith("breaker"):
            breaker_cost = medians[f"{group}: breaker"]["median"] - base
            ratio = f"{overhead / breaker_cost:.1f}x" if breaker_cost > 0 else None
        result.add(
            name,
            **{
                "median µs": stats["median"],
                "p99 µs": stats["p99"],
                "overhead µs": overhead,
                "vs breaker, same store": ratio,
            },
        )
    result.data = {"medians": medians, "repeats": repeats, "inner": inner}
    result.notes.append(
        "The breaker answers a CLOSED admission from its local view and writes successes "
        "behind; a budget reserves and settles in the store on every call (exact across "
        "processes), and a rate limit takes its place in the shared schedule on every call."
    )
    return result


async def _drop(stores: dict[str, str]) -> None:
    """Remove what the run wrote on the shared Redis and PostgreSQL servers."""
    if "Redis" in stores:
        await delete_redis_keys(REDIS_URL, stores["Redis"].split("prefix=", 1)[1])
    if "PostgreSQL" in stores:
        await drop_schemas(POSTGRES_DSN, [stores["PostgreSQL"].split("schema=", 1)[1]])


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
