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

A rate-limit schedule and a budget window keep the store's now of their last write
(``at``).  When that lies more than `CLOCK_STEP` seconds ahead of the now a step is
given, the wall clock stepped back since (an NTP correction): the schedule's times, or
the window's holds' lapse times, are moved back by that much (`unstepped`), so each
stays as far ahead of the clock as it was at that write, however long the step (the
time between that write and the step is not known, and counts as none), and what was
moved is stored by the step that saw it, a refusal included.  A moved hold stays in
its bucket, where its settlement finds it, and its lapse time is kept apart
(``lapses``, bucket -> lapse time); a hold reserved into that bucket after the step
lapses at the bucket's own time, with what it joins (never early).  A clock stepped
forward finds the schedule behind (the burst is whole, as after an idle time) and the
holds lapsed early, as any lost time would.

A reservation may name its hold (``hold_id``, unique to the call): the window then
keeps the hold's bucket under that id (``ids``, id -> bucket) until a settlement naming
it comes, which takes the id away.  A settlement sent again (``resent``: the first
failed, and may have landed with its answer lost on the way to its caller) naming an
id the window does not keep changes nothing; a first one is applied as an unnamed one
(the window was reset since, or the hold lapsed long ago).  The id of a hold that
lapsed unsettled is kept `LAPSED_IDS_KEPT` seconds past its bucket's time, so a
settlement sent again that late still charges the call, once.
"""

from __future__ import annotations

import math
from typing import Any, Final

from .values import BudgetGrant, BudgetUsage, RateGrant

__all__ = [
    "CLOCK_STEP",
    "HOLD_BUCKET",
    "LAPSED_IDS_KEPT",
    "adjust_step",
    "gcra_step",
    "hold_bucket",
    "lapse_step",
    "push_back_step",
    "reserve_step",
    "settle_step",
    "unstepped",
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


LAPSED_IDS_KEPT: Final = 3600
"""
Seconds past its bucket's time a named hold that lapsed unsettled keeps its id (a late
settlement sent again naming it is charged once); then such a settlement changes
nothing.
"""


def hold_bucket(lapses_at: float | None, window_end: float) -> str:
    """
    The bucket a hold lapsing at ``lapses_at`` is kept in: that time rounded up to a
    whole `HOLD_BUCKET`, as an integer's text; a hold without one lapses when its
    window ends.
    """
    at = window_end if lapses_at is None else lapses_at
    return str(math.ceil(at / HOLD_BUCKET) * HOLD_BUCKET)


def _lapse_times(data: Data) -> dict[str, float]:
    """When each hold of ``data`` lapses: its bucket's time, or the time it was moved to."""
    moved: dict[str, float] = data.get("lapses") or {}
    return {t: float(moved[t]) if t in moved else float(int(t)) for t in data.get("holds") or {}}


