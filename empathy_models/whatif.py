"""
What-if: evaluate a routing policy on recorded telemetry before deploying it.

"If I raise ``min_success_rate`` to 0.97 for docs/write, what will it cost, and how
often will nothing qualify?"  `evaluate_policy` answers from the evidence rollups the
telemetry backend already keeps (`TelemetryBackend.evidence`, one additive bucket per
model and minute), not from the individual calls (only those of the two minutes the
window ``[now - days, now)`` starts and ends within are read, and rolled up alike, so
the window is exact), so a stage with 100,000 recorded calls is evaluated in seconds
(on SQLite about half of it `TelemetryBackend.aggregate`, for the recorded p95s).

How:

1. **A model of the stage per model** (`ModelFit`): success rate, log-normal latency of
   successful calls, mean input and output tokens, each with its uncertainty.  The
   uncertainty comes from resampling the evidence: the minute buckets are the units
   (a cluster-robust variance of each mean over buckets), so a model whose failures
   came in bursts (an outage) is known less precisely than the same count of
   independent failures would suggest.  Costs: see *Costs* below.  Each model's
   recorded p95 latency and time to first token (nearest rank, `TelemetryBackend.
   aggregate`) are reported beside the fit's: a log-normal misses a heavy second mode,
   and the report notes a recorded p95 far above the fit's.
2. **Replicates.**  Each replicate draws one plausible truth for every model from that
   uncertainty and replays ``requests`` simulated requests through the real
   `AdaptiveModelRouter` with the proposed constraints and routing policy: the router
   starts from the recorded evidence, as a deployed one would, decides, and learns
   from the outcomes drawn from the replicate's truth.  Every figure (cost per request,
   success rate, p95 latency, share of requests where no model qualifies (so that
   ``on_no_match`` applies: no answer, relaxed or pinned), share answered by exploring
   while no model is proven to meet the constraints, traffic per model) is the mean
   over replicates with a 95% interval from their spread.
3. **Unknown is not good.**  A candidate without data in the window is reported as
   unknown; when the router sends simulated traffic to it, its success rate is drawn
   from the uniform prior (anything from 0 to 1), its tokens and latency from the
   stage's pooled evidence, so the intervals widen instead of assuming it works.  In a
   stage where no call succeeded there is no such evidence: no p95 latency is
   simulated, nor a cost per request unless ``input_tokens`` and ``max_tokens`` give
   the calls' size.
4. **Off-policy check.**  When the recorded calls carry the router's selection
   probability (``LLMCallRecord.routing_propensity``), an inverse-propensity-weighted
   estimate over the window's newest calls (`ipw_limit` of them, read back as records,
   however many were recorded after the window; a request counted once, by its routed
   attempt, not its retries) is reported beside the simulation, with its effective
   sample size.

One simulated request is one routed attempt: retries and fallbacks are not simulated,
and "what was actually spent" is the recorded cost per attempt.

**Costs.**  A bucket sums the recorded cost of every attempt, failed ones included (a
stream cut off mid-answer, a malformed answer: billed, and recorded so by the
executor), but the tokens of successful ones only.  So a model's recorded cost is
split, with the fewest assumptions, between its successes and failures as multiples of
the list price of a successful call's mean tokens (`ModelFit.success_cost_factor`,
``failure_cost_factor``): successes at their list price and failures what is left, up
to what a success costs; a cost below the successes' list price (a prompt cache's
discount: OpenAI counts cached tokens among the input) lowers the successes' price,
failures then costing nothing; a cost above what every attempt would cost at list
price (prompt-cache writes and reads, which Anthropic's input tokens leave out) raises
both alike.  A simulated success costs the list price of its drawn tokens (its prompt
``input_tokens`` long when given, its output capped at ``max_tokens``, as the router
costs a call) times the success factor, a failure times the failure factor, so the
policy in force is costed at what was recorded per attempt.  Calls recorded without a
cost (never priced) are costed at list price, failures free; a model outside the
registry at its recorded cost per attempt.  The factors carry the prices the calls
were recorded at: the registry's (its ``price_version`` is reported) only scale them.

This module holds the entry points and assembles the report; the values live in
`_whatif_values` (re-exported here), the fits and intervals in `_whatif_fit`, the
replicates in `_whatif_replay`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple, cast

from attrs import evolve

from ._stats import AVERAGE_CAP
from ._validators import check, failure, integer, number, plain_number, shown, text, text_flaw
from ._whatif_fit import _FALLBACK_SIGMA, _P95_Z, _Z95, _fit, _interval, _mixture_p95
from ._whatif_replay import (
    _coarsen,
    _cost,
    _FrozenEvidence,
    _measured,
    _pooled,
    _pooled_ttft,
    _Question,
    _Replicates,
    _Simulation,
)
from ._whatif_values import (
    Interval,
    IPWEstimate,
    ModelFit,
    ModelTraffic,
    StageEvidence,
    WhatIfReport,
)
from .abc import TelemetryBackend
from .evidence import BUCKET_SECONDS, EvidenceBucket, bucket_start_of, rollup
from .exceptions import ConfigurationError
from .records import LLMCallRecord
from .registry import ModelRegistry
from .routing._args import opt_number
from .routing.policy import RoutingPolicy
from .routing.reports import named

__all__ = [
    "IPWEstimate",
    "Interval",
    "ModelFit",
    "ModelTraffic",
    "StageEvidence",
    "WhatIfReport",
    "evaluate_policy",
    "ipw_estimate",
    "load_stage_evidence",
    "simulate_policy",
    "sweep_min_success_rate",
]

_RECENT_FALLBACK: Final = 100_000
_EVERY: Final = 2**63 - 1  # a limit no store reaches: every matching record


# --------------------------------------------------------------------------- reading


_fail = failure(ConfigurationError)
_days = number(_fail, low=0, low_open=True, high=36_500, why="must be a number > 0 and <= 36500")
_name = text(_fail)
_positive_int = integer(_fail, low=1, why="must be an integer >= 1")
_ipw_limit = integer(_fail, low=0, why="must be an integer >= 0")
_tokens = integer(_fail, low=0, optional=True, why="must be an integer >= 0")
_seed = integer(_fail, why="must be an integer")


def _check_days(days: float) -> float:
    return float(check(_days, "days", days))


def _check_name(what: str, value: str, *, empty: bool = False) -> str:
    if empty and isinstance(value, str) and not value:
        return value  # the calls recorded without one (None or ""), as aggregate() finds them
    # as the router checks it: text every store keeps as given
    check(_name, what, value)
    if (flaw := text_flaw(value)) is not None:
        raise ConfigurationError(f"{what} {flaw}, got {shown(value)}")
    return value


async def load_stage_evidence(
    backend: TelemetryBackend,
    workflow: str,
    stage: str,
    *,
    registry: ModelRegistry | None = None,
    days: float = 7.0,
    now: datetime | None = None,
) -> StageEvidence:
    """
    Read the evidence of ``workflow``/``stage`` in the window and fit each model seen.

    The window is ``[now - days, now)``, exactly.  The backend is flushed first; the
    whole minutes in the window are read from its evidence rollups (``evidence()``),
    and the calls of the two minutes the window starts and ends within are read one by
    one (``recent()``) and rolled up, so no call after ``now`` counts and none of the
    first minute is left out.  A backend that keeps no rollups has the window's newest
    records (up to 100,000: ``partial`` when there were more) rolled up instead.
    Each model's recorded p95 latency and time to first token are read beside them
    (``aggregate()`` over the same window: nearest rank, as the store computes them),
    to show next to the fits' log-normal ones.

    Args:
        backend: the telemetry backend to read.
        workflow, stage: the stage (stage ``""``: the calls recorded without one).
        registry: prices the fits (default `ModelRegistry.default`).
        days: the window, in days before ``now``.
        now: the window's end, an aware datetime (default: the current time).

    Returns:
        The `StageEvidence`, one `ModelFit` per model seen.

    Raises:
        ConfigurationError: an invalid argument, a naive ``now``, or a ``now`` too early
            for ``days`` before it.
    """
    _check_name("workflow", workflow)
    _check_name("stage", stage, empty=True)
    days = _check_days(days)
    registry = ModelRegistry.default() if registry is None else registry
    until = now if now is not None else datetime.now(UTC)
    if not isinstance(until, datetime) or until.tzinfo is None:
        raise ConfigurationError(f"now must be a timezone-aware datetime, got {shown(now)}")
    try:
        since = until - timedelta(days=days)
    except OverflowError:
        raise ConfigurationError(
            f"now={until.isoformat()} with days={days:g}: the window would start before "
            "the year 1; pass a later now or fewer days"
        ) from None
    await backend.flush()  # what this process handed to a batching backend counts too
    found, source, partial = await _read_window(backend, workflow, stage, since, until)
    # "" finds the calls without a workflow or stage, recorded as None or ""
    mine = tuple(b for b in found if (b.workflow or "") == workflow and (b.stage or "") == stage)
    per_model: dict[str, list[EvidenceBucket]] = {}
    for b in mine:
        per_model.setdefault(b.model, []).append(b)
    rows = await backend.aggregate(workflow=workflow, stage=stage, since=since, until=until)
    recorded = {p.model: p for p in rows}
    fits = {}
    for m, bs in sorted(per_model.items()):
        fits[m] = fit = _fit(m, bs, registry)
        if (perf := recorded.get(m)) is not None:
            fits[m] = evolve(
                fit,
                recorded_latency_p95_ms=perf.latency_p95_ms,
                recorded_ttft_p95_ms=perf.ttft_p95_ms,
            )
    return StageEvidence(
        workflow=workflow,
        stage=stage,
        since=since,
        until=until,
        days=days,
        buckets=mine,
        fits=fits,
        source=source,
        partial=partial,
    )


async def _read_window(
    backend: TelemetryBackend, workflow: str, stage: str, since: datetime, until: datetime
) -> tuple[list[EvidenceBucket], str, bool]:
    """
    The evidence of ``[since, until)``: the stored buckets of its whole minutes and the
    rollup of the calls of the minutes it starts and ends within; where they came
    from (``"rollups"``, or ``"records"`` from a backend that keeps no rollups); and
    whether that backend held more calls in the window than its newest
    `_RECENT_FALLBACK`, which alone were read.
    """
    first = bucket_start_of(since)
    if first < since:
        first = until if until - first <= _MINUTE else first + _MINUTE
    last = max(first, bucket_start_of(until))
    try:
        batch = await backend.evidence(since=first, until=last)
    except NotImplementedError:
        records = await backend.recent(
            limit=_RECENT_FALLBACK + 1, workflow=workflow, stage=stage, since=since, until=until
        )
        return rollup(records[:_RECENT_FALLBACK]), "records", len(records) > _RECENT_FALLBACK
    edges: list[LLMCallRecord] = []
    for start, end in ((since, min(first, until)), (last, until)):
        if start < end:  # at most a minute's calls, every one of them
            edges += await backend.recent(
                limit=_EVERY, workflow=workflow, stage=stage, since=start, until=end
            )
    return [*batch.buckets, *rollup(edges)], "rollups", False


_MINUTE: Final = timedelta(seconds=BUCKET_SECONDS)


# --------------------------------------------------------------------------- simulation


def _check_positive_int(what: str, value: object) -> int:
    """``value`` when it is an integer >= 1; else `ConfigurationError` naming ``what``."""
    return check(_positive_int, what, cast(int, value))


class _Checked(NamedTuple):
    """`simulate_policy`'s numbers, checked: plain ints and floats (None: not given)."""

    requests: int
    replicates: int
    input_tokens: int | None
    max_tokens: int | None
    seed: int
    min_success_rate: float | None
    limits: tuple[float | None, float | None, float | None]  # cost, latency, ttft


