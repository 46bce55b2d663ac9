"""
What a user declares (`Budget`, `RateLimit`) and what a quota store answers
(`BudgetUsage`, `BudgetGrant`, `RateGrant`).

Money is kept in the stores as integer nano-dollars (1e-9 USD), so that sums are exact
on every engine (Redis's Lua numbers and JSON included) and ``reserved = settled +
released`` holds to the last digit.  The values below show dollars.
"""

from __future__ import annotations

import math
from calendar import monthrange
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
from attrs import field, frozen

from .._validators import failure, integer, number, plain_number, shown, text_flaw
from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from ..registry import ModelInfo

__all__ = [
    "MAX_WINDOW",
    "NANO",
    "SCOPES",
    "WINDOW_RETENTION",
    "WORST_PER_ESTIMATE",
    "Budget",
    "BudgetGrant",
    "BudgetUsage",
    "CacheWrite",
    "RateGrant",
    "RateLimit",
    "to_nano",
    "worst_cost",
]

NANO: Final = 1_000_000_000
"""Nano-dollars per dollar: stores count money in integers of 1e-9 USD."""

WORST_PER_ESTIMATE: Final = 4
"""
How many times the executor's estimate of a prompt's tokens its worst case is: the
estimate is a quarter of the worst case (a token per UTF-8 byte of its text and of the
tool definitions and schema sent, framing and images; see `Limiter.admit`), about what
providers count for English.  Budgets reserve the worst case, rate limits count the
estimate.
"""

CacheWrite = Literal["5m", "1h"] | None
"""
The prompt-cache writes a request asks for (Anthropic's ``cache_control``): "1h" when
one asks for the 1-hour cache, "5m" for the 5-minute one, None when none is asked for.
Budgets reserve its prompt at the cache write price (`Limiter.estimate`).
"""


def worst_cost(
    info: ModelInfo, prompt_tokens: int, output_tokens: int, cache_write: CacheWrite = None
) -> float:
    """
    The most a call of ``prompt_tokens`` and ``output_tokens`` can cost at ``info``'s list
    prices: the prompt at the input price, or, when the request asks for prompt-cache
    writes (``cache_write``: "5m", or "1h" for the 1-hour cache too), at the dearest of
    the input price and the write prices it may be billed (`ModelInfo.cache_prices`).
    """
    cost = info.cost(prompt_tokens, output_tokens)
    if cache_write is None:
        return cost
    kinds: tuple[str, ...] = ("cache_write_tokens",)
    if cache_write == "1h":
        kinds += ("cache_write_1h_tokens",)
    return max(cost, *(info.cost(0, output_tokens, **{kind: prompt_tokens}) for kind in kinds))


Scope = Literal["global", "workflow", "stage", "user_id", "provider", "model"]
SCOPES: Final[tuple[str, ...]] = ("global", "workflow", "stage", "user_id", "provider", "model")
_WINDOWS: Final = ("hour", "day", "month")


MAX_NANO: Final = 2**63 - 1
"""The most nano-dollars a quota store holds (a 64-bit integer: ~9.2 billion USD)."""


def to_nano(usd: float, *, up: bool = False) -> int:
    """
    ``usd`` in integer nano-dollars (rounded up with ``up``, else to the nearest), at
    most `MAX_NANO`: a larger amount (an absurd price's worst case) is more than any
    budget holds either way.
    """
    scaled = usd * NANO
    if not scaled < MAX_NANO:
        return MAX_NANO
    return math.ceil(scaled - 1e-6) if up else round(scaled)


def _scope(value: object) -> str:
    if not isinstance(value, str) or value not in SCOPES:
        raise ConfigurationError(
            f"Budget.scope must be one of {', '.join(SCOPES)}, got {shown(value)}"
        )
    return value


MAX_WINDOW: Final = 36_525 * 86_400.0
"""The longest window of a `Budget` in seconds: 100 years (a budget that never resets)."""


