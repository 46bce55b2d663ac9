"""
The what-if's replicates: simulated requests replayed through the real router.

Each replicate draws one plausible truth for every model from its fit's uncertainty
(`_draw`), then sends the stage's simulated requests through an `AdaptiveModelRouter`
that starts from the recorded evidence (`_FrozenEvidence`, the buckets coarsened by
`_coarsen`) and learns from outcomes drawn from that truth (`_Simulation.replay`).
`_Replicates` keeps the figures each replicate gave, which the report's intervals are
taken over.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

from anyio.lowlevel import checkpoint
from attrs import define, field, frozen

from ._router import AdaptiveModelRouter
from ._whatif_fit import _FALLBACK_SIGMA, _mixture_p95
from ._whatif_values import ModelFit, StageEvidence
from .abc import TelemetryBackend
from .evidence import (
    BUCKET_SECONDS,
    SUM_FIELDS,
    EvidenceBatch,
    EvidenceBucket,
    sorted_buckets,
)
from .exceptions import NoModelMeetsConstraintsError
from .records import (
    ConstraintStatus,
    LLMCallRecord,
    ModelPerformance,
    Outcome,
    RoutingDecision,
    _trusted_call_record,
)
from .registry import ModelInfo, ModelRegistry
from .routing.policy import RoutingPolicy

__all__: list[str] = []

_SIM_BUCKETS: Final = 64  # evidence buckets per model the simulated router starts from
_YIELD_EVERY: Final = 256  # simulated requests between two checkpoints (a cancellation lands)


class _FrozenEvidence(TelemetryBackend):
    """A backend holding fixed evidence buckets: what the simulated router starts from."""

    def __init__(self, buckets: Sequence[EvidenceBucket]) -> None:
        super().__init__()
        self._buckets = tuple(buckets)

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        return None

    async def _aggregate(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
        per_stage: bool,
    ) -> list[ModelPerformance]:
        return []

    async def _recent(
        self,
        *,
        limit: int,
        workflow: str | None,
        stage: str | None,
        model: str | None,
        since: datetime | None,
        until: datetime | None,
        samples_only: bool,
    ) -> list[LLMCallRecord]:
        return []

    async def _evidence(
        self, *, since: datetime | None, until: datetime | None, after_version: int
    ) -> EvidenceBatch:
        if after_version >= 1:
            return EvidenceBatch(buckets=(), version=1)
        return EvidenceBatch(
            buckets=[
                b
                for b in self._buckets
                if (since is None or b.bucket_start >= since)
                and (until is None or b.bucket_start < until)
            ],
            version=1,
        )

    async def _purge(self, *, before: datetime) -> int:
        return 0


def _coarsen(buckets: Sequence[EvidenceBucket], days: float) -> list[EvidenceBucket]:
    """
    The buckets merged into wider ones (at most ~`_SIM_BUCKETS` per model over the
    window), stamped version 1: every sum is kept, so the simulated router's verdicts
    are those of the recorded evidence, and its start costs the same at 1k or 1M calls.
    """
    width = max(BUCKET_SECONDS, math.ceil(days * 86_400 / _SIM_BUCKETS / BUCKET_SECONDS) * 60)
    acc: dict[tuple[str | None, str | None, str, int], list[float]] = {}
    starts: dict[tuple[str | None, str | None, str, int], datetime] = {}
    for b in buckets:
        key = (b.workflow, b.stage, b.model, math.floor(b.bucket_start.timestamp() / width))
        sums = acc.get(key)
        if sums is None:
            sums = acc[key] = [0.0] * len(SUM_FIELDS)
            starts[key] = b.bucket_start
        elif b.bucket_start < starts[key]:
            starts[key] = b.bucket_start  # the earliest: a merged bucket stays in the window
        for i, name in enumerate(SUM_FIELDS):
            sums[i] += getattr(b, name)
    out = []
    for key, sums in acc.items():
        wf, st, model, _ = key
        values: dict[str, Any] = {
            name: int(v) if isinstance(getattr(_ZERO_BUCKET, name), int) else v
            for name, v in zip(SUM_FIELDS, sums, strict=True)
        }
        out.append(
            EvidenceBucket(
                workflow=wf,
                stage=st,
                model=model,
                bucket_start=starts[key],
                version=1,
                **values,
            )
        )
    return sorted_buckets(out)


_ZERO_BUCKET: Final = EvidenceBucket(
    workflow=None, stage=None, model="-", bucket_start=datetime.fromtimestamp(0, UTC)
)


@frozen(kw_only=True)
class _Draw:
    """One replicate's truth for one model."""

    provider: str
    success: float
    input_tokens: float
    output_tokens: float
    mu: float
    sigma: float
    cost_per_success: float
    cost_per_failure: float = 0.0
    # False: a registry model whose calls' size nothing gave (no successful call in the
    # stage, no input_tokens and max_tokens): what its calls cost is unknown
    priced: bool = True
    # log-normal time to first token; None: no streamed call to learn it from
    ttft_mu: float | None = None
    ttft_sigma: float = _FALLBACK_SIGMA


