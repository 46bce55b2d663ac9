"""`MemoryQuotaStore`: budgets and rate limits for one process, exact and fast."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .._validators import shown
from ..abc import TransactionalQuotaStore
from ..exceptions import ConfigurationError
from .values import WINDOW_RETENTION, sweep_time

__all__ = ["MemoryQuotaStore"]

T = TypeVar("T")


class MemoryQuotaStore(TransactionalQuotaStore):
    """
    Quotas in a dict: each operation runs without an ``await`` between read and write,
    so it is atomic within the event loop.

    Not shared between processes (``shared`` is false): every process that uses one has
    budgets and rate limits of its own.  A budget's window is dropped a week
    (`WINDOW_RETENTION`) after it ended, as the Redis store expires it, checked once an
    hour; the time is the store's clock when a budget write's window holds it (the
    callers' clock agrees), else the newest such window's start (then a long window
    may be kept up to its length longer).

    Args:
        clock: UTC epoch seconds (default `time.time`); times the rate limits.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        if not callable(clock):
            raise ConfigurationError(f"clock must be callable, got {shown(clock)}")
        self._clock = clock
        self._data: dict[str, dict[str, Any]] = {}
        self._sweep_at = -math.inf  # the window start from which ended windows are dropped

    def __repr__(self) -> str:
        return f"MemoryQuotaStore(keys={len(self._data)})"

    async def _transact(
        self, key: str, fn: Callable[[dict[str, Any] | None, float], tuple[Any, T]]
    ) -> T:
        now = self._clock()
        new, result = fn(self._data.get(key), now)
        if new is not None:
            self._data[key] = new
            if key.startswith("b|"):
                newest = sweep_time(new, now)
                if newest >= self._sweep_at:
                    self._sweep(newest)
        return result

    def _sweep(self, newest: float) -> None:
        # drop the budget windows that ended a week before ``newest`` (`sweep_time`)
        cutoff = newest - WINDOW_RETENTION
        data = self._data
        for key in [k for k, v in data.items() if k[:2] == "b|" and v["window_end"] < cutoff]:
            del data[key]
        self._sweep_at = newest + 3600.0

    def _now(self) -> float:
        return self._clock()

    async def _load(self, key: str) -> dict[str, Any] | None:
        data = self._data.get(key)
        return None if data is None else copy.copy(data)

    async def _scan(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        return [(k, dict(v)) for k, v in self._data.items() if k.startswith(prefix)]

    async def _delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._data.pop(key, None)
