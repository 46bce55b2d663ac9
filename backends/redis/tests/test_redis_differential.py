"""
The Lua port against the pure Python machine: the same random operations, the same
results.

Redis takes time from its own clock, so the Python machine is replayed with the time
the store reports for each operation (``last_server_time``) and the lease ids Redis
granted; every admission, every returned state and every snapshot must then be equal
field for field.  Policies mix tiny durations (so that windows roll, circuits reach
HALF_OPEN, leases expire and trips decay during a run, as real time passes) with
large ones (so that nothing expires).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from empathy_models_redis import RedisCircuitStateStore
from redis.typing import EncodableT, FieldT

from empathy_models import circuit
from empathy_models.backends import state_store_from_url
from empathy_models.circuit import BreakerPolicy
from empathy_models.records import (
    Admission,
    CircuitBreakerState,
    CircuitState,
    Outcome,
    OutcomeReport,
    Ticket,
)
from empathy_models.testing.contracts import written_ahead


def _duration(rng: random.Random) -> float:
    return rng.choice([rng.uniform(0.0002, 0.004), rng.uniform(0.004, 0.03), 3600.0])


def random_policy(rng: random.Random) -> BreakerPolicy:
    recovery = _duration(rng)
    return BreakerPolicy(
        consecutive_failures=rng.randint(1, 4),
        failure_rate_threshold=rng.choice([0.25, 0.5, 1 / 3, 1.0]),
        minimum_calls=rng.randint(1, 6),
        window_seconds=rng.choice([0.003, 0.02, 60.0]),
        window_buckets=rng.randint(1, 6),
        recovery_seconds=recovery,
        max_recovery_seconds=recovery * rng.choice([1, 2.5, 10]),
        backoff=rng.choice(["linear", "exponential"]),
        healthy_decay_seconds=_duration(rng),
        half_open_probes=rng.randint(1, 3),
        probe_lease_seconds=_duration(rng),
        fatal_open_seconds=_duration(rng),
        min_retry_after_open=rng.choice([0.0, 0.001, 1.0]),
    )


OUTCOMES = list(Outcome)


def random_report(rng: random.Random, ticket: Ticket) -> OutcomeReport:
    outcome = rng.choice(OUTCOMES)
    return OutcomeReport(
        ticket=ticket,
        outcome=outcome,
        retry_after=rng.choice([None, None, 0.0, 0.0005, 0.5, 2.0]),
        error=rng.choice([None, "", "HTTP 503", "timeout"]),
    )


def _granted_lease(admission: Admission) -> Callable[[], str]:
    """The lease id Redis granted, for the Python machine to grant the same."""
    granted = admission.ticket.lease_id if admission.ticket is not None else None

    def new_lease_id() -> str:
        return granted or "not-granted-by-redis"

    return new_lease_id


_TIMES = ("opened_at_ts", "open_until_ts", "closed_at_ts", "last_failure_ts", "updated_at_ts")


async def _step_back(
    store: RedisCircuitStateStore, state: CircuitBreakerState, seconds: float, buckets: int
) -> CircuitBreakerState:
    """
    ``state`` as a clock ``seconds`` ahead (``buckets`` window buckets) would have
    written it, stored over the key: what the server's clock stepped back finds.
    """

    later = written_ahead(state, seconds, buckets)
    fields: dict[FieldT, EncodableT] = {
        n: repr(getattr(later, n)) for n in _TIMES if getattr(later, n) is not None
    }
    fields["window"] = ";".join(f"{b}:{c}:{f}" for b, c, f in later.window)
    fields["leases"] = ";".join(f"{lease}:{ends!r}" for lease, ends in later.leases)
    redis_key = store._redis_key(state.key)
    await store._client.hdel(redis_key, "rev")  # the next reply carries every field
    await store._client.hset(redis_key, mapping=fields)
    return later


def _expected_snapshot(state: CircuitBreakerState | None, key: str) -> CircuitBreakerState:
    return state if state is not None else circuit.initial_state(key)


async def run_sequence(store: RedisCircuitStateStore, seed: int, steps: int) -> dict[str, int]:
    rng = random.Random(seed)
    policy = random_policy(rng)
    key = f"k{seed}"
    model: CircuitBreakerState | None = None
    tickets: list[Ticket] = []
    seen: dict[str, int] = {}
    for _ in range(steps):
        ops = ["admit", "record", "force", "reset", "step"]
        op = rng.choices(ops, weights=[10, 8, 1, 0.5, 0.7])[0]
        if op == "step":
            if model is None:
                continue
            # the server's clock steps back: the key as a clock that far ahead wrote it
            seconds = rng.choice([0.5, 1.5, 30.0, 3600.0])
            model = await _step_back(store, model, seconds, round(seconds / policy.bucket_seconds))
        elif op == "admit":
            adm = await store.admit(key, policy)
            now = store.last_server_time
            assert now is not None
            new, expected = circuit.admit(
                model, policy, now, key=key, new_lease_id=_granted_lease(adm)
            )
            assert adm == expected, f"seed {seed}: admit differs"
            model = new
            if adm.ticket is not None:
                tickets.append(adm.ticket)
        elif op == "record":
            if not tickets:
                continue
            batch = [
                random_report(rng, rng.choice(tickets[-4:] if rng.random() < 0.8 else tickets))
                for _ in range(rng.choice([1, 1, 1, 2, 3]))
            ]
            if rng.random() < 0.15:
                # a written-behind run of successes, as the breaker flushes them
                ticket = tickets[-1]
                run = [OutcomeReport(ticket=ticket, outcome=Outcome.SUCCESS)] * rng.randint(2, 60)
                batch = [*run, *batch, *run] if rng.random() < 0.5 else [*batch, *run]
            got = await store.record(key, policy, batch)
            now = store.last_server_time
            assert now is not None
            current = model if model is not None else circuit.initial_state(key, now)
            model = circuit.apply_outcomes(current, policy, batch, now)
            assert got == model, f"seed {seed}: record {batch} differs"
        elif op == "force":
            target = rng.choice(
                [CircuitState.FORCED_OPEN, CircuitState.DISABLED, CircuitState.CLOSED]
            )
            until = None
            if target is CircuitState.FORCED_OPEN and rng.random() < 0.7:
                base = store.last_server_time or 1.7e9
                until = datetime.fromtimestamp(base + rng.choice([-1.0, 0.002, 3600.0]), UTC)
            reason = rng.choice([None, "", "maintenance"])
            got = await store.force(key, target, until=until, reason=reason)
            now = store.last_server_time
            assert now is not None
            model = circuit.force(
                model,
                target,
                now,
                key=key,
                until=None if until is None else until.timestamp(),
                reason=reason,
            )
            assert got == model, f"seed {seed}: force {target} differs"
        else:
            await store.reset(key)
            now = store.last_server_time
            assert now is not None
            model = circuit.reset(model, now, key=key)
        assert await store.snapshot(key) == _expected_snapshot(model, key)
        assert model is not None
        seen[model.state.value] = seen.get(model.state.value, 0) + 1
    return seen


@pytest.mark.slow
async def test_lua_port_matches_the_python_machine(redis_store_url: str) -> None:
    store = state_store_from_url(redis_store_url)
    assert isinstance(store, RedisCircuitStateStore)
    visited: dict[str, int] = {}
    async with store:
        for seed in range(60):
            for state, count in (await run_sequence(store, seed, 80)).items():
                visited[state] = visited.get(state, 0) + count
    # the sequences must actually exercise every state, or the comparison proves little
    assert set(visited) == {s.value for s in CircuitState}, visited


@pytest.mark.parametrize("backoff", ["linear", "exponential"])
async def test_repeated_trips_grow_the_open_period_identically(
    redis_store_url: str, backoff: str
) -> None:
    """Trip, probe, fail the probe, again and again: open_count and open_until agree."""
    policy = BreakerPolicy(
        consecutive_failures=1,
        recovery_seconds=0.0005,
        max_recovery_seconds=0.004,
        backoff=backoff,  # type: ignore[arg-type]
        probe_lease_seconds=3600.0,
    )
    store = RedisCircuitStateStore(redis_store_url)
    model: CircuitBreakerState | None = None
    trips = 0
    async with store:
        for _ in range(400):
            adm = await store.admit("grow", policy)
            now = store.last_server_time
            assert now is not None
            model, expected = circuit.admit(
                model, policy, now, key="grow", new_lease_id=_granted_lease(adm)
            )
            assert adm == expected
            if adm.ticket is None:
                continue
            report = OutcomeReport(ticket=adm.ticket, outcome=Outcome.FAILURE, error="503")
            got = await store.record("grow", policy, [report])
            now = store.last_server_time
            assert now is not None
            model = circuit.apply_outcomes(model, policy, [report], now)
            assert got == model
            trips = max(trips, got.open_count)
    # the cap was reached: the open period grew and stopped growing, in both
    assert trips >= 4