def _check_simulation(
    evidence: StageEvidence,
    registry: object,
    candidates: Sequence[str] | None,
    requests: object,
    replicates: object,
    min_success_rate: object,
    tokens: tuple[object, object],
    seed: object,
    limits: tuple[object, object, object],
) -> tuple[list[str], _Checked]:
    """
    Check `simulate_policy`'s arguments, in the order they are listed there.

    Returns:
        The candidates, without repeats (default: the models seen in the window), and
        the numbers (of other types, numpy's or a Decimal, as the plain ones they stand
        for; a zero limit as 0.0), ``limits`` being ``max_cost``, ``max_latency_ms``
        and ``max_ttft_ms``, checked as the router checks them.

    Raises:
        ConfigurationError: an argument is invalid, or there is nothing to evaluate.
    """
    if not isinstance(registry, ModelRegistry):
        raise ConfigurationError(f"registry must be a ModelRegistry, got {shown(registry)}")
    requests = _check_positive_int("requests", requests)
    try:
        # the replay's clock runs one second per request from the window's end
        evidence.until + timedelta(seconds=requests + 1)
    except OverflowError:
        raise ConfigurationError(
            f"requests={requests}: the simulation runs one request a second from the "
            f"window's end ({evidence.until.isoformat()}) and would pass the year 9999; "
            "pass an earlier now or fewer requests"
        ) from None
    replicates = _check_positive_int("replicates", replicates)
    if replicates < 2:
        raise ConfigurationError("replicates must be at least 2 (the interval needs a spread)")
    # all three are used before the router sees the question (the draws, their seeds)
    input_tokens = cast(int | None, check(_tokens, "input_tokens", tokens[0]))
    max_tokens = cast(int | None, check(_tokens, "max_tokens", tokens[1]))
    seed = check(_seed, "seed", seed)
    if isinstance(candidates, str):
        raise ConfigurationError("candidates must be a sequence of model ids, not a string")
    names = list(evidence.models) if candidates is None else list(dict.fromkeys(candidates))
    if any(not isinstance(n, str) or not n for n in names):
        raise ConfigurationError(
            f"candidate model ids must be non-empty strings, got {shown(names)}"
        )
    cost, latency, ttft = limits
    checked_limits = (
        opt_number("max_cost", cost),
        opt_number("max_latency_ms", latency, positive=True),
        opt_number("max_ttft_ms", ttft, positive=True),
    )
    rate = None if min_success_rate is None else plain_number(min_success_rate)
    if min_success_rate is not None and (rate is None or not 0.0 <= rate <= 1.0):
        raise ConfigurationError(
            f"min_success_rate must be a number in [0, 1], got {shown(min_success_rate)}"
        )
    rate = None if rate is None else float(rate) + 0.0  # (-0.0 as 0.0)
    if not names:
        raise ConfigurationError(
            f"no calls recorded for {evidence.workflow}/{evidence.stage} from "
            f"{evidence.since.isoformat()} to {evidence.until.isoformat()} (days="
            f"{evidence.days:g} before now), and no candidates given: nothing to evaluate"
        )
    return names, _Checked(
        requests, replicates, input_tokens, max_tokens, cast(int, seed), rate, checked_limits
    )


