"""Fixtures for the Redis plugin's tests: a real Redis from EMPATHY_TEST_REDIS_URL."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis

REDIS_URL_ENV = "EMPATHY_TEST_REDIS_URL"


def redis_base_url() -> str:
    """The test Redis URL, or skip the test with the reason."""
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        pytest.skip(
            f"{REDIS_URL_ENV} is not set; set it to a scratch Redis database, "
            "e.g. redis://127.0.0.1:6379/15, to run the Redis plugin tests"
        )
    return url


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (test cleanup)."""
    client = aioredis.Redis.from_url(url)
    try:
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
        keys = [k async for k in client.scan_iter(match=escaped + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def redis_url() -> str:
    return redis_base_url()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards."""
    prefix = f"empathy-test:{uuid.uuid4().hex}:"
    yield prefix
    await delete_prefix(redis_url, prefix)


@pytest.fixture
def redis_store_url(redis_url: str, redis_prefix: str) -> str:
    """A redis:// URL whose store writes only under this test's prefix."""
    sep = "&" if "?" in redis_url else "?"
    return f"{redis_url}{sep}prefix={quote(redis_prefix, safe='')}"
