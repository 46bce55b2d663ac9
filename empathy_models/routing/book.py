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
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Final

from attrs import define, field, frozen

from .._fast import trusted_constructor
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
    WIDTH,
    Sums,
    add_outcome,
    latency_bounds,
    summary_bounds,
    wilson_bounds,
    wilson_lower,
)

__all__ = ["Arm", "ArmSummary", "ChangeTest", "Regime", "StagePrior", "bucket_of"]

BUCKET: Final = 60
_NEVER: Final = -(2**62)


def bucket_of(ts: float) -> int:
    """Start (epoch seconds) of the minute bucket holding ``ts``."""
    return math.floor(ts / BUCKET) * BUCKET


def _zeros() -> list[float]:
    return [0.0] * WIDTH


def _add(into: list[float], v: Sequence[float], sign: float = 1.0) -> None:
    for k in range(WIDTH):
        into[k] += sign * v[k]


@frozen(kw_only=True)
class ChangeTest:
    """
    Settings of the per-arm change test (see the module docstring).

    ``threshold``: the CUSUM level that signals a change (log-likelihood ratio units).
    ``min_samples``: calls a regime needs before it is tested.  ``degrade_ratio`` /
    ``degrade_step``: the alternative failure rate of the degradation test is
    ``max(q * degrade_ratio, q + degrade_step)``; the improvement test's is
    ``q / improve_ratio``, or the failure rate of an earlier, better regime when there
    is one (recovering to it is what the test looks for; a lucky stretch the arm came
    back from is not one: see `_fluke`).  ``q`` is floored at
    ``min_rate``, so a run of perfect calls does not make two failures look like a change.
    An improvement that is not a return to an earlier regime's rate must clear
    ``improve_threshold`` (higher than ``threshold``: it only speeds a verdict up, and a
    steady arm with many calls a minute would otherwise raise one every few thousand
    calls).  The degradation test takes ``q`` at the upper end of its Wilson interval at
    ``reference_z``: the regime's rate is an estimate, and from a lucky start the arm's
    own steady rate would otherwise read as a degradation.  ``proof_z`` is the quantile
    of the lower bound kept at every bucket's end (`ArmSummary.proven_lower`: the
    routing policy's ``z``).
    """

    threshold: float = 5.0
    min_samples: float = 20.0
    degrade_ratio: float = 3.0
    degrade_step: float = 0.03
    improve_ratio: float = 4.0
    min_rate: float = 0.01
    restore_z: float = 2.0
    restore_threshold: float = 2.0
    reference_z: float = 1.0
    improve_threshold: float = 8.0
    proof_z: float = 1.96


@define(slots=True, eq=False)
class Regime:
    """
    A stretch of an arm's history with one success rate.

    ``start`` is its first bucket, ``detected`` the bucket in which the change that
    began it was detected (``None`` for an arm's first regime), ``kind`` is
    ``"degraded"`` or ``"improved"`` (``"initial"`` for the first).  ``base`` holds the
    evidence restored from an earlier regime (``restored`` is that regime's start);
    ``closed`` the regime's total once a later one superseded it.
    """

    start: int
    detected: int | None
    kind: str
    before_rate: float | None = None
    base: list[float] | None = None
    restored: int | None = None
    closed: list[float] | None = None


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


_CusumParams = tuple[float, float, float, float, float, float, float, float, float]
_WalkState = tuple[float, float, float, float, int, int, float]
"""The change test's state before a bucket: calls, failures, the two sums and the
buckets they last left zero in, the regime's proof so far (`Arm._state_before`)."""
_Redo = tuple[int, "Regime", "Regime", _WalkState, list[float]]


def _cusum_params(test: ChangeTest) -> _CusumParams:
    return (
        test.reference_z,
        test.min_rate,
        test.degrade_ratio,
        test.degrade_step,
        test.improve_ratio,
        test.improve_threshold,
        test.restore_threshold,
        test.threshold,
        test.reference_z * test.reference_z,
    )


