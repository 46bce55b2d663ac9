"""
What router start-up and refresh cost against a store that already holds history
(goals: ``start()`` over 1M stored calls <= 1 s, a refresh after 10k new calls
<= 50 ms of CPU).

For each backend (SQLite file, PostgreSQL when reachable) and each history size
(1k / 100k / 1M calls; ``--quick``: 2k), 7 models over 7 days of timestamps are
stored for real through the backend's own write path (``record_many`` of an unbatched
backend, 10,000 records per transaction: the calls and their evidence rollups are
written together, as in production).  Then:

* **start**: ``router.start()`` over a freshly opened backend (`start_cost`: every
  evidence bucket of the 7-day window read and applied to the router's evidence book,
  change test included), and the longest the event loop went without running another
  task meanwhile (`stalled`: how late a task waking every millisecond woke);
* **refresh**: 10,000 new calls are written, then ``router.refresh()`` reads what
  changed and applies it (`refresh_cost`);
* **slide**: the router's clock moves on by one step of the window's start (an hour for
  the default week), and ``router.refresh()`` drops the oldest hour and runs each arm's
  change test again from the window's new start (`slide_cost`), one arm at a time, in a
  worker thread: its wall and CPU time, and the longest the event loop went without
  running another task meanwhile (how late a task waking every millisecond woke);
* for context, the backend's ``evidence()`` read of the window alone;
* **a full garbage collection** (``gc.collect()``) of this process while a started
  router holds the week's evidence, against one just before it started: the pause the
  evidence book adds to every full collection of the process it lives in (for an
  async service, a stall of its event loop).

Wall time and CPU time of this process (`time.process_time`: the client side, including
SQLite's work on the connection thread; PostgreSQL's server CPU is not in it) are
medians of ``REPEATS`` runs (``--quick``: 2 runs, refreshes after 1,000 new calls).

Run: ``python -m benchmarks.bench_router_start [--quick]``
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._common import BenchResult, drop_schemas, script_main
from benchmarks.bench_routing import make_registry
from benchmarks.bench_telemetry import POSTGRES_DSN, _postgres_reachable
from empathy_models import AdaptiveModelRouter, LLMCallRecord, Outcome
from empathy_models._router import WINDOW_STEPS
from empathy_models.abc import TelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend

MODELS = 7
WINDOW = timedelta(days=7)
NEW_CALLS = 10_000
CHUNK = 10_000
REPEATS = 5
START_GOAL_S = 1.0
REFRESH_GOAL_CPU_S = 0.050
WINDOW_STEP = WINDOW.total_seconds() / WINDOW_STEPS  # how often the week's start moves

Factory = Callable[[], TelemetryBackend]
ServerCPU = Callable[[], Awaitable[float | None]]


# --------------------------------------------------------------------------- the data


def make_calls(n: int, start: datetime, end: datetime, *, seed: int) -> Iterator[LLMCallRecord]:
    """``n`` calls spread evenly over [start, end), 7 models, 95% successes."""
    rng = random.Random(seed)
    step = (end - start) / n
    ids = [m.id for m in make_registry(MODELS).models]
    for i in range(n):
        ok = rng.random() < 0.95
        yield LLMCallRecord(
            provider="anthropic" if i % 2 else "openai",
            model=ids[i % MODELS],
            outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
            timestamp=start + step * i,
            workflow="bench",
            stage="answer",
            latency_ms=rng.lognormvariate(6.0, 0.5),
            ttft_ms=rng.lognormvariate(4.0, 0.5) if ok else None,
            input_tokens=rng.randrange(200, 2_000),
            output_tokens=rng.randrange(50, 800) if ok else 0,
            cost_usd=rng.uniform(0.0001, 0.01),
        )


async def store_calls(backend: TelemetryBackend, calls: Iterator[LLMCallRecord]) -> None:
    """Write ``calls`` through ``record_many``, ``CHUNK`` records per transaction."""
    chunk: list[LLMCallRecord] = []
    for call in calls:
        chunk.append(call)
        if len(chunk) == CHUNK:
            await backend.record_many(chunk)
            chunk = []
    if chunk:
        await backend.record_many(chunk)
    await backend.flush()


# --------------------------------------------------------------------------- what is timed


def new_router(backend: TelemetryBackend, now: datetime | list[float]) -> AdaptiveModelRouter:
    """A router whose clock reads ``now``, or ``now[0]`` when given a list (movable)."""
    clock = now.timestamp if isinstance(now, datetime) else (lambda: now[0])
    return AdaptiveModelRouter(make_registry(MODELS), backend, refresh_interval=None, clock=clock)


def book_buckets(router: AdaptiveModelRouter) -> int:
    """Evidence buckets the router's book holds (a peek at its arms, for the table)."""
    return sum(len(arm.starts) for arm in router._memory.arms.values())