def _measured(evidence: StageEvidence) -> bool:
    """Whether a call of the stage succeeded in the window (measured tokens and latency)."""
    return any(f.latency_n for f in evidence.fits.values())


def _pooled(evidence: StageEvidence) -> tuple[float, float, float, float]:
    """
    Stage-wide mean input / output tokens and latency log-mean / log-sd; without a
    successful call (`_measured` false), no tokens and a latency around a second.
    """
    n = sum(f.latency_n for f in evidence.fits.values())
    if n == 0:
        return (0.0, 0.0, math.log(1000.0), 1.0)
    b = evidence.buckets
    mean_in = sum(x.input_tokens for x in b) / n
    mean_out = sum(x.output_tokens for x in b) / n
    mu = sum(x.latency_log_sum for x in b) / n
    sq = sum(x.latency_log_sq_sum for x in b) / n
    return (mean_in, mean_out, mu, math.sqrt(max(0.0, sq - mu * mu)) or _FALLBACK_SIGMA)


def _pooled_ttft(evidence: StageEvidence) -> tuple[float, float] | None:
    """Stage-wide TTFT log-mean / log-sd of the streamed calls; None if none streamed."""
    b = evidence.buckets
    n = sum(x.ttft_n for x in b)
    if n == 0:
        return None
    mu = sum(x.ttft_log_sum for x in b) / n
    sq = sum(x.ttft_log_sq_sum for x in b) / n
    return (mu, math.sqrt(max(0.0, sq - mu * mu)) or _FALLBACK_SIGMA)


def _draw_ttft(
    fit: ModelFit, pooled_ttft: tuple[float, float] | None, rng: random.Random
) -> tuple[float | None, float]:
    """One replicate's TTFT log-mean / log-sd for a model (the stage's if it never streamed)."""
    if fit.ttft_mu is None:
        if pooled_ttft is None:
            return None, _FALLBACK_SIGMA
        return pooled_ttft
    mu = rng.gauss(fit.ttft_mu, fit.se_ttft_mu)
    n = fit.ttft_n
    if fit.ttft_sigma is not None and n > 2:
        sigma = fit.ttft_sigma * math.sqrt(rng.gammavariate((n - 1) / 2.0, 2.0) / (n - 1))
    else:
        sigma = fit.ttft_sigma if fit.ttft_sigma is not None else _FALLBACK_SIGMA
    return mu, max(sigma, 1e-6)


