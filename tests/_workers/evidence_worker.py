"""
Child-process entry point for the evidence multiprocess tests.

Run as ``python evidence_worker.py URL WORKER_ID BATCHES``: opens the telemetry backend
of URL unbatched (each ``record_many`` is one transaction), prints ``{"ready": true}``,
waits for a line on stdin (the start signal, so that every writer starts at once),
writes ``records_for(WORKER_ID, b)`` for b in range(BATCHES), prints ``{"done": N}``
with the number of records written, and exits.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from datetime import UTC, datetime, timedelta

from empathy_models.backends import telemetry_from_url
from empathy_models.records import LLMCallRecord, Outcome

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
MINUTES = 20


def records_for(worker: int, batch: int) -> list[LLMCallRecord]:
    """The records of one batch: 1-40 calls over 20 minutes, so workers share buckets."""
    rng = random.Random(worker * 100_003 + batch)
    return [
        LLMCallRecord(
            provider="prov",
            model=rng.choice(["m-a", "m-b", "m-c"]),
            outcome=rng.choice([Outcome.SUCCESS] * 8 + [Outcome.FAILURE, Outcome.CANCELLED]),
            call_id=f"w{worker}-{batch}-{i}",
            timestamp=BASE_TIME + timedelta(seconds=rng.uniform(0, MINUTES * 60)),
            workflow=rng.choice([None, "wf"]),
            stage=rng.choice([None, "s"]),
            latency_ms=rng.uniform(1.0, 2000.0),
            ttft_ms=rng.choice([None, rng.uniform(1.0, 200.0)]),
            cost_usd=rng.uniform(0.0, 0.01),
            input_tokens=rng.randrange(1000),
            output_tokens=rng.randrange(300),
        )
        for i in range(rng.randrange(1, 41))
    ]


async def main(url: str, worker: int, batches: int) -> None:
    written = 0
    async with telemetry_from_url(url, batch=False) as backend:
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for b in range(batches):
            records = records_for(worker, b)
            await backend.record_many(records)
            written += len(records)
    print(json.dumps({"done": written}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
