"""
The pure steps every quota store applies atomically: budget reservations and
settlements, and GCRA rate-limit scheduling.  No I/O and no clock: the store passes
its own notion of now.  `empathy_models_redis` holds a Lua port of these steps.

A hold lapses: each reservation names when (``lapses_at``, UTC epoch seconds, rounded
up to a whole `HOLD_BUCKET`), and a window keeps its holds per lapse time (``holds``,
lapse time -> nano-dollars).  Every step first releases the holds whose time has come
(counted in ``lapsed``), so a hold its process can no longer settle (killed, or cut off
from the store) stops counting against the limit.  A settlement of a hold that lapsed
already charges what the call cost (all of it counted as ``overrun``) and releases
nothing.
"""

from __future__ import annotations

import math
from typing import Any, Final

from .values import BudgetGrant, BudgetUsage, RateGrant

__all__ = [
    "HOLD_BUCKET",
    "adjust_step",
    "gcra_step",
    "hold_bucket",
    "lapse_step",
    "push_back_step",
    "reserve_step",
    "settle_step",
    "usage_of",
]

Data = dict[str, Any]

_COUNTERS = (
    "limit",
    "spent",
    "held",
    "reserved",
    "settled",
    "released",
    "overrun",
    "lapsed",
    "calls",
)

HOLD_BUCKET: Final = 60
"""Seconds to which a hold's lapse time is rounded up (one bucket per minute at most)."""


def hold_bucket(lapses_at: float | None, window_end: float) -> str:
    """
    The bucket a hold lapsing at ``lapses_at`` is kept in: that time rounded up to a
    whole `HOLD_BUCKET`, as an integer's text; a hold without one lapses when its
    window ends.
    """
    at = window_end if lapses_at is None else lapses_at
    return str(math.ceil(at / HOLD_BUCKET) * HOLD_BUCKET)


def lapse_step(data: Data, now: float) -> Data:
    """``data`` (a copy, when anything lapsed) with the holds lapsed by ``now`` released."""
    holds: dict[str, int] | None = data.get("holds")
    if not holds or min(int(t) for t in holds) > now:
        return data
    new = dict(data)
    kept = {}
    for at, amount in holds.items():
        if int(at) <= now:
            new["held"] = max(0, new["held"] - amount)
            new["lapsed"] = new.get("lapsed", 0) + amount
        else:
            kept[at] = amount
    new["holds"] = kept
    return new


def usage_of(
    key: str,
    data: Data | None,
    window_start: float,
    window_end: float,
    now: float | None = None,
) -> BudgetUsage:
    """
    The `BudgetUsage` a stored dict holds (a missing one reads as an empty window), with
    the holds lapsed by ``now`` released when it is given.
    """
    if data is None:
        return BudgetUsage(key=key, window_start=window_start, window_end=window_end)
    if now is not None:
        data = lapse_step(data, now)
    holds = data.get("holds")
    until = max((float(t) for t, n in holds.items() if n), default=None) if holds else None
    return BudgetUsage.from_json({"key": key, **data, "held_until": until})


def _fresh(window_start: float, window_end: float) -> Data:
    return {
        "window_start": window_start,
        "window_end": window_end,
        **dict.fromkeys(_COUNTERS, 0),
        "refused": 0,
        "holds": {},
    }


def reserve_step(
    key: str,
    data: Data | None,
    *,
    window_start: float,
    window_end: float,
    amount: int,
    limit: int,
    now: float,
    lapses_at: float | None = None,
) -> tuple[Data, BudgetGrant]:
    """
    Hold ``amount`` until ``lapses_at`` if ``spent + held + amount <= limit`` (the holds
    lapsed by ``now`` released first); count a refusal otherwise.
    """
    new = dict(lapse_step(data, now)) if data is not None else _fresh(window_start, window_end)
    new["limit"] = limit
    if new["spent"] + new["held"] + amount <= limit:
        new["held"] += amount
        holds = dict(new.get("holds") or {})
        bucket = hold_bucket(lapses_at, window_end)
        holds[bucket] = holds.get(bucket, 0) + amount
        new["holds"] = holds
        new["reserved"] += amount
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
    now: float,
    lapses_at: float | None = None,
) -> tuple[Data, BudgetUsage]:
    """
    Release a hold of ``held`` reserved to lapse at ``lapses_at`` and charge ``actual``
    (which may exceed it); of a hold that lapsed already nothing is left to release.
    """
    new = dict(lapse_step(data, now)) if data is not None else _fresh(window_start, window_end)
    holds = dict(new.get("holds") or {})
    bucket = hold_bucket(lapses_at, window_end)
    if "holds" in new:  # else a window stored before holds lapsed
        held = min(held, holds.get(bucket, 0))  # 0 once lapsed
        if holds.get(bucket, 0) > held:
            holds[bucket] -= held
        else:
            holds.pop(bucket, None)
        new["holds"] = holds
    new["held"] = max(0, new["held"] - held)
    new["spent"] += actual
    new["settled"] += min(actual, held)
    new["released"] += max(0, held - actual)
    new["overrun"] += max(0, actual - held)
    if actual > 0:
        new["calls"] += 1
    return new, usage_of(key, new, window_start, window_end)


def _floor(data: Data | None, now: float) -> float | None:
    """The reset time a push back holds ``data``'s schedule to, while it is to come."""
    until = None if data is None else data.get("until")
    return None if until is None or float(until) <= now else float(until)


def _schedule(tat: float, until: float | None) -> Data:
    return {"tat": tat} if until is None else {"tat": tat, "until": until}


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
    units at once, none before the reset time a push back set (``until``).  Granted
    when the place comes within ``max_wait`` seconds (the caller waits that long), with
    the schedule's end after it as its ``place``; else nothing is stored and the wait
    is reported.
    """
    tat = now if data is None else max(float(data["tat"]), now)
    new_tat = tat + cost * interval
    wait = max(0.0, new_tat - burst * interval - now)
    until = _floor(data, now)
    if until is not None:
        wait = max(wait, until - now)
    if wait > max_wait:
        return None, RateGrant(granted=False, wait=wait)
    return _schedule(new_tat, until), RateGrant(granted=True, wait=wait, place=new_tat)


def adjust_step(
    data: Data | None, now: float, *, delta: float, place: float | None = None
) -> Data | None:
    """
    Move a schedule by ``delta`` seconds (negative: capacity given back); with
    ``place``, only while the schedule still ends there (no later place taken since:
    else nothing changes, and None is returned).  A push back's reset time stays.
    """
    if place is not None and (data is None or float(data["tat"]) != place):
        return None
    if data is None:
        return None if delta <= 0 else {"tat": now + delta}
    tat = float(data["tat"]) + delta
    return _schedule(max(tat, now) if delta < 0 else tat, _floor(data, now))


def push_back_step(data: Data | None, now: float, *, seconds: float) -> Data | None:
    """
    Hold a schedule until ``now + seconds`` (a provider's reset): no place comes before
    that time, whatever the burst (the reset time is kept as ``until`` until it has
    passed), and the schedule ends then at the earliest, so the burst is whole again
    at that time.  Nothing changes (None is returned) when the schedule is held that
    long already: the same push applied twice moves it once.
    """
    until = now + seconds
    if data is None:
        return _schedule(until, until)
    tat = float(data["tat"])
    floor = _floor(data, now)
    if tat >= until and floor is not None and floor >= until:
        return None
    return _schedule(max(tat, until), until if floor is None else max(floor, until))