def _draw(
    fit: ModelFit,
    registry: ModelRegistry,
    pooled: tuple[float, float, float, float],
    rng: random.Random,
    pooled_ttft: tuple[float, float] | None = None,
    max_tokens: int | None = None,
    input_tokens: int | None = None,
    unmeasured: bool = False,
) -> _Draw:
    """
    One replicate's truth for ``fit``'s model, drawn from the fit's uncertainty.

    A model unknown or never successful in the window has its success rate drawn from
    the uniform prior (updated by what little it did) and the stage's pooled tokens and
    latency.  Every call's prompt is ``input_tokens`` long when given (else the model's
    mean, drawn); output tokens stop at ``max_tokens``.  A success costs the list price
    of those tokens times the fit's ``success_cost_factor``, a failure times its
    ``failure_cost_factor`` (`_cost`).  ``unmeasured``: no call of the stage succeeded,
    so the pool holds no tokens: a registry model drawn from it is priced only when
    ``input_tokens`` and ``max_tokens`` give its calls' size (its output taken as
    ``max_tokens``, as the router costs a call it knows no output of).
    """
    info = registry.get(fit.model) if fit.model in registry else None
    provider = info.provider if info is not None else "unknown"
    if not fit.known or fit.mean_output_tokens is None or fit.latency_mu is None:
        # unknown (or never successful): anything from 0 to 1, the stage's tokens/latency
        s = fit.successes
        f = fit.samples - s
        success = rng.betavariate(1.0 + s, 1.0 + f)
        mean_in, mean_out, mu, sigma = pooled
        if unmeasured and max_tokens is not None:
            mean_out = float(max_tokens)
        priced = info is None or not unmeasured or None not in (input_tokens, max_tokens)
    else:
        priced = True
        phi = fit.overdispersion
        s = fit.successes
        f = fit.samples - s
        success = rng.betavariate(1.0 + s / phi, 1.0 + f / phi)
        assert fit.mean_input_tokens is not None
        mean_in = max(0.0, rng.gauss(fit.mean_input_tokens, fit.se_input_tokens))
        mean_out = max(0.0, rng.gauss(fit.mean_output_tokens, fit.se_output_tokens))
        mu = rng.gauss(fit.latency_mu, fit.se_latency_mu)
        n = fit.latency_n
        if fit.latency_sigma is not None and n > 2:
            sigma = fit.latency_sigma * math.sqrt(rng.gammavariate((n - 1) / 2.0, 2.0) / (n - 1))
        else:
            sigma = fit.latency_sigma if fit.latency_sigma is not None else _FALLBACK_SIGMA
    if input_tokens is not None:
        mean_in = float(input_tokens)  # the prompt asked about, as the router costs the call
    if max_tokens is not None and mean_out > max_tokens:
        mean_out = float(max_tokens)  # the call's output stops there, as the router costs it
    per_success, per_failure = _cost(fit, info, mean_in, mean_out)
    ttft_mu, ttft_sigma = _draw_ttft(fit, pooled_ttft, rng)
    return _Draw(
        provider=provider,
        success=success,
        input_tokens=mean_in,
        output_tokens=mean_out,
        mu=mu,
        sigma=max(sigma, 1e-6),
        cost_per_success=per_success,
        cost_per_failure=per_failure,
        priced=priced,
        ttft_mu=ttft_mu,
        ttft_sigma=ttft_sigma,
    )


def _cost(
    fit: ModelFit, info: ModelInfo | None, mean_in: float, mean_out: float
) -> tuple[float, float]:
    """
    What one simulated success and one failure of ``fit``'s model cost, its calls
    having ``mean_in`` / ``mean_out`` tokens: their list price times the fit's cost
    factors.  A model with recorded failures but no success: failures cost what they
    were recorded to.  Outside the registry (no price): every attempt costs the recorded
    cost per attempt.
    """
    recorded = fit.recorded_cost_usd / fit.samples if fit.samples else 0.0
    if info is None:
        return recorded, recorded
    in_price, out_price = info.prices_for(mean_in)  # long-context prices past the threshold
    listed = (mean_in * in_price + mean_out * out_price) / 1e6
    if fit.successes == 0:
        return listed, recorded
    return listed * fit.success_cost_factor, listed * fit.failure_cost_factor


def _record(
    *,
    provider: str,
    model: str,
    outcome: Outcome,
    timestamp: datetime,
    workflow: str,
    stage: str,
    input_tokens: int,
    output_tokens: int,
    cost_usd: float,
    latency_ms: float,
    ttft_ms: float | None = None,
) -> LLMCallRecord:
    # a simulated attempt: every value is computed here and valid, so the record is
    # built without re-validating (a third of the simulation's time otherwise)
    return _trusted_call_record(
        provider=provider,
        model=model,
        outcome=outcome,
        call_id="whatif",
        request_id=None,
        timestamp=timestamp,
        workflow=workflow,
        stage=stage,
        task_type="unknown",
        tier=None,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost_usd,
        actual_cost_usd=None,
        price_version=None,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        error_type=None,
        error_message=None,
        status_code=None,
        attempt=1,
        fallback_used=False,
        fallback_chain=(),
        original_provider=None,
        original_model=None,
        exploration=False,
        routing_propensity=None,
        breaker_generation=None,
        circuit_state=None,
        user_id=None,
        session_id=None,
        metadata=_NO_METADATA,
        prompt_text=None,
        response_text=None,
    )


