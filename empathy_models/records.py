"""
Immutable records: what a call was, how a model performs, what a breaker is doing,
and why the router chose a model.

Every record is an attrs ``@frozen`` slotted class with keyword-only fields.  Invariants
are checked at construction and violations raise `RecordValidationError` naming the
field and the value.  Datetimes must be timezone-aware and are normalized to UTC; a
naive datetime is rejected rather than guessed.  Serialization lives in
`empathy_models.serialization`; the ``to_dict`` / ``from_dict`` methods here are thin
wrappers around it.
"""

from __future__ import annotations

import enum
import math
import sys
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

import attrs
from attrs import field, frozen

from ._fast import trusted_constructor, trusted_evolver
from ._validators import (
    check,
    failure,
    instance_of,
    integer,
    number,
    optional_str,
    plain_number,
    shown,
    text,
)
from .exceptions import RecordValidationError
from .serialization import JSONScalar, from_dict, register_enums, register_records, to_dict

__all__ = [
    "Admission",
    "CandidateEvaluation",
    "CircuitBreakerState",
    "CircuitState",
    "ConstraintStatus",
    "LLMCallRecord",
    "ModelPerformance",
    "ModelTier",
    "Outcome",
    "OutcomeReport",
    "RoutingDecision",
    "Ticket",
    "utc_now",
    "wilson_interval",
]


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class ModelTier(enum.StrEnum):
    """Capability and price band of a model."""

    CHEAP = "cheap"
    CAPABLE = "capable"
    PREMIUM = "premium"


class Outcome(enum.StrEnum):
    """
    The class of one attempt's result; it decides what the breaker and router learn.

    ========================  =================================  ===================
    class                     examples                           counts as
    ========================  =================================  ===================
    ``success``               2xx                                success
    ``failure``               timeout, connection error, 5xx     failure
    ``rate_limited``          429                                failure (+ Retry-After)
    ``fatal``                 401, 403, 404 model not found      failure; breaker forced open
    ``ignored``               400, context window, policy        neither
    ``cancelled``             the caller cancelled; the run's    neither
                              deadline cut the call short
                              before it had 5 s
    ``rejected``              the circuit breaker said no        neither
    ``not_sent``              failed on our side before sending  neither
                              (no API key, local configuration)
    ``cache_hit``             answered from the response cache   neither
                              (no provider called, cost 0)
    ========================  =================================  ===================

    Only the first four are *samples* (`is_sample`): the router's statistics and the
    breaker learn from them alone.  ``not_sent`` exists so that a worker's own
    misconfiguration is recorded without lowering a model's success rate for every
    worker that routes on the same telemetry; a call the run's deadline cut short
    (rather than the model's own per-attempt timeout) before it had 5 s is
    ``cancelled`` for the same reason: a fallback model left a sliver of a deadline is
    not blamed for it.  Cut after 5 s or more it is a ``failure`` (a timeout): a model
    that hangs is found out by runs whose deadline is short.
    """

    SUCCESS = "success"
    FAILURE = "failure"
    RATE_LIMITED = "rate_limited"
    FATAL = "fatal"
    IGNORED = "ignored"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    NOT_SENT = "not_sent"
    CACHE_HIT = "cache_hit"

    @property
    def is_sample(self) -> bool:
        """True when the outcome says something about the model's health."""
        return self in _SAMPLE_OUTCOMES

    @property
    def is_failure(self) -> bool:
        """True for ``failure``, ``rate_limited`` and ``fatal``."""
        return self in _FAILURE_OUTCOMES


_SAMPLE_OUTCOMES = frozenset(
    {Outcome.SUCCESS, Outcome.FAILURE, Outcome.RATE_LIMITED, Outcome.FATAL}
)
_FAILURE_OUTCOMES = frozenset({Outcome.FAILURE, Outcome.RATE_LIMITED, Outcome.FATAL})


