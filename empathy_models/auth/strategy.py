"""
`AuthStrategy`: subscription or API per module size, validated at construction, loaded
from and saved to the auth strategy file (see `empathy_models.auth`).
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Self, TypeVar, cast

import anyio.to_thread
import attrs
from attrs import field, frozen

from .._validators import check, failure, instance_of, integer, number, shown
from ..exceptions import AuthFileError, ConfigurationError, RecordValidationError
from ..records import ModelTier
from ..registry import ModelRegistry
from ._files import (
    _atomic_write,
    _lexists,
    _locked,
    _read_json,
    _reset_hint,
    auth_strategy_file,
)

__all__ = [
    "API_CONTEXT_TOKENS",
    "AUTH_SCHEMA_VERSION",
    "AuthCostEstimate",
    "AuthMode",
    "AuthStrategy",
    "CostStage",
    "DOC_PIPELINE",
    "SUBSCRIPTION_CONTEXT_TOKENS",
    "StageCost",
    "SubscriptionTier",
    "get_module_size_category",
]

AUTH_SCHEMA_VERSION: Final = 1
"""Version written under ``"v"`` in the auth strategy file."""

SUBSCRIPTION_CONTEXT_TOKENS: Final = 200_000
"""Context window assumed for subscription use (200K tokens)."""

API_CONTEXT_TOKENS: Final = 1_000_000
"""Context window assumed for API use (1M tokens)."""


# --------------------------------------------------------------------------- enums


class SubscriptionTier(enum.StrEnum):
    """The user's subscription (the values the strategy file stores)."""

    FREE = "free"
    PRO = "pro"
    MAX = "max"
    ENTERPRISE = "enterprise"
    API_ONLY = "api_only"


class AuthMode(enum.StrEnum):
    """How a module's LLM work is paid: subscription quota, per token, or decided by size."""

    SUBSCRIPTION = "subscription"
    API = "api"
    AUTO = "auto"


# --------------------------------------------------------------------------- validators

E = TypeVar("E", bound=enum.StrEnum)


_fail = failure(RecordValidationError, owner="AuthStrategy")


def _to_enum(enum_type: type[E], name: str, value: object) -> E:
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        try:
            return enum_type(value.strip().lower())
        except ValueError:
            pass
    allowed = ", ".join(m.value for m in enum_type)
    raise RecordValidationError(
        f"AuthStrategy.{name} must be one of {allowed}, got {shown(value)}", path=name
    )


def _to_tier(value: object) -> SubscriptionTier:
    return _to_enum(SubscriptionTier, "subscription_tier", value)


def _to_mode(value: object) -> AuthMode:
    return _to_enum(AuthMode, "default_mode", value)


_positive_int = integer(_fail, low=1, type_why="must be an integer (lines)", why="must be >= 1")