WINDOW_RETENTION: Final = 7 * 86_400.0
"""How long a quota store keeps a budget's window after it ended: a week."""


def sweep_time(window: Mapping[str, Any], now: float) -> float:
    """
    The time a budget window just written tells a quota store it is, for dropping the
    windows that ended `WINDOW_RETENTION` before it: the store's ``now`` when the
    window holds it (the callers' clock, which chose the window, agrees with the
    store's), else the window's start (a time the callers' clock has reached: a window
    longer than the retention, a month, would otherwise be kept until a window starting
    a week after its end is written).
    """
    start = float(window["window_start"])
    return now if start <= now < float(window["window_end"]) else start


def _window(value: object) -> str | float:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _WINDOWS:
            return low
    elif (seconds := plain_number(value)) is not None and 1 <= seconds <= MAX_WINDOW:
        return float(seconds)  # (NaN and infinities are out of range)
    raise ConfigurationError(
        "Budget.window must be 'hour', 'day', 'month' or a number of seconds from 1 to "
        f"{MAX_WINDOW:.0f} (100 years: for a budget that never resets), got {shown(value)}"
    )


_MAX_LIMIT_USD: Final = 2**53 / NANO
"""The largest budget a store counts exactly in nano-dollars (``usd * NANO <= 2**53``)."""

_limit = number(
    failure(ConfigurationError, owner="Budget"),
    low=0,
    high=_MAX_LIMIT_USD,
    why=f"must be a finite number of dollars >= 0 (at most {_MAX_LIMIT_USD:,.0f})",
)


