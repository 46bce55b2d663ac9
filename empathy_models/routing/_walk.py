"""
The change test of the evidence book (`empathy_models.routing.book`): its settings
(`ChangeTest`), the regimes it splits an arm's buckets into (`Regime`), the two CUSUM
sums and the proof it keeps after every bucket (`_cusum`, `_proof`), and the walk that
runs it over an arm's buckets (`ChangeWalk`, which `book.Arm` builds on): from a changed
bucket to the newest, acting on each change it detects.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Final

from attrs import define, frozen

from .stats import SAMPLES, SUCCESSES, WIDTH, Sums, wilson_lower

_NEVER: Final = -(2**62)


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


_CusumParams = tuple[float, float, float, float, float, float, float, float, float]
_WalkState = tuple[float, float, float, float, int, int, float]
"""The change test's state before a bucket: calls, failures, the two sums and the
buckets they last left zero in, the regime's proof so far (`Arm._state_before`)."""
_Redo = tuple[int, Regime, Regime, _WalkState, list[float]]


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


class ChangeWalk:
    """
    The change test's walk over an arm's buckets, and the regimes it keeps.  A base of
    `book.Arm`, which holds the state declared here (see its fields).
    """

    if not TYPE_CHECKING:  # no instance dict: `book.Arm` (slotted) holds the state
        __slots__ = ()

    test: ChangeTest
    starts: list[int]
    data: dict[int, Sums]
    cum_n: array[float]
    cum_f: array[float]
    up: array[float]
    dn: array[float]
    up_from: array[int]
    dn_from: array[int]
    proof: array[float]
    regimes: list[Regime]
    cur: list[float]
    earlier_rates: list[float] | None
    earlier_record: tuple[float, float] | None
    closed_sums: tuple[int, int, tuple[float, ...]] | None
    redo: _Redo | None

    def _regimes_changed(self) -> None:
        # a regime was added, dropped or closed: what the closed ones give is taken anew
        self.earlier_rates = None
        self.earlier_record = None

    def _pos(self, t: int) -> int:
        return bisect_left(self.starts, t)

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
        # regimes detected at or after the changed bucket are decided again; the
        # current regime's sums are re-summed if any regime changed
        j, dropped = self._reopen(i)
        if self._walk(j) or dropped:
            current = self.regimes[-1]
            self.cur = self._sum(self._pos(current.start), len(starts))
            if current.base is not None:
                _add(self.cur, current.base)

    def _walk(self, j: int) -> bool:
        """
        The change test's walk from position ``j`` to the end, in the current regime,
        acting on each change it detects; whether it acted on one.
        """
        starts = self.starts
        regimes = self.regimes
        test = self.test
        acted = False
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
            acted = True
        return acted

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
