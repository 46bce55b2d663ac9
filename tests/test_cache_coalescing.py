"""
Identical requests in flight at the same time in one executor: the first that misses the
cache asks a model, the others wait for it and are answered from the cache, each
recorded as a hit; what the first leaves out of the cache (a failure, an answer the
cache does not keep, a cancellation) sends the others to a model themselves.  Real HTTP
against FakeLLMServer; memory and SQLite caches (the latter written behind), and a Redis
cache whose server is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import attrs
import pytest

from empathy_models import EmpathyLLMExecutor, ExecutionContext, Message, Outcome
from empathy_models._cached import STORE_TIMEOUT, cache_key_of
from empathy_models.abc import ResponseCache
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.cache import MemoryResponseCache, SQLiteResponseCache, cache_from_url
from empathy_models.exceptions import AllRoutesFailedError, InvalidRequestError
from empathy_models.testing import FakeLLMServer, FakeReply, ModelBehavior

from ._fakes import KEY, http_executor, priced_registry
from ._namespaces import quota_url_of
from ._workers import Child
from ._workers.cache_worker import MODEL

WORKER = Path(__file__).parent / "_workers" / "cache_worker.py"

REGISTRY = priced_registry([("gpt-a", 1.0)], "coalescing-1")
CTX = ExecutionContext(workflow="faq", stage="answer", model="gpt-a", temperature=0, cache_ttl=600)
COPIES = 20


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    # slow enough that every copy starts before the first answer comes
    behavior = ModelBehavior(content="The answer.", latency=300.0)
    async with FakeLLMServer({"gpt-a": behavior}, api_key=KEY) as fake:
        yield fake


@pytest.mark.parametrize("cache", ["memory", "sqlite"])
async def test_a_burst_of_one_new_request_makes_one_call(
    server: FakeLLMServer, tmp_path: Path, cache: str
) -> None:
    url = "memory://" if cache == "memory" else f"sqlite:///{tmp_path / 'cache.db'}"
    telemetry = MemoryTelemetryBackend()
    # the answer comes 2 s after the request: every copy has read the cache by then,
    # however slowly a busy machine's reads come back (one after the other, for SQLite)
    server.set_behavior("gpt-a", ModelBehavior(content="The answer.", latency=2000.0))
    async with http_executor(server, REGISTRY, cache=url, telemetry_store=telemetry) as executor:
        answers = await asyncio.gather(*(executor.run("What is GCRA?", CTX) for _ in range(COPIES)))
        server.set_behavior("gpt-a", ModelBehavior(content="The answer."))
        other = await executor.run("What is a token bucket?", CTX)
    assert server.requests() == 2  # one for the burst, one for the other question
    assert {a.content for a in answers} == {"The answer."}
    assert sorted(a.cached for a in answers) == [False] + [True] * (COPIES - 1)
    assert not other.cached
    records = await telemetry.recent(limit=100)
    outcomes = sorted(r.outcome.value for r in records)
    assert outcomes.count(Outcome.CACHE_HIT.value) == COPIES - 1
    assert outcomes.count(Outcome.SUCCESS.value) == 2
    # a hit waited for the answer: its latency counts the wait
    assert min(a.latency_ms for a in answers if a.cached) >= 250.0


async def test_a_failed_first_call_sends_the_others_to_the_model(server: FakeLLMServer) -> None:
    # the first copy's call fails (a 400: no retry, no fallback); the copies that waited
    # for it ask the model themselves, side by side, and are answered
    server.script("gpt-a", [400])
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        results = await asyncio.gather(
            *(executor.run("What is GCRA?", CTX) for _ in range(5)), return_exceptions=True
        )
    failed = [r for r in results if isinstance(r, BaseException)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert len(failed) == 1 and len(answered) == 4
    assert isinstance(failed[0], InvalidRequestError)
    assert not any(a.cached for a in answered)
    assert server.requests() == 5  # the failed one, then each of the four


async def test_an_answer_the_cache_does_not_keep_is_not_shared(server: FakeLLMServer) -> None:
    server.script("gpt-a", [FakeReply(content="The ans", stop_reason="content_filter")])
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        answers = await asyncio.gather(*(executor.run("What is GCRA?", CTX) for _ in range(4)))
    assert [a.stop_reason for a in answers].count("content_filter") == 1
    assert not any(a.cached for a in answers)
    assert server.requests() == 4


def _missing(cache: MemoryResponseCache, misses: int) -> asyncio.Event:
    """
    The event ``cache`` sets once its reads have missed ``misses`` times: a run that
    misses goes on, in the same step, to wait for the run asking the model already.
    """
    missed = asyncio.Event()
    count = 0
    get = cache.get

    async def counted(key: str) -> bytes | None:
        nonlocal count
        value = await get(key)
        count += value is None
        if count >= misses:
            missed.set()
        return value

    cache.get = counted  # type: ignore[method-assign]
    return missed


async def test_a_cancelled_first_run_leaves_the_others_to_the_model(server: FakeLLMServer) -> None:
    cache = MemoryResponseCache()
    others_wait = _missing(cache, 4)
    async with http_executor(server, REGISTRY, cache=cache) as executor:
        first = asyncio.create_task(executor.run("What is GCRA?", CTX))
        with anyio.fail_after(10):
            await server.wait_for_requests(1)  # it leads, and has asked
        others = [asyncio.create_task(executor.run("What is GCRA?", CTX)) for _ in range(3)]
        with anyio.fail_after(10):
            await others_wait.wait()  # they missed, and wait for the first
        first.cancel()
        answers = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError):
            await first
    assert [a.content for a in answers] == ["The answer."] * 3
    assert server.requests() == 4


async def test_a_run_with_an_earlier_deadline_does_not_wait_for_a_later_one(
    server: FakeLLMServer,
) -> None:
    # the first copy may take 60 s; a copy that must end within 5 s asks the model itself,
    # while one with a later deadline (or none) waits for the first
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        first = asyncio.create_task(executor.run("q", attrs.evolve(CTX, deadline=60.0)))
        with anyio.fail_after(10):
            await server.wait_for_requests(1)  # it leads, and has asked
        hasty, patient, unbounded = await asyncio.gather(
            executor.run("q", attrs.evolve(CTX, deadline=5.0)),
            executor.run("q", attrs.evolve(CTX, deadline=120.0)),
            executor.run("q", CTX),
        )
        await first
    assert not hasty.cached and patient.cached and unbounded.cached
    assert server.requests() == 2


async def test_a_burst_makes_one_call_while_the_cache_store_is_down(
    server: FakeLLMServer,
) -> None:
    # nothing listens where the Redis cache is: every read fails, the store is skipped
    # and nothing is written; the copies are answered with the first one's answer all the
    # same (before, each made a call of its own once it had waited for the first)
    pytest.importorskip("empathy_models_redis")
    async with http_executor(server, REGISTRY, cache="redis://127.0.0.1:1/0") as executor:
        answers = await asyncio.gather(*(executor.run("What is GCRA?", CTX) for _ in range(5)))
        assert executor.cache_errors >= 1
    assert server.requests() == 1
    assert sorted(a.cached for a in answers) == [False] + [True] * 4
    assert {a.content for a in answers} == {"The answer."}


# --------------------------------------------------------------------------- streams


async def test_a_stream_does_not_wait_for_an_identical_run_in_flight(
    server: FakeLLMServer,
) -> None:
    # its first delta is what a stream is for: it asks a model alongside the run
    # instead of waiting for the run's whole answer
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        first = asyncio.create_task(executor.run("What is GCRA?", CTX))
        async with asyncio.timeout(10):
            await server.wait_for_requests(1)  # the run is in flight, its answer 300 ms off
        async with executor.stream("What is GCRA?", CTX) as stream:
            text = "".join([delta async for delta in stream])
            response = await stream.get_final_response()
        answer = await first
    assert text == answer.content == "The answer."
    assert not response.cached and not answer.cached
    assert server.requests() == 2


async def test_a_run_does_not_wait_for_an_identical_stream_its_reader_holds_open(
    server: FakeLLMServer,
) -> None:
    # a stream ends when its caller has read it: a run waiting for it would wait on that
    # caller's pace, so it asks a model itself; the stream, read later, stores its answer
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        async with executor.stream("What is GCRA?", CTX) as stream:
            answer = await executor.run("What is GCRA?", CTX)  # the stream is left unread
            assert "".join([delta async for delta in stream]) == "The answer."
        again = await executor.run("What is GCRA?", CTX)
    assert not answer.cached and again.cached
    assert server.requests() == 2


# --------------------------------------------------------------------------- across workers


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A cache store several workers share: a SQLite file, or a namespace on Redis."""
    if request.param == "redis":
        pytest.importorskip("empathy_models_redis")
    with quota_url_of(request.param, tmp_path) as url:
        yield url