async def simulate_policy(
    evidence: StageEvidence,
    *,
    registry: ModelRegistry | None = None,
    max_cost: float | None = None,
    max_latency_ms: float | None = None,
    min_success_rate: float | None = None,
    on_no_match: str = "raise",
    candidates: Sequence[str] | None = None,
    input_tokens: int | None = None,
    max_tokens: int | None = None,
    max_ttft_ms: float | None = None,
    routing_policy: RoutingPolicy | None = None,
    requests: int = 400,
    replicates: int = 30,
    seed: int = 0,
) -> WhatIfReport:
    """
    Replay ``requests`` simulated requests through the real router, ``replicates`` times.

    Simulated calls of a model with streamed calls in the window carry a time to first
    token drawn from them; a model never streamed takes the stage's, and when nothing in
    the stage streamed no model can prove a ``max_ttft_ms``.

    Args:
        evidence: the stage's, from `load_stage_evidence`.
        registry: default `ModelRegistry.default`.
        max_cost, max_latency_ms, min_success_rate, max_ttft_ms, max_tokens, on_no_match:
            as for `AdaptiveModelRouter.get_best_model` (``min_success_rate`` ``None``:
            the routing policy's default floor; ``max_ttft_ms`` judged as the router does).
        candidates: default: the models seen in the window.
        input_tokens: each simulated request's prompt size, as the router costs it and
            its call is charged (default: as recorded; the stage's mean for the router).
        routing_policy: default: `RoutingPolicy` with the evidence's window.
        requests, replicates, seed: how many requests per replicate (one a second from
            the evidence's end), how many replicates, and the seed of the draws.

    Raises:
        ConfigurationError: invalid arguments (a pin outside the registry), or a replay past 9999.
    """
    registry = ModelRegistry.default() if registry is None else registry
    tokens, limits = (input_tokens, max_tokens), (max_cost, max_latency_ms, max_ttft_ms)
    names, checked = _check_simulation(
        evidence, registry, candidates, requests, replicates, min_success_rate, tokens, seed, limits
    )
    requests, replicates, input_tokens, max_tokens, seed, min_success_rate, limits = checked
    _check_pin(on_no_match, registry)
    if routing_policy is None:
        routing_policy = RoutingPolicy(window_days=evidence.days)
    pooled = _pooled(evidence)
    # the router is asked about the stage's mean prompt when input_tokens is not given
    asked = round(pooled[0]) if input_tokens is None and pooled[0] > 0 else input_tokens
    simulation = _Simulation(
        evidence=evidence,
        registry=registry,
        policy=routing_policy,
        fits=_fits(evidence, names, registry),
        pooled=pooled,
        pooled_ttft=_pooled_ttft(evidence),
        store=_FrozenEvidence(_coarsen(evidence.buckets, evidence.days)),
        question=_Question(
            workflow=evidence.workflow,
            stage=evidence.stage,
            candidates=names,
            input_tokens=asked,
            max_tokens=max_tokens,
            max_cost=limits[0],
            max_latency_ms=limits[1],
            min_success_rate=min_success_rate,
            on_no_match=on_no_match,
            max_ttft_ms=limits[2],
        ),
        requests=requests,
        seed=seed,
        prompt_tokens=input_tokens,
    )
    runs = _Replicates(requests=requests, shares={n: [] for n in names})
    for rep in range(replicates):
        runs.add(await simulation.replay(rep))
    return _report(simulation, runs, replicates=replicates)


