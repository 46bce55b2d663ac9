"""
The circuit breaker as a pure state machine: no I/O, no clock, no randomness.

Every function takes the current `CircuitBreakerState` (or ``None`` for a key never
seen), a `BreakerPolicy` and the time ``now`` in UTC epoch seconds, and returns the new
state.  Stores apply these functions inside one atomic operation (a lock, a ``BEGIN
IMMEDIATE`` transaction, a row lock); the Redis plugin carries a Lua port that the
shared contract suite holds to the same behaviour.

Semantics (the state machine of resilience4j and Envoy's outlier ejection, with the
races that Polly, gobreaker and interlock fix closed; the README's "Retries and
fallback" table says what each error does to a call):

* CLOSED counts outcomes in a sliding window of ``window_buckets`` buckets covering
  ``window_seconds``, and the streak of consecutive failures.  It trips to OPEN when
  the streak reaches ``consecutive_failures`` or when the window holds at least
  ``minimum_calls`` calls and the failure rate is at least ``failure_rate_threshold``.
* OPEN rejects until ``open_until``.  The open time is ``recovery_seconds`` times the
  (decayed) number of recent trips, linear or exponential, capped at
  ``max_recovery_seconds``, and never shorter than the Retry-After of the 429 that
  tripped it.  A 429 whose Retry-After is at least ``min_retry_after_open`` (in CLOSED
  or from a half-open probe) opens the circuit at once for exactly that Retry-After and
  is not counted as a trip: rate limiting is not ill health, so routine 429s never
  lengthen later open times.  Re-opening an open circuit only ever extends
  ``open_until``.
* The first admission at or after ``open_until`` moves to HALF_OPEN (lazily: no timers)
  and takes a probe lease.  At most ``half_open_probes`` leases are out at once; a
  lease not reported within ``probe_lease_seconds`` expires and returns its slot.  A
  probe's failure re-opens the circuit; ``half_open_probes`` successes close it.
* ``fatal`` outcomes (401/403/404) force the circuit open (FORCED_OPEN) for
  ``fatal_open_seconds`` with the reason; the trips the time closed before it forgot
  stay forgotten (the forced period itself is not healthy time).  A manual `force`
  with ``until=None`` holds until `reset`.  DISABLED admits everything and never trips.
  A manual force keeps the trips' decay: the healthy time the key had counts on once it
  is closed again (held in ``closed_at_ts``, paused while forced open or disabled), the
  time forced open or disabled does not count.
* ``ignored``, ``cancelled``, ``rejected`` and ``not_sent`` outcomes count as neither
  success nor failure; in HALF_OPEN they return the probe lease.
* The times are wall-clock times, and a wall clock can step back (an NTP correction, a
  virtual machine resumed).  An end is then not to be waited for as long as the step,
  nor an outcome counted that long: when a key's last write (``updated_at_ts``) lies
  more than `CLOCK_STEP` seconds ahead of ``now``, the clock stepped back by at least
  that much, and `unstepped` moves the key's times (open end, probe leases, when it
  opened, closed, last failed, the window's buckets) back by it: each keeps the age,
  and an end the time left, it had at that write, whatever the step (the time between
  that write and the step is not known, and counts as none).  Every operation that
  writes moves them first (`admit` but for CLOSED and DISABLED keys, whose admission
  writes nothing; `apply_outcome`, `apply_outcomes`, `force`), without a transition:
  the generation stays, and the key's remaining times then run on the new clock.  A
  clock stepped forward ends open periods and leases early and ages the window, as
  any lost time would.
* Every transition increases ``generation`` by one.  An outcome whose ticket carries
  another generation is dropped; so is a probe outcome whose lease already expired.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable
from typing import Final, Literal

import attrs
from attrs import field, frozen

from ._validators import failure, integer, number, shown as shown_value
from .exceptions import ConfigurationError
from .records import (
    _MAX_KEY_LENGTH,
    Admission,
    CircuitBreakerState,
    CircuitState,
    Outcome,
    OutcomeReport,
    Ticket,
    _trusted_state_evolve,
)

_CLOSED: Final = CircuitState.CLOSED
_DISABLED: Final = CircuitState.DISABLED

__all__ = [
    "MAX_KEY_LENGTH",
    "SHOWN_KEY",
    "CLOCK_STEP",
    "BreakerPolicy",
    "admit",
    "apply_outcome",
    "apply_outcomes",
    "as_of",
    "checked_key",
    "extends_open",
    "force",
    "initial_state",
    "reset",
    "shown",
    "unstepped",
]


_fail = failure(ConfigurationError, owner="BreakerPolicy")
_positive = number(_fail, low=0, low_open=True, why="must be > 0", finite_why="must be finite")
_positive_int = integer(_fail, low=1, why="must be an integer >= 1")
_bucket_count = integer(
    _fail,
    low=1,
    high=1_000_000,
    why="must be an integer >= 1",
    high_why="must be at most 1,000,000",
)
_rate = number(_fail, low=0, low_open=True, high=1, finite=False, why="must be in (0, 1]")
_non_negative = number(_fail, low=0, finite=False, why="must be >= 0")


MIN_BUCKET_SECONDS = 1e-6
"""The shortest window bucket (``window_seconds / window_buckets``): bucket numbers (the
time divided by it) then stay below 2**53, exact in every store, until the year 2255."""


@frozen(kw_only=True)
class BreakerPolicy:
    """
    When a circuit trips, how long it stays open, and how it recovers.

    Defaults: 5 consecutive failures, 60 s recovery and 1 half-open probe; after
    resilience4j / Envoy, a 60 s window of 6 buckets, at least 10 calls and a 50%
    failure rate to trip on rate, and open time growing with repeated trips up to a
    cap.  See each field below.

    Raises:
        ConfigurationError: an invalid field, a ``backoff`` other than ``"linear"`` or
            ``"exponential"``, ``max_recovery_seconds`` below ``recovery_seconds``, or a
            window bucket (``window_seconds / window_buckets``) under a microsecond.
    """

    consecutive_failures: int = field(default=5, validator=_positive_int)
    """Trip after this many failures in a row."""
    failure_rate_threshold: float = field(default=0.5, validator=_rate)
    """Trip when the window's failure rate reaches this, given ``minimum_calls``."""
    minimum_calls: int = field(default=10, validator=_positive_int)
    """The failure-rate rule needs at least this many calls in the window."""
    window_seconds: float = field(default=60.0, validator=_positive)
    """The failure-rate window, in ``window_buckets`` buckets of at least a microsecond."""
    window_buckets: int = field(default=6, validator=_bucket_count)
    recovery_seconds: float = field(default=60.0, validator=_positive)
    """Open time after the first trip."""
    max_recovery_seconds: float = field(default=600.0, validator=_positive)
    """Cap on the open time however often the circuit trips."""
    backoff: Literal["linear", "exponential"] = "linear"
    healthy_decay_seconds: float = field(default=300.0, validator=_positive)
    """Each such span spent closed forgets one earlier trip; time forced open (by hand or
    by a fatal error) or disabled is not counted."""
    half_open_probes: int = field(default=1, validator=_positive_int)
    probe_lease_seconds: float = field(default=120.0, validator=_positive)
    """
    An unreported probe frees its slot after this long.  Keep it above the longest
    request the breaker guards (the executor's default per-attempt timeout is 60 s): a
    probe that answers after its lease expired is not counted.
    """
    fatal_open_seconds: float = field(default=300.0, validator=_positive)
    """How long a 401/403/404 holds the circuit in FORCED_OPEN."""
    min_retry_after_open: float = field(default=1.0, validator=_non_negative)
    """
    A 429 whose Retry-After is at least this opens the circuit at once for exactly that
    long, without counting a trip (if the same 429 completes a failure streak or rate,
    the circuit trips and opens for the longer of the two).  A shorter one is an
    ordinary failure.
    """
    max_retry_after_open: float = field(default=600.0, validator=_positive)
    """
    The longest a 429's Retry-After holds a circuit open: `CircuitBreaker` caps longer
    hints (a day, a date in 2099, ``1e300``) at this many seconds and logs the rest as a
    hint, so one answer cannot close a provider fleet-wide for long.
    """

    def __attrs_post_init__(self) -> None:
        if not self.bucket_seconds >= MIN_BUCKET_SECONDS:
            raise ConfigurationError(
                "BreakerPolicy.window_seconds / window_buckets (a window bucket's length) "
                f"must be at least {MIN_BUCKET_SECONDS:g} s, got "
                f"{shown_value(self.window_seconds)} / {shown_value(self.window_buckets)}"
            )
        if self.backoff not in ("linear", "exponential"):
            raise ConfigurationError(
                "BreakerPolicy.backoff must be 'linear' or 'exponential', "
                f"got {shown_value(self.backoff)}"
            )
        if self.max_recovery_seconds < self.recovery_seconds:
            raise ConfigurationError(
                "BreakerPolicy.max_recovery_seconds "
                f"({self.max_recovery_seconds}) must be >= recovery_seconds "
                f"({self.recovery_seconds})"
            )

    @property
    def bucket_seconds(self) -> float:
        return self.window_seconds / self.window_buckets

    def open_seconds(self, trips: int) -> float:
        """Open time after the ``trips``-th recent trip (1-based), capped."""
        k = max(1, trips)
        if self.backoff == "exponential":
            raw = self.recovery_seconds * (2.0 ** min(k - 1, 62))
        else:
            raw = self.recovery_seconds * k
        return min(raw, self.max_recovery_seconds)


