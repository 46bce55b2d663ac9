"""
Telemetry: records per second into each backend against the raw ``sqlite3.executemany``
ceiling, the cost of ``await backend.record(rec)`` with room and under sustained load,
and throughput against the number of writer processes sharing one SQLite file.

1. Throughput and the ceiling, interleaved.  Each repeat measures, in an order that
   alternates from one repeat to the next (forward, then reversed):

   * the ceiling: ``executemany`` of the repeat's records, converted before the clock
     starts by the backend's own conversion (``_to_row`` of
     ``empathy_models.backends.sqlite._schema``) and inserted with the backend's own
     statement (``_INSERT_CALL``, ``ON CONFLICT (call_id) DO NOTHING``), in one
     ``BEGIN IMMEDIATE`` transaction, on a plain `sqlite3` connection with the backend's
     settings (WAL, ``synchronous=NORMAL``), into a new file whose tables our backend
     created (same columns and indexes);
   * `SQLiteTelemetryBackend` as shipped (batched, ``on_full="spill"``): ``record()``
     each of the same records one by one, then ``flush()``; the clock stops when every
     record is committed.  Past ``max_queue`` (10,000) queued records the default
     spills the queue to the local spool and the flush replays it into the file, so a
     burst larger than the queue goes partly through the spool (the ``spooled`` column
     says how many records did);
   * the same backend with ``on_full="wait"``: the producer waits for room instead, so
     every record goes queue -> batch -> transaction.

   Both backend files are checked to hold exactly the ceiling file's rows.  The ratio
   (backend records/s over ceiling records/s) is taken within each repeat; the table
   shows the median of those ratios.  What the ratio covers beyond the ceiling: the
   conversion of each record to a row, the queue, ``max_batch`` (500) records per
   transaction instead of one transaction, the aiosqlite thread hop, the evidence
   rollup written in the same transaction, and (default policy) the spool.  The
   null, memory and PostgreSQL backends are measured in the same repeats (PostgreSQL
   has no ratio: the ceiling is SQLite's).

2. ``record()`` per call, each call timed on its own (``perf_counter_ns`` around the
   ``await``; the timer's own cost is given in the notes):

   * with room: 500 records recorded back to back, then an untimed ``flush()``, so
     the queue never fills;
   * under sustained load: the producer offers records as fast as it can, yielding
     to the event loop once after each ``record()`` (as a caller awaiting something
     between calls would), which outruns every writer.  Untimed records first fill
     the queue up to ``max_queue`` (the run fails if it never fills); then each
     following call is timed, and the records pending before it are averaged.  With the
     default ``on_full="spill"`` a call that finds the queue full hands it to the
     spool writer (a worker thread) and returns, and if the spool writer is a whole
     queue behind, that call writes the backlog to the spool itself; with
     ``on_full="wait"`` the call waits until the writer takes the next batch.  The
     null and memory backends have no queue: ``record()`` stores at once, and their
     "under load" figures are the same loop.

   After the final flush the backend's own count of stored records (``aggregate()``
   sample sizes; ``accepted`` for null) must equal the records recorded, or the
   benchmark fails.

3. Writer processes: 1, 2 and 4 spawned processes, each recording N records (15,000:
   more than ``max_queue``, so the default policy spills part of them) through its own
   `SQLiteTelemetryBackend` into one shared file (see `benchmarks._telemetry_writers`).
   The clock runs from the first process leaving the start barrier to the last
   process's flush returning; total records/s (N times the processes over that time)
   is the median of the repeats, for ``on_full="spill"`` (default) and ``"wait"``,
   every configuration once per repeat; the file must hold every record.  Plotted to
   ``telemetry_writers.png``.

Also: SQLite throughput against ``max_batch`` (``on_full="wait"``, so every record
takes the queue -> transaction path whose batch size varies), plotted to
``telemetry_batch.png``.  Spool files go to a temporary ``$EMPATHY_HOME``.

``--quick`` (CI: that the code runs, not figures) shrinks everything: 1,000 records, 2
repeats, ``max_queue=500`` for the ``record()`` runs (500 calls timed under load), one
repeat of 500 records per writer process.  The full run uses the default ``max_queue``
(10,000) throughout.

Run: ``python -m benchmarks.bench_telemetry [--quick]``
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, BenchResult, drop_schemas, peer_version, script_main
from benchmarks._telemetry_writers import OnFull, WriterJob, WriterPool
from empathy_models import LLMCallRecord, ModelTier, Outcome, telemetry_from_url
from empathy_models.abc import TelemetryBackend
from empathy_models.backends.batching import DEFAULT_MAX_QUEUE, BatchingTelemetryBackend
from empathy_models.backends.null import NullTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.backends.sqlite._schema import _CALL_COLUMNS, _INSERT_CALL, _to_row

POSTGRES_DSN = os.environ.get(
    "EMPATHY_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)

CHUNK = 500  # records per timed run "with room" (the default max_batch)
WRITER_PROCESSES = (1, 2, 4)


def make_records(n: int) -> list[LLMCallRecord]:
    """``n`` records like the executor writes (each with a random ``call_id``)."""
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


# --------------------------------------------------------------------------- checks


class RecordsLostError(AssertionError):
    """A backend stored fewer (or more) records than were recorded."""


async def _stored(backend: TelemetryBackend) -> int:
    """How many records ``backend`` holds, by its own count (call after ``flush()``)."""
    if isinstance(backend, NullTelemetryBackend):
        return backend.accepted
    # every benchmark record is a success or a failure, so aggregate() counts each once
    return sum(m.sample_size for m in await backend.aggregate())


async def _expect_stored(backend: TelemetryBackend, expected: int, what: str) -> None:
    stored = await _stored(backend)
    if stored != expected:
        raise RecordsLostError(f"{what}: {expected:,} records recorded, {stored:,} stored")


def _file_rows(path: Path) -> list[tuple[Any, ...]]:
    """Every stored call of a SQLite file, as the backend's columns, by ``call_id``."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        columns = ", ".join(_CALL_COLUMNS)
        return conn.execute(f"SELECT {columns} FROM llm_calls ORDER BY call_id").fetchall()


