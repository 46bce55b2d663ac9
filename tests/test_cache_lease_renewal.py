"""
A response-cache lease held across processes through a call longer than the lease: the
run that holds it renews it while its call runs, so the copies other workers hold wait
for its answer instead of asking the model once it would have lapsed; the renewal stops
when the call ends (cancelled, closed) and at the run's per-attempt timeout (a call that
hangs does not hold the others up for ever); an answer that comes while a renewal is
out is written before the lease is let go.  Real HTTP against FakeLLMServer; the
cache a SQLite file, a Redis or a PostgreSQL namespace; a lease of a couple of seconds
(`empathy_models._cached.LEASE_SECONDS`, patched).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import attrs
import pytest

from empathy_models import ExecutionContext, Message, RateLimit, RetryPolicy, _cached as cached
from empathy_models.abc import ResponseCache
from empathy_models.cache import SQLiteResponseCache, cache_from_url
from empathy_models.exceptions import NotOpenError
from empathy_models.testing import FakeLLMServer, ModelBehavior

from ._fakes import KEY, http_executor, priced_registry
from ._namespaces import quota_url_of

REGISTRY = priced_registry([("gpt-a", 1.0)], "lease-renewal-1")
CTX = ExecutionContext(workflow="faq", stage="answer", model="gpt-a", temperature=0, cache_ttl=600)
KEY_OF_Q = cached.cache_key_of(CTX, "unknown", [Message(role="user", content="q")], None, {})

LEASE = 4.5
"""The lease's length in these tests (seconds): renewed every third of it."""