def initial_state(key: str, now: float | None = None) -> CircuitBreakerState:
    """The state of a key never seen: CLOSED, generation 0."""
    return CircuitBreakerState(key=key, updated_at_ts=now)


CLOCK_STEP: Final = 1.0
"""
Seconds a key's last write (``updated_at_ts``) may lie ahead of ``now`` before it is
taken for a wall clock stepped back (`unstepped`); less is the jitter of clocks read by
processes that share a store, waiting their turn for its lock.
"""


def unstepped(
    state: CircuitBreakerState, now: float, policy: BreakerPolicy | None = None
) -> CircuitBreakerState:
    """
    ``state`` with its times moved back by how far its last write lies ahead of ``now``
    when that is more than `CLOCK_STEP` (the wall clock stepped back since): the open
    end, probe leases' ends, when it opened, closed and last failed, and, given the
    ``policy`` it was written under, the window's buckets (by as many buckets as lie
    between the last write's and ``now``'s); ``updated_at_ts`` is set to ``now``.  Each
    time thus keeps the age, or an end the time left, it had at that write.  ``state``
    itself otherwise, and when it holds no time to move (DISABLED, FORCED_OPEN until a
    reset, HALF_OPEN without a lease out, CLOSED without a ``policy``).
    """
    last = state.updated_at_ts
    if last is None or not last - now > CLOCK_STEP:
        return state
    s = state.state
    if s is _DISABLED or (s is _CLOSED and policy is None):
        return state
    if s is not _CLOSED and state.open_until_ts is None and not state.leases:
        return state
    back = last - now

    def moved(t: float | None) -> float | None:
        return None if t is None else max(0.0, t - back)

    window = state.window
    if policy is not None and window:
        buckets = _bucket(policy, last) - _bucket(policy, now)
        window = tuple((b - buckets, calls, failed) for b, calls, failed in window)
    return _trusted_state_evolve(
        state,
        window=window,
        opened_at_ts=moved(state.opened_at_ts),
        open_until_ts=moved(state.open_until_ts),
        closed_at_ts=moved(state.closed_at_ts),
        last_failure_ts=moved(state.last_failure_ts),
        leases=tuple((lease_id, max(0.0, ends - back)) for lease_id, ends in state.leases),
        updated_at_ts=now,
    )