class CircuitState(enum.StrEnum):
    """State of one circuit breaker key."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


class ConstraintStatus(enum.StrEnum):
    """How a candidate stands against a routing constraint (see `empathy_models.scoring`)."""

    ELIGIBLE = "eligible"
    UNPROVEN = "unproven"
    REJECTED = "rejected"


# --------------------------------------------------------------------------- validators


_fail = failure(RecordValidationError)

_INT_LIMIT: Final = 2**63  # SQLite INTEGER and PostgreSQL BIGINT hold less than this
_MAX_FLOAT: Final = sys.float_info.max
_MAX_KEY_LENGTH: Final = 500  # the longest breaker key: `circuit.MAX_KEY_LENGTH` says why

_non_negative = number(
    _fail, low=0, optional=True, type_why="must be a number", why="must be a finite number >= 0"
)
_non_negative_int = integer(
    _fail,
    low=0,
    high=_INT_LIMIT - 1,
    optional=True,
    type_why="must be an integer",
    why="must be >= 0",
    high_why="must be < 2**63",
)
_positive_int = integer(
    _fail, low=1, high=_INT_LIMIT - 1, why="must be an integer >= 1 and < 2**63"
)
_unit_interval = number(
    _fail, low=0, high=1, finite=False, optional=True, why="must be a number between 0 and 1"
)
_non_empty_str = text(_fail)
_optional_str = optional_str(_fail)


def _utc_field(_: object, attribute: attrs.Attribute[Any], value: datetime | None) -> None:
    if value is None:
        return
    if not isinstance(value, datetime):
        raise _fail(attribute.name, value, "must be a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise RecordValidationError(
            f"{attribute.name} is a naive datetime ({value.isoformat()}); "
            "pass a timezone-aware datetime such as datetime.now(UTC)",
            path=attribute.name,
        )


EXPLORATION_KINDS: Final = ("unproven", "warm-up", "budget", "re-probe")
"""What an exploration pick is for (`RoutingDecision.exploration_kind`)."""


def _exploration_kind(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if value not in EXPLORATION_KINDS:
        raise _fail(attribute.name, value, f"must be None or one of {', '.join(EXPLORATION_KINDS)}")
    if not instance.exploration:
        raise _fail(attribute.name, value, "is only set on an exploration decision")


def _to_utc(value: datetime) -> datetime:
    if isinstance(value, datetime) and value.tzinfo is not None and value.utcoffset() is not None:
        try:
            return value.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01 00:00 at UTC+1: before the year 1 in UTC
            raise RecordValidationError(
                f"{value.isoformat()} is outside the datetimes UTC can hold (years 1-9999)"
            ) from None
    return value


def _to_utc_opt(value: datetime | None) -> datetime | None:
    return None if value is None else _to_utc(value)


E = TypeVar("E", bound=enum.StrEnum)


def _convert_enum(enum_type: type[E], name: str, value: object) -> E:
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        try:
            # case-insensitive; "half-open" (the hyphenated spelling) reads as "half_open"
            return enum_type(value.strip().lower().replace("-", "_"))
        except ValueError:
            pass
    allowed = ", ".join(m.value for m in enum_type)
    raise RecordValidationError(
        f"{name} {shown(value)} is not a valid {enum_type.__name__} (expected one of: {allowed})",
        path=name,
    )


def _outcome(value: object) -> Outcome:
    return _convert_enum(Outcome, "outcome", value)


def _tier(value: object) -> ModelTier | None:
    return None if value is None else _convert_enum(ModelTier, "tier", value)


def _circuit_state(value: object) -> CircuitState:
    return _convert_enum(CircuitState, "state", value)


def _circuit_state_opt(value: object) -> CircuitState | None:
    return None if value is None else _convert_enum(CircuitState, "circuit_state", value)


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if isinstance(value, MappingProxyType):
        return value
    if not isinstance(value, Mapping):
        raise RecordValidationError(
            f"metadata must be a mapping, got {shown(value)}", path="metadata"
        )
    return MappingProxyType(dict(value))


def _json_scalars(
    instance: object, attribute: attrs.Attribute[Any], value: Mapping[Any, Any]
) -> None:
    # only what to_dict/from_dict and every backend give back unchanged; a number of
    # another type (numpy's, a Decimal, an int subclass) is kept as the plain one
    plain: dict[str, JSONScalar] | None = None
    for key, item in value.items():
        if not isinstance(key, str):
            raise _fail(attribute.name, dict(value), f"keys must be strings ({shown(key)} is not)")
        cls = item.__class__
        if item is None or cls is str or cls is int or cls is bool:
            continue
        if cls is float and math.isfinite(item):
            continue
        if isinstance(item, str):
            continue
        number = plain_number(item)
        if number is not None and (number.__class__ is int or math.isfinite(number)):
            if plain is None:
                plain = dict(value)
            plain[key] = number
            continue
        raise _fail(
            attribute.name,
            dict(value),
            f"values must be JSON scalars: str, int, finite float, bool or None "
            f"({shown(key)} holds {shown(item)})",
        )
    if plain is not None and instance is not None:
        object.__setattr__(instance, attribute.name, MappingProxyType(plain))


def _constraint_name(name: object) -> str:
    """A constraint's name as a record keeps it: ``str(name)``."""
    try:
        return str(name)
    except ValueError:  # an int past 4,300 digits, which str() refuses
        raise RecordValidationError(
            f"constraints keys must be constraint names, got {shown(name)}", path="constraints"
        ) from None


