"""
The evidence book: per-arm evidence kept as minute buckets, split into regimes by a
sequential change test.

An arm is one model serving one (workflow, stage).  Its evidence is a sequence of
buckets (`empathy_models.evidence`: additive sums per minute).  Each refresh takes the
telemetry store's version of every bucket that changed (authoritative: every process's
records); between refreshes the outcomes this process reports are added to their
buckets with the same arithmetic (`Arm.add`), and the next refresh puts the store's
version back in their place (it holds those records by then).  So nothing is counted
twice, and the same records give the same buckets whichever way they arrived.

**Regimes.**  A stationary arm accumulates evidence without a cap.  Two one-sided
Bernoulli CUSUM statistics run over the buckets of the current regime, on the failure
indicator against the regime's own failure rate (estimated from the buckets before the
one being tested, with a Jeffreys prior): one for a degradation, one for an
improvement.  When one crosses `ChangeTest.threshold`, a change is detected: a new
regime starts at the bucket where that statistic last left zero, and only then is the
older evidence set aside.  The regimes left behind are kept as summaries; when a new
regime is consistent with an earlier one (a two-proportion test), that regime's
evidence is restored into it, so a model that recovers to its old rate regains its old
standing quickly.

The statistics are evaluated bucket by bucket (the open bucket again after each live
outcome), and a changed bucket re-runs the test from that bucket on, so the regimes,
like the sums, depend only on the buckets: live, after a refresh and after a restart
the same records give the same verdict.  Re-running costs O(buckets after the change);
per-bucket CUSUM state is kept to make that possible.  When the window's start moves on
past an arm's first buckets, they are dropped and the test runs again from the new start
(`Arm.rebase`), so that what an arm holds, its regimes included, rests on the window's
buckets alone, as for a router started then.  A later outcome of the newest
bucket can therefore undo a change detected in it; for an improvement the summary says
so (`ArmSummary.improving`), and the decision acts on it once a later bucket holds an
outcome, so a model that recovers is not given the traffic and taken off it again
within one minute.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Final

from attrs import define, field, frozen

from .._fast import trusted_constructor
from ._walk import _NEVER, ChangeTest, ChangeWalk, Regime, _add, _Redo, _zeros
from .stats import (
    COST_SUM,
    IN_SUM,
    LAT_LOG,
    LAT_N,
    LAT_SQ,
    OUT_SUM,
    SAMPLES,
    SUCCESSES,
    TTFT_LOG,
    TTFT_N,
    TTFT_SQ,
    Sums,
    add_outcome,
    latency_bounds,
    summary_bounds,
    wilson_bounds,
)

__all__ = ["Arm", "ArmSummary", "ChangeTest", "Regime", "StagePrior", "bucket_of"]

BUCKET: Final = 60


def bucket_of(ts: float) -> int:
    """Start (epoch seconds) of the minute bucket holding ``ts``."""
    return math.floor(ts / BUCKET) * BUCKET


@frozen(slots=True)
class ArmSummary:
    """
    What a decision needs to know about one arm's current regime.

    ``samples`` / ``successes`` are the regime's evidence (restored evidence included);
    ``window_samples`` every sample in the window.  ``lower`` / ``upper`` are the Wilson
    bounds at the policy's ``z``, ``reject_upper`` at its ``reject_z``, ``keep_lower``
    at its ``keep_z`` (what an eligible arm must stay above).  Latency figures are of
    successful calls; token means over successes, cost over every sample.  ``since``
    is the regime's start (``None`` for an arm's first regime) and ``change`` a phrase
    describing the change that began it.  ``unpooled_lower``, for a regime with
    restored evidence only: the larger of the lower bounds (at ``z``) of the restored
    evidence alone and of the regime's own evidence alone (restoring is a hypothesis;
    what it may prove is what one of its parts proves by itself).  ``record_lower``:
    the highest lower bound (at ``z``) of any of the arm's regimes in the window, this
    one included (as ``unpooled_lower`` when it holds restored evidence): what the
    arm's best stretch proves.  ``proven_lower``: the highest lower bound (at the change
    test's ``proof_z``; as ``unpooled_lower`` with restored evidence, and never above
    the pooled one) that this regime's evidence had at the end of one of its buckets
    before the last: the hysteresis of the success-rate verdict, a function of the
    buckets alone, so every process that has read the same buckets keeps a model
    eligible alike.  ``improving``: the change that began this regime is an improvement
    detected in the arm's newest bucket, which later outcomes of that bucket may still
    undo (the test runs per bucket); it is acted on once a later bucket holds one.
    """

    samples: float = 0.0
    successes: float = 0.0
    window_samples: int = 0
    success_rate: float | None = None
    lower: float = 0.0
    upper: float = 1.0
    reject_upper: float = 1.0
    keep_lower: float = 0.0
    latency_n: float = 0.0
    p50: float | None = None
    p95: float | None = None
    p95_lower: float | None = None
    p95_upper: float | None = None
    mean_input_tokens: float | None = None
    mean_output_tokens: float | None = None
    mean_cost: float | None = None
    since: int | None = None
    change: str | None = None
    ttft_n: float = 0.0
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    ttft_p95_lower: float | None = None
    ttft_p95_upper: float | None = None
    unpooled_lower: float | None = None
    record_lower: float = 0.0
    proven_lower: float = 0.0
    improving: bool = False


EMPTY_SUMMARY: Final = ArmSummary()
_new_summary: Final = trusted_constructor(ArmSummary, positional=True)


@define(slots=True, eq=False)
class StagePrior:
    """Output tokens observed over every arm of one (workflow, stage): untried arms' prior."""

    successes: float = 0.0
    output_tokens: float = 0.0
    version: int = 0

    def mean(self) -> float | None:
        return self.output_tokens / self.successes if self.successes > 0 else None


