"""
A PostgreSQL quota store behind a `TcpProxy` that refuses connections while a call is
out: the tokens the call used beyond its rate-limit estimate (its over-count) reach the
store's schedule once it answers again, sent again in the background as budget
settlements are; an over-count that cannot land before the executor's close ends is
counted in the limiter's ``unadjusted`` and logged once.  Real HTTP to a
`FakeLLMServer` that bills more prompt tokens than the executor estimated.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest

from empathy_models import ExecutionContext, RateLimit
from empathy_models.limits import quota_store_from_url
from empathy_models.testing import FakeLLMServer, FakeReply, ModelBehavior
from tests._fakes import CHEAP_ONLY, KEY, http_executor

from ._proxy import TcpProxy
from .conftest import through

MODEL = "gpt-fake-mini"
CTX = ExecutionContext(model=MODEL, max_tokens=200)
SCHEDULE = f"tpm:{MODEL}"
LIMITS = {MODEL: RateLimit(tpm=60_000)}  # a token a millisecond
BILLED = 30_000
"""The prompt tokens the server bills: the call's schedule 30 s long, its estimate a few
hundred tokens (the prompt's estimate and ``max_tokens``)."""


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    # an answer a second after the request: time to cut the store off meanwhile
    behavior = ModelBehavior(latency=1000.0)
    async with FakeLLMServer({MODEL: behavior}, api_key=KEY) as fake:
        usage = {"prompt_tokens": BILLED, "completion_tokens": 10, "total_tokens": BILLED + 10}
        fake.script(MODEL, [FakeReply(usage=usage)])
        yield fake


async def _schedule_ahead(dsn: str, schema: str) -> float:
    """Seconds the schedule ends ahead of the store's now, read past the proxy."""
    sep = "&" if "?" in dsn else "?"
    async with quota_store_from_url(f"{dsn}{sep}schema={schema}") as store:
        grant = await store.acquire(SCHEDULE, cost=0.0, interval=1.0, burst=0.0, max_wait=1e9)
    return grant.wait


async def test_an_over_count_the_store_refused_lands_once_it_answers_again(
    postgres_dsn: str, postgres_schema: str, proxy: TcpProxy, server: FakeLLMServer
) -> None:
    # the over-count's adjust failed (connection refused) and was dropped: the schedule
    # ended where the estimate left it, and the next calls went past the limit by the
    # 30,000 tokens the store never counted
    url = through(postgres_dsn, proxy, postgres_schema)
    executor = http_executor(server, CHEAP_ONLY, rate_limits=LIMITS, quota_store=url)
    async with executor:
        limiter = executor.limiter
        assert limiter is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.run, "hello", CTX)
            await server.wait_for_requests(1)  # admitted: its place is in the store
            await proxy.refuse()
        assert limiter.store_errors >= 1  # the over-count failed
        await proxy.restore()
        ahead = 0.0
        with anyio.move_on_after(60):
            while (ahead := await _schedule_ahead(postgres_dsn, postgres_schema)) < 10:  # noqa: ASYNC110 - the store's
                await anyio.sleep(0.1)
        assert ahead > 10, ahead  # 30 s of tokens counted, less the time since
        assert limiter.unadjusted == 0


@pytest.mark.slow
async def test_an_over_count_still_refused_when_the_close_ends_is_counted_and_logged(
    postgres_dsn: str,
    postgres_schema: str,
    proxy: TcpProxy,
    server: FakeLLMServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="empathy_models.limits")
    url = through(postgres_dsn, proxy, postgres_schema)
    executor = http_executor(server, CHEAP_ONLY, rate_limits=LIMITS, quota_store=url)
    async with executor, anyio.create_task_group() as tg:
        tg.start_soon(executor.run, "hello", CTX)
        await server.wait_for_requests(1)
        await proxy.refuse()
    limiter = executor.limiter
    assert limiter is not None
    assert limiter.unadjusted == 1
    assert BILLED - 300 < limiter.unadjusted_tokens < BILLED
    lost = [r.getMessage() for r in caplog.records if "beyond its estimate" in r.getMessage()]
    assert len(lost) == 1, lost
    assert f"rate limit {SCHEDULE} failed and the limiter closed first" in lost[0]
    assert f"the {limiter.unadjusted_tokens} tokens" in lost[0]
