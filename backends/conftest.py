"""
Fixtures shared by the plugins' tests (backends/redis/tests, backends/postgres/tests).

They run against real services named by the environment and skip, saying why, when
it does not name them:

* ``EMPATHY_TEST_REDIS_URL``, e.g. ``redis://127.0.0.1:6379/15`` (a scratch database:
  each test writes under its own key prefix and deletes it afterwards);
* ``EMPATHY_TEST_POSTGRES_DSN``, e.g. ``postgresql://postgres@127.0.0.1:5432/test``
  (each test works in its own schema, dropped afterwards).

One conftest for both plugins (rather than one per ``tests/``) so that mypy can check
every test module in one run without two modules both named ``tests.conftest``.  Each
plugin's sdist ships a copy at its root (with ``_breaker_worker.py`` and
``sdist-pytest.ini`` as ``pytest.ini``), so the client library of each engine is
imported inside its own fixtures: a plugin's tests need only that plugin installed.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from empathy_models.backends import state_store_from_url
from empathy_models.records import CircuitState

REDIS_URL_ENV = "EMPATHY_TEST_REDIS_URL"
POSTGRES_DSN_ENV = "EMPATHY_TEST_POSTGRES_DSN"


@pytest.fixture(autouse=True)
def empathy_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own ``$EMPATHY_HOME`` (telemetry spools)."""
    home = tmp_path / "empathy-home"
    monkeypatch.setenv("EMPATHY_HOME", str(home))
    return home


def _with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


# --------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_url() -> str:
    """The test Redis URL, or skip the test with the reason."""
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        pytest.skip(
            f"{REDIS_URL_ENV} is not set; set it to a scratch Redis database, "
            "e.g. redis://127.0.0.1:6379/15, to run the Redis plugin tests"
        )
    return url


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards."""
    prefix = f"empathy-test:{uuid.uuid4().hex}:"
    yield prefix
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def redis_store_url(redis_url: str, redis_prefix: str) -> str:
    """A redis:// URL whose store writes only under this test's prefix."""
    return _with_query(redis_url, prefix=redis_prefix)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_dsn() -> str:
    """The test DSN, or skip the test with the reason."""
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    if not dsn:
        pytest.skip(
            f"{POSTGRES_DSN_ENV} is not set; set it to a scratch database, e.g. "
            "postgresql://postgres@127.0.0.1:5432/test, to run the PostgreSQL plugin tests"
        )
    return dsn


@pytest.fixture
async def postgres_schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A schema unique to this test; dropped with everything in it afterwards."""
    schema = f"empathy_test_{uuid.uuid4().hex[:16]}"
    yield schema
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def postgres_url(postgres_dsn: str, postgres_schema: str) -> str:
    """A postgresql:// URL whose backends write only in this test's schema."""
    return _with_query(postgres_dsn, schema=postgres_schema)


@pytest.fixture
def with_query() -> Callable[..., str]:
    """``with_query(url, name=value, ...)``: add query parameters to a URL."""
    return _with_query


# --------------------------------------------------------------------------- processes

BREAKER_WORKER = Path(__file__).parent / "_breaker_worker.py"


class Child:
    """One worker process with a JSON-lines conversation and a deadline on every read."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BREAKER_WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self._buffer = b""

    def send(self, payload: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(payload).encode() + b"\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next JSON line; fails with the child's stderr if it dies or stays silent."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.fail(f"no answer within {timeout} s")
                chunk = self.proc.stdout.read(65536)
                if not chunk:
                    self.fail("the worker exited")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def fail(self, why: str) -> None:
        self.kill()
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read().decode(errors="replace")
        pytest.fail(f"breaker worker: {why}; stderr:\n{stderr}", pytrace=False)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def spawn_breaker_worker() -> Iterator[Callable[..., Child]]:
    """``spawn(url, key, policy_kwargs, local_view_ttl)``: a started, ready worker."""
    children: list[Child] = []

    def spawn(url: str, key: str, policy: dict[str, Any], ttl: float) -> Child:
        child = Child(url, key, json.dumps(policy), str(ttl))
        children.append(child)
        assert child.read() == {"ready": True}
        return child

    yield spawn
    for child in children:
        if child.proc.poll() is None:
            try:
                child.send({"op": "quit"})
                child.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                child.kill()
        for stream in (child.proc.stdin, child.proc.stdout, child.proc.stderr):
            if stream is not None:
                stream.close()


def _ask_all(children: list[Child], payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``payload`` to every child first (so they run at once), then read each answer."""
    for child in children:
        child.send(payload)
    return [child.read() for child in children]


