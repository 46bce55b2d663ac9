"""
The breaker's in-process path on a `MemoryStateStore`, through the public API.

On that exact class an admission reads the stored state (a view admits while the store
holds its very state object) and a success is added to the stored state at once (a
per-key tail folded into it before any other operation), whatever ``local_view_ttl``.
These tests pin that it changes nothing a caller can see but timing: a reference breaker
runs the same calls on a subclass of the store (which takes the general path:
admissions and batches through the store's own operations), flushed after each of its
calls (so its successes reach the store when ours do), and every state the store shows
must be the same; many keys behave like one; breakers sharing one store see each
other's changes at once; a closed store or breaker refuses as before.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from empathy_models import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
)
from empathy_models.backends import MemoryStateStore
from empathy_models.exceptions import BackendClosedError, ServerError
from empathy_models.records import CircuitBreakerState
from empathy_models.testing.clock import FakeClock

KEY = "anthropic:claude"
POLICY = BreakerPolicy(
    consecutive_failures=3,
    minimum_calls=6,
    failure_rate_threshold=0.5,
    window_seconds=30.0,
    window_buckets=3,
    recovery_seconds=5.0,
)


class GeneralPathStore(MemoryStateStore):
    """The same store as a subclass: the breaker takes its general path on it."""


def _shown(state: CircuitBreakerState) -> tuple[Any, ...]:
    """Everything a state shows but its key and its random probe lease ids."""
    return (
        state.state,
        state.generation,
        state.consecutive_failures,
        state.window,
        state.open_count,
        state.opened_at_ts,
        state.open_until_ts,
        state.closed_at_ts,
        state.last_failure_ts,
        tuple(expires for _, expires in state.leases),
        state.probe_successes,
        state.last_error,
        state.reason,
        state.updated_at_ts,
    )


async def _call(breaker: CircuitBreaker, key: str, fail: bool) -> str:
    """One guarded call; what happened to it."""
    try:
        async with breaker.guard(key):
            if fail:
                raise ServerError("boom", status=503)
    except CircuitOpenError:
        return "rejected"
    except ServerError:
        return "failed"
    return "ok"


async def _flushed_call(breaker: CircuitBreaker, key: str, fail: bool) -> str:
    """`_call` on the reference breaker, its written-behind success flushed at once (the
    in-process path adds a success to the store when the call ends)."""
    fate = await _call(breaker, key, fail)
    await breaker.flush()
    return fate


def _pair(clock: FakeClock, **kwargs: Any) -> tuple[CircuitBreaker, MemoryStateStore, Any]:
    store = MemoryStateStore(clock=clock)
    reference = GeneralPathStore(clock=clock)
    ours = CircuitBreaker(store, POLICY, clock=clock, **kwargs)
    theirs = CircuitBreaker(reference, POLICY, clock=clock, **kwargs)
    return ours, store, (theirs, reference)


def test_the_in_process_path_is_taken_only_on_the_memory_store_itself() -> None:
    clock = FakeClock()
    assert MemoryStateStore(clock=clock).in_process
    assert not GeneralPathStore(clock=clock).in_process


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("ttl", [1.0, 0.0])
async def test_random_calls_leave_the_same_states_as_the_general_path(
    seed: int, ttl: float
) -> None:
    """Successes, failures, clock steps (across window buckets and views, and
    backwards), status reads, resets and forced states: every state the store shows,
    and every call's fate, as on the general path with each batch flushed at once."""
    rng = random.Random(seed)
    clock = FakeClock()
    ours, store, (theirs, reference) = _pair(clock, local_view_ttl=ttl, flush_interval=0.5)
    keys = [KEY, "openai:gpt", "openai:o3"]
    async with ours, theirs:
        for step in range(1500):
            key = rng.choice(keys)
            roll = rng.random()
            if roll < 0.6:
                fail = rng.random() < 0.15
                fate = await _flushed_call(theirs, key, fail)
                assert await _call(ours, key, fail) == fate, step
            elif roll < 0.85:
                clock.advance(rng.choice([0.05, 0.3, 0.6, 1.2, 4.0, 11.0]))
            elif roll < 0.88:
                clock.set(clock() - rng.choice([0.2, 12.0]))  # a clock stepped back
            elif roll < 0.95:
                mine, other = await ours.get_status(key), await theirs.get_status(key)
                assert _shown(mine) == _shown(other), step
            elif roll < 0.97:
                await ours.reset(key)
                await theirs.reset(key)
            elif roll < 0.985:
                await ours.force_open(key)
                await theirs.force_open(key)
            else:
                await ours.disable(key)
                await theirs.disable(key)
            if step % 50 == 0:
                # the stores themselves, read without the breakers (no flush first)
                mine_all = [_shown(s) for s in await store.snapshot_all()]
                other_all = [_shown(s) for s in await reference.snapshot_all()]
                assert mine_all == other_all, step
    assert [_shown(s) for s in await store.snapshot_all()] == [
        _shown(s) for s in await reference.snapshot_all()
    ]