def _check_pin(on_no_match: object, registry: ModelRegistry) -> None:
    """
    Refuse an ``on_no_match`` that pins a model outside ``registry``: a deployed router
    refuses it (the executor's candidates are registry models), so the policy could not
    run, whatever the replay (whose candidates may be recorded models the registry lacks)
    would let the router do.  Other values are left to the router to check.
    """
    if (
        isinstance(on_no_match, str)
        and on_no_match not in ("raise", "relax")
        and on_no_match not in registry
    ):
        raise ConfigurationError(
            f"on_no_match pins {shown(on_no_match)}, which is not in the model registry: "
            "a deployed router pins only a registry model, so this policy could not run "
            "(pass the registry that lists it)"
        )


def _fits(
    evidence: StageEvidence, names: Sequence[str], registry: ModelRegistry
) -> dict[str, ModelFit]:
    """The evidence's fits, and an unknown one for each candidate without evidence."""
    fits: dict[str, ModelFit] = dict(evidence.fits)
    for name in names:
        if name not in fits:
            fits[name] = ModelFit(model=name, known=False, in_registry=name in registry)
    return fits


def _constraints(simulation: _Simulation) -> dict[str, Any]:
    """The evaluated policy as the report shows it (the floor resolved to the policy's)."""
    q = simulation.question
    return {
        "max_cost": q.max_cost,
        "max_latency_ms": q.max_latency_ms,
        "max_ttft_ms": q.max_ttft_ms,
        "min_success_rate": q.min_success_rate
        if q.min_success_rate is not None
        else simulation.policy.default_min_success_rate,
        "on_no_match": q.on_no_match,
        "input_tokens": q.input_tokens,
        "max_tokens": q.max_tokens,
        "candidates": q.candidates,
    }


