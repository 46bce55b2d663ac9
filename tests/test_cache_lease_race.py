"""
Two workers (executors with caches of their own on one shared store) and one new
request, interleaved at the store: worker 1's read of the entry misses; worker 2 then
takes the request's lease, asks the model, stores its answer and lets the lease go; then
worker 1 takes the lease, granted.  Worker 1 is answered from the entry stored meanwhile,
which the take reads with the lease, instead of asking the model again.  Real HTTP
against FakeLLMServer; the store a SQLite file, a Redis or a PostgreSQL namespace, or a
third-party cache that implements only `ResponseCache`'s lease primitives (the default
take re-reads the entry).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest

from empathy_models import ExecutionContext, Message, _cached as cached
from empathy_models.abc import ResponseCache
from empathy_models.cache import cache_from_url
from empathy_models.testing import FakeLLMServer, ModelBehavior

from ._fakes import KEY, http_executor, priced_registry
from ._namespaces import quota_url_of

REGISTRY = priced_registry([("gpt-a", 1.0)], "lease-race-1")
CTX = ExecutionContext(workflow="faq", stage="answer", model="gpt-a", temperature=0, cache_ttl=600)
KEY_OF_Q = cached.cache_key_of(CTX, "unknown", [Message(role="user", content="q")], None, {})


class ThirdPartyCache(ResponseCache):
    """A cache of another package's: the abstract methods and the two lease primitives."""

    shared = True
    leases = True

    def __init__(self, url: str) -> None:
        self.inner = cache_from_url(url)

    async def _aopen(self) -> None:
        await self.inner.__aenter__()

    async def _aclose(self) -> None:
        await self.inner.aclose()

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.inner.set(key, value, ttl)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def clear(self) -> int:
        return await self.inner.clear()

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> tuple[str, float] | None:
        return await self.inner.acquire_lease(key, holder, ttl)

    async def release_lease(self, key: str, holder: str) -> bool:
        return await self.inner.release_lease(key, holder)


@pytest.fixture(params=["sqlite", "redis", "postgresql", "third-party"])
def store_of(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, type[ResponseCache] | None]]:
    """A store the workers share (its URL), and the cache class each opens on it."""
    kind = request.param
    if kind in ("redis", "postgresql"):
        pytest.importorskip(f"empathy_models_{kind.replace('postgresql', 'postgres')}")
    with quota_url_of("sqlite" if kind == "third-party" else kind, tmp_path) as url:
        yield url, ThirdPartyCache if kind == "third-party" else None


def _cache(store_of: tuple[str, type[ResponseCache] | None]) -> ResponseCache:
    url, cls = store_of
    return cache_from_url(url) if cls is None else cls(url)  # type: ignore[call-arg]


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer({"gpt-a": ModelBehavior(content="The answer.")}, api_key=KEY) as fake:
        yield fake


async def test_a_take_granted_after_another_worker_stored_the_answer_reads_it(
    server: FakeLLMServer,
    store_of: tuple[str, type[ResponseCache] | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (before: worker 1, granted the lease on its first take, asked the model without
    # reading the entry again: two calls, and its answer not from the cache)
    monkeypatch.setattr(cached, "STORE_TIMEOUT", 60.0)  # the gate holds worker 1's read up
    one = _cache(store_of)
    read = one.get
    reads = 0

    async def get(key: str) -> bytes | None:
        # worker 1's first read: a miss, then worker 2's whole run before it returns
        nonlocal reads
        reads += 1
        value = await read(key)
        if reads == 1:
            assert value is None
            async with (
                _cache(store_of) as other,
                http_executor(server, REGISTRY, cache=other) as two,
            ):
                first = await two.run("q", CTX)
            # its close waited for its entry's write and the lease's release
            assert not first.cached and server.requests() == 1
        return value

    one.get = get  # type: ignore[method-assign]
    async with one:
        async with http_executor(server, REGISTRY, cache=one) as worker:
            answer = await worker.run("q", CTX)
            assert worker.cache_errors == 0
        # the lease it took with the entry was let go (its close waited for that)
        assert KEY_OF_Q is not None
        assert await one.acquire_lease(KEY_OF_Q, "next", 60) is None
    assert reads >= 1
    assert answer.cached and answer.content == "The answer."
    assert server.requests() == 1


async def test_an_entry_too_old_for_the_run_leaves_it_the_lease_it_took(
    server: FakeLLMServer, store_of: tuple[str, type[ResponseCache] | None]
) -> None:
    # the take reads an entry older than the run's own cache_ttl: the run, holding the
    # lease all the same, asks the model, stores the new answer and lets go
    async with _cache(store_of) as store:
        async with http_executor(server, REGISTRY, cache=store) as maker:
            await maker.run("q", CTX)
        assert KEY_OF_Q is not None
        stored = await store.get(KEY_OF_Q)
        later = time.time() + 120.0
        async with http_executor(server, REGISTRY, cache=store, wall_clock=lambda: later) as late:
            answer = await late.run("q", attrs.evolve(CTX, cache_ttl=60))
        assert await store.acquire_lease(KEY_OF_Q, "next", 60) is None  # let go
        assert await store.get(KEY_OF_Q) not in (None, stored)  # the new answer
    assert not answer.cached and server.requests() == 2