def _to_float(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # beyond any float: the validator names the field
            return math.inf
    return value


_MAX_TOKENS_PER_LINE: Final = 10_000.0
"""The largest ``loc_to_tokens_multiplier`` accepted (a line of code is never more)."""


# the converter has made every int a float by now
_positive_finite = number(
    _fail,
    low=0,
    low_open=True,
    high=_MAX_TOKENS_PER_LINE,
    type_why="must be a number",
    why="must be a finite number > 0",
    high_why=f"must be at most {_MAX_TOKENS_PER_LINE:g} tokens per line",
)
_bool = instance_of(_fail, bool, why="must be true or false")


def _json_metadata(value: object) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise RecordValidationError(
            f"AuthStrategy.metadata must be a mapping, got {shown(value)}", path="metadata"
        )
    for key in value:
        if not isinstance(key, str):
            raise RecordValidationError(
                f"AuthStrategy.metadata keys must be strings, got {shown(key)}", path="metadata"
            )
    try:
        # a JSON round trip both proves the value can be saved and deep-copies it
        copy = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise RecordValidationError(
            f"AuthStrategy.metadata must hold JSON values only: {exc}", path="metadata"
        ) from exc
    return MappingProxyType(copy)


_lines = integer(
    failure(ValueError), low=0, type_why="must be an integer number of lines", why="must be >= 0"
)


def _lines_arg(lines: object, name: str = "lines") -> int:
    return check(_lines, name, cast(int, lines))


# --------------------------------------------------------------------------- cost model


@frozen(kw_only=True)
class CostStage:
    """
    One stage of the pipeline `AuthStrategy.estimate_cost` prices.

    Args:
        name: the stage's name in the estimate.
        tier: the stage runs on the cheapest model of this tier.
        input_ratio: the stage reads this many times the module's tokens.
        output_ratio: the stage writes this many times the module's tokens.
    """

    name: str
    tier: ModelTier = field(converter=ModelTier)
    input_ratio: float
    output_ratio: float


DOC_PIPELINE: Final[tuple[CostStage, ...]] = (
    CostStage(name="outline", tier=ModelTier.CHEAP, input_ratio=0.6, output_ratio=0.15),
    CostStage(name="write", tier=ModelTier.CAPABLE, input_ratio=1.25, output_ratio=2.5),
    CostStage(name="polish", tier=ModelTier.PREMIUM, input_ratio=1.5, output_ratio=1.0),
    CostStage(name="api_reference", tier=ModelTier.CHEAP, input_ratio=1.0, output_ratio=0.25),
)
"""
The document-generation pipeline (outline, write, polish, API reference on cheap /
capable / premium / cheap models).  The ratios are calibrated so that a 1,000-line
module (4,000 tokens) uses 3K, 15K, 10K and 5K tokens per stage; the volumes scale with
the module.
"""


@frozen(kw_only=True)
class StageCost:
    """The priced tokens of one pipeline stage."""

    stage: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float


@frozen(kw_only=True)
class AuthCostEstimate:
    """
    What one module's pipeline costs in a given mode.

    ``mode`` is never AUTO (it is resolved first).  In SUBSCRIPTION mode
    ``monetary_cost`` is 0 and ``quota_cost`` describes the quota used; in API mode
    ``monetary_cost`` is the sum of ``stages`` at the registry's list prices
    (``price_version``).  ``api_cost`` is the API price in both modes, so the two can be
    compared.  ``fits_in_context`` compares the module's tokens with
    `SUBSCRIPTION_CONTEXT_TOKENS` or `API_CONTEXT_TOKENS`.  `to_dict` returns the
    strategy file's keys.
    """

    mode: AuthMode
    monetary_cost: float
    quota_cost: str | None
    tokens_used: int
    fits_in_context: bool
    api_cost: float
    price_version: str
    stages: tuple[StageCost, ...]

    def to_dict(self) -> dict[str, Any]:
        """``mode, monetary_cost, quota_cost, tokens_used, fits_in_context`` first, then
        ``api_cost``, ``price_version`` and the per-stage breakdown."""
        return {
            "mode": self.mode.value,
            "monetary_cost": self.monetary_cost,
            "quota_cost": self.quota_cost,
            "tokens_used": self.tokens_used,
            "fits_in_context": self.fits_in_context,
            "api_cost": self.api_cost,
            "price_version": self.price_version,
            "stages": [attrs.asdict(s) for s in self.stages],
        }


# --------------------------------------------------------------------------- the strategy

_FIELD_ORDER: Final = (
    "subscription_tier",
    "default_mode",
    "small_module_threshold",
    "medium_module_threshold",
    "loc_to_tokens_multiplier",
    "setup_completed",
    "prefer_subscription",
    "cost_optimization",
    "metadata",
)


@frozen(kw_only=True)
class AuthStrategy:
    """
    The saved choice between subscription and API, with its thresholds and defaults.

    Instances are immutable; `replace` returns a changed, re-validated copy.

    Args:
        subscription_tier: a `SubscriptionTier` or its value as a string, any case
            (default PRO).
        default_mode: an `AuthMode` or its value as a string, any case (default AUTO).
        small_module_threshold: lines; a smaller module is small (>= 1, default 500).
        medium_module_threshold: lines; a smaller module is medium (above
            ``small_module_threshold``, default 2000).
        loc_to_tokens_multiplier: tokens per line of code (0 < x <= 1e4, default 4.0).
        setup_completed: default True.
        prefer_subscription: medium modules of size-based tiers use the subscription
            (default True).
        cost_optimization: stored; no logic reads it (default True).
        metadata: a JSON mapping (default empty).

    Raises:
        RecordValidationError: a broken invariant (every one is checked at
            construction); its ``path`` names the field.
    """

    subscription_tier: SubscriptionTier = field(
        default=SubscriptionTier.PRO,
        converter=_to_tier,
    )
    default_mode: AuthMode = field(default=AuthMode.AUTO, converter=_to_mode)
    small_module_threshold: int = field(default=500, validator=_positive_int)
    medium_module_threshold: int = field(default=2000, validator=_positive_int)
    loc_to_tokens_multiplier: float = field(
        default=4.0, converter=_to_float, validator=_positive_finite
    )
    setup_completed: bool = field(default=True, validator=_bool)
    prefer_subscription: bool = field(default=True, validator=_bool)
    cost_optimization: bool = field(default=True, validator=_bool)
    metadata: Mapping[str, Any] = field(factory=dict, converter=_json_metadata)

    def __attrs_post_init__(self) -> None:
        if self.small_module_threshold >= self.medium_module_threshold:
            raise RecordValidationError(
                "AuthStrategy.small_module_threshold must be less than "
                f"medium_module_threshold, got {self.small_module_threshold} >= "
                f"{self.medium_module_threshold}",
                path="small_module_threshold",
            )

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and validated again."""
        return attrs.evolve(self, **changes)

    # ------------------------------------------------------------------ decisions

    def size_category(self, lines: int) -> str:
        """``"small"``, ``"medium"`` or ``"large"`` by this strategy's two thresholds."""
        n = _lines_arg(lines)
        if n < self.small_module_threshold:
            return "small"
        if n < self.medium_module_threshold:
            return "medium"
        return "large"

    def get_recommended_mode(self, lines: int) -> AuthMode:
        """
        The mode to use for a module of ``lines`` lines; never AUTO.

        The decision table, first match wins:

        1. ``default_mode`` is SUBSCRIPTION or API: that mode (a pin wins over size).
        2. tier PRO: API (pay-per-token is cheaper than the Pro quota; every size).
        3. tier API_ONLY: API.
        4. tiers FREE, MAX and ENTERPRISE are size-based:
           ``lines < small_module_threshold``: SUBSCRIPTION;
           ``lines < medium_module_threshold``: SUBSCRIPTION if ``prefer_subscription``
           else API; otherwise API (the module needs the larger API context window).

        Boundaries are strict: with the defaults 499 is small, 500 medium, 2000 large.

        Raises:
            ValueError: a negative or non-integer ``lines``.
        """
        return self._decide(lines)[0]

    def explain_recommended_mode(self, lines: int) -> str:
        """One sentence saying which rule of `get_recommended_mode` decided, and why."""
        return self._decide(lines)[1]

    def _decide(self, lines: int) -> tuple[AuthMode, str]:
        n = _lines_arg(lines)
        if self.default_mode is not AuthMode.AUTO:
            return self.default_mode, f"default_mode is pinned to {self.default_mode.value}"
        tier = self.subscription_tier
        if tier is SubscriptionTier.PRO:
            return AuthMode.API, "on the Pro tier pay-per-token API use is cheaper than quota"
        if tier is SubscriptionTier.API_ONLY:
            return AuthMode.API, "the api_only tier has no subscription quota"
        category = self.size_category(n)
        if category == "small":
            return (
                AuthMode.SUBSCRIPTION,
                f"small module ({n} < {self.small_module_threshold} lines) fits the "
                f"{tier.value} subscription's context",
            )
        if category == "medium":
            if self.prefer_subscription:
                return (
                    AuthMode.SUBSCRIPTION,
                    f"medium module ({n} < {self.medium_module_threshold} lines) and "
                    "prefer_subscription is on",
                )
            return (
                AuthMode.API,
                f"medium module ({n} < {self.medium_module_threshold} lines) and "
                "prefer_subscription is off",
            )
        return (
            AuthMode.API,
            f"large module ({n} >= {self.medium_module_threshold} lines) needs the API's "
            "larger context window",
        )

    def estimate_tokens(self, lines: int) -> int:
        """``int(lines * loc_to_tokens_multiplier)`` (truncated): 1,000 lines -> 4,000 tokens."""
        return int(_lines_arg(lines) * self.loc_to_tokens_multiplier)

    def estimate_cost(
        self,
        lines: int,
        mode: AuthMode | str | None = None,
        *,
        registry: ModelRegistry | None = None,
        provider: str = "anthropic",
        pipeline: tuple[CostStage, ...] = DOC_PIPELINE,
    ) -> AuthCostEstimate:
        """
        What running ``pipeline`` over a module of ``lines`` lines costs in ``mode``.

        Args:
            lines, pipeline: the module's size, and the stages priced.
            mode: None or AUTO is resolved with `get_recommended_mode` first.
            registry, provider: each stage is priced with `ModelInfo.cost` on the cheapest
                ``provider`` model of its tier in ``registry`` (default
                `ModelRegistry.default`), so the cost grows with the module and follows
                the registry's prices.

        Raises:
            ValueError: bad ``lines``.
            ConfigurationError: an unknown mode, or no ``provider`` model in the registry for
                a stage's tier.
        """
        if mode is None:
            resolved = self.get_recommended_mode(lines)
        else:
            try:
                resolved = AuthMode(mode.lower() if isinstance(mode, str) else mode)
            except ValueError as exc:
                raise ConfigurationError(
                    f"mode must be one of subscription, api, auto, got {shown(mode)}"
                ) from exc
            if resolved is AuthMode.AUTO:
                resolved = self.get_recommended_mode(lines)
        tokens = self.estimate_tokens(lines)
        reg = registry if registry is not None else ModelRegistry.default()
        stages: list[StageCost] = []
        for stage in pipeline:
            candidates = reg.for_tier(stage.tier, provider=provider)
            if not candidates:
                raise ConfigurationError(
                    f"the registry (prices {reg.price_version}) has no {provider!r} model "
                    f"of tier {stage.tier.value!r} to price the {stage.name!r} stage"
                )
            model = candidates[0]
            in_tokens = math.ceil(tokens * stage.input_ratio)
            out_tokens = math.ceil(tokens * stage.output_ratio)
            stages.append(
                StageCost(
                    stage=stage.name,
                    model=model.id,
                    input_tokens=in_tokens,
                    output_tokens=out_tokens,
                    cost_usd=model.cost(in_tokens, out_tokens),
                )
            )
        api_cost = round(sum(s.cost_usd for s in stages), 6)
        if resolved is AuthMode.SUBSCRIPTION:
            return AuthCostEstimate(
                mode=resolved,
                monetary_cost=0.0,
                quota_cost=f"~{tokens:,} tokens from subscription quota",
                tokens_used=tokens,
                fits_in_context=tokens < SUBSCRIPTION_CONTEXT_TOKENS,
                api_cost=api_cost,
                price_version=reg.price_version,
                stages=tuple(stages),
            )
        return AuthCostEstimate(
            mode=resolved,
            monetary_cost=api_cost,
            quota_cost=None,
            tokens_used=tokens,
            fits_in_context=tokens < API_CONTEXT_TOKENS,
            api_cost=api_cost,
            price_version=reg.price_version,
            stages=tuple(stages),
        )

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        """
        ``{"v": 1, ...}`` then the file's keys in order: ``subscription_tier,
        default_mode, small_module_threshold, medium_module_threshold,
        loc_to_tokens_multiplier, setup_completed, prefer_subscription,
        cost_optimization, metadata``; enums as their string values.
        """
        out: dict[str, Any] = {"v": AUTH_SCHEMA_VERSION}
        for name in _FIELD_ORDER:
            value = getattr(self, name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif name == "metadata":
                value = json.loads(json.dumps(dict(value)))
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """
        Build a strategy from `to_dict` output (or an unversioned file, without ``"v"``).

        Missing keys take the defaults; unknown keys are ignored, so a file written by a
        newer version still loads.

        Raises:
            RecordValidationError: a bad value, a non-mapping, or a ``"v"`` that is not a
                positive integer; its ``path`` names the field (``"small_module_threshold"``).
        """
        if not isinstance(data, Mapping):
            raise RecordValidationError(
                f"AuthStrategy: expected a JSON object, got {type(data).__name__}"
            )
        version = data.get("v", AUTH_SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RecordValidationError(
                f"AuthStrategy: 'v' must be a positive integer, got {shown(version)}", path="v"
            )
        return cls(**{name: data[name] for name in _FIELD_ORDER if name in data})

    # ------------------------------------------------------------------ the file

    @classmethod
    def load_existing(cls, path: str | os.PathLike[str] | None = None) -> Self | None:
        """
        The strategy saved at ``path`` (default `auth_strategy_file`), or None when there
        is no file.  Blocking.

        Raises:
            AuthFileError: naming the path, when the file exists but cannot be read, is not
                JSON, or holds an invalid value (the message names the field, and says to
                upgrade when a newer release wrote the file).
        """
        file = Path(path) if path is not None else auth_strategy_file()
        data = _read_json(file)
        if data is None:
            return None
        try:
            return cls.from_dict(data)
        except RecordValidationError as exc:
            version = data.get("v") if isinstance(data, Mapping) else None
            if isinstance(version, int) and version > AUTH_SCHEMA_VERSION:
                # a value a newer release added: editing or moving the file would drop
                # that release's settings
                raise AuthFileError(
                    f"{file}: written by a newer empathy-models (format v{version}; this "
                    f"one reads v{AUTH_SCHEMA_VERSION}) with a value this version does not "
                    f"know ({exc}); upgrade empathy-models to use it",
                    path=file,
                ) from exc
            raise AuthFileError(
                f"{file}: invalid auth strategy ({exc}); fix the value, or move the file "
                f"away ({_reset_hint(file)})",
                path=file,
            ) from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Self:
        """
        The strategy saved at ``path`` (default `auth_strategy_file`, resolved now), or the
        defaults when the file does not exist.  Blocking: use `aload` from async code.

        Raises:
            AuthFileError: naming the path, for a file that exists but is unreadable or
                corrupt; it is never replaced by defaults.
        """
        found = cls.load_existing(path)
        return found if found is not None else cls()

    @classmethod
    async def aload(cls, path: str | os.PathLike[str] | None = None) -> Self:
        """`load` in a worker thread, for async code."""
        return await anyio.to_thread.run_sync(cls.load, path)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """
        Write the strategy to ``path`` (default `auth_strategy_file`) and return the path.

        Atomic: the JSON goes to a temporary file in the same directory, is fsynced and
        moved over the target with ``os.replace``, so readers see the old or the new file,
        never a torn one.  The file is 0600; a missing parent directory is created 0700.
        A symlink is written through: its target is replaced and the link kept.
        Keys of the existing file that this version does not know (written by a newer
        release) are kept, and so is its ``"v"`` when newer.  Saves, resets and restores
        take an exclusive ``flock`` on the file's parent directory, shared by every process
        (so they never interleave); concurrent saves are last-writer-wins.  Blocking: use
        `asave` from async code.

        Raises:
            AuthFileError: naming an existing file that does not parse; it is not
                overwritten (back it up or remove it first).  Also naming a path the
                system cannot use (a NUL byte, a name over the length limit).
        """
        file = Path(path) if path is not None else auth_strategy_file()
        _lexists(file)
        with _locked(file):
            return self._save_locked(file)

    @classmethod
    def update(cls, path: str | os.PathLike[str] | None = None, **changes: Any) -> Self:
        """
        Apply ``changes`` to the strategy saved at ``path`` (default `auth_strategy_file`;
        the defaults when there is no file), save the result and return it.  Blocking.

        The file is read, changed and written under the lock `save` takes, so updates of
        different fields made at the same time, from any process, all land (a
        ``load().replace(...).save()`` of one would be overwritten by the other's).

        Raises:
            RecordValidationError: ``changes`` break an invariant (with the saved
                strategy); the file is left as it was.
            AuthFileError: as for `load` and `save`.
        """
        file = Path(path) if path is not None else auth_strategy_file()
        _lexists(file)
        with _locked(file):
            existing = cls.load_existing(file)
            updated = (existing if existing is not None else cls()).replace(**changes)
            updated._save_locked(file)
        return updated

    def _save_locked(self, file: Path) -> Path:
        data = self.to_dict()
        if _lexists(file):
            try:
                type(self).load_existing(file)
            except AuthFileError as exc:
                raise AuthFileError(f"refusing to overwrite {exc}", path=file) from exc
            existing = _read_json(file)
            if isinstance(existing, Mapping):
                newer = existing.get("v")
                if isinstance(newer, int) and not isinstance(newer, bool) and newer > data["v"]:
                    data["v"] = newer
                for key, value in existing.items():
                    if key != "v" and key not in data:
                        data[key] = value
        payload = json.dumps(data, indent=2) + "\n"
        _atomic_write(file, payload.encode("utf-8"))
        return file

    async def asave(self, path: str | os.PathLike[str] | None = None) -> Path:
        """`save` in a worker thread, for async code."""
        return await anyio.to_thread.run_sync(self.save, path)


def get_module_size_category(lines: int, strategy: AuthStrategy | None = None) -> str:
    """
    ``"small"``, ``"medium"`` or ``"large"`` by ``strategy``'s thresholds (default
    `AuthStrategy()`: 500 and 2000), so it always agrees with `get_recommended_mode`.
    """
    return (strategy if strategy is not None else AuthStrategy()).size_category(lines)
