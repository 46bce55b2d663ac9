"""
What `EmpathyLLMExecutor.__init__` checks and derives from its arguments: the providers
by name (each must have models in the registry), the concurrency limit per provider,
the policies' types, that the breaker is one (not a state store), the providers without
an API key, the limiter when any budget or rate limit applies, and the words of the
warnings it gives once; and what `EmpathyLLMExecutor.from_config` builds from
``empathy.toml``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar, cast

from ._planner import _key_hint
from ._validators import MAX_SIZE, check, failure, integer, number, shown
from .abc import CircuitStateStore, Provider, QuotaStore, TelemetryBackend
from .exceptions import ConfigurationError
from .limits.guard import Limiter
from .limits.values import Budget, RateLimit
from .providers._http import HTTPProvider
from .registry import ModelRegistry

__all__: list[str] = []

_T = TypeVar("_T")

NO_TELEMETRY = (
    "EmpathyLLMExecutor has no telemetry_store: calls work, but no LLMCallRecord "
    "is kept, so nothing survives the process for routing or cost reports. Pass "
    "telemetry_store='sqlite:///calls.db' (or NullTelemetryBackend() to opt out)."
)


_slots = integer(
    failure(ConfigurationError),
    low=1,
    high=MAX_SIZE,
    why="must be an integer >= 1",
    high_why="must be < 2**63",
)


def checked(value: _T | None, default: Callable[[], _T], kind: type[_T], name: str) -> _T:
    """
    ``value`` (``default()`` when None), which must be a ``kind``.

    Raises:
        ConfigurationError: it is not.
    """
    out = default() if value is None else value
    if not isinstance(out, kind):
        raise ConfigurationError(f"{name} must be a {kind.__name__}, got {shown(value)}")
    return out


_BREAKER_METHODS = ("key_for", "admit", "report", "available_hint")


def checked_breaker(breaker: _T) -> _T:
    """
    ``breaker`` when it is None, a state-store URL, or has what the executor calls on a
    breaker (`CircuitBreaker`'s ``key_for``, ``admit``, ``report``, ``available_hint``).

    Raises:
        ConfigurationError: it has not; a `CircuitStateStore` is told to be passed as
            ``CircuitBreaker(store=...)``.
    """
    if breaker is None or isinstance(breaker, str):
        return breaker
    missing = [name for name in _BREAKER_METHODS if not callable(getattr(breaker, name, None))]
    if not missing:
        return breaker
    hint = (
        "; it is a state store, which holds circuit state for a breaker: pass "
        "breaker=CircuitBreaker(store=<the store>) (or the store's URL as breaker=)"
        if isinstance(breaker, CircuitStateStore)
        else ""
    )
    raise ConfigurationError(
        f"breaker must be a CircuitBreaker (or have {', '.join(_BREAKER_METHODS)}), got "
        f"{shown(breaker)}, which has no {', '.join(missing)}{hint}"
    )


def index_providers(
    providers: Sequence[Provider] | Mapping[str, Provider], registry: ModelRegistry
) -> dict[str, Provider]:
    """
    The providers by name: a sequence is keyed by each ``provider.name``.

    Raises:
        ConfigurationError: not providers, none, a name twice, or a name without models
            in ``registry``.
    """
    pairs: list[tuple[object, object]]
    given: object = providers  # what a caller passed, whatever its annotation says
    if isinstance(given, Mapping):
        pairs = list(given.items())
    elif isinstance(given, Sequence) and not isinstance(given, str):
        pairs = [(getattr(p, "name", None), p) for p in given]
    else:
        alone = (
            f" (in a list: [{type(given).__name__}(...)])" if isinstance(given, Provider) else ""
        )
        raise ConfigurationError(
            f"providers must be a sequence of Provider or a mapping, got {shown(given)}{alone}"
        )
    if not pairs:
        raise ConfigurationError("providers must not be empty")
    out: dict[str, Provider] = {}
    known = set(registry.providers())
    for index, (name, provider) in enumerate(pairs):
        if not isinstance(provider, Provider):
            at = shown(name) if isinstance(given, Mapping) else index
            raise ConfigurationError(
                f"providers[{at}] is not a Provider: {shown(provider)} (give provider "
                "objects: OpenAIProvider(), AnthropicProvider(), or OpenAIProvider(name=..., "
                "base_url=...) for another OpenAI-compatible server)"
            )
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"provider {shown(provider)} has no name")
        if name in out:
            raise ConfigurationError(f"two providers are named {shown(name)}")
        if name not in known:
            raise ConfigurationError(
                f"provider {shown(name)} has no models in the registry (price table "
                f"{registry.price_version}; providers there: {', '.join(sorted(known))}"
                "): a provider's name must be the registry's `provider` of its models; "
                f"name it after one of those (e.g. {type(provider).__name__}(name="
                f"{min(known)!r})) or pass registry= with models of {shown(name)}"
                if known
                else f"provider {shown(name)} has no models in the registry (price table "
                f"{registry.price_version}, which is empty)"
            )
        out[name] = provider
    return out


def index_limits(
    limits: int | Mapping[str, int], providers: Mapping[str, Provider]
) -> dict[str, int]:
    """
    The most calls in flight per provider name (64 for a provider a mapping leaves out).

    Raises:
        ConfigurationError: a limit below 1 or not an int, or an unknown provider.
    """

    def limit_of(name: str, value: object) -> int:
        return check(_slots, f"concurrency_per_provider[{shown(name)}]", cast(int, value))

    if isinstance(limits, Mapping):
        unknown = sorted(set(limits) - set(providers))
        if unknown:
            raise ConfigurationError(
                f"concurrency_per_provider names unknown providers: {', '.join(unknown)}"
            )
        return {name: limit_of(name, limits.get(name, 64)) for name in providers}
    value = limit_of("*", limits)
    return dict.fromkeys(providers, value)


def keyless_of(providers: Mapping[str, Provider]) -> frozenset[str]:
    """
    The providers that would fail locally, before any request (no API key): not routed
    to; a model pinned with ``ExecutionContext.model`` is still tried, and its attempt
    recorded as ``not_sent``, which neither the router nor the breaker counts.
    """
    return frozenset(
        name for name, p in providers.items() if isinstance(p, HTTPProvider) and not p.has_api_key
    )


def keyless_message(providers: Mapping[str, Provider], keyless: frozenset[str]) -> str:
    """The warning naming the providers without a key and what to do about each."""
    return (
        "no API key for "
        + ", ".join(f"{name} ({_key_hint(providers[name])})" for name in sorted(keyless))
        + ": "
        + ("its" if len(keyless) == 1 else "their")
        + " models are not routed to"
    )


def config_arguments(
    path: str | os.PathLike[str] | None, router: object, options: dict[str, Any]
) -> tuple[Any, dict[str, Any], tuple[AbstractAsyncContextManager[Any], ...]]:
    """
    For `EmpathyLLMExecutor.from_config`: the providers, the other constructor arguments
    and what the executor owns (the telemetry backend and router built here), from
    ``empathy.toml`` at ``path`` and ``options`` (which win).  ``router=True`` builds an
    `AdaptiveModelRouter` over the same telemetry; ``False`` / ``None`` means none; any
    other value is the router itself, borrowed (`ConfigurationError` if it is none).
    A telemetry URL in ``options`` is built here, once, for both; with the file's
    ``memory://`` telemetry, a router given that reads a memory backend lends it to
    the executor (a second one would be a store the router never reads).
    """
    from ._router import AdaptiveModelRouter
    from .backends import telemetry_from_url
    from .config import EmpathyConfig

    config = EmpathyConfig.load(path)
    arguments = dict(options)
    registry = arguments.pop("registry", None)
    own_registry = registry is None
    if registry is None:
        registry = config.registry()
    providers = arguments.pop("providers", None)
    if providers is None:
        # a provider the file's registry has no models of: refused in the file's terms
        providers = config.build_providers(registry if own_registry else None)
    telemetry = arguments.pop("telemetry_store", None)
    owned: list[AbstractAsyncContextManager[Any]] = []
    if telemetry is None and _memory_url(config.telemetry_url) and _store_of(router) is not None:
        telemetry = _store_of(router)  # the router's own memory is the only one it reads
    elif telemetry is None or isinstance(telemetry, str):
        # one backend for the executor and the router (memory:// built twice is two)
        if telemetry is None:
            telemetry = config.telemetry_store()  # refused naming the file and key
            config.ensure_directory("telemetry")
        else:
            telemetry = telemetry_from_url(telemetry)
        owned.append(telemetry)
    if router is True:
        router = AdaptiveModelRouter(registry, telemetry)
        owned.append(router)
    elif router is False:
        router = None
    elif router is not None and not all(
        callable(getattr(router, name, None)) for name in ("get_best_model", "record_outcome")
    ):
        raise ConfigurationError(
            "from_config(router=) must be True, False, None or a router (an "
            f"AdaptiveModelRouter), got {shown(router)}"
        )
    arguments["router"] = router
    if "breaker" not in arguments:
        config.state_store()  # refused naming the file and key; the executor builds its own
        config.ensure_directory("state")
        arguments["breaker"] = config.state_url
    arguments.update(registry=registry, telemetry_store=telemetry)
    return providers, arguments, tuple(owned)


def _memory_url(url: str) -> bool:
    """Whether ``url`` is a ``memory://`` backend's (one process's, one object's)."""
    return url.partition("://")[0].lower() == "memory"


def _store_of(router: object) -> TelemetryBackend | None:
    """
    The ``memory://`` telemetry backend a router object given to `config_arguments`
    reads, if it reads one.
    """
    from .backends.memory import MemoryTelemetryBackend

    store = getattr(router, "telemetry_store", None)
    return store if isinstance(store, MemoryTelemetryBackend) else None


_wait = number(failure(ConfigurationError), low=0, why="must be a finite number of seconds >= 0")


def limiter_for(
    registry: ModelRegistry,
    providers: Mapping[str, Provider],
    budgets: Sequence[Budget] | Budget | None,
    rate_limits: Mapping[str, RateLimit] | None,
    quota_store: QuotaStore | str | None,
    *,
    max_wait: float,
    sleep: Callable[[float], Awaitable[object]],
    wall_clock: Callable[[], float],
    clock: Callable[[], float],
) -> Limiter | None:
    """
    A `Limiter` when a budget or a rate limit (given, or a model's) applies; else None.
    It times its waits and the run's deadline by the executor's ``clock``.

    Raises:
        ConfigurationError: an invalid budget or rate limit, or one naming neither a
            provider nor a model (`_check_targets`).
    """
    if budgets or rate_limits or any(m.rpm or m.tpm for m in registry):
        max_wait = check(_wait, "rate_limit_wait", max_wait)  # the executor's name for it
        limiter = Limiter(
            budgets,
            rate_limits,
            quota_store,
            max_wait=max_wait,
            sleep=sleep,
            wall_clock=wall_clock,
            monotonic=clock,
        )
        _check_targets(limiter, registry, providers)
        return limiter
    return None


def _check_targets(
    limiter: Limiter, registry: ModelRegistry, providers: Mapping[str, Provider]
) -> None:
    """
    Refuse a rate limit keyed by, or a provider or model budget for, a name that is
    neither a provider (of ``providers`` or of a model of ``registry``) nor a model id
    of ``registry``: it could never apply, and a typo would leave the calls it was
    meant for unlimited.  (A provider the registry knows but this executor was not
    given passes: a configuration several workers share may name it.)

    Raises:
        ConfigurationError: naming the unknown name and the providers known.
    """
    named = set(providers).union(m.provider for m in registry)
    known = f"providers: {', '.join(sorted(named))}; or a model id of the registry"
    for name in limiter.rate_limits:
        if name not in named and name not in registry:
            raise ConfigurationError(
                f"rate_limits[{shown(name)}] names no provider and no model ({known})"
            )
    for budget in limiter.budgets:
        if budget.value is None:
            continue
        if budget.scope == "provider" and budget.value not in named:
            raise ConfigurationError(
                f"Budget(scope='provider', value={shown(budget.value)}) names no provider ({known})"
            )
        if budget.scope == "model" and budget.value not in registry:
            raise ConfigurationError(
                f"Budget(scope='model', value={shown(budget.value)}) names no model of the "
                f"registry ({known})"
            )