def _constraint_map(value: Mapping[str, Any] | None) -> Mapping[str, ConstraintStatus]:
    frozen_map = _frozen_mapping(value)
    return MappingProxyType(
        {
            _constraint_name(name): _convert_enum(
                ConstraintStatus, f"constraints[{shown(name)}]", status
            )
            for name, status in frozen_map.items()
        }
    )


def _str_tuple(value: object) -> tuple[str, ...]:
    if (
        isinstance(value, str)
        or not isinstance(value, list | tuple)
        or not all(isinstance(item, str) for item in value)
    ):
        raise RecordValidationError(f"expected a list of strings, got {shown(value)}")
    return tuple(value)


# --------------------------------------------------------------------------- statistics


_wilson_fail = failure(ValueError)
_count = integer(
    _wilson_fail,
    low=0,
    high=_INT_LIMIT - 1,
    type_why="must be an integer",
    why="must be >= 0",
    high_why="must be < 2**63",
)
_quantile = number(_wilson_fail, low=0, low_open=True, why="must be a finite number > 0")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """
    Return the Wilson score interval ``(lower, upper)`` for ``successes`` out of ``n``.

    With ``n == 0`` nothing is known and the interval is ``(0.0, 1.0)``.  For 9/10 at
    z=1.96 the interval is about (0.596, 0.982), so a model with 9 of 10 successes is not
    confidently above 0.9.

    Args:
        successes: how many of the ``n`` calls succeeded.
        n: how many calls.
        z: the normal quantile (1.96: 95%).

    Raises:
        ValueError: ``successes`` or ``n`` not an integer from 0 to 2**63 - 1,
            ``successes`` above ``n`` (for ``n > 0``), or ``z`` not a finite number > 0.
    """
    successes = check(_count, "successes", successes)
    n = check(_count, "n", n)
    z = check(_quantile, "z", z)
    if n > 0 and successes > n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    return wilson_bounds(successes, n, z)