def _cusum(
    n0: float,
    f0: float,
    u0: float,
    d0: float,
    n: float,
    f: float,
    uf: int,
    df: int,
    regime_start: int,
    earlier: bool,
    rates: list[float],
    params: _CusumParams,
) -> tuple[float, float, tuple[int, str] | None]:
    """
    The change test's degradation and improvement sums (see `ChangeTest`) after one
    bucket of ``n`` calls, ``f`` failed, in a regime that starts at ``regime_start``
    with ``n0`` calls, ``f0`` failed, before it (``earlier``: evidence restored into
    it; ``rates``: the failure rates of the earlier regimes, oldest first), and the
    change they signal: ``(start bucket, kind)`` or ``None``.

    It runs once per bucket (a start applies every bucket of the window), so the
    arithmetic of `wilson_upper` is written out here, term for term
    (tests/test_routing_evidence.py recomputes every bucket's sums with it).
    """
    ref_z, min_rate, ratio, step, improve_ratio, improve_h, restore_h, h, ref_z2 = params
    # degradation: the regime's failure rate is itself an estimate, so the test starts
    # from the upper end of its interval (wilson_upper(f0, n0, ref_z)), floored: a lucky
    # start is then not mistaken for a degradation later (which would split a stationary
    # arm into regimes whose evidence could be reassembled selectively)
    if n0 <= 0.0:
        q_hi = 1.0
    else:
        q = f0 / n0
        q = q if q > 0.0 else 0.0
        q = q if q < 1.0 else 1.0
        margin = ref_z * math.sqrt(q * (1.0 - q) / n0 + ref_z2 / (4.0 * n0 * n0))
        q_hi = (q + ref_z2 / (2.0 * n0) + margin) / (1.0 + ref_z2 / n0)
        q_hi = q_hi if q_hi < 1.0 else 1.0
        q_hi = q_hi if q_hi > q else q
    q = q_hi if q_hi > min_rate else min_rate
    q_up = q * ratio
    q_up = q_up if q_up >= q + step else q + step
    q_up = q_up if q_up < 0.5 else 0.5
    u = d = 0.0
    # (a bucket without failures, the common case, skips the failure term's log: adding
    # its zero would give the same sum)
    if q_up > q:
        ok_term = (n - f) * math.log((1.0 - q_up) / (1.0 - q))
        u = (u0 + f * math.log(q_up / q) + ok_term) if f else (u0 + ok_term)
    # improvement: against the Jeffreys estimate, not floored (a floor above an arm's
    # true failure rate would read its steady rate as an improvement, again and again: a
    # 0.999 arm cut into thousands of regimes).  Going back to the most recent clearly
    # better earlier regime's rate needs less evidence (that regime's evidence is then
    # restored, and the degradation test undoes a wrong restore); otherwise the
    # alternative is a fixed ratio below the current rate
    q = (f0 + 0.5) / (n0 + 1.0)
    q_dn, h_dn = q / improve_ratio, improve_h
    if rates:
        limit = q / 1.5
        for qr in reversed(rates):
            if qr < limit:
                q_dn, h_dn = qr, restore_h
                break
    if q_dn < q:
        ok_term = (n - f) * math.log((1.0 - q_dn) / (1.0 - q))
        d = (d0 + f * math.log(q_dn / q) + ok_term) if f else (d0 + ok_term)
    u = u if u > 0.0 else 0.0
    d = d if d > 0.0 else 0.0
    if u > h:
        if uf > regime_start or earlier:
            return u, d, (uf, "degraded")
        u = 0.0  # the whole regime: nothing earlier to set aside
    elif d > h_dn:
        if df > regime_start or earlier:
            return u, d, (df, "improved")
        d = 0.0
    return u, d, None


def _proof(
    best: float,
    n: float,
    f: float,
    base: list[float] | None,
    base_lower: float,
    z: float,
    z2: float,
) -> float:
    """
    ``best`` raised to what a regime proves at a bucket's end (``n`` calls, ``f``
    failed, ``base`` restored among them, whose own lower bound is ``base_lower``), as
    `ArmSummary.proven_lower`: the lower bound at ``z`` (``z2 = z * z``); with restored
    evidence, what one of its parts proves by itself, at most.  A bound never exceeds
    its rate, so a rate at or under ``best`` is not computed.  (`wilson_lower`'s
    arithmetic is written out for the regime's whole evidence, as in `_cusum`.)
    """
    if n <= 0.0 or n - f <= best * n:
        return best
    q = (n - f) / n
    q = q if q > 0.0 else 0.0
    q = q if q < 1.0 else 1.0
    margin = z * math.sqrt(q * (1.0 - q) / n + z2 / (4.0 * n * n))
    proved = (q + z2 / (2.0 * n) - margin) / (1.0 + z2 / n)
    proved = proved if proved > 0.0 else 0.0
    if base is not None and proved > best:
        own = wilson_lower(n - f - base[SUCCESSES], n - base[SAMPLES], z, z2)
        part = base_lower if base_lower >= own else own
        proved = part if part < proved else proved
    return proved if proved > best else best