def _workers(server: FakeLLMServer, url: str, count: int) -> list[EmpathyLLMExecutor]:
    """``count`` executors, each with a cache of its own on the store ``url`` names."""
    return [http_executor(server, REGISTRY, cache=url) for _ in range(count)]


async def test_a_burst_across_workers_sharing_a_store_makes_one_call(
    server: FakeLLMServer, shared_url: str
) -> None:
    # three workers (executors with caches of their own on one store), each with copies
    # of the same new request: the first to miss takes the store's lease and asks the
    # model; the others wait for its entry (before: one call per worker)
    async with contextlib.AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(w) for w in _workers(server, shared_url, 3)]
        answers = await asyncio.gather(
            *(w.run("What is GCRA?", CTX) for w in workers for _ in range(4))
        )
    assert server.requests() == 1
    assert {a.content for a in answers} == {"The answer."}
    assert sorted(a.cached for a in answers) == [False] + [True] * 11


async def test_a_worker_opting_out_asks_the_model_alongside(
    server: FakeLLMServer, shared_url: str
) -> None:
    unleased = attrs.evolve(CTX, cache_coalesce=False)
    async with contextlib.AsyncExitStack() as stack:
        one, two = [await stack.enter_async_context(w) for w in _workers(server, shared_url, 2)]
        first, second = await asyncio.gather(
            one.run("What is GCRA?", unleased), two.run("What is GCRA?", unleased)
        )
    assert server.requests() == 2
    assert not first.cached and not second.cached


