"""
Several OS processes write calls into one store while an incremental reader polls
`TelemetryBackend.evidence` concurrently: at the end the reader holds exactly the
rollup of every record written (no change missed, none counted twice).

SQLite always runs (one file); PostgreSQL when ``EMPATHY_TEST_POSTGRES_DSN`` is set
(one schema, dropped afterwards).  The writers are ``tests/_workers/evidence_worker.py``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from empathy_models.backends import telemetry_from_url
from empathy_models.evidence import EvidenceBucket, rollup, sorted_buckets
from tests._namespaces import drop_namespace, private_url
from tests._workers import Child
from tests._workers.evidence_worker import records_for

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).parent / "_workers" / "evidence_worker.py"
PROCESSES = 4
BATCHES = 60

Key = tuple[str | None, str | None, str, Any]


async def _read_while_writing(url: str, writers: list[Child]) -> tuple[dict[Key, Any], int]:
    """
    Poll ``evidence(after_version=...)`` until every writer has exited, then once more.
    Returns the buckets held (each batch's buckets replacing the held ones by key) and
    how many polls returned something while writers were running.
    """
    held: dict[Key, EvidenceBucket] = {}
    seen: set[tuple[Key, int]] = set()
    version = 0
    busy_polls = 0
    async with telemetry_from_url(url) as reader:
        for w in writers:
            w.send("go")
        deadline = time.monotonic() + 120
        running = True
        while running:
            running = any(w.proc.poll() is None for w in writers)
            assert time.monotonic() < deadline, "the writers did not finish within 120 s"
            batch = await reader.evidence(after_version=version)
            assert batch.version >= version
            for b in batch.buckets:
                assert version < b.version <= batch.version, (b, version, batch.version)
                assert (b.key, b.version) not in seen, f"change {b.key} @ {b.version} seen twice"
                seen.add((b.key, b.version))
                held[b.key] = b
            if running and batch.buckets:
                busy_polls += 1
            version = batch.version
            await anyio.sleep(0.005)
    return held, busy_polls


def _check(url: str) -> None:
    writers = [Child(WORKER, url, str(i), str(BATCHES)) for i in range(PROCESSES)]
    try:
        for w in writers:
            assert w.read() == {"ready": True}
        held, busy_polls = anyio.run(_read_while_writing, url, writers)
        done = [w.read()["done"] for w in writers]
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.close()
    records = [r for p in range(PROCESSES) for b in range(BATCHES) for r in records_for(p, b)]
    assert sum(done) == len(records)
    want = rollup(records)
    got = sorted_buckets(held.values())
    assert [b.key for b in got] == [b.key for b in want]
    for g, e in zip(got, want, strict=True):
        counts = (g.samples, g.successes, g.ttft_n, g.input_tokens, g.output_tokens)
        assert counts == (e.samples, e.successes, e.ttft_n, e.input_tokens, e.output_tokens)
        assert math.isclose(g.latency_log_sum, e.latency_log_sum, rel_tol=1e-9), g.key
        assert math.isclose(g.cost_usd, e.cost_usd, rel_tol=1e-9), g.key
    # the reader really read while the processes wrote (not only after they finished)
    assert busy_polls >= 3, busy_polls
    print(f"{busy_polls} polls returned changes while the writers ran")


def test_processes_writing_one_sqlite_file_and_an_incremental_reader(tmp_path: Path) -> None:
    _check(f"sqlite:///{tmp_path / 'calls.db'}")


@pytest.mark.skipif(
    not os.environ.get("EMPATHY_TEST_POSTGRES_DSN"), reason="EMPATHY_TEST_POSTGRES_DSN is not set"
)
def test_processes_writing_one_postgres_schema_and_an_incremental_reader() -> None:
    pytest.importorskip("empathy_models_postgres")
    url = private_url(os.environ["EMPATHY_TEST_POSTGRES_DSN"])
    try:
        _check(url)
    finally:
        drop_namespace(url)
