"""
The recent outcomes per workflow stage that `recommend_tier_upgrade` judges: a window
of the last ``size`` sample outcomes per (workflow, stage) and per workflow (stage
``None``), seeded from the store at start, then fed live.  Pure: the router reads the
store and passes the records in.
"""

from __future__ import annotations

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
    store the seed read, so it is not added again.
    """

    __slots__ = ("_facts", "_pairs", "_rings", "cutoff", "size")

    def __init__(self, size: int, facts: Callable[[str], ModelFacts | None]) -> None:
        self.size = size
        self._facts = facts
        self._rings: dict[tuple[str, str | None], RecentOutcomes] = {}
        self._pairs: dict[tuple[str, str], tuple[RecentOutcomes, RecentOutcomes]] = {}
        self.cutoff: float | None = None

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
        """Add one sample outcome timestamped ``ts`` to its stage's and workflow's windows."""
        if self.cutoff is not None and ts < self.cutoff:
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

    def seed(self, workflow: str, stage: str | None, records: Iterable[LLMCallRecord]) -> None:
        """Put the store's ``records`` of one window before what was reported live."""
        items = [
            self._item(r) for r in sorted(records, key=lambda r: r.timestamp) if r.outcome.is_sample
        ]
        ring: RecentOutcomes = deque(items, maxlen=self.size)
        ring.extend(self._ring(workflow, stage))
        self._rings[(workflow, stage)] = ring
        self._pairs.clear()