def _opt_text(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ConfigurationError(
            f"Budget.{attribute.name} must be a non-empty string or None, got {shown(value)}"
        )
    if (flaw := text_flaw(value)) is not None:  # a lone surrogate: no store can write it
        raise ConfigurationError(f"Budget.{attribute.name} {flaw}, got {shown(value)}")


@frozen(kw_only=True)
class Budget:
    """
    A spend limit over a time window, shared by every worker on the same quota store.

    Args:
        limit_usd: the most the calls it covers may cost in one window (list prices of
            the registry, as the records have them).
        scope: what it covers: ``"global"`` (every call), or one of ``"workflow"``,
            ``"stage"``, ``"user_id"``, ``"provider"``, ``"model"``.
        value: with a scope other than global, the one workflow (stage, user, ...) it
            covers; ``None`` gives every value its own budget of ``limit_usd`` (a call
            whose ``user_id`` is ``None`` is not covered by a per-user budget).  A budget
            for one value takes the place of the per-value budget of the same scope and
            window for that value (both keep its spend under one key): with
            ``Budget(limit_usd=2, scope="user_id")`` and ``Budget(limit_usd=10,
            scope="user_id", value="alice")`` alice may spend $10 a day, every other
            user $2.
        window: ``"hour"``, ``"day"`` or ``"month"`` (calendar windows in UTC: a daily
            budget resets at midnight UTC), or a number of seconds from 1 to
            `MAX_WINDOW` (100 years; windows aligned on multiples of it since the epoch).
        name: how the budget is called in errors, the store and the CLI (default:
            ``"global/day"``, ``"workflow=docs/day"``; a per-value budget adds the value
            of each call: ``"user_id=alice/day"``).

    Raises:
        ConfigurationError: an invalid value.
    """

    limit_usd: float = field(validator=_limit)
    scope: str = field(default="global", converter=_scope)
    value: str | None = field(default=None, validator=_opt_text)
    window: str | float = field(default="day", converter=_window)
    name: str | None = field(default=None, validator=_opt_text)

    def __attrs_post_init__(self) -> None:
        if self.scope == "global" and self.value is not None:
            raise ConfigurationError("a global Budget covers every call: drop value=")
        if self.name is not None and ("|" in self.name or "@" in self.name):
            raise ConfigurationError(f"Budget.name must not contain '|' or '@', got {self.name!r}")

    @property
    def window_label(self) -> str:
        """How the window reads in the budget's key: its name, or `seconds_label`."""
        return self.window if isinstance(self.window, str) else seconds_label(self.window)

    @property
    def per_value(self) -> bool:
        """True when every value of the scope has a budget of its own."""
        return self.scope != "global" and self.value is None

    def key_for(self, value: str | None) -> str | None:
        """The store key of the budget a call with scope value ``value`` is charged to."""
        if self.scope == "global":
            return self.name or f"global/{self.window_label}"
        if value is None or (self.value is not None and value != self.value):
            return None
        if self.name is not None:
            return self.name if self.value is not None else f"{self.name}:{value}"
        return f"{self.scope}={value}/{self.window_label}"

    def window_bounds(self, now: float) -> tuple[float, float]:
        """(start, end) in UTC epoch seconds of the window holding ``now``."""
        return window_bounds(self.window, now)


def seconds_label(seconds: float) -> str:
    """
    A window of ``seconds`` as a budget key has it: the whole number of seconds
    (``"2592000s"``, however long), or the shortest decimal of a fraction (``"1.5s"``),
    so that no two windows share a key and an operator types it as it is counted.
    """
    return f"{int(seconds)}s" if seconds.is_integer() else f"{seconds!r}s"


def window_bounds(window: str | float, now: float) -> tuple[float, float]:
    """(start, end) in UTC epoch seconds of the ``window`` holding ``now``."""
    if isinstance(window, float):
        start = math.floor(now / window) * window
        return start, start + window
    t = datetime.fromtimestamp(now, UTC)
    if window == "hour":
        s = t.replace(minute=0, second=0, microsecond=0)
        return s.timestamp(), s.timestamp() + 3600.0
    if window == "day":
        s = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return s.timestamp(), s.timestamp() + 86400.0
    s = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = monthrange(s.year, s.month)[1]
    return s.timestamp(), s.timestamp() + days * 86400.0


_MAX_PER_MINUTE: Final = 2**63 - 1
"""The most requests or tokens per minute a `RateLimit` names (its schedule's interval,
``60 / rpm`` seconds, is a float: a float must hold the count)."""

_opt_count = integer(
    failure(ConfigurationError, owner="RateLimit"),
    low=1,
    high=_MAX_PER_MINUTE,
    optional=True,
    why="must be an integer >= 1 or None",
    high_why="must be < 2**63",
)


@frozen(kw_only=True)
class RateLimit:
    """
    Requests and tokens per minute for a provider or a model, shared by every worker.

    Enforced with GCRA (a token bucket kept as one timestamp) in the quota store: each
    call takes its place in the schedule atomically and waits for its turn, so workers
    never race and never burst past the limit.  A call counts its prompt estimate plus
    ``max_tokens`` against ``tpm`` up front (as providers' own limiters count
    ``max_tokens``); when it ends, the difference from the tokens actually used is
    taken if it used more, and given back if it used fewer, as is the place of a call
    that never went out (cancelled while waiting for its turn, refused after
    admission).  Capacity given back moves up the calls this process queued right
    behind it (those waiting go earlier), and the schedule's end with them unless
    another worker took a place after them: places of other workers keep their times,
    so no call ever shares one of their instants, and capacity given back in front of
    them is used by this process's queue or lost, never exceeded.  A push back to a
    provider's reset time (a 429, an exhausted limit) holds every place taken after
    it until that time, whatever the burst.

    Args:
        rpm: requests per minute.
        tpm: tokens per minute.
        burst_requests: how many requests may go at once after an idle period (default
            1: requests are spaced evenly, ``60 / rpm`` seconds apart, which leaves the
            provider's own bucket the slack that network jitter needs).
        burst_tokens: likewise for tokens (default: the whole minute, ``tpm``, as
            providers count, since one call may hold many tokens).

    Each is an integer from 1 to 2**63 - 1, or None.

    Raises:
        ConfigurationError: neither ``rpm`` nor ``tpm`` given, or a value that is not an
            integer from 1 to 2**63 - 1.
    """

    rpm: int | None = field(default=None, validator=_opt_count)
    tpm: int | None = field(default=None, validator=_opt_count)
    burst_requests: int | None = field(default=None, validator=_opt_count)
    burst_tokens: int | None = field(default=None, validator=_opt_count)

    def __attrs_post_init__(self) -> None:
        if self.rpm is None and self.tpm is None:
            raise ConfigurationError("RateLimit needs rpm=, tpm= or both")

    @property
    def request_burst(self) -> int:
        return 1 if self.burst_requests is None else self.burst_requests

    @property
    def token_burst(self) -> int:
        if self.burst_tokens is not None:
            return self.burst_tokens
        return self.tpm or 1


@frozen(kw_only=True)
class BudgetUsage:
    """
    One window of one budget as the store holds it (amounts in nano-dollars).

    ``held`` is reserved by calls still in flight; ``reserved`` the sum of every
    reservation granted, ``settled`` the part of them calls turned out to cost,
    ``released`` the part given back, ``lapsed`` the part of holds that lapsed before
    their call settled them (their process killed or cut off from the store),
    ``overrun`` what calls cost beyond what they still held: ``reserved == settled +
    released + lapsed + held`` and ``spent == settled + overrun`` always.  ``limit`` is
    the limit the last reservation was checked against.  ``held_until``: when the last
    of the holds lapses if no call settles it (UTC epoch seconds; None when nothing is
    held).  ``calls``: the calls charged to the window (settled at a cost above zero:
    sent, and billed); ``refused``: the reservations it refused.
    """

    key: str
    window_start: float
    window_end: float
    limit: int = 0
    spent: int = 0
    held: int = 0
    reserved: int = 0
    settled: int = 0
    released: int = 0
    overrun: int = 0
    calls: int = 0
    refused: int = 0
    lapsed: int = 0
    held_until: float | None = None

    @property
    def limit_usd(self) -> float:
        return self.limit / NANO

    @property
    def spent_usd(self) -> float:
        return self.spent / NANO

    @property
    def held_usd(self) -> float:
        return self.held / NANO

    @property
    def remaining_usd(self) -> float:
        return max(0, self.limit - self.spent - self.held) / NANO

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "limit": self.limit,
            "spent": self.spent,
            "held": self.held,
            "reserved": self.reserved,
            "settled": self.settled,
            "released": self.released,
            "overrun": self.overrun,
            "calls": self.calls,
            "refused": self.refused,
            "lapsed": self.lapsed,
            "held_until": self.held_until,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BudgetUsage:
        return cls(
            key=str(data["key"]),
            window_start=float(data["window_start"]),
            window_end=float(data["window_end"]),
            **{
                name: int(data.get(name, 0))
                for name in (
                    "limit",
                    "spent",
                    "held",
                    "reserved",
                    "settled",
                    "released",
                    "overrun",
                    "calls",
                    "refused",
                    "lapsed",
                )
            },
            held_until=None if data.get("held_until") is None else float(data["held_until"]),
        )


@frozen(kw_only=True)
class BudgetGrant:
    """The answer to a reservation: ``granted`` and the window as it is now."""

    granted: bool
    usage: BudgetUsage


@frozen(kw_only=True)
class RateGrant:
    """
    The answer to a rate-limit acquisition: ``granted`` (a place in the schedule was
    taken) and ``wait``, the seconds until that place comes (or, when not granted,
    until it would have).  ``place``: where the schedule ends once this place is taken
    (the store's own time), to give the place back with `QuotaStore.adjust` only while
    no later place was taken; None when the store does not say (such a place is never
    given back).
    """

    granted: bool
    wait: float
    place: float | None = None