_NO_METADATA: Final[MappingProxyType[str, Any]] = MappingProxyType({})


@frozen(kw_only=True)
class _Question:
    """What every simulated request asks the router (`get_best_model`'s arguments)."""

    workflow: str
    stage: str
    candidates: list[str]
    input_tokens: int | None
    max_tokens: int | None
    max_cost: float | None
    max_latency_ms: float | None
    min_success_rate: float | None
    on_no_match: str
    max_ttft_ms: float | None

    def ask(self, router: AdaptiveModelRouter) -> RoutingDecision | None:
        """The router's decision, or ``None`` when it raised for want of a model."""
        try:
            return router.get_best_model(
                self.workflow,
                self.stage,
                candidates=self.candidates,
                input_tokens=self.input_tokens,
                max_tokens=self.max_tokens,
                max_cost=self.max_cost,
                max_latency_ms=self.max_latency_ms,
                min_success_rate=self.min_success_rate,
                on_no_match=self.on_no_match,
                max_ttft_ms=self.max_ttft_ms,
            )
        except NoModelMeetsConstraintsError:
            return None


def _none_proven(decision: RoutingDecision) -> bool:
    """
    True when the router answered by exploring while no candidate was proven to meet
    every constraint (an unproven model, or a re-probe): ``on_no_match`` did not apply.
    """
    return (
        decision.policy_applied is None
        and decision.exploration
        and not any(c.status is ConstraintStatus.ELIGIBLE for c in decision.candidates)
    )


@frozen(kw_only=True)
class _Replicate:
    """What one replicate's simulated requests did, and the truth they were drawn from."""

    draws: dict[str, _Draw]
    picks: dict[str, int]  # requests served per model
    served: int
    unmatched: int  # requests no model qualified for: on_no_match raised, relaxed or pinned
    unproven: int  # requests answered by exploring while no model was proven
    expected_cost: float  # sum over served requests of the expected cost (failures' too)
    unpriced: int  # served requests of a model whose calls' cost is unknown (`_Draw.priced`)
    expected_successes: float


