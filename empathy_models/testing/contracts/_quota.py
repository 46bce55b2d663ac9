"""
`QuotaStoreContract`: the behaviour every `QuotaStore` owes (budgets and rate limits).

Exported from `empathy_models.testing.contracts`; subclass it in a test module and
override the ``quota_store_url`` fixture (an empty store per test)::

    class TestMyQuotaStore(QuotaStoreContract):
        @pytest.fixture
        def quota_store_url(self, tmp_path):
            return f"mydb:///{tmp_path}/quota.db"

Rate-limit tests read the store's own clock, so they tolerate the time that passes
between operations (a few milliseconds) but never sleep.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import pytest_asyncio

from ...abc import QuotaStore
from ...exceptions import BackendClosedError, BackendError
from ...limits.guard import quota_store_from_url
from ...limits.values import BudgetUsage
from ._clock_step import QuotaClockSteps

__all__ = ["QuotaStoreContract"]

WS, WE = 1_800_000_000.0, 1_800_086_400.0  # one day-long window
DOLLAR = 1_000_000_000


def _balanced(u: BudgetUsage) -> None:
    assert u.reserved == u.settled + u.released + u.lapsed + u.held, u
    assert u.spent == u.settled + u.overrun, u


@pytest.mark.asyncio
class QuotaStoreContract(QuotaClockSteps):
    """
    The contract of `QuotaStore`.  Override the ``quota_store_url`` fixture.

    Covers: reservations granted up to the limit and refused past it (and counted);
    settlement that releases and charges exactly; holds that lapse at their time (a
    killed worker's) and late settlements of them; a settlement sent again naming its
    hold applied once, a first one of a hold the window forgot charged (a store with
    ``hold_ids``); windows and keys kept apart; a
    window written with a later end (a budget made longer) ending then; 200
    concurrent reservations granting exactly what fits; usages, reset and limit
    overrides; keys of any length (over 3 KB); GCRA schedules (burst, refusal past
    ``max_wait`` without booking, concurrent places all distinct, capacity given back,
    a push back to a reset time that concurrent workers apply once and that no place
    precedes, however large the burst); a shared store showing one instance's quotas
    to another; idempotent close and use after close.
    """

    @pytest.fixture
    def quota_store_url(self) -> str:
        """The URL of an empty store; subclasses must override this fixture."""
        raise pytest.fail(f"{type(self).__name__} must override the 'quota_store_url' fixture")

    @pytest.fixture
    def quota_store_options(self) -> dict[str, Any]:
        """Keyword options passed to `quota_store_from_url`; none by default."""
        return {}

    @pytest_asyncio.fixture(loop_scope="function")
    async def quota_store(
        self, quota_store_url: str, quota_store_options: dict[str, Any]
    ) -> AsyncIterator[QuotaStore]:
        store = quota_store_from_url(quota_store_url, **quota_store_options)
        async with store:
            yield store

    # -- budgets -------------------------------------------------------------------------

    async def test_reservations_fit_under_the_limit_and_are_refused_past_it(
        self, quota_store: QuotaStore
    ) -> None:
        empty = await quota_store.usage("b", window_start=WS, window_end=WE)
        assert (empty.spent, empty.held, empty.reserved, empty.calls) == (0, 0, 0, 0)
        grants = [
            await quota_store.reserve(
                "b", window_start=WS, window_end=WE, amount=3 * DOLLAR // 10, limit=DOLLAR
            )
            for _ in range(4)
        ]
        assert [g.granted for g in grants] == [True, True, True, False]
        last = grants[-1].usage
        # ``calls`` counts calls charged (settled at a cost), not reservations
        assert (last.held, last.reserved, last.calls, last.refused, last.limit) == (
            9 * DOLLAR // 10,
            9 * DOLLAR // 10,
            0,
            1,
            DOLLAR,
        )
        assert last.remaining_usd == pytest.approx(0.1)
        assert (last.window_start, last.window_end) == (WS, WE)
        _balanced(last)
        assert await quota_store.usage("b", window_start=WS, window_end=WE) == last

    async def test_settle_charges_the_actual_cost_and_releases_the_rest(
        self, quota_store: QuotaStore
    ) -> None:
        for _ in range(3):
            await quota_store.reserve("b", window_start=WS, window_end=WE, amount=100, limit=1000)
        u = await quota_store.settle("b", window_start=WS, window_end=WE, held=100, actual=40)
        assert (u.spent, u.held, u.settled, u.released, u.overrun) == (40, 200, 40, 60, 0)
        u = await quota_store.settle("b", window_start=WS, window_end=WE, held=100, actual=130)
        assert (u.spent, u.held, u.settled, u.released, u.overrun) == (170, 100, 140, 60, 30)
        u = await quota_store.settle("b", window_start=WS, window_end=WE, held=100, actual=0)
        assert (u.spent, u.held, u.settled, u.released, u.overrun) == (170, 0, 140, 160, 30)
        _balanced(u)
        assert u.calls == 2  # the calls charged: the one settled at 0 cost nothing
        # what was spent counts against the limit: 170 + 831 > 1000
        refused = await quota_store.reserve(
            "b", window_start=WS, window_end=WE, amount=831, limit=1000
        )
        assert not refused.granted
        assert (
            await quota_store.reserve("b", window_start=WS, window_end=WE, amount=830, limit=1000)
        ).granted

    async def test_a_hold_lapses_at_its_time_and_is_settled_late_for_nothing(
        self, quota_store: QuotaStore
    ) -> None:
        # the store's clock is the host's (or its server's, on this host): a hold that
        # lapsed ten minutes ago (a killed worker's) and one lapsing in an hour
        now = time.time()
        past, future = now - 600.0, now + 3600.0
        kw: dict[str, Any] = {"window_start": WS, "window_end": WE}
        assert (
            await quota_store.reserve("b", **kw, amount=300, limit=1000, lapses_at=past)
        ).granted
        grant = await quota_store.reserve("b", **kw, amount=200, limit=1000, lapses_at=future)
        assert grant.granted
        assert (grant.usage.held, grant.usage.lapsed) == (200, 300)
        u = await quota_store.usage("b", **kw)
        assert (u.held, u.lapsed, u.reserved, u.calls) == (200, 300, 500, 0)
        assert u.held_until == math.ceil(future / 60) * 60
        _balanced(u)
        assert [x.held for x in await quota_store.usages()] == [200]
        # what lapsed no longer counts against the limit
        assert (
            await quota_store.reserve("b", **kw, amount=800, limit=1000, lapses_at=future)
        ).granted
        # the lapsed hold's late settlement charges the cost and releases nothing
        u = await quota_store.settle("b", **kw, held=300, actual=100, lapses_at=past)
        assert (u.spent, u.held, u.settled, u.released, u.overrun, u.lapsed) == (
            100,
            1000,
            0,
            0,
            100,
            300,
        )
        u = await quota_store.settle("b", **kw, held=200, actual=50, lapses_at=future)
        assert (u.spent, u.held, u.settled, u.released) == (150, 800, 50, 150)
        _balanced(u)
        # without a time, a hold lapses when its window ends
        grant = await quota_store.reserve("c", **kw, amount=5, limit=10)
        assert grant.usage.held_until == WE
        u = await quota_store.settle("c", **kw, held=5, actual=5)
        assert (u.held, u.spent, u.held_until) == (0, 5, None)

    async def test_a_settlement_sent_again_naming_its_hold_applies_once(
        self, quota_store: QuotaStore
    ) -> None:
        if not quota_store.hold_ids:
            pytest.skip("the store takes no hold ids (QuotaStore.hold_ids)")
        now = time.time()
        past, future = now - 600.0, now + 3600.0
        kw: dict[str, Any] = {"window_start": WS, "window_end": WE}
        for hold_id, amount in (("one", 300), ("two", 200)):  # the same bucket
            grant = await quota_store.reserve(
                "b", **kw, amount=amount, limit=1000, lapses_at=future, hold_id=hold_id
            )
            assert grant.granted
        one: dict[str, Any] = {"held": 300, "actual": 100, "lapses_at": future, "hold_id": "one"}
        u = await quota_store.settle("b", **kw, **one)
        assert (u.spent, u.held, u.calls) == (100, 200, 1)
        # sent again (its answer lost on the way): nothing changes, the other hold stays
        again = await quota_store.settle("b", **kw, **one, resent=True)
        assert (again.spent, again.held, again.settled, again.released, again.calls) == (
            100,
            200,
            100,
            200,
            1,
        )
        # sent again before it had landed: it lands
        two: dict[str, Any] = {"held": 200, "actual": 50, "lapses_at": future, "hold_id": "two"}
        u = await quota_store.settle("b", **kw, **two, resent=True)
        assert (u.spent, u.held, u.calls) == (150, 0, 2)
        # a named hold that lapsed unsettled: its late settlement charges the call, once
        grant = await quota_store.reserve(
            "b", **kw, amount=300, limit=1000, lapses_at=past, hold_id="three"
        )
        assert grant.granted
        three: dict[str, Any] = {"held": 300, "actual": 80, "lapses_at": past, "hold_id": "three"}
        for resent in (False, True):
            u = await quota_store.settle("b", **kw, **three, resent=resent)
            assert (u.spent, u.overrun, u.held, u.calls) == (230, 80, 0, 3)
        _balanced(u)
        assert await quota_store.usage("b", **kw) == u

    async def test_a_first_settlement_of_a_hold_the_window_forgot_is_charged(
        self, quota_store: QuotaStore
    ) -> None:
        # a window reset while the call was in flight: its settlement charges the call,
        # as one without a hold id does; sent again, it changes nothing
        if not quota_store.hold_ids:
            pytest.skip("the store takes no hold ids (QuotaStore.hold_ids)")
        kw: dict[str, Any] = {"window_start": WS, "window_end": WE}
        named: dict[str, Any] = {"lapses_at": time.time() + 3600.0, "hold_id": "one"}
        assert (await quota_store.reserve("b", **kw, amount=300, limit=1000, **named)).granted
        assert await quota_store.reset_budget("b") == 1
        u = await quota_store.settle("b", **kw, held=300, actual=120, **named)
        assert (u.spent, u.overrun, u.held, u.calls) == (120, 120, 0, 1)
        u = await quota_store.settle("b", **kw, held=300, actual=120, **named, resent=True)
        assert (u.spent, u.calls) == (120, 1)
        _balanced(u)

    async def test_windows_and_keys_are_kept_apart(self, quota_store: QuotaStore) -> None:
        await quota_store.reserve("a", window_start=WS, window_end=WE, amount=10, limit=10)
        assert not (
            await quota_store.reserve("a", window_start=WS, window_end=WE, amount=1, limit=10)
        ).granted
        assert (
            await quota_store.reserve(
                "a", window_start=WE, window_end=WE + 86400, amount=10, limit=10
            )
        ).granted
        assert (
            await quota_store.reserve("a/b", window_start=WS, window_end=WE, amount=10, limit=10)
        ).granted
        keys = [(u.key, u.window_start) for u in await quota_store.usages()]
        assert keys == [("a", WS), ("a", WE), ("a/b", WS)]

    async def test_a_window_start_given_as_an_int_is_the_same_window(
        self, quota_store: QuotaStore
    ) -> None:
        # the memory, SQLite and Redis stores named a window by its start's repr:
        # 1800000000 and 1800000000.0 were two windows, each granting the whole limit
        whole: dict[str, Any] = {"window_start": int(WS), "window_end": int(WE)}
        assert (await quota_store.reserve("a", **whole, amount=6, limit=10)).granted
        assert not (
            await quota_store.reserve("a", window_start=WS, window_end=WE, amount=6, limit=10)
        ).granted
        assert (await quota_store.usage("a", window_start=WS, window_end=WE)).held == 6
        assert [(u.key, u.window_start) for u in await quota_store.usages()] == [("a", WS)]
        assert await quota_store.reset_budget("a") == 1

    async def test_a_window_written_with_a_later_end_ends_then(
        self, quota_store: QuotaStore
    ) -> None:
        # a budget name whose window was made longer (daily, then monthly) writes the
        # window a shorter one started at the same time: it ends, and is kept, as the
        # longer one, whichever writes it after
        month = WS + 31 * 86400
        await quota_store.reserve("a", window_start=WS, window_end=WE, amount=1, limit=10)
        grant = await quota_store.reserve(
            "a", window_start=WS, window_end=month, amount=2, limit=10
        )
        assert grant.granted and grant.usage.window_end == month, grant.usage
        u = await quota_store.settle("a", window_start=WS, window_end=WE, held=1, actual=1)
        assert (u.window_end, u.spent, u.held) == (month, 1, 2), u
        u = await quota_store.usage("a", window_start=WS, window_end=WE)
        assert (u.window_end, u.spent, u.held) == (month, 1, 2), u
        assert [(u.key, u.window_end) for u in await quota_store.usages()] == [("a", month)]

    async def test_concurrent_reservations_grant_exactly_what_fits(
        self, quota_store: QuotaStore
    ) -> None:
        granted: list[bool] = []

        async def one() -> None:
            grant = await quota_store.reserve(
                "b", window_start=WS, window_end=WE, amount=7, limit=700
            )
            granted.append(grant.granted)
            if grant.granted:
                await quota_store.settle("b", window_start=WS, window_end=WE, held=7, actual=7)

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
        assert granted.count(True) == 100
        u = await quota_store.usage("b", window_start=WS, window_end=WE)
        assert (u.spent, u.held, u.reserved, u.settled, u.calls, u.refused) == (
            700,
            0,
            700,
            700,
            100,
            100,
        )

    async def test_reset_and_limit_overrides(self, quota_store: QuotaStore) -> None:
        await quota_store.reserve("a", window_start=WS, window_end=WE, amount=5, limit=10)
        await quota_store.reserve("a", window_start=WE, window_end=WE + 1, amount=5, limit=10)
        await quota_store.reserve("ab", window_start=WS, window_end=WE, amount=5, limit=10)
        await quota_store.reserve("a@x.org", window_start=WS, window_end=WE, amount=5, limit=10)
        assert await quota_store.reset_budget("a") == 2
        assert [u.key for u in await quota_store.usages()] == ["a@x.org", "ab"]
        assert (await quota_store.usage("a", window_start=WS, window_end=WE)).held == 0
        assert await quota_store.limit_overrides() == {}
        await quota_store.set_limit("a", 123)
        await quota_store.set_limit("c", 0)
        assert await quota_store.limit_overrides() == {"a": 123, "c": 0}
        await quota_store.set_limit("a", None)
        assert await quota_store.limit_overrides() == {"c": 0}

    async def test_a_key_of_any_length_is_kept(self, quota_store: QuotaStore) -> None:
        # a key holds the names of a budget's scope (a workflow, a user), of any length:
        # over 3 KB here (past what one btree index entry holds), random (not shortened
        # by compression), and two keys that differ in their last character only
        rng = random.Random(3)
        name = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(1_200))
        a, b = f"workflow={name}/a", f"workflow={name}/b"
        assert len(a.encode()) > 3_000
        kw: dict[str, Any] = {"window_start": WS, "window_end": WE}
        assert (await quota_store.reserve(a, **kw, amount=6, limit=10)).granted
        assert not (await quota_store.reserve(a, **kw, amount=6, limit=10)).granted
        assert (await quota_store.reserve(b, **kw, amount=6, limit=10)).granted
        u = await quota_store.settle(a, **kw, held=6, actual=4)
        assert (u.key, u.spent, u.held, u.refused) == (a, 4, 0, 1)
        assert await quota_store.usage(a, **kw) == u
        stored = [(x.key, x.spent, x.held) for x in await quota_store.usages()]
        assert stored == [(a, 4, 0), (b, 0, 6)]
        await quota_store.set_limit(a, 5)
        assert await quota_store.limit_overrides() == {a: 5}
        assert await quota_store.reset_budget(a) == 1
        assert [x.key for x in await quota_store.usages()] == [b]
        await quota_store.set_limit(a, None)
        assert await quota_store.limit_overrides() == {}
        args = {"cost": 1.0, "interval": 10.0, "burst": 1.0, "max_wait": 0.0}
        assert (await quota_store.acquire(a, **args)).granted
        assert not (await quota_store.acquire(a, **args)).granted
        assert (await quota_store.acquire(b, **args)).granted

    # -- rate limits -----------------------------------------------------------------------

    async def test_a_schedule_grants_the_burst_then_refuses_past_max_wait(
        self, quota_store: QuotaStore
    ) -> None:
        args = {"cost": 1.0, "interval": 10.0, "burst": 3.0, "max_wait": 0.0}
        first = [await quota_store.acquire("r", **args) for _ in range(3)]
        assert [(g.granted, g.wait) for g in first] == [(True, 0.0)] * 3
        refused = await quota_store.acquire("r", **args)
        assert not refused.granted and 9.0 < refused.wait <= 10.0
        # a refusal books nothing: the same answer again, and waiting is allowed
        again = await quota_store.acquire("r", **args)
        assert not again.granted and again.wait == pytest.approx(refused.wait, abs=1.0)
        booked = await quota_store.acquire("r", **{**args, "max_wait": 60.0})
        assert booked.granted and 9.0 < booked.wait <= 10.0
        later = await quota_store.acquire("r", **{**args, "max_wait": 60.0})
        assert later.granted and 19.0 < later.wait <= 20.0
        other = await quota_store.acquire("other", **args)
        assert other.granted and other.wait == 0.0

    async def test_concurrent_places_are_all_distinct(self, quota_store: QuotaStore) -> None:
        waits: list[float] = []

        async def one() -> None:
            grant = await quota_store.acquire(
                "r", cost=1.0, interval=10.0, burst=1.0, max_wait=10_000.0
            )
            assert grant.granted
            waits.append(grant.wait)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
        # one place every 10 s: the waits, sorted, step by 10 s (less the time passing)
        ordered = sorted(waits)
        assert ordered[0] == 0.0
        steps = [b - a for a, b in itertools.pairwise(ordered)]
        assert all(9.0 < s <= 10.0 + 1e-6 for s in steps), steps

    async def test_adjust_gives_capacity_back_and_takes_it(self, quota_store: QuotaStore) -> None:
        args = {"cost": 5.0, "interval": 10.0, "burst": 5.0, "max_wait": 0.0}
        assert (await quota_store.acquire("t", **args)).granted
        assert not (await quota_store.acquire("t", **{**args, "cost": 1.0})).granted
        await quota_store.adjust("t", delta=-30.0)  # 3 units were not used
        assert (await quota_store.acquire("t", **{**args, "cost": 3.0})).granted
        assert not (await quota_store.acquire("t", **{**args, "cost": 1.0})).granted
        await quota_store.adjust("fresh", delta=-5.0)  # nothing to give back: no effect
        assert (await quota_store.acquire("fresh", **args)).granted
        await quota_store.adjust("taken", delta=50.0)  # a call used more than it said
        assert not (await quota_store.acquire("taken", **{**args, "cost": 1.0})).granted

    async def test_a_place_is_given_back_only_while_no_later_one_was_taken(
        self, quota_store: QuotaStore
    ) -> None:
        args = {"cost": 1.0, "interval": 10.0, "burst": 1.0, "max_wait": 100.0}
        first = await quota_store.acquire("p", **args)
        second = await quota_store.acquire("p", **args)
        assert first.place is not None and second.place is not None
        assert second.place == pytest.approx(first.place + 10.0)
        # the first place is no longer the last: giving it back would let the next
        # call share the second's instant, so the schedule stays where it is
        await quota_store.adjust("p", delta=-10.0, place=first.place)
        third = await quota_store.acquire("p", **args)
        assert third.place == pytest.approx(second.place + 10.0)
        # the last place given back: the next call takes it
        await quota_store.adjust("p", delta=-10.0, place=third.place)
        fourth = await quota_store.acquire("p", **args)
        assert fourth.place == pytest.approx(third.place)
        await quota_store.adjust("empty", delta=-10.0, place=first.place)  # no schedule
        assert (await quota_store.acquire("empty", **args)).wait == 0.0

    async def test_push_back_holds_the_schedule_until_a_reset_however_often_told(
        self, quota_store: QuotaStore
    ) -> None:
        args = {"cost": 1.0, "interval": 10.0, "burst": 1.0, "max_wait": 0.0}
        await quota_store.push_back("new", seconds=20.0)  # no schedule yet
        refused = await quota_store.acquire("new", **args)
        assert not refused.granted and 19.0 < refused.wait <= 20.0
        # a schedule ending 10 s ahead moves to the reset 20 s ahead, not 20 s on
        assert (await quota_store.acquire("r", **args)).granted
        await quota_store.push_back("r", seconds=20.0)
        # every worker reporting the same reset, at once: the schedule moves once
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(lambda: quota_store.push_back("r", seconds=20.0))
        refused = await quota_store.acquire("r", **args)
        assert not refused.granted and 19.0 < refused.wait <= 20.0
        # a schedule booked past the reset stays where it is
        assert (await quota_store.acquire("far", **{**args, "interval": 50.0})).granted
        await quota_store.push_back("far", seconds=20.0)
        refused = await quota_store.acquire("far", **{**args, "interval": 50.0})
        assert not refused.granted and 49.0 < refused.wait <= 50.0

    async def test_after_a_push_back_not_even_the_burst_comes_before_the_reset(
        self, quota_store: QuotaStore
    ) -> None:
        if type(quota_store).push_back is QuotaStore.push_back:
            pytest.skip("QuotaStore's default push_back moves the schedule's end only")
        args = {"cost": 1.0, "interval": 10.0, "burst": 4.0, "max_wait": 100.0}
        # a fresh schedule (its whole burst free) pushed back to a reset 20 s ahead
        await quota_store.push_back("fresh", seconds=20.0)
        refused = await quota_store.acquire("fresh", **{**args, "max_wait": 0.0})
        assert not refused.granted and 19.0 < refused.wait <= 20.0
        waits = [(await quota_store.acquire("fresh", **args)).wait for _ in range(5)]
        # the burst goes at the reset, not before it; then one place per interval
        assert all(19.0 < w <= 20.0 for w in waits[:4]), waits
        assert 29.0 < waits[4] <= 30.0, waits
        # a schedule booked past the reset, whose burst would let a place in before it
        for _ in range(3):
            assert (await quota_store.acquire("booked", **args)).wait == 0.0
        await quota_store.push_back("booked", seconds=20.0)
        grant = await quota_store.acquire("booked", **args)
        assert grant.granted and 19.0 < grant.wait <= 20.0, grant
        # a place given back (the last one) keeps the reset
        assert grant.place is not None
        await quota_store.adjust("booked", delta=-10.0, place=grant.place)
        again = await quota_store.acquire("booked", **args)
        assert again.granted and 19.0 < again.wait <= 20.0, again

    # -- sharing and lifecycle -------------------------------------------------------------

    async def test_a_shared_store_shows_one_instance_to_another(
        self,
        quota_store: QuotaStore,
        quota_store_url: str,
        quota_store_options: dict[str, Any],
    ) -> None:
        if not quota_store.shared:
            pytest.skip(f"{type(quota_store).__name__} is not shared between instances")
        async with quota_store_from_url(quota_store_url, **quota_store_options) as other:
            await quota_store.reserve("b", window_start=WS, window_end=WE, amount=6, limit=10)
            assert not (
                await other.reserve("b", window_start=WS, window_end=WE, amount=6, limit=10)
            ).granted
            await other.set_limit("b", 20)
            assert await quota_store.limit_overrides() == {"b": 20}
            assert (
                await quota_store.acquire("r", cost=1.0, interval=10.0, burst=1.0, max_wait=0.0)
            ).granted
            assert not (
                await other.acquire("r", cost=1.0, interval=10.0, burst=1.0, max_wait=0.0)
            ).granted

    async def test_aclose_is_idempotent_and_use_after_close_raises(
        self, quota_store: QuotaStore
    ) -> None:
        await quota_store.reserve("b", window_start=WS, window_end=WE, amount=1, limit=10)
        await quota_store.aclose()
        await quota_store.aclose()
        assert quota_store.closed
        with pytest.raises(BackendClosedError) as info:
            await quota_store.reserve("b", window_start=WS, window_end=WE, amount=1, limit=10)
        assert isinstance(info.value, BackendError)
        with pytest.raises(BackendClosedError):
            await quota_store.acquire("r", cost=1.0, interval=1.0, burst=1.0, max_wait=0.0)
