"""
A response cache in PostgreSQL behind a `TcpProxy` partitioned while a run holds a
request's lease and its call goes on: each renewal of the lease is waited for at most
the cache's store timeout, as a read is, and counted as a failed read when it does not
answer (the store skipped for a while), and not sent again while it is out; the lease
is then not renewed, and lapses at its last expiry.  Real HTTP to a `FakeLLMServer`.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from empathy_models import ExecutionContext, _cached as cached
from empathy_models.cache import cache_from_url
from empathy_models.testing import FakeLLMServer, ModelBehavior
from tests._fakes import KEY, http_executor, priced_registry

from ._proxy import TcpProxy
from .conftest import through

REGISTRY = priced_registry([("gpt-a", 1.0)], "lease-faults-1")
CTX = ExecutionContext(workflow="faq", stage="answer", model="gpt-a", temperature=0, cache_ttl=600)
LEASE = 3.0
"""The lease's length here (seconds): renewed every second."""


async def test_a_renewal_to_a_partitioned_store_is_bounded_and_counted(
    postgres_dsn: str,
    postgres_schema: str,
    proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the renewal waited for the store with no bound (asyncpg has no command timeout by
    # default): the stalled store was never counted as failing, and the renewal, out
    # until the partition ended, renewed nothing meanwhile without a word
    monkeypatch.setattr(cached, "LEASE_SECONDS", LEASE)
    behavior = ModelBehavior(content="The answer.", latency=600_000.0)  # ended by the test
    url = through(postgres_dsn, proxy, postgres_schema)
    async with (
        FakeLLMServer({"gpt-a": behavior}, api_key=KEY) as server,
        cache_from_url(url) as cache,
        http_executor(server, REGISTRY, cache=cache) as executor,
    ):
        run = asyncio.create_task(executor.run("q", CTX))
        await server.wait_for_requests(1)  # the lease is taken, the call out
        proxy.partition()
        with anyio.move_on_after(4 * LEASE):
            while not executor.cache_errors:  # noqa: ASYNC110 - by the renewal's task
                await anyio.sleep(0.05)
        errors = executor.cache_errors
        await anyio.sleep(LEASE)  # three more renewals due meanwhile
        again = executor.cache_errors
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await proxy.restore()
    # the renewal due a third of a lease after the take, bounded by the store's timeout
    assert errors == 1
    # and not sent again while it is out (each would stall, holding a connection)
    assert again == 1