def _watched(url: str) -> tuple[ResponseCache, asyncio.Event]:
    """A cache on ``url``, and the event it sets when a run's take finds a lease held."""
    store = cache_from_url(url)
    found_held = asyncio.Event()
    take = store.acquire_lease_and_get

    async def acquire_lease_and_get(
        key: str, holder: str, ttl: float
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        held, value = await take(key, holder, ttl)
        if held is not None:
            found_held.set()
        return held, value

    store.acquire_lease_and_get = acquire_lease_and_get  # type: ignore[method-assign]
    return store, found_held


@pytest.mark.parametrize("end", ["failed", "cancelled"])
async def test_a_lease_holder_that_ends_without_an_answer_sends_the_others_to_the_model(
    server: FakeLLMServer, shared_url: str, end: str
) -> None:
    # the holder's call fails (it hangs past its timeout) or its run is cancelled: it
    # lets go of the lease, and the other worker, whose copies waited, asks the model
    # (once for its copies)
    first_ctx = CTX
    if end == "failed":
        server.script("gpt-a", ["hang"])
        # the same request (key); 3 s: the others find the lease held before its call
        # fails, however busy the machine
        first_ctx = attrs.evolve(CTX, timeout=3.0)
    store, found_held = _watched(shared_url)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(store)
        one = await stack.enter_async_context(_workers(server, shared_url, 1)[0])
        two = await stack.enter_async_context(http_executor(server, REGISTRY, cache=store))
        first = asyncio.create_task(one.run("What is GCRA?", first_ctx))
        await server.wait_for_requests(1)  # it holds the lease and has asked
        others = [asyncio.create_task(two.run("What is GCRA?", CTX)) for _ in range(3)]
        with anyio.fail_after(10):
            await found_held.wait()  # they wait for the lease
        assert server.requests() == 1
        if end == "cancelled":
            first.cancel()
        answers = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError if end == "cancelled" else AllRoutesFailedError):
            await first
    assert [a.content for a in answers] == ["The answer."] * 3
    assert sorted(a.cached for a in answers) == [False, True, True]
    assert server.requests() == 2


