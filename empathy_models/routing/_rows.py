"""
A decision's explanation: one `CandidateEvaluation` per candidate, built when
`RoutingDecision.candidates` is first read.

A row is a function of its candidate's `Verdict`, the call's cost, whether the model
is blocked (an open circuit) and whether the call gave input tokens; the constraints
are the context's, fixed for its life.  Everything but the cost is shared by the rows
of one verdict: per case (how the cost stands against ``max_cost``; input tokens;
blocked) a template of the row's attributes, kept in the verdict's row cache
(`decide.RowCache`, which the verdict cache starts anew when the verdict changes), so
a row is a copy of its template with the cost set, and, over the limit, the reason
that quotes the cost.  The copies, the cost and the rows are made by C loops (`map`):
the interpreter's own work per row is choosing its template.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from itertools import repeat
from types import MappingProxyType
from typing import Any, Final

from ..records import CandidateEvaluation, ConstraintStatus
from .decide import (
    CIRCUIT_OPEN,
    ELIGIBLE,
    NO_PRICE,
    REJECTED,
    UNPROVEN,
    RowCache,
    Verdict,
    _over,
    _usd,
)
from .policy import COST, LATENCY, SUCCESS, TTFT, Constraints

__all__ = ["build_candidates"]

_new_object: Final = object.__new__
_set_row_dict: Final = CandidateEvaluation.__dict__["__dict__"].__set__
"""Sets a row's ``__dict__``: `CandidateEvaluation` is not slotted, and is frozen (its
own ``__setattr__`` refuses)."""
_set_item: Final = operator.setitem
_NO_STATUS: Final[MappingProxyType[str, ConstraintStatus]] = MappingProxyType({})
_PARTS: Final = object()  # the key of a row cache's `_Parts`

# How a row's cost stands, which picks its template: no cost limit (with a cost,
# without one), or a limit and no estimate, within it or over it.
_FREE, _FREE_NO_ESTIMATE, _NO_ESTIMATE, _WITHIN, _OVER = range(5)


class _Parts:
    """
    The templates of the rows of one verdict in one context (whose constraints are
    ``cons``): every field of `CandidateEvaluation` (tests/test_router.py compares
    every row with the validated constructor's), ``expected_cost_usd`` left to the
    row.  Each is made when first needed, from ``base`` (the fields no case changes);
    the constraint maps are read-only, so rows share them.  The templates of a call
    that gave input tokens with nothing blocked are also attributes, one per case,
    ``None`` until made.
    """

    __slots__ = (
        "base",
        "cons",
        "free",
        "free_no_estimate",
        "no_estimate",
        "over",
        "templates",
        "verdict",
        "within",
    )

    def __init__(self, v: Verdict, cons: Constraints) -> None:
        facts = v.facts
        s = v.summary
        since = s.since
        self.verdict = v
        self.cons = cons
        self.base: dict[str, Any] = {
            "model": v.model,
            "provider": facts.provider if facts is not None else None,
            "tier": facts.tier if facts is not None else None,
            "sample_size": s.window_samples,
            "success_rate": s.success_rate,
            "success_rate_lower": s.lower,
            "success_rate_upper": s.upper,
            "latency_p50_ms": s.p50,
            "latency_p95_ms": s.p95,
            "expected_cost_usd": None,
            "effective_sample_size": s.samples,
            "latency_p95_upper_ms": s.p95_upper,
            "change": s.change,
            "evidence_since": datetime.fromtimestamp(since, UTC) if since is not None else None,
            "ttft_p50_ms": s.ttft_p50,
            "ttft_p95_ms": s.ttft_p95,
        }
        self.templates: dict[tuple[int, bool, bool], dict[str, Any]] = {}
        self.free: dict[str, Any] | None = None
        self.free_no_estimate: dict[str, Any] | None = None
        self.no_estimate: dict[str, Any] | None = None
        self.within: dict[str, Any] | None = None
        self.over: dict[str, Any] | None = None

    def template(self, case: int, with_input: bool = True, blocked: bool = False) -> dict[str, Any]:
        """The attributes of the rows of ``case`` (made on first use, then kept)."""
        key = (case, with_input, blocked)
        made = self.templates.get(key)
        if made is not None:
            return made
        v = self.verdict
        reasons = v.reasons
        cost: ConstraintStatus | None = None
        if case == _NO_ESTIMATE:
            cost = UNPROVEN
            reasons += (_no_estimate(v, self.cons, with_input),)
        elif case == _WITHIN:
            cost = ELIGIBLE
        elif case == _OVER:
            cost = REJECTED  # the reason quoting the cost is the row's own
        if blocked:
            reasons = (CIRCUIT_OPEN, *reasons)
        given = case != _FREE_NO_ESTIMATE and case != _NO_ESTIMATE  # a cost to show
        made = self.templates[key] = self.base.copy()
        made["constraints"] = _constraints(v.success, v.latency, v.ttft, cost)
        made["excluded"] = v.facts is None or blocked
        made["reasons"] = reasons
        made["cost_basis"] = (v.basis if with_input else v.basis_no_input) if given else None
        if with_input and not blocked:
            setattr(self, _COMMON[case], made)
        return made


_COMMON: Final = ("free", "free_no_estimate", "no_estimate", "within", "over")
"""`_Parts`' attribute of each case's template (a call with input tokens, nothing
blocked)."""


_MAPS: Final[dict[tuple[Any, ...], MappingProxyType[str, ConstraintStatus]]] = {}
"""Every constraint map rows show, by the statuses in it: read-only, so shared."""


def _constraints(
    success: ConstraintStatus | None,
    latency: ConstraintStatus | None,
    ttft: ConstraintStatus | None,
    cost: ConstraintStatus | None,
) -> MappingProxyType[str, ConstraintStatus]:
    """A row's ``constraints``: each constraint given, with its status."""
    key = (success, latency, ttft, cost)
    shown = _MAPS.get(key)
    if shown is None:
        named = ((SUCCESS, success), (LATENCY, latency), (TTFT, ttft), (COST, cost))
        statuses = {name: status for name, status in named if status is not None}
        shown = _MAPS[key] = MappingProxyType(statuses) if statuses else _NO_STATUS
    return shown


def _no_estimate(v: Verdict, cons: Constraints, with_input: bool) -> str:
    # why a candidate has no cost estimate to hold to max_cost
    if v.facts is None:
        return NO_PRICE
    if cons.strict_cost:
        return "cost: no estimate (strict mode needs input_tokens and max_tokens)"
    if with_input:
        return "cost: no estimate (no observations, and max_tokens not given)"
    if cons.max_tokens is not None:
        return "cost: no estimate (no observations, and input_tokens not given)"
    return "cost: no estimate (no observations, and input_tokens/max_tokens not given)"


def _case(cost: float | None, max_cost: float | None) -> int:
    if max_cost is None:
        return _FREE if cost is not None else _FREE_NO_ESTIMATE
    if cost is None:
        return _NO_ESTIMATE
    return _WITHIN if cost <= max_cost else _OVER


def _made(
    parts: Sequence[_Parts],
    verdicts: Sequence[Verdict],
    costs: Sequence[float | None],
    cons: Constraints,
    with_input: bool,
    unavailable: Collection[str],
) -> list[CandidateEvaluation]:
    """
    The rows of ``parts`` at ``costs``: copies of their templates with the cost set,
    built without ``__init__`` (every value is already as the validated constructor
    stores it; a row's attributes are its ``__dict__``, the copy).
    """
    max_cost = cons.max_cost
    templates: list[dict[str, Any]]
    if with_input and not unavailable:
        if max_cost is None:
            templates = [
                (p.free or p.template(_FREE))
                if c is not None
                else (p.free_no_estimate or p.template(_FREE_NO_ESTIMATE))
                for p, c in zip(parts, costs, strict=True)
            ]
        else:
            templates = [
                (p.no_estimate or p.template(_NO_ESTIMATE))
                if c is None
                else (p.within or p.template(_WITHIN))
                if c <= max_cost
                else (p.over or p.template(_OVER))
                for p, c in zip(parts, costs, strict=True)
            ]
    else:
        templates = [
            p.template(_case(c, max_cost), with_input, v.model in unavailable)
            for p, v, c in zip(parts, verdicts, costs, strict=True)
        ]
    fields = list(map(dict.copy, templates))
    any(map(_set_item, fields, repeat("expected_cost_usd"), costs))
    if max_cost is not None:
        _quote_costs(fields, costs, max_cost)
    rows: list[CandidateEvaluation] = list(
        map(_new_object, repeat(CandidateEvaluation, len(fields)))
    )
    any(map(_set_row_dict, rows, fields))
    return rows


def _quote_costs(
    fields: list[dict[str, Any]], costs: Sequence[float | None], max_cost: float
) -> None:
    # the rows over the limit: their reasons end with the one quoting the cost
    over = [(j, c) for j, c in enumerate(costs) if c is not None and not c <= max_cost]
    if not over:
        return
    most = _usd(max_cost)
    for j, cost in over:
        row = fields[j]
        shown, limit = _usd(cost), most
        if shown == limit:
            shown, limit = _over(cost, max_cost, _usd)
        row["reasons"] = (
            *row["reasons"],
            f"expected cost ${shown} ({row['cost_basis']}) > max ${limit}",
        )


def build_candidates(
    verdicts: Sequence[Verdict],
    costs: Sequence[float | None],
    cons: Constraints,
    input_tokens: int | None,
    unavailable: Collection[str],
    holders: Sequence[RowCache] | None = None,
) -> tuple[CandidateEvaluation, ...]:
    """
    Every candidate of a decision, as the decision saw it (built when first read).

    ``holders[i]`` (optional) keeps the parts of ``verdicts[i]`` in ``cons``: made
    when a decision's explanation first needs them, shared by the later ones until the
    verdict changes (the verdict cache then gives its candidate a new holder).
    """
    parts: list[_Parts | None]
    if holders is None:
        parts = [_Parts(v, cons) for v in verdicts]
    else:
        parts = list(map(dict.get, holders, repeat(_PARTS)))  # in C
        if not all(parts):
            for i, found in enumerate(parts):
                if found is None:
                    parts[i] = holders[i][_PARTS] = _Parts(verdicts[i], cons)
    rows = _made(parts, verdicts, costs, cons, input_tokens is not None, unavailable)  # type: ignore[arg-type]
    return tuple(rows)
