"""
Models, their tiers and their prices: the data every cost figure comes from.

A `ModelRegistry` is an immutable table of `ModelInfo` entries plus the version of the
price table they were taken from (``price_version``, written into every
`LLMCallRecord` so old costs stay explainable after prices change).  The default
table ships as data (``empathy_models/data/models.json``) and can be replaced or
extended from a TOML or JSON file::

    registry = ModelRegistry.default()
    registry.get("claude-haiku-4-5").cost(1_200, 300)      # USD
    registry.for_tier("cheap", provider="openai")           # cheapest first

    # prices.toml
    price_version = "2026-06-internal"
    extends = "default"                                      # optional: start from the default
    [[models]]
    id = "my-vllm-model"
    provider = "openai"
    tier = "cheap"
    input_price_per_mtok = 0.0
    output_price_per_mtok = 0.0
    context_window = 32768
    max_output_tokens = 4096

Lookups by id are case-insensitive.  Every object here is immutable and safe to share
between tasks and threads; the helpers that "change" a registry return a new one.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import sys
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Self, cast

import attrs
from attrs import field, frozen

from ._validators import check, failure, integer, number, plain_number, shown, text, text_flaw
from .exceptions import ConfigurationError, ModelNotFoundError, RecordValidationError
from .records import _INT_LIMIT, _MAX_KEY_LENGTH, ModelTier

__all__ = [
    "CACHE_READ_MULTIPLIER",
    "CACHE_WRITE_1H_MULTIPLIER",
    "CACHE_WRITE_MULTIPLIER",
    "CAPABILITIES",
    "ModelInfo",
    "ModelRegistry",
    "WEB_SEARCH_REQUEST_USD",
]

_MODEL_FIELDS = (
    "id",
    "provider",
    "tier",
    "input_price_per_mtok",
    "output_price_per_mtok",
    "context_window",
    "max_output_tokens",
)
_OPTIONAL_MODEL_FIELDS = ("rpm", "tpm", "long_context_threshold")
"""Fields a registry entry may leave out: the provider's requests and tokens per minute,
and the prompt size above which long-context prices apply."""
_OPTIONAL_PRICE_FIELDS = (
    "cached_input_price_per_mtok",
    "cache_write_price_per_mtok",
    "cache_write_1h_price_per_mtok",
    "cache_read_price_per_mtok",
    "long_context_input_price_per_mtok",
    "long_context_output_price_per_mtok",
)
"""Prices a registry entry may leave out (each then follows from the input price, or for
the long-context ones from the standard price)."""
_OPTIONAL_ENTRY_FIELDS = _OPTIONAL_MODEL_FIELDS + _OPTIONAL_PRICE_FIELDS + ("service_tier_prices",)

CACHE_WRITE_MULTIPLIER: Final = 1.25
"""A prompt token written to the 5-minute prompt cache costs this times the input price
(Anthropic's published rate), unless the entry gives ``cache_write_price_per_mtok``."""

CACHE_WRITE_1H_MULTIPLIER: Final = 2.0
"""A prompt token written to the 1-hour prompt cache costs this times the input price
(Anthropic's published rate), unless the entry gives ``cache_write_1h_price_per_mtok``."""

CACHE_READ_MULTIPLIER: Final = 0.1
"""A prompt token read from the prompt cache, reported apart from the input tokens
(Anthropic's ``cache_read_input_tokens``), costs this times the input price (Anthropic's
published rate), unless the entry gives ``cache_read_price_per_mtok``."""

WEB_SEARCH_REQUEST_USD: Final = 0.01
"""The fee of one server-side web search a model ran (Anthropic's
``usage.server_tool_use.web_search_requests``): $10 per 1,000 searches."""
_TOP_LEVEL_KEYS = frozenset({"price_version", "models", "source", "extends"})

CAPABILITIES: Final = frozenset({"tools", "images", "json_schema", "streaming"})
"""What a model can be asked for beyond text: tool calling, image input, JSON-schema
output, streaming.  A registry entry without ``capabilities`` has them all."""


def _to_capabilities(value: object) -> frozenset[str]:
    if value is None:
        return CAPABILITIES
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise RecordValidationError(
            f"capabilities must be a list of {', '.join(sorted(CAPABILITIES))}, got {shown(value)}",
            path="capabilities",
        )
    items = list(value)
    wrong = [item for item in items if not isinstance(item, str)]
    if wrong:
        raise RecordValidationError(
            f"capabilities must be a list of {', '.join(sorted(CAPABILITIES))} (strings), "
            f"got {shown(wrong[0])} in it",
            path="capabilities",
        )
    given = frozenset(items)
    unknown = sorted(map(repr, given - CAPABILITIES))
    if unknown:
        raise RecordValidationError(
            f"capabilities: unknown {', '.join(unknown)} (known: "
            f"{', '.join(sorted(CAPABILITIES))})",
            path="capabilities",
        )
    return given


_fail = failure(RecordValidationError)
_non_empty_str = text(_fail)


def _name(_: object, attribute: Any, value: Any) -> None:
    # a non-empty id or provider that every store keeps as given: records, breaker keys
    # and routing evidence are read back by it
    _non_empty_str(_, attribute, value)
    flaw = text_flaw(value)
    if flaw is not None:
        raise _fail(attribute.name, value, flaw)


def _provider(instance: ModelInfo, attribute: Any, value: Any) -> None:
    # a name (as `_name`) that with the id makes a breaker key ("provider:id") every
    # store holds: refused here, where it is written, not by the first run's breaker
    _name(instance, attribute, value)
    room = _MAX_KEY_LENGTH - 1 - len(value)
    if room < 1:
        raise _fail(
            "provider",
            value,
            f"must be at most {_MAX_KEY_LENGTH - 2} characters (a breaker key, "
            f"provider:model, is at most {_MAX_KEY_LENGTH})",
        )
    if len(instance.id) > room:
        raise _fail(
            "id",
            instance.id,
            f"must be at most {room} characters with provider {shown(value)}: its breaker "
            f"key, provider:id, would be {len(value) + 1 + len(instance.id):,} characters "
            f"and no circuit-state store holds one over {_MAX_KEY_LENGTH}",
        )


_price = number(
    _fail,
    low=0,
    type_why="must be a number (USD per million tokens)",
    why="must be a finite number >= 0",
)
_optional_price = number(
    _fail,
    low=0,
    optional=True,
    type_why="must be a number (USD per million tokens)",
    why="must be a finite number >= 0",
)
_window = integer(
    _fail,
    low=1,
    high=_INT_LIMIT - 1,  # a token count, as a record holds it
    why="must be an integer >= 1",
    high_why="must be < 2**63",
)
_per_minute = integer(
    _fail,
    low=1,
    high=_INT_LIMIT - 1,  # as a `RateLimit` bounds it (the limiter computes in floats)
    optional=True,
    why="must be an integer >= 1",
    high_why="must be < 2**63",
)


_threshold = integer(
    _fail,
    low=1,
    high=_INT_LIMIT - 1,  # a token count, as a record holds it
    optional=True,
    why="must be an integer >= 1 (prompt tokens)",
    high_why="must be < 2**63",
)


def _long_context(instance: ModelInfo, attribute: Any, value: object) -> None:
    # a threshold and at least one long-context price, or neither
    _threshold(instance, attribute, value)
    prices = (
        instance.long_context_input_price_per_mtok,
        instance.long_context_output_price_per_mtok,
    )
    if value is None and any(price is not None for price in prices):
        raise _fail(
            "long_context_threshold",
            value,
            "must be given with long-context prices (the prompt tokens above which they apply)",
        )
    if value is not None and all(price is None for price in prices):
        raise _fail(
            "long_context_threshold",
            value,
            "needs long_context_input_price_per_mtok or long_context_output_price_per_mtok "
            "(the prices a call with a longer prompt is charged)",
        )


def _to_float(value: object) -> object:
    # numbers are accepted for prices and stored as floats (an integer of any kind, a
    # Decimal); anything else (an int no float holds included) is left for the
    # validator to reject with a message naming the field
    plain = plain_number(value)
    if plain is None or plain.__class__ is float:
        return value if plain is None else plain
    try:
        return float(plain)
    except OverflowError:
        return value


def _to_tier(value: object) -> ModelTier:
    if isinstance(value, ModelTier):
        return value
    if isinstance(value, str):
        try:
            return ModelTier(value.strip().lower())
        except ValueError:
            pass
    allowed = ", ".join(t.value for t in ModelTier)
    raise RecordValidationError(
        f"tier must be one of {allowed}, got {shown(value)}",
        path="tier",
    )


_tokens = integer(
    failure(ValueError),
    low=0,
    high=_INT_LIMIT - 1,  # what a record holds: no real count is larger
    why="must be an integer >= 0",
    high_why="must be < 2**63",
)


def _check_tokens(name: str, value: object) -> int:
    return check(_tokens, name, cast(int, value))


_TIER_PRICE_FIELDS = (
    "input_price_per_mtok",
    "output_price_per_mtok",
    "cached_input_price_per_mtok",
)
"""The prices a service tier's entry gives (the cached input price may be left out)."""
_STANDARD_TIERS = frozenset({"default", "standard", "auto"})
"""Service tier names that are the entry's own prices ("auto" is a request's, never an
answer's: the answer names the tier that served it)."""


def _to_tier_prices(value: object) -> tuple[tuple[str, tuple[float, float, float | None]], ...]:
    # {"flex": {"input_price_per_mtok": ..., ...}, ...} as sorted (name, prices) pairs:
    # hashable, as the frozen entry is
    where = "service_tier_prices"
    if value is None:
        return ()
    if isinstance(value, tuple):  # already converted (attrs.evolve passes it again)
        value = {name: dict(zip(_TIER_PRICE_FIELDS, p, strict=True)) for name, p in value}
    if not isinstance(value, Mapping):
        raise RecordValidationError(
            f"{where} must be a table of service tier names to their prices, got {shown(value)}",
            path=where,
        )
    pairs = []
    for name, prices in value.items():
        if not isinstance(name, str) or not name or text_flaw(name) is not None:
            raise RecordValidationError(
                f"{where}: a tier name must be a non-empty string, got {shown(name)}", path=where
            )
        if name.lower() in _STANDARD_TIERS:
            raise RecordValidationError(
                f"{where}: {name!r} is the standard tier, priced by the entry's own prices",
                path=f"{where}.{name}",
            )
        pairs.append((name, _tier_prices_of(prices, f"{where}.{name}")))
    return tuple(sorted(pairs))


def _tier_prices_of(prices: object, where: str) -> tuple[float, float, float | None]:
    # one tier's prices, each a finite number >= 0 (the cached input price optional)
    if not isinstance(prices, Mapping):
        raise RecordValidationError(
            f"{where} must be a table of {', '.join(_TIER_PRICE_FIELDS)}, got {shown(prices)}",
            path=where,
        )
    unknown = sorted(map(repr, set(prices) - set(_TIER_PRICE_FIELDS)))
    missing = [name for name in _TIER_PRICE_FIELDS[:2] if name not in prices]
    if unknown or missing:
        wrong = f"unknown field(s) {', '.join(unknown)}" if unknown else ""
        wrong += ("; " if unknown and missing else "") + (
            f"missing {', '.join(missing)}" if missing else ""
        )
        raise RecordValidationError(
            f"{where}: {wrong} (expected {', '.join(_TIER_PRICE_FIELDS[:2])}; optional: "
            f"{_TIER_PRICE_FIELDS[2]})",
            path=where,
        )
    out: list[float | None] = []
    for name in _TIER_PRICE_FIELDS:
        price = prices.get(name)
        plain = plain_number(price)
        if price is None and name == _TIER_PRICE_FIELDS[2]:
            out.append(None)
            continue
        if plain is None or isinstance(price, bool) or not 0.0 <= float(plain) < math.inf:
            raise RecordValidationError(
                f"{where}.{name} must be a finite number >= 0 (USD per million tokens), "
                f"got {shown(price)}",
                path=f"{where}.{name}",
            )
        out.append(float(plain))
    return (cast(float, out[0]), cast(float, out[1]), out[2])


@frozen(kw_only=True)
class ModelInfo:
    """
    One model: who serves it, its tier, its list prices and its limits.

    Args:
        id: the model id (unique in a registry, compared case-insensitively).
        provider: the name of the provider that serves it.
        tier: its `ModelTier` (or the tier's value).
        input_price_per_mtok, output_price_per_mtok: list prices, USD per million tokens.
        context_window, max_output_tokens: token counts.
        capabilities: which of tools, images, JSON-schema output and streaming the model
            serves (default: all of `CAPABILITIES`); the executor leaves out of a run the
            models that cannot serve its request, saying so in the routing decision.
        rpm, tpm: when set, the provider's requests and tokens per minute for the model
            (integers from 1 to 2**63 - 1): the executor enforces them as an
            `empathy_models.limits.RateLimit` (one given to the executor for the model
            wins).
        cache_write_price_per_mtok, cache_write_1h_price_per_mtok,
            cache_read_price_per_mtok: USD per million prompt tokens written to the
            5-minute prompt cache, written to the 1-hour cache, and read from the cache
            when the provider reports them apart from the input tokens (Anthropic's
            ``cache_creation_input_tokens`` and ``cache_read_input_tokens``); when left
            out, `CACHE_WRITE_MULTIPLIER`, `CACHE_WRITE_1H_MULTIPLIER` and
            `CACHE_READ_MULTIPLIER` times the input price.
        cached_input_price_per_mtok: USD per million input tokens the provider served
            from its prompt cache and counts among the input tokens (OpenAI's
            ``prompt_tokens_details.cached_tokens``); when left out, the input price
            (no discount).
        long_context_threshold, long_context_input_price_per_mtok,
            long_context_output_price_per_mtok: a call whose prompt is over
            ``long_context_threshold`` tokens (the input tokens plus the prompt tokens
            written to or read from the cache where they are reported apart) is charged
            the long-context prices for all of its tokens, as some providers price
            their longest contexts (Anthropic's 1M-token beta, Gemini's Pro models);
            a long-context price left out is the standard one, and the cache prices
            scale with the input price.  The threshold and at least one of the prices
            go together.
        service_tier_prices: the prices of the provider's other service tiers, a call's
            cost following the tier its answer reports (OpenAI's ``service_tier``:
            ``"flex"``, ``"priority"``, ``"scale"``; `at_service_tier`): tier name ->
            ``{"input_price_per_mtok": ..., "output_price_per_mtok": ...,
            "cached_input_price_per_mtok": ...}`` (the cached input price optional:
            when left out, the tier's input price).  A call at a tier not listed, or
            at the standard one (``"default"``), is charged the entry's own prices.
            Budgets reserve a call at the prices of the tier its ``extra_body`` asks for;
            the router plans with the standard prices (and learns a model's real cost
            per call from its records).

    Raises:
        RecordValidationError: naming the field and value, when an id or provider is
            empty or holds a NUL or a lone surrogate (no store keeps it as given), its
            breaker key ``provider:id`` would be over
            `empathy_models.circuit.MAX_KEY_LENGTH` (500) characters, more than a
            circuit-state store holds (a registry file says so as a
            `ConfigurationError` naming the entry), a price is negative or not
            finite, a window, ``rpm``, ``tpm`` or ``long_context_threshold`` is not an
            integer from 1 to 2**63 - 1, a long-context price comes without the
            threshold or the threshold without a price, a capability is not one of
            `CAPABILITIES`, or ``service_tier_prices`` names a tier ``"default"``,
            ``"standard"`` or ``"auto"`` or gives a price that is missing, negative,
            not finite or not a number.
    """

    id: str = field(validator=_name)
    provider: str = field(validator=_provider)
    tier: ModelTier = field(converter=_to_tier)
    input_price_per_mtok: float = field(converter=_to_float, validator=_price)
    output_price_per_mtok: float = field(converter=_to_float, validator=_price)
    context_window: int = field(validator=_window)
    max_output_tokens: int = field(validator=_window)
    capabilities: frozenset[str] = field(default=None, converter=_to_capabilities)
    rpm: int | None = field(default=None, validator=_per_minute)
    tpm: int | None = field(default=None, validator=_per_minute)
    cached_input_price_per_mtok: float | None = field(
        default=None, converter=_to_float, validator=_optional_price
    )
    cache_write_price_per_mtok: float | None = field(
        default=None, converter=_to_float, validator=_optional_price
    )
    cache_write_1h_price_per_mtok: float | None = field(
        default=None, converter=_to_float, validator=_optional_price
    )
    cache_read_price_per_mtok: float | None = field(
        default=None, converter=_to_float, validator=_optional_price
    )
    long_context_input_price_per_mtok: float | None = field(
        default=None, converter=_to_float, validator=_optional_price
    )
    long_context_output_price_per_mtok: float | None = field(
        default=None, converter=_to_float, validator=_optional_price
    )
    long_context_threshold: int | None = field(default=None, validator=_long_context)
    service_tier_prices: tuple[tuple[str, tuple[float, float, float | None]], ...] = field(
        default=(), converter=_to_tier_prices
    )
    _tiered: Mapping[str, ModelInfo] = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        tiered = {
            name: attrs.evolve(
                self,
                input_price_per_mtok=prices[0],
                output_price_per_mtok=prices[1],
                cached_input_price_per_mtok=prices[2],
                service_tier_prices=(),
            )
            for name, prices in self.service_tier_prices
        }
        object.__setattr__(self, "_tiered", tiered)

    def at_service_tier(self, service_tier: str | None) -> ModelInfo:
        """
        The entry priced as a call the provider served at ``service_tier`` (the tier its
        answer reports, such as OpenAI's ``"flex"`` or ``"priority"``): a copy with the
        tier's input, output and cached input prices from ``service_tier_prices``, or
        this entry for ``None``, the standard tier, or a tier it gives no prices for.
        """
        if service_tier is None or not self._tiered:
            return self
        return self._tiered.get(service_tier, self)

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        cache_read_tokens: int = 0,
        web_search_requests: int = 0,
        cached_input_tokens: int = 0,
    ) -> float:
        """
        The list-price cost in USD of a call that used these tokens: always finite (at
        most the largest float, which counts near 2**63 at an absurd price would pass).

        ``cache_write_tokens``, ``cache_write_1h_tokens`` and ``cache_read_tokens`` are
        prompt tokens written to the 5-minute and the 1-hour prompt cache and read from
        it, reported apart from ``input_tokens`` (as Anthropic reports them), each at its
        price (see the class); ``web_search_requests`` server-side web searches, at
        `WEB_SEARCH_REQUEST_USD` each; ``cached_input_tokens`` those of ``input_tokens``
        the provider served from its cache (as OpenAI reports them; at most
        ``input_tokens`` count), at the cached input price.

        Raises:
            ValueError: a count is negative, 2**63 or more, or not an integer.
        """
        if (
            cache_write_tokens
            or cache_write_1h_tokens
            or cache_read_tokens
            or web_search_requests
            or cached_input_tokens
        ):
            return self._cost_with_extras(
                input_tokens,
                output_tokens,
                (cache_write_tokens, cache_write_1h_tokens, cache_read_tokens),
                web_search_requests,
                cached_input_tokens,
            )
        # plain ints in range (every call's record) pass without the validators' calls
        if not (
            type(input_tokens) is int
            and type(output_tokens) is int
            and 0 <= input_tokens < _INT_LIMIT
            and 0 <= output_tokens < _INT_LIMIT
        ):
            input_tokens = _check_tokens("input_tokens", input_tokens)
            output_tokens = _check_tokens("output_tokens", output_tokens)
        threshold = self.long_context_threshold
        if threshold is not None and input_tokens > threshold:
            return self._cost_with_extras(input_tokens, output_tokens, (0, 0, 0), 0, 0)
        cost = (
            input_tokens * self.input_price_per_mtok + output_tokens * self.output_price_per_mtok
        ) / 1_000_000
        return cost if cost < math.inf else sys.float_info.max

    def _cost_with_extras(
        self,
        input_tokens: int,
        output_tokens: int,
        cache: tuple[int, int, int],
        web_search_requests: int,
        cached_input_tokens: int,
    ) -> float:
        """`cost` of a call that also used the prompt cache or searched the web."""
        cache = (
            _check_tokens("cache_write_tokens", cache[0]),
            _check_tokens("cache_write_1h_tokens", cache[1]),
            _check_tokens("cache_read_tokens", cache[2]),
        )
        web_search_requests = _check_tokens("web_search_requests", web_search_requests)
        cached_input_tokens = _check_tokens("cached_input_tokens", cached_input_tokens)
        input_tokens = _check_tokens("input_tokens", input_tokens)
        output_tokens = _check_tokens("output_tokens", output_tokens)
        cached = min(cached_input_tokens, input_tokens)
        prompt = input_tokens + sum(cache)
        in_price, out_price = self.prices_for(prompt)
        cached_price = self.cached_input_price_per_mtok
        if cached_price is None:
            cached_price = in_price
        elif in_price != self.input_price_per_mtok:
            cached_price *= self._long_ratio()
        per_mtok = (
            (input_tokens - cached) * in_price
            + cached * cached_price
            + output_tokens * out_price
            + sum(map(operator.mul, cache, self._cache_prices(prompt)))
        )
        cost = per_mtok / 1_000_000 + web_search_requests * WEB_SEARCH_REQUEST_USD
        return cost if cost < math.inf else sys.float_info.max

    def prices_for(self, prompt_tokens: int | float) -> tuple[float, float]:
        """
        The input and output prices, USD per million tokens, of a call whose prompt has
        ``prompt_tokens`` tokens: the long-context prices when the prompt is over
        ``long_context_threshold`` (each price the entry leaves out is the standard
        one), else the standard prices.  The prompt counts every prompt token: the input
        tokens and, where the provider reports them apart (Anthropic), the tokens
        written to and read from its prompt cache.
        """
        threshold = self.long_context_threshold
        if threshold is None or not prompt_tokens > threshold:
            return self.input_price_per_mtok, self.output_price_per_mtok
        long_in = self.long_context_input_price_per_mtok
        long_out = self.long_context_output_price_per_mtok
        return (
            self.input_price_per_mtok if long_in is None else long_in,
            self.output_price_per_mtok if long_out is None else long_out,
        )

    def _long_ratio(self) -> float:
        # how much dearer a prompt token is past the threshold: what a cache price given
        # for the standard input price is scaled by (the provider's cache multipliers
        # stack on top of long-context prices)
        long_in = self.long_context_input_price_per_mtok
        if long_in is None or not self.input_price_per_mtok > 0.0:
            return 1.0
        return long_in / self.input_price_per_mtok

    def _cache_prices(self, prompt_tokens: int) -> tuple[float, float, float]:
        # `cache_prices` for a call with this many prompt tokens
        in_price = self.prices_for(prompt_tokens)[0]
        if in_price == self.input_price_per_mtok:
            return self.cache_prices
        return self._cache_prices_at(in_price, self._long_ratio())

    @property
    def cache_prices(self) -> tuple[float, float, float]:
        """
        USD per million prompt tokens written to the 5-minute cache, written to the
        1-hour cache and read from it: the entry's prices, or the default multipliers of
        the input price.
        """
        return self._cache_prices_at(self.input_price_per_mtok, 1.0)

    def _cache_prices_at(self, in_price: float, ratio: float) -> tuple[float, float, float]:
        # the cache prices when a prompt token costs ``in_price``: each the entry gives
        # times ``ratio``, the others the default multipliers of ``in_price``
        given = (
            self.cache_write_price_per_mtok,
            self.cache_write_1h_price_per_mtok,
            self.cache_read_price_per_mtok,
        )
        multipliers = (CACHE_WRITE_MULTIPLIER, CACHE_WRITE_1H_MULTIPLIER, CACHE_READ_MULTIPLIER)
        return cast(
            tuple[float, float, float],
            tuple(
                in_price * multiplier if price is None else price * ratio
                for price, multiplier in zip(given, multipliers, strict=True)
            ),
        )

    @property
    def price_per_mtok(self) -> float:
        """Input plus output price per million tokens: the key the registry sorts by."""
        return self.input_price_per_mtok + self.output_price_per_mtok

    def to_dict(self) -> dict[str, Any]:
        """The entry as it appears in a registry file."""
        return {
            "id": self.id,
            "provider": self.provider,
            "tier": self.tier.value,
            "input_price_per_mtok": self.input_price_per_mtok,
            "output_price_per_mtok": self.output_price_per_mtok,
            "context_window": self.context_window,
            "max_output_tokens": self.max_output_tokens,
            **(
                {}
                if self.capabilities == CAPABILITIES
                else {"capabilities": sorted(self.capabilities)}
            ),
            **{name: getattr(self, name) for name in _OPTIONAL_MODEL_FIELDS if getattr(self, name)},
            **{
                name: getattr(self, name)
                for name in _OPTIONAL_PRICE_FIELDS
                if getattr(self, name) is not None
            },
            **(
                {
                    "service_tier_prices": {
                        name: {
                            key: price
                            for key, price in zip(_TIER_PRICE_FIELDS, prices, strict=True)
                            if price is not None
                        }
                        for name, prices in self.service_tier_prices
                    }
                }
                if self.service_tier_prices
                else {}
            ),
        }


