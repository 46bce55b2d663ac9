"""
The executor's values: what a caller passes (`ExecutionContext`, `FallbackPolicy`) and
what a run returns (`LLMResponse`, with one `AttemptSummary` per provider call).
Re-exported by `empathy_models` (and `_executor.py`).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs
from attrs import field, frozen

from ._fast import trusted_constructor
from ._validators import (
    failure,
    instance_of,
    integer,
    number,
    plain_number,
    shown,
    text_flaw,
    warn_caller,
)
from .abc import MAX_TOKENS_LIMIT
from .content import ToolCall
from .exceptions import ConfigurationError
from .records import ModelTier, Outcome, RoutingDecision
from .serialization import JSONScalar

__all__ = ["AttemptSummary", "ExecutionContext", "FallbackPolicy", "LLMResponse"]

# --------------------------------------------------------------------------- validators


_ctx_fail = failure(ConfigurationError, owner="ExecutionContext")
_INT64: Final = 2**63
_SCALARS: Final = frozenset({str, int, float, bool})
_fb_fail = failure(ConfigurationError, owner="FallbackPolicy")


def _ctx_str(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _ctx_fail(attribute.name, value, "must be a non-empty string")
    if (flaw := text_flaw(value)) is not None:
        raise _ctx_fail(attribute.name, value, flaw)


def _ctx_opt_str(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise _ctx_fail(attribute.name, value, "must be a string or None")
    if value is not None and (flaw := text_flaw(value)) is not None:
        raise _ctx_fail(attribute.name, value, flaw)


_ctx_positive = number(
    _ctx_fail,
    low=0,
    low_open=True,
    optional=True,
    type_why="must be a number or None",
    why="must be a finite number > 0",
)
_ctx_non_negative = number(
    _ctx_fail,
    low=0,
    optional=True,
    type_why="must be a number or None",
    why="must be a finite number >= 0",
)
_ctx_rate = number(
    _ctx_fail,
    low=0,
    high=1,
    finite=False,
    optional=True,
    why="must be a number between 0 and 1",
)
_ctx_max_tokens = integer(
    _ctx_fail,
    low=1,
    high=MAX_TOKENS_LIMIT,
    why="must be an integer >= 1",
    high_why=f"must be at most {MAX_TOKENS_LIMIT:,}",
)
_ctx_bool = instance_of(_ctx_fail, bool, why="must be True or False")


def _to_tier_opt(value: object) -> ModelTier | None:
    if value is None or isinstance(value, ModelTier):
        return value
    if isinstance(value, str):
        try:
            return ModelTier(value.strip().lower())
        except ValueError:
            pass
    allowed = ", ".join(t.value for t in ModelTier)
    raise ConfigurationError(f"ExecutionContext.tier must be one of {allowed}, got {shown(value)}")


def _copy_metadata(value: Mapping[str, Any] | None) -> Mapping[str, JSONScalar]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"ExecutionContext.metadata must be a mapping, got {shown(value)}")
    copied: dict[str, JSONScalar] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigurationError(
                f"ExecutionContext.metadata keys must be strings, got {shown(key)}"
            )
        if item is not None and item.__class__ not in _SCALARS and not isinstance(item, str):
            # a number of another type (numpy's, a Decimal, an int or float subclass) is
            # recorded as the plain one
            if (number := plain_number(item)) is None:
                raise ConfigurationError(
                    f"ExecutionContext.metadata[{shown(key)}] must be a str, int, float, bool "
                    f"or None, got {shown(item)}"
                )
            item = number
        flaw = text_flaw(key) or (text_flaw(item) if isinstance(item, str) else None)
        if isinstance(item, float) and not math.isfinite(item):
            flaw = "must be a finite number"
        elif isinstance(item, int) and not -_INT64 <= item < _INT64:
            # what every telemetry store keeps as given (a larger one it would clamp)
            flaw = "must be an integer from -2**63 to 2**63 - 1"
        if flaw is not None:
            raise ConfigurationError(
                f"ExecutionContext.metadata[{shown(key)}] {flaw}, got {shown(item)}"
            )
        copied[key] = item
    return MappingProxyType(copied)


# --------------------------------------------------------------------------- values


@frozen(kw_only=True)
class ExecutionContext:
    """
    Who is calling and under which limits; immutable and safe to reuse across calls.

    Args:
        workflow, stage: where the call belongs; the router learns per (workflow, stage),
            so name kinds of work ("support", "triage"), not users or requests: the
            router keeps state for every (workflow, stage, model) it has seen.
        task_type: picks the tier when ``tier`` is not given (normalized:
            ``"FIX_BUG"``, ``"fix-bug"`` and ``"fix bug"`` are the same task); one not
            in `empathy_models.tasks.TaskType` gets the capable tier and a
            `ConfigurationWarning` (none when ``tier`` is given: it only labels the
            records then).
        tier: overrides the task's tier.
        model: pins the first route to this registry model id (bypassing the router);
            fallback then proceeds as usual.  Cannot be combined with constraints.
        max_cost, max_latency_ms, min_success_rate, max_ttft_ms: routing constraints,
            evaluated by the executor's router (a run with constraints and no router
            raises `ConfigurationError`); ``max_ttft_ms`` bounds the p95 time to first
            token of the model's streamed calls (a router is asked for it only when
            set, so a custom router without the argument keeps working); ``max_cost``
            is held against the output cap the request sends (``max_tokens``, or a
            larger one in ``extra_body``).  They govern the first pick; fallback
            routes follow the `FallbackPolicy` (``FallbackPolicy.none()`` for
            strictness).
        on_no_match: passed to the router when set (``"raise"``, ``"relax"`` or a model
            id); ``None`` keeps the router's default.
        max_tokens, temperature, system: passed to the provider (``max_tokens`` capped
            at each model's registry ``max_output_tokens``, which a provider refuses to
            exceed).
        timeout: seconds allowed for one provider call (waiting for a provider slot
            counts against ``deadline`` only); ``None`` leaves only the provider's own
            timeout.  Default 60, the HTTP providers' own default; the provider's
            timeout still applies, so raise both for longer generations.
        deadline: seconds allowed for the whole run (every attempt and every retry wait,
            and every wait for a shared store: the cache, budgets and rate limits, the
            breaker); ``None`` for no overall limit.
        metadata: JSON scalars copied into every record (integers from -2**63 to
            2**63 - 1, what every store keeps as given); the mapping is copied, so later
            changes to the caller's dict do not leak in.
        user_id, session_id: copied into every record.
        record_text: keep prompt and response text in the records (off by default).
        cache_ttl: answer from the executor's response cache when the same request was
            answered less than this many seconds ago, and store this answer for that
            long (100 years at most, `empathy_models.cache.MAX_TTL`; see
            `empathy_models.cache`; needs ``cache=`` on the executor, which warns once
            without, `ConfigurationWarning`).  Only
            ``temperature=0`` calls are cached unless ``cache_sampled`` is true (a
            sampled one warns once per executor).
            Streams too: a hit is replayed as a stream, and a stream that ended whole
            stores its answer (one left early or interrupted, never).
        cache_sampled: cache sampled output too (``temperature`` unset or above 0).
        cache_coalesce: on a miss in a cache store shared by processes (``leases``), take
            the request's lease in the store before asking a model (one write), so that
            the same request's runs in other processes wait for this answer instead of
            asking too; False saves that write (each process then asks on its own).

    Raises:
        ConfigurationError: an invalid value, naming the field and the value.
    """

    workflow: str = field(default="default", validator=_ctx_str)
    stage: str = field(default="default", validator=_ctx_str)
    task_type: str = field(default="unknown", validator=_ctx_str)
    tier: ModelTier | None = field(default=None, converter=_to_tier_opt)
    model: str | None = field(default=None, validator=_ctx_opt_str)
    max_cost: float | None = field(default=None, validator=_ctx_non_negative)
    max_latency_ms: float | None = field(default=None, validator=_ctx_positive)
    min_success_rate: float | None = field(default=None, validator=_ctx_rate)
    on_no_match: str | None = field(default=None, validator=_ctx_opt_str)
    max_tokens: int = field(default=1024, validator=_ctx_max_tokens)
    temperature: float | None = field(default=None, validator=_ctx_non_negative)
    system: str | None = field(default=None, validator=_ctx_opt_str)
    timeout: float | None = field(default=60.0, validator=_ctx_positive)
    deadline: float | None = field(default=None, validator=_ctx_positive)
    metadata: Mapping[str, JSONScalar] = field(factory=dict, converter=_copy_metadata)
    user_id: str | None = field(default=None, validator=_ctx_opt_str)
    session_id: str | None = field(default=None, validator=_ctx_opt_str)
    record_text: bool = field(default=False, validator=_ctx_bool)
    cache_ttl: float | None = field(default=None, validator=_ctx_positive)
    cache_sampled: bool = field(default=False, validator=_ctx_bool)
    cache_coalesce: bool = field(default=True, validator=_ctx_bool)
    max_ttft_ms: float | None = field(default=None, validator=_ctx_positive)

    def __attrs_post_init__(self) -> None:
        if self.model is not None and self.has_constraints:
            raise ConfigurationError(
                f"ExecutionContext.model={self.model!r} pins the model and bypasses routing, "
                "so max_cost / max_latency_ms / min_success_rate / max_ttft_ms cannot be "
                "honoured; "
                "drop either the pin or the constraints"
            )

    @property
    def has_constraints(self) -> bool:
        """True when any routing constraint is set."""
        return (
            self.max_cost is not None
            or self.max_latency_ms is not None
            or self.min_success_rate is not None
            or self.max_ttft_ms is not None
        )


_fb_bool = instance_of(_fb_fail, bool, why="must be True or False")


@frozen(kw_only=True)
class FallbackPolicy:
    """
    Where to go when a route fails: always towards more capability, never cheaper.

    Args:
        max_routes: the most distinct models called in one run (routes rejected by an
            open breaker, and routes whose request was never sent, recorded
            ``not_sent``, cost nothing and do not count).  ``1`` disables fallback.
        escalate: after the candidates of the run's tier, try the models of the higher
            tiers (cheap -> capable -> premium), cheapest first within each.
        larger_context_on_overflow: on `ContextWindowExceededError`, skip to the next
            route whose context window is larger; without one (or when false) the
            error is raised at once.
    """

    max_routes: int = field(
        default=3, validator=integer(_fb_fail, low=1, why="must be an integer >= 1")
    )
    escalate: bool = field(default=True, validator=_fb_bool)
    larger_context_on_overflow: bool = field(default=True, validator=_fb_bool)

    @classmethod
    def none(cls) -> FallbackPolicy:
        """
        One model called only: the first choice, retried per the `RetryPolicy`, no
        fallback once it was called (a route an open circuit refused, or whose request
        was never sent, costs nothing: the next one is tried).
        """
        return cls(max_routes=1, escalate=False, larger_context_on_overflow=False)


@frozen(kw_only=True)
class AttemptSummary:
    """
    One attempt of a run, as the response reports it.

    ``attempt`` matches the ``attempt`` of its `LLMCallRecord` (and ``call_id`` its
    ``call_id``); ``delay_s`` is how long the executor waited after this attempt before
    retrying the same route (``None`` when it did not retry it).
    """

    attempt: int
    call_id: str
    provider: str
    model: str
    outcome: Outcome
    latency_ms: float
    error_type: str | None = None
    status_code: int | None = None
    retry_after: float | None = None
    delay_s: float | None = None


@frozen(kw_only=True)
class LLMResponse:
    """
    The answer of a run and how it was obtained.

    ``model``/``provider``/``tier`` are those of the registry model that answered
    (``response_model`` is the id the provider reported, which may be a dated alias).
    Tokens and ``cost_usd`` are the successful call's, priced with the registry
    entry of the model called (``price_version`` says which table).  ``latency_ms`` is
    the whole run, retries and waits included (a stream's ends when its answer had been
    read whole, the caller's reading after that not included).  ``fallback_chain`` lists every model
    tried, in order, the answering one last; ``fallback_used`` is true when that is not
    the first.  ``ttft_ms`` (streamed runs only) is the time from the start of the
    stream to its first delta, retries and fallbacks included.  ``cached`` is true for
    an answer served from the response cache (``cost_usd`` 0, no attempts; the tokens
    are the stored answer's).

    ``tool_calls`` are the tools the model called (``stop_reason`` is then the
    provider's own: ``"tool_use"`` from Anthropic, ``"tool_calls"`` from OpenAI).  With
    a ``response_format``, ``parsed`` is the answer parsed from JSON when it matches
    the schema; otherwise it is None and ``parse_error`` says why.
    """

    content: str
    model: str
    provider: str
    tier: ModelTier
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: float
    attempts: tuple[AttemptSummary, ...]
    fallback_chain: tuple[str, ...]
    fallback_used: bool
    routing_decision: RoutingDecision | None
    request_id: str
    response_model: str
    price_version: str
    stop_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    parsed: Any = None
    parse_error: str | None = None
    ttft_ms: float | None = None

    @property
    def cached(self) -> bool:
        """True for an answer served from the response cache (no attempt was made)."""
        return not self.attempts

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def attempt_count(self) -> int:
        """Every attempt of the run, the answering one included (retries and fallbacks)."""
        return len(self.attempts)

    @property
    def retry_count(self) -> int:
        """
        Retries: attempts that repeated a model already tried in this run.

        A move to another model is a fallback (`fallback_count`), not a retry: with
        ``RetryPolicy.none()`` this is always 0.  ``attempt_count`` counts both.
        """
        return len(self.attempts) - len({a.model for a in self.attempts})

    @property
    def fallback_count(self) -> int:
        """Models moved on to after the first route (``len(fallback_chain) - 1``)."""
        return max(0, len(self.fallback_chain) - 1)


_DEFAULT_CONTEXT = ExecutionContext()


def context_of(context: object) -> ExecutionContext:
    """A run's or stream's ``context`` argument: the default one for ``None``, else checked."""
    if context is None:
        return _DEFAULT_CONTEXT
    if not isinstance(context, ExecutionContext):
        fix = ""
        if isinstance(context, Mapping) and all(isinstance(k, str) for k in context):
            fix = _context_to_build(context)
        raise ConfigurationError(f"context must be an ExecutionContext, got {shown(context)}{fix}")
    return context


def _context_to_build(given: Mapping[str, object]) -> str:
    """
    For a dict given as the context: the `ExecutionContext` to build from the settings
    it has, and the keys it has that are none (a request's ``messages``).
    """
    fields = {f.name for f in attrs.fields(ExecutionContext)}
    settings = ", ".join(f"{k}={shown(v)}" for k, v in given.items() if k in fields)
    others = [repr(k) for k in given if k not in fields]
    fix = f": build one, ExecutionContext({settings})" if settings else ""
    if others:
        fix += (
            f"{'; ' if fix else ': '}{', '.join(others)} "
            f"{'is not a setting' if len(others) == 1 else 'are not settings'} of "
            "ExecutionContext (the messages are the prompt; run()'s keyword arguments "
            "take the request's options, and refuse others saying where they go)"
        )
    return fix


NO_CACHE: Final = (
    "ExecutionContext(cache_ttl=...) on an executor without a response cache: nothing "
    "is cached, nor answered from a cache; give the executor one, "
    "EmpathyLLMExecutor(..., cache='sqlite:///cache.db') (or 'memory://', "
    "'redis://...'), or leave cache_ttl out"
)

SAMPLED: Final = (
    "ExecutionContext(cache_ttl=...) on a request that samples (temperature left out, "
    "which samples at the provider's default, or above 0): its answer is neither cached "
    "nor answered from the cache; set temperature=0, or cache_sampled=True to cache "
    "sampled answers too"
)

_WARNED: Final[dict[str, weakref.WeakSet[object]]] = {
    NO_CACHE: weakref.WeakSet(),
    SAMPLED: weakref.WeakSet(),
}
"""The executors warned, per message."""


def uncached(executor: object, why: str = NO_CACHE) -> None:
    """
    Warn, once per ``executor`` and ``why``, that a run or stream set ``cache_ttl``
    while it has no ``cache=`` (`NO_CACHE`), or for a request whose answer is sampled
    (`SAMPLED`): the setting would otherwise be ignored without a word.
    """
    warned = _WARNED[why]
    if executor in warned:
        return
    warned.add(executor)
    logging.getLogger("empathy_models.executor").warning("%s", why)
    warn_caller(why)


# LLMResponse and AttemptSummary have no validators or converters: the executor builds
# them through the slots directly (same objects, about half the construction cost).
_new_response = trusted_constructor(LLMResponse)
_new_summary = trusted_constructor(AttemptSummary)
