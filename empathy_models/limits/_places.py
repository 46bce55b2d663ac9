"""
This process's places in each rate-limit schedule, so that capacity a call gives back
(tokens it did not use, the place of a call that never went out) reaches the calls
queued behind it at once.

A GCRA schedule is one number, its end: a call's place is the segment it added to it
(``cost * interval`` seconds), and it may start ``burst * interval`` seconds before its
segment ends.  A call that used fewer tokens than it reserved shrinks its segment; the
places right after it may then move up by as much: that is exactly the schedule they
would have had had the call reserved what it used (and the call started no earlier
than that schedule allows).  The store holds only the end, so the limiter moves the
places it knows, its own: `Places` keeps the run of places this process took one right
after the other.  A give-back moves the places of the run from the call's on up, and
the store's end with them (`QuotaStore.adjust` given the run's last place, so only
while no one else took a place after it); calls of the run still waiting are woken
to wait less (`wait_for_places`).  When another worker's place follows the run, the
end stays: the run moves up into capacity nobody else was given, and the places after
it keep their times, so no call ever shares one of their instants.

The places of settled calls are let go wherever they are (`Places.let_go`): a long
call in flight (a stream of minutes) keeps no place of the calls that came and went
behind it, and a give-back finds its place by index and moves only the run after it,
so what `Places` keeps, and the work of each call, stay within the calls waiting or in
flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from ..abc import QuotaStore

if TYPE_CHECKING:
    from .guard import Hold

__all__ = ["Place", "Places", "give_back", "wait_for_places"]

_SLACK = 8
"""Places taken beyond twice those kept before `Places.let_go` looks again."""

Adjust = Callable[[QuotaStore, str, float, float | None], Awaitable[None]]
"""``guard._adjust`` for one limiter: `QuotaStore.adjust`, a failure logged and counted."""


class Place:
    """
    One place of this process: its hold, where the schedule ended once it was taken
    (the grant's ``place``), the length of its segment (seconds), and whether it was
    taken right after the place before it in `Places` (``joined``).
    """

    __slots__ = ("end", "hold", "joined", "length")

    def __init__(self, hold: Hold, end: float, length: float, joined: bool) -> None:
        self.hold = hold
        self.end = end
        self.length = length
        self.joined = joined


class Places:
    """
    This process's places in one schedule of one store, in the order taken: runs of
    places each taken right after the one before (its segment begins where the
    previous one ended; another worker's place, or the schedule running empty, begins
    a new run).  Places of calls settled (all they give back given) are let go
    wherever they are, the run re-linked around them: nothing is left for them to give
    back, and the places after them move with the run's earlier ones all the same.  The
    last place is kept (the next one taken joins its run or not).  The places kept
    are at most twice those of calls waiting or in flight when last let go, plus
    ``_SLACK``.
    """

    __slots__ = ("index", "kept", "lock", "places", "store")

    def __init__(self) -> None:
        self.store: QuotaStore | None = None
        self.places: list[Place] = []
        self.index: dict[Hold, int] = {}  # hold -> the position of its place in ``places``
        self.kept = 0  # places ``let_go`` last kept
        self.lock = asyncio.Lock()  # one give-back at a time: each moves a run's end

    def taken(self, store: QuotaStore, hold: Hold, end: float, length: float) -> None:
        """A place granted to ``hold``."""
        places = self.places
        if store is not self.store:
            self.store = store  # the limiter went degraded, or back
            places.clear()
            self.index.clear()
        joined = bool(places) and places[-1].end + length == end
        self.index.setdefault(hold, len(places))
        places.append(Place(hold, end, length, joined))
        if len(places) > 2 * self.kept + _SLACK:
            self.let_go()

    def let_go(self) -> None:
        """
        Drop the places of settled calls but the last, each run re-linked around them:
        the place after one dropped joins the run the dropped one was in, if it joined
        the dropped one.  Called once the places doubled since the last time, so each
        place taken costs a constant share of it.
        """
        places = self.places
        kept: list[Place] = []
        joined = True  # whether a place dropped since ``kept[-1]`` was joined to it
        for place in places[:-1]:
            if place.hold.done:
                joined = joined and place.joined
                continue
            place.joined = place.joined and joined
            kept.append(place)
            joined = True
        if places:
            last = places[-1]
            last.joined = last.joined and joined
            kept.append(last)
        self.places = kept
        self.index = {}
        for i, place in enumerate(kept):
            self.index.setdefault(place.hold, i)
        self.kept = len(kept)

    def run_from(self, hold: Hold) -> list[Place] | None:
        """``hold``'s place and those of its run after it (None: not known here)."""
        i = self.index.get(hold)
        if i is None:
            return None
        places = self.places
        end = i + 1
        while end < len(places) and places[end].joined:
            end += 1
        return places[i:end]


async def give_back(
    places: Places | None,
    adjust: Adjust,
    hold: Hold,
    store: QuotaStore,
    key: str,
    delta: float,
) -> None:
    """
    Give ``-delta`` seconds of ``key``'s schedule back for ``hold``: its place and those
    this process took right after it (`Places`) move up by as much, and the schedule's
    end moves back with them if it is still where the last of them left it; else (a
    place of another worker after them) it stays, and the capacity moved past the run
    is lost to the others, never shared with one of their instants.  Whether the store
    moved the end or not (or failed), the run's places are where the store's schedule
    allows them: at most as early as if ``hold`` had reserved what it used.
    """
    own = hold.places.get(key)
    if own is None:
        return  # a store that names no place: nothing is given back
    if places is None or places.store is not store:
        await adjust(store, key, delta, own)
        return
    async with places.lock:
        run = places.run_from(hold)
        if run is None:
            await adjust(store, key, delta, hold.places.get(key, own))
        else:
            await adjust(store, key, delta, run[-1].end)
            _move_up(run, key, delta)


def _move_up(run: list[Place], key: str, delta: float) -> None:
    """The schedule's end moved by ``delta`` (< 0) at ``run[0]``: every place of the run
    moves with it, and the calls still waiting for theirs are woken to wait less."""
    first = run[0]
    first.length += delta
    for place in run:
        place.end += delta
        hold = place.hold
        hold.places[key] = place.end
        due = hold.due.get(key)
        if due is not None and place is not first:
            hold.due[key] = due + delta
            if hold.waking is not None:
                hold.waking.cancel()


async def wait_for_places(
    hold: Hold, wait: float, sleep: Callable[[float], Awaitable[object]], now: Callable[[], float]
) -> None:
    """
    Sleep ``wait`` seconds, the longest wait of ``hold``'s places, or less when one of
    them moves up meanwhile (`give_back`): then until the latest of its places' times
    (``hold.due``, by ``now``).
    """
    while wait > 0:
        with anyio.CancelScope() as scope:
            hold.waking = scope
            try:
                await sleep(wait)
            finally:
                hold.waking = None
        if not scope.cancelled_caught:
            return
        wait = max(hold.due.values()) - now()
