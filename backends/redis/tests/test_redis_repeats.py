"""
Equal reports in a row travel once with a repeat count; the result must not change.

Every batch here is built of runs of equal reports (the same object, or equal copies)
and compared, field for field, with `circuit.apply_outcomes` replayed at the server
time of the operation: CLOSED-success runs, repeated failures that trip mid-run, and
repeated probe outcomes in HALF_OPEN, where only the first copy holds the lease.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from empathy_models_redis import RedisCircuitStateStore

from empathy_models import circuit
from empathy_models.circuit import BreakerPolicy
from empathy_models.records import (
    Admission,
    CircuitBreakerState,
    CircuitState,
    Outcome,
    OutcomeReport,
    Ticket,
)

POLICY = BreakerPolicy(
    consecutive_failures=4,
    minimum_calls=50,
    failure_rate_threshold=0.5,
    recovery_seconds=0.001,
    max_recovery_seconds=0.002,
    half_open_probes=2,
    probe_lease_seconds=3600.0,
)


def _granted_lease(admission: Admission) -> Callable[[], str]:
    """The lease id Redis granted, for the Python machine to grant the same."""
    granted = admission.ticket.lease_id if admission.ticket is not None else None
    return lambda: granted or "not granted by redis"


async def _record(
    store: RedisCircuitStateStore,
    key: str,
    model: CircuitBreakerState,
    batch: list[OutcomeReport],
) -> CircuitBreakerState:
    got = await store.record(key, POLICY, batch)
    now = store.last_server_time
    assert now is not None
    expected = circuit.apply_outcomes(model, POLICY, batch, now)
    assert got == expected, batch
    assert await store.snapshot(key) == expected
    return got


async def test_runs_of_equal_reports_match_the_python_machine(redis_store_url: str) -> None:
    rng = random.Random(8)
    key = "repeats"
    async with RedisCircuitStateStore(redis_store_url) as store:
        await store.reset(key)
        model = await store.snapshot(key)
        seen: set[CircuitState] = set()
        for _ in range(120):
            adm = await store.admit(key, POLICY)
            now = store.last_server_time
            assert now is not None
            model, expected = circuit.admit(
                model, POLICY, now, key=key, new_lease_id=_granted_lease(adm)
            )
            assert adm == expected
            ticket = adm.ticket or Ticket(key=key, generation=model.generation)
            batch: list[OutcomeReport] = []
            for _ in range(rng.randint(1, 4)):
                outcome = rng.choice(
                    [Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED]
                )
                error = None if outcome is Outcome.SUCCESS else "HTTP 503"
                # equal tickets but for lease_expires_ts (not sent): separate wire entries
                # that form one run of CLOSED successes
                variant = Ticket(
                    key=key,
                    generation=ticket.generation,
                    lease_id=ticket.lease_id,
                    lease_expires_ts=rng.choice([ticket.lease_expires_ts, 1.0]),
                )
                report = OutcomeReport(ticket=variant, outcome=outcome, error=error)
                count = rng.choice([1, 2, 3, 7, 200])
                if rng.random() < 0.5:
                    batch += [report] * count  # one object repeated, as the breaker sends
                else:  # equal copies
                    batch += [
                        OutcomeReport(ticket=variant, outcome=outcome, error=error)
                        for _ in range(count)
                    ]
            model = await _record(store, key, model, batch)
            seen.add(model.state)
        # the runs reached every automatic state, so repeats were applied in each
        assert {CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN} <= seen, seen


async def test_a_run_of_failures_trips_mid_run_and_drops_the_rest(redis_store_url: str) -> None:
    key = "repeats-trip"
    async with RedisCircuitStateStore(redis_store_url) as store:
        await store.reset(key)
        model = await store.snapshot(key)
        fail = OutcomeReport(
            ticket=Ticket(key=key, generation=model.generation),
            outcome=Outcome.FAILURE,
            error="HTTP 503",
        )
        model = await _record(store, key, model, [fail] * 10)
        # tripped at the 4th copy; the other six belong to the closed generation
        assert model.state is CircuitState.OPEN
        assert model.consecutive_failures == 4
        assert model.generation == fail.ticket.generation + 1