def lapse_step(data: Data, now: float) -> Data:
    """``data`` (a copy, when anything lapsed) with the holds lapsed by ``now`` released."""
    holds: dict[str, int] | None = data.get("holds")
    if not holds:
        return data
    times = _lapse_times(data)
    if min(times.values()) > now:
        return data
    new = dict(data)
    kept = {}
    for at, amount in holds.items():
        if times[at] <= now:
            new["held"] = max(0, new["held"] - amount)
            new["lapsed"] = new.get("lapsed", 0) + amount
        else:
            kept[at] = amount
    new["holds"] = kept
    if "lapses" in new:
        new["lapses"] = {t: at for t, at in new["lapses"].items() if t in kept}
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
    the holds lapsed by ``now`` released when it is given (their times moved back
    first by a clock's step back, `unstepped`).
    """
    if data is None:
        return BudgetUsage(key=key, window_start=window_start, window_end=window_end)
    if now is not None:
        moved = unstepped(data, now)
        assert moved is not None
        data = lapse_step(moved, now)
    holds = data.get("holds") or {}
    times = _lapse_times(data)
    until = max((times[t] for t, n in holds.items() if n), default=None)
    return BudgetUsage.from_json({"key": key, **data, "held_until": until})


def _current(data: Data | None, now: float, window_start: float, window_end: float) -> Data:
    """
    A budget step's copy of ``data``, stamped with ``now`` (``at``): its holds' times
    moved back by a clock's step back (`unstepped`), then those lapsed released.  The
    window ends at the later of its stored end and ``window_end``: a budget whose window
    was made longer under the same name (a daily one made monthly) starts its windows
    where the shorter one started one, and its window is kept (and shown) until its
    own end, not dropped a week after the shorter one's.
    """
    if data is None:
        new = _fresh(window_start, window_end)
    else:
        moved = unstepped(data, now)
        assert moved is not None
        new = dict(lapse_step(moved, now))
        if window_end > float(new["window_end"]):
            new["window_end"] = window_end
        if new.get("ids"):
            new["ids"] = _kept_ids(new["ids"], new.get("holds") or {}, now)
    new["at"] = now
    return new


def _kept_ids(ids: dict[str, str], holds: dict[str, int], now: float) -> dict[str, str]:
    """
    The hold ids still kept at ``now``: those of buckets still held, and those of
    buckets that lapsed less than `LAPSED_IDS_KEPT` seconds ago.
    """
    return {
        hold_id: bucket
        for hold_id, bucket in ids.items()
        if bucket in holds or int(bucket) + LAPSED_IDS_KEPT > now
    }


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
    hold_id: str | None = None,
) -> tuple[Data, BudgetGrant]:
    """
    Hold ``amount`` until ``lapses_at`` if ``spent + held + amount <= limit`` (the holds
    lapsed by ``now`` released first, their times moved back by a clock's step back
    first, `unstepped`), kept under ``hold_id`` when given; count a refusal otherwise.
    """
    new = _current(data, now, window_start, window_end)
    new["limit"] = limit
    if new["spent"] + new["held"] + amount <= limit:
        new["held"] += amount
        holds = dict(new.get("holds") or {})
        bucket = hold_bucket(lapses_at, window_end)
        holds[bucket] = holds.get(bucket, 0) + amount
        new["holds"] = holds
        if bucket in new.get("lapses", ()):  # moved by a step: never lapse this one early
            new["lapses"] = {t: at for t, at in new["lapses"].items() if t != bucket}
        new["reserved"] += amount
        if hold_id is not None:
            new["ids"] = {**(new.get("ids") or {}), hold_id: bucket}
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
    hold_id: str | None = None,
    resent: bool = False,
) -> tuple[Data, BudgetUsage]:
    """
    Release a hold of ``held`` reserved to lapse at ``lapses_at`` and charge ``actual``
    (which may exceed it); of a hold that lapsed already nothing is left to release.  A
    hold moved by a clock's step back (`unstepped`) is found in its bucket as before.
    With ``hold_id``, the hold reserved under that id; when the window keeps no such
    id, a settlement ``resent`` (settled already, its answer lost) changes nothing, and
    a first one is applied as without an id.
    """
    new = _current(data, now, window_start, window_end)
    holds = dict(new.get("holds") or {})
    bucket = hold_bucket(lapses_at, window_end)
    if hold_id is not None:
        ids = dict(new.get("ids") or {})
        named = ids.pop(hold_id, None)
        if named is not None:
            if ids:
                new["ids"] = ids
            else:
                del new["ids"]
            bucket = named
        elif resent:  # settled already, its answer lost on the way
            return new, usage_of(key, new, window_start, window_end)
    if "holds" in new:  # else a window stored before holds lapsed
        held = min(held, holds.get(bucket, 0))  # 0 once lapsed
        if holds.get(bucket, 0) > held:
            holds[bucket] -= held
        else:
            holds.pop(bucket, None)
            if bucket in new.get("lapses", ()):
                new["lapses"] = {t: at for t, at in new["lapses"].items() if t != bucket}
        new["holds"] = holds
    new["held"] = max(0, new["held"] - held)
    new["spent"] += actual
    new["settled"] += min(actual, held)
    new["released"] += max(0, held - actual)
    new["overrun"] += max(0, actual - held)
    if actual > 0:
        new["calls"] += 1
    return new, usage_of(key, new, window_start, window_end)


CLOCK_STEP: Final = 1.0
"""
Seconds a schedule's or a budget window's last write (``at``) may lie ahead of the
store's now before it is taken for a wall clock stepped back (`unstepped`); less is the
jitter of the clocks of processes sharing a store, read before they get its lock.
"""


def unstepped(data: Data | None, now: float) -> Data | None:
    """
    ``data``, a schedule or a budget window, with its times moved back by how far its
    last write (``at``) lies ahead of ``now``, when that is more than `CLOCK_STEP`: the
    wall clock stepped back since.  A schedule's end and reset time move; a window's
    holds move their lapse times (``lapses``, per bucket: the holds stay in their
    buckets, where settlements find them), and ``at`` becomes ``now``.  ``data`` itself
    otherwise (and for a key written without ``at``).
    """
    at = None if data is None else data.get("at")
    if at is None or not float(at) - now > CLOCK_STEP:
        return data
    assert data is not None
    back = float(at) - now
    if "tat" not in data:  # a budget window
        lapses = {t: lapse - back for t, lapse in _lapse_times(data).items()}
        return {**data, "lapses": lapses, "at": now}
    until = data.get("until")
    moved: Data = {"tat": float(data["tat"]) - back, "at": now}
    if until is not None:
        moved["until"] = float(until) - back
    return moved


def _floor(data: Data | None, now: float) -> float | None:
    """The reset time a push back holds ``data``'s schedule to, while it is to come."""
    until = None if data is None else data.get("until")
    return None if until is None or float(until) <= now else float(until)


def _schedule(tat: float, until: float | None, now: float) -> Data:
    """A schedule ending at ``tat``, held until ``until`` (None: none), written at ``now``."""
    if until is None:
        return {"tat": tat, "at": now}
    return {"tat": tat, "until": until, "at": now}


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
    is reported (but a schedule moved back by a clock's step, `unstepped`, is stored).
    """
    moved = unstepped(data, now)
    tat = now if moved is None else max(float(moved["tat"]), now)
    new_tat = tat + cost * interval
    wait = max(0.0, new_tat - burst * interval - now)
    until = _floor(moved, now)
    if until is not None:
        wait = max(wait, until - now)
    if wait > max_wait:
        kept = None if moved is data else moved
        return kept, RateGrant(granted=False, wait=wait)
    return _schedule(new_tat, until, now), RateGrant(granted=True, wait=wait, place=new_tat)


def adjust_step(
    data: Data | None, now: float, *, delta: float, place: float | None = None
) -> Data | None:
    """
    Move a schedule by ``delta`` seconds (negative: capacity given back); with
    ``place``, only while the schedule still ends there (no later place taken since:
    else nothing changes, and None is returned; a place taken before a clock's step
    back, `unstepped`, is not there any more).  A push back's reset time stays.
    """
    moved = unstepped(data, now)
    if place is not None and (moved is None or float(moved["tat"]) != place):
        return None
    if moved is None:
        return None if delta <= 0 else _schedule(now + delta, None, now)
    tat = float(moved["tat"]) + delta
    return _schedule(max(tat, now) if delta < 0 else tat, _floor(moved, now), now)


def push_back_step(data: Data | None, now: float, *, seconds: float) -> Data | None:
    """
    Hold a schedule until ``now + seconds`` (a provider's reset): no place comes before
    that time, whatever the burst (the reset time is kept as ``until`` until it has
    passed), and the schedule ends then at the earliest, so the burst is whole again
    at that time.  Nothing changes (None is returned) when the schedule is held that
    long already: the same push applied twice moves it once.
    """
    until = now + seconds
    moved = unstepped(data, now)
    if moved is None:
        return _schedule(until, until, now)
    tat = float(moved["tat"])
    floor = _floor(moved, now)
    if tat >= until and floor is not None and floor >= until:
        return None if moved is data else moved
    return _schedule(max(tat, until), until if floor is None else max(floor, until), now)
