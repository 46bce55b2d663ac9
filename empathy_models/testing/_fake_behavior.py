"""
What `FakeLLMServer` and `FakeProvider` answer for a model: the actions (`Action`,
`FAULT_ACTIONS`), `Latency`, `ModelBehavior`, `RecordedRequest` and the token estimate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, TypeAlias

import attrs
from attrs import field, frozen

from .._validators import failure, integer, number, shown
from ..exceptions import RecordValidationError
from ._fake_stream import StreamBehavior
from ._fake_tools import FakeReply

__all__ = [
    "DEFAULT_BEHAVIOR",
    "FAULT_ACTIONS",
    "RETRY_AFTER_STATUSES",
    "Action",
    "Latency",
    "ModelBehavior",
    "RecordedRequest",
    "check_action",
    "estimate_tokens",
]

Action: TypeAlias = "int | str | FakeReply"
"""An HTTP status code (400-599), one of `FAULT_ACTIONS`, or a scripted `FakeReply`."""

FAULT_ACTIONS: Final = frozenset(
    {
        "ok",
        "hang",
        "timeout",
        "malformed",
        "incomplete",
        "truncated",
        "reset",
        "context_length",
        "content_policy",
    }
)


def estimate_tokens(text: str) -> int:
    """The fake's token estimate for ``text``: ``len(text) // 4 + 1``."""
    return len(text) // 4 + 1


def check_action(value: object, where: str) -> Action:
    if isinstance(value, bool):
        raise RecordValidationError(f"{where} {shown(value)} is not an action", path=where)
    if isinstance(value, int):
        if 400 <= value <= 599:
            return value
        raise RecordValidationError(
            f"{where} must be an HTTP error status 400-599, got {shown(value)}", path=where
        )
    if isinstance(value, str) and value in FAULT_ACTIONS:
        return value
    if isinstance(value, FakeReply):
        return value
    allowed = ", ".join(sorted(FAULT_ACTIONS))
    raise RecordValidationError(
        f"{where} must be a status code 400-599 or one of {allowed}; got {shown(value)}", path=where
    )


def _ms(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@frozen
class Latency:
    """
    A latency distribution in milliseconds; build it with `fixed`, `uniform` or
    `lognormal`.  Draws use the server's seeded per-model RNG, so a run is repeatable.
    """

    kind: Literal["fixed", "uniform", "lognormal"]
    a: float
    b: float = 0.0

    @classmethod
    def fixed(cls, ms: float) -> Latency:
        """Always ``ms`` milliseconds."""
        value = _ms(ms)
        if value is None or value < 0:
            raise RecordValidationError(
                f"latency must be a finite number >= 0 ms, got {shown(ms)}", path="latency"
            )
        return cls("fixed", value)

    @classmethod
    def uniform(cls, low_ms: float, high_ms: float) -> Latency:
        """Uniform between ``low_ms`` and ``high_ms``."""
        low, high = _ms(low_ms), _ms(high_ms)
        if low is None or high is None or not 0 <= low <= high:
            raise RecordValidationError(
                "latency needs finite numbers 0 <= low <= high, "
                f"got {shown(low_ms)}, {shown(high_ms)}",
                path="latency",
            )
        return cls("uniform", low, high)

    @classmethod
    def lognormal(cls, median_ms: float, sigma: float = 0.5) -> Latency:
        """Log-normal with the given median and shape ``sigma`` (a long right tail)."""
        median, shape = _ms(median_ms), _ms(sigma)
        if median is None or shape is None or not (median > 0 and shape >= 0):
            raise RecordValidationError(
                "lognormal latency needs finite numbers median > 0 and sigma >= 0, "
                f"got {shown(median_ms)}, {shown(sigma)}",
                path="latency",
            )
        return cls("lognormal", median, shape)

    def sample(self, rng: random.Random) -> float:
        """One draw, in milliseconds."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        return rng.lognormvariate(math.log(self.a), self.b)


def _to_latency(value: Latency | float) -> Latency:
    if isinstance(value, Latency):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Latency.fixed(value)
    raise RecordValidationError(
        f"latency must be a Latency or a number of ms, got {shown(value)}", path="latency"
    )


def _to_token_range(value: int | tuple[int, int]) -> tuple[int, int]:
    low, high = (value, value) if isinstance(value, int) else tuple(value)
    if (
        isinstance(low, bool)
        or isinstance(high, bool)
        or not isinstance(low, int)
        or not isinstance(high, int)
        or not 0 <= low <= high
    ):
        raise RecordValidationError(
            f"output_tokens must be an int >= 0 or a (low, high) range, got {shown(value)}",
            path="output_tokens",
        )
    return (low, high)


def _to_actions(value: Iterable[Action]) -> tuple[Action, ...]:
    actions = tuple(check_action(a, f"failures[{i}]") for i, a in enumerate(value))
    if not actions:
        raise RecordValidationError("failures must not be empty", path="failures")
    return actions


_fail = failure(RecordValidationError)
_rate = number(_fail, low=0, high=1, finite=False, why="must be between 0 and 1")
_opt_non_negative = number(_fail, low=0, optional=True, why="must be None or a number >= 0")
_opt_positive_int = integer(_fail, low=1, optional=True, why="must be None or an integer >= 1")


@frozen(kw_only=True)
class ModelBehavior:
    """
    How the fake answers for one model.

    Args:
        latency: a `Latency` or fixed milliseconds, slept before every answer.
        failure_rate: the probability that the answer is one of ``failures``.
        failures: chosen uniformly (see the module doc for the actions).
        retry_after: seconds, sent with 429, 503 and 529.
        output_tokens: a count or a uniform ``(low, high)`` range, capped by the
            request's max tokens.
        content: the reply text (default: a short line naming the model).
        context_window: when set, prompts that do not fit fail with each API's
            context-length error.
        max_output_tokens: when set, a request asking for more output tokens fails
            with the 400 each API sends for it.
        stream: a `StreamBehavior`: the chunk timing and a fault after N chunks for
            requests with ``"stream": true``.
    """

    latency: Latency = field(default=Latency("fixed", 0.0), converter=_to_latency)
    failure_rate: float = field(default=0.0, validator=_rate)
    failures: tuple[Action, ...] = field(default=(500,), converter=_to_actions)
    retry_after: float | None = field(default=None, validator=_opt_non_negative)
    output_tokens: tuple[int, int] = field(default=(16, 16), converter=_to_token_range)
    content: str | None = None
    context_window: int | None = field(default=None, validator=_opt_positive_int)
    max_output_tokens: int | None = field(default=None, validator=_opt_positive_int)
    stream: StreamBehavior | None = field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(StreamBehavior)),
    )

    @classmethod
    def always(cls, action: Action, **changes: Any) -> ModelBehavior:
        """A behaviour whose every answer is ``action`` (``"ok"`` for plain success)."""
        return cls(failure_rate=1.0, failures=(action,), **changes)


@frozen(kw_only=True)
class RecordedRequest:
    """The last request the server accepted for a model (keys are not kept)."""

    api: str
    model: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]


DEFAULT_BEHAVIOR: Final = ModelBehavior()
"""Every answer a plain success after no latency: the servers' default ``default``."""

RETRY_AFTER_STATUSES: Final = frozenset({429, 503, 529})
"""The statuses that carry the behaviour's ``retry_after``."""
