"""
Shared-store breaker cost at realistic call rates per key, and in exact mode.

A tight loop on one key flatters a breaker with a local view: its view never expires.
Here every guarded call is paced: calls arrive at a fixed rate per key, 1,000/s and
100/s on one key, and 0.5/s per key (200 keys used in turn at 100 calls/s, so each key's
view has expired by its next use: what a rarely used model costs).  Each call is timed on
its own (``perf_counter_ns`` around the guarded ``await noop()``), after one pass over
every key (each key's state then exists in the store); medians and p99 over the calls of
5 interleaved passes (500 / 100 / 200 calls each), minus the same harness around a bare
``await noop()``.  ``--quick`` (CI) times one short pass, the 0.5/s row over 4 keys.

Ours: ``CircuitBreaker`` on the SQLite, Redis and PostgreSQL stores, with its default
local view (``local_view_ttl=1``: admission from a view at most 1 s old, successes written
behind) and in exact mode (``local_view_ttl=0``: every admission asks the store).
Peers, each keeping its state in the same Redis (the issue's reference: pybreaker with
Redis storage), one breaker per key: pybreaker (``CircuitRedisStorage``, a sync client),
aiobreaker (its ``CircuitRedisStorage``, a sync client), purgatory
(``AsyncRedisUnitOfWork``).  Their state lives in the store on every call (they have no
local view), so they are compared with both of our modes.

Run: ``python -m benchmarks.bench_breaker_rates [--quick]`` (needs Redis at
``EMPATHY_BENCH_REDIS_URL``, default db 14; PostgreSQL at ``EMPATHY_BENCH_POSTGRES_DSN``
for that store's rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from benchmarks._common import (
    RESULTS_DIR,
    BenchResult,
    delete_redis_keys,
    drop_schemas,
    peer_version,
    scratch_dir,
    script_main,
    summarize,
)
from benchmarks.bench_breaker import REDIS_URL, _noop_sync, _redis_reachable, noop
from benchmarks.bench_telemetry import POSTGRES_DSN, _postgres_reachable
from empathy_models import CircuitBreaker

Guarded = Callable[[str], Awaitable[None]]
# (rate per key, keys used in turn, calls a second in all, calls timed per pass)
RATES: tuple[tuple[float, int, float, int], ...] = (
    (1_000.0, 1, 1_000.0, 500),
    (100.0, 1, 100.0, 100),
    (0.5, 200, 100.0, 200),
)
# --quick (CI: keeps the script from rotting; the 0.5/s row then has no warm-up pass)
QUICK_RATES: tuple[tuple[float, int, float, int], ...] = (
    (1_000.0, 1, 1_000.0, 20),
    (100.0, 1, 100.0, 5),
    (0.5, 4, 2.0, 2),
)
BASELINE = "baseline: await noop()"


def _label(rate: float) -> str:
    return f"{rate:g}/s per key"


async def paced(
    guarded: Guarded, keys: list[str], rate: float, calls: int
) -> tuple[list[float], float]:
    """
    ``calls`` guarded calls at ``rate`` a second over ``keys`` in turn: µs each, and the
    process CPU µs per call over the pass (background work the calls left, such as the
    exact mode's successes sent after the call, included: the pass ends with 20 ms idle).
    """
    out: list[float] = []
    clock = time.perf_counter
    cpu = time.process_time_ns()
    start = clock()
    for i in range(calls):
        wait = start + i / rate - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        key = keys[i % len(keys)]
        t0 = time.perf_counter_ns()
        await guarded(key)
        out.append((time.perf_counter_ns() - t0) / 1000.0)
    await asyncio.sleep(0.02)
    return out, (time.process_time_ns() - cpu) / 1000.0 / calls


async def _ours(stack: contextlib.AsyncExitStack, store: str, ttl: float) -> Guarded:
    breaker = await stack.enter_async_context(CircuitBreaker(store, local_view_ttl=ttl))

    async def guarded(key: str) -> None:
        async with breaker.guard(key):
            await noop()

    return guarded


def _per_key(make: Callable[[str], Callable[[], Awaitable[None]]]) -> Guarded:
    """A peer with one breaker per key, built by ``make(key)`` on the key's first call."""
    calls: dict[str, Callable[[], Awaitable[None]]] = {}

    async def guarded(key: str) -> None:
        call = calls.get(key)
        if call is None:
            call = calls[key] = make(key)
        await call()

    return guarded


def _pybreaker(namespace: str) -> Guarded:
    import pybreaker
    import redis as sync_redis

    client = sync_redis.Redis.from_url(REDIS_URL)

    def make(key: str) -> Callable[[], Awaitable[None]]:
        storage = pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, client, namespace=f"{namespace}:{key}"
        )
        b = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60, state_storage=storage)

        async def call() -> None:
            b.call(_noop_sync)
            await noop()

        return call

    return _per_key(make)