def _fluke(regime: Regime, following: Regime) -> bool:
    """
    Whether ``regime``, an improvement to a rate no earlier regime had, was a lucky
    stretch: the degradation that ended it (``following``) went back to an earlier
    regime's rate and restored that regime's evidence, which outweighs the stretch
    (more calls).  A fluke's rate is not a target of the improvement test's cheaper
    threshold (`ChangeTest.restore_threshold`): otherwise a steady arm returns to it by
    chance a run of ~45 successes later, and back again, hundreds of times a week.  A
    real return to that rate is still detected, at ``improve_threshold``.  A restored
    regime is never a fluke (a model that recovered keeps its old standing whatever
    false alarms came after), nor is one that holds more calls than the evidence
    restored after it: that is the model's steady rate after a short, worse start (a
    cold start's first 30 calls at 0.90 restored by a real degradation must not make
    the 1,300 calls at 0.99 that followed them a stretch of luck).
    """
    if (
        regime.kind != "improved"
        or regime.restored is not None
        or following.kind != "degraded"
        or following.restored is None
    ):
        return False
    restored, closed = following.base, regime.closed
    return restored is None or closed is None or closed[SAMPLES] < restored[SAMPLES]


def _jeffreys_failure_rate(v: list[float]) -> float:
    """The failure rate of the sums ``v`` with a Jeffreys prior."""
    return (v[SAMPLES] - v[SUCCESSES] + 0.5) / (v[SAMPLES] + 1.0)


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
class Arm:
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

    def _regimes_changed(self) -> None:
        # a regime was added, dropped or closed: what the closed ones give is taken anew
        self.earlier_rates = None
        self.earlier_record = None

    # ------------------------------------------------------------------ internals

    def _pos(self, t: int) -> int:
        return bisect_left(self.starts, t)

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

    def _sum(self, lo: int, hi: int) -> list[float]:
        # sums of the buckets at positions lo .. hi - 1
        data = self.data
        rows = [data[t] for t in self.starts[lo:hi]]
        if not rows:
            return _zeros()
        return [float(sum(col)) for col in zip(*rows, strict=True)]

    def _rerun(self, i: int) -> None:
        """
        Re-run the change test (see `ChangeTest`) from position ``i`` to the end: at
        each bucket its two sums (`_cusum`) and the regime's proof (`_proof`).
        """
        starts = self.starts
        if i >= len(starts):
            return
        redo = self.redo
        if redo is not None and i == len(starts) - 1 and self._redecide(redo, i):
            return
        regimes = self.regimes
        # regimes detected at or after the changed bucket are decided again; the
        # current regime's sums are re-summed at the end if any regime changed
        j, resum = self._reopen(i)
        test = self.test
        # detection bucket of the last change acted on in this run: a change must be
        # detected in a later bucket to be acted on, so the re-run from each change's
        # start always makes progress and ends (no evidence can start a change twice)
        last_detected = _NEVER
        # what depends on the regime alone, computed when the walk enters one
        rates: list[float] = []
        rates_of: Regime | None = None
        data = self.data
        cum_n, cum_f, up_a, dn_a = self.cum_n, self.cum_f, self.up, self.dn
        up_from, dn_from, proof = self.up_from, self.dn_from, self.proof
        params = _cusum_params(test)
        min_samples, z = test.min_samples, test.proof_z
        z2 = z * z
        end = len(starts)  # a split changes regimes, never buckets
        # the walk's state after the bucket before ``j``, carried over while no change
        # is acted on; read back from the arrays where the walk starts or a change began
        carried = False
        u0 = d0 = base_lower = 0.0
        uf = df = 0
        while j < end:
            t = starts[j]
            if carried:
                uf = uf if u0 > 0.0 else t
                df = df if d0 > 0.0 else t
            else:
                regime = regimes[-1]
                rstart = regime.start
                base = regime.base
                if rates_of is not regime:
                    rates = self._rates_before(regime, rates_of, rates)
                    rates_of = regime
                    if base is not None:
                        base_lower = wilson_lower(base[SUCCESSES], base[SAMPLES], z, z2)
                n0, f0, u0, d0, uf, df, best = self._state_before(j, regime)
            v = data[t]
            n = v[SAMPLES]
            f = n - v[SUCCESSES]
            u = d = 0.0
            alarm: tuple[int, str] | None = None
            if n0 >= min_samples and n > 0:
                u, d, alarm = _cusum(
                    n0, f0, u0, d0, n, f, uf, df, rstart, base is not None, rates, params
                )
            before: _WalkState | None = None
            if alarm is not None:
                if t <= last_detected:
                    alarm = None
                    u = d = 0.0
                else:
                    before = (n0, f0, u0, d0, uf, df, best)
            n0 = cum_n[j] = n0 + n
            f0 = cum_f[j] = f0 + f
            best = proof[j] = _proof(best, n0, f0, base, base_lower, z, z2)
            u0 = up_a[j] = u
            d0 = dn_a[j] = d
            up_from[j] = uf
            dn_from[j] = df
            if alarm is None:
                j += 1
                carried = True
                continue
            start, kind = alarm
            last_detected = t
            j = self._split(regime, start, kind, t, j)
            assert before is not None
            self.redo = (t, regime, regimes[-1], before, rates)
            carried = False
            resum = True
        if resum:
            current = regimes[-1]
            self.cur = self._sum(self._pos(current.start), len(starts))
            if current.base is not None:
                _add(self.cur, current.base)

    def _redecide(self, redo: _Redo, i: int) -> bool:
        """
        `_rerun` from ``i``, the newest bucket, when the last change acted on was
        detected in it (``redo``, `redo`): decided again from the closed regime's state
        before that bucket, and if the same change (start, kind, restored evidence)
        follows, only that bucket's state in the new regime is computed anew; the
        buckets between the change's start and it hold what a walk from the start would
        give them again.  ``False`` (nothing done) when the change comes out otherwise:
        then the whole walk decides.
        """
        t, old, new, before, rates = redo
        regimes = self.regimes
        if self.starts[i] != t or regimes[-1] is not new or regimes[-2] is not old:
            return False
        test = self.test
        v = self.data[t]
        n = v[SAMPLES]
        f = n - v[SUCCESSES]
        n0, f0, u0, d0, uf, df, _ = before
        if not (n0 >= test.min_samples and n > 0):
            return False
        params = _cusum_params(test)
        alarm = _cusum(
            n0, f0, u0, d0, n, f, uf, df, old.start, old.base is not None, rates, params
        )[2]
        if alarm is None or alarm != (new.start, new.kind):
            return False
        # what `_split` restores, judged on the new regime's buckets up to this one: its
        # sums without what it restored (exact: counts are whole numbers)
        base = new.base
        seg_n, seg_s = self.cur[SAMPLES], self.cur[SUCCESSES]
        if base is not None:
            seg_n -= base[SAMPLES]
            seg_s -= base[SUCCESSES]
        restored = self._restorable(new.kind, new.before_rate, seg_n, seg_s, len(regimes) - 2)
        if (restored.start if restored is not None else None) != new.restored:
            return False
        # the new regime's state at this bucket, as the walk from its start leaves it (a
        # change detected in this bucket already is not acted on again)
        n0, f0, u0, d0, uf, df, best = self._state_before(i, new)
        z = test.proof_z
        z2 = z * z
        base_lower = 0.0 if base is None else wilson_lower(base[SUCCESSES], base[SAMPLES], z, z2)
        u = d = 0.0
        if n0 >= test.min_samples and n > 0:
            u, d, again = _cusum(
                n0,
                f0,
                u0,
                d0,
                n,
                f,
                uf,
                df,
                new.start,
                base is not None,
                self._earlier_rates(),
                params,
            )
            if again is not None:
                u = d = 0.0
        n0 = self.cum_n[i] = n0 + n
        f0 = self.cum_f[i] = f0 + f
        self.proof[i] = _proof(best, n0, f0, base, base_lower, z, z2)
        self.up[i] = u
        self.dn[i] = d
        self.up_from[i] = uf
        self.dn_from[i] = df
        return True

    def _state_before(self, j: int, regime: Regime) -> _WalkState:
        """
        The change test's state before position ``j`` in ``regime``, as the walk takes
        it over: the regime's calls and failures so far, the two sums and the buckets
        they last left zero in (``j``'s own when they are at zero), the proof so far.
        """
        starts = self.starts
        t = starts[j]
        if j == 0 or starts[j - 1] < regime.start:
            base = regime.base
            if base is None:
                return 0.0, 0.0, 0.0, 0.0, t, t, 0.0
            return base[SAMPLES], base[SAMPLES] - base[SUCCESSES], 0.0, 0.0, t, t, 0.0
        k = j - 1
        u0, d0 = self.up[k], self.dn[k]
        uf = self.up_from[k] if u0 > 0.0 else t
        df = self.dn_from[k] if d0 > 0.0 else t
        return self.cum_n[k], self.cum_f[k], u0, d0, uf, df, self.proof[k]

    def _rates_before(
        self, regime: Regime, previous: Regime | None, rates: list[float]
    ) -> list[float]:
        """
        The failure rates of the regimes before ``regime`` (`_earlier_rates`), from
        ``rates`` (those before ``previous``) when ``previous`` is the one just before.
        """
        regimes = self.regimes
        closed = previous.closed if previous is not None else None
        if closed is None or len(regimes) < 2 or regimes[-2] is not previous:
            return self._earlier_rates()
        if closed[SAMPLES] >= self.test.min_samples and not _fluke(previous, regime):
            return [*rates, _jeffreys_failure_rate(closed)]
        return rates

    def _reopen(self, i: int) -> tuple[int, bool]:
        """
        Drop the regimes detected at or after bucket ``i``: the position to re-run the
        change test from, and whether any was dropped.
        """
        regimes = self.regimes
        t_i = self.starts[i]
        j = i
        dropped_any = False
        while len(regimes) > 1 and (regimes[-1].detected or _NEVER) >= t_i:
            dropped = regimes.pop()
            regimes[-1].closed = None
            dropped_any = True
            j = min(j, self._pos(dropped.start))
        if dropped_any:
            self._regimes_changed()
        return j, dropped_any

    def _split(self, regime: Regime, start: int, kind: str, t: int, j: int) -> int:
        """
        Act on a change of ``kind`` that started at bucket ``start`` and was detected in
        bucket ``t`` (position ``j``): close ``regime`` and open a new one.  Returns the
        position the change test goes on from (the change's start).
        """
        first = self._pos(start)
        if start <= regime.start:
            # a restored regime that did not hold: superseded from its own start, so
            # all it holds before that start is the evidence it restored
            before = regime.base
            regime.closed = list(before) if before is not None else _zeros()
            before_rate = (
                before[SUCCESSES] / before[SAMPLES] if before and before[SAMPLES] else None
            )
        else:
            # what the regime held before the change: O(its own buckets), not the
            # rest of the window (or kept from the last time this change was acted on)
            known = self.closed_sums
            if known is not None and known[0] == regime.start and known[1] == start:
                closed = list(known[2])
            else:
                closed = self._sum(self._pos(regime.start), first)
                self.closed_sums = (regime.start, start, tuple(closed))
            if regime.base is not None:
                _add(closed, regime.base)
            regime.closed = closed
            before_rate = closed[SUCCESSES] / closed[SAMPLES] if closed[SAMPLES] else None
        new = Regime(start=start, detected=t, kind=kind, before_rate=before_rate)
        # judged on the buckets up to this one only, so that the decision does not
        # depend on how many later buckets had arrived when it was made
        self._restore(new, self._sum(first, j + 1))
        self.regimes.append(new)
        self._regimes_changed()
        return first

    def _earlier_rates(self) -> list[float]:
        # failure rates (Jeffreys) of the closed regimes with enough evidence, but flukes
        # (kept until the regimes change; callers never mutate the list)
        out = self.earlier_rates
        if out is not None:
            return out
        out = []
        for r, following in pairwise(self.regimes):
            c = r.closed
            if c is not None and c[SAMPLES] >= self.test.min_samples and not _fluke(r, following):
                out.append(_jeffreys_failure_rate(c))
        self.earlier_rates = out
        return out

    def _restore(self, new: Regime, segment: list[float]) -> None:
        # the evidence ``new`` restores (see `_restorable`), the regime just left being
        # the last
        r = self._restorable(
            new.kind, new.before_rate, segment[SAMPLES], segment[SUCCESSES], len(self.regimes) - 1
        )
        if r is not None:
            assert r.closed is not None
            new.base = list(r.closed)
            new.restored = r.start

    def _restorable(
        self, kind: str, before: float | None, n1: float, s1: float, end: int
    ) -> Regime | None:
        # the most recent regime before position ``end`` (the regime a change of
        # ``kind`` left, whose rate was ``before``) whose rate is consistent with that
        # of the new segment (``n1`` calls, ``s1`` successful), on the side of the change
        if n1 <= 0:
            return None
        p1 = s1 / n1
        z = self.test.restore_z
        regimes = self.regimes
        for k in range(end - 1, -1, -1):
            r = regimes[k]
            c = r.closed
            if c is None or c[SAMPLES] < self.test.min_samples:
                continue
            n2 = c[SAMPLES]
            p2 = c[SUCCESSES] / n2
            if before is not None and (
                (kind == "improved" and p2 <= before) or (kind == "degraded" and p2 >= before)
            ):
                continue
            pooled = (s1 + c[SUCCESSES]) / (n1 + n2)
            se = math.sqrt(max(pooled * (1.0 - pooled), 1e-9) * (1.0 / n1 + 1.0 / n2))
            if abs(p1 - p2) <= z * se:
                return r
        return None