async def test_a_crashed_holders_lease_is_waited_for_until_it_expires(
    server: FakeLLMServer, shared_url: str
) -> None:
    # a worker that died holding the lease never lets go: the others wait for it to
    # expire, then ask the model; a run whose deadline comes before the lease's expiry
    # does not wait (as for a run of its own process that may outlast it)
    hasty_ctx = attrs.evolve(CTX, deadline=5.0)
    key, hasty_key = (
        cache_key_of(ctx, "unknown", [Message(role="user", content=text)], None, {})
        for ctx, text in ((CTX, "q"), (hasty_ctx, "r"))
    )
    assert key is not None and hasty_key is not None
    async with cache_from_url(shared_url) as store:
        assert await store.acquire_lease(key, "crashed", 0.3) is None
        assert await store.acquire_lease(hasty_key, "slow", 60) is None
        async with http_executor(server, REGISTRY, cache=shared_url) as executor:
            answer = await executor.run("q", CTX)
            hasty = await executor.run("r", hasty_ctx)
        # the waiting run took the expired lease, and let go of it once it stored
        assert await store.get(key) is not None and await store.get(hasty_key) is not None
        assert await store.acquire_lease(key, "next", 60) is None
        assert (await store.acquire_lease(hasty_key, "next", 60) or ("",))[0] == "slow"
    assert not answer.cached and not hasty.cached
    assert server.requests() == 2


@pytest.mark.multiprocess
async def test_a_burst_across_os_processes_makes_one_call(shared_url: str) -> None:
    # three OS processes, four copies each, of one new request, sent together
    behavior = ModelBehavior(content="The answer.", latency=300.0)
    async with FakeLLMServer({MODEL: behavior}, api_key=KEY) as server:
        config = {"cache": shared_url, "base_url": server.openai_base_url, "copies": 4}
        workers = [Child(WORKER, json.dumps(config)) for _ in range(3)]
        try:
            for w in workers:
                assert await anyio.to_thread.run_sync(w.read) == {"ready": True}
            for w in workers:
                w.send("go")
            results = [await anyio.to_thread.run_sync(w.read, 60.0) for w in workers]
            for w in workers:
                await anyio.to_thread.run_sync(w.finish)
        finally:
            for w in workers:
                w.close()
        assert server.requests() == 1
    assert sorted(c for r in results for c in r["cached"]) == [False] + [True] * 11