def wilson_bounds(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """
    `wilson_interval` without the argument checks, for sums of weights too (the
    router's evidence): ``(0, 1)`` at n = 0, and the observed rate (clamped to [0, 1])
    always lies within the returned bounds, whatever the rounding.
    """
    if n <= 0.0:
        return (0.0, 1.0)
    p = successes / n
    p = p if p > 0.0 else 0.0
    p = p if p < 1.0 else 1.0
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = p + z2 / (2.0 * n)
    margin = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    lower = (centre - margin) / denom
    lower = lower if lower > 0.0 else 0.0
    lower = lower if lower < p else p
    upper = (centre + margin) / denom
    upper = upper if upper < 1.0 else 1.0
    upper = upper if upper > p else p
    return (lower, upper)


# --------------------------------------------------------------------------- call records


@frozen(kw_only=True)
class LLMCallRecord:
    """
    One attempt at calling a model, successful or not.

    Every attempt the executor makes produces one record: retries and fallbacks each
    get their own, tied together by ``request_id`` and ordered by ``attempt``.  The
    record holds tokens, cost and the price-table version that priced it, latency, the
    outcome class, and the routing and breaker context.  Prompt and response text are
    only present when the caller opted in; they are hidden from ``repr``.
    """

    provider: str = field(validator=_non_empty_str)
    model: str = field(validator=_non_empty_str)
    outcome: Outcome = field(converter=_outcome, validator=instance_of(_fail, Outcome))
    call_id: str = field(factory=lambda: uuid.uuid4().hex, validator=_non_empty_str)
    request_id: str | None = field(default=None, validator=_optional_str)
    timestamp: datetime = field(factory=utc_now, converter=_to_utc, validator=_utc_field)
    workflow: str | None = field(default=None, validator=_optional_str)
    stage: str | None = field(default=None, validator=_optional_str)
    task_type: str = field(default="unknown", validator=_non_empty_str)
    tier: ModelTier | None = field(
        default=None,
        converter=_tier,
        validator=instance_of(_fail, ModelTier, optional=True),
    )
    input_tokens: int = field(default=0, validator=_non_negative_int)
    output_tokens: int = field(default=0, validator=_non_negative_int)
    cost_usd: float = field(default=0.0, validator=_non_negative)
    actual_cost_usd: float | None = field(default=None, validator=_non_negative)
    price_version: str | None = field(default=None, validator=_optional_str)
    latency_ms: float = field(default=0.0, validator=_non_negative)
    ttft_ms: float | None = field(default=None, validator=_non_negative)
    error_type: str | None = field(default=None, validator=_optional_str)
    error_message: str | None = field(default=None, validator=_optional_str)
    status_code: int | None = field(default=None, validator=_non_negative_int)
    attempt: int = field(default=1, validator=_positive_int)
    fallback_used: bool = field(default=False, validator=instance_of(_fail, bool))
    fallback_chain: tuple[str, ...] = field(default=(), converter=_str_tuple)
    original_provider: str | None = field(default=None, validator=_optional_str)
    original_model: str | None = field(default=None, validator=_optional_str)
    exploration: bool = field(default=False, validator=instance_of(_fail, bool))
    #: the router's probability of choosing this model for this request (see
    #: `empathy_models._propensity`; None: not routed, or a fallback route)
    routing_propensity: float | None = field(default=None, validator=_unit_interval)
    breaker_generation: int | None = field(default=None, validator=_non_negative_int)
    circuit_state: CircuitState | None = field(
        default=None,
        converter=_circuit_state_opt,
        validator=instance_of(_fail, CircuitState, optional=True),
    )
    user_id: str | None = field(default=None, validator=_optional_str)
    session_id: str | None = field(default=None, validator=_optional_str)
    metadata: Mapping[str, JSONScalar] = field(
        factory=dict, converter=_frozen_mapping, validator=_json_scalars
    )
    prompt_text: str | None = field(default=None, validator=_optional_str, repr=False)
    response_text: str | None = field(default=None, validator=_optional_str, repr=False)

    @property
    def success(self) -> bool:
        """True when the outcome is ``success``."""
        return self.outcome is Outcome.SUCCESS

    @property
    def retry_count(self) -> int:
        """How many attempts of the same request came before this one (``attempt - 1``).

        ``attempt`` counts 1..N across the whole request, fallback routes included, so
        a request's records sort by it; ``fallback_chain`` tells the routes apart.
        """
        return self.attempt - 1

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        """Return a versioned, JSON-ready dict (see `empathy_models.serialization`)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build a record from `to_dict` output; unknown keys are ignored."""
        return from_dict(data, cls)


_trusted_call_record = trusted_constructor(LLMCallRecord)
"""Internal: `LLMCallRecord` without validation, for the executor's own records."""


@frozen(kw_only=True)
class ModelPerformance:
    """
    Aggregated behaviour of one model for a (workflow, stage) over a time window.

    Only *sample* outcomes count (``success``, ``failure``, ``rate_limited``, ``fatal``);
    ignored, cancelled, rejected and not-sent attempts do not.  Latency percentiles are computed
    over successful calls with the nearest-rank method; costs over every sample.  The time
    to first token (``ttft_p50_ms`` / ``ttft_p95_ms``) is over successful streamed calls
    (those with a ``ttft_ms``); None when there are none.
    """

    model: str = field(validator=_non_empty_str)
    provider: str | None = field(default=None, validator=_optional_str)
    workflow: str | None = field(default=None, validator=_optional_str)
    stage: str | None = field(default=None, validator=_optional_str)
    tier: ModelTier | None = field(
        default=None,
        converter=_tier,
        validator=instance_of(_fail, ModelTier, optional=True),
    )
    sample_size: int = field(default=0, validator=_non_negative_int)
    successes: int = field(default=0, validator=_non_negative_int)
    latency_p50_ms: float | None = field(default=None, validator=_non_negative)
    latency_p95_ms: float | None = field(default=None, validator=_non_negative)
    avg_latency_ms: float | None = field(default=None, validator=_non_negative)
    ttft_p50_ms: float | None = field(default=None, validator=_non_negative)
    ttft_p95_ms: float | None = field(default=None, validator=_non_negative)
    avg_cost_usd: float = field(default=0.0, validator=_non_negative)
    avg_input_tokens: float = field(default=0.0, validator=_non_negative)
    avg_output_tokens: float = field(default=0.0, validator=_non_negative)
    first_seen: datetime | None = field(default=None, converter=_to_utc_opt, validator=_utc_field)
    last_seen: datetime | None = field(default=None, converter=_to_utc_opt, validator=_utc_field)

    def __attrs_post_init__(self) -> None:
        if self.successes > self.sample_size:
            raise RecordValidationError(
                f"successes ({self.successes}) cannot exceed sample_size ({self.sample_size})",
                path="successes",
            )

    @property
    def failures(self) -> int:
        return self.sample_size - self.successes

    @property
    def success_rate(self) -> float:
        """Observed success rate; 0.0 when there are no samples."""
        return self.successes / self.sample_size if self.sample_size else 0.0

    @property
    def success_rate_bounds(self) -> tuple[float, float]:
        """95% Wilson score interval of the success rate."""
        return wilson_interval(self.successes, self.sample_size)

    @property
    def success_rate_lower(self) -> float:
        return self.success_rate_bounds[0]

    @property
    def success_rate_upper(self) -> float:
        return self.success_rate_bounds[1]

    @property
    def quality_score(self) -> float:
        """
        A single comparable figure: the Wilson lower bound in percent, less the average
        cost in cents: a small sample cannot look perfect (the bound is low), and one
        cent of cost weighs one point of success.
        """
        return self.success_rate_lower * 100.0 - self.avg_cost_usd * 100.0

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return from_dict(data, cls)


# --------------------------------------------------------------------------- circuit state


def _lease_tuple(value: object) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, list | tuple):
        raise RecordValidationError(f"leases must be a list, got {shown(value)}", path="leases")
    out: list[tuple[str, float]] = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise RecordValidationError(
                f"each lease must be [lease_id, expires_at], got {shown(item)}", path="leases"
            )
        expires = item[1] if type(item[1]) is float else plain_number(item[1])
        if expires is None or not 0 <= expires <= _MAX_FLOAT:  # (NaN, an infinity)
            raise RecordValidationError(
                f"a lease's expires_at must be a finite number >= 0, got {shown(item)}",
                path="leases",
            )
        out.append((str(item[0]), float(expires)))
    return tuple(out)