def _file_count(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM llm_calls").fetchone()
    return int(count)


# --------------------------------------------------------------------------- 1. throughput


async def _create_file(path: Path) -> None:
    """A new SQLite file with the tables our backend creates (and nothing in them)."""
    async with SQLiteTelemetryBackend(path, spool=False) as backend:
        await backend.flush()


def _ceiling(path: Path, rows: Sequence[tuple[Any, ...]]) -> float:
    """Records/s of one raw ``executemany`` of ``rows`` into ``path``'s calls table."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # already WAL: the backend set it
        conn.execute("PRAGMA synchronous=NORMAL")  # as the backend's connection
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT_CALL, rows)
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - t0
    return len(rows) / elapsed


@dataclass
class _Run:
    rate: float  # records per second
    spooled: int  # records that went through the spool


async def _throughput(
    backend: TelemetryBackend, records: Sequence[LLMCallRecord], what: str
) -> _Run:
    """``record()`` every record, then ``flush()``; checks every record was stored."""
    async with backend:
        t0 = time.perf_counter()
        for r in records:
            await backend.record(r)
        await backend.flush()
        elapsed = time.perf_counter() - t0
        await _expect_stored(backend, len(records), what)
        spooled = int(getattr(backend, "spooled", 0))
    return _Run(len(records) / elapsed, spooled)


async def _against_ceiling(
    records: Sequence[LLMCallRecord],
    rows: Sequence[tuple[Any, ...]],
    paths: dict[str, Path],
    *,
    reverse: bool,
) -> dict[str, _Run]:
    """
    One repeat of part 1: the ceiling and the two SQLite policies, each into a new
    file of ``paths`` (keyed by side) created by our backend, in the order
    ceiling, default, wait (or its reverse); then every backend file must hold exactly
    the ceiling file's rows.
    """
    for path in paths.values():
        await _create_file(path)
    out: dict[str, _Run] = {}
    for name in reversed(paths) if reverse else paths:
        if name == CEILING:
            out[name] = _Run(_ceiling(paths[name], rows), 0)
        else:
            on_full: OnFull = "wait" if name == SQLITE_WAIT else "spill"
            backend = SQLiteTelemetryBackend(paths[name], on_full=on_full)
            out[name] = await _throughput(backend, records, name)
    expected = _file_rows(paths[CEILING])
    if len(expected) != len(records):
        raise RecordsLostError(f"ceiling: {len(records):,} rows inserted, {len(expected):,} stored")
    for name, path in paths.items():
        if name != CEILING and _file_rows(path) != expected:
            raise RecordsLostError(f"{name}: the stored rows differ from the ceiling's")
    for path in paths.values():
        path.unlink()
    return out


# --------------------------------------------------------------------------- 2. record()


@dataclass
class _CallTimes:
    samples: list[float]  # µs per call
    mean_pending: float = 0.0  # records pending (queued or spilling) before each timed call
    spooled: int = 0


def _summary(samples: Sequence[float]) -> dict[str, float]:
    """p50, p99 (nearest rank), mean and max of per-call times."""
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(n - 1, max(0, int(0.99 * n + 0.5) - 1))],
        "mean": statistics.fmean(ordered),
        "max": ordered[-1],
    }


def _pending(backend: TelemetryBackend) -> int | None:
    """Records in the backend's queue (and on their way to the spool); None: no queue."""
    pending = getattr(backend, "pending", None)
    return pending if isinstance(pending, int) else None


async def _record_with_room(
    backend: TelemetryBackend, records: Sequence[LLMCallRecord], what: str
) -> _CallTimes:
    """Each ``record()`` timed, ``CHUNK`` at a time with an untimed flush in between."""
    samples: list[float] = []
    clock = time.perf_counter_ns
    async with backend:
        for start in range(0, len(records), CHUNK):
            for r in records[start : start + CHUNK]:
                t0 = clock()
                await backend.record(r)
                samples.append((clock() - t0) / 1000.0)
            await backend.flush()
        await _expect_stored(backend, len(records), what)
    return _CallTimes(samples)


async def _record_under_load(
    backend: TelemetryBackend,
    records: Sequence[LLMCallRecord],
    timed: int,
    max_queue: int,
    what: str,
) -> _CallTimes:
    """
    Fill the queue up to ``max_queue`` (untimed, without yielding to the writer, so a
    writer that keeps up with a yielding producer on a loaded machine cannot keep it
    from filling), then time ``timed`` calls while the producer keeps outrunning the
    writer (one ``sleep(0)`` after each call, untimed).
    ``records`` must hold ``timed`` records more than filling the queue can take.
    """
    samples: list[float] = []
    clock = time.perf_counter_ns
    pending_sum = 0
    async with backend:
        i = 0
        warm_limit = len(records) - timed
        while (p := _pending(backend)) is not None and p < max_queue:
            if i == warm_limit:
                raise RuntimeError(f"{what}: the writer kept up; the queue never filled")
            await backend.record(records[i])  # no yield while there is room: it fills
            i += 1
        for r in records[i : i + timed]:
            pending_sum += _pending(backend) or 0
            t0 = clock()
            await backend.record(r)
            samples.append((clock() - t0) / 1000.0)
            await asyncio.sleep(0)
        await backend.flush()
        await _expect_stored(backend, i + timed, what)
        spooled = int(getattr(backend, "spooled", 0))
    return _CallTimes(samples, pending_sum / timed, spooled)


def _timer_cost_us() -> float:
    """Median cost of the ``perf_counter_ns`` pair around each timed call, in µs."""
    clock = time.perf_counter_ns
    costs = []
    for _ in range(20_000):
        t0 = clock()
        costs.append(clock() - t0)
    return statistics.median(costs) / 1000.0


# --------------------------------------------------------------------------- 3. processes


def _writers(
    tmp: Path, per_process: int, repeats: int, policies: tuple[OnFull, ...]
) -> dict[str, dict[int, list[float]]]:
    """Total records/s per policy and process count, ``repeats`` each (blocking)."""
    out: dict[str, dict[int, list[float]]] = {
        p: {n: [] for n in WRITER_PROCESSES} for p in policies
    }
    pool = WriterPool(max(WRITER_PROCESSES), WRITER_PROCESSES)
    try:
        runs = itertools.count()
        for i in range(repeats):
            # interleaved: every configuration once per repeat, order alternating
            configs = [(p, n) for p in policies for n in WRITER_PROCESSES]
            for policy, procs in configs if i % 2 == 0 else configs[::-1]:
                path = tmp / f"writers{next(runs)}.db"
                asyncio.run(_create_file(path))
                job = WriterJob(str(path), per_process, procs, policy)
                reports = pool.run([job] * procs)
                total = per_process * procs
                if (stored := _file_count(path)) != total:
                    raise RecordsLostError(
                        f"{procs} writer processes ({policy}): {total:,} recorded, "
                        f"{stored:,} in the file"
                    )
                elapsed = max(r.end for r in reports) - min(r.start for r in reports)
                out[policy][procs].append(total / elapsed)
                path.unlink()
    finally:
        pool.close()
    return out


# --------------------------------------------------------------------------- run


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


@contextlib.contextmanager
def _empathy_home(path: Path) -> Iterator[None]:
    """``$EMPATHY_HOME`` (where spools go) set to ``path`` for the block."""
    before = os.environ.get("EMPATHY_HOME")
    os.environ["EMPATHY_HOME"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["EMPATHY_HOME"]
        else:
            os.environ["EMPATHY_HOME"] = before


Factory = Callable[[int], TelemetryBackend]  # takes max_queue

SQLITE_DEFAULT = "SQLite (batched, default: spill)"
SQLITE_WAIT = "SQLite (batched, on_full=wait)"
PG_DEFAULT = "PostgreSQL (batched, default: spill)"
PG_WAIT = "PostgreSQL (batched, on_full=wait)"
CEILING = "raw sqlite3.executemany (ceiling)"


async def run(quick: bool = False) -> BenchResult:
    tmp = Path(tempfile.mkdtemp(prefix="empathy-bench-tel-"))
    try:
        with _empathy_home(tmp / "home"):
            return await _run(tmp, quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _run(tmp: Path, quick: bool) -> BenchResult:
    n = 1_000 if quick else 50_000
    repeats = 2 if quick else 5  # quick: still both orders of the throughput repeats
    # record(): calls timed with room, and under load; quick runs shrink the queue
    # (max_queue) so that filling it takes little time; the full run keeps the default
    room_n = 1_000 if quick else n
    timed = 500 if quick else 20_000
    max_queue = 500 if quick else DEFAULT_MAX_QUEUE
    per_process = 500 if quick else 15_000  # past max_queue: the default policy spills
    writer_repeats = 1 if quick else repeats
    curve_n = 1_000 if quick else 20_000
    records = make_records(n)
    rows = [_to_row(r) for r in records]  # the ceiling's rows, converted off the clock
    result = BenchResult(
        name="telemetry",
        title=(
            f"Telemetry throughput ({n:,} records; ratio to raw executemany per repeat, "
            f"median of {repeats}) and record() µs per call, with room / under sustained load"
        ),
        columns=[
            "records/s (median)",
            "vs raw executemany",
            "spooled",
            "room p50",
            "room p99",
            "room mean",
            "load p50",
            "load p99",
            "load mean",
            "load max",
        ],
    )
    files = itertools.count()

    def sqlite_path() -> Path:
        return tmp / f"t{next(files)}.db"

    factories: dict[str, Factory] = {
        "null://": lambda q: telemetry_from_url("null://"),
        "memory://": lambda q: telemetry_from_url("memory://"),
        SQLITE_DEFAULT: lambda q: SQLiteTelemetryBackend(sqlite_path(), max_queue=q),
        SQLITE_WAIT: lambda q: SQLiteTelemetryBackend(sqlite_path(), max_queue=q, on_full="wait"),
    }
    pg_schemas: list[str] = []
    if await _postgres_reachable():
        from empathy_models_postgres import PostgresTelemetryBackend

        def postgres(on_full: OnFull, max_queue: int) -> TelemetryBackend:
            pg_schemas.append(f"bench_tel_{os.getpid()}_{len(pg_schemas)}")
            inner = PostgresTelemetryBackend(POSTGRES_DSN, schema=pg_schemas[-1])
            # what telemetry_from_url("postgresql://...") builds, with on_full set
            return BatchingTelemetryBackend(inner, max_queue=max_queue, on_full=on_full)

        factories[PG_DEFAULT] = lambda q: postgres("spill", q)
        factories[PG_WAIT] = lambda q: postgres("wait", q)
    else:
        result.skipped["PostgreSQL"] = "not reachable or empathy-models-postgres not installed"

    seconds: dict[str, float] = {}  # wall time of each part of the run
    started = time.perf_counter()
    try:
        # 1. throughput, the two SQLite sides and the ceiling interleaved in each repeat
        runs: dict[str, list[_Run]] = {k: [] for k in [CEILING, *factories]}
        ratios: dict[str, list[float]] = {SQLITE_DEFAULT: [], SQLITE_WAIT: []}
        for i in range(repeats):
            this = await _against_ceiling(
                records, rows, {k: sqlite_path() for k in (CEILING, *ratios)}, reverse=i % 2 == 1
            )
            for name, measured in this.items():
                runs[name].append(measured)
            for name in ratios:
                ratios[name].append(this[name].rate / this[CEILING].rate)
            # the other backends in the same repeat (no ceiling of their own)
            for name, make in factories.items():
                if name not in ratios:
                    runs[name].append(await _throughput(make(DEFAULT_MAX_QUEUE), records, name))

        seconds["throughput"] = time.perf_counter() - started
        # 2. record() per call, with room and under sustained load
        started = time.perf_counter()
        timer = _timer_cost_us()
        load_records = make_records(2 * max_queue + timed)
        room: dict[str, _CallTimes] = {}
        load: dict[str, _CallTimes] = {}
        for name, make in factories.items():
            room[name] = await _record_with_room(make(max_queue), records[:room_n], name)
            load[name] = await _record_under_load(
                make(max_queue), load_records, timed, max_queue, name
            )
    finally:
        if pg_schemas:
            await drop_schemas(POSTGRES_DSN, pg_schemas)

    seconds["record"] = time.perf_counter() - started
    # 3. writer processes sharing one SQLite file (spawned: run off the event loop)
    started = time.perf_counter()
    writers = await asyncio.to_thread(_writers, tmp, per_process, writer_repeats, ("spill", "wait"))

    seconds["writers"] = time.perf_counter() - started
    # throughput against batch size (SQLite, on_full="wait": no spool on the path)
    started = time.perf_counter()
    curve: dict[int, float] = {}
    for batch in (10, 100, 1_000, 5_000):
        curve[batch] = statistics.median(
            [
                (
                    await _throughput(
                        SQLiteTelemetryBackend(sqlite_path(), max_batch=batch, on_full="wait"),
                        records[:curve_n],
                        f"max_batch={batch}",
                    )
                ).rate
                for _ in range(max(1, repeats - 2))
            ]
        )

    seconds["max_batch"] = time.perf_counter() - started
    ceiling_median = statistics.median(r.rate for r in runs[CEILING])
    result.add(CEILING, **{"records/s (median)": ceiling_median, "vs raw executemany": "1.00x"})
    for name in factories:
        values: dict[str, Any] = {
            "records/s (median)": statistics.median(r.rate for r in runs[name]),
            "spooled": statistics.median(r.spooled for r in runs[name]),
        }
        if name in ratios:
            values["vs raw executemany"] = f"{statistics.median(ratios[name]):.2f}x"
        values.update({f"room {k}": v for k, v in _summary(room[name].samples).items()})
        values.update({f"load {k}": v for k, v in _summary(load[name].samples).items()})
        del values["room max"]
        result.add(name, **values)

    result.notes.append(
        "vs raw executemany: median over repeats of (backend records/s / ceiling records/s), "
        "both measured in the same repeat, order alternating; per repeat: "
        + "; ".join(f"{k}: {', '.join(f'{r:.2f}' for r in v)}" for k, v in ratios.items())
    )
    result.notes.append(
        f"record() µs per call, each call timed on its own (timer cost {timer:.3f} µs "
        f"included). Room: {CHUNK} calls then a flush. Load: after the queue reached "
        f"max_queue={max_queue:,}, {timed:,} calls timed while the producer "
        "outruns the writer; records pending before a timed call, on average: "
        + ", ".join(f"{k}: {v.mean_pending:,.0f}" for k, v in load.items() if _has_queue(k))
        + "; records spooled during the load run: "
        + ", ".join(f"{k}: {v.spooled:,}" for k, v in load.items() if _has_queue(k))
        + ". null:// and memory:// have no queue. Every run's stored count was checked."
    )
    writer_medians = {
        policy: {procs: statistics.median(v) for procs, v in by_procs.items()}
        for policy, by_procs in writers.items()
    }
    for policy, medians in writer_medians.items():
        one = medians[1]
        result.notes.append(
            f"{per_process:,} records per process into one SQLite file (on_full={policy}), "
            f"total records/s, median of {writer_repeats}: "
            + ", ".join(
                f"{procs} process{'es' if procs > 1 else ''}: {v:,.0f}/s ({v / one:.2f}x)"
                for procs, v in medians.items()
            )
        )
    result.notes.append(
        "SQLite throughput by max_batch (on_full=wait): "
        + ", ".join(f"{b}: {v:,.0f}/s" for b, v in curve.items())
    )
    result.data = {
        "throughput": {k: [r.rate for r in v] for k, v in runs.items()},
        "spooled": {k: [r.spooled for r in v] for k, v in runs.items()},
        "ratio_to_ceiling": ratios,
        "record_with_room_us": {k: _summary(v.samples) for k, v in room.items()},
        "record_under_load_us": {
            k: {**_summary(v.samples), "mean_pending": v.mean_pending, "spooled": v.spooled}
            for k, v in load.items()
        },
        "timer_cost_us": timer,
        "writer_processes": {"records_per_process": per_process, "records_per_s": writers},
        "sqlite_throughput_by_batch": curve,
        "records": n,
        "repeats": repeats,
        "seconds": seconds,
    }
    _plot(curve, ceiling_median)
    _plot_writers(writers, per_process)
    return result


def _has_queue(name: str) -> bool:
    return name not in ("null://", "memory://")


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot(curve: dict[int, float], ceiling: float) -> None:
    plt = _pyplot()
    if plt is None:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = sorted(curve)
    ax.plot(xs, [curve[x] for x in xs], marker="o", label="SQLiteTelemetryBackend (on_full=wait)")
    ax.axhline(ceiling, linestyle="--", color="grey", label="raw executemany ceiling")
    ax.set_xscale("log")
    ax.set_xlabel("max_batch (records per transaction)")
    ax.set_ylabel("records / s")
    ax.set_title("Telemetry throughput vs batch size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "telemetry_batch.png", dpi=110)
    plt.close(fig)


def _plot_writers(writers: dict[str, dict[int, list[float]]], per_process: int) -> None:
    plt = _pyplot()
    if plt is None:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, by_procs in writers.items():
        xs = sorted(by_procs)
        medians = [statistics.median(by_procs[x]) for x in xs]
        lows = [m - min(by_procs[x]) for m, x in zip(medians, xs, strict=True)]
        highs = [max(by_procs[x]) - m for m, x in zip(medians, xs, strict=True)]
        ax.errorbar(
            xs,
            medians,
            yerr=[lows, highs],
            marker="o",
            capsize=4,
            label=f"on_full={policy}" + (" (default)" if policy == "spill" else ""),
        )
    ax.set_xticks(list(WRITER_PROCESSES))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("writer processes (one SQLiteTelemetryBackend each, one shared file)")
    ax.set_ylabel("total records / s (median; bars: min-max)")
    ax.set_title(f"Telemetry throughput vs writer processes ({per_process:,} records each)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "telemetry_writers.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
