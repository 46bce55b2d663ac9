"""
`ChangeFeedContract`: what a `CircuitStateStore` with a `ChangeFeed` owes its breakers.

A store that returns a feed from ``change_feed()`` promises that every write giving a
key a new generation is announced, and that ``synced_at`` is a true sync point (every
change made before it has been announced).  The breaker builds on that promise: a view
confirmed by the feed admits past ``local_view_ttl`` without the store, a change in
another instance is seen as soon as it is announced, and a view fetched before the
subscription broke is never confirmed by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import pytest_asyncio

from ...abc import ChangeFeed, CircuitStateStore
from ...backends import state_store_from_url
from ...breaker import CircuitBreaker
from ...circuit import BreakerPolicy
from ...exceptions import CircuitOpenError
from ...records import CircuitState, Outcome, OutcomeReport, Ticket
from ._base import _fail_override
from ._state import StateStoreFixtures

__all__ = ["ChangeFeedContract", "CutChangeFeed"]

CutChangeFeed = Callable[[CircuitStateStore], Awaitable[None]]
"""``await cut(store)``: end the store's feed subscription from the server's side."""

SYNC_WAIT = 10.0
"""Seconds a test waits for a feed to sync (far more than it takes)."""

_POLICY = BreakerPolicy(
    consecutive_failures=3,
    minimum_calls=1_000,
    recovery_seconds=3_600.0,
    max_recovery_seconds=3_600.0,
    window_seconds=3_600.0,
)


class _Heard:
    """A feed listener that writes down what it is told."""

    def __init__(self) -> None:
        self.generations: list[tuple[str, int]] = []
        self.restarts = 0

    def announced(self, key: str, generation: int) -> None:
        self.generations.append((key, generation))

    def restarted(self) -> None:
        self.restarts += 1


async def _synced_after(feed: ChangeFeed, mark: float) -> None:
    """Wait until ``feed`` has synced at a point after ``mark`` (``time.monotonic()``)."""
    with anyio.fail_after(SYNC_WAIT):
        while feed.synced_at <= mark:  # noqa: ASYNC110  # a feed signals no event
            await anyio.sleep(0.005)


def _feed_of(store: CircuitStateStore) -> ChangeFeed:
    feed = store.change_feed()
    if feed is None:
        pytest.skip(f"{type(store).__name__} announces no changes")
    return feed


def _count(target: object, asked: list[str], *names: str) -> None:
    """Write down each call of ``target``'s methods ``names`` (a store's ``admit``, a
    feed's ``sync``) in ``asked``, then let ``target`` do it."""
    for name in names:
        operation = getattr(target, name)

        async def counted(*args: Any, _name: str = name, _op: Any = operation) -> Any:
            asked.append(_name)
            return await _op(*args)

        setattr(target, name, counted)


@contextlib.asynccontextmanager
async def _breaker_with_a_view(
    store: CircuitStateStore, ttl: float, flush_interval: float = 60.0
) -> AsyncIterator[CircuitBreaker]:
    """
    A breaker on ``store`` once its feed is subscribed (a view fetched before is never
    confirmed), with a view of ``"k"`` from one call; by default its successes wait
    (no store answer refreshes the view meanwhile).
    """
    feed = _feed_of(store)
    async with CircuitBreaker(
        store, _POLICY, local_view_ttl=ttl, flush_interval=flush_interval
    ) as breaker:
        await _synced_after(feed, time.monotonic())
        async with breaker.guard("k"):
            pass
        yield breaker


async def _ticket(store: CircuitStateStore, key: str) -> Ticket:
    admission = await store.admit(key, _POLICY)
    assert admission.admitted and admission.ticket is not None
    return admission.ticket