class _StoredMeanwhile(SQLiteResponseCache):
    """
    A worker's cache on a file where another worker (``other``) holds a request's
    lease: that worker stores its answer (``value``) and lets go of the lease just
    before this one's second take of it (its first found the lease held).
    """

    def __init__(self, path: Path, other: SQLiteResponseCache, value: bytes) -> None:
        super().__init__(path)
        self.other = other
        self.value = value
        self.takes = 0

    async def acquire_lease_and_get(
        self, key: str, holder: str, ttl: float
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        self.takes += 1
        if self.takes == 2:
            await self.other.set_and_release(key, self.value, 600, "other")
        return await super().acquire_lease_and_get(key, holder, ttl)


async def test_a_waiting_run_that_takes_the_lease_its_holder_let_go_with_an_answer_reads_it(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    # the holder stored its answer and let go between the waiting run's takes: the
    # run, granted the lease, is answered from the entry its take read (before: it
    # asked the model too)
    key = cache_key_of(CTX, "unknown", [Message(role="user", content="q")], None, {})
    assert key is not None
    made = f"sqlite:///{tmp_path / 'made.db'}"
    async with http_executor(server, REGISTRY, cache=made) as maker:
        await maker.run("q", CTX)  # the entry the other worker stores, made by a run
    async with cache_from_url(made) as store:
        value = await store.get(key)
    assert value is not None
    server.reset_counters()
    path = tmp_path / "cache.db"
    async with SQLiteResponseCache(path) as other:
        assert await other.acquire_lease(key, "other", 60) is None
        async with (
            _StoredMeanwhile(path, other, value) as cache,
            http_executor(server, REGISTRY, cache=cache) as executor,
        ):
            answer = await executor.run("q", CTX)
        assert await other.acquire_lease(key, "next", 60) is None  # let go
    assert cache.takes == 2
    assert answer.cached and answer.content == "The answer."
    assert server.requests() == 0


class _HeldTake(SQLiteResponseCache):
    """A worker's cache whose takes of a lease reach the file once ``gate`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.taking = asyncio.Event()
        self.gate = asyncio.Event()

    async def acquire_lease_and_get(
        self, key: str, holder: str, ttl: float
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        self.taking.set()
        await self.gate.wait()
        return await super().acquire_lease_and_get(key, holder, ttl)


async def test_a_run_cancelled_while_taking_the_lease_lets_go_of_it_once_taken(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    # the run is cancelled with its take of the lease still out, which lands later: it
    # lets go of the lease once the take has landed (before: its release came first,
    # found nothing, and the lease it took was held until it expired, 30 s in which
    # other workers' copies of the request waited for an answer that never came)
    key = cache_key_of(CTX, "unknown", [Message(role="user", content="q")], None, {})
    assert key is not None
    path = tmp_path / "cache.db"
    async with (
        _HeldTake(path) as cache,
        http_executor(server, REGISTRY, cache=cache) as executor,
    ):
        run = asyncio.create_task(executor.run("q", CTX))
        await cache.taking.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        cache.gate.set()
    # the executor has closed, after the store operations it left running
    async with SQLiteResponseCache(path) as store:
        assert await store.acquire_lease(key, "next", 60) is None
    assert server.requests() == 0


class _SlowWrite(SQLiteResponseCache):
    """A worker's cache whose writes of an entry take longer than a write behind waits."""

    async def set_and_release(self, key: str, value: bytes, ttl: float, holder: str) -> None:
        await asyncio.sleep(STORE_TIMEOUT * 1.5)
        await super().set_and_release(key, value, ttl, holder)


async def test_a_close_waits_for_an_entry_write_that_outlasted_its_wait(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    # the answer's write (and the lease's release with it) takes longer than the write
    # behind waits for it, so it goes on on its own: the executor's close waits for it
    # too (before: the close waited for the write behind alone, which had stopped
    # waiting, and a cache the executor owns was closed under the write: no entry, and
    # the lease held for 30 s, in which other workers' copies of the request waited)
    server.set_behavior("gpt-a", ModelBehavior(content="The answer."))
    key = cache_key_of(CTX, "unknown", [Message(role="user", content="q")], None, {})
    assert key is not None
    path = tmp_path / "cache.db"
    async with _SlowWrite(path) as cache:
        async with http_executor(server, REGISTRY, cache=cache) as executor:
            await executor.run("q", CTX)
        assert await cache.get(key) is not None
        assert await cache.acquire_lease(key, "next", 60) is None
