"""
The pure breaker machine `empathy_models.circuit`: every transition and boundary as a
table of scripted steps, and its invariants under random sequences (Hypothesis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import attrs
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from empathy_models import circuit
from empathy_models.circuit import BreakerPolicy
from empathy_models.exceptions import ConfigurationError
from empathy_models.records import (
    CircuitBreakerState,
    CircuitState,
    Outcome,
    OutcomeReport,
    Ticket,
)

T0 = 1_767_225_600.0
KEY = "anthropic"

CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN
FORCED_OPEN = CircuitState.FORCED_OPEN
DISABLED = CircuitState.DISABLED


@dataclass
class Run:
    """Drives the machine like a store would, remembering every ticket handed out."""

    policy: BreakerPolicy
    now: float = T0
    state: CircuitBreakerState | None = None
    tickets: list[Ticket] = field(default_factory=list)
    last_retry_after: float | None = None

    def admit(self) -> bool:
        self.state, admission = circuit.admit(self.state, self.policy, self.now, key=KEY)
        assert admission.state == self.state
        if admission.admitted:
            assert admission.ticket is not None
            self.tickets.append(admission.ticket)
        else:
            assert admission.ticket is None
        self.last_retry_after = admission.retry_after
        return admission.admitted

    def report(
        self, index: int, outcome: Outcome, retry_after: float | None = None, error: str = "boom"
    ) -> None:
        report = OutcomeReport(
            ticket=self.tickets[index], outcome=outcome, retry_after=retry_after, error=error
        )
        self.state = circuit.apply_outcome(self.state, self.policy, report, self.now)

    @property
    def s(self) -> CircuitBreakerState:
        assert self.state is not None
        return self.state


def run_steps(policy_kwargs: dict[str, Any], steps: list[tuple[Any, ...]]) -> Run:
    """
    Steps: ("t", dt) advance; ("admit", admitted); (outcome, retry_after?) admit then report
    at once; ("late", index, outcome) report an older ticket; ("force", target, until_offset);
    ("reset",); ("expect", {field: value}) check the state (``open_until`` relative to T0,
    ``retry_after`` of the last admission).
    """
    r = Run(policy=BreakerPolicy(**policy_kwargs))
    for step in steps:
        op = step[0]
        if op == "t":
            r.now += step[1]
        elif op == "admit":
            assert r.admit() is step[1], f"admit at {r.now - T0} in {r.state}"
        elif isinstance(op, Outcome):
            assert r.admit(), f"admission needed for {op} at {r.now - T0} in {r.state}"
            r.report(-1, op, step[1] if len(step) > 1 else None)
        elif op == "late":
            r.report(step[1], step[2], step[3] if len(step) > 3 else None)
        elif op == "force":
            until = None if step[2] is None else T0 + step[2]
            r.state = circuit.force(r.state, step[1], r.now, key=KEY, until=until, reason="ops")
        elif op == "reset":
            r.state = circuit.reset(r.state, r.now, key=KEY)
        elif op == "expect":
            for name, want in step[1].items():
                if name == "open_until":
                    got = None if r.s.open_until_ts is None else r.s.open_until_ts - T0
                elif name == "retry_after":
                    got = r.last_retry_after
                else:
                    got = getattr(r.s, name)
                if isinstance(want, float) and got is not None:
                    assert got == pytest.approx(want), (name, r.s)
                else:
                    assert got == want, (name, got, want, r.s)
        else:  # pragma: no cover - a typo in the table
            raise AssertionError(f"unknown step {step!r}")
    return r


OK = (Outcome.SUCCESS,)
FAIL = (Outcome.FAILURE,)
STREAK3 = {"consecutive_failures": 3, "minimum_calls": 100}
ONE = {"consecutive_failures": 1}

CASES: list[tuple[str, dict[str, Any], list[tuple[Any, ...]]]] = [
    # ------------------------------------------------------------ CLOSED, streak rule
    (
        "streak trips exactly at the threshold",
        STREAK3,
        [
            FAIL,
            FAIL,
            ("expect", {"state": CLOSED, "consecutive_failures": 2, "generation": 0}),
            FAIL,
            (
                "expect",
                {
                    "state": OPEN,
                    "generation": 1,
                    "open_until": 60.0,
                    "open_count": 1,
                    "reason": "3 consecutive failures",
                    "last_error": "boom",
                },
            ),
        ],
    ),
    (
        "a success resets the streak",
        STREAK3,
        [FAIL, FAIL, OK, FAIL, FAIL, ("expect", {"state": CLOSED, "consecutive_failures": 2})],
    ),
    (
        "ignored, cancelled and rejected neither count nor reset the streak",
        STREAK3,
        [
            FAIL,
            FAIL,
            (Outcome.IGNORED,),
            (Outcome.CANCELLED,),
            (Outcome.REJECTED,),
            ("expect", {"consecutive_failures": 2, "window_calls": 2, "generation": 0}),
            FAIL,
            ("expect", {"state": OPEN}),
        ],
    ),
    # ------------------------------------------------------------ CLOSED, failure-rate rule
    (
        "failure rate waits for minimum_calls, then trips at the threshold",
        {"consecutive_failures": 100, "minimum_calls": 4, "failure_rate_threshold": 0.5},
        [
            OK,
            OK,
            FAIL,
            ("expect", {"state": CLOSED, "window_calls": 3, "window_failures": 1}),
            FAIL,
            ("expect", {"state": OPEN, "reason": "failure rate 2/4 over 60s"}),
        ],
    ),
    (
        "failure rate below the threshold stays closed",
        {"consecutive_failures": 100, "minimum_calls": 4, "failure_rate_threshold": 0.5},
        [OK, OK, OK, FAIL, OK, FAIL, ("expect", {"state": CLOSED, "window_calls": 6})],
    ),
    (
        "a success never trips even at a high failure rate",
        {"consecutive_failures": 100, "minimum_calls": 2, "failure_rate_threshold": 0.5},
        [FAIL, OK, ("expect", {"state": CLOSED, "window_calls": 2})],
    ),
    (
        "calls older than the window are forgotten",
        {"consecutive_failures": 100, "minimum_calls": 4},
        [
            FAIL,
            FAIL,
            FAIL,
            ("t", 60.0),
            FAIL,
            ("expect", {"state": CLOSED, "window_calls": 1, "consecutive_failures": 4}),
        ],
    ),
    # ------------------------------------------------------------ each outcome class in CLOSED
    ("class success", {}, [OK, ("expect", {"consecutive_failures": 0, "window_calls": 1})]),
    (
        "class failure",
        {},
        [FAIL, ("expect", {"consecutive_failures": 1, "window_failures": 1, "state": CLOSED})],
    ),
    (
        "class rate_limited without Retry-After is a failure",
        {},
        [(Outcome.RATE_LIMITED,), ("expect", {"consecutive_failures": 1, "state": CLOSED})],
    ),
    (
        "class fatal forces open for fatal_open_seconds",
        {"fatal_open_seconds": 300.0},
        [
            (Outcome.FATAL,),
            (
                "expect",
                {
                    "state": FORCED_OPEN,
                    "open_until": 300.0,
                    "generation": 1,
                    "reason": "boom",
                    "last_error": "boom",
                },
            ),
            ("admit", False),
            ("expect", {"retry_after": 300.0}),
        ],
    ),
    ("class ignored", {}, [(Outcome.IGNORED,), ("expect", {"window_calls": 0})]),
    ("class cancelled", {}, [(Outcome.CANCELLED,), ("expect", {"window_calls": 0})]),
    ("class rejected", {}, [(Outcome.REJECTED,), ("expect", {"window_calls": 0})]),
    # ------------------------------------------------------------ 429 and Retry-After
    (
        "429 with Retry-After equal to min_retry_after_open opens at once for exactly that",
        {"min_retry_after_open": 1.0},
        [
            (Outcome.RATE_LIMITED, 1.0),
            (
                "expect",
                {
                    "state": OPEN,
                    "open_until": 1.0,
                    "open_count": 0,
                    "reason": "rate limited (Retry-After 1s)",
                },
            ),
            ("t", 1.0),
            ("admit", True),
            ("expect", {"state": HALF_OPEN}),
        ],
    ),
    (
        "routine 429s never lengthen the open time",
        {"min_retry_after_open": 1.0},
        [
            (Outcome.RATE_LIMITED, 1.0),
            ("t", 1.0),
            OK,  # the probe closes it
            ("t", 5.0),
            (Outcome.RATE_LIMITED, 1.0),
            ("expect", {"state": OPEN, "open_until": 7.0, "open_count": 0}),
            ("t", 1.0),
            OK,
            ("t", 5.0),
            (Outcome.RATE_LIMITED, 2.0),
            ("expect", {"state": OPEN, "open_until": 14.0, "open_count": 0}),
        ],
    ),
    (
        "a 429 open keeps the earlier trips for the next trip",
        {"consecutive_failures": 1, "min_retry_after_open": 1.0},
        [
            FAIL,  # first trip: 60 s
            ("t", 60.0),
            OK,  # closed at 60 with open_count 1
            (Outcome.RATE_LIMITED, 30.0),  # a streak of one: a trip, max(120, 30)
            ("expect", {"state": OPEN, "open_count": 2, "open_until": 180.0}),
            ("expect", {"reason": "1 consecutive failures"}),
        ],
    ),
    (
        "429 Retry-After longer than the recovery time holds it open that long",
        {"min_retry_after_open": 1.0},
        [(Outcome.RATE_LIMITED, 120.0), ("expect", {"state": OPEN, "open_until": 120.0})],
    ),
    (
        "429 Retry-After below min_retry_after_open is an ordinary failure",
        {"min_retry_after_open": 1.0},
        [
            (Outcome.RATE_LIMITED, 0.5),
            ("expect", {"state": CLOSED, "consecutive_failures": 1}),
        ],
    ),
    (
        "a streak trip honours a Retry-After floor",
        {"consecutive_failures": 1, "min_retry_after_open": 100.0},
        [(Outcome.RATE_LIMITED, 90.0), ("expect", {"state": OPEN, "open_until": 90.0})],
    ),
    # ------------------------------------------------------------ OPEN and the boundary
    (
        "OPEN rejects until open_until and probes exactly at it",
        ONE,
        [
            FAIL,
            ("t", 59.5),
            ("admit", False),
            ("expect", {"retry_after": 0.5, "state": OPEN}),
            ("t", 0.5),
            ("admit", True),
            ("expect", {"state": HALF_OPEN, "generation": 2, "probes_in_flight": 1}),
        ],
    ),
    (
        "OPEN ignores outcomes of the closed generation",
        {"consecutive_failures": 2},
        [
            ("admit", True),  # ticket 0, generation 0, still out
            FAIL,
            FAIL,
            ("expect", {"state": OPEN, "generation": 1}),
            ("late", 0, Outcome.FAILURE),
            ("late", 0, Outcome.SUCCESS),
            ("expect", {"state": OPEN, "generation": 1, "open_until": 60.0}),
        ],
    ),
    # ------------------------------------------------------------ HALF_OPEN
    (
        "half-open admits one probe and rejects the rest until its lease ends",
        {"consecutive_failures": 1, "probe_lease_seconds": 30.0},
        [
            FAIL,
            ("t", 60.0),
            ("admit", True),
            ("admit", False),
            ("expect", {"retry_after": 30.0, "state": HALF_OPEN}),
        ],
    ),
    (
        "a probe success closes and forgets the counts, keeping the trip count",
        ONE,
        [
            FAIL,
            ("t", 60.0),
            OK,
            (
                "expect",
                {
                    "state": CLOSED,
                    "generation": 3,
                    "consecutive_failures": 0,
                    "window_calls": 0,
                    "open_count": 1,
                    "probes_in_flight": 0,
                },
            ),
        ],
    ),
    (
        "a probe failure re-opens with linear backoff",
        ONE,
        [
            FAIL,
            ("t", 60.0),
            FAIL,
            ("expect", {"state": OPEN, "generation": 3, "open_count": 2, "open_until": 180.0}),
            ("expect", {"reason": "half-open probe failed"}),
        ],
    ),
    (
        "backoff is capped at max_recovery_seconds",
        {"consecutive_failures": 1, "max_recovery_seconds": 150.0},
        [
            FAIL,  # open 60 -> until 60
            ("t", 60.0),
            FAIL,  # open 120 -> until 180
            ("t", 120.0),
            FAIL,  # open min(180, 150) -> until 330
            ("expect", {"open_count": 3, "open_until": 330.0}),
        ],
    ),
    (
        "exponential backoff doubles",
        {"consecutive_failures": 1, "backoff": "exponential", "max_recovery_seconds": 1000.0},
        [
            FAIL,  # 60 -> 60
            ("t", 60.0),
            FAIL,  # 120 -> 180
            ("t", 120.0),
            FAIL,  # 240 -> 420
            ("expect", {"open_count": 3, "open_until": 420.0}),
        ],
    ),
    (
        "trips decay after healthy_decay_seconds closed",
        {"consecutive_failures": 1, "healthy_decay_seconds": 300.0},
        [
            FAIL,
            ("t", 60.0),
            FAIL,  # second trip: 120 s
            ("t", 120.0),
            OK,  # closed at 180, open_count 2
            ("t", 299.0),
            FAIL,  # not yet decayed: third trip, 180 s
            ("expect", {"open_count": 3, "open_until": 479.0 + 180.0}),
        ],
    ),
    (
        "one decay period forgets one trip",
        {"consecutive_failures": 1, "healthy_decay_seconds": 300.0},
        [
            FAIL,
            ("t", 60.0),
            FAIL,
            ("t", 120.0),
            OK,  # closed at 180 with open_count 2
            ("t", 300.0),
            FAIL,  # decayed to 1, this trip is the 2nd: 120 s
            ("expect", {"open_count": 2, "open_until": 480.0 + 120.0}),
        ],
    ),
    (
        "a probe's 429 re-opens for its Retry-After without counting a trip",
        ONE,
        [
            FAIL,
            ("t", 60.0),
            (Outcome.RATE_LIMITED, 500.0),
            ("expect", {"open_until": 560.0, "open_count": 1, "generation": 3}),
            ("expect", {"reason": "half-open probe rate limited (Retry-After 500s)"}),
            ("t", 500.0),
            (Outcome.RATE_LIMITED, 2.0),
            ("expect", {"state": OPEN, "open_until": 562.0, "open_count": 1}),
        ],
    ),
    (
        "a probe's 429 under min_retry_after_open is a probe failure",
        {"consecutive_failures": 1, "min_retry_after_open": 1.0},
        [
            FAIL,
            ("t", 60.0),
            (Outcome.RATE_LIMITED, 0.5),
            ("expect", {"open_count": 2, "open_until": 180.0, "reason": "half-open probe failed"}),
        ],
    ),
    (
        "a probe's fatal error forces open",
        {"consecutive_failures": 1, "fatal_open_seconds": 300.0},
        [
            FAIL,
            ("t", 60.0),
            (Outcome.FATAL,),
            ("expect", {"state": FORCED_OPEN, "open_until": 360.0, "generation": 3}),
        ],
    ),
    (
        "an expired lease returns its slot",
        {"consecutive_failures": 1, "probe_lease_seconds": 30.0},
        [
            FAIL,
            ("t", 60.0),
            ("admit", True),  # ticket 1
            ("t", 29.5),
            ("admit", False),
            ("t", 0.5),
            ("admit", True),  # exactly at expiry the slot is free again: ticket 2
            ("expect", {"probes_in_flight": 1, "state": HALF_OPEN, "generation": 2}),
        ],
    ),
    (
        "a late probe outcome is dropped",
        {"consecutive_failures": 1, "probe_lease_seconds": 30.0},
        [
            FAIL,
            ("t", 60.0),
            ("admit", True),  # ticket 1
            ("t", 30.0),
            ("late", 1, Outcome.SUCCESS),
            ("expect", {"state": HALF_OPEN, "probe_successes": 0}),
            ("late", 1, Outcome.FAILURE),
            ("expect", {"state": HALF_OPEN, "generation": 2}),
        ],
    ),
    (
        "a cancelled probe returns its lease and records nothing",
        ONE,
        [
            FAIL,
            ("t", 60.0),
            (Outcome.CANCELLED,),
            ("expect", {"state": HALF_OPEN, "probes_in_flight": 0, "generation": 2}),
            ("admit", True),
        ],
    ),
    (
        "an ignored probe returns its lease",
        ONE,
        [
            FAIL,
            ("t", 60.0),
            (Outcome.IGNORED,),
            ("expect", {"state": HALF_OPEN, "probes_in_flight": 0}),
        ],
    ),
    (
        "a closed-generation ticket cannot close a half-open circuit",
        {"consecutive_failures": 2},
        [
            ("admit", True),  # ticket 0
            FAIL,
            FAIL,
            ("t", 60.0),
            ("admit", True),  # probe
            ("late", 0, Outcome.SUCCESS),
            ("expect", {"state": HALF_OPEN, "probe_successes": 0, "probes_in_flight": 1}),
        ],
    ),
    (
        "with two probes, two successes are needed",
        {"consecutive_failures": 1, "half_open_probes": 2},
        [
            FAIL,
            ("t", 60.0),
            ("admit", True),
            ("admit", True),
            ("admit", False),
            ("late", 1, Outcome.SUCCESS),
            ("expect", {"state": HALF_OPEN, "probe_successes": 1, "probes_in_flight": 1}),
            ("late", 2, Outcome.SUCCESS),
            ("expect", {"state": CLOSED, "generation": 3}),
        ],
    ),
    # ------------------------------------------------------------ operator states
    (
        "manual force without an end holds until reset",
        {},
        [
            ("force", FORCED_OPEN, None),
            ("admit", False),
            ("expect", {"retry_after": None, "generation": 1, "reason": "ops"}),
            ("t", 10_000_000.0),
            ("admit", False),
            ("reset",),
            ("expect", {"state": CLOSED, "generation": 2, "open_count": 0}),
            ("admit", True),
        ],
    ),
    (
        "a forced period ends in half-open",
        {},
        [
            ("force", FORCED_OPEN, 100.0),
            ("t", 100.0),
            ("admit", True),
            ("expect", {"state": HALF_OPEN, "generation": 2}),
        ],
    ),
    (
        "forcing again never shortens a forced period",
        {},
        [
            ("force", FORCED_OPEN, 100.0),
            ("force", FORCED_OPEN, 50.0),
            ("expect", {"open_until": 100.0, "generation": 2}),
            ("force", FORCED_OPEN, 200.0),
            ("expect", {"open_until": 200.0}),
        ],
    ),
    (
        "disabled admits everything and never trips",
        ONE,
        [
            ("force", DISABLED, None),
            FAIL,
            FAIL,
            (Outcome.FATAL,),
            ("expect", {"state": DISABLED, "generation": 1, "consecutive_failures": 0}),
            ("force", CLOSED, None),
            ("expect", {"state": CLOSED, "generation": 2}),
        ],
    ),
    (
        "forcing closed clears the counts and bumps the generation",
        STREAK3,
        [
            FAIL,
            FAIL,
            ("force", CLOSED, None),
            ("expect", {"consecutive_failures": 0, "window_calls": 0, "generation": 1}),
            ("late", 0, Outcome.FAILURE),
            ("expect", {"consecutive_failures": 0}),
        ],
    ),
    (
        "forcing closed keeps the trips' decay",
        {"consecutive_failures": 1, "healthy_decay_seconds": 300.0},
        [
            FAIL,
            ("t", 60.0),
            OK,  # closed at 60 with open_count 1
            ("t", 200.0),
            ("force", CLOSED, None),
            ("t", 100.0),
            FAIL,  # 300 s closed forgot the trip: a first one again, 60 s
            ("expect", {"open_count": 1, "open_until": 360.0 + 60.0}),
        ],
    ),
    (
        "a manual force holds the trips' decay and adds none of its own time",
        {"consecutive_failures": 1, "healthy_decay_seconds": 300.0},
        [
            FAIL,
            ("t", 60.0),
            OK,  # closed at 60 with open_count 1
            ("t", 200.0),
            ("force", FORCED_OPEN, 1000.0),
            ("t", 740.0),
            OK,  # the probe closes it, 200 s of healthy time held
            ("t", 99.0),
            ("admit", True),
            ("t", 1.0),
            FAIL,  # 200 + 100 s closed forgot the trip: 60 s
            ("expect", {"open_count": 1, "open_until": 1100.0 + 60.0}),
        ],
    ),
    (
        "a probe failing after a manual force counts the healthy time before it",
        {"consecutive_failures": 1, "healthy_decay_seconds": 300.0},
        [
            FAIL,
            ("t", 60.0),
            OK,
            ("t", 300.0),
            ("force", DISABLED, None),
            ("force", FORCED_OPEN, 1000.0),
            ("t", 640.0),
            FAIL,  # the probe: the trip was forgotten before the force, a first one
            ("expect", {"open_count": 1, "open_until": 1000.0 + 60.0}),
        ],
    ),
    (
        "time disabled holds the trips' decay too",
        {"consecutive_failures": 1, "healthy_decay_seconds": 300.0},
        [
            FAIL,
            ("t", 60.0),
            OK,  # closed at 60 with open_count 1
            ("t", 100.0),
            ("force", DISABLED, None),
            ("t", 10_000.0),
            ("force", DISABLED, None),  # disabled again: no time gained or lost
            ("t", 10_000.0),
            ("force", CLOSED, None),
            ("t", 100.0),
            FAIL,  # 100 + 100 s closed: the trip still counts, a second one, 120 s
            ("expect", {"open_count": 2, "open_until": 20_260.0 + 120.0}),
        ],
    ),
    (
        "reset drops tickets of the old generation and forgets trips",
        ONE,
        [
            ("admit", True),  # ticket 0, generation 0
            FAIL,
            ("reset",),
            ("expect", {"state": CLOSED, "generation": 2, "open_count": 0}),
            ("late", 0, Outcome.FAILURE),
            ("expect", {"state": CLOSED, "consecutive_failures": 0}),
        ],
    ),
]


@pytest.mark.parametrize(
    ("policy_kwargs", "steps"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_transition_table(policy_kwargs: dict[str, Any], steps: list[tuple[Any, ...]]) -> None:
    run_steps(policy_kwargs, steps)


def test_the_table_can_fail() -> None:
    with pytest.raises(AssertionError):
        run_steps(STREAK3, [FAIL, FAIL, ("expect", {"state": OPEN})])


def test_force_to_half_open_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="half_open"):
        circuit.force(None, HALF_OPEN, T0, key=KEY)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures must be an integer >= 1, got 0"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold must be in (0, 1], got 1.5"),
        ({"recovery_seconds": -1}, "recovery_seconds must be > 0, got -1"),
        ({"recovery_seconds": float("inf")}, "must be"),
        ({"backoff": "cubic"}, "backoff must be 'linear' or 'exponential'"),
        ({"recovery_seconds": 100, "max_recovery_seconds": 50}, "max_recovery_seconds"),
        ({"min_retry_after_open": -0.5}, "min_retry_after_open must be >= 0, got -0.5"),
    ],
)
def test_policy_validation_names_field_and_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        BreakerPolicy(**kwargs)
    assert message in str(info.value)


def test_unseen_key_admits_at_generation_zero() -> None:
    state, admission = circuit.admit(None, BreakerPolicy(), T0, key=KEY)
    assert admission.admitted
    assert admission.ticket == Ticket(key=KEY, generation=0)
    assert state.state is CLOSED


@settings(max_examples=200, deadline=None)
@given(
    outcomes=st.lists(
        st.tuples(
            st.sampled_from(list(Outcome)),
            st.sampled_from([0, 1]),  # which ticket: the current one or an older one
            st.floats(min_value=0, max_value=5),
        ),
        max_size=30,
    ),
    prefix=st.lists(st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE]), max_size=6),
)
def test_apply_outcomes_equals_applying_one_by_one(
    outcomes: list[tuple[Outcome, int, float]], prefix: list[Outcome]
) -> None:
    policy = BreakerPolicy(consecutive_failures=3, minimum_calls=4)
    r = Run(policy=policy, state=circuit.initial_state(KEY, T0))
    for outcome in prefix:
        if r.admit():
            r.report(-1, outcome)
    old = Ticket(key=KEY, generation=max(0, r.s.generation - 1))
    _, admission = circuit.admit(r.state, policy, r.now, key=KEY)
    current = admission.ticket or old
    reports = [
        OutcomeReport(ticket=(current, old)[which], outcome=outcome, retry_after=ra or None)
        for outcome, which, ra in outcomes
    ]
    one_by_one = r.state
    for report in reports:
        one_by_one = circuit.apply_outcome(one_by_one, policy, report, r.now)
    assert circuit.apply_outcomes(r.state, policy, reports, r.now) == one_by_one


# --------------------------------------------------------------------------- invariants


class BreakerMachine(RuleBasedStateMachine):
    """Random admissions, outcomes, time steps and operator actions against the machine."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = BreakerPolicy()
        self.now = T0
        self.state: CircuitBreakerState | None = None
        self.tickets: list[Ticket] = []
        self.last_generation = 0
        self.last_kind = CLOSED

    @initialize(
        probes=st.integers(1, 3),
        streak=st.integers(1, 4),
        minimum=st.integers(1, 6),
        backoff=st.sampled_from(["linear", "exponential"]),
    )
    def setup(self, probes: int, streak: int, minimum: int, backoff: str) -> None:
        self.policy = BreakerPolicy(
            half_open_probes=probes,
            consecutive_failures=streak,
            minimum_calls=minimum,
            recovery_seconds=10.0,
            max_recovery_seconds=40.0,
            probe_lease_seconds=5.0,
            fatal_open_seconds=20.0,
            healthy_decay_seconds=30.0,
            window_seconds=12.0,
            window_buckets=3,
            backoff=backoff,  # type: ignore[arg-type]
        )

    def _transition(self, new: CircuitBreakerState) -> None:
        if new.state is not self.last_kind:
            assert new.generation > self.last_generation, (self.last_kind, new)
        assert new.generation >= self.last_generation
        self.state = new
        self.last_generation = new.generation
        self.last_kind = new.state

    @rule()
    def admit(self) -> None:
        before = self.state
        new, admission = circuit.admit(before, self.policy, self.now, key=KEY)
        if before is not None and before.state in (OPEN, FORCED_OPEN):
            until = before.open_until_ts
            if until is None or self.now < until:
                assert not admission.admitted, "OPEN admitted before open_until"
                assert new is before
        if admission.admitted:
            assert admission.ticket is not None
            if new.state in (CLOSED, DISABLED):
                assert admission.ticket.generation == new.generation
                assert admission.ticket.lease_id is None
            else:
                assert new.state is HALF_OPEN
                assert admission.ticket.lease_id is not None
                assert admission.ticket.generation == new.generation
            self.tickets.append(admission.ticket)
        self._transition(new)

    @precondition(lambda self: bool(self.tickets))
    @rule(
        data=st.data(),
        outcome=st.sampled_from(list(Outcome)),
        retry_after=st.sampled_from([None, 0.5, 1.0, 15.0, 100.0]),
    )
    def report(self, data: st.DataObject, outcome: Outcome, retry_after: float | None) -> None:
        index = data.draw(st.integers(0, len(self.tickets) - 1))
        ticket = self.tickets[index]
        before = self.state
        report = OutcomeReport(ticket=ticket, outcome=outcome, retry_after=retry_after, error="e")
        new = circuit.apply_outcome(before, self.policy, report, self.now)
        if before is not None and ticket.generation != before.generation:
            if circuit.extends_open(before, outcome, retry_after, self.now) and (
                ticket.generation < before.generation
            ):
                # the one exception: a late 429 holds an open circuit longer, nothing else
                assert retry_after is not None
                assert new == attrs.evolve(
                    before, open_until_ts=self.now + retry_after, updated_at_ts=self.now
                ), "a late 429 did more than extend the open period"
            else:
                assert new == before, "a stale ticket changed the state"
        self._transition(new)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 4.0, 4.99, 5.0, 9.5, 9.99, 10.0, 19.99, 30.0, 100.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(
        kind=st.sampled_from([FORCED_OPEN, DISABLED, CLOSED]),
        until=st.sampled_from([None, 5.0, 50.0]),
    )
    def force(self, kind: CircuitState, until: float | None) -> None:
        new = circuit.force(
            self.state, kind, self.now, key=KEY, until=None if until is None else self.now + until
        )
        assert new.generation == (0 if self.state is None else self.state.generation) + 1
        self._transition(new)

    @rule()
    def reset(self) -> None:
        new = circuit.reset(self.state, self.now, key=KEY)
        assert new.state is CLOSED and new.open_count == 0
        if self.state is not None:
            assert new.generation == self.state.generation + 1
        self._transition(new)

    @invariant()
    def probes_within_budget(self) -> None:
        if self.state is None:
            return
        live = [lease for lease in self.state.leases if lease[1] > self.now]
        assert len(live) <= self.policy.half_open_probes
        for _, expires in self.state.leases:
            assert expires <= self.now + self.policy.probe_lease_seconds
        if self.state.state is not HALF_OPEN:
            assert self.state.leases == ()

    @invariant()
    def open_has_an_end_or_is_forced(self) -> None:
        if self.state is not None and self.state.state is OPEN:
            until, opened = self.state.open_until_ts, self.state.opened_at_ts
            updated = self.state.updated_at_ts
            assert until is not None and opened is not None and updated is not None
            # capped backoff, or the longest Retry-After drawn (100 s) counted from the
            # opening or from a late 429 that extended the open period since
            cap = max(self.policy.max_recovery_seconds, 100.0)
            assert until <= max(opened + cap, updated + 100.0) + 1e-9


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_breaker_machine_invariants = BreakerMachine.TestCase