async def test_twenty_thousand_keys_behave_like_one() -> None:
    """Every key used round-robin, each a second and a half apart (a view on the general
    path would have expired): each counts, trips at the threshold, rejects, probes and
    closes like a lone key on the general path."""
    clock = FakeClock()
    many = [f"provider:model-{i}" for i in range(20_000)]
    ours, store, (theirs, _) = _pair(clock)
    async with ours, theirs:
        for _ in range(3):  # successes
            for key in many:
                async with ours.guard(key):
                    pass
            async with theirs.guard(KEY):
                pass
            await theirs.flush()  # ours are in the store at once
            clock.advance(1.5)  # every view expired (on the general path)
        sample = many[::1_999]
        expected = _shown(await theirs.get_status(KEY))
        for key in sample:
            assert _shown(await ours.get_status(key)) == expected
        assert len(await store.snapshot_all()) == len(many)
        for _ in range(3):  # failures on every sampled key: each trips on the third
            outcomes = {await _call(ours, key, True) for key in sample}
            assert outcomes == {await _call(theirs, KEY, True)} == {"failed"}
        expected = _shown(await theirs.get_status(KEY))
        assert expected[0] is CircuitState.OPEN
        for key in sample:
            assert _shown(await ours.get_status(key)) == expected
            assert await _call(ours, key, False) == "rejected"
        untouched = many[1]
        assert (await ours.get_status(untouched)).state is CircuitState.CLOSED
        clock.advance(POLICY.recovery_seconds)
        for key in sample:  # the half-open probe succeeds and closes
            assert await _call(ours, key, False) == "ok"
        assert await _call(theirs, KEY, False) == "ok"
        expected = _shown(await theirs.get_status(KEY))
        assert expected[0] is CircuitState.CLOSED and expected[1] == 3
        for key in sample:
            assert _shown(await ours.get_status(key)) == expected


async def test_two_breakers_sharing_one_memory_store_see_each_others_state() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    a = CircuitBreaker(store, POLICY, clock=clock)
    b = CircuitBreaker(store, POLICY, clock=clock)
    async with a, b:
        assert await _call(b, KEY, False) == "ok"  # b's view: CLOSED
        assert await _call(a, KEY, False) == "ok"
        assert (await store.snapshot(KEY)).window_calls == 2  # each success at once
        for _ in range(3):
            assert await _call(a, KEY, True) == "failed"
        assert (await store.snapshot(KEY)).state is CircuitState.OPEN
        # no staleness bound on the memory store: b's view is no longer the stored
        # state, so b reads the store and is rejected at once
        assert await _call(b, KEY, False) == "rejected"
        await a.reset(KEY)
        assert await _call(b, KEY, False) == "ok"
        assert await _call(a, KEY, False) == "ok"
        clock.advance(1.1)
        assert await _call(a, KEY, False) == "ok"
        assert await _call(b, KEY, False) == "ok"
        assert (await store.snapshot(KEY)).window_calls == 4
        await a.flush()  # nothing is waiting
        await b.flush()
        assert (await store.snapshot(KEY)).window_calls == 4
        # a's successes in the store count before b's failures (they were added first)
        for _ in range(2):
            assert await _call(b, KEY, True) == "failed"
        status = await a.get_status(KEY)
        assert status.window_calls == 6 and status.failure_count == 2
        assert status.state is CircuitState.CLOSED


async def test_a_change_by_another_breaker_is_seen_even_if_undone() -> None:
    """Admission compares the very state stored: a change made and undone by another
    breaker meanwhile still makes the view outdated (a new generation)."""
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    a = CircuitBreaker(store, POLICY, clock=clock)
    b = CircuitBreaker(store, POLICY, clock=clock)
    async with a, b:
        assert await _call(b, KEY, False) == "ok"
        first = (await b.get_status(KEY)).generation
        await a.force_open(KEY)
        await a.reset(KEY)
        async with b.guard(KEY) as ticket:
            assert ticket.generation == first + 2  # b adopted the store's new generation


async def test_a_store_closed_by_its_owner_refuses_at_once() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock)
    assert await _call(breaker, KEY, False) == "ok"
    await store.aclose()
    with pytest.raises(BackendClosedError):
        async with breaker.guard(KEY):
            pass
    with pytest.raises(BackendClosedError):
        await breaker.protect(KEY)(_noop)()


async def _noop() -> None:
    return None


async def test_a_closed_breaker_refuses_on_a_view_the_store_still_holds() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock)
    guarded = breaker.protect(KEY)(_noop)
    async with breaker:
        await guarded()
        await guarded()
    assert (await store.snapshot(KEY)).window_calls == 2  # each success at once
    with pytest.raises(BackendClosedError):
        await guarded()
    with pytest.raises(BackendClosedError):
        async with breaker.guard(KEY):
            pass
    assert (await store.snapshot(KEY)).window_calls == 2


async def test_protect_on_many_keys_counts_every_success() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock)
    keys = [f"p:m-{i}" for i in range(50)]
    calls = {key: breaker.protect(key)(_noop) for key in keys}
    async with breaker:
        for _ in range(7):
            for key in keys:
                await calls[key]()
            clock.advance(0.7)  # views expire every other round, batches are due
        # the stored states without a flush: every success is there at once
        stored = {s.key: s.window_calls for s in await store.snapshot_all()}
        assert stored == dict.fromkeys(keys, 7)
    assert {s.window_calls for s in await store.snapshot_all()} == {7}


def test_a_tails_bucket_end_is_exactly_where_the_window_bucket_changes() -> None:
    """The hot path checks ``lo <= now < end`` instead of computing the bucket: ``end``
    must be the least time whose bucket (as the machine computes it) is the next one."""
    import math

    from empathy_models.backends.memory import _bucket_end

    rng = random.Random(7)
    for _ in range(2_000):
        width = rng.choice([POLICY.bucket_seconds, 0.1, 1 / 3, 7.7, 60.0, 1e-3])
        now = rng.uniform(1.6e9, 1.9e9) * rng.choice([1.0, 1e-6])
        bucket = math.floor(now / width)
        end = _bucket_end(bucket, width)
        assert math.floor(end / width) == bucket + 1
        assert math.floor(math.nextafter(end, -math.inf) / width) == bucket
