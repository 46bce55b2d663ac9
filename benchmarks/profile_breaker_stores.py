"""
Where a shared breaker's store operation spends its time, layer by layer (the figures
behind the README's paragraph on shared breakers at real call rates).

Redis (``EMPATHY_BENCH_REDIS_URL``), one admission of a CLOSED key, paced at 1,000/s and
timed alone (median µs of ``--repeats`` interleaved passes of ``--calls`` calls):

- ``raw PING``: one asyncio round trip on a connection of its own; ``sync GET``: the
  sync redis-py client pybreaker and aiobreaker use;
- ``store.admit``: `RedisCircuitStateStore.admit` alone (the store packs the command and
  reads the reply itself); ``store.admit, redis-py's path``: the same on a client bound
  to one connection, whose command goes through redis-py's ``execute_command`` (the
  store's options: a 2 s ``socket_timeout``); ``+ failover``: through the
  breaker's degraded-mode wrapper; ``+ settled (future)``: through the task that carries
  it past a cancellation, as the breaker runs it; ``+ settled (asyncio.shield)``: the
  same task awaited through `asyncio.shield`, for comparison; ``guard``: ``async with
  breaker.guard(key)`` in exact mode;
- Redis's own time per script run (``INFO commandstats``, after ``CONFIG RESETSTAT``):
  an admission whose state the caller holds, and one whose state it does not (the
  script's full path).

SQLite (a temporary file): `SQLiteStateStore.admit` of a CLOSED key and a success's
`record`, back to back and a millisecond apart (``--calls`` of each).

PostgreSQL (``EMPATHY_BENCH_POSTGRES_DSN``): the store's read statement on a connection
taken from the pool and given back, and on one kept between statements (latency and
client CPU); a success's write (`record`) with ``synchronous_commit`` on and off.

These layers are reached through the breaker's private attributes: a profile, not part
of ``python -m benchmarks``.  Run: ``python -m benchmarks.profile_breaker_stores
[--calls 400] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.bench_breaker import REDIS_URL, _redis_reachable, noop
from benchmarks.bench_breaker_rates import Guarded, paced
from benchmarks.bench_telemetry import POSTGRES_DSN, _postgres_reachable
from empathy_models import CircuitBreaker
from empathy_models.circuit import BreakerPolicy
from empathy_models.records import Outcome, OutcomeReport

Op = Callable[[], Awaitable[object]]


def _keyless(op: Op) -> Guarded:
    """``op`` as a guarded call of `bench_breaker_rates.paced` (the key unused)."""

    async def call(_key: str) -> None:
        await op()

    return call


async def interleaved(cases: dict[str, Op], calls: int, repeats: int) -> None:
    """Every case once per repeat, in turn; print medians over the repeats."""
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, op in cases.items():
            times, c = await paced(_keyless(op), [""], 1000.0, calls)
            wall[name].append(statistics.median(times))
            cpu[name].append(c)
    base = statistics.median(cpu["idle (the pacing alone)"])
    for name in cases:
        w = statistics.median(wall[name])
        c = statistics.median(cpu[name]) - base
        print(f"  {name:34s} {w:8.1f} µs   CPU {c:7.1f} µs per call")


async def redis_layers(calls: int, repeats: int) -> None:
    import redis
    import redis.asyncio as aioredis

    print("Redis, an admission of a CLOSED key at 1,000/s (exact mode):")
    host, port = "127.0.0.1", 6379
    sync_client = redis.Redis.from_url(REDIS_URL)
    reader, writer = await asyncio.open_connection(host, port)
    async with CircuitBreaker(REDIS_URL, local_view_ttl=0) as breaker:
        key = "profile-breaker-stores"
        async with breaker.guard(key):
            pass
        store: Any = breaker._store
        stores: Any = breaker._stores
        settler: Any = breaker._settler
        policy = breaker.policy

        from empathy_models_redis import RedisCircuitStateStore

        # the same store class on a client bound to one connection: redis-py's command path
        bound = aioredis.Redis.from_url(
            REDIS_URL, single_connection_client=True, socket_timeout=2.0
        )
        by_client = RedisCircuitStateStore(bound)

        async def idle() -> None:
            pass

        async def ping() -> None:
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            await reader.readuntil(b"\r\n")

        async def sync_get() -> None:
            sync_client.get(key)

        async def shielded() -> None:
            await asyncio.shield(asyncio.ensure_future(stores.admit(key, policy)))

        async def guarded() -> None:
            async with breaker.guard(key):
                await noop()

        cases: dict[str, Op] = {
            "idle (the pacing alone)": idle,
            "raw PING": ping,
            "sync GET": sync_get,
            "store.admit": lambda: store.admit(key, policy),
            "store.admit, redis-py's path": lambda: by_client.admit(key, policy),
            "+ failover": lambda: stores.admit(key, policy),
            "+ settled (future)": lambda: settler.admit(stores, key, policy),
            "+ settled (asyncio.shield)": shielded,
            "guard (exact mode)": guarded,
        }
        await interleaved(cases, calls, repeats)

        admin = aioredis.Redis.from_url(REDIS_URL)
        try:
            for label, forget in (("state held", False), ("state not held", True)):
                await admin.config_resetstat()
                for _ in range(calls):
                    if forget:
                        store._keys.clear()  # the next run reads the whole state
                    await store.admit(key, policy)
                stats = await admin.info("commandstats")
                row = stats.get("cmdstat_evalsha", {})
                print(f"  Redis time per admission, {label}: {row.get('usec_per_call')} µs")
        finally:
            await admin.aclose()
            await by_client.aclose()
            await bound.aclose()
    writer.close()
    sync_client.close()


async def postgres_layers(calls: int, repeats: int) -> None:
    from empathy_models_postgres import PostgresCircuitStateStore

    print("PostgreSQL, the state store's read statement at 1,000/s:")
    async with PostgresCircuitStateStore(POSTGRES_DSN) as store:
        key = "profile-breaker-stores"
        policy = BreakerPolicy()
        await store.admit(key, policy)
        db: Any = store._db
        pool = await db.pool(store._migrations)
        sql = store._peek_sql

        async def idle() -> None:
            pass

        cases: dict[str, Op] = {
            "idle (the pacing alone)": idle,
            "pool.fetchrow (acquire, release)": lambda: pool.fetchrow(sql, key),
            "kept connection (statement)": lambda: db.statement(pool, "fetchrow", sql, key),
            "store.admit": lambda: store.admit(key, policy),
        }
        await interleaved(cases, calls, repeats)

    print("PostgreSQL, a success's write (record), median of the calls:")
    for setting in ("on", "off"):
        times: list[float] = []
        options: dict[str, Any] = {"server_settings": {"synchronous_commit": setting}}
        async with PostgresCircuitStateStore(POSTGRES_DSN, **options) as store:
            for i in range(calls):
                admission = await store.admit(key, policy)
                assert admission.ticket is not None
                report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.SUCCESS)
                t0 = time.perf_counter_ns()
                await store.record(key, policy, [report])
                if i >= calls // 5:  # after a warm-up
                    times.append((time.perf_counter_ns() - t0) / 1000.0)
                await asyncio.sleep(0.001)
        print(f"  synchronous_commit={setting:3s} {statistics.median(times):8.1f} µs")


async def sqlite_layers(calls: int) -> None:
    from empathy_models.backends.sqlite import SQLiteStateStore

    print("SQLite (a file of its own), a CLOSED admission and a success's write, median:")
    for label, pause in (("back to back", 0.0), ("a millisecond apart", 0.001)):
        admit_us: list[float] = []
        record_us: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            async with SQLiteStateStore(Path(tmp) / "breaker.db") as store:
                key = "profile-breaker-stores"
                policy = BreakerPolicy()
                for i in range(calls):
                    t0 = time.perf_counter_ns()
                    admission = await store.admit(key, policy)
                    t1 = time.perf_counter_ns()
                    assert admission.ticket is not None
                    report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.SUCCESS)
                    t2 = time.perf_counter_ns()
                    await store.record(key, policy, [report])
                    t3 = time.perf_counter_ns()
                    if i >= calls // 5:  # after a warm-up
                        admit_us.append((t1 - t0) / 1000.0)
                        record_us.append((t3 - t2) / 1000.0)
                    if pause:
                        await asyncio.sleep(pause)
        print(
            f"  {label:20s} store.admit {statistics.median(admit_us):6.1f} µs, "
            f"store.record {statistics.median(record_us):6.1f} µs"
        )


async def main(calls: int, repeats: int) -> None:
    await sqlite_layers(calls)
    if await _redis_reachable():
        await redis_layers(calls, repeats)
    else:
        print("Redis unreachable: skipped")
    if await _postgres_reachable():
        await postgres_layers(calls, repeats)
    else:
        print("PostgreSQL unreachable: skipped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.repeats))