def test_a_fatal_outcome_marks_the_failure_time() -> None:
    r = Run(policy=BreakerPolicy())
    r.now += 5
    assert r.admit()
    r.report(-1, Outcome.FATAL, error="AuthenticationError 401")
    assert r.s.state is FORCED_OPEN
    assert r.s.last_failure_ts == T0 + 5
    assert r.s.last_error == "AuthenticationError 401"


def test_time_forced_open_does_not_decay_earlier_trips() -> None:
    # one trip, recovered; then a fatal error forces the circuit open for far longer than
    # healthy_decay_seconds. That forced period is not healthy time: when the probe after
    # it fails, the earlier trip still counts and the open time is the second step.
    policy = BreakerPolicy(
        consecutive_failures=1,
        recovery_seconds=10,
        max_recovery_seconds=1000,
        healthy_decay_seconds=100,
        fatal_open_seconds=500,
    )
    r = Run(policy=policy)
    assert r.admit()
    r.report(-1, Outcome.FAILURE)
    assert (r.s.state, r.s.open_count) == (OPEN, 1)
    r.now += 10
    assert r.admit()
    r.report(-1, Outcome.SUCCESS)
    assert r.s.state is CLOSED
    assert r.admit()
    r.report(-1, Outcome.FATAL)
    assert r.s.state is FORCED_OPEN
    r.now += 500
    assert r.admit()  # the forced period ended: a probe
    assert r.s.state is HALF_OPEN
    r.report(-1, Outcome.FAILURE)
    assert r.s.state is OPEN
    assert r.s.open_count == 2
    assert r.s.open_until_ts is not None
    assert r.s.open_until_ts - r.now == pytest.approx(20.0)


