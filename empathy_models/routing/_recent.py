"""
The recent outcomes per workflow stage that `recommend_tier_upgrade` judges: a window
of the last ``size`` sample outcomes per (workflow, stage) and per workflow (stage
``None``), seeded from the store at start, then fed live, and dropped once all its
outcomes are older than the router's evidence window (as a router started then, whose
seed reads the window only, would not hold it).  Pure: the router reads the store and
passes the records and the window's start in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable

from ..records import LLMCallRecord, ModelTier
from .decide import ModelFacts
from .reports import RecentOutcomes

__all__ = ["RecentWindows"]

_Item = tuple[str, ModelTier | None, bool]


class RecentWindows:
    """
    The last ``size`` outcomes of each stage and each workflow.

    ``facts`` gives a model's tier when a record has none.  ``cutoff``: when the
    windows were seeded (``None``: not yet); a record timestamped before it was in the
    store the seed read, so it is not added again.  ``floor``: the evidence window's
    start at the last `expire`.
    """

    __slots__ = ("_facts", "_newest", "_pairs", "_rings", "cutoff", "floor", "size")

    def __init__(self, size: int, facts: Callable[[str], ModelFacts | None]) -> None:
        self.size = size
        self._facts = facts
        self._rings: dict[tuple[str, str | None], RecentOutcomes] = {}
        # the newest timestamp each ring holds an outcome of (epoch seconds)
        self._newest: dict[tuple[str, str | None], float] = {}
        self._pairs: dict[tuple[str, str], tuple[RecentOutcomes, RecentOutcomes]] = {}
        self.cutoff: float | None = None
        self.floor = -math.inf

    def window(self, workflow: str, stage: str | None) -> list[_Item]:
        """The outcomes of ``workflow``/``stage`` (``None``: every stage), oldest first."""
        ring = self._rings.get((workflow, stage))
        return list(ring) if ring is not None else []

    def _ring(self, workflow: str, stage: str | None) -> RecentOutcomes:
        ring = self._rings.get((workflow, stage))
        if ring is None:
            ring = self._rings[(workflow, stage)] = deque(maxlen=self.size)
        return ring

    def _item(self, record: LLMCallRecord) -> _Item:
        tier = record.tier
        if tier is None:
            facts = self._facts(record.model)
            tier = facts.tier if facts is not None else None
        return (record.model, tier, record.outcome.is_failure)

    def add(self, record: LLMCallRecord, ts: float) -> None:
        """
        Add one sample outcome timestamped ``ts`` to its stage's and workflow's windows,
        unless it is before ``cutoff`` or the evidence window's start (``floor``: the
        router takes no such outcome as evidence either).
        """
        if ts < self.floor or (self.cutoff is not None and ts < self.cutoff):
            return
        workflow = record.workflow or ""
        stage = record.stage or ""
        rings = self._pairs.get((workflow, stage))
        if rings is None:
            rings = self._pairs[(workflow, stage)] = (
                self._ring(workflow, stage),
                self._ring(workflow, None),
            )
        item = self._item(record)
        rings[0].append(item)
        rings[1].append(item)
        newest = self._newest
        for key in ((workflow, stage), (workflow, None)):
            if newest.get(key, -math.inf) < ts:
                newest[key] = ts

    def seed(self, workflow: str, stage: str | None, records: Iterable[LLMCallRecord]) -> None:
        """Put the store's ``records`` of one window before what was reported live."""
        ordered = sorted(records, key=lambda r: r.timestamp)
        items = [self._item(r) for r in ordered if r.outcome.is_sample]
        key = (workflow, stage)
        ring: RecentOutcomes = deque(items, maxlen=self.size)
        live = self._rings.get(key)
        if live is not None:
            ring.extend(live)
        self._pairs.clear()
        if not ring:
            return
        self._rings[key] = ring
        if ordered:
            ts = ordered[-1].timestamp.timestamp()
            if self._newest.get(key, -math.inf) < ts:
                self._newest[key] = ts

    def expire(self, floor: float) -> None:
        """
        Drop the windows whose every outcome is older than ``floor``, the evidence
        window's new start: O(windows), when ``floor`` moved on since the last call.
        """
        if floor <= self.floor:
            return
        self.floor = floor
        newest = self._newest
        old = [key for key, ts in newest.items() if ts < floor]
        if not old:
            return
        rings = self._rings
        for key in old:
            del newest[key]
            rings.pop(key, None)
        self._pairs.clear()