@pytest.mark.asyncio
class ChangeFeedContract(StateStoreFixtures):
    """
    The contract of a store's `ChangeFeed`.  Override ``state_store_url`` (an empty
    shared store) and ``cut_change_feed``.
    """

    @pytest.fixture
    def cut_change_feed(self) -> CutChangeFeed:
        """Ends a store's subscription from the server; subclasses must override it."""
        _fail_override(type(self), "cut_change_feed")

    @pytest_asyncio.fixture(loop_scope="function")
    async def stores(
        self, state_store_url: str, state_store_options: dict[str, Any]
    ) -> AsyncIterator[tuple[CircuitStateStore, CircuitStateStore]]:
        """Two instances of the store under test (as two processes would hold)."""
        async with (
            state_store_from_url(state_store_url, **state_store_options) as one,
            state_store_from_url(state_store_url, **state_store_options) as other,
        ):
            yield one, other

    async def test_every_new_generation_is_announced_before_the_next_sync(
        self, stores: tuple[CircuitStateStore, CircuitStateStore]
    ) -> None:
        store, other = stores
        feed = _feed_of(store)
        assert store.change_feed() is feed, "one feed per store"
        heard = _Heard()
        feed.listen(heard, 0.2)
        try:
            await _synced_after(feed, time.monotonic())
            assert heard.restarts == 1, "a new subscription starts by saying so"

            async def seen_after(step: Awaitable[object]) -> list[tuple[str, int]]:
                # what the feed has told by a sync point after ``step`` (made by another
                # instance) returned
                before = len(heard.generations)
                await step
                assert await feed.sync(), "a subscribed feed syncs on demand"
                return heard.generations[before:]

            created = await seen_after(_ticket(other, "k"))
            assert created in ([], [("k", 0)]), created
            ticket = await _ticket(other, "k")
            success = OutcomeReport(ticket=ticket, outcome=Outcome.SUCCESS)
            assert await seen_after(other.record("k", _POLICY, [success])) == []
            failure = OutcomeReport(ticket=ticket, outcome=Outcome.FAILURE)
            assert await seen_after(other.record("k", _POLICY, [failure] * 2)) == []
            tripped = await other.record("k", _POLICY, [failure])
            assert tripped.state is CircuitState.OPEN
            assert await feed.sync()
            assert heard.generations[-1] == ("k", tripped.generation)
            forced = await seen_after(other.force("k", CircuitState.FORCED_OPEN))
            assert forced == [("k", tripped.generation + 1)]
            assert await seen_after(other.reset("k")) == [("k", tripped.generation + 2)]
            assert await seen_after(other.reset()) == [("k", tripped.generation + 3)]
            assert heard.restarts == 1
        finally:
            await feed.unlisten(heard)
        assert not feed.listening and feed.synced_at == float("-inf")

    async def test_a_confirmed_view_admits_past_its_ttl_without_a_round_trip(
        self, stores: tuple[CircuitStateStore, CircuitStateStore]
    ) -> None:
        store, _ = stores
        feed = _feed_of(store)
        asked: list[str] = []
        _count(store, asked, "admit", "record")  # a breaker admits through either
        _count(feed, asked, "sync")  # or after a sync point of its own
        async with _breaker_with_a_view(store, 1.0) as breaker:
            assert asked == ["admit"]
            await _synced_after(feed, time.monotonic())
            for _ in range(4):  # 2.4 s: the view's TTL has run out twice
                await anyio.sleep(0.6)
                async with breaker.guard("k"):
                    pass
            assert asked == ["admit"], f"the feed's syncs confirm the view, yet: {asked}"

    async def test_the_exact_mode_admits_at_a_sync_point_without_asking_the_store(
        self, stores: tuple[CircuitStateStore, CircuitStateStore]
    ) -> None:
        store, _ = stores
        asked: list[str] = []
        _count(store, asked, "admit")
        async with _breaker_with_a_view(store, 0.0, flush_interval=0.5) as breaker:
            for _ in range(20):
                async with breaker.guard("k"):
                    pass
            assert asked == ["admit"], f"one admission by the store, then sync points: {asked}"

    async def test_the_exact_mode_sees_every_change_made_before_an_admission(
        self, stores: tuple[CircuitStateStore, CircuitStateStore]
    ) -> None:
        store, other = stores
        async with _breaker_with_a_view(store, 0.0, flush_interval=0.5) as breaker:
            for i in range(10):
                async with breaker.guard("k"):
                    pass
                # no waiting: the next admission itself must see the change
                await other.force("k", CircuitState.FORCED_OPEN, reason=f"round {i}")
                with pytest.raises(CircuitOpenError):
                    async with breaker.guard("k"):
                        pass
                await other.reset("k")

    async def test_a_change_elsewhere_is_seen_as_soon_as_it_is_announced(
        self, stores: tuple[CircuitStateStore, CircuitStateStore]
    ) -> None:
        store, other = stores
        feed = _feed_of(store)
        async with _breaker_with_a_view(store, 600.0, flush_interval=0.5) as breaker:
            await other.force("k", CircuitState.FORCED_OPEN, reason="from elsewhere")
            await _synced_after(feed, time.monotonic())
            with pytest.raises(CircuitOpenError) as info:
                async with breaker.guard("k"):
                    pass
            assert info.value.state is CircuitState.FORCED_OPEN
            await other.reset("k")
            await _synced_after(feed, time.monotonic())
            async with breaker.guard("k"):
                pass

    async def test_an_answer_overtaken_by_an_announcement_is_not_trusted(
        self, stores: tuple[CircuitStateStore, CircuitStateStore]
    ) -> None:
        store, other = stores
        feed = _feed_of(store)
        record = store.record
        overtaken = anyio.Event()

        async def slow_answer(key: str, policy: BreakerPolicy, reports: Any) -> Any:
            # the store answers at once; the answer reaches the breaker only after
            # another instance's change has been announced
            state = await record(key, policy, reports)
            await overtaken.wait()
            return state

        async with _breaker_with_a_view(store, 600.0) as breaker:
            store.record = slow_answer  # type: ignore[method-assign]
            async with anyio.create_task_group() as tg:
                tg.start_soon(breaker.flush)  # sends the success; its answer: CLOSED
                await anyio.sleep(0.2)
                await other.force("k", CircuitState.FORCED_OPEN, reason="meanwhile")
                await _synced_after(feed, time.monotonic())
                overtaken.set()
            with pytest.raises(CircuitOpenError):
                async with breaker.guard("k"):
                    pass

    async def test_a_sync_cancelled_midway_leaves_the_exact_mode_exact(
        self, stores: tuple[CircuitStateStore, CircuitStateStore]
    ) -> None:
        # an admission cancelled while it waits for its sync point (a store may cut
        # the subscription then, as its answer is no longer awaited): what follows
        # still sees every change made before it, and the feed syncs again
        store, other = stores
        feed = _feed_of(store)
        async with _breaker_with_a_view(store, 0.0, flush_interval=0.5) as breaker:
            for round_ in range(3):
                syncing = asyncio.get_running_loop().create_task(feed.sync())
                await asyncio.sleep(0)  # it has sent its request, if it sends one
                syncing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await syncing
                await other.force("k", CircuitState.FORCED_OPEN, reason=f"round {round_}")
                with pytest.raises(CircuitOpenError):
                    async with breaker.guard("k"):
                        pass
                await other.reset("k")
                async with breaker.guard("k"):
                    pass
                await _synced_after(feed, time.monotonic())

    async def test_a_view_from_before_a_broken_subscription_is_not_confirmed(
        self,
        stores: tuple[CircuitStateStore, CircuitStateStore],
        cut_change_feed: CutChangeFeed,
    ) -> None:
        store, other = stores
        feed = _feed_of(store)
        async with _breaker_with_a_view(store, 0.5) as breaker:
            await _synced_after(feed, time.monotonic())
            await cut_change_feed(store)
            # announced while nobody listens: lost to this store's feed
            await other.force("k", CircuitState.FORCED_OPEN, reason="while cut off")
            await anyio.sleep(0.8)  # the view's TTL runs out; the feed subscribes again
            await _synced_after(feed, time.monotonic())
            with pytest.raises(CircuitOpenError):
                async with breaker.guard("k"):
                    pass