def _window_tuple(value: object) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(value, list | tuple):
        raise RecordValidationError(f"window must be a list, got {shown(value)}", path="window")
    out: list[tuple[int, int, int]] = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 3:
            raise RecordValidationError(
                f"each window bucket must be [bucket, calls, failures], got {shown(item)}",
                path="window",
            )
        bucket, calls, failures = item
        if (
            type(bucket) is int
            and type(calls) is int
            and type(failures) is int
            and -_INT_LIMIT <= bucket < _INT_LIMIT
            and 0 <= calls < _INT_LIMIT > failures >= 0
        ):
            out.append((bucket, calls, failures))  # (what every store gives back)
            continue
        bucket, calls, failures = _integer(bucket), _integer(calls), _integer(failures)
        if bucket is None or calls is None or calls < 0 or failures is None or failures < 0:
            raise RecordValidationError(
                "each window bucket must be [bucket, calls, failures], integers (the "
                f"counts >= 0), got {shown(item)}",
                path="window",
            )
        out.append((bucket, calls, failures))
    return tuple(out)


def _integer(value: object) -> int | None:
    """``value`` as an int from -2**63 to 2**63 - 1 (an integer of another type as the
    plain ``int``), or None when it is none (a float, a bool, a string)."""
    number = value if type(value) is int else plain_number(value, reals=False)
    return number if isinstance(number, int) and -_INT_LIMIT <= number < _INT_LIMIT else None