def _report(simulation: _Simulation, runs: _Replicates, *, replicates: int) -> WhatIfReport:
    """
    The `WhatIfReport` of a finished simulation.

    Args:
        simulation: what the replicates shared (its ``fits`` grown by pinned models).
        runs: each replicate's figures.
        replicates: how many replicates ran.

    Returns:
        The simulated figures with their intervals beside what was recorded.
    """
    evidence = simulation.evidence
    fits = simulation.fits
    # the candidates, then any model on_no_match pinned outside them
    names = list(runs.shares)
    total = evidence.samples
    return WhatIfReport(
        workflow=evidence.workflow,
        stage=evidence.stage,
        since=evidence.since,
        until=evidence.until,
        price_version=simulation.registry.price_version,
        constraints=_constraints(simulation),
        requests=simulation.requests,
        replicates=replicates,
        recorded_calls=total,
        recorded_cost_per_call=(evidence.recorded_cost_usd / total) if total else None,
        recorded_success_rate=(sum(f.successes for f in evidence.fits.values()) / total)
        if total
        else None,
        recorded_latency_p95_ms=_recorded_p95(_latency_parts(evidence)),
        fitted_latency_p95_ms=_fitted_p95(_latency_parts(evidence)),
        cost_per_request=_interval(runs.costs),
        success_rate=_interval(runs.success, upper=1.0),
        # no successful call in the stage: no latency measured to simulate one from
        latency_p95_ms=_interval(runs.p95s) if _measured(evidence) else Interval.none(),
        no_match_share=_interval(runs.no_match, upper=1.0),
        unproven_share=_interval(runs.unproven, upper=1.0),
        traffic=_traffic(runs.shares, fits, total, simulation),
        models=tuple(fits[m] for m in sorted(fits)),
        unknown_models=tuple(n for n in names if not fits[n].known),
        ipw=None,
        notes=tuple(_notes(simulation, names)),
        evidence_source=evidence.source,
        recorded_ttft_p95_ms=_recorded_p95(_ttft_parts(evidence)),
        fitted_ttft_p95_ms=_fitted_p95(_ttft_parts(evidence)),
        ttft_p95_ms=_interval(runs.ttft_p95s),
    )


def _traffic(
    shares: Mapping[str, Sequence[float]],
    fits: Mapping[str, ModelFit],
    total: int,
    simulation: _Simulation,
) -> tuple[ModelTraffic, ...]:
    """
    Each model's simulated share beside its recorded one, largest first, with what its
    calls cost at the size simulated (`_sized_cost`).
    """
    return tuple(
        sorted(
            (
                ModelTraffic(
                    model=m,
                    share=_interval(v, upper=1.0),
                    known=fits[m].known,
                    recorded_share=(fits[m].samples / total) if total else None,
                    success_rate=fits[m].success_rate,
                    cost_per_call_usd=_sized_cost(fits[m], simulation),
                )
                for m, v in shares.items()
            ),
            key=lambda t: (-(t.share.estimate or 0.0), t.model),
        )
    )


def _sized_cost(fit: ModelFit, simulation: _Simulation) -> float | None:
    """
    What an attempt on ``fit``'s model costs in the simulation, at the recorded success
    rate: its prompt ``input_tokens`` long and its output capped at ``max_tokens`` when
    the question gives them, as its simulated calls are charged (`_cost`); else, or for
    a model without a measured success or a price, `ModelFit.cost_per_call_usd`.
    """
    prompt, cap = simulation.prompt_tokens, simulation.question.max_tokens
    mean_in, mean_out, rate = fit.mean_input_tokens, fit.mean_output_tokens, fit.success_rate
    registry = simulation.registry
    if (
        (prompt is None and cap is None)
        or mean_in is None
        or mean_out is None
        or rate is None
        or fit.successes == 0
        or fit.model not in registry
    ):
        return fit.cost_per_call_usd
    success, failure = _cost(
        fit,
        registry.get(fit.model),
        mean_in if prompt is None else float(prompt),
        mean_out if cap is None else min(mean_out, float(cap)),
    )
    return rate * success + (1.0 - rate) * failure