async def start_cost(backend: TelemetryBackend, *, now: datetime) -> tuple[int, float]:
    """
    ``router.start()`` over a freshly opened backend: read every evidence bucket of the
    window, build the evidence book (change test included), fill the recent-outcome
    windows.  Returns the number of buckets and the start's stall (`stalled`).
    """
    router = new_router(backend, now)
    stall = await stalled(router.start)
    buckets = book_buckets(router)
    await router.aclose()
    return buckets, stall


def full_collection_ms() -> float:
    """One full collection of the cyclic garbage collector, in milliseconds."""
    t0 = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t0) * 1000


async def collection_cost(backend: TelemetryBackend, *, now: datetime) -> tuple[float, float]:
    """
    A full collection's time just before ``router.start()`` and while the started
    router holds the window's evidence (ms, ms): what the book adds to every full
    collection of its process.
    """
    router = new_router(backend, now)
    full_collection_ms()  # what earlier runs left behind is gone before the baseline
    without = statistics.median(full_collection_ms() for _ in range(3))
    await router.start()
    try:
        full_collection_ms()  # the first one after a start also untracks its new tuples
        held = statistics.median(full_collection_ms() for _ in range(3))
    finally:
        await router.aclose()
    return without, held


async def refresh_cost(router: AdaptiveModelRouter) -> int:
    """``router.refresh()``: read the buckets changed since the last one and apply them."""
    await router.refresh()
    return book_buckets(router)


TICK = 0.001  # a stall: how late a task sleeping this long wakes (`stalled`)


async def slide_cost(router: AdaptiveModelRouter, clock: list[float]) -> float:
    """
    ``router.refresh()`` one step of the window's start later (`WINDOW_STEP`): the arms
    are judged again from the new start.  Returns its stall (`stalled`).
    """
    clock[0] += WINDOW_STEP
    return await stalled(router.refresh)


async def stalled(work: Callable[[], Awaitable[Any]]) -> float:
    """
    Await ``work()``; return the most (seconds) a task that wakes every millisecond
    (`TICK`) woke late meanwhile: how long the event loop could not run another task.
    """
    gaps: list[float] = [0.0]
    stop = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            gaps.append(now - last - TICK)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await work()
    stop = True
    await task
    return max(gaps)


async def evidence_read(backend: TelemetryBackend, *, now: datetime) -> None:
    """The backend's part of a start alone: ``evidence()`` over the window."""
    await backend.evidence(since=now - WINDOW)


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of one await."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = await fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


# --------------------------------------------------------------------------- one store