def _bucket(policy: BreakerPolicy, now: float) -> int:
    return math.floor(now / policy.bucket_seconds)


def _live_window(
    state: CircuitBreakerState, policy: BreakerPolicy, now: float
) -> tuple[tuple[int, int, int], ...]:
    oldest = _bucket(policy, now) - policy.window_buckets + 1
    return tuple(b for b in state.window if b[0] >= oldest)


def _add_to_window(
    window: tuple[tuple[int, int, int], ...], bucket: int, failed: bool, count: int = 1
) -> tuple[tuple[int, int, int], ...]:
    failures = count if failed else 0
    if window and window[-1][0] == bucket:
        b, calls, failed_before = window[-1]
        return (*window[:-1], (b, calls + count, failed_before + failures))
    return (*window, (bucket, count, failures))


def _closed_successes(
    state: CircuitBreakerState, policy: BreakerPolicy, count: int, now: float
) -> CircuitBreakerState:
    """``count`` successes of the current generation in CLOSED, as one step."""
    return _closed_success_runs(state, policy, ((_bucket(policy, now), count),), now)


def _closed_success_runs(
    state: CircuitBreakerState,
    policy: BreakerPolicy,
    runs: Iterable[tuple[int, int]] | Iterable[list[int]],
    now: float,
) -> CircuitBreakerState:
    """
    Internal: runs of successes of the current generation in CLOSED, each ``(bucket,
    count)`` (the window bucket of its time), applied in order as one step: the state
    `_closed_successes` gives applied run by run, the last at ``now`` (each run sets
    what the one before set, but for the window, which each run steps on).
    """
    window = state.window
    for bucket, count in runs:
        oldest = bucket - policy.window_buckets + 1  # as _live_window
        window = _add_to_window(tuple(b for b in window if b[0] >= oldest), bucket, False, count)
    # every value below is valid as given (ints from a valid window, the clock's time)
    return _trusted_state_evolve(state, consecutive_failures=0, window=window, updated_at_ts=now)


