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
plugin's sdist ships a copy at its root (with ``sdist-pytest.ini`` as ``pytest.ini``),
so the client library of each engine is imported inside its own fixtures: a plugin's
tests need only that plugin installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

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


@contextlib.contextmanager
def _server_lock(redis_url: str, *, exclusive: bool) -> Iterator[None]:
    # a file lock per Redis server, taken by every test process (pytest-xdist's workers
    # included): ``SCRIPT FLUSH`` and ``CLIENT PAUSE`` act on the whole server
    if sys.platform == "win32":  # no flock: the few tests involved may then collide
        yield
        return
    import fcntl

    parts = urlsplit(redis_url)
    socket = parts.path if parts.scheme == "unix" else ""
    server = f"{parts.hostname}:{parts.port or 6379}:{socket}"
    name = "empathy-test-redis-server-" + hashlib.sha256(server.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def redis_server_steady(redis_url: str) -> Iterator[None]:
    """
    No test flushes the Redis server's scripts or pauses its clients meanwhile
    (`redis_server_disturbed`).

    For a test whose command reaches Redis after its caller stopped waiting: nobody is
    left to load a flushed script again (Redis answers NOSCRIPT and runs nothing), and
    a paused server drops the command when its connection closes before the pause ends.
    """
    with _server_lock(redis_url, exclusive=False):
        yield


@pytest.fixture
def redis_server_disturbed(redis_url: str) -> Iterator[None]:
    """
    For a test that runs ``SCRIPT FLUSH`` or ``CLIENT PAUSE``: none of
    `redis_server_steady`'s tests run meanwhile.
    """
    with _server_lock(redis_url, exclusive=True):
        yield


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


@pytest.fixture
def breaker_fleet_check() -> Callable[[str], Awaitable[None]]:
    """``await check(store_url)``: `empathy_models.testing.fleet.breaker_fleet_check`."""
    from empathy_models.testing.fleet import breaker_fleet_check

    return breaker_fleet_check