@pytest.fixture(params=["sqlite", "redis", "postgresql"])
def shared_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A cache store workers share (a file, or a namespace on a server), leases of `LEASE`."""
    if request.param != "sqlite":
        pytest.importorskip(f"empathy_models_{request.param.replace('postgresql', 'postgres')}")
    monkeypatch.setattr(cached, "LEASE_SECONDS", LEASE)
    with quota_url_of(request.param, tmp_path) as url:
        yield url


class _Takes:
    """
    A cache on ``url`` that notes the holder of each take of a lease (a run's, with the
    entry, or a renewal), and what it found.
    """

    def __init__(self, url: str) -> None:
        self.cache: ResponseCache = cache_from_url(url)
        self.takes: list[tuple[str, str | None]] = []  # (holder, the other holder found)
        self.changed = asyncio.Event()
        take, take_and_get = self.cache.acquire_lease, self.cache.acquire_lease_and_get
        inner = contextvars.ContextVar("inner", default=False)  # a take within one with get

        async def acquire_lease(key: str, holder: str, ttl: float) -> tuple[str, float] | None:
            held = await take(key, holder, ttl)
            if not inner.get():
                self.noted(holder, held)
            return held

        async def acquire_lease_and_get(
            key: str, holder: str, ttl: float
        ) -> tuple[tuple[str, float] | None, bytes | None]:
            token = inner.set(True)
            try:
                held, value = await take_and_get(key, holder, ttl)
            finally:
                inner.reset(token)
            self.noted(holder, held)
            return held, value

        self.cache.acquire_lease = acquire_lease  # type: ignore[method-assign]
        self.cache.acquire_lease_and_get = acquire_lease_and_get  # type: ignore[method-assign]

    def noted(self, holder: str, held: tuple[str, float] | None) -> None:
        self.takes.append((holder, None if held is None else held[0]))
        self.changed.set()

    def granted(self) -> list[str]:
        return [holder for holder, other in self.takes if other is None]

    async def wait(self, enough: Callable[[], object], seconds: float = 30.0) -> None:
        """Until ``enough()`` is true of the takes so far."""
        with anyio.fail_after(seconds):
            while not enough():
                self.changed.clear()
                await self.changed.wait()


async def test_a_call_longer_than_the_lease_keeps_it_and_the_other_workers_wait(
    shared_url: str,
) -> None:
    # the first worker's call takes two leases: it renews its lease while the call runs,
    # and the other worker's copies wait for its answer (before: the lease lapsed after
    # one lease, the other worker took it and asked the model too: two calls)
    behavior = ModelBehavior(content="The answer.", latency=2 * LEASE * 1000)
    async with FakeLLMServer({"gpt-a": behavior}, api_key=KEY) as server:
        one, two = _Takes(shared_url), _Takes(shared_url)
        async with contextlib.AsyncExitStack() as stack:
            first_worker = http_executor(server, REGISTRY, cache=one.cache)
            second_worker = http_executor(server, REGISTRY, cache=two.cache)
            for resource in (one.cache, two.cache, first_worker, second_worker):
                await stack.enter_async_context(resource)
            first = asyncio.create_task(first_worker.run("q", CTX))
            await server.wait_for_requests(1)  # it holds the lease and has asked
            others = [asyncio.create_task(second_worker.run("q", CTX)) for _ in range(3)]
            answers = await asyncio.gather(first, *others)
        assert server.requests() == 1
    assert [a.content for a in answers] == ["The answer."] * 4
    assert [a.cached for a in answers] == [False, True, True, True]
    holder = one.granted()[0]
    assert len(one.granted()) >= 3 and set(one.granted()) == {holder}  # taken, renewed
    # its copies waited (a take after the holder let go, its answer stored, is granted)
    assert two.takes[0][1] == holder


@pytest.mark.parametrize("end", ["cancelled", "closed"])
async def test_the_renewal_stops_when_the_call_ends(shared_url: str, end: str) -> None:
    # the holder's run ends with its call still out (cancelled, or its executor
    # closed) after renewing its lease: the lease is let go, and not renewed again
    behavior = ModelBehavior(content="The answer.", latency=60_000.0)
    async with FakeLLMServer({"gpt-a": behavior}, api_key=KEY) as server:
        one = _Takes(shared_url)
        async with one.cache:
            worker = http_executor(server, REGISTRY, cache=one.cache)
            async with worker:
                run = asyncio.create_task(worker.run("q", CTX))
                await one.wait(lambda: len(one.granted()) >= 2)  # taken, then renewed
                if end == "cancelled":
                    run.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await run
            if end == "closed":
                with pytest.raises(NotOpenError):
                    await run
            # the executor has closed, after the release it left running
            renewals = len(one.takes)
            assert KEY_OF_Q is not None
            async with cache_from_url(shared_url) as store:
                assert await store.acquire_lease(KEY_OF_Q, "next", 60) is None
                assert await store.release_lease(KEY_OF_Q, "next") is True
                await anyio.sleep(LEASE)  # a renewal would have come by now
                assert await store.acquire_lease(KEY_OF_Q, "next", 60) is None
            assert len(one.takes) == renewals


async def test_a_hanging_call_holds_its_lease_no_longer_than_its_timeout(
    shared_url: str,
) -> None:
    # the holder's call hangs, and is retried, past its per-attempt timeout (a lease
    # and a half): the lease is renewed up to that timeout, not for as long as the run
    # goes on, so the other workers' copies take it then and ask alongside
    async with FakeLLMServer({"gpt-a": ModelBehavior(content="late")}, api_key=KEY) as server:
        server.script("gpt-a", ["hang"] * 10)
        retry = RetryPolicy(max_attempts=10, base_delay=0.0, max_delay=0.0, jitter=False)
        hanging = attrs.evolve(CTX, timeout=1.5 * LEASE)  # the same request (key)
        one = _Takes(shared_url)
        async with one.cache, http_executor(server, REGISTRY, cache=one.cache, retry=retry) as w:
            run = asyncio.create_task(w.run("q", hanging))
            await one.wait(lambda: len(one.granted()) >= 2)  # taken, then renewed
            assert KEY_OF_Q is not None
            async with cache_from_url(shared_url) as store:
                with anyio.fail_after(6 * LEASE):
                    for _ in range(100):
                        held = await store.acquire_lease(KEY_OF_Q, "next", 60)
                        if held is None:
                            break
                        await anyio.sleep(held[1])  # until it lapses, unless renewed
                assert held is None
                assert not run.done()  # still retrying: its renewal stopped at its timeout
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run


class _RenewalOut(SQLiteResponseCache):
    """
    A worker's cache whose first renewal of a lease lands once ``renewal_gate`` is set
    and whose writes of an entry once ``write_gate`` is; ``log`` notes the order in
    which the writes and the lets-go of a lease began and ended.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.takes = 0
        self.renewing, self.renewed = asyncio.Event(), asyncio.Event()
        self.renewal_gate, self.write_gate = asyncio.Event(), asyncio.Event()
        self.log: list[str] = []

    async def acquire_lease_and_get(
        self, key: str, holder: str, ttl: float
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        self.takes += 1  # the run's take
        return await super().acquire_lease_and_get(key, holder, ttl)

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> tuple[str, float] | None:
        self.takes += 1  # a renewal
        if self.takes == 2:
            self.renewing.set()
            await self.renewal_gate.wait()
        try:
            return await super().acquire_lease(key, holder, ttl)
        finally:
            if self.takes >= 2:
                self.renewed.set()

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.log.append("write")
        await self.write_gate.wait()
        await super().set(key, value, ttl)
        self.log.append("written")

    async def set_and_release(self, key: str, value: bytes, ttl: float, holder: str) -> None:
        self.log.append("write and let go")
        await self.write_gate.wait()
        await super().set_and_release(key, value, ttl, holder)
        self.log.append("written, let go")

    async def release_lease(self, key: str, holder: str) -> bool:
        self.log.append("let go")
        return await super().release_lease(key, holder)


async def test_an_answer_that_comes_while_a_renewal_is_out_is_written_before_the_lease_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the holder's answer comes while a renewal of its lease is out: the lease is let go
    # once both the renewal has landed and the entry is written, so the other worker's
    # copies, which take it then, read the answer (before: the lease was let go as soon
    # as the renewal landed, the entry's write still under way, and the copies, finding
    # no entry, asked the model too)
    monkeypatch.setattr(cached, "LEASE_SECONDS", LEASE)
    behavior = ModelBehavior(content="The answer.", latency=LEASE / 2 * 1000)  # past a renewal
    path = tmp_path / "cache.db"
    async with FakeLLMServer({"gpt-a": behavior}, api_key=KEY) as server:
        two = _Takes(f"sqlite:///{path}")
        async with contextlib.AsyncExitStack() as stack:
            one = await stack.enter_async_context(_RenewalOut(path))
            await stack.enter_async_context(two.cache)
            first_worker = await stack.enter_async_context(
                http_executor(server, REGISTRY, cache=one)
            )
            second_worker = await stack.enter_async_context(
                http_executor(server, REGISTRY, cache=two.cache)
            )
            first = asyncio.create_task(first_worker.run("q", CTX))
            await server.wait_for_requests(1)
            others = [asyncio.create_task(second_worker.run("q", CTX)) for _ in range(3)]
            await one.renewing.wait()
            answer = await first  # its write behind, and its lease, are left to land
            one.renewal_gate.set()
            await one.renewed.wait()
            # the entry's write lands once a waiting copy's take found the lease let go
            # (as it was, before), or two of them found it still held
            waited = len(two.takes)
            await two.wait(lambda: two.granted() or len(two.takes) >= waited + 2)
            one.write_gate.set()
            answers = await asyncio.gather(*others)
        assert server.requests() == 1
    assert not answer.cached
    assert [a.content for a in answers] == ["The answer."] * 3
    assert all(a.cached for a in answers)
    assert one.log == ["write", "written", "let go"]


async def test_a_run_waiting_for_its_rate_limit_keeps_its_lease_through_its_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the holder waits for its rate-limit place (6 s: a call a minute at rpm=10 was
    # just made) before its call of 3 s, within its per-attempt timeout of 4 s.  The
    # renewal stopped at the timeout counted from the take, made before the wait: the
    # lease lapsed while the call was still out, and the other worker's copies took it
    # and asked the model too (a third request).  Their waiting cost them nothing: they
    # would have waited for the same rate limit.
    monkeypatch.setattr(cached, "LEASE_SECONDS", 3.0)
    url = f"sqlite:///{tmp_path}/cache.db"
    behavior = ModelBehavior(content="The answer.", latency=3000.0)
    limits = {"gpt-a": RateLimit(rpm=10)}
    timed = attrs.evolve(CTX, timeout=4.0)
    async with FakeLLMServer({"gpt-a": behavior}, api_key=KEY) as server:
        one, two = _Takes(url), _Takes(url)
        async with contextlib.AsyncExitStack() as stack:
            first_worker = http_executor(server, REGISTRY, cache=one.cache, rate_limits=limits)
            second_worker = http_executor(server, REGISTRY, cache=two.cache)
            for resource in (one.cache, two.cache, first_worker, second_worker):
                await stack.enter_async_context(resource)
            await first_worker.run("another question", timed)  # the rate limit's place
            first = asyncio.create_task(first_worker.run("q", timed))
            await one.wait(lambda: len(one.granted()) >= 2)  # taken, renewed while waiting
            await server.wait_for_requests(2)  # its call is out
            others = [asyncio.create_task(second_worker.run("q", timed)) for _ in range(2)]
            answers = await asyncio.gather(first, *others)
        assert server.requests() == 2
    assert [a.cached for a in answers] == [False, True, True]