def _healthy_since(state: CircuitBreakerState, now: float) -> float | None:
    """
    When ``state``'s healthy time, which decays its trips, began as a clock running at
    ``now``: ``closed_at_ts`` while CLOSED; ``now`` less the healthy time it had when
    forced by hand (`force`), which holds it paused: at ``opened_at_ts`` when forced
    open (FORCED_OPEN with ``closed_at_ts`` set, and the HALF_OPEN that follows), at
    ``updated_at_ts`` when DISABLED (which writes nothing else); ``None`` when there is
    none (OPEN, and FORCED_OPEN by a fatal error: their trips decayed when they opened).
    """
    closed = state.closed_at_ts
    s = state.state
    if closed is None or s is _CLOSED:
        return closed
    paused = state.updated_at_ts if s is _DISABLED else state.opened_at_ts
    return now - max(0.0, (closed if paused is None else paused) - closed)


def _decayed_trips(state: CircuitBreakerState, policy: BreakerPolicy, now: float) -> int:
    since = _healthy_since(state, now)
    if state.open_count == 0 or since is None:
        return state.open_count
    healthy = max(0.0, now - since)
    forgotten = healthy / policy.healthy_decay_seconds  # inf for a tiny decay: all of them
    if forgotten >= state.open_count:
        return 0
    return state.open_count - math.floor(forgotten)


def _holds_off(policy: BreakerPolicy, outcome: Outcome, retry_after: float | None) -> bool:
    """True for a 429 whose Retry-After (at least ``min_retry_after_open``) opens at once."""
    return (
        outcome is Outcome.RATE_LIMITED
        and retry_after is not None
        and retry_after >= policy.min_retry_after_open
    )


def _open(
    state: CircuitBreakerState,
    policy: BreakerPolicy,
    now: float,
    *,
    retry_after: float | None,
    error: str | None,
    reason: str,
    trip: bool = True,
) -> CircuitBreakerState:
    """
    OPEN from ``now``.  A trip (``trip=True``) counts one more recent trip and opens for
    `BreakerPolicy.open_seconds` of them, or for ``retry_after`` if that is longer; a
    rate limit alone (``trip=False``) opens for exactly ``retry_after`` and leaves the
    trip count as it is (decayed), so routine 429s never lengthen later open times.
    """
    trips = _decayed_trips(state, policy, now)
    if trip:
        trips += 1
        until = now + policy.open_seconds(trips)
        if retry_after is not None:
            until = max(until, now + retry_after)
    else:
        assert retry_after is not None
        until = now + retry_after
    return attrs.evolve(
        state,
        state=CircuitState.OPEN,
        generation=state.generation + 1,
        open_count=trips,
        opened_at_ts=now,
        closed_at_ts=None,
        open_until_ts=until,
        leases=(),
        probe_successes=0,
        last_error=error if error is not None else state.last_error,
        reason=reason,
        updated_at_ts=now,
    )