def _notes(simulation: _Simulation, names: Sequence[str]) -> list[str]:
    """
    What the reader should know: unknown, unregistered and thinly recorded models among
    ``names`` (the candidates and the models pinned outside them).
    """
    fits = simulation.fits
    # without a successful call in the stage, there are no other models' tokens to take
    pooled = ", its tokens and latency taken from the stage's other models"
    notes: list[str] = [
        f"{named(m)}: no calls in the window: its success rate is unknown (drawn from 0..1 "
        f"in the simulation){pooled if _measured(simulation.evidence) else ''}"
        for m in names
        if not fits[m].known
    ]
    if not _measured(simulation.evidence):
        notes.append(
            "no call of this stage succeeded in the window: no latency or tokens measured, "
            "so no p95 latency is simulated, and the cost per request only when "
            "input_tokens and max_tokens give the calls' size"
        )
    if simulation.question.max_ttft_ms is not None and simulation.pooled_ttft is None:
        notes.append(
            "max_ttft_ms: no call of this stage streamed in the window, so no model has a "
            "time to first token to prove it (each is unproven, routed by exploration)"
        )
    for m in names:
        f = fits[m]
        if not f.known and not f.in_registry:
            notes.append(
                f"{named(m)}: not in the model registry either: no price, so its simulated "
                "calls "
                "cost $0 (a typo? pass the registry that lists it)"
            )
        elif f.known and not f.in_registry:
            notes.append(f"{named(m)}: not in the model registry: the router cannot choose it")
        elif f.known and f.samples < 30:
            notes.append(
                f"{named(m)}: only {f.samples} calls in the window: its figures are uncertain"
            )
    notes.extend(_tail_notes(simulation.evidence))
    if simulation.evidence.partial:
        notes.append(
            f"the telemetry backend keeps no evidence rollups: only its newest "
            f"{_RECENT_FALLBACK:,} calls in the window were read, not the whole window"
        )
    return notes


_Part = tuple[float, float, float, float | None]
"""One model's calls: (how many, log-mean, log-sd, recorded p95 or None)."""


def _latency_parts(evidence: StageEvidence) -> list[_Part]:
    """Each model's successful calls, for the stage's p95 latency."""
    return [
        (
            f.latency_n,
            f.latency_mu,
            f.latency_sigma if f.latency_sigma is not None else _FALLBACK_SIGMA,
            f.recorded_latency_p95_ms,
        )
        for f in evidence.fits.values()
        if f.latency_mu is not None
    ]


def _ttft_parts(evidence: StageEvidence) -> list[_Part]:
    """Each model's streamed successful calls, for the stage's p95 time to first token."""
    return [
        (
            f.ttft_n,
            f.ttft_mu,
            f.ttft_sigma if f.ttft_sigma is not None else _FALLBACK_SIGMA,
            f.recorded_ttft_p95_ms,
        )
        for f in evidence.fits.values()
        if f.ttft_mu is not None
    ]


def _fitted_p95(parts: Sequence[_Part]) -> float | None:
    """The p95 of the mix of the models' log-normal fits (``None``: nothing measured)."""
    return _mixture_p95([(n, mu, sigma) for n, mu, sigma, _ in parts])


def _recorded_p95(parts: Sequence[_Part]) -> float | None:
    """
    The recorded p95 of the stage's calls: one model's is its own (nearest rank, from
    ``aggregate()``); several models' is that of the mix of their fits, each moved so
    that its p95 is the model's recorded one (the recorded calls are not read one by
    one, so the mix's tail is each model's recorded tail, its spread the fit's).
    """
    parts = [p for p in parts if p[0] > 0]
    if len(parts) == 1 and parts[0][3] is not None:
        return parts[0][3]
    return _mixture_p95(
        [
            (n, mu if p95 is None else math.log(max(p95, 1e-3)) - _P95_Z * sigma, sigma)
            for n, mu, sigma, p95 in parts
        ]
    )


_HEAVY_TAIL: Final = 1.5
"""A recorded p95 this many times the fit's (or more) is noted: the fit misses a tail."""


def _ms(value: float) -> str:
    """Milliseconds in a note: whole, or ``1.7e+308`` from a billion on (never 300 digits)."""
    return f"{value:.0f}" if value < 1e9 else f"{value:.4g}"


def _times(recorded: float, fitted: float) -> str:
    """How many times the fit's p95 the recorded one is (``"2.1x"``), readable at any size."""
    ratio = recorded / fitted if fitted > 0 else math.inf
    return f"{ratio:.1f}x" if ratio < 1e9 else "over 1e9 times"


