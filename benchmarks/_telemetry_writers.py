"""
The writer processes of `benchmarks.bench_telemetry`: several OS processes, each with
its own `SQLiteTelemetryBackend`, recording into one shared SQLite file.

The processes are started once (``spawn``) and reused for every measurement, so the
interpreter start-up and imports are never on the clock.  A job names the file, the
records per process, the size of the group (its barrier) and the backend's ``on_full``; each
process builds its records, opens its backend (the connection and schema check happen
here, off the clock), waits at the barrier, then records its records one by one and
flushes.  It answers with the monotonic times (``time.perf_counter``, CLOCK_MONOTONIC
on Linux, so comparable across processes) just after the barrier and just after its
flush returned, when every one of its records is committed (or was spooled and has
been replayed into the file by the flush).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import time
from dataclasses import dataclass
from typing import Literal

__all__ = ["WriterJob", "WriterPool", "WriterReport"]

OnFull = Literal["spill", "wait"]


@dataclass(frozen=True)
class WriterJob:
    """One process's share of a measurement."""

    path: str
    records: int
    parties: int  # how many processes write at once (selects the barrier)
    on_full: OnFull


@dataclass(frozen=True)
class WriterReport:
    """When one process started and when its records were all durable."""

    start: float
    end: float
    spooled: int


async def _write(job: WriterJob, barrier: multiprocessing.synchronize.Barrier) -> WriterReport:
    from benchmarks.bench_telemetry import make_records
    from empathy_models.backends.sqlite import SQLiteTelemetryBackend

    records = make_records(job.records)  # call_ids are random uuids: unique in the file
    async with SQLiteTelemetryBackend(job.path, on_full=job.on_full) as backend:
        await backend.flush()  # opens the connection and checks the schema
        barrier.wait()  # blocks the loop on purpose: nothing else runs in this process
        start = time.perf_counter()
        for record in records:
            await backend.record(record)
        await backend.flush()
        end = time.perf_counter()
        spooled = backend.spooled
    return WriterReport(start, end, spooled)


def _serve(
    barriers: dict[int, multiprocessing.synchronize.Barrier],
    jobs: multiprocessing.queues.Queue[WriterJob | None],
    reports: multiprocessing.queues.Queue[WriterReport],
) -> None:
    """A writer process: run jobs until it gets None."""
    while (job := jobs.get()) is not None:
        reports.put(asyncio.run(_write(job, barriers[job.parties])))


class WriterPool:
    """
    ``size`` spawned writer processes, each with a job queue of its own, and one
    barrier per group size in ``groups`` (a `multiprocessing.Barrier` is reusable).
    """

    def __init__(self, size: int, groups: tuple[int, ...]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._barriers = {n: ctx.Barrier(n) for n in groups}
        self._reports: multiprocessing.queues.Queue[WriterReport] = ctx.Queue()
        self._jobs: list[multiprocessing.queues.Queue[WriterJob | None]] = [
            ctx.Queue() for _ in range(size)
        ]
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(self._barriers, jobs, self._reports),
                name=f"telemetry-writer-{i}",
                daemon=True,
            )
            for i, jobs in enumerate(self._jobs)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, jobs: list[WriterJob], timeout: float = 600.0) -> list[WriterReport]:
        """Give job i to process i and wait for every report (blocking)."""
        for queue, job in zip(self._jobs, jobs, strict=False):
            queue.put(job)
        return [self._reports.get(timeout=timeout) for _ in jobs]

    def close(self) -> None:
        """Stop the processes (each ends after its current job) and wait for them."""
        for queue in self._jobs:
            queue.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()