async def measure(
    make: Factory,
    size: int,
    *,
    repeats: int,
    legacy_repeats: int,
    seed: int,
    new_calls: int = NEW_CALLS,
    server_cpu: ServerCPU | None = None,
) -> dict[str, Any]:
    """Fill a fresh store with ``size`` calls, then time start and refresh reads."""
    now = datetime.now(UTC).replace(microsecond=0)
    history_end = now - timedelta(hours=1)
    out: dict[str, Any] = {"stored": size}
    async with make() as writer:
        t0 = time.perf_counter()
        await store_calls(writer, make_calls(size, now - WINDOW, history_end, seed=seed))
        out["fill_s"] = time.perf_counter() - t0

        starts: list[tuple[float, float, float]] = []
        server: list[float] = []
        for _ in range(repeats):
            async with make() as fresh:
                await fresh.flush()  # opened (connection, schema check) before the clock starts
                before = await server_cpu() if server_cpu else None
                wall, cpu, (buckets, stall) = await timed(partial(start_cost, fresh, now=now))
                after = await server_cpu() if server_cpu else None
            starts.append((wall, cpu, stall))
            if before is not None and after is not None:
                server.append(after - before)
        out["start_buckets"] = buckets
        out["start_wall_s"] = statistics.median(w for w, _, _ in starts)
        out["start_cpu_s"] = statistics.median(c for _, c, _ in starts)
        out["start_stall_s"] = statistics.median(s for _, _, s in starts)
        out["start_server_cpu_s"] = statistics.median(server) if server else None

        async with make() as fresh:
            await fresh.flush()
            out["gc_without_ms"], out["gc_held_ms"] = await collection_cost(fresh, now=now)

        # the backend's read alone, for context (before the refresh phase adds to it)
        legacy: list[float] = []
        for _ in range(legacy_repeats):
            async with make() as fresh:
                await fresh.flush()
                wall, _, _ = await timed(partial(evidence_read, fresh, now=now))
            legacy.append(wall)
        out["legacy_start_s"] = statistics.median(legacy) if legacy else None
        out["legacy_repeats"] = legacy_repeats

        refreshes: list[tuple[float, float]] = []
        changed = 0
        async with make() as reader:
            router = new_router(reader, now)
            await router.start()
            before_refresh = book_buckets(router)
            for i in range(repeats):
                # new_calls calls (10k: ~20 calls/s) in the last 500 s before the refresh
                t_end = history_end + timedelta(seconds=600 * (i + 1))
                new = make_calls(
                    new_calls, t_end - timedelta(seconds=500), t_end, seed=seed + i + 1
                )
                await store_calls(writer, new)
                wall, cpu, held = await timed(partial(refresh_cost, router))
                changed, before_refresh = held - before_refresh, held
                refreshes.append((wall, cpu))
            await router.aclose()
        out["refresh_buckets"] = changed

        slides: list[tuple[float, float, float]] = []
        async with make() as reader:
            clock = [now.timestamp()]
            router = new_router(reader, clock)
            await router.start()
            for _ in range(repeats):
                wall, cpu, stall = await timed(partial(slide_cost, router, clock))
                slides.append((wall, cpu, stall))
            await router.aclose()
        out["slide_wall_s"] = statistics.median(w for w, _, _ in slides)
        out["slide_cpu_s"] = statistics.median(c for _, c, _ in slides)
        out["slide_stall_s"] = statistics.median(g for _, _, g in slides)
        out["refresh_wall_s"] = statistics.median(w for w, _ in refreshes)
        out["refresh_cpu_s"] = statistics.median(c for _, c in refreshes)

    return out


# --------------------------------------------------------------------------- the run


