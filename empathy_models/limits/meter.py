"""
The pure steps every quota store applies atomically: budget reservations and
settlements, and GCRA rate-limit scheduling.  No I/O and no clock: the store passes
its own notion of now.  `empathy_models_redis` holds a Lua port of these steps.
"""

from __future__ import annotations

from typing import Any

from .values import BudgetGrant, BudgetUsage, RateGrant

__all__ = ["adjust_step", "gcra_step", "reserve_step", "settle_step", "usage_of"]

Data = dict[str, Any]

_COUNTERS = ("limit", "spent", "held", "reserved", "settled", "released", "overrun", "calls")


def usage_of(key: str, data: Data | None, window_start: float, window_end: float) -> BudgetUsage:
    """The `BudgetUsage` a stored dict holds (a missing one reads as an empty window)."""
    if data is None:
        return BudgetUsage(key=key, window_start=window_start, window_end=window_end)
    return BudgetUsage.from_json({"key": key, **data})


def _fresh(window_start: float, window_end: float) -> Data:
    return {
        "window_start": window_start,
        "window_end": window_end,
        **dict.fromkeys(_COUNTERS, 0),
        "refused": 0,
    }


def reserve_step(
    key: str,
    data: Data | None,
    *,
    window_start: float,
    window_end: float,
    amount: int,
    limit: int,
) -> tuple[Data, BudgetGrant]:
    """Hold ``amount`` if ``spent + held + amount <= limit``; count a refusal otherwise."""
    new = dict(data) if data is not None else _fresh(window_start, window_end)
    new["limit"] = limit
    if new["spent"] + new["held"] + amount <= limit:
        new["held"] += amount
        new["reserved"] += amount
        new["calls"] += 1
        granted = True
    else:
        new["refused"] = new.get("refused", 0) + 1
        granted = False
    return new, BudgetGrant(granted=granted, usage=usage_of(key, new, window_start, window_end))


def settle_step(
    key: str,
    data: Data | None,
    *,
    window_start: float,
    window_end: float,
    held: int,
    actual: int,
) -> tuple[Data, BudgetUsage]:
    """Release a hold of ``held`` and charge ``actual`` (which may exceed it)."""
    new = dict(data) if data is not None else _fresh(window_start, window_end)
    new["held"] = max(0, new["held"] - held)
    new["spent"] += actual
    new["settled"] += min(actual, held)
    new["released"] += max(0, held - actual)
    new["overrun"] += max(0, actual - held)
    return new, usage_of(key, new, window_start, window_end)


def gcra_step(
    data: Data | None,
    now: float,
    *,
    cost: float,
    interval: float,
    burst: float,
    max_wait: float,
) -> tuple[Data | None, RateGrant]:
    """
    Take the next place in a GCRA schedule: ``interval`` seconds per unit, ``burst``
    units at once.  Granted when the place comes within ``max_wait`` seconds (the
    caller waits that long); else nothing is stored and the wait is reported.
    """
    tat = now if data is None else max(float(data["tat"]), now)
    new_tat = tat + cost * interval
    wait = max(0.0, new_tat - burst * interval - now)
    if wait > max_wait:
        return None, RateGrant(granted=False, wait=wait)
    return {"tat": new_tat}, RateGrant(granted=True, wait=wait)


def adjust_step(data: Data | None, now: float, *, delta: float) -> Data | None:
    """Move a schedule by ``delta`` seconds (negative: capacity given back)."""
    if data is None:
        return None if delta <= 0 else {"tat": now + delta}
    tat = float(data["tat"]) + delta
    return {"tat": max(tat, now) if delta < 0 else tat}