def _tail_notes(evidence: StageEvidence) -> list[str]:
    """Where a model's recorded p95 is far above its log-normal fit's: a heavier tail."""
    notes = []
    for f in evidence.fits.values():
        for what, recorded, fitted in (
            ("latency", f.recorded_latency_p95_ms, f.latency_p95_ms),
            ("time to first token", f.recorded_ttft_p95_ms, f.ttft_p95_ms),
        ):
            if recorded is not None and fitted is not None and recorded > _HEAVY_TAIL * fitted:
                notes.append(
                    f"{named(f.model)}: its recorded p95 {what} ({_ms(recorded)} ms) is "
                    f"{_times(recorded, fitted)} its log-normal fit's ({_ms(fitted)} ms): a "
                    "heavier tail than the fit, which the simulated p95 and the router's "
                    f"max_{'latency' if what == 'latency' else 'ttft'}_ms verdicts (judged "
                    "on the fit) understate"
                )
    return notes


# --------------------------------------------------------------------------- off-policy


def ipw_estimate(
    records: Iterable[LLMCallRecord], target: Mapping[str, float], *, min_ess: float = 30.0
) -> IPWEstimate | None:
    """
    Self-normalized inverse-propensity estimate of cost per request and success rate.

    A request counts once, by its routed attempt: of its recorded sample calls with a
    ``routing_propensity`` (the routed model's; a fallback's carries none), the first
    (``attempt``), which weighs ``target[model] / routing_propensity``, its cost
    counting for at most `AVERAGE_CAP` (1e300), as in the telemetry's averages.  The
    retries of the routed model carry the decision's propensity too but were no choice
    of the policy: counted, a request that failed weighed as many times as it was
    tried, so the estimate leaned to the models that fail.  A call without a
    ``request_id`` is a request of its own.  As in the simulation, one request is one
    routed attempt.  The cost is per request, as the simulation
    counts it: the weighted cost of an answered request times the share the policy
    answers (the sum of ``target``, at most 1), a request it leaves unanswered costing
    nothing; the success rate is of the answered requests.

    Args:
        records: the recorded calls.
        target: the proposed policy's probability of choosing each model (its simulated
            traffic shares; less than 1 in all when some requests go unanswered).
        min_ess: the smallest effective sample size worth an estimate.

    Returns:
        ``None`` when no recorded call carries a propensity; else the estimate, its
        intervals `Interval.none` when the effective sample size is below ``min_ess``
        (0 when ``target`` gives no weight to any model of those calls, as for a policy
        that routes nothing).
    """
    calls, carried, routed = _routed_attempts(records)
    if not routed:
        return None
    rows = [
        # a cost counts for at most AVERAGE_CAP, as in the telemetry's averages
        (
            target.get(r.model, 0.0) / cast(float, r.routing_propensity),
            min(r.cost_usd, AVERAGE_CAP),
            1.0 if r.success else 0.0,
        )
        for r in routed
    ]
    rows = _scaled_weights(rows)
    sw = sum(w for w, _, _ in rows)
    sw2 = sum(w * w for w, _, _ in rows)
    ess = sw * sw / sw2 if sw > 0 else 0.0
    if ess < min_ess:
        return IPWEstimate(
            calls=calls,
            with_propensity=carried,
            effective_sample_size=ess,
            cost_per_request=Interval.none(),
            success_rate=Interval.none(),
        )

    def snips(values: Sequence[float], upper: float | None) -> Interval:
        est = sum(w * v for (w, _, _), v in zip(rows, values, strict=True)) / sw
        # the root of the sum of squares, never squared (a $1e300 cost's square is no float)
        spread = math.hypot(*(w * (v - est) for (w, _, _), v in zip(rows, values, strict=True)))
        half = _Z95 * spread / sw
        high = est + half if upper is None else min(upper, est + half)
        return Interval(estimate=est, low=max(0.0, est - half), high=high)

    answered = min(1.0, sum(target.values()))
    return IPWEstimate(
        calls=calls,
        with_propensity=carried,
        effective_sample_size=ess,
        cost_per_request=snips([c for _, c, _ in rows], None).scaled(answered),
        success_rate=snips([s for _, _, s in rows], 1.0),
    )


def _routed_attempts(
    records: Iterable[LLMCallRecord],
) -> tuple[int, int, list[LLMCallRecord]]:
    """
    For `ipw_estimate`: how many of ``records`` are sample calls, how many of those
    carry a ``routing_propensity``, and each request's routed attempt: the first of its
    calls that carry one (a call without a ``request_id`` a request of its own), never
    a retry on a run's first model (``fallback_chain`` that model alone).
    """
    calls = carried = 0
    routed: dict[object, LLMCallRecord] = {}  # by request_id, else an int of its own
    for r in records:
        if not r.outcome.is_sample:
            continue
        calls += 1
        p = r.routing_propensity
        if p is None or p <= 0.0:
            continue
        carried += 1
        # one routed attempt per request: a retry of the routed model carries the
        # decision's propensity too, but the policy chose nothing again (one of a model
        # tried alone, its first attempt older than the calls read, is left out)
        if r.attempt > 1 and r.fallback_chain == (r.model,):
            continue
        key: object = carried if r.request_id is None else r.request_id
        first = routed.get(key)
        if first is None or r.attempt < first.attempt:
            routed[key] = r
    return calls, carried, list(routed.values())


