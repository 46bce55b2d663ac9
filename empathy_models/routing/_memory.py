"""
The router's evidence in memory: one `Arm` per (workflow, stage, model), and one
`StagePrior` per (workflow, stage).

Two feeds, one arithmetic: `EvidenceMemory.apply` takes the buckets a refresh read
from the store (replacing the router's own), and `EvidenceMemory.add` adds one outcome
reported in this process.  An outcome timestamped before the last refresh began is
not added: the store holds it, or will, and a later refresh brings it in.  So the same
records give the same evidence whether they arrived live, through a refresh or after a
restart.  Pure: no I/O, no clock (the router passes the times in).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from ..records import LLMCallRecord, Outcome
from .book import Arm, ChangeTest, StagePrior
from .stats import Sums

__all__ = ["ArmKey", "EvidenceMemory"]

ArmKey = tuple[str | None, str | None, str]
"""(workflow, stage, model); an empty workflow or stage is ``None``."""

StageKey = tuple[str | None, str | None]

LOG_SIZE: Final = 4096
"""The most changes `EvidenceMemory.log` keeps (then the older half is dropped)."""

ChangedBuckets = dict[ArmKey, list[tuple[int, Sums]]]
"""What a refresh read: per arm, (bucket start, the bucket's sums) for every changed bucket."""


class EvidenceMemory:
    """
    Every arm's buckets and every stage's prior, fed by refreshes and live outcomes.

    Only arms holding evidence are kept: an arm left with no bucket and nothing
    reported live since the last refresh (its window slid past all it held, or the
    store's buckets went) is dropped (`settle`), as is the prior of a stage left with
    no arm.  Such an arm equals a new one, which is what a router started then holds
    (none), so the verdicts are the same; what is kept follows the window, not every
    stage ever seen.

    ``epoch`` grows whenever an arm is added or dropped (the verdict cache re-reads
    its arms then); ``version`` is the store's evidence version read so far;
    ``cutoff`` when the last successful refresh began (``None``: never).

    ``log`` lists the arms live outcomes changed, in order (``log_start`` is the
    position of its first entry among all changes ever logged), so the verdict cache
    re-judges only those; ``resets`` grows when arms change otherwise (a refresh),
    after which it looks at every arm.

    ``live``: the arms given outcomes in this process since the last refresh applied
    the store's buckets (the next one visits them, to put the store's version back;
    without a store, every arm given outcomes that is kept).  ``touched``: the arms a
    refresh or a slide changed since the last `settle`.  So a refresh visits what
    changed and what was reported live, never every arm.
    """

    __slots__ = (
        "arms",
        "cutoff",
        "epoch",
        "live",
        "log",
        "log_start",
        "priors",
        "resets",
        "stages",
        "test",
        "touched",
        "version",
    )

    def __init__(self, test: ChangeTest) -> None:
        self.test = test
        self.arms: dict[ArmKey, Arm] = {}
        # the arms of each (workflow, stage), by model: what its prior is summed from
        self.stages: dict[StageKey, dict[str, Arm]] = {}
        self.epoch = 0
        self.priors: dict[StageKey, StagePrior] = {}
        self.cutoff: float | None = None
        self.version = 0
        self.log: list[Arm] = []
        self.log_start = 0
        self.resets = 0
        self.live: dict[ArmKey, Arm] = {}
        self.touched: set[ArmKey] = set()

    def _arm(self, key: ArmKey) -> Arm:
        arm = self.arms.get(key)
        if arm is None:
            arm = self.arms[key] = Arm(test=self.test)
            models = self.stages.get(key[:2])
            if models is None:
                models = self.stages[key[:2]] = {}
            models[key[2]] = arm
            self.epoch += 1
        return arm

    def apply(
        self,
        changed: ChangedBuckets,
        version: int,
        cutoff: float,
        walked: Mapping[ArmKey, Arm] | None = None,
    ) -> None:
        """
        Replace the changed buckets by the store's, put back the store's version of
        the buckets live outcomes changed, and `settle`: O(changed arms + arms given
        live outcomes since the last refresh).

        ``version`` is the store's version after this read, ``cutoff`` when the read
        began: later outcomes reported live are added, earlier ones are the store's.
        ``walked``: arms already built from ``changed`` (`Arm.walked`) for keys that held
        nothing, taken over where they still hold nothing (`Arm.take`).
        """
        self.resets += 1
        visit = changed.keys() | self.live.keys()
        for key in visit:
            arm = self._arm(key)
            fresh = walked.get(key) if walked else None
            if fresh is None or not arm.take(fresh):
                arm.apply(changed.get(key, ()))
        self.live.clear()
        self.touched |= visit
        self.settle()
        self.version = version
        self.cutoff = cutoff

    def behind(self, floor: int) -> list[tuple[ArmKey, Arm]]:
        """The arms holding a bucket that starts before ``floor`` (the window's start)."""
        return [
            (key, arm) for key, arm in self.arms.items() if arm.starts and arm.starts[0] < floor
        ]

    def rebase(self, key: ArmKey, arm: Arm, floor: int) -> None:
        """`Arm.rebase` for one arm; the verdict cache then looks at every arm again."""
        if arm.rebase(floor):
            self.resets += 1
            self.touched.add(key)

    def adopt(
        self, key: ArmKey, arm: Arm, fresh: Arm, snapshot: dict[int, Sums], floor: int
    ) -> None:
        """`Arm.adopt` for one arm; the verdict cache then looks at every arm again."""
        arm.adopt(fresh, snapshot, floor)
        self.resets += 1
        self.touched.add(key)

    def settle(self) -> None:
        """
        Drop the arms a refresh or slide left with no evidence (`touched`, holding no
        bucket and nothing reported live), then rebuild the priors of the stages whose
        arms changed since the last `settle` from their arms' current regimes (a
        stage left without arms loses its prior).
        """
        touched = self.touched
        arms = self.arms
        stages = self.stages
        live = self.live
        dropped = False
        for key in touched:
            arm = arms.get(key)
            if arm is not None and not arm.starts and not arm.saved:
                del arms[key]
                models = stages[key[:2]]
                del models[key[2]]
                if not models:
                    del stages[key[:2]]
                live.pop(key, None)
                dropped = True
        if dropped:
            self.epoch += 1  # contexts read their arms again
        # live outcomes' stages too: their priors were added to, not summed
        todo = {key[:2] for key in touched}
        todo.update(key[:2] for key in live)
        touched.clear()
        priors = self.priors
        for stage_key in todo:
            stage_arms = stages.get(stage_key)
            old = priors.get(stage_key)
            if stage_arms is None:
                if old is not None:
                    del priors[stage_key]
                continue
            prior = StagePrior()
            for arm in stage_arms.values():
                prior.successes += arm.cur[1]
                prior.output_tokens += arm.cur[6]
            prior.version = (old.version + 1) if old is not None else 0
            priors[stage_key] = prior

    def add(self, record: LLMCallRecord, ts: float) -> bool:
        """
        Add one sample outcome timestamped ``ts`` (epoch seconds), unless it is before
        ``cutoff`` (the store's, or before the window of a router without a store):
        whether it was added.
        """
        if self.cutoff is not None and ts < self.cutoff:
            return False
        key = (record.workflow or None, record.stage or None, record.model)
        arm = self.arms.get(key)
        if arm is None:
            arm = self._arm(key)
        self.live[key] = arm
        success = record.outcome is Outcome.SUCCESS
        arm.add(
            ts,
            success,
            record.latency_ms,
            record.input_tokens,
            record.output_tokens,
            record.cost_usd,
            record.ttft_ms,
        )
        log = self.log
        log.append(arm)
        if len(log) > LOG_SIZE:
            del log[: LOG_SIZE // 2]
            self.log_start += LOG_SIZE // 2
        if success:
            prior = self.priors.get(key[:2])
            if prior is None:
                prior = self.priors[key[:2]] = StagePrior()
            prior.successes += 1
            prior.output_tokens += record.output_tokens
            prior.version += 1
        return True