def test_a_late_429_holds_an_open_circuit_for_its_retry_after() -> None:
    # two calls in flight: one trips the circuit (open 60 s), the other then gets a 429
    # asking for 600 s. Its ticket is of the old generation, yet the provider's word
    # stands: the circuit stays open at least that long, without a transition.
    r = Run(policy=BreakerPolicy(consecutive_failures=1, recovery_seconds=60))
    assert r.admit() and r.admit()
    r.report(0, Outcome.FAILURE)
    assert r.s.state is OPEN
    generation = r.s.generation
    assert r.s.open_until_ts == T0 + 60
    r.now += 5
    r.report(1, Outcome.RATE_LIMITED, retry_after=600)
    assert r.s.state is OPEN
    assert r.s.generation == generation
    assert r.s.open_until_ts == T0 + 605
    # never shortened: a later, shorter hint changes nothing
    r.report(1, Outcome.RATE_LIMITED, retry_after=10)
    assert r.s.open_until_ts == T0 + 605
    # other late outcomes still change nothing
    r.report(1, Outcome.FAILURE)
    assert r.s.open_until_ts == T0 + 605
    r.now = T0 + 604
    assert not r.admit()
    r.now = T0 + 605
    assert r.admit()
    assert r.s.state is HALF_OPEN


def test_a_late_429_does_not_reopen_a_closed_circuit() -> None:
    r = Run(policy=BreakerPolicy(consecutive_failures=1, recovery_seconds=10))
    assert r.admit() and r.admit()
    r.report(0, Outcome.FAILURE)
    r.now += 10
    assert r.admit()
    r.report(-1, Outcome.SUCCESS)
    assert r.s.state is CLOSED
    before = r.s
    r.report(1, Outcome.RATE_LIMITED, retry_after=600)
    assert r.s == before