def _earlier_record(earlier: list[Regime], z: float) -> float:
    """The highest lower bound (at ``z``) of the closed regimes ``earlier`` (0 if none)."""
    record = 0.0
    for r in earlier:
        c = r.closed
        if c is not None and c[SAMPLES] > 0:
            record = max(record, wilson_bounds(c[SUCCESSES], c[SAMPLES], z)[0])
    return record


def _summarize(
    v: list[float],
    window_samples: int,
    regime: Regime,
    earlier_record: float,
    z: float,
    reject_z: float,
    keep_z: float,
    proven: float,
    improving: bool,
) -> ArmSummary:
    n = v[SAMPLES]
    s = v[SUCCESSES]
    lower, upper, reject_upper, keep_lower = summary_bounds(s, n, z, reject_z, keep_z)
    p50, p95, p95_lo, p95_hi = latency_bounds(v[LAT_N], v[LAT_LOG], v[LAT_SQ], z)
    t50, t95, t95_lo, t95_hi = latency_bounds(v[TTFT_N], v[TTFT_LOG], v[TTFT_SQ], z)
    change: str | None = None
    if regime.detected is not None:
        change = regime.kind
        if regime.before_rate is not None and n > 0:
            change += f" (success rate {regime.before_rate:.3f} -> {s / n:.3f}"
            change += ", earlier evidence restored)" if regime.restored is not None else ")"
    unpooled: float | None = None
    base = regime.base
    if base is not None:
        unpooled = max(
            wilson_bounds(base[SUCCESSES], base[SAMPLES], z)[0],
            wilson_bounds(s - base[SUCCESSES], n - base[SAMPLES], z)[0],
        )
    # restored evidence counts towards the record only as its parts do; the closed
    # regimes' own (`_earlier_record`)
    record = lower if unpooled is None else unpooled
    record = record if record >= earlier_record else earlier_record
    return _new_summary(
        n,
        s,
        window_samples,
        (s / n) if n > 0 else None,
        lower,
        upper,
        reject_upper,
        keep_lower,
        v[LAT_N],
        p50,
        p95,
        p95_lo,
        p95_hi,
        (v[IN_SUM] / s) if s > 0 else None,
        (v[OUT_SUM] / s) if s > 0 else None,
        (v[COST_SUM] / n) if n > 0 else None,
        regime.start if regime.detected is not None else None,
        change,
        v[TTFT_N],
        t50,
        t95,
        t95_lo,
        t95_hi,
        unpooled,
        record,
        proven,
        improving,
    )


