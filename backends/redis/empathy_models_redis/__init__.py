"""
empathy-models-redis: circuit-breaker state shared through Redis.

Installing this package makes ``redis://`` and ``rediss://`` URLs work wherever
empathy-models takes a circuit-state store::

    from empathy_models import CircuitBreaker

    breaker = CircuitBreaker(store="redis://127.0.0.1:6379/0")

It also makes them work as a quota store for budgets and rate limits
(`RedisQuotaStore`: ``EmpathyLLMExecutor(quota_store="redis://...")``).

Every breaker operation is one Lua script, atomic on the server and timed by the
server's clock (see `RedisCircuitStateStore`).  Redis holds no telemetry: point
``telemetry=`` at ``postgresql://`` (empathy-models-postgres) or ``sqlite://``.
"""

from __future__ import annotations

from typing import Any

from empathy_models.backends import BackendPlugin

from ._cache import (
    DEFAULT_CACHE_PREFIX as DEFAULT_CACHE_PREFIX,
    RedisResponseCache as RedisResponseCache,
)
from ._quota import (
    DEFAULT_QUOTA_PREFIX as DEFAULT_QUOTA_PREFIX,
    RedisQuotaStore as RedisQuotaStore,
    quota_script as quota_script,
)
from ._store import (
    DEFAULT_KEY_TTL as DEFAULT_KEY_TTL,
    DEFAULT_PREFIX as DEFAULT_PREFIX,
    RedisCircuitStateStore as RedisCircuitStateStore,
    breaker_script as breaker_script,
)

__all__ = [
    "DEFAULT_CACHE_PREFIX",
    "DEFAULT_KEY_TTL",
    "DEFAULT_PREFIX",
    "DEFAULT_QUOTA_PREFIX",
    "PLUGIN",
    "RedisCircuitStateStore",
    "RedisQuotaStore",
    "RedisResponseCache",
    "breaker_script",
    "quota_script",
]


def _state_store(url: str, **options: Any) -> RedisCircuitStateStore:
    return RedisCircuitStateStore(url, **options)


def _quota_store(url: str, **options: Any) -> RedisQuotaStore:
    options.pop("key_ttl", None)  # a breaker option a shared URL may carry
    return RedisQuotaStore(url, **options)


def _cache(url: str, **options: Any) -> RedisResponseCache:
    options.pop("key_ttl", None)
    return RedisResponseCache(url, **options)


PLUGIN = BackendPlugin(
    schemes=("redis", "rediss"),
    package="empathy-models-redis",
    telemetry=None,
    state_store=_state_store,
    quota_store=_quota_store,
    cache=_cache,
)
"""The entry point published under ``empathy_models.backends`` for redis:// and rediss://."""
