"""The checks of the router's arguments: a `ConfigurationError` naming the bad one."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Final

from .._validators import check, failure, integer, number, plain_number, shown, text_flaw
from ..exceptions import ConfigurationError
from ._verdicts import Limits

__all__ = [
    "blocked_set",
    "candidate_names",
    "check_names",
    "decision_limits",
    "opt_int",
    "opt_number",
    "plain_name",
    "positive_number",
]

_INF: Final = math.inf
_MAX_FLOAT: Final = sys.float_info.max
_MAX_COUNT: Final = 2**63 - 1  # the most tokens a record holds
_NO_MODELS: Final[frozenset[str]] = frozenset()


_fail = failure(ConfigurationError)
_positive = number(_fail, low=0, low_open=True, why="must be a finite number > 0")
_opt_count = integer(
    _fail,
    low=0,
    high=_MAX_COUNT,
    optional=True,
    why="must be an integer >= 0",
    high_why="must be < 2**63",
)


# non-finite values are told apart before the range: not a `number` validator
def opt_number(name: str, value: object, *, positive: bool = False) -> float | None:
    """``value`` as a float >= 0 (> 0 with ``positive``), or ``None``."""
    if value is None:
        return None
    number = plain_number(value)  # numpy's, a Decimal: the plain number
    if number is None or not -_MAX_FLOAT <= number <= _MAX_FLOAT:
        # (NaN, infinities, ints no float holds)
        raise ConfigurationError(f"{name} must be a finite number, got {shown(value)}")
    if number < 0 or (positive and number == 0):
        raise ConfigurationError(
            f"{name} must be {'> 0' if positive else '>= 0'}, got {shown(value)}"
        )
    return float(number) + 0.0  # (-0.0 as 0.0)


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
    check (which also converts ints to floats); a zero limit is 0.0, never -0.0.
    """
    if max_cost is not None and (type(max_cost) is not float or not 0.0 < max_cost < _INF):
        max_cost = opt_number("max_cost", max_cost)
    if max_latency_ms is not None and (
        type(max_latency_ms) is not float or not 0.0 < max_latency_ms < _INF
    ):
        max_latency_ms = opt_number("max_latency_ms", max_latency_ms, positive=True)
    if max_ttft_ms is not None and (type(max_ttft_ms) is not float or not 0.0 < max_ttft_ms < _INF):
        max_ttft_ms = opt_number("max_ttft_ms", max_ttft_ms, positive=True)
    if min_success_rate is not None:
        # numpy's number, a Decimal: the plain number
        rate = (
            min_success_rate if type(min_success_rate) is float else plain_number(min_success_rate)
        )
        if rate is None or not 0.0 < rate <= 1.0:
            if rate != 0.0:  # (None and NaN too)
                raise ConfigurationError(
                    f"min_success_rate must be a number in [0, 1], got {shown(min_success_rate)}"
                )
            rate = 0.0  # (-0.0 too)
        min_success_rate = rate
    if input_tokens is not None and (
        type(input_tokens) is not int or not 0 <= input_tokens <= _MAX_COUNT
    ):
        input_tokens = opt_int("input_tokens", input_tokens)
    if max_tokens is not None and (
        type(max_tokens) is not int or not 0 <= max_tokens <= _MAX_COUNT
    ):
        max_tokens = opt_int("max_tokens", max_tokens)
    if not isinstance(on_no_match, str) or not on_no_match:
        raise ConfigurationError(
            f"on_no_match must be 'raise', 'relax' or a model id, got {shown(on_no_match)}"
        )
    if strict_cost is not False and strict_cost is not True:
        raise ConfigurationError(f"strict_cost must be True or False, got {shown(strict_cost)}")
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
    try:
        names = default() if candidates is None else tuple(candidates)
    except TypeError:
        raise ConfigurationError(
            f"candidates must be a sequence of model ids, got {shown(candidates)}"
        ) from None
    if not names:
        raise ConfigurationError(f"no candidate models for {workflow}/{stage}")
    return names


def blocked_set(unavailable: Collection[str]) -> Collection[str]:
    """``unavailable`` (model ids) as something cheap to test membership in."""
    if isinstance(unavailable, set | frozenset):
        return unavailable if unavailable else _NO_MODELS
    if isinstance(unavailable, str):  # one id would read as a set of its characters
        raise ConfigurationError(
            f"unavailable must be a collection of model ids, not a string: got "
            f"{unavailable!r} (pass [{unavailable!r}] for one model)"
        )
    try:
        return frozenset(unavailable) if unavailable else _NO_MODELS
    except TypeError:
        raise ConfigurationError(
            f"unavailable must be a collection of model ids, got {shown(unavailable)}"
        ) from None


def check_names(workflow: object, stage: object) -> None:
    """
    Raise `ConfigurationError` unless ``workflow`` is a string and ``stage`` one or None,
    each text every store keeps as given (no NUL, no lone surrogate: `text_flaw`), as
    `ExecutionContext` requires.  A store keeps such a name escaped, so the evidence the
    router learned of it live would not be found in the store's again.
    """
    if not isinstance(workflow, str):
        raise ConfigurationError(f"workflow must be a string, got {shown(workflow)}")
    if stage is not None and not isinstance(stage, str):
        raise ConfigurationError(f"stage must be a string or None, got {shown(stage)}")
    for name, value in (("workflow", workflow), ("stage", stage)):
        if value is not None and (flaw := text_flaw(value)) is not None:
            raise ConfigurationError(f"{name} {flaw}, got {shown(value)}")


def plain_name(value: object) -> bool:
    """Whether ``value`` is a string of ASCII without NUL: a name `check_names` passes,
    told at once (the common case)."""
    return isinstance(value, str) and value.isascii() and "\x00" not in value
