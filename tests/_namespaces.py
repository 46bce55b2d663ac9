"""
A namespace of one test's own on the shared Redis and PostgreSQL servers (a key prefix,
a schema), dropped afterwards, so that tests leave nothing behind there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest


def private_url(url: str) -> str:
    """The shared server's URL narrowed to a namespace of this test run (dropped after)."""
    tag = uuid.uuid4().hex[:12]
    sep = "&" if "?" in url else "?"
    if url.startswith(("redis://", "rediss://")):
        return f"{url}{sep}prefix=empathy-test-{tag}:"
    return f"{url}{sep}schema=empathy_test_{tag}"


def drop_namespace(url: str) -> None:
    """Remove what the test wrote on a shared Redis or PostgreSQL server."""
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    base = url.split("?", 1)[0]
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(base)
        try:
            keys = list(client.scan_iter(match=f"{query['prefix']}*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
        return

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{query["schema"]}" CASCADE')
        finally:
            await conn.close()

    anyio.run(drop)


@contextmanager
def quota_url_of(kind: str, tmp_path: Path) -> Iterator[str]:
    """
    A quota store's URL of ``kind`` (``sqlite``, ``redis``, ``postgresql``): a file in
    ``tmp_path``, or a private namespace on the server ``EMPATHY_TEST_REDIS_URL`` /
    ``EMPATHY_TEST_POSTGRES_DSN`` names (the test is skipped without it).
    """
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/quota.db"
        return
    env = "EMPATHY_TEST_REDIS_URL" if kind == "redis" else "EMPATHY_TEST_POSTGRES_DSN"
    base = os.environ.get(env)
    if not base:
        pytest.skip(f"{env} is not set")
    url = private_url(base)
    try:
        yield url
    finally:
        drop_namespace(url)