def _close(state: CircuitBreakerState, now: float) -> CircuitBreakerState:
    """CLOSED with fresh counts; trips decay from ``now`` on, or go on decaying from
    where a manual force held them (`_healthy_since`)."""
    since = _healthy_since(state, now)
    return attrs.evolve(
        state,
        state=CircuitState.CLOSED,
        generation=state.generation + 1,
        consecutive_failures=0,
        window=(),
        opened_at_ts=None,
        open_until_ts=None,
        closed_at_ts=now if since is None else since,
        leases=(),
        probe_successes=0,
        reason=None,
        updated_at_ts=now,
    )


def _force_open(
    state: CircuitBreakerState,
    now: float,
    until: float | None,
    reason: str,
    error: str | None,
    *,
    by_hand: bool = False,
) -> CircuitBreakerState:
    """
    FORCED_OPEN from ``now``.  Its time is no healthy time: forced ``by_hand`` (`force`),
    the healthy time the key had is held, paused at ``opened_at_ts`` (`_healthy_since`);
    by a fatal error, whose caller decayed the trips first, it is dropped.
    """
    if state.state is CircuitState.FORCED_OPEN and state.open_until_ts is not None:
        # never shorten: a second fatal error can only extend the forced period
        until = None if until is None else max(until, state.open_until_ts)
    return attrs.evolve(
        state,
        state=CircuitState.FORCED_OPEN,
        generation=state.generation + 1,
        opened_at_ts=now,
        open_until_ts=until,
        # time spent forced open is not healthy time: trips decay only while CLOSED
        closed_at_ts=_healthy_since(state, now) if by_hand else None,
        leases=(),
        probe_successes=0,
        last_error=error if error is not None else state.last_error,
        reason=reason,
        updated_at_ts=now,
    )


def _to_half_open(state: CircuitBreakerState, now: float) -> CircuitBreakerState:
    return attrs.evolve(
        state,
        state=CircuitState.HALF_OPEN,
        generation=state.generation + 1,
        leases=(),
        probe_successes=0,
        updated_at_ts=now,
    )