def _aiobreaker(namespace: str) -> Guarded:
    import aiobreaker
    import redis as sync_redis
    from aiobreaker.state import CircuitBreakerState
    from aiobreaker.storage.redis import CircuitRedisStorage

    client = sync_redis.Redis.from_url(REDIS_URL)

    def make(key: str) -> Callable[[], Awaitable[None]]:
        storage = CircuitRedisStorage(
            CircuitBreakerState.CLOSED, client, namespace=f"{namespace}:{key}"
        )
        b = aiobreaker.CircuitBreaker(
            fail_max=5, timeout_duration=timedelta(seconds=60), state_storage=storage
        )

        async def call() -> None:
            await b.call_async(noop)

        return call

    return _per_key(make)


async def _purgatory(stack: contextlib.AsyncExitStack) -> Guarded:
    from purgatory import AsyncCircuitBreakerFactory
    from purgatory.service._async.unit_of_work import AsyncRedisUnitOfWork

    factory = AsyncCircuitBreakerFactory(
        default_threshold=5, default_ttl=60, uow=AsyncRedisUnitOfWork(REDIS_URL)
    )
    await factory.initialize()
    prefix = uuid.uuid4().hex[:8]
    stack.push_async_callback(delete_redis_keys, REDIS_URL, f"cbr::{prefix}:")  # purgatory's keys

    async def guarded(key: str) -> None:
        async with await factory.get_breaker(f"{prefix}:{key}"):
            await noop()

    return guarded


async def _cases(
    stack: contextlib.AsyncExitStack, tmp: Path, result: BenchResult
) -> tuple[dict[str, Guarded], list[str]]:
    async def bare(key: str) -> None:
        await noop()

    cases: dict[str, Guarded] = {BASELINE: bare}
    stores: list[tuple[str, str]] = [("SQLite", f"sqlite:///{tmp / 'state.db'}")]
    # our stores write under a prefix / in a schema of this run's, removed at the end
    # (pushed first: runs after the breakers closed)
    tag = uuid.uuid4().hex[:8]
    redis_ok = await _redis_reachable()
    if redis_ok and peer_version("empathy-models-redis"):
        prefix = f"empathy-bench-rates-{tag}:"
        stores.append(("Redis", f"{REDIS_URL}?prefix={prefix}"))
        stack.push_async_callback(delete_redis_keys, REDIS_URL, prefix)
    else:
        result.skipped["empathy-models, Redis store"] = "Redis or empathy-models-redis unavailable"
    if await _postgres_reachable() and peer_version("empathy-models-postgres"):
        schema = f"empathy_bench_rates_{tag}"
        stores.append(("PostgreSQL", f"{POSTGRES_DSN}?schema={schema}"))
        stack.push_async_callback(drop_schemas, POSTGRES_DSN, [schema])
    else:
        result.skipped["empathy-models, PostgreSQL store"] = "PostgreSQL or the plugin unavailable"
    for name, url in stores:
        cases[f"empathy-models, {name} store"] = await _ours(stack, url, 1.0)
        cases[f"empathy-models, {name} store, exact (local_view_ttl=0)"] = await _ours(
            stack, url, 0.0
        )
    peers: list[str] = []
    namespace = f"empathy-bench-rates-{uuid.uuid4().hex[:8]}"
    if not redis_ok:
        result.skipped["peers"] = "Redis unreachable"
        return cases, peers
    stack.push_async_callback(delete_redis_keys, REDIS_URL, namespace)  # the peers' keys
    makers: tuple[tuple[str, str, Callable[[str], Guarded]], ...] = (
        ("pybreaker, Redis storage", "pybreaker", _pybreaker),
        ("aiobreaker, Redis storage", "aiobreaker", _aiobreaker),
    )
    for name, module, make in makers:
        if peer_version(module):
            cases[name] = make(namespace)
            peers.append(name)
        else:
            result.skipped[name] = "not installed (see benchmarks/requirements-peers.txt)"
    if peer_version("purgatory"):
        cases["purgatory, Redis unit of work"] = await _purgatory(stack)
        peers.append("purgatory, Redis unit of work")
    else:
        result.skipped["purgatory"] = "not installed"
    return cases, peers


