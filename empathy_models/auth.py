"""
Subscription or API: which way to pay for the LLM work on a module, and where that
choice is kept.

`AuthStrategy` holds the choice (subscription tier, default mode, the module-size
thresholds 500 / 2000 lines and the lines-to-tokens multiplier 4.0 of the original)
and recommends an `AuthMode` per module size.  It is validated at construction and
saved in a versioned JSON file under ``$EMPATHY_HOME`` (default ``~/.empathy``)::

    strategy = AuthStrategy.load()                   # defaults when no file exists yet
    report = count_lines_of_code("src/app/models.py")
    strategy.get_recommended_mode(report.effective_lines)
    strategy.estimate_cost(report.effective_lines)   # priced from the model registry
    strategy.replace(small_module_threshold=300).save()

The file is never lost by accident: `AuthStrategy.save` is atomic (a temporary file in
the same directory, fsync, ``os.replace``), creates the file 0600 and its directory
0700, and refuses to overwrite a file it cannot parse; `AuthStrategy.load` raises
`AuthFileError` naming the path for a corrupt file instead of returning defaults;
`reset_auth_strategy` copies the file to a timestamped backup before removing it, and
`restore_auth_strategy` brings the newest backup back.

File functions block on disk I/O.  From async code use `AuthStrategy.aload`,
`AuthStrategy.asave` and `acount_lines_of_code`, which run them in a worker thread.
Concurrent saves from several processes are last-writer-wins (each write is whole,
never torn).
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Self, TypeVar

import anyio.to_thread
import attrs
from attrs import field, frozen

from .exceptions import ConfigurationError, EmpathyModelsError, RecordValidationError
from .records import ModelTier
from .registry import ModelRegistry

__all__ = [
    "API_CONTEXT_TOKENS",
    "AUTH_STRATEGY_FILE",
    "AuthCostEstimate",
    "AuthFileError",
    "AuthMode",
    "AuthStrategy",
    "CostStage",
    "DOC_PIPELINE",
    "LINE_EQUIVALENT_CHARS",
    "LinesOfCodeReport",
    "SUBSCRIPTION_CONTEXT_TOKENS",
    "SourceFileError",
    "StageCost",
    "SubscriptionTier",
    "acount_lines_of_code",
    "auth_strategy_file",
    "count_lines_of_code",
    "empathy_home",
    "get_module_size_category",
    "list_auth_strategy_backups",
    "reset_auth_strategy",
    "restore_auth_strategy",
]

AUTH_SCHEMA_VERSION: Final = 1
"""Version written under ``"v"`` in the auth strategy file."""

SUBSCRIPTION_CONTEXT_TOKENS: Final = 200_000
"""Context window assumed for subscription use (the original's 200K)."""

API_CONTEXT_TOKENS: Final = 1_000_000
"""Context window assumed for API use (the original's 1M)."""

LINE_EQUIVALENT_CHARS: Final = 120
"""A code line longer than this counts as ``ceil(len / LINE_EQUIVALENT_CHARS)`` lines
in `LinesOfCodeReport.effective_lines`."""


# --------------------------------------------------------------------------- paths


def empathy_home() -> Path:
    """
    The directory empathy-models keeps its files in, resolved now.

    ``$EMPATHY_HOME`` when set and non-empty (``~`` expanded), else ``~/.empathy``.
    The directory is not created here.
    """
    configured = os.environ.get("EMPATHY_HOME", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".empathy"


def auth_strategy_file() -> Path:
    """The auth strategy file, ``$EMPATHY_HOME/auth_strategy.json``, resolved at call time."""
    return empathy_home() / "auth_strategy.json"


AUTH_STRATEGY_FILE: Final[Path] = auth_strategy_file()
"""
The auth strategy file as it resolved **when this module was imported** (kept for
compatibility with the original's constant).  Everything in this package resolves the
path at call time with `auth_strategy_file`, so a later change of ``$EMPATHY_HOME`` is
honoured there and not here; prefer the function.
"""


# --------------------------------------------------------------------------- errors


class AuthFileError(ConfigurationError):
    """
    The auth strategy file (or a backup of it) cannot be read, parsed or written.

    ``path`` is the file concerned.  The message says what is wrong and how to recover;
    it never quotes the file's contents.
    """

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_auth_file_error, (str(self), self.path))


def _rebuild_auth_file_error(message: str, path: Path | None) -> AuthFileError:
    return AuthFileError(message, path=path)


class SourceFileError(EmpathyModelsError, OSError):
    """
    A file given to `count_lines_of_code` is missing, a directory, not a regular file,
    unreadable or binary.  ``path`` is the file concerned.
    """

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_source_file_error, (str(self), self.path))


