"""`MemoryQuotaStore`: budgets and rate limits for one process, exact and fast."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..abc import TransactionalQuotaStore
from ..exceptions import ConfigurationError

__all__ = ["MemoryQuotaStore"]

T = TypeVar("T")


class MemoryQuotaStore(TransactionalQuotaStore):
    """
    Quotas in a dict: each operation runs without an ``await`` between read and write,
    so it is atomic within the event loop.

    Not shared between processes (``shared`` is false): every process that uses one has
    budgets and rate limits of its own.

    Args:
        clock: UTC epoch seconds (default `time.time`); times the rate limits.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        if not callable(clock):
            raise ConfigurationError(f"clock must be callable, got {clock!r}")
        self._clock = clock
        self._data: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"MemoryQuotaStore(keys={len(self._data)})"

    async def _transact(
        self, key: str, fn: Callable[[dict[str, Any] | None, float], tuple[Any, T]]
    ) -> T:
        new, result = fn(self._data.get(key), self._clock())
        if new is not None:
            self._data[key] = new
        return result

    async def _load(self, key: str) -> dict[str, Any] | None:
        data = self._data.get(key)
        return None if data is None else copy.copy(data)

    async def _scan(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        return [(k, dict(v)) for k, v in self._data.items() if k.startswith(prefix)]

    async def _delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._data.pop(key, None)
