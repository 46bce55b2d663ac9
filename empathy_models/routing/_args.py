"""The checks of the router's arguments: a `ConfigurationError` naming the bad one."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Final

from .._validators import check, failure, integer, number
from ..exceptions import ConfigurationError
from ._verdicts import Limits

__all__ = [
    "blocked_set",
    "candidate_names",
    "decision_limits",
    "opt_int",
    "opt_number",
    "positive_number",
]

_INF: Final = math.inf
_NO_MODELS: Final[frozenset[str]] = frozenset()


_fail = failure(ConfigurationError)
_positive = number(_fail, low=0, low_open=True, why="must be a finite number > 0")
_opt_count = integer(_fail, low=0, optional=True, why="must be an integer >= 0")


# non-finite values are told apart before the range: not a `number` validator
def opt_number(name: str, value: object, *, positive: bool = False) -> float | None:
    """``value`` as a float >= 0 (> 0 with ``positive``), or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigurationError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def positive_number(name: str, value: float) -> float:
    """``value`` as a finite float > 0."""
    return float(check(_positive, name, value))


def opt_int(name: str, value: int | None) -> int | None:
    """``value`` as an int >= 0, or ``None``."""
    return check(_opt_count, name, value)


def decision_limits(
    min_success_rate: float | None,
    max_latency_ms: float | None,
    max_cost: float | None,
    strict_cost: bool,
    max_tokens: int | None,
    max_ttft_ms: float | None,
    input_tokens: int | None,
    on_no_match: str,
) -> tuple[Limits, int | None]:
    """
    One decision's constraints as `Limits`, and its ``input_tokens``, checked (with
    ``on_no_match``, which must be a non-empty string).

    Exact floats and ints in range take the fast way; anything else gets the full
    check (which also converts ints to floats).
    """
    if max_cost is not None and (type(max_cost) is not float or not 0.0 <= max_cost < _INF):
        max_cost = opt_number("max_cost", max_cost)
    if max_latency_ms is not None and (
        type(max_latency_ms) is not float or not 0.0 < max_latency_ms < _INF
    ):
        max_latency_ms = opt_number("max_latency_ms", max_latency_ms, positive=True)
    if max_ttft_ms is not None and (type(max_ttft_ms) is not float or not 0.0 < max_ttft_ms < _INF):
        max_ttft_ms = opt_number("max_ttft_ms", max_ttft_ms, positive=True)
    if min_success_rate is not None and (
        isinstance(min_success_rate, bool)
        or not isinstance(min_success_rate, int | float)
        or not 0.0 <= min_success_rate <= 1.0
    ):
        raise ConfigurationError(
            f"min_success_rate must be a number in [0, 1], got {min_success_rate!r}"
        )
    if input_tokens is not None and (type(input_tokens) is not int or input_tokens < 0):
        input_tokens = opt_int("input_tokens", input_tokens)
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 0):
        max_tokens = opt_int("max_tokens", max_tokens)
    if not isinstance(on_no_match, str) or not on_no_match:
        raise ConfigurationError(
            f"on_no_match must be 'raise', 'relax' or a model id, got {on_no_match!r}"
        )
    if strict_cost and max_cost is not None and input_tokens is None:
        raise ConfigurationError("strict_cost=True with max_cost needs input_tokens")
    limits = (min_success_rate, max_latency_ms, max_cost, strict_cost, max_tokens, max_ttft_ms)
    return limits, input_tokens


def candidate_names(
    candidates: Sequence[str] | None,
    default: Callable[[], tuple[str, ...]],
    workflow: str,
    stage: str | None,
) -> tuple[str, ...]:
    """The candidate ids as a tuple (``default()`` when ``None``); never empty."""
    if isinstance(candidates, str):
        raise ConfigurationError("candidates must be a sequence of model ids, not a string")
    names = default() if candidates is None else tuple(candidates)
    if not names:
        raise ConfigurationError(f"no candidate models for {workflow}/{stage}")
    return names


def blocked_set(unavailable: Collection[str]) -> Collection[str]:
    """``unavailable`` as something cheap to test membership in."""
    if not unavailable:
        return _NO_MODELS
    if isinstance(unavailable, set | frozenset):
        return unavailable
    return frozenset(unavailable)
