"""
Child process for the fault tests that need a process of their own.

``python _exit_worker.py MODE KIND TARGET COUNT`` where KIND is ``sqlite`` (TARGET a
file path) or ``postgres`` (TARGET a DSN).  Prints JSON lines on stdout.

``sigterm``  opens the backend with ``async with``, records COUNT records that stay
             queued (a 60 s flush interval, a batch larger than COUNT), prints
             ``{"ready": COUNT}`` and sleeps until the test sends SIGTERM.
``unclosed`` opens the backend, records COUNT queued records, prints
             ``{"ready": COUNT}`` and returns from ``main`` without closing it.
``sigkill``  records COUNT records at a steady pace with small batches, printing
             ``{"accepted": n}`` every 500, then sleeps; the test kills it with SIGKILL.
``diskfull`` (sqlite) writes COUNT records, then makes every file this process writes
             stop growing past 256 KiB (``RLIMIT_FSIZE``: the write-ahead log can no
             longer grow, the disk is full for SQLite) for DISK_FULL_SECONDS, recording about
             3,000 records a second throughout and for a second after, waits until
             everything is written and prints the counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
import sqlite3
import sys
import time

from empathy_models.abc import TelemetryBackend
from empathy_models.backends.batching import BatchingTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend

sys.path.insert(0, __file__.rsplit("/", 3)[0])

from tests.faults._load import record


def emit(payload: dict[str, int | float]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def backend(kind: str, target: str, **options: int | float) -> TelemetryBackend:
    if kind == "sqlite":
        return SQLiteTelemetryBackend(target, **options)  # type: ignore[arg-type]
    from empathy_models_postgres import PostgresTelemetryBackend

    return BatchingTelemetryBackend(PostgresTelemetryBackend(target), **options)  # type: ignore[arg-type]


DISK_FULL_SECONDS = 5.0  # as in the issue
QUEUED = {"flush_interval": 60.0, "max_batch": 100_000, "max_queue": 100_000}


async def main(mode: str, kind: str, target: str, count: int) -> None:
    if mode == "sigterm":
        async with backend(kind, target, **QUEUED) as telemetry:
            await telemetry.recent()  # open (and migrated) before anything is queued
            for i in range(count):
                await telemetry.record(record(mode, i))
            emit({"ready": count})
            await asyncio.sleep(3600)
    elif mode == "unclosed":
        telemetry = backend(kind, target, **QUEUED)
        await telemetry.recent()
        for i in range(count):
            await telemetry.record(record(mode, i))
        emit({"ready": count})
    elif mode == "sigkill":
        telemetry = backend(kind, target, flush_interval=0.05, max_batch=100, max_queue=1_000)
        await telemetry.recent()
        for i in range(count):
            await telemetry.record(record(mode, i))
            if i % 20 == 19:
                await asyncio.sleep(0)
            if i % 500 == 499:
                emit({"accepted": i + 1})
        await asyncio.sleep(3600)
    elif mode == "diskfull":
        await disk_full(target, count, DISK_FULL_SECONDS)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


async def disk_full(path: str, count: int, seconds: float) -> None:
    telemetry = SQLiteTelemetryBackend(path, max_queue=200, flush_interval=0.05)
    produced = 0
    worst = 0.0

    async def produce(duration: float) -> None:
        nonlocal produced, worst
        end = time.monotonic() + duration
        while time.monotonic() < end:
            for _ in range(15):
                start = time.perf_counter()
                await telemetry.record(record("diskfull", produced))
                worst = max(worst, time.perf_counter() - start)
                produced += 1
            await asyncio.sleep(0.005)

    async with telemetry:
        for _ in range(count):
            await telemetry.record(record("diskfull", produced))
            produced += 1
        await telemetry.flush()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the log starts empty
        conn.close()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
        await produce(seconds)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await produce(1.0)
        deadline = time.monotonic() + 60
        while telemetry.pending and time.monotonic() < deadline:
            await telemetry.flush()
            await asyncio.sleep(0.05)
        await telemetry.recent(limit=1)  # replays the spool
        emit(
            {
                "produced": produced,
                "failed": telemetry.failed,
                "dropped": telemetry.dropped,
                "spooled": telemetry.spooled,
                "worst_ms": round(worst * 1e3, 2),
            }
        )


if __name__ == "__main__":
    # warnings of the exit hooks (a failed flush or spool write) reach the test's report
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
