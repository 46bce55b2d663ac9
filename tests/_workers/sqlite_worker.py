"""
Child-process entry point for the SQLite multiprocess tests.

Run as ``python sqlite_worker.py MODE DB_PATH ...``; every mode prints JSON lines on
stdout and exits non-zero with a traceback on stderr if anything escapes.

``breaker DB_PATH``
    A command server over one `SQLiteStateStore`.  Prints ``{"ready": true}`` once the
    store is open, then answers one JSON command per stdin line.  Every command carries
    ``now`` (the store's clock, UTC epoch seconds, injected so that no test waits for
    time to pass) and ``policy`` (keyword arguments of `BreakerPolicy`):

    * ``{"op": "fail", "key": K, "n": N}``: N times admit, and report a failure when
      admitted.  Answers how many were admitted / rejected and the states that
      rejected.
    * ``{"op": "admit", "key": K, "n": N}``: N admits without reporting; answers the
      lease ids granted and the states that rejected.
    * ``{"op": "snapshot", "key": K}``: the state as `to_dict`.
    * ``{"op": "quit"}``.

``telemetry DB_PATH WORKER_ID COUNT``
    Prints ``{"ready": true}``, waits for a line on stdin (the start signal, so that
    every writer starts at once), records COUNT records with call ids
    ``w{WORKER_ID}-{i}`` through ``telemetry_from_url`` one `record` at a time, closes
    the backend and prints its counters.

``crash DB_PATH BATCH_SIZE LABEL``
    Writes batches of BATCH_SIZE records (call ids ``LABEL:batch:j``) forever with an
    unbatched backend (each ``record_many`` is one transaction) and prints
    ``{"committed": i}`` after batch i is committed.  The test kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from empathy_models.backends import telemetry_from_url
from empathy_models.backends.sqlite import SQLiteStateStore, SQLiteTelemetryBackend
from empathy_models.circuit import BreakerPolicy
from empathy_models.records import LLMCallRecord, Outcome, OutcomeReport

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def breaker(path: str) -> None:
    now = [0.0]
    store = SQLiteStateStore(path, clock=lambda: now[0], busy_timeout=0.05)
    async with store:
        emit({"ready": True})
        while True:
            line = await read_line()
            if not line:
                return
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                return
            now[0] = float(cmd["now"])
            policy = BreakerPolicy(**cmd.get("policy", {}))
            key = cmd["key"]
            if op == "fail":
                admitted = 0
                rejected_states: list[str] = []
                for _ in range(cmd["n"]):
                    admission = await store.admit(key, policy)
                    if admission.admitted and admission.ticket is not None:
                        admitted += 1
                        report = OutcomeReport(
                            ticket=admission.ticket, outcome=Outcome.FAILURE, error="boom"
                        )
                        await store.record(key, policy, [report])
                    else:
                        rejected_states.append(admission.state.state.value)
                emit({"admitted": admitted, "rejected_states": rejected_states})
            elif op == "admit":
                leases: list[str | None] = []
                rejected_states = []
                for _ in range(cmd["n"]):
                    admission = await store.admit(key, policy)
                    if admission.admitted and admission.ticket is not None:
                        leases.append(admission.ticket.lease_id)
                    else:
                        rejected_states.append(admission.state.state.value)
                emit({"leases": leases, "rejected_states": rejected_states})
            elif op == "snapshot":
                emit({"state": (await store.snapshot(key)).to_dict()})
            else:
                raise ValueError(f"unknown op {op!r}")


def make_record(call_id: str, i: int) -> LLMCallRecord:
    return LLMCallRecord(
        provider="prov",
        model=f"model-{i % 3}",
        outcome=Outcome.SUCCESS if i % 4 else Outcome.FAILURE,
        call_id=call_id,
        timestamp=BASE_TIME + timedelta(microseconds=i),
        workflow="mp",
        stage="write",
        latency_ms=float(i % 500),
        cost_usd=0.001,
        input_tokens=i % 100,
        output_tokens=1,
    )


async def telemetry(path: str, worker: int, count: int) -> None:
    backend = telemetry_from_url(f"sqlite:///{path}?max_batch=200&busy_timeout=0.05")
    assert isinstance(backend, SQLiteTelemetryBackend)
    async with backend:
        emit({"ready": True})
        await read_line()
        for i in range(count):
            await backend.record(make_record(f"w{worker}-{i}", i))
        await backend.flush()
        counters = {
            "failed": backend.failed,
            "dropped": backend.dropped,
            "busy_retries": backend.busy_retries,
        }
    emit({"done": count, **counters})


async def crash(path: str, batch_size: int, label: str) -> None:
    backend = SQLiteTelemetryBackend(path, batch=False)
    async with backend:
        batch_id = 0
        while True:
            await backend.record_many(
                [make_record(f"{label}:{batch_id}:{j}", j) for j in range(batch_size)]
            )
            emit({"committed": batch_id})
            batch_id += 1


def main(argv: list[str]) -> None:
    mode, path, *rest = argv
    if mode == "breaker":
        asyncio.run(breaker(path))
    elif mode == "telemetry":
        asyncio.run(telemetry(path, int(rest[0]), int(rest[1])))
    elif mode == "crash":
        asyncio.run(crash(path, int(rest[0]), rest[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