_WALKED: Final = (
    "starts",
    "data",
    "cum_n",
    "cum_f",
    "up",
    "dn",
    "up_from",
    "dn_from",
    "proof",
    "regimes",
    "cur",
    "window_n",
)
"""`Arm`'s evidence and the change test's state over it (what `Arm._become` takes over)."""


@define(slots=True, eq=False)
class Arm(ChangeWalk):
    """
    One arm's buckets, regimes and change-test state; mutated only by the router.

    ``version`` grows with every change of the arm's evidence, so a cached verdict is
    current while the version it was computed from is.
    """

    test: ChangeTest
    starts: list[int] = field(factory=list)  # effective buckets, sorted
    data: dict[int, Sums] = field(factory=dict)  # sums by bucket start
    # the store's version of the buckets this process added to since the last refresh
    saved: dict[int, Sums | None] = field(factory=dict)
    # change-test state after each effective bucket (parallel to starts)
    cum_n: array[float] = field(factory=lambda: array("d"))
    cum_f: array[float] = field(factory=lambda: array("d"))
    up: array[float] = field(factory=lambda: array("d"))
    dn: array[float] = field(factory=lambda: array("d"))
    up_from: array[int] = field(factory=lambda: array("q"))
    dn_from: array[int] = field(factory=lambda: array("q"))
    # the highest lower bound (ChangeTest.proof_z) of the regime at a bucket's end so far
    proof: array[float] = field(factory=lambda: array("d"))
    regimes: list[Regime] = field(
        factory=lambda: [Regime(start=_NEVER, detected=None, kind="initial")]
    )
    cur: list[float] = field(factory=_zeros)  # current regime's sums
    window_n: int = 0
    streak: int = 0  # live successes in a row (paces re-probes)
    version: int = 0
    summary: ArmSummary | None = None
    summary_version: int = -1
    # what the closed regimes (all but the current) give, kept until the regimes change
    # (`_regimes_changed`): their failure rates (`_earlier_rates`) and, with the ``z``
    # it was taken at, their highest lower bound (`_earlier_record`)
    earlier_rates: list[float] | None = None
    earlier_record: tuple[float, float] | None = None
    # the last regime closed by a change, (its start, the change's start, its sums
    # before the change), kept while no bucket before the change's start changes: an
    # outcome in the minute a change was detected re-decides that change (see
    # `_rerun`), which then closes the same regime at the same bucket again
    closed_sums: tuple[int, int, tuple[float, ...]] | None = None
    # the last change acted on, to decide it again at the cost of one bucket (`_redecide`)
    # while later outcomes arrive in the bucket it was detected in, the newest:
    # (that bucket, the regime it closed, the regime it began, the closed regime's
    # change-test state before that bucket, its earlier regimes' failure rates).  Valid
    # while those two regimes are the last: a change to an earlier bucket re-runs the
    # walk through the detection's bucket, which acts on the change anew (a new
    # ``redo``) or not (the regime it began is gone), and so does a new window (new
    # regimes)
    redo: _Redo | None = None

    # ------------------------------------------------------------------ reading

    def summarize(self, z: float, reject_z: float, keep_z: float) -> ArmSummary:
        """The current regime's summary (cached until the evidence changes)."""
        if self.summary_version != self.version or self.summary is None:
            regimes = self.regimes
            known = self.earlier_record
            if known is None or known[0] != z:
                known = self.earlier_record = (z, _earlier_record(regimes[:-1], z))
            self.summary = _summarize(
                self.cur,
                self.window_n,
                regimes[-1],
                known[1],
                z,
                reject_z,
                keep_z,
                self._proven(),
                self._improving(),
            )
            self.summary_version = self.version
        return self.summary

    @property
    def regime(self) -> Regime:
        return self.regimes[-1]

    def _improving(self) -> bool:
        # the regime began with an improvement detected in the arm's newest bucket
        regime = self.regimes[-1]
        return (
            regime.kind == "improved"
            and regime.detected is not None
            and bool(self.starts)
            and regime.detected >= self.starts[-1]
        )

    def _proven(self) -> float:
        # the regime's highest lower bound at the end of a bucket before the last
        k = len(self.starts) - 2
        if k < 0 or self.starts[k] < self.regimes[-1].start:
            return 0.0
        return self.proof[k]

    # ------------------------------------------------------------------ live outcomes

    def add(
        self,
        ts: float,
        success: bool,
        latency_ms: float,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float,
        ttft_ms: float | None = None,
    ) -> None:
        """Fold one outcome this process reported into its bucket, in O(1) amortized."""
        t = bucket_of(ts)
        old = self.data.get(t)
        if t not in self.saved:
            self.saved[t] = old
        if self.closed_sums is not None and t < self.closed_sums[1]:
            self.closed_sums = None
        acc = _zeros() if old is None else list(old)
        add_outcome(acc, success, latency_ms, input_tokens, output_tokens, cost_usd, ttft_ms)
        if old is None:
            self._insert(t, tuple(acc))
        else:
            self.data[t] = tuple(acc)
        if t >= self.regimes[-1].start:
            add_outcome(
                self.cur, success, latency_ms, input_tokens, output_tokens, cost_usd, ttft_ms
            )
        self.window_n += 1
        self.streak = self.streak + 1 if success else 0
        self.version += 1
        self._rerun(self._pos(t))

    # ------------------------------------------------------------------ store buckets

    def apply(self, buckets: Iterable[tuple[int, Sums | None]]) -> None:
        """
        Take the store's changed buckets (``None``: gone); buckets this process added to
        since the last refresh go back to the store's version (which holds those records
        once stored).
        """
        changed: dict[int, Sums | None] = dict(buckets)
        for t, v in self.saved.items():
            changed.setdefault(t, v)
        self.saved.clear()
        if not changed:
            return
        if not self.starts:
            self._load(changed)
            return
        first: int | None = None
        for t in sorted(changed):
            if self._replace(t, changed[t]) and (first is None or t < first):
                first = t
        if first is not None:
            self.version += 1
            self._rerun(self._pos(first))

    def _load(self, buckets: Mapping[int, Sums | None]) -> None:
        # an empty arm's first buckets (start-up): built in one pass, tested once
        rows = sorted((t, v) for t, v in buckets.items() if v is not None)
        if not rows:
            return
        n = len(rows)
        self.starts = [t for t, _ in rows]
        self.data = dict(rows)
        columns = zip(*(v for _, v in rows), strict=True)
        self.cur = [0.0 + sum(column) for column in columns]
        self.window_n = sum(int(v[SAMPLES]) for _, v in rows)
        zeros = bytes(8 * n)
        self.cum_n, self.cum_f = array("d", zeros), array("d", zeros)
        self.up, self.dn = array("d", zeros), array("d", zeros)
        self.proof = array("d", zeros)
        self.up_from, self.dn_from = array("q", zeros), array("q", zeros)
        self.version += 1
        self._rerun(0)

    def rebase(self, floor: int) -> bool:
        """
        Drop the buckets that start before ``floor`` (the window's new start) and run
        the change test again from the first bucket left, as a router started on those
        buckets does: regimes, their sums and the change test's state then rest on the
        window's evidence alone.  O(the arm's buckets); ``False`` (nothing done) when no
        bucket is older than ``floor``.  In two steps, so that the walk can run away
        from the event loop: `walked` over `window_from`, then `adopt`.
        """
        if not self.starts or self.starts[0] >= floor:
            return False
        kept = self.window_from(floor)
        self.adopt(Arm.walked(self.test, kept), kept, floor)
        return True

    def window_from(self, floor: int) -> dict[int, Sums]:
        """The buckets from ``floor`` on (the sums are immutable: a snapshot)."""
        data = self.data
        return {t: data[t] for t in self.starts[bisect_left(self.starts, floor) :]}

    @classmethod
    def walked(cls, test: ChangeTest, buckets: Mapping[int, Sums]) -> Arm:
        """
        A new arm holding ``buckets``, the change test run over them.  Touches nothing
        shared: it may run in another thread while the arm it is for takes outcomes.
        """
        arm = cls(test=test)
        arm._load(buckets)
        return arm

    def take(self, fresh: Arm) -> bool:
        """
        Take over ``fresh`` (`walked` from a refresh's buckets) if this arm holds nothing
        yet; ``False`` (nothing done) if it does: then `apply` those buckets instead.
        """
        if self.starts or self.saved:
            return False
        self._become(fresh)
        return True

    def adopt(self, fresh: Arm, snapshot: dict[int, Sums], floor: int) -> None:
        """
        Take over ``fresh`` (`walked` from ``snapshot``, this arm's buckets from
        ``floor`` on when it began) with the buckets this arm changed since, as a
        refresh applies them (the change test re-run from the earliest), and this arm's
        buckets not yet in the store.  Outcomes already before ``floor`` are gone.
        """
        changed: dict[int, Sums | None] = {
            t: v for t, v in self.data.items() if t >= floor and snapshot.get(t) is not v
        }
        for t in snapshot.keys() - self.data.keys():
            changed[t] = None
        fresh.apply(changed.items())
        self._become(fresh)
        self.saved = {t: v for t, v in self.saved.items() if t >= floor}

    def _become(self, fresh: Arm) -> None:
        # ``fresh``'s evidence and change-test state, under a newer version than either's
        for name in _WALKED:
            setattr(self, name, getattr(fresh, name))
        self._regimes_changed()
        self.closed_sums = None
        self.version = max(self.version, fresh.version) + 1

    # ------------------------------------------------------------------ internals

    def _insert(self, t: int, v: Sums) -> None:
        starts = self.starts
        if not starts or t > starts[-1]:
            i = len(starts)
            starts.append(t)
        else:
            i = bisect_left(starts, t)
            starts.insert(i, t)
        self.data[t] = v
        for arr in (self.cum_n, self.cum_f, self.up, self.dn, self.proof):
            arr.insert(i, 0.0)
        for arr2 in (self.up_from, self.dn_from):
            arr2.insert(i, 0)

    def _replace(self, t: int, v: Sums | None) -> bool:
        old = self.data.get(t)
        if old is None and v is None:
            return False
        if self.closed_sums is not None and t < self.closed_sums[1]:
            self.closed_sums = None
        current = self.regimes[-1]
        if old is not None:
            self.window_n -= int(old[SAMPLES])
            if t >= current.start:
                _add(self.cur, old, -1.0)
        if v is None:
            i = self._pos(t)
            del self.starts[i]
            del self.data[t]
            for arr in (self.cum_n, self.cum_f, self.up, self.dn, self.proof):
                del arr[i]
            for arr2 in (self.up_from, self.dn_from):
                del arr2[i]
            return True
        if old is None:
            self._insert(t, v)
        else:
            self.data[t] = v
        self.window_n += int(v[SAMPLES])
        if t >= current.start:
            _add(self.cur, v)
        return True