async def run(quick: bool = False) -> BenchResult:
    sizes = (2_000,) if quick else (1_000, 100_000, 1_000_000)
    repeats, new_calls = (2, 1_000) if quick else (REPEATS, NEW_CALLS)
    result = BenchResult(
        name="router_start",
        title=(
            "Router start-up and refresh against stored history "
            f"({MODELS} models over 7 days; evidence rollups)"
        ),
        columns=[
            "buckets read",
            "start wall ms",
            "start CPU ms",
            "start server CPU ms",
            "start stall ms",
            "refresh wall ms",
            "refresh CPU ms",
            "slide wall / CPU ms",
            "slide stall ms",
            "evidence() alone s",
            "full GC ms, router held / not",
            "goals",
        ],
    )
    tmp = Path(tempfile.mkdtemp(prefix="empathy-bench-start-"))
    backends: dict[str, Callable[[int], tuple[Factory, ServerCPU | None]]] = {
        "SQLite": lambda n: (
            lambda: SQLiteTelemetryBackend(tmp / f"calls-{n}.db", batch=False),
            None,
        ),
    }
    schemas: list[str] = []
    if await _postgres_reachable():
        from empathy_models_postgres import PostgresTelemetryBackend

        def pg(n: int) -> tuple[Factory, ServerCPU]:
            schema = f"bench_start_{uuid.uuid4().hex[:10]}_{n}"
            schemas.append(schema)
            # one connection, named, so that its server process's CPU can be read
            return (
                lambda: PostgresTelemetryBackend(
                    POSTGRES_DSN,
                    schema=schema,
                    min_size=1,
                    max_size=1,
                    server_settings={"application_name": schema},
                ),
                partial(pg_server_cpu, schema),
            )

        backends["PostgreSQL"] = pg
    else:
        result.skipped["PostgreSQL"] = "not reachable or empathy-models-postgres not installed"

    data: dict[str, list[dict[str, Any]]] = {}
    try:
        for name, factory in backends.items():
            for size in sizes:
                legacy_repeats = 1 if (quick or size >= 1_000_000) else 3
                t0 = time.perf_counter()
                make, server_cpu = factory(size)
                m = await measure(
                    make,
                    size,
                    server_cpu=server_cpu,
                    repeats=repeats,
                    legacy_repeats=legacy_repeats,
                    seed=size,
                    new_calls=new_calls,
                )
                data.setdefault(name, []).append(m)
                goals = []
                if size >= 1_000_000:
                    goals.append(_verdict("start", m["start_wall_s"] <= START_GOAL_S))
                goals.append(_verdict("refresh", m["refresh_cpu_s"] <= REFRESH_GOAL_CPU_S))
                result.add(
                    f"{name}, {size:,} calls stored",
                    **{
                        "buckets read": m["start_buckets"],
                        "start wall ms": m["start_wall_s"] * 1000,
                        "start CPU ms": m["start_cpu_s"] * 1000,
                        "start server CPU ms": (
                            None
                            if m["start_server_cpu_s"] is None
                            else m["start_server_cpu_s"] * 1000
                        ),
                        "start stall ms": m["start_stall_s"] * 1000,
                        "refresh wall ms": m["refresh_wall_s"] * 1000,
                        "refresh CPU ms": m["refresh_cpu_s"] * 1000,
                        "slide wall / CPU ms": (
                            f"{m['slide_wall_s'] * 1000:.0f} / {m['slide_cpu_s'] * 1000:.0f}"
                        ),
                        "slide stall ms": m["slide_stall_s"] * 1000,
                        "evidence() alone s": m["legacy_start_s"],
                        "full GC ms, router held / not": (
                            f"{m['gc_held_ms']:.1f} / {m['gc_without_ms']:.1f}"
                        ),
                        "goals": ", ".join(goals),
                    },
                )
                print(
                    f"  {name} {size:,}: filled in {m['fill_s']:.1f} s, "
                    f"measured in {time.perf_counter() - t0 - m['fill_s']:.1f} s",
                    flush=True,
                )
    finally:
        await drop_schemas(POSTGRES_DSN, schemas)
        shutil.rmtree(tmp, ignore_errors=True)
    result.data = {"runs": data, "repeats": repeats, "new_calls": new_calls}
    result.notes += [
        f"History stored for real through each backend's write path (record_many of an "
        f"unbatched backend, {CHUNK:,} calls per transaction, rollups maintained in the same "
        "transaction).",
        f"start = router.start() over a freshly opened backend (every evidence bucket of the "
        f"7-day window read and applied to the evidence book; start stall: as the slide's "
        f"below, and the start's CPU includes that task's own); refresh = router.refresh() after "
        f"{new_calls:,} new calls (buckets read = new buckets in the book); medians of "
        f"{repeats} runs. CPU is this process's (time.process_time: client side, SQLite "
        "included).",
        f"Goals (issue #12): start <= {START_GOAL_S:g} s at 1M calls; refresh <= "
        f"{REFRESH_GOAL_CPU_S * 1000:g} ms CPU. start server CPU = the PostgreSQL server process's "
        "CPU during the read (from /proc, 10 ms ticks); client + server CPU is the work a "
        "start needs, which wall time exceeds only when the machine is shared. "
        "evidence() alone = the backend's read of the window without the router, wall "
        "time, median of 3 runs (1 at 1M calls and in --quick).",
        "slide = router.refresh() after the router's clock moved on by an hour, the step "
        "in which the default week's start moves: the oldest hour dropped and every arm's "
        "change test run again from the window's new start, one arm at a time, in a worker "
        "thread; slide stall = the longest the event loop went without running another "
        f"task meanwhile: how late a task sleeping {TICK * 1000:g} ms at a time woke (medians "
        f"of {repeats} slides, each an hour later; the slide's CPU includes that task's own).",
        "full GC = gc.collect() in this process while a started router holds the window's "
        "evidence, and just before it started (medians of 3, after one collection that "
        "clears what came before): the pause the evidence book adds to every full "
        "collection of the process.",
    ]
    return result


async def pg_server_cpu(application_name: str) -> float | None:
    """
    CPU seconds used so far by the PostgreSQL server processes of the connections named
    ``application_name``, read from ``/proc`` (None unless the server runs on this host).
    """
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
        )
    finally:
        await conn.close()
    seconds = [_process_cpu(row["pid"]) for row in rows]
    return None if not seconds or None in seconds else sum(s for s in seconds if s is not None)


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (from /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # from field 3 (state) on
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _verdict(what: str, met: bool) -> str:
    return f"{what} {'ok' if met else 'MISSED'}"


def main(argv: list[str] | None = None) -> int:
    script_main(__doc__, run, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