async def run(quick: bool = False) -> BenchResult:
    repeats = 1 if quick else 5
    rates = QUICK_RATES if quick else RATES
    result = BenchResult(
        name="breaker_rates",
        title="Shared-store breaker per guarded call at a call rate per key (µs)",
        columns=[
            "rate per key",
            "median µs",
            "p99 µs",
            "overhead µs",
            "vs fastest peer",
            "CPU µs per call",
            "CPU vs fastest peer",
        ],
    )
    tmp = scratch_dir("empathy-bench-rates-")
    samples: dict[tuple[str, float], list[float]] = {}
    cpu: dict[tuple[str, float], list[float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        cases, peers = await _cases(stack, tmp, result)
        for rate, count, pace, calls in rates:
            keys = [f"provider:model-{i}" for i in range(count)]
            if not quick or count == 1:  # every key's state exists before timing
                for guarded in cases.values():
                    await paced(guarded, keys, pace, count)
            for _ in range(repeats):  # interleaved: drift affects every case alike
                for name, guarded in cases.items():
                    timed, cpu_per_call = await paced(guarded, keys, pace, calls)
                    samples.setdefault((name, rate), []).extend(timed)
                    cpu.setdefault((name, rate), []).append(cpu_per_call)
    curves: dict[str, dict[float, float]] = {}
    for rate, _, _, _ in rates:
        stats = {name: summarize(samples[(name, rate)]) for name in cases}
        base = stats[BASELINE]["median"]
        overheads = {name: s["median"] - base for name, s in stats.items()}
        for name, overhead in overheads.items():
            if name != BASELINE:
                curves.setdefault(name, {})[rate] = overhead
        fastest = min((overheads[p] for p in peers), default=None)
        cpu_base = statistics.median(cpu[(BASELINE, rate)])
        cpus = {name: statistics.median(cpu[(name, rate)]) - cpu_base for name in cases}
        fastest_cpu = min((cpus[p] for p in peers), default=None)
        for name, s in stats.items():
            ratio: Any = None
            cpu_ratio: Any = None
            if fastest and name != BASELINE and name not in peers:
                ratio = f"{overheads[name] / fastest:.2f}x"
            if fastest_cpu and fastest_cpu > 0 and name != BASELINE and name not in peers:
                cpu_ratio = f"{cpus[name] / fastest_cpu:.2f}x"
            result.add(
                name,
                **{
                    "rate per key": _label(rate),
                    "median µs": s["median"],
                    "p99 µs": s["p99"],
                    "overhead µs": overheads[name],
                    "vs fastest peer": ratio,
                    "CPU µs per call": cpus[name],
                    "CPU vs fastest peer": cpu_ratio,
                },
            )
    result.data = {
        "repeats": repeats,
        "medians": {f"{n} @ {_label(r)}": statistics.median(v) for (n, r), v in samples.items()},
        "overheads": {name: {_label(r): v for r, v in c.items()} for name, c in curves.items()},
    }
    if not quick:
        _plot(curves, peers)
    result.notes.append(
        "Rates: 1,000/s and 100/s on one key; 0.5/s per key = 200 keys in turn at 100 calls/s. "
        "Each call timed alone; 'vs fastest peer' is our overhead over the fastest Redis-backed "
        "peer's at the same rate. CPU: process CPU time per call over each pass (median of "
        "the passes) minus the bare harness's; it counts work done after a call returns "
        "(the exact mode sends a success to the store right after the call) and not the "
        "time spent waiting on the store."
    )
    result.notes.append(
        "The peers keep their state in Redis on every call; pybreaker and aiobreaker use a "
        "sync redis client (the loop blocks for the round trip), purgatory an async one."
    )
    return result


def _plot(curves: dict[str, dict[float, float]], peers: list[str]) -> None:
    """Overhead per guarded call against the call rate per key: ``breaker_rates.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        xs = sorted(curve)
        # a median at or under the bare harness's has no place on a log scale
        ys = [max(curve[x], 0.1) for x in xs]
        style = "--" if name in peers else ("-." if "exact" in name else "-")
        ax.plot(xs, ys, style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("calls per second on one key (0.5/s: the key's local view has expired)")
    ax.set_ylabel("overhead per guarded call, µs (median)")
    ax.set_title("Shared-store breaker cost against the call rate per key")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "breaker_rates.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