def _ts_to_datetime(ts: float | None) -> datetime | None:
    """UTC epoch seconds as an aware datetime (``None`` stays ``None``); a time beyond
    what a datetime holds (an open period of ``1e300`` seconds) is its latest instant."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.max.replace(tzinfo=UTC)


@frozen(kw_only=True)
class CircuitBreakerState:
    """
    A snapshot of one breaker key, as a store holds it.

    Times are UTC wall-clock seconds since the epoch (``*_ts`` fields) so that
    processes and machines sharing a store agree on them; the datetime properties
    (`opened_at`, `open_until`, `last_failure`) present them as aware UTC datetimes.
    ``generation`` increases by one on every state transition; an outcome reported
    against an older generation is dropped.

    Convenience properties: `failure_count` (consecutive failures), `is_open` (true for
    OPEN, FORCED_OPEN and HALF_OPEN: a half-open circuit still rejects all but its
    probes) and `opened_at`.
    """

    key: str = field(validator=_non_empty_str)
    state: CircuitState = field(
        default=CircuitState.CLOSED,
        converter=_circuit_state,
        validator=instance_of(_fail, CircuitState),
    )
    generation: int = field(default=0, validator=_non_negative_int)
    consecutive_failures: int = field(default=0, validator=_non_negative_int)
    window: tuple[tuple[int, int, int], ...] = field(default=(), converter=_window_tuple)
    open_count: int = field(default=0, validator=_non_negative_int)
    opened_at_ts: float | None = field(default=None, validator=_non_negative)
    open_until_ts: float | None = field(default=None, validator=_non_negative)
    closed_at_ts: float | None = field(default=None, validator=_non_negative)
    """When the healthy time that decays ``open_count`` began (CLOSED); a key forced open
    or disabled by hand keeps it, that time paused (at ``opened_at_ts``, or at
    ``updated_at_ts`` while DISABLED)."""
    last_failure_ts: float | None = field(default=None, validator=_non_negative)
    leases: tuple[tuple[str, float], ...] = field(default=(), converter=_lease_tuple)
    probe_successes: int = field(default=0, validator=_non_negative_int)
    last_error: str | None = field(default=None, validator=_optional_str)
    reason: str | None = field(default=None, validator=_optional_str)
    updated_at_ts: float | None = field(default=None, validator=_non_negative)

    @property
    def failure_count(self) -> int:
        """Consecutive failures since the last success."""
        return self.consecutive_failures

    @property
    def is_open(self) -> bool:
        """True unless the circuit is CLOSED or DISABLED (HALF_OPEN admits probes only)."""
        return self.state in (CircuitState.OPEN, CircuitState.FORCED_OPEN, CircuitState.HALF_OPEN)

    @property
    def opened_at(self) -> datetime | None:
        """When the circuit last opened, as an aware UTC datetime."""
        return _ts_to_datetime(self.opened_at_ts)

    @property
    def open_until(self) -> datetime | None:
        """When an OPEN or FORCED_OPEN circuit may next admit a probe."""
        return _ts_to_datetime(self.open_until_ts)

    @property
    def last_failure(self) -> datetime | None:
        return _ts_to_datetime(self.last_failure_ts)

    def open_ended(self, now: float) -> bool:
        """
        True when an OPEN or FORCED_OPEN circuit's end has come at ``now`` (UTC epoch
        seconds): it still reads as open, and its next admission moves it to HALF_OPEN
        and takes a probe lease (the step is lazy).  False for one held until a reset.
        """
        return (
            (self.state is CircuitState.OPEN or self.state is CircuitState.FORCED_OPEN)
            and self.open_until_ts is not None
            and self.open_until_ts <= now
        )

    @property
    def probes_in_flight(self) -> int:
        """
        Half-open probe leases granted and not yet reported (nor dropped as expired by
        the store's next operation on the key; `CircuitBreaker.get_status` shows live
        ones only).
        """
        return len(self.leases)

    @property
    def window_calls(self) -> int:
        """Calls in the failure-rate window as stored (`CircuitBreaker.get_status`: as of now)."""
        return sum(b[1] for b in self.window)

    @property
    def window_failures(self) -> int:
        """Failures among `window_calls`."""
        return sum(b[2] for b in self.window)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return from_dict(data, cls)

    def with_fields(self, **changes: Any) -> CircuitBreakerState:
        """
        A copy with ``changes``, each converted and validated as the constructor does
        (no field is checked against another, so the rest need no second look): what
        `attrs.evolve` gives, at the cost of the changed fields only.

        Raises:
            TypeError: an unknown field (``key`` cannot change).
            RecordValidationError: a value the constructor would refuse.
        """
        for name, value in changes.items():
            attribute = _STATE_FIELDS.get(name)
            if attribute is None:
                raise TypeError(f"CircuitBreakerState has no changeable field {name!r}")
            if attribute.converter is not None:
                value = changes[name] = attribute.converter(value)  # type: ignore[operator]
            # no instance: a validator given one sets the plain number it found on it
            # (`_validators.number`), which is the copy's to hold, not this state's
            if (
                attribute.validator is not None
                and (plain := attribute.validator(None, attribute, value)) is not None
            ):
                changes[name] = plain
        return _trusted_state_evolve(self, **changes)


_STATE_FIELDS: Final = {a.name: a for a in attrs.fields(CircuitBreakerState) if a.name != "key"}
_trusted_state_evolve = trusted_evolver(CircuitBreakerState)
"""Internal: `attrs.evolve` of a `CircuitBreakerState` without validation (hot paths)."""


@frozen(kw_only=True)
class Ticket:
    """
    Proof of admission, handed back when reporting the outcome.

    ``generation`` is the breaker generation at admission; ``lease_id`` is set for a
    half-open probe.  A ticket from an older generation is ignored by the store.
    """

    key: str
    generation: int
    lease_id: str | None = None
    lease_expires_ts: float | None = None


@frozen(kw_only=True)
class Admission:
    """What a store answers to ``admit``: a ticket, or a rejection with ``retry_after``."""

    admitted: bool
    state: CircuitBreakerState
    ticket: Ticket | None = None
    retry_after: float | None = None


@frozen(kw_only=True)
class OutcomeReport:
    """
    One outcome to apply to a breaker key.

    ``retry_after`` carries a 429's hint in seconds; ``error`` a short description of
    the failure (error class and status, never a key or a prompt).
    """

    ticket: Ticket
    outcome: Outcome = field(converter=_outcome)
    retry_after: float | None = field(default=None, validator=_non_negative)
    error: str | None = None


# --------------------------------------------------------------------------- routing


# Not slotted: the router builds a decision's rows by copying the fields they share
# into each row's ``__dict__`` (~3x faster than setting 20 slots one by one).
@frozen(kw_only=True, slots=False)
class CandidateEvaluation:
    """
    How one candidate model stood in a routing decision.

    ``constraints`` maps each constraint given (``"max_cost"``, ``"max_latency_ms"``,
    ``"min_success_rate"``, ``"max_ttft_ms"``) to its `ConstraintStatus`; ``reasons`` explains every
    status that is not ELIGIBLE, and any exclusion (an open circuit, for example).
    """

    model: str
    provider: str | None = None
    tier: ModelTier | None = field(default=None, converter=_tier)
    sample_size: int = field(default=0, validator=_non_negative_int)
    success_rate: float | None = field(default=None, validator=_unit_interval)
    success_rate_lower: float = field(default=0.0, validator=_unit_interval)
    success_rate_upper: float = field(default=1.0, validator=_unit_interval)
    latency_p50_ms: float | None = field(default=None, validator=_non_negative)
    latency_p95_ms: float | None = field(default=None, validator=_non_negative)
    expected_cost_usd: float | None = field(default=None, validator=_non_negative)
    constraints: Mapping[str, ConstraintStatus] = field(factory=dict, converter=_constraint_map)
    excluded: bool = False
    reasons: tuple[str, ...] = field(default=(), converter=_str_tuple)
    #: decayed weight of the evidence the bounds were computed from (<= sample_size)
    effective_sample_size: float | None = field(default=None, validator=_non_negative)
    #: 95% upper confidence bound of the p95 latency (what ``max_latency_ms`` is held to)
    latency_p95_upper_ms: float | None = field(default=None, validator=_non_negative)
    #: how ``expected_cost_usd`` was obtained: "estimate" (the model's own mean output
    #: tokens, its list prices scaled by what its calls were recorded to cost, billed
    #: failures and prompt caches included: `routing.decide.cost_factor`), "prior" (the
    #: stage's mean, for a model not yet measured, at list prices), "worst_case" or
    #: "observed"
    cost_basis: str | None = None
    #: a change the router detected in this model's success rate, which restarted its
    #: evidence (e.g. "degraded (success rate 0.990 -> 0.812)"); None when none did
    change: str | None = None
    #: when the evidence the bounds are computed from starts (None: the whole window)
    evidence_since: datetime | None = field(default=None, converter=_to_utc_opt)
    #: time to first token of streamed successful calls, p50 and p95 (log-normal fit)
    ttft_p50_ms: float | None = field(default=None, validator=_non_negative)
    ttft_p95_ms: float | None = field(default=None, validator=_non_negative)

    @property
    def status(self) -> ConstraintStatus:
        """REJECTED if excluded or any constraint rejects; else UNPROVEN if any is unproven."""
        if self.excluded or ConstraintStatus.REJECTED in self.constraints.values():
            return ConstraintStatus.REJECTED
        if ConstraintStatus.UNPROVEN in self.constraints.values():
            return ConstraintStatus.UNPROVEN
        return ConstraintStatus.ELIGIBLE


@frozen(kw_only=True)
class RoutingDecision:
    """
    The router's answer: which model, whether it meets every constraint, and why.

    ``policy_applied`` is ``None`` when an eligible candidate was chosen, otherwise the
    no-match policy that acted (``"relax"`` or ``"pinned"``); ``relaxed`` lists the
    constraints dropped (only those the pick needed dropped), in the policy's
    ``relax_order``.  ``exploration`` is true when
    a model was picked to learn about it, and ``exploration_kind`` says why: ``"unproven"``
    (no candidate is proven yet: the likeliest to comply is measured), ``"warm-up"`` (a
    cheaper challenger's first calls, in one stretch), ``"budget"`` (the exploration
    budget measures an unproven model that could beat the pick) or ``"re-probe"`` (a
    rejected or degraded model that would be cheaper is tried again, to see a recovery;
    the executor falls back at once when it fails).  ``change`` is set when the
    decision acted on a detected change: the chosen model, or one that would otherwise
    have been preferred, changed its success rate (the reason says so too).
    """

    model: str = field(validator=_non_empty_str)
    provider: str | None = None
    tier: ModelTier | None = field(default=None, converter=_tier)
    workflow: str | None = None
    stage: str | None = None
    constraints_met: bool = True
    reason: str = ""
    candidates: tuple[CandidateEvaluation, ...] = ()
    exploration: bool = False
    relaxed: tuple[str, ...] = field(default=(), converter=_str_tuple)
    policy_applied: str | None = None
    decided_at: datetime = field(factory=utc_now, converter=_to_utc, validator=_utc_field)
    #: the chosen model's expected cost for this call (see CandidateEvaluation.cost_basis)
    expected_cost_usd: float | None = field(default=None, validator=_non_negative)
    #: the constraints the decision was judged against (None: not constrained)
    max_cost: float | None = None
    max_latency_ms: float | None = None
    min_success_rate: float | None = None
    strict_cost: bool = False
    change: str | None = None
    max_ttft_ms: float | None = None
    exploration_kind: str | None = field(default=None, validator=_exploration_kind)
    # The router may leave ``candidates`` unset and put here a function that builds it;
    # the first read of ``candidates`` calls it once and stores the tuple (see
    # ``__getattr__``), so equality, hashing, repr and to_dict see the same value.
    _candidates_thunk: Callable[[], tuple[CandidateEvaluation, ...]] | None = field(
        default=None, init=False, eq=False, hash=False, repr=False
    )

    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any:
            # only reached when a slot is unset: materialize lazily built candidates
            if name == "candidates":
                thunk = object.__getattribute__(self, "_candidates_thunk")
                if thunk is not None:
                    value = thunk()
                    object.__setattr__(self, "candidates", value)
                    object.__setattr__(self, "_candidates_thunk", None)
                    return value
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}", name=name, obj=self
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return from_dict(data, cls)


# the converter learns these types once, here: records depend on serialization, never
# the other way round
register_enums(Outcome, CircuitState, ModelTier, ConstraintStatus)
register_records(
    LLMCallRecord, ModelPerformance, CircuitBreakerState, CandidateEvaluation, RoutingDecision
)