@define(kw_only=True)
class _Simulation:
    """
    What every replicate shares: the evidence, the fits, the router's start and question.

    ``fits`` holds one `ModelFit` per candidate and grows by any model the router pins
    outside the candidates (``on_no_match``), so that the report shows it too.
    """

    evidence: StageEvidence
    registry: ModelRegistry
    policy: RoutingPolicy
    fits: dict[str, ModelFit]
    pooled: tuple[float, float, float, float]
    pooled_ttft: tuple[float, float] | None
    store: _FrozenEvidence
    question: _Question
    requests: int
    seed: int
    # the prompt size the caller gave (None: each model's own, as recorded)
    prompt_tokens: int | None = None

    async def replay(self, rep: int) -> _Replicate:
        """
        Replicate ``rep``: draw every candidate's truth, then route ``requests`` requests.

        The router runs on a simulated clock (one second per request) from the end of
        the evidence's window, and learns from every simulated outcome.

        Args:
            rep: the replicate's index (seeds its random draws and its router).

        Returns:
            What its requests did.
        """
        rng = random.Random(self.seed * 1_000_003 + rep)
        draws = {n: self._draw(n, rng) for n in self.question.candidates}
        now = [self.evidence.until.timestamp()]

        def clock(now: list[float] = now) -> float:
            return now[0]

        router = AdaptiveModelRouter(
            self.registry,
            self.store,
            policy=self.policy,
            refresh_interval=None,
            seed=self.seed * 7_919 + rep,
            clock=clock,
        )
        picks: dict[str, int] = {}
        served = 0
        unmatched = 0
        unproven = unpriced = 0
        exp_cost = 0.0
        exp_success = 0.0
        async with router:
            for i in range(self.requests):
                if i % _YIELD_EVERY == 0:
                    # the loop awaits nothing: without this, a cancellation (Ctrl-C in
                    # `routing whatif`) would wait for every replicate to finish
                    await checkpoint()
                now[0] += 1.0
                decision = self.question.ask(router)
                if decision is None:
                    unmatched += 1
                    continue
                if decision.policy_applied is not None:
                    unmatched += 1
                elif _none_proven(decision):
                    unproven += 1
                model = decision.model
                d = draws.get(model)
                if d is None:  # a pinned model outside the candidates
                    d = draws[model] = self._draw_pinned(model, rng)
                served += 1
                unpriced += not d.priced
                picks[model] = picks.get(model, 0) + 1
                exp_cost += d.success * d.cost_per_success + (1.0 - d.success) * d.cost_per_failure
                exp_success += d.success
                router.record_outcome(self._outcome(model, d, now[0], rng))
        return _Replicate(
            draws=draws,
            picks=picks,
            served=served,
            unmatched=unmatched,
            unproven=unproven,
            expected_cost=exp_cost,
            unpriced=unpriced,
            expected_successes=exp_success,
        )

    def _draw_pinned(self, model: str, rng: random.Random) -> _Draw:
        """The truth of a model pinned outside the candidates (fitted if it has evidence)."""
        self.fits.setdefault(
            model, self.evidence.fits.get(model) or ModelFit(model=model, known=False)
        )
        return self._draw(model, rng)

    def _draw(self, model: str, rng: random.Random) -> _Draw:
        """One replicate's truth for ``model``, its calls of the question's size."""
        return _draw(
            self.fits[model],
            self.registry,
            self.pooled,
            rng,
            self.pooled_ttft,
            max_tokens=self.question.max_tokens,
            input_tokens=self.prompt_tokens,
            unmeasured=not _measured(self.evidence),
        )

    def _outcome(self, model: str, d: _Draw, timestamp: float, rng: random.Random) -> LLMCallRecord:
        """One simulated attempt on ``model``: success, tokens and timings drawn from ``d``."""
        ok = rng.random() < d.success
        out = round(d.output_tokens) if ok else 0
        return _record(
            provider=d.provider,
            model=model,
            outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
            timestamp=datetime.fromtimestamp(timestamp, UTC),
            workflow=self.evidence.workflow,
            stage=self.evidence.stage,
            input_tokens=round(d.input_tokens) if ok else 0,
            output_tokens=out,
            cost_usd=d.cost_per_success if ok else d.cost_per_failure,
            latency_ms=rng.lognormvariate(d.mu, d.sigma),
            ttft_ms=None if d.ttft_mu is None else rng.lognormvariate(d.ttft_mu, d.ttft_sigma),
        )


@define(kw_only=True)
class _Replicates:
    """
    Each replicate's figures, in order: what the report's intervals are taken over.

    ``shares`` starts with one list per candidate; a model pinned outside them joins
    with a zero share for the replicates before it appeared.
    """

    requests: int
    shares: dict[str, list[float]]
    costs: list[float | None] = field(factory=list)
    success: list[float | None] = field(factory=list)
    p95s: list[float | None] = field(factory=list)
    ttft_p95s: list[float | None] = field(factory=list)
    no_match: list[float] = field(factory=list)
    unproven: list[float] = field(factory=list)

    def add(self, r: _Replicate) -> None:
        """Add replicate ``r``'s cost, success, p95s, no-match, unproven and traffic shares."""
        for m in r.picks:
            self.shares.setdefault(m, [0.0] * len(self.costs))
        # unknown when a request went to a model whose calls' cost is unknown
        self.costs.append(None if r.unpriced else r.expected_cost / self.requests)
        self.success.append(r.expected_successes / r.served if r.served else None)
        self.no_match.append(r.unmatched / self.requests)
        self.unproven.append(r.unproven / self.requests)
        self.p95s.append(
            _mixture_p95(
                [
                    (r.picks.get(m, 0) * r.draws[m].success, r.draws[m].mu, r.draws[m].sigma)
                    for m in r.picks
                ]
            )
        )
        self.ttft_p95s.append(
            _mixture_p95(
                [
                    (r.picks.get(m, 0) * r.draws[m].success, t_mu, r.draws[m].ttft_sigma)
                    for m in r.picks
                    if (t_mu := r.draws[m].ttft_mu) is not None
                ]
            )
        )
        for m in self.shares:
            self.shares[m].append(r.picks.get(m, 0) / self.requests)
