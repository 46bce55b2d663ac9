"""
Breaker overhead on a guarded no-op coroutine, CLOSED path.

Every row is one harness coroutine that does one guarded ``await noop()``; the baseline
is the same harness coroutine doing a bare ``await noop()``.  Overhead = row - baseline,
both measured in this run, so the harness's own coroutine is charged to nobody (a
decorator such as circuitbreaker's or our ``protect`` is awaited from the harness
coroutine too).  Ours: ``guard`` on the memory, SQLite (shared, local view) and Redis
(shared, local view) stores, and the ``protect`` decorator on the memory store.  Peers,
when installed: pybreaker (memory and its Redis storage), aiobreaker, purgatory,
circuitbreaker.  A reference row, ``floor: async with on an empty class``, is the cost of
the ``async with`` protocol itself (a fresh object with async ``__aenter__`` /
``__aexit__`` that do nothing): no context-manager breaker can be cheaper.

`run_keys` (the ``breaker_keys`` table) spreads the calls over many keys: ``guard()`` on
the memory store over 1 / 1k / 100k keys used round-robin, against circuitbreaker with
one decorated function (one circuit) per key, the same key count, in the same run.  Each
harness coroutine picks the next key from its own cycle (the baseline too), so the
overhead is what the breaker adds for a key used every N calls.  Every key is used twice
before timing, half a second apart (its state is then stored); with 100k keys a key is
then used about once a second (what a rarely used key costs: on a shared store its local
view would have expired; the memory store keeps no view staleness or write-behind, and
adds each success to the stored state at once).

Run: ``python -m benchmarks.bench_breaker [--quick] [--keys]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks._common import (
    BenchResult,
    async_timeit,
    peer_version,
    scratch_dir,
    summarize,
    write_result,
)
from empathy_models import CircuitBreaker

REDIS_URL = os.environ.get("EMPATHY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


BASELINE = "baseline: await noop()"
FLOOR = "floor: async with on an empty class"


async def noop() -> None:
    return None


class _EmptyContext:
    """The cheapest async context manager: what ``async with`` itself costs."""

    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


def _noop_sync() -> None:
    return None


async def _redis_reachable() -> bool:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return False
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        await client.ping()
        return True
    except Exception:
        return False
    finally:
        await client.aclose()


async def run(quick: bool = False) -> BenchResult:
    repeats, inner = (3, 1_000) if quick else (15, 20_000)
    result = BenchResult(
        name="breaker",
        title="Breaker overhead per guarded call, CLOSED path (µs)",
        columns=["median µs", "p99 µs", "overhead µs", "vs fastest peer"],
    )
    cases: dict[str, Callable[[], Awaitable[object]]] = {}
    stack = contextlib.AsyncExitStack()
    tmp = scratch_dir("empathy-bench-")

    async def baseline() -> None:
        await noop()

    cases[BASELINE] = baseline

    async def empty_cm() -> None:
        async with _EmptyContext():
            await noop()

    cases[FLOOR] = empty_cm

    ours_memory = await stack.enter_async_context(CircuitBreaker())

    async def ours_mem() -> None:
        async with ours_memory.guard("provider"):
            await noop()

    cases["empathy-models, memory store"] = ours_mem

    ours_decorated = await stack.enter_async_context(CircuitBreaker())
    protected_noop = ours_decorated.protect("provider")(noop)

    async def ours_protect() -> None:
        await protected_noop()

    cases["empathy-models, memory store, protect() decorator"] = ours_protect

    ours_sqlite = await stack.enter_async_context(CircuitBreaker(f"sqlite:///{tmp / 'state.db'}"))

    async def ours_sql() -> None:
        async with ours_sqlite.guard("provider"):
            await noop()

    cases["empathy-models, SQLite store (shared)"] = ours_sql

    if await _redis_reachable() and peer_version("empathy-models-redis"):
        ours_redis = await stack.enter_async_context(CircuitBreaker(REDIS_URL))
        await ours_redis.reset()

        async def ours_red() -> None:
            async with ours_redis.guard("provider"):
                await noop()

        cases["empathy-models, Redis store (shared)"] = ours_red
    else:
        result.skipped["empathy-models Redis store"] = "Redis or empathy-models-redis unavailable"

    peers: dict[str, str] = {}
    if peer_version("pybreaker"):
        import pybreaker

        pyb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)

        async def pyb_case() -> None:
            pyb.call(_noop_sync)
            await noop()

        cases["pybreaker (memory)"] = pyb_case
        peers["pybreaker (memory)"] = "memory"
        if await _redis_reachable():
            import redis as sync_redis

            client = sync_redis.Redis.from_url(REDIS_URL)
            storage = pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED, client, namespace="empathy-bench"
            )
            pyb_redis = pybreaker.CircuitBreaker(
                fail_max=5, reset_timeout=60, state_storage=storage
            )

            async def pyb_redis_case() -> None:
                pyb_redis.call(_noop_sync)
                await noop()

            cases["pybreaker (Redis storage)"] = pyb_redis_case
    else:
        result.skipped["pybreaker"] = "not installed (see benchmarks/requirements-peers.txt)"

    if peer_version("aiobreaker"):
        import aiobreaker

        aiob = aiobreaker.CircuitBreaker(fail_max=5)

        async def aiob_case() -> None:
            await aiob.call_async(noop)

        cases["aiobreaker"] = aiob_case
        peers["aiobreaker"] = "memory"
    else:
        result.skipped["aiobreaker"] = "not installed"

    if peer_version("purgatory"):
        from purgatory import AsyncCircuitBreakerFactory

        factory = AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)

        async def purg_case() -> None:
            async with await factory.get_breaker("provider"):
                await noop()

        cases["purgatory"] = purg_case
        peers["purgatory"] = "memory"
    else:
        result.skipped["purgatory"] = "not installed"

    if peer_version("circuitbreaker"):
        import circuitbreaker

        async def plain() -> None:
            return None

        decorate: Any = circuitbreaker.circuit(failure_threshold=5, recovery_timeout=60)
        decorated = decorate(plain)

        async def cb_case() -> None:
            await decorated()

        cases["circuitbreaker"] = cb_case
        peers["circuitbreaker"] = "memory"
    else:
        result.skipped["circuitbreaker"] = "not installed"

    medians: dict[str, dict[str, float]] = {}
    try:
        for fn in cases.values():
            await async_timeit(fn, repeats=1, inner=min(inner, 500))  # warm up
        # interleave repeats so drift affects every case alike
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                samples[name].extend(await async_timeit(fn, repeats=1, inner=inner))
        medians = {name: summarize(s) for name, s in samples.items()}
    finally:
        await stack.aclose()

    base = medians[BASELINE]["median"]
    peer_overheads = [medians[p]["median"] - base for p in peers if p in medians]
    fastest_peer = min(peer_overheads) if peer_overheads else None
    for name, stats in medians.items():
        overhead = stats["median"] - base
        ratio: Any = None
        if fastest_peer and name != BASELINE and overhead > 0:
            ratio = f"{overhead / fastest_peer:.2f}x"
        result.add(
            name,
            **{
                "median µs": stats["median"],
                "p99 µs": stats["p99"],
                "overhead µs": overhead,
                "vs fastest peer": ratio,
            },
        )
    result.data = {"medians": medians, "repeats": repeats, "inner": inner}
    result.notes.append(
        "pybreaker wraps a sync no-op (its async path needs Tornado); its overhead is its "
        "bookkeeping around one call, comparable to the others."
    )
    result.notes.append(
        "Every row, the baseline included, is one harness coroutine awaiting the guarded or "
        "bare noop(), so 'overhead' is what the breaker adds; the floor row is the `async with` "
        "protocol alone (no breaker logic)."
    )
    result.notes.append(
        "Shared stores: admission is served from a local view (staleness <= 1 s) and successes "
        "are written behind, so the amortized per-call cost includes the batched store writes."
    )
    return result


def _keyed_cases(
    stack: contextlib.AsyncExitStack, count: int
) -> dict[str, Callable[[], Awaitable[object]]]:
    """The baseline, ours and circuitbreaker over ``count`` keys used round-robin."""
    keys = [f"provider:model-{i}" for i in range(count)]
    cases: dict[str, Callable[[], Awaitable[object]]] = {}
    base_keys = itertools.cycle(keys)

    async def baseline() -> None:
        next(base_keys)
        await noop()

    cases[f"{count:,} keys, {BASELINE}"] = baseline
    breaker = CircuitBreaker()
    stack.push_async_callback(breaker.aclose)
    our_keys = itertools.cycle(keys)

    async def ours() -> None:
        async with breaker.guard(next(our_keys)):
            await noop()

    cases[f"{count:,} keys, empathy-models, memory store"] = ours
    if peer_version("circuitbreaker"):
        import circuitbreaker

        async def plain() -> None:
            return None

        decorated = [
            circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60, name=key)(plain)
            for key in keys
        ]
        peer_keys = itertools.cycle(decorated)

        async def peer() -> None:
            await next(peer_keys)()

        cases[f"{count:,} keys, circuitbreaker"] = peer
    return cases


async def run_keys(quick: bool = False) -> BenchResult:
    """Breaker overhead per guarded call over 1 / 1k / 100k keys used round-robin."""
    counts = (1, 1_000, 10_000) if quick else (1, 1_000, 100_000)
    repeats, inner = (3, 1_000) if quick else (7, 20_000)
    result = BenchResult(
        name="breaker_keys",
        title="Breaker overhead per guarded call over many keys, memory store, CLOSED (µs)",
        columns=["median µs", "p99 µs", "overhead µs", "vs circuitbreaker"],
    )
    if not peer_version("circuitbreaker"):
        result.skipped["circuitbreaker"] = "not installed"
    stack = contextlib.AsyncExitStack()
    medians: dict[str, dict[str, float]] = {}
    try:
        groups = {count: _keyed_cases(stack, count) for count in counts}
        for _ in range(2):  # every key used twice, a flush interval apart: all stored
            for count, cases in groups.items():
                for fn in cases.values():
                    await async_timeit(fn, repeats=1, inner=count)
            await asyncio.sleep(0.6)
        samples: dict[str, list[float]] = {name: [] for cases in groups.values() for name in cases}
        for _ in range(repeats):  # interleaved: drift affects every case alike
            for cases in groups.values():
                for name, fn in cases.items():
                    samples[name].extend(await async_timeit(fn, repeats=1, inner=inner))
        medians = {name: summarize(s) for name, s in samples.items()}
    finally:
        await stack.aclose()
    for count in counts:
        prefix = f"{count:,} keys, "
        base = medians[prefix + BASELINE]["median"]
        peer = medians.get(prefix + "circuitbreaker")
        peer_overhead = None if peer is None else peer["median"] - base
        for name, stats in medians.items():
            if not name.startswith(prefix):
                continue
            overhead = stats["median"] - base
            ratio: Any = None
            if peer_overhead and not name.endswith(BASELINE) and overhead > 0:
                ratio = f"{overhead / peer_overhead:.2f}x"
            result.add(
                name,
                **{
                    "median µs": stats["median"],
                    "p99 µs": stats["p99"],
                    "overhead µs": overhead,
                    "vs circuitbreaker": ratio,
                },
            )
    result.data = {"medians": medians, "repeats": repeats, "inner": inner, "keys": counts}
    result.notes.append(
        "Each row's harness coroutine takes the next key from its own round-robin cycle and "
        "awaits one guarded (or, for the baseline, bare) noop(); overhead = row - that "
        "key count's baseline.  circuitbreaker keeps one circuit per decorated function, so "
        "it gets one decorated function per key."
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keys", action="store_true", help="only the many-keys table")
    args = parser.parse_args(argv)
    if not args.keys:
        write_result(asyncio.run(run(quick=args.quick)))
    write_result(asyncio.run(run_keys(quick=args.quick)))


if __name__ == "__main__":
    main()