def _scaled_weights(rows: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """
    ``rows`` (weight, cost, success) with the weights divided by the largest: the
    estimate, its spread and the effective sample size stay the same, and no weight's
    square or product with a cost overflows.  Weights past the largest float (the
    inverse of a propensity too small for it to be one) count alike, the others nothing.
    """
    top = max(w for w, _, _ in rows)
    if top == 0.0:
        return rows
    if math.isinf(top):
        return [(1.0 if math.isinf(w) else 0.0, c, s) for w, c, s in rows]
    return [(w / top, c, s) for w, c, s in rows]


# --------------------------------------------------------------------------- entry points


async def evaluate_policy(
    backend: TelemetryBackend,
    workflow: str,
    stage: str,
    *,
    registry: ModelRegistry | None = None,
    days: float = 7.0,
    now: datetime | None = None,
    ipw_limit: int = 5_000,
    evidence: StageEvidence | None = None,
    **options: Any,
) -> WhatIfReport:
    """
    `load_stage_evidence` then `simulate_policy`, plus the off-policy estimate.

    Args:
        backend, workflow, stage, registry, days, now: as for `load_stage_evidence`.
        ipw_limit: the off-policy estimate is over the newest this many sample calls of
            the stage in the evidence's window (0: skip it).
        evidence: already loaded for this stage, used instead of reading it again.
        **options: `simulate_policy`'s keywords.

    Raises:
        ConfigurationError: invalid arguments, or ``evidence`` of another stage.
    """
    ipw_limit = check(_ipw_limit, "ipw_limit", ipw_limit)
    registry = ModelRegistry.default() if registry is None else registry
    if evidence is None:
        evidence = await load_stage_evidence(
            backend, workflow, stage, registry=registry, days=days, now=now
        )
    elif (evidence.workflow, evidence.stage) != (workflow, stage):
        raise ConfigurationError(
            f"evidence is for {evidence.workflow}/{evidence.stage}, not {workflow}/{stage}"
        )
    report = await simulate_policy(evidence, registry=registry, **options)
    if ipw_limit == 0 or not evidence.samples:
        return report
    recent = await backend.recent(
        limit=ipw_limit,
        workflow=workflow,
        stage=stage,
        since=evidence.since,
        until=evidence.until,
        samples_only=True,
    )
    target = {t.model: t.share.estimate or 0.0 for t in report.traffic}
    ipw = ipw_estimate(recent, target)
    note = _ipw_note(ipw, target, read=len(recent))
    notes = report.notes if note is None else (*report.notes, note)
    return evolve(report, ipw=ipw, notes=notes)


def _ipw_note(ipw: IPWEstimate | None, target: Mapping[str, float], *, read: int) -> str | None:
    """Why the report has no off-policy estimate (None: it has one); ``read``: calls read."""
    if ipw is None:
        if not read:
            return (
                "no off-policy (IPW) estimate: no recorded call of the window could be read "
                "back (purged since, or a store that keeps only the rollups)"
            )
        return (
            f"no off-policy (IPW) estimate: none of the {read} newest recorded calls of "
            "the window carries a routing_propensity (recorded before this version, or "
            "without a router)"
        )
    if ipw.cost_per_request.estimate is not None:
        return None
    if ipw.effective_sample_size == 0.0:
        why = (
            "routes no request (no model qualifies)"
            if not any(target.values())
            else "routes no request to a model those calls went to"
        )
        return (
            f"no off-policy (IPW) estimate: {ipw.with_propensity} recorded calls carry a "
            f"routing_propensity, but the proposed policy {why}"
        )
    return (
        f"no off-policy (IPW) estimate: the recorded traffic overlaps too little with "
        f"the proposed policy (effective sample size {ipw.effective_sample_size:.1f})"
    )


async def sweep_min_success_rate(
    evidence: StageEvidence, values: Sequence[float], **options: Any
) -> list[WhatIfReport]:
    """`simulate_policy` for each ``min_success_rate`` in ``values`` (same evidence)."""
    if not values:
        raise ConfigurationError("sweep needs at least one min_success_rate value")
    if "min_success_rate" in options:
        raise ConfigurationError(
            "sweep_min_success_rate sets min_success_rate itself (one report per value "
            "in values): leave it out of the options"
        )
    return [await simulate_policy(evidence, min_success_rate=v, **options) for v in values]