@pytest.fixture
def breaker_fleet_check(
    spawn_breaker_worker: Callable[..., Child],
) -> Callable[[str], Awaitable[None]]:
    """
    ``await check(store_url)``: three OS processes, each with its own `CircuitBreaker`
    over the shared store at ``store_url``, guard one key.

    * Failures from all three trip the circuit exactly at the threshold (9): the store
      shows OPEN, generation 1, a streak of exactly 9 (later failures carry the old
      generation and are dropped).
    * Once each process's local view is older than ``local_view_ttl`` (their breaker
      clocks are moved, no waiting), every process rejects.
    * After recovery (the open period is ended by forcing it to a past time, since the
      store's clock cannot be moved), 3 x 4 concurrent admissions get exactly one
      probe lease in total; its success closes the circuit for everyone.
    """

    async def check(url: str) -> None:
        key = "fleet-" + uuid.uuid4().hex[:8]
        policy = {
            "consecutive_failures": 9,
            "minimum_calls": 1000,
            "recovery_seconds": 3600.0,
            "max_recovery_seconds": 3600.0,
            "half_open_probes": 1,
            "probe_lease_seconds": 3600.0,
        }
        ttl = 5.0
        children = [spawn_breaker_worker(url, key, policy, ttl) for _ in range(3)]
        store = state_store_from_url(url)
        async with store:
            answers = _ask_all(children, {"op": "fail", "n": 2})
            assert [a["admitted"] for a in answers] == [2, 2, 2]
            state = await store.snapshot(key)
            assert (state.state, state.generation, state.consecutive_failures) == (
                CircuitState.CLOSED,
                0,
                6,
            )

            answers = _ask_all(children, {"op": "fail", "n": 5})
            assert sum(a["admitted"] for a in answers) >= 3
            state = await store.snapshot(key)
            assert state.state is CircuitState.OPEN
            assert (state.generation, state.consecutive_failures, state.open_count) == (1, 9, 1)

            # every local view goes stale: every process now asks the store and rejects
            _ask_all(children, {"op": "advance", "seconds": ttl})
            answers = _ask_all(children, {"op": "fail", "n": 1})
            assert answers == [{"admitted": 0, "rejected": ["open"]}] * 3

            # recovery: end the open period (a time in the past), let the views go stale
            await store.force(
                key,
                CircuitState.FORCED_OPEN,
                until=datetime.now(UTC) - timedelta(minutes=5),
                reason="recovered",
            )
            _ask_all(children, {"op": "advance", "seconds": ttl})
            answers = _ask_all(children, {"op": "admit", "n": 4})
            assert sum(a["admitted"] for a in answers) == 1, answers
            assert sum(len(a["leases"]) for a in answers) == 1, answers
            state = await store.snapshot(key)
            assert state.state is CircuitState.HALF_OPEN
            assert state.probes_in_flight == 1

            prober = next(c for c, a in zip(children, answers, strict=True) if a["leases"])
            prober.send({"op": "report", "outcome": "success"})
            assert prober.read() == {"reported": 1}
            state = await store.snapshot(key)
            assert state.state is CircuitState.CLOSED

            _ask_all(children, {"op": "advance", "seconds": ttl})
            answers = _ask_all(children, {"op": "admit", "n": 1})
            assert answers == [{"admitted": 1, "leases": [], "rejected": []}] * 3

    return check
