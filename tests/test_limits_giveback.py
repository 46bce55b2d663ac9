"""
A rate-limit place given back by a call that never went out (cancelled while waiting
for its turn, refused after admission): never a burst past the limit.

Time here is virtual: the quota store's clock and the executor's sleep are one
`FakeClock` that moves only when every call is asleep, to the next place a call waits
for, so the times at which the `FakeLLMServer` saw each request are exact.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from empathy_models import (
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMResponse,
    RateLimit,
    RetryPolicy,
)
from empathy_models.abc import QuotaStore
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.limits import MemoryQuotaStore, SQLiteQuotaStore
from empathy_models.providers import OpenAIProvider
from empathy_models.testing import FakeClock, FakeLLMServer, FakeProvider, ModelBehavior

KEY = "test-key-0123"
MODEL = "gpt-4o-mini"


class VirtualTime:
    """A sleep that ends when the test moves the shared clock to its end."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self._order = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.clock() + seconds, next(self._order), waiter))
        await waiter

    def asleep(self) -> int:
        return sum(not w.done() for _, _, w in self._sleepers)

    def wake_next(self) -> None:
        """Move the clock to the earliest sleep's end and end every sleep due then."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        if not self._sleepers:
            return
        at = self._sleepers[0][0]
        self.clock.set(max(at, self.clock()))
        while self._sleepers and self._sleepers[0][0] <= at:
            waiter = heapq.heappop(self._sleepers)[2]
            if not waiter.done():
                waiter.set_result(None)


class Calls:
    """Runs through one executor, and the virtual time each request reached the server."""

    def __init__(self, server: FakeLLMServer, executor: EmpathyLLMExecutor, vt: VirtualTime):
        self.server, self.executor, self.vt = server, executor, vt
        self.tasks: list[asyncio.Task[object]] = []
        self.starts: list[float] = []

    def start(self) -> asyncio.Task[object]:
        ctx = ExecutionContext(model=MODEL, max_tokens=8)
        task = asyncio.create_task(self.executor.run("hi", ctx))
        self.tasks.append(task)
        return task

    async def idle(self) -> None:
        """Wait (in real time) until every call is done or asleep; note new requests."""
        async with asyncio.timeout(30):
            while sum(not t.done() for t in self.tasks) != self.vt.asleep():  # noqa: ASYNC110
                await asyncio.sleep(0.002)
        seen = self.server.requests(MODEL)
        self.starts += [self.vt.clock()] * (seen - len(self.starts))

    async def finish(self) -> None:
        await self.idle()
        while not all(t.done() for t in self.tasks):
            self.vt.wake_next()
            await self.idle()
        await asyncio.gather(*self.tasks, return_exceptions=True)


StoreFactory = Callable[[VirtualTime, Path], QuotaStore]
STORES: dict[str, StoreFactory] = {
    "memory": lambda vt, _path: MemoryQuotaStore(clock=vt.clock),
    "sqlite": lambda vt, path: SQLiteQuotaStore(path / "quota.db", clock=vt.clock),
}


@pytest.fixture(params=sorted(STORES))
async def calls(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Calls]:
    vt = VirtualTime()
    store = STORES[request.param](vt, tmp_path)
    async with (
        FakeLLMServer(api_key=KEY) as server,
        store,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
            telemetry_store=MemoryTelemetryBackend(),
            rate_limits={"openai": RateLimit(rpm=600)},  # one call per 100 ms, burst 1
            quota_store=store,
            retry=RetryPolicy.none(),
            sleep=vt.sleep,
            clock=vt.clock,
            wall_clock=vt.clock,
        ) as executor,
    ):
        yield Calls(server, executor, vt)


def _gaps(starts: list[float]) -> list[float]:
    ordered = sorted(starts)
    return [round(b - a, 6) for a, b in itertools.pairwise(ordered)]


async def test_a_call_cancelled_while_waiting_lets_no_later_call_share_a_place(
    calls: Calls,
) -> None:
    for _ in range(6):
        calls.start()
    await calls.idle()  # the first went out; five wait for places 0.1 s apart
    calls.tasks[3].cancel()
    await calls.idle()
    calls.start()  # a newcomer after the cancellation
    await calls.finish()
    assert len(calls.starts) == 6
    # 100 ms between any two requests the server saw (the cancelled place is kept:
    # the newcomer comes after the last one queued, not at the same instant)
    assert min(_gaps(calls.starts)) >= 0.1, _gaps(calls.starts)


async def test_a_cancelled_last_place_is_given_back(calls: Calls) -> None:
    for _ in range(3):
        calls.start()
    await calls.idle()
    calls.tasks[2].cancel()  # the last place handed out: nothing after it
    await calls.idle()
    calls.start()
    await calls.finish()
    # the newcomer takes the cancelled call's place: no capacity is lost
    assert [round(s - calls.starts[0], 6) for s in calls.starts] == [0.0, 0.1, 0.2]


async def test_cancellations_under_load_never_exceed_the_limit_in_any_window(
    calls: Calls,
) -> None:
    rng = random.Random(7)
    for _round in range(12):
        for _ in range(4):
            calls.start()
        await calls.idle()
        waiting = [t for t in calls.tasks if not t.done()]
        for task in rng.sample(waiting, k=len(waiting) * 3 // 10):
            task.cancel()
        await calls.idle()
        for _ in range(2):  # let the schedule move on a little between rounds
            calls.vt.wake_next()
            await calls.idle()
    await calls.finish()
    assert len(calls.starts) > 20
    assert min(_gaps(calls.starts)) >= 0.1, _gaps(calls.starts)


@pytest.mark.parametrize("kind", sorted(STORES))
async def test_tokens_calls_did_not_use_let_the_calls_queued_behind_them_go(
    kind: str, tmp_path: Path
) -> None:
    # 2,000 tokens a minute; each call counts its prompt and max_tokens=500 (some 505
    # tokens) and uses a few: counted as reserved, 16 calls take three minutes;
    # counted as used, they fit in the first minute's tokens
    vt = VirtualTime()
    async with (
        FakeLLMServer(api_key=KEY) as server,
        STORES[kind](vt, tmp_path) as store,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
            telemetry_store=MemoryTelemetryBackend(),
            rate_limits={"openai": RateLimit(tpm=2000)},
            quota_store=store,
            retry=RetryPolicy.none(),
            sleep=vt.sleep,
            clock=vt.clock,
            wall_clock=vt.clock,
            rate_limit_wait=600.0,
        ) as executor,
    ):
        calls = Calls(server, executor, vt)
        ctx = ExecutionContext(model=MODEL, max_tokens=500)
        calls.tasks = [asyncio.create_task(executor.run("hi", ctx)) for _ in range(16)]
        await calls.finish()
        results = [task.result() for task in calls.tasks]
    answers = [r for r in results if isinstance(r, LLMResponse)]
    assert len(answers) == 16
    assert sum(r.input_tokens + r.output_tokens for r in answers) < 2000
    assert len(calls.starts) == 16
    # as each answer gives back what it did not use, the calls queued behind it move
    # up: the whole queue goes out within seconds, not in the third minute
    assert max(calls.starts) - min(calls.starts) < 10.0, calls.starts


@pytest.mark.parametrize("kind", sorted(STORES))
async def test_a_give_back_moves_up_only_this_workers_calls_queued_behind_it(
    kind: str, tmp_path: Path
) -> None:
    vt = VirtualTime()

    def executor(server: FakeLLMServer, store: QuotaStore) -> EmpathyLLMExecutor:
        return EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
            telemetry_store=MemoryTelemetryBackend(),
            rate_limits={"openai": RateLimit(rpm=600)},  # a place every 100 ms
            quota_store=store,
            retry=RetryPolicy.none(),
            sleep=vt.sleep,
            clock=vt.clock,
            wall_clock=vt.clock,
        )

    # two workers sharing one store (as two processes share a SQLite file)
    async with (
        FakeLLMServer(api_key=KEY) as server,
        STORES[kind](vt, tmp_path) as store,
        executor(server, store) as one,
        executor(server, store) as other,
    ):
        calls = Calls(server, one, vt)
        for _ in range(3):
            calls.start()  # places at 0, 0.1 and 0.2
        await calls.idle()
        calls.executor = other
        calls.start()  # the other worker's place at 0.3
        await calls.idle()
        calls.executor = one
        calls.start()  # 0.4
        await calls.idle()
        calls.tasks[1].cancel()  # its place at 0.1 is given back
        await calls.idle()
        calls.start()  # a newcomer: after the last place taken
        await calls.finish()
    offsets = sorted(round(start - calls.starts[0], 6) for start in calls.starts)
    # the third call moved up to the place given back; the other worker's call and
    # the one queued after it kept theirs, and the newcomer came after them
    assert offsets == [0.0, 0.1, 0.3, 0.4, 0.5], offsets


async def test_one_long_call_in_flight_keeps_no_place_of_the_calls_settled_after_it() -> None:
    # a ten-minute stream in flight while a thousand fast calls come and go: the places
    # the limiter keeps (to move up the calls queued behind a give-back) stay those of
    # the calls waiting or in flight, not one per call since the long one began
    released = asyncio.Event()

    async def sleep(_seconds: float) -> None:  # only the long call has a latency
        await released.wait()

    provider = FakeProvider(name="openai", sleep=sleep)
    provider.set_behavior("gpt-4.1-mini", ModelBehavior(latency=600_000))
    fast = ExecutionContext(model="gpt-4.1-nano", max_tokens=16)
    async with EmpathyLLMExecutor(
        [provider],
        telemetry_store=MemoryTelemetryBackend(),
        rate_limits={"openai": RateLimit(rpm=10_000_000, tpm=10_000_000_000)},
    ) as executor:
        limiter = executor.limiter
        assert limiter is not None

        def kept() -> dict[str, int]:
            return {key: len(places.places) for key, places in limiter._places.items()}

        long = asyncio.create_task(
            executor.run("hi", ExecutionContext(model="gpt-4.1-mini", max_tokens=16))
        )
        async with asyncio.timeout(30):
            while not provider.requests("gpt-4.1-mini"):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        for _ in range(1000):
            await executor.run("hi", fast)
        assert sorted(kept()) == ["rpm:openai", "tpm:openai"]
        assert max(kept().values()) <= 20, kept()
        released.set()  # the long call answers and gives back what it did not use
        assert isinstance(await long, LLMResponse)
        for _ in range(50):
            await executor.run("hi", fast)
        assert max(kept().values()) <= 20, kept()