def _rebuild_source_file_error(message: str, path: Path | None) -> SourceFileError:
    return SourceFileError(message, path=path)


# --------------------------------------------------------------------------- enums


class SubscriptionTier(enum.StrEnum):
    """The user's subscription (values as in the original's file)."""

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


def _fail(attribute: attrs.Attribute[Any], value: object, why: str) -> RecordValidationError:
    return RecordValidationError(
        f"AuthStrategy.{attribute.name} {why}, got {value!r}", path=attribute.name
    )


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
        f"AuthStrategy.{name} must be one of {allowed}, got {value!r}", path=name
    )


def _to_tier(value: object) -> SubscriptionTier:
    return _to_enum(SubscriptionTier, "subscription_tier", value)


def _to_mode(value: object) -> AuthMode:
    return _to_enum(AuthMode, "default_mode", value)


def _positive_int(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(attribute, value, "must be an integer (lines)")
    if value < 1:
        raise _fail(attribute, value, "must be >= 1")


def _to_float(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # beyond any float: the validator names the field
            return math.inf
    return value


_MAX_TOKENS_PER_LINE: Final = 10_000.0
"""The largest ``loc_to_tokens_multiplier`` accepted (a line of code is never more)."""


def _positive_finite(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, float):
        raise _fail(attribute, value, "must be a number")
    if not math.isfinite(value) or value <= 0:
        raise _fail(attribute, value, "must be a finite number > 0")
    if value > _MAX_TOKENS_PER_LINE:
        raise _fail(attribute, value, f"must be at most {_MAX_TOKENS_PER_LINE:g} tokens per line")


def _bool(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(attribute, value, "must be true or false")


def _json_metadata(value: object) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise RecordValidationError(
            f"AuthStrategy.metadata must be a mapping, got {value!r}", path="metadata"
        )
    for key in value:
        if not isinstance(key, str):
            raise RecordValidationError(
                f"AuthStrategy.metadata keys must be strings, got {key!r}", path="metadata"
            )
    try:
        # a JSON round trip both proves the value can be saved and deep-copies it
        copy = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise RecordValidationError(
            f"AuthStrategy.metadata must hold JSON values only: {exc}", path="metadata"
        ) from exc
    return MappingProxyType(copy)


def _lines_arg(lines: object, name: str = "lines") -> int:
    if isinstance(lines, bool) or not isinstance(lines, int):
        raise ValueError(f"{name} must be an integer number of lines, got {lines!r}")
    if lines < 0:
        raise ValueError(f"{name} must be >= 0, got {lines!r}")
    return lines


# --------------------------------------------------------------------------- cost model


@frozen(kw_only=True)
class CostStage:
    """
    One stage of the pipeline `AuthStrategy.estimate_cost` prices.

    The stage reads ``input_ratio`` x the module's tokens and writes ``output_ratio`` x
    them, on the cheapest model of ``tier``.
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
The document-generation pipeline of the original (outline, write, polish, API
reference on cheap / capable / premium / cheap models).  The ratios are calibrated so
that a 1,000-line module (4,000 tokens) uses the original's per-stage volumes (3K,
15K, 10K and 5K tokens); unlike the original, the volumes scale with the module.
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
    compared.  `to_dict` returns the original's keys.
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
        """``mode, monetary_cost, quota_cost, tokens_used, fits_in_context`` (as the
        original), then ``api_cost``, ``price_version`` and the per-stage breakdown."""
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
    The saved choice between subscription and API, with the original's fields and defaults.

    ==========================  =====================  =======
    field                       type                   default
    ==========================  =====================  =======
    ``subscription_tier``       `SubscriptionTier`     PRO
    ``default_mode``            `AuthMode`             AUTO
    ``small_module_threshold``  int (lines, >= 1)      500
    ``medium_module_threshold`` int (lines, > small)   2000
    ``loc_to_tokens_multiplier`` float (0 < x <= 1e4)  4.0
    ``setup_completed``         bool                   True
    ``prefer_subscription``     bool                   True
    ``cost_optimization``       bool                   True (stored; no logic reads it)
    ``metadata``                JSON mapping           {}
    ==========================  =====================  =======

    Enum fields accept their values as strings (any case).  Every invariant is checked
    at construction and a violation raises `RecordValidationError` whose ``path`` names
    the field.  Instances are immutable; `replace` returns a changed, re-validated copy.
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

        The original's decision table, first match wins:

        1. ``default_mode`` is SUBSCRIPTION or API: that mode (a pin wins over size).
        2. tier PRO: API (pay-per-token is cheaper than the Pro quota; every size).
        3. tier API_ONLY: API.
        4. tiers FREE, MAX and ENTERPRISE are size-based (the original's docstring named
           only Max and Enterprise, but FREE behaves the same):
           ``lines < small_module_threshold``: SUBSCRIPTION;
           ``lines < medium_module_threshold``: SUBSCRIPTION if ``prefer_subscription``
           else API; otherwise API (the module needs the larger API context window).

        Boundaries are strict: with the defaults 499 is small, 500 medium, 2000 large.
        Raises `ValueError` for a negative or non-integer ``lines``.
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

        ``mode`` None or AUTO is resolved with `get_recommended_mode` first (the
        original priced an explicit AUTO as API).  Each stage is priced on the cheapest
        ``provider`` model of its tier in ``registry`` (default
        `ModelRegistry.default`) with `ModelInfo.cost`, so the cost grows with the
        module and follows the registry's prices.  ``fits_in_context`` compares the
        module's tokens with `SUBSCRIPTION_CONTEXT_TOKENS` or `API_CONTEXT_TOKENS`.

        Raises `ValueError` for bad ``lines``, `ConfigurationError` for an unknown mode
        or when the registry has no ``provider`` model for a stage's tier.
        """
        if mode is None:
            resolved = self.get_recommended_mode(lines)
        else:
            try:
                resolved = AuthMode(mode.lower() if isinstance(mode, str) else mode)
            except ValueError as exc:
                raise ConfigurationError(
                    f"mode must be one of subscription, api, auto, got {mode!r}"
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
        ``{"v": 1, ...}`` then the original's keys in its order: ``subscription_tier,
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
        Build a strategy from `to_dict` output (or the original's file, which has no ``"v"``).

        Missing keys take the defaults; unknown keys are ignored, so a file written by
        a newer version still loads.  A bad value raises `RecordValidationError` whose
        ``path`` names the field (``"small_module_threshold"``); so does a non-mapping
        or a ``"v"`` that is not a positive integer.
        """
        if not isinstance(data, Mapping):
            raise RecordValidationError(
                f"AuthStrategy: expected a JSON object, got {type(data).__name__}"
            )
        version = data.get("v", AUTH_SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RecordValidationError(
                f"AuthStrategy: 'v' must be a positive integer, got {version!r}", path="v"
            )
        return cls(**{name: data[name] for name in _FIELD_ORDER if name in data})

    # ------------------------------------------------------------------ the file

    @classmethod
    def load_existing(cls, path: str | os.PathLike[str] | None = None) -> Self | None:
        """
        The strategy saved at ``path`` (default `auth_strategy_file`), or None when
        there is no file.

        Raises `AuthFileError` naming the path when the file exists but cannot be read,
        is not JSON, or holds an invalid value (the message names the field).  Blocking.
        """
        file = Path(path) if path is not None else auth_strategy_file()
        data = _read_json(file)
        if data is None:
            return None
        try:
            return cls.from_dict(data)
        except RecordValidationError as exc:
            raise AuthFileError(
                f"{file}: invalid auth strategy ({exc}); fix the value, or move the file "
                "away (`empathy-models auth reset --yes` keeps a backup)",
                path=file,
            ) from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Self:
        """
        The strategy saved at ``path`` (default `auth_strategy_file`, resolved now), or
        the defaults when the file does not exist.

        A file that exists but is unreadable or corrupt raises `AuthFileError` naming
        the path; it is never replaced by defaults.  Blocking: use `aload` from async code.
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
        moved over the target with ``os.replace``, so readers see the old or the new
        file, never a torn one.  The file is 0600; a missing parent directory is
        created 0700.  An existing file that does not parse is not overwritten:
        `AuthFileError` names it (back it up or remove it first).  Keys of the existing
        file that this version does not know (written by a newer release) are kept, and
        so is its ``"v"`` when newer.  Saves, resets and restores of one file take a lock
        (``<file>.lock``) shared by every process; concurrent saves are last-writer-wins.
        Blocking:
        use `asave` from async code.
        """
        file = Path(path) if path is not None else auth_strategy_file()
        with _locked(file):
            return self._save_locked(file)

    def _save_locked(self, file: Path) -> Path:
        data = self.to_dict()
        if file.exists() or file.is_symlink():
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


# --------------------------------------------------------------------------- file helpers


def _read_json(file: Path) -> Any:
    """Parsed JSON of ``file``; None if it does not exist; `AuthFileError` otherwise."""
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise AuthFileError(
            f"{file}: is a directory, not an auth strategy file", path=file
        ) from exc
    except OSError as exc:
        raise AuthFileError(f"{file}: cannot read ({exc.strerror})", path=file) from exc
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError as exc:
        raise AuthFileError(
            f"{file}: corrupt auth strategy file (JSON nested too deeply); fix it, or move "
            "it away (`empathy-models auth reset --yes` keeps a backup)",
            path=file,
        ) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = (
            f"line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else f"byte {exc.start}"
        )
        raise AuthFileError(
            f"{file}: corrupt auth strategy file (not valid UTF-8 JSON at {where}); fix it, "
            "or move it away (`empathy-models auth reset --yes` keeps a backup)",
            path=file,
        ) from exc


def _ensure_private_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise AuthFileError(
            f"{directory}: cannot create the directory ({exc.strerror})", path=directory
        ) from exc


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(file: Path, data: bytes) -> None:
    directory = file.parent
    _ensure_private_dir(directory)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{file.name}.", suffix=".tmp")
    except OSError as exc:
        raise AuthFileError(f"{file}: cannot write ({exc.strerror})", path=file) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AuthFileError(f"{file}: cannot write ({exc.strerror})", path=file) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


_BACKUP_RE: Final = re.compile(r"\.(\d{8}T\d{6}\d{6}Z)(?:-(\d+))?\.bak$")


def list_auth_strategy_backups(path: str | os.PathLike[str] | None = None) -> list[Path]:
    """
    Backups of the auth strategy file at ``path`` (default `auth_strategy_file`),
    newest first.  Backups sit next to the file as
    ``<name>.<UTC timestamp>.bak`` (for example
    ``auth_strategy.json.20260101T120000123456Z.bak``).
    """
    file = Path(path) if path is not None else auth_strategy_file()
    if not file.parent.is_dir():
        return []
    found: list[tuple[str, int, Path]] = []
    prefix = file.name
    for entry in file.parent.iterdir():
        if not entry.name.startswith(prefix + "."):
            continue
        match = _BACKUP_RE.fullmatch(entry.name[len(prefix) :])
        if match and entry.is_file():
            found.append((match.group(1), int(match.group(2) or 0), entry))
    found.sort(reverse=True)
    return [entry for _, _, entry in found]


DEFAULT_KEEP_BACKUPS: Final = 20
"""How many backups of the auth strategy file `reset_auth_strategy` keeps by default."""


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    """
    Hold an exclusive lock (``flock``) on the directory of ``file``, shared by every
    process, so a save, a reset and a restore never interleave.  Where ``fcntl`` does
    not exist (Windows) the operations run unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    directory = file.parent
    _ensure_private_dir(directory)
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise AuthFileError(
            f"{directory}: cannot open the directory to lock it ({exc.strerror})", path=file
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _backup_target(file: Path) -> Path:
    """A backup name for ``file`` that does not exist yet (called with the lock held)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = file.with_name(f"{file.name}.{stamp}.bak")
    counter = 0
    while target.exists() or target.is_symlink():
        counter += 1
        target = file.with_name(f"{file.name}.{stamp}-{counter}.bak")
    return target


def _prune_backups(file: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest backups of ``file``."""
    for old in list_auth_strategy_backups(file)[keep:]:
        old.unlink(missing_ok=True)


def _backup(file: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = file.with_name(f"{file.name}.{stamp}.bak")
    counter = 0
    while True:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            counter += 1
            target = file.with_name(f"{file.name}.{stamp}-{counter}.bak")
        except OSError as exc:
            raise AuthFileError(
                f"{target}: cannot create the backup ({exc.strerror})", path=target
            ) from exc
    try:
        data = file.read_bytes()
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(target, 0o600)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise AuthFileError(f"{file}: cannot back up ({exc.strerror})", path=file) from exc
    _fsync_dir(file.parent)
    return target


def reset_auth_strategy(
    path: str | os.PathLike[str] | None = None, *, keep_backups: int = DEFAULT_KEEP_BACKUPS
) -> Path | None:
    """
    Move the auth strategy file into a backup; return the backup's path.

    The file is renamed (atomically) to a backup named as in
    `list_auth_strategy_backups`, under the same lock as `AuthStrategy.save`, so a save
    running at the same time lands either before the reset (and is in the backup) or
    after it (and is the new file): it is never lost.  A corrupt file is backed up as
    it is.  Only the ``keep_backups`` newest backups are kept (default 20); older ones
    are deleted.  Returns None, touching nothing, when there is no file.  Raises
    `AuthFileError` if the file cannot be moved (it is then left in place).  Blocking.
    """
    if isinstance(keep_backups, bool) or not isinstance(keep_backups, int) or keep_backups < 1:
        raise ConfigurationError(f"keep_backups must be an integer >= 1, got {keep_backups!r}")
    file = Path(path) if path is not None else auth_strategy_file()
    if not file.exists() and not file.is_symlink():
        return None
    if file.is_dir():
        raise AuthFileError(f"{file}: is a directory, not an auth strategy file", path=file)
    with _locked(file):
        if not file.exists() and not file.is_symlink():
            return None
        backup = _backup_target(file)
        try:
            os.chmod(file, 0o600)
            os.rename(file, backup)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuthFileError(
                f"{file}: cannot move to a backup ({exc.strerror})", path=file
            ) from exc
        _fsync_dir(file.parent)
        _prune_backups(file, keep_backups)
    return backup


def restore_auth_strategy(
    path: str | os.PathLike[str] | None = None, *, backup: str | os.PathLike[str] | None = None
) -> tuple[Path, Path | None]:
    """
    Bring back the newest backup (or ``backup``) of the auth strategy file at ``path``.

    The backup must hold a valid strategy (else `AuthFileError` naming it).  When a file
    is already in place it is itself backed up first, so a restore never loses data.
    The backup is copied atomically (0600) and left in place.  Returns
    ``(restored_from, previous_file_backup_or_None)``.  Raises `AuthFileError` when
    there is no backup.  Blocking.
    """
    file = Path(path) if path is not None else auth_strategy_file()
    if backup is not None:
        source = Path(backup)
    else:
        backups = list_auth_strategy_backups(file)
        if not backups:
            raise AuthFileError(
                f"{file}: no backup to restore (looked for {file.name}.*.bak)", path=file
            )
        source = backups[0]
    if AuthStrategy.load_existing(source) is None:
        raise AuthFileError(f"{source}: backup not found", path=source)
    with _locked(file):
        previous = _backup(file) if file.exists() else None
        _atomic_write(file, source.read_bytes())
    return source, previous


# --------------------------------------------------------------------------- lines of code

_HASH = ("#",)
_SLASH = ("//",)
_HASH_SUFFIXES: Final = [
    ".py",
    ".pyi",
    ".pyw",
    ".sh",
    ".bash",
    ".zsh",
    ".rb",
    ".pl",
    ".r",
    ".toml",
    ".yaml",
    ".yml",
    ".cfg",
    ".conf",
    ".mk",
    ".cmake",
    ".nim",
    ".jl",
    ".ex",
    ".exs",
    ".tf",
]
_C_LIKE_SUFFIXES: Final = [
    ".js",
    ".jsx",
    ".mjs",
    ".cjs",
    ".ts",
    ".tsx",
    ".go",
    ".rs",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".cxx",
    ".hpp",
    ".hh",
    ".java",
    ".kt",
    ".kts",
    ".swift",
    ".cs",
    ".scala",
    ".dart",
    ".proto",
    ".zig",
]
_COMMENT_STYLES: Final[dict[str, tuple[tuple[str, ...], bool]]] = {
    # suffix -> (line comment prefixes, C-style block comments)
    **dict.fromkeys(_HASH_SUFFIXES, (_HASH, False)),
    **dict.fromkeys(_C_LIKE_SUFFIXES, (_SLASH, True)),
    ".php": (("#", "//"), True),
    ".css": ((), True),
    ".scss": (_SLASH, True),
    ".sql": (("--",), True),
    ".lua": (("--",), False),
    ".hs": (("--",), False),
    ".ini": ((";", "#"), False),
}

_GENERATED_SCAN_LINES: Final = 40
_GENERATED_MARKERS: Final = (
    "DO NOT EDIT",
    "@generated",
    "Code generated by",
    "autogenerated",
    "auto-generated",
    "automatically generated",
    "generated by the protocol buffer compiler",
)
_LITERAL_TABLE_MIN_LINES: Final = 50
_LITERAL_TABLE_SHARE: Final = 0.6
_DATA_LONGEST_LINE: Final = 5000
_LONG_LINE: Final = 500
_LONG_LINE_SHARE: Final = 0.2

_STRING_RE: Final = re.compile(r"""[rbuRBUfF]{0,2}("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")
_NUMBER_RE: Final = re.compile(
    r"0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|[-+]?(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][-+]?\d+)?j?"
)
_CONSTANT_RE: Final = re.compile(r"\b(?:True|False|None|true|false|null|nil)\b")
_LITERAL_REST_RE: Final = re.compile(r"[\s0,:;\[\](){}]*")


def _is_literal_line(text: str) -> bool:
    """True for a line made only of literals and punctuation: ``(1, "a", 0x2f),``."""
    if "#" in text:
        text = text.split("#", 1)[0]
    reduced = _STRING_RE.sub("0", text)
    reduced = _CONSTANT_RE.sub("0", reduced)
    reduced = _NUMBER_RE.sub("0", reduced)
    return "0" in reduced and _LITERAL_REST_RE.fullmatch(reduced) is not None


@frozen(kw_only=True)
class LinesOfCodeReport:
    """
    What `count_lines_of_code` found in one file.

    * ``total_lines`` = ``code_lines`` + ``blank_lines`` + ``comment_lines``.  Comments
      are recognised by the file's suffix (``#`` by default, ``//`` and ``/* */`` for
      C-like languages, ``--`` for SQL/Lua); docstrings and strings count as code, as
      in the original.
    * ``effective_lines``: the figure to give `AuthStrategy.get_recommended_mode` and
      `AuthStrategy.estimate_cost`.  It is ``code_lines`` with every line longer than
      `LINE_EQUIVALENT_CHARS` counted as ``ceil(len / LINE_EQUIVALENT_CHARS)`` lines, so a
      file of a few very long lines (minified code, inlined data) is not taken for a
      small module.
    * ``looks_generated`` / ``generated_reason``: a generated-code header (for example
      "DO NOT EDIT" or "Code generated by") in the first lines.
    * ``looks_like_data`` / ``data_reason``: most lines are literal-only (a huge table),
      or the lines are extremely long.
    * ``decode_errors``: bytes that were not valid UTF-8 and were replaced while
      counting (the counts are then approximate, and `warnings` says so).

    `warnings` lists every reason not to take the line count at face value.
    """

    path: str
    total_lines: int
    code_lines: int
    blank_lines: int
    comment_lines: int
    literal_lines: int
    longest_line: int
    effective_lines: int
    looks_generated: bool
    generated_reason: str | None
    looks_like_data: bool
    data_reason: str | None
    decode_errors: int = 0

    @property
    def warnings(self) -> tuple[str, ...]:
        out: list[str] = []
        if self.looks_generated:
            out.append(
                f"looks generated ({self.generated_reason}): its size says little about "
                "hand-written code; consider excluding it"
            )
        if self.looks_like_data:
            out.append(f"looks like data ({self.data_reason}): line counts misstate its token size")
        if self.decode_errors:
            out.append(
                f"{self.decode_errors} byte sequence(s) were not valid UTF-8 and were "
                "replaced; counts are approximate"
            )
        if self.effective_lines > self.code_lines:
            out.append(
                f"long lines: counted as {self.effective_lines} line-equivalents "
                f"({self.code_lines} physical code lines)"
            )
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus ``warnings``."""
        out = attrs.asdict(self)
        out["warnings"] = list(self.warnings)
        return out


def count_lines_of_code(path: str | os.PathLike[str]) -> LinesOfCodeReport:
    """
    Count the lines of ``path`` and judge whether its size can be trusted.

    Returns a `LinesOfCodeReport`.  Raises `SourceFileError` naming the path when it
    does not exist, is a directory or another non-regular file (a FIFO would block),
    cannot be read, or is binary (holds NUL bytes).  Text that is not valid UTF-8 is
    counted with replacement characters and flagged in ``decode_errors``, never
    reported as 0 lines.  Blocking: use `acount_lines_of_code` from async code.
    """
    file = Path(path)
    try:
        info = file.stat()
    except FileNotFoundError as exc:
        raise SourceFileError(f"{file}: no such file", path=file) from exc
    except OSError as exc:
        raise SourceFileError(f"{file}: cannot access ({exc.strerror})", path=file) from exc
    if stat.S_ISDIR(info.st_mode):
        raise SourceFileError(f"{file}: is a directory; pass a source file", path=file)
    if not stat.S_ISREG(info.st_mode):
        raise SourceFileError(f"{file}: is not a regular file", path=file)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise SourceFileError(f"{file}: cannot read ({exc.strerror})", path=file) from exc
    if b"\x00" in raw[:65536]:
        raise SourceFileError(f"{file}: looks binary (NUL bytes), not source code", path=file)
    text = raw.decode("utf-8", errors="replace")
    decode_errors = 0 if "\ufffd" not in text else _count_decode_errors(raw)
    if text.startswith("\ufeff"):
        text = text[1:]
    return _analyse(str(file), file.suffix.lower(), text, decode_errors)


async def acount_lines_of_code(path: str | os.PathLike[str]) -> LinesOfCodeReport:
    """`count_lines_of_code` in a worker thread, for async code."""
    return await anyio.to_thread.run_sync(count_lines_of_code, path)


def _count_decode_errors(raw: bytes) -> int:
    # "replace" puts one U+FFFD per invalid sequence, "ignore" drops them; genuine
    # U+FFFD characters in the file appear in both and cancel out
    replaced = raw.decode("utf-8", errors="replace").count("\ufffd")
    return replaced - raw.decode("utf-8", errors="ignore").count("\ufffd")


def _analyse(path: str, suffix: str, text: str, decode_errors: int) -> LinesOfCodeReport:
    line_prefixes, block_comments = _COMMENT_STYLES.get(suffix, (_HASH, False))
    lines = text.splitlines()
    blank = comment = code = literal = longest = effective = long_lines = 0
    in_block = False
    for line in lines:
        stripped = line.strip()
        longest = max(longest, len(line))
        if not stripped:
            blank += 1
            continue
        if in_block:
            comment += 1
            if "*/" in stripped:
                in_block = False
            continue
        if block_comments and stripped.startswith("/*"):
            comment += 1
            in_block = "*/" not in stripped[2:]
            continue
        if line_prefixes and stripped.startswith(line_prefixes):
            comment += 1
            continue
        code += 1
        effective += max(1, math.ceil(len(stripped) / LINE_EQUIVALENT_CHARS))
        if len(stripped) > _LONG_LINE:
            long_lines += 1
        if _is_literal_line(stripped):
            literal += 1

    generated_reason = None
    for number, line in enumerate(lines[:_GENERATED_SCAN_LINES], start=1):
        lowered = line.lower()
        marker = next((m for m in _GENERATED_MARKERS if m.lower() in lowered), None)
        if marker is not None:
            generated_reason = f'line {number} says "{marker}"'
            break

    data_reason = None
    if literal >= _LITERAL_TABLE_MIN_LINES and literal >= _LITERAL_TABLE_SHARE * code:
        data_reason = f"{literal} of {code} code lines are only literals (a data table)"
    elif longest >= _DATA_LONGEST_LINE:
        data_reason = f"a line of {longest:,} characters"
    elif code and long_lines >= _LONG_LINE_SHARE * code:
        data_reason = f"{long_lines} of {code} code lines are longer than {_LONG_LINE} characters"

    return LinesOfCodeReport(
        path=path,
        total_lines=len(lines),
        code_lines=code,
        blank_lines=blank,
        comment_lines=comment,
        literal_lines=literal,
        longest_line=longest,
        effective_lines=effective,
        looks_generated=generated_reason is not None,
        generated_reason=generated_reason,
        looks_like_data=data_reason is not None,
        data_reason=data_reason,
        decode_errors=decode_errors,
    )