def admit(
    state: CircuitBreakerState | None,
    policy: BreakerPolicy,
    now: float,
    *,
    key: str | None = None,
    new_lease_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> tuple[CircuitBreakerState, Admission]:
    """
    Decide whether one call may go ahead; return the new state and the admission.

    CLOSED and DISABLED admit with a ticket of the current generation.  OPEN and
    FORCED_OPEN reject with ``retry_after`` until ``open_until`` (FORCED_OPEN without
    an end rejects with ``retry_after=None``); the first call at or after it moves the
    circuit to HALF_OPEN.  HALF_OPEN first drops expired leases, then grants a lease if
    fewer than ``half_open_probes`` are out, else rejects until the earliest lease
    expires.  Times a wall clock stepped back left ahead of ``now`` are moved back first
    (`unstepped`; a CLOSED key's are moved by its next outcome, as admitting it writes
    nothing).
    """
    if state is None:
        if key is None:
            raise ValueError("admit() needs a state or a key")
        state = initial_state(key, now)
    s = state.state
    if s is CircuitState.CLOSED or s is CircuitState.DISABLED:
        # admitting writes nothing here: the window moves with the next outcome
        return state, Admission(
            admitted=True,
            state=state,
            ticket=Ticket(key=state.key, generation=state.generation),
        )
    state = unstepped(state, now, policy)
    if s is CircuitState.OPEN or s is CircuitState.FORCED_OPEN:
        until = state.open_until_ts
        if until is None or now < until:
            retry = None if until is None else until - now
            return state, Admission(admitted=False, state=state, retry_after=retry)
        state = _to_half_open(state, now)
    # HALF_OPEN
    live = tuple(lease for lease in state.leases if lease[1] > now)
    if len(live) < policy.half_open_probes:
        lease_id = new_lease_id()
        expires = now + policy.probe_lease_seconds
        state = attrs.evolve(state, leases=(*live, (lease_id, expires)), updated_at_ts=now)
        return state, Admission(
            admitted=True,
            state=state,
            ticket=Ticket(
                key=state.key,
                generation=state.generation,
                lease_id=lease_id,
                lease_expires_ts=expires,
            ),
        )
    if live != state.leases:
        state = attrs.evolve(state, leases=live, updated_at_ts=now)
    retry = min(lease[1] for lease in live) - now
    return state, Admission(admitted=False, state=state, retry_after=retry)


def extends_open(
    state: CircuitBreakerState, outcome: Outcome, retry_after: float | None, now: float
) -> bool:
    """
    True when a rate-limit outcome would hold an already open circuit longer: the
    circuit is OPEN or FORCED_OPEN with an end, and ``now + retry_after`` is later.
    """
    return (
        outcome is Outcome.RATE_LIMITED
        and retry_after is not None
        and (state.state is CircuitState.OPEN or state.state is CircuitState.FORCED_OPEN)
        and state.open_until_ts is not None
        and now + retry_after > state.open_until_ts
    )


def apply_outcome(
    state: CircuitBreakerState | None,
    policy: BreakerPolicy,
    report: OutcomeReport,
    now: float,
) -> CircuitBreakerState:
    """
    Apply one outcome reported for ``report.ticket``; return the new state.

    A ticket of another generation changes nothing, with one exception: a 429 from
    before the circuit opened still says how long the provider wants callers away, so
    an OPEN (or time-limited FORCED_OPEN) circuit is held until at least
    ``now + retry_after`` (never shortened; no transition, the generation stays).  See
    the module docstring for what each outcome class does in each state.  Times a wall
    clock stepped back left ahead of ``now`` are moved back first (`unstepped`), so the
    outcome is judged, and the state written, by the times the key had left.
    """
    ticket = report.ticket
    state = initial_state(ticket.key, now) if state is None else unstepped(state, now, policy)
    if ticket.generation != state.generation:
        return _other_generation(state, report, now)
    s = state.state
    if s is CircuitState.HALF_OPEN:
        return _half_open_outcome(state, policy, report, now)
    if s is CircuitState.CLOSED:
        return _closed_outcome(state, policy, report, now)
    # DISABLED never trips; OPEN / FORCED_OPEN issue no tickets of their own generation
    return state


def _other_generation(
    state: CircuitBreakerState, report: OutcomeReport, now: float
) -> CircuitBreakerState:
    """An outcome of another generation: dropped, unless it holds an open circuit longer."""
    if report.ticket.generation < state.generation and extends_open(
        state, report.outcome, report.retry_after, now
    ):
        assert report.retry_after is not None
        return attrs.evolve(state, open_until_ts=now + report.retry_after, updated_at_ts=now)
    return state


def _fatal(
    state: CircuitBreakerState, policy: BreakerPolicy, report: OutcomeReport, now: float
) -> CircuitBreakerState:
    """
    A fatal outcome: FORCED_OPEN for ``fatal_open_seconds`` with the error as reason.
    The trips that the time closed until now forgot are forgotten for good (the forced
    period stops that time: it is not healthy time).
    """
    decayed = _decayed_trips(state, policy, now)
    return _force_open(
        attrs.evolve(state, last_failure_ts=now, open_count=decayed),
        now,
        now + policy.fatal_open_seconds,
        report.error or "fatal error",
        report.error,
    )


def _half_open_outcome(
    state: CircuitBreakerState, policy: BreakerPolicy, report: OutcomeReport, now: float
) -> CircuitBreakerState:
    """A probe's outcome in HALF_OPEN (of the current generation)."""
    lease_id = report.ticket.lease_id
    lease = next((le for le in state.leases if le[0] == lease_id), None)
    if lease is None or lease[1] <= now:
        # not a probe of this half-open period, or its lease expired: too late to count
        return state
    remaining = tuple(le for le in state.leases if le[0] != lease_id)
    outcome = report.outcome
    if outcome is Outcome.SUCCESS:
        successes = state.probe_successes + 1
        if successes >= policy.half_open_probes:
            return _close(state, now)
        return attrs.evolve(state, leases=remaining, probe_successes=successes, updated_at_ts=now)
    if outcome is Outcome.FATAL:
        return _fatal(state, policy, report, now)
    if outcome.is_failure:
        held_off = _holds_off(policy, outcome, report.retry_after)
        return _open(
            attrs.evolve(state, last_failure_ts=now),
            policy,
            now,
            retry_after=report.retry_after,
            error=report.error,
            reason=(
                f"half-open probe rate limited (Retry-After {report.retry_after:g}s)"
                if held_off
                else "half-open probe failed"
            ),
            trip=not held_off,
        )
    # ignored / cancelled / rejected / not_sent: return the lease, learn nothing
    return attrs.evolve(state, leases=remaining, updated_at_ts=now)


def _closed_outcome(
    state: CircuitBreakerState, policy: BreakerPolicy, report: OutcomeReport, now: float
) -> CircuitBreakerState:
    """An outcome in CLOSED (of the current generation): count it, trip if a rule says so."""
    outcome = report.outcome
    if outcome is Outcome.SUCCESS:
        return _closed_successes(state, policy, 1, now)
    if outcome is Outcome.FATAL:
        return _fatal(state, policy, report, now)
    if not outcome.is_failure:
        return state
    window = _add_to_window(_live_window(state, policy, now), _bucket(policy, now), True)
    streak = state.consecutive_failures + 1
    state = attrs.evolve(
        state,
        consecutive_failures=streak,
        window=window,
        last_failure_ts=now,
        last_error=report.error if report.error is not None else state.last_error,
        updated_at_ts=now,
    )
    retry_after = report.retry_after
    reason = _trip_reason(policy, streak, window)
    if reason is not None:
        return _open(state, policy, now, retry_after=retry_after, error=report.error, reason=reason)
    if _holds_off(policy, outcome, retry_after):
        return _open(
            state,
            policy,
            now,
            retry_after=retry_after,
            error=report.error,
            reason=f"rate limited (Retry-After {retry_after:g}s)",
            trip=False,
        )
    return state


def _trip_reason(
    policy: BreakerPolicy, streak: int, window: tuple[tuple[int, int, int], ...]
) -> str | None:
    """
    Why a CLOSED circuit that just counted a failure trips, or ``None`` if no rule says
    so: the failure streak, or the window's failure rate (checked in this order).
    """
    if streak >= policy.consecutive_failures:
        return f"{streak} consecutive failures"
    calls = sum(b[1] for b in window)
    failures = sum(b[2] for b in window)
    if calls >= policy.minimum_calls and failures / calls >= policy.failure_rate_threshold:
        return f"failure rate {failures}/{calls} over {policy.window_seconds:g}s"
    return None


def apply_outcomes(
    state: CircuitBreakerState | None,
    policy: BreakerPolicy,
    reports: tuple[OutcomeReport, ...] | list[OutcomeReport],
    now: float,
) -> CircuitBreakerState:
    """
    Apply several outcomes in order, as one step (used for written-behind successes).

    The result is exactly that of calling `apply_outcome` for each report in turn; a
    run of CLOSED successes for the current generation is applied in one step, so a
    batch of a thousand written-behind successes costs one state update, not a thousand.
    """
    if state is None:
        if not reports:
            raise ValueError("apply_outcomes() needs a state or at least one report")
        state = initial_state(reports[0].ticket.key, now)
    else:
        state = unstepped(state, now, policy)
    i, n = 0, len(reports)
    while i < n:
        report = reports[i]
        ticket = report.ticket
        if (
            report.outcome is Outcome.SUCCESS
            and state.state is CircuitState.CLOSED
            and ticket.generation == state.generation
        ):
            j = i + 1
            while j < n and reports[j] is report:  # the breaker repeats one report object
                j += 1
            while (
                j < n
                and reports[j].outcome is Outcome.SUCCESS
                and reports[j].ticket.generation == state.generation
            ):
                j += 1
            state = _closed_successes(state, policy, j - i, now)
            i = j
            continue
        state = apply_outcome(state, policy, report, now)
        i += 1
    return state


def force(
    state: CircuitBreakerState | None,
    target: CircuitState,
    now: float,
    *,
    key: str | None = None,
    until: float | None = None,
    reason: str | None = None,
) -> CircuitBreakerState:
    """
    Put the circuit in ``target`` by hand: FORCED_OPEN (until ``until`` or a reset),
    DISABLED (admit everything, never trip), or CLOSED (fresh counts).  Always a
    transition: the generation increases, so outstanding tickets stop counting.  The
    trips' decay is kept: the healthy time the key had counts on once it is closed
    again, the time forced open not at all (`_healthy_since`).
    """
    if state is None:
        if key is None:
            raise ValueError("force() needs a state or a key")
        state = initial_state(key, now)
    else:
        state = unstepped(state, now)  # a forced end is never shortened: by the time left
    if target is CircuitState.FORCED_OPEN:
        return _force_open(state, now, until, reason or "forced open", None, by_hand=True)
    if target is CircuitState.CLOSED:
        return attrs.evolve(_close(state, now), reason=reason)
    if target is CircuitState.DISABLED:
        return attrs.evolve(
            state,
            state=CircuitState.DISABLED,
            generation=state.generation + 1,
            leases=(),
            probe_successes=0,
            opened_at_ts=None,
            open_until_ts=None,
            closed_at_ts=_healthy_since(state, now),
            reason=reason or "disabled",
            updated_at_ts=now,
        )
    raise ConfigurationError(
        f"cannot force a circuit to {target.value!r}; use forced_open, disabled or closed"
    )


def as_of(state: CircuitBreakerState, policy: BreakerPolicy, now: float) -> CircuitBreakerState:
    """
    ``state`` as a status shows it at ``now``: its times moved back by a wall clock's
    step back (`unstepped`), probe leases that expired and window buckets that left
    ``policy``'s window dropped, as the store's next operation on the key does.
    Everything else is as stored: the state and generation (an OPEN circuit whose end
    has come reads OPEN, `CircuitBreakerState.open_ended`), the failure streak, the
    open end.  ``state`` itself when nothing is moved or dropped.
    """
    moved = unstepped(state, now, policy)
    leases = tuple(lease for lease in moved.leases if lease[1] > now)
    window = _live_window(moved, policy, now)
    if moved is state and leases == state.leases and window == state.window:
        return state
    state = moved
    return _trusted_state_evolve(state, leases=leases, window=window)


def reset(state: CircuitBreakerState | None, now: float, *, key: str) -> CircuitBreakerState:
    """
    Return the key to a fresh CLOSED state, forgetting trips, and bump the generation so
    tickets issued before the reset no longer count (a key never written reads as
    generation 0: it gets generation 1).
    """
    generation = 1 if state is None else state.generation + 1
    return CircuitBreakerState(key=key, generation=generation, closed_at_ts=now, updated_at_ts=now)


SHOWN_KEY = 100
"""Characters of a key's repr a log line or a message shows (a store may hold long keys)."""


def shown(key: object) -> str:
    """``key``'s repr for a log line or a message, cut to `SHOWN_KEY` characters (a cut
    key says how long it is)."""
    text = repr(key)
    if len(text) <= SHOWN_KEY:
        return text
    size = f" ({len(key):,} characters)" if isinstance(key, str) else ""
    return f"{text[: SHOWN_KEY - 3]}...{size}"


MAX_KEY_LENGTH = _MAX_KEY_LENGTH
"""
The longest breaker key, in characters (a ``provider:model`` key is far shorter): every
store holds and announces a key this long (PostgreSQL indexes at most about 2,700 bytes;
a character is up to 4 bytes in UTF-8).  `ModelInfo` refuses a model whose
``provider:id`` would be longer.
"""


def checked_key(key: object, name: str = "a breaker key") -> str:
    """
    ``key`` if every store can hold it: a non-empty string of at most `MAX_KEY_LENGTH`
    characters, without NUL, that UTF-8 can encode (no lone surrogates, as
    ``os.fsdecode`` leaves for undecodable bytes).

    Raises:
        ConfigurationError: Any other ``key`` (``name`` says what it is).
    """
    if not isinstance(key, str) or not key:
        raise ConfigurationError(f"{name} must be a non-empty string, got {shown(key)}")
    if len(key) > MAX_KEY_LENGTH:
        raise ConfigurationError(
            f"{name} must be at most {MAX_KEY_LENGTH} characters, got {shown(key)}"
        )
    if "\x00" in key:
        raise ConfigurationError(f"{name} must not contain NUL characters, got {shown(key)}")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError(
                f"{name} must be text UTF-8 can encode (no lone surrogates, such as "
                f"os.fsdecode leaves for undecodable bytes), got {shown(key)}"
            ) from None
    return key
