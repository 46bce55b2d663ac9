"""
Fixtures of the fault-injection suite (every test here is marked ``faults``).

PostgreSQL tests use ``EMPATHY_TEST_POSTGRES_DSN`` (skipped, saying why, when unset),
each in its own schema behind its own `TcpProxy`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from ._proxy import TcpProxy

POSTGRES_DSN_ENV = "EMPATHY_TEST_POSTGRES_DSN"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def postgres_dsn() -> str:
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    if not dsn:
        pytest.skip(f"{POSTGRES_DSN_ENV} is not set; the PostgreSQL fault tests need it")
    return dsn


@pytest.fixture
async def postgres_schema(postgres_dsn: str) -> AsyncIterator[str]:
    schema = f"empathy_fault_{uuid.uuid4().hex[:16]}"
    yield schema
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def proxy(postgres_dsn: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(postgres_dsn)
    fault = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await fault.start()
    yield fault
    await fault.aclose()


def through(dsn: str, proxy: TcpProxy, schema: str) -> str:
    """``dsn`` pointed at ``proxy`` and ``schema``."""
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    sep = "&" if parts.query else ""
    return (
        f"{parts.scheme}://{user}127.0.0.1:{proxy.port}{parts.path}?"
        f"{parts.query}{sep}schema={schema}"
    )