def _sort_key(model: ModelInfo) -> tuple[float, str]:
    return (model.price_per_mtok, model.id)


def _models_tuple(value: Iterable[ModelInfo]) -> tuple[ModelInfo, ...]:
    return tuple(value)


@frozen(kw_only=True)
class ModelRegistry:
    """
    An immutable table of models and the version of the prices it holds.

    Lookups are O(1) and `for_tier` answers from lists sorted once at construction.

    Raises:
        ConfigurationError: an entry is not a `ModelInfo`, or two entries share an id
            (ids compare case-insensitively).
    """

    models: tuple[ModelInfo, ...] = field(converter=_models_tuple)
    price_version: str = field(validator=_non_empty_str)
    _by_id: Mapping[str, ModelInfo] = field(init=False, repr=False, eq=False)
    _by_tier: Mapping[ModelTier, tuple[ModelInfo, ...]] = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        by_id: dict[str, ModelInfo] = {}
        first_index: dict[str, int] = {}
        for index, model in enumerate(self.models):
            if not isinstance(model, ModelInfo):
                raise ConfigurationError(
                    f"models[{index}] must be a ModelInfo, got {type(model).__name__}"
                )
            key = model.id.lower()
            if key in by_id:
                raise ConfigurationError(
                    f"duplicate model id {model.id!r} "
                    f"(models[{first_index[key]}] and models[{index}])"
                )
            by_id[key] = model
            first_index[key] = index
        by_tier = {
            tier: tuple(sorted((m for m in self.models if m.tier is tier), key=_sort_key))
            for tier in ModelTier
        }
        object.__setattr__(self, "_by_id", MappingProxyType(by_id))
        object.__setattr__(self, "_by_tier", MappingProxyType(by_tier))

    # ------------------------------------------------------------------ lookups

    def get(self, model_id: str) -> ModelInfo:
        """
        The model with this id (case-insensitive).

        Raises:
            ModelNotFoundError: (with ``model`` set) for an unknown id.
        """
        model = self._by_id.get(model_id.lower()) if isinstance(model_id, str) else None
        if model is None:
            known = ", ".join(sorted(m.id for m in self.models)) or "none"
            raise ModelNotFoundError(
                f"model {shown(model_id)} is not in the registry "
                f"(price table {self.price_version}); known models: {known}",
                model=model_id if isinstance(model_id, str) else shown(model_id),
            )
        return model

    def __contains__(self, model_id: object) -> bool:
        return isinstance(model_id, str) and model_id.lower() in self._by_id

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def for_tier(self, tier: ModelTier | str, *, provider: str | None = None) -> list[ModelInfo]:
        """
        The models of ``tier``, cheapest first: sorted by (input + output price per million
        tokens, id).

        Args:
            tier: a `ModelTier` or its value in any case.
            provider: only this provider's models.

        Returns:
            A new list (empty when nothing matches).

        Raises:
            ConfigurationError: an unknown tier.
        """
        try:
            key = _to_tier(tier)
        except RecordValidationError as exc:
            raise ConfigurationError(str(exc)) from exc
        models = self._by_tier[key]
        if provider is None:
            return list(models)
        return [m for m in models if m.provider == provider]

    def providers(self) -> list[str]:
        """Every provider named by a model, sorted."""
        return sorted({m.provider for m in self.models})

    def cost(self, model_id: str, input_tokens: int, output_tokens: int) -> float:
        """
        USD cost of a call to ``model_id`` with these token counts, at this table's prices.

        Raises:
            ModelNotFoundError: an unknown id.
            ValueError: bad counts.
        """
        return self.get(model_id).cost(input_tokens, output_tokens)

    # ------------------------------------------------------------------ derived registries

    def with_models(self, *models: ModelInfo, price_version: str | None = None) -> Self:
        """
        A registry with ``models`` added; an entry whose id (case-insensitive) already
        exists replaces it in place.  ``price_version`` replaces the version when given.
        """
        replacements = {m.id.lower(): m for m in models}
        kept = [replacements.pop(m.id.lower(), m) for m in self.models]
        kept.extend(m for m in models if m.id.lower() in replacements)
        return attrs.evolve(
            self,
            models=tuple(kept),
            price_version=self.price_version if price_version is None else price_version,
        )

    def without_models(self, *model_ids: str) -> Self:
        """A registry without these ids; raises `ModelNotFoundError` for an unknown one."""
        drop = {self.get(model_id).id for model_id in model_ids}
        return attrs.evolve(self, models=tuple(m for m in self.models if m.id not in drop))

    def replace(self, **changes: Any) -> Self:
        """A copy with ``models`` and/or ``price_version`` replaced (validated again)."""
        return attrs.evolve(self, **changes)

    # ------------------------------------------------------------------ construction

    @classmethod
    def default(cls) -> ModelRegistry:
        """
        The table shipped with this version: current Anthropic and OpenAI models at
        their published standard prices (see ``price_version`` and the ``source`` note in
        ``empathy_models/data/models.json``).  Loaded once; the same object is returned.
        """
        return _default_registry()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> ModelRegistry:
        """
        Build a registry from ``{"price_version": ..., "models": [{...}, ...]}``.

        With ``"extends": "default"`` the models are laid over the default table (same id
        replaces, new ids are added); an id listed twice in ``models`` is refused either
        way.

        Args:
            data: the table.
            source: where it came from, starting every error message.

        Raises:
            ConfigurationError: for a missing, unknown or invalid field; the message starts
                with ``source`` and names the field (``models[2].input_price_per_mtok``).
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"{source}: expected a table with 'price_version' and 'models', "
                f"got {type(data).__name__}"
            )
        unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
        if unknown:
            raise ConfigurationError(
                f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))} "
                f"(expected: {', '.join(sorted(_TOP_LEVEL_KEYS))})"
            )
        extends = data.get("extends")
        if extends not in (None, "default"):
            raise ConfigurationError(
                f'{source}: extends must be "default" or absent, got {shown(extends)}'
            )
        version = data.get("price_version")
        if not isinstance(version, str) or not version.strip():
            raise ConfigurationError(
                f"{source}: price_version must be a non-empty string, got {shown(version)}"
            )
        raw_models = data.get("models", [] if extends else None)
        if not isinstance(raw_models, list | tuple):
            raise ConfigurationError(
                f"{source}: models must be a list of tables, got {type(raw_models).__name__}"
            )
        models = [
            _model_from_dict(entry, f"{source}: models[{i}]") for i, entry in enumerate(raw_models)
        ]
        _refuse_duplicates(models, source)
        try:
            if extends == "default":
                return _default_registry().with_models(*models, price_version=version)
            return cls(models=models, price_version=version)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ModelRegistry:
        """
        Read a registry from a ``.toml`` or ``.json`` file (shape as in `from_dict`).

        Raises:
            ConfigurationError: naming the path, when the file is missing, cannot be parsed
                (nested too deeply included), has another suffix, holds an invalid entry
                (naming the field), or the path holds a NUL byte.
        """
        file = Path(path)
        suffix = file.suffix.lower()
        if suffix not in (".toml", ".json"):
            raise ConfigurationError(
                f"{file}: registry files must end in .toml or .json, not {suffix or '(none)'!r}"
            )
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"{file}: cannot read the registry file ({exc.strerror})"
            ) from exc
        except ValueError as exc:  # the OS refuses the path itself: a NUL byte in it
            raise ConfigurationError(
                f"{str(file)!r}: not a usable registry file path ({exc})"
            ) from exc
        kind = suffix[1:].upper()
        try:
            data = tomllib.loads(raw.decode("utf-8")) if suffix == ".toml" else json.loads(raw)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{file}: not valid {kind}: {exc}") from exc
        except RecursionError as exc:
            raise ConfigurationError(
                f"{file}: not valid {kind}: arrays or tables nested too deeply"
            ) from exc
        return cls.from_dict(data, source=str(file))

    def to_dict(self) -> dict[str, Any]:
        """The registry in the file shape `from_dict` reads."""
        return {
            "price_version": self.price_version,
            "models": [m.to_dict() for m in self.models],
        }


def _refuse_duplicates(models: list[ModelInfo], source: str) -> None:
    """
    Raise `ConfigurationError` naming the two indexes when ``models`` (a file's own
    entries) hold an id twice, compared case-insensitively: with ``extends`` too, where
    one would silently replace the other.
    """
    first: dict[str, int] = {}
    for index, model in enumerate(models):
        key = model.id.lower()
        if key in first:
            raise ConfigurationError(
                f"{source}: duplicate model id {model.id!r} "
                f"(models[{first[key]}] and models[{index}])"
            )
        first[key] = index


def _model_from_dict(entry: object, where: str) -> ModelInfo:
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where}: expected a table, got {type(entry).__name__}")
    unknown = sorted(
        set(entry) - set(_MODEL_FIELDS) - set(_OPTIONAL_ENTRY_FIELDS) - {"capabilities"}
    )
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))} "
            f"(expected: {', '.join(_MODEL_FIELDS)}; optional: "
            f"{', '.join(_OPTIONAL_ENTRY_FIELDS)})"
        )
    missing = [name for name in _MODEL_FIELDS if name not in entry]
    if missing:
        raise ConfigurationError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    try:
        optional = {name: entry[name] for name in _OPTIONAL_ENTRY_FIELDS if name in entry}
        return ModelInfo(
            **{name: entry[name] for name in _MODEL_FIELDS},
            capabilities=entry.get("capabilities"),
            **optional,
        )
    except RecordValidationError as exc:
        raise ConfigurationError(f"{where}.{exc.path}: {exc}") from exc


@functools.cache
def _default_registry() -> ModelRegistry:
    text = resources.files("empathy_models").joinpath("data", "models.json").read_text("utf-8")
    return ModelRegistry.from_dict(json.loads(text), source="empathy_models/data/models.json")
