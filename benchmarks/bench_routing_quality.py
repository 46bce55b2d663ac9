"""
Routing quality: does the router keep its promise on a workload whose truth is known?

Seven models in one tier, each with a true success probability, a log-normal latency,
an output-token range and a list price, are served by an in-process `FakeProvider`
and called through the real `EmpathyLLMExecutor` (one route, one attempt: no retry, no
fallback, no breaker; one scenario below retries), the real `AdaptiveModelRouter`
(default policy and refresh interval) and a real SQLite telemetry file.  Constraints:
``min_success_rate`` 0.95, ``max_latency_ms`` 2,000 (held against the p95),
``max_cost`` $0.003, ``max_tokens`` 1,024.  The *oracle* picks the cheapest model whose
TRUE success, p95 latency and expected cost meet them; a model that truly misses one is
a *violator*.

The models (input / output USD per million tokens; expected cost of a call):

====================  ========================================================
near-gate (cheapest)  success 0.93 against the 0.95 gate
slow                  p95 ~2.9 s against 2 s
verbose               ~1,000 output tokens: expected cost $0.0032 > max_cost
oracle                success 0.99, p95 ~0.8 s, $0.0010: the oracle's model
worst-case            compliant, $0.0014 expected, but $0.0036 with max_tokens
pricier, premium      compliant, $0.0018 and $0.0025
====================  ========================================================

Time is simulated: one clock drives the executor (latencies), the provider (each
call's drawn latency advances it) and the router (``clock=`` and ``sleep=``, so its
refresh loop wakes every 60 simulated seconds, exactly as in production).  Requests
arrive one per simulated second.  The executor stamps records with the wall clock and
has no hook for another one, so the benchmark restamps each record with the simulated
time as it reaches the router and the SQLite backend (two thin wrappers; nothing else
is changed).

Scenarios (``--quick``: 1 seed and shorter runs; full: 5 seeds; ``--seeds N`` for N):

* **stationary**: 5,000 requests;
* **degradation**: the oracle's model drops from 0.99 to 0.80 success at request
  2,000 and recovers at 3,000 (fresh store, default refresh);
* **history**: the same, with 7 days of history (one call a minute, drawn from the
  truth, mostly served by the oracle's model) stored in the SQLite file beforehand;
* **retries and fallback**: the degradation on a fresh store, through an executor with
  its default retry and fallback policies (a failed attempt retried up to twice after
  a backoff waited in simulated time, then another model) instead of one attempt;
* **restart**: the stationary workload, router and executor closed and rebuilt over the
  same store halfway; the verdict on every candidate is compared before and after;
* **two processes**: two OS processes (1 and 0.5 requests/s) share one SQLite file
  and the degradation schedule, in lock-step on simulated time; how long do their picks
  disagree?

With litellm installed, LiteLLM Router's outcome-blind strategies (simple-shuffle,
cost-based-routing) select among the same seven deployments for the stationary
workload, for context.

Run: ``python -m benchmarks.bench_routing_quality [--quick] [--seeds N]``; with
``--explain SEED [--scenario degradation|history|retried]``, only one scenario
(stationary by default) on that seed, saying which models its requests after warm-up
went to in violation or to explore and the reasons the decisions gave (in the
degradation scenarios also the degraded model's calls while degraded, and how its
status changed after it recovered).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import heapq
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from benchmarks._common import RESULTS_DIR, BenchResult, peer_version, write_result
from empathy_models import (
    AdaptiveModelRouter,
    EmpathyLLMExecutor,
    EmpathyModelsError,
    ExecutionContext,
    FallbackPolicy,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    Outcome,
    RetryPolicy,
    RoutingDecision,
)
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.records import CandidateEvaluation, ConstraintStatus
from empathy_models.testing import DEFAULT_START, FakeClock, FakeProvider, Latency, ModelBehavior

# --------------------------------------------------------------------------- the truth

MIN_SUCCESS = 0.95
MAX_LATENCY_MS = 2_000.0
MAX_COST = 0.003
MAX_TOKENS = 1_024
PROVIDER = "fake"
WORKFLOW, STAGE = "bench", "answer"
# 2,000 characters: the executor estimates 500 input tokens, the fake provider counts 501
PROMPT = ("Summarize the following support conversation in three sentences. " * 31)[:2_000]
INPUT_TOKENS = len(PROMPT) // 4 + 1
Z95 = 1.6448536269514722


@dataclass(frozen=True)
class Truth:
    """What one model really does: the benchmark's ground truth."""

    model: str
    role: str
    input_price: float  # USD per million tokens
    output_price: float
    success: float
    latency_median_ms: float
    latency_sigma: float
    output_tokens: tuple[int, int]

    def info(self) -> ModelInfo:
        return ModelInfo(
            id=self.model,
            provider=PROVIDER,
            tier=ModelTier.CAPABLE,
            input_price_per_mtok=self.input_price,
            output_price_per_mtok=self.output_price,
            context_window=200_000,
            max_output_tokens=8_192,
        )

    def behavior(self, success: float | None = None) -> ModelBehavior:
        rate = self.success if success is None else success
        return ModelBehavior(
            latency=Latency.lognormal(self.latency_median_ms, self.latency_sigma),
            failure_rate=round(1.0 - rate, 6),
            failures=(500,),
            output_tokens=self.output_tokens,
        )

    @property
    def p95_ms(self) -> float:
        return self.latency_median_ms * math.exp(Z95 * self.latency_sigma)

    @property
    def expected_cost(self) -> float:
        low, high = self.output_tokens
        mean_out = (min(low, MAX_TOKENS) + min(high, MAX_TOKENS)) / 2
        return (INPUT_TOKENS * self.input_price + mean_out * self.output_price) / 1e6

    def violates(self, success: float | None = None) -> bool:
        rate = self.success if success is None else success
        return rate < MIN_SUCCESS or self.p95_ms > MAX_LATENCY_MS or self.expected_cost > MAX_COST


MODELS: tuple[Truth, ...] = (
    Truth("near-gate", "success 0.93 < 0.95", 0.5, 1.5, 0.93, 400.0, 0.3, (200, 400)),
    Truth("slow", "p95 latency > 2 s", 0.5, 2.0, 0.99, 1_600.0, 0.35, (200, 400)),
    Truth("verbose", "expected cost > max_cost", 0.3, 3.0, 0.99, 500.0, 0.3, (1_000, 1_024)),
    Truth("oracle", "the oracle's model", 0.8, 2.0, 0.99, 500.0, 0.3, (200, 400)),
    Truth("worst-case", "worst case > max_cost", 1.0, 3.0, 0.99, 450.0, 0.3, (200, 400)),
    Truth("pricier", "compliant, pricier", 1.5, 3.5, 0.99, 500.0, 0.3, (200, 400)),
    Truth("premium", "compliant, priciest", 2.0, 5.0, 0.995, 600.0, 0.3, (200, 400)),
)
BY_ID = {t.model: t for t in MODELS}
IDS = tuple(t.model for t in MODELS)
REGISTRY = ModelRegistry(models=tuple(t.info() for t in MODELS), price_version="bench-quality")
ORACLE = min((t for t in MODELS if not t.violates()), key=lambda t: t.expected_cost)
DEGRADED = ORACLE.model
CONTEXT = ExecutionContext(
    workflow=WORKFLOW,
    stage=STAGE,
    tier=ModelTier.CAPABLE,
    max_cost=MAX_COST,
    max_latency_ms=MAX_LATENCY_MS,
    min_success_rate=MIN_SUCCESS,
    max_tokens=MAX_TOKENS,
)


@dataclass(frozen=True)
class Sizes:
    seeds: int
    stationary: int
    degrade_at: int
    recover_at: int
    degradation_end: int
    history_rows: int
    restart_at: int
    two_proc_end_s: int
    two_proc_degrade_s: int
    two_proc_recover_s: int
    two_proc_warmup_s: int
    warmup: int = 500  # requests before the figures taken "after warm-up" start


FULL = Sizes(5, 5_000, 2_000, 3_000, 5_000, 10_080, 2_500, 3_600, 1_200, 2_400, 600)
QUICK = Sizes(1, 500, 300, 450, 650, 504, 250, 400, 200, 300, 100, warmup=200)

# --------------------------------------------------------------------------- simulated time


class SimTime:
    """
    One simulated clock for the executor, the provider and the router.

    ``now`` is the clock (epoch seconds, also monotonic here).  `provider_sleep`
    advances it by a call's latency.  `timer_sleep` (the router's ``sleep=``) parks its
    caller until `advance_to` moves the clock past its deadline; `advance_to` then wakes
    it and waits until it sleeps again, so a refresh due at ``T`` runs with the clock at
    ``T`` and completes before the next request.
    """

    def __init__(self, start: float = DEFAULT_START) -> None:
        self.clock = FakeClock(start)
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.settle_timeouts = 0

    def now(self) -> float:
        return self.clock.now

    async def provider_sleep(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await asyncio.sleep(0)

    async def timer_sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.clock.now + seconds, next(self._seq), fut))
        await fut

    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._timers if not f.done())

    async def wait_for_sleepers(self, count: int, limit_s: float = 30.0) -> None:
        """Let other tasks run until ``count`` of them sleep on this clock."""
        give_up = time.monotonic() + limit_s
        for _ in range(50):
            if self.sleepers() >= count:
                return
            await asyncio.sleep(0)
        while self.sleepers() < count:
            if time.monotonic() > give_up:
                self.settle_timeouts += 1
                return
            await asyncio.sleep(0.0005)

    async def advance_to(self, target: float) -> None:
        while self._timers and self._timers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._timers)
            if fut.done():
                continue
            if deadline > self.clock.now:
                self.clock.set(deadline)
            others = self.sleepers()  # the woken one is no longer counted
            fut.set_result(None)
            await self.wait_for_sleepers(others + 1)
        if target > self.clock.now:
            self.clock.set(target)


def restamp(record: LLMCallRecord, sim: SimTime) -> LLMCallRecord:
    return attrs.evolve(record, timestamp=datetime.fromtimestamp(sim.now(), UTC))


class SimStampedSQLite(SQLiteTelemetryBackend):
    """The real SQLite backend; records are stamped with simulated time on the way in."""

    def __init__(self, path: str | os.PathLike[str], sim: SimTime) -> None:
        super().__init__(path)
        self._sim = sim

    async def record(self, record: LLMCallRecord) -> None:
        await super().record(restamp(record, self._sim))

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        await super().record_many([restamp(r, self._sim) for r in records])


class StampingRouter:
    """
    The real router behind the executor, with records restamped in simulated time.

    Also keeps a request's first decision (a fallback's is not its routing), so a failed
    request still says where it was routed.
    """

    def __init__(self, router: AdaptiveModelRouter, sim: SimTime) -> None:
        self.router = router
        self.sim = sim
        self.last: RoutingDecision | None = None

    def get_best_model(self, workflow: str, stage: str | None, **options: Any) -> RoutingDecision:
        decision = self.router.get_best_model(workflow, stage, **options)
        if self.last is None:
            self.last = decision
        return decision

    def record_outcome(self, record: LLMCallRecord) -> None:
        self.router.record_outcome(restamp(record, self.sim))

    def forget(self) -> None:
        self.last = None

    def taken(self) -> RoutingDecision | None:
        return self.last


# --------------------------------------------------------------------------- one deployment


@dataclass
class Trace:
    """
    Per request: routed model (None: no route), exploration, success, simulated time and
    the decision's reason; with ``detail``, also the evidence the decision showed for
    the model it picked (successes, calls of its current regime), and the status and
    detected change it showed for the model that degrades in the degradation scenarios.
    """

    models: list[str | None] = field(default_factory=list)
    explore: list[bool] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    detail: bool = False
    evidence: list[tuple[float, int] | None] = field(default_factory=list)
    watched: list[tuple[str, str | None] | None] = field(default_factory=list)


def _evidence(row: CandidateEvaluation | None) -> tuple[float, int] | None:
    # (successes, calls) of the evidence a decision judged ``row``'s model on: its current
    # regime's (restored evidence included)
    if row is None or row.success_rate is None or row.effective_sample_size is None:
        return None
    n = int(row.effective_sample_size)
    return (round(row.success_rate * n), n)


class Deployment:
    """Executor + router + SQLite telemetry over one file, on simulated time."""

    def __init__(
        self, path: Path, sim: SimTime, provider: FakeProvider, seed: int, retried: bool = False
    ) -> None:
        self.path = path
        self.retried = retried
        self.sim = sim
        self.provider = provider
        self.seed = seed
        self.generation = 0
        self.backend: SimStampedSQLite | None = None
        self.router: AdaptiveModelRouter | None = None
        self.adapter: StampingRouter | None = None
        self.executor: EmpathyLLMExecutor | None = None

    async def open(self) -> None:
        self.generation += 1
        self.backend = SimStampedSQLite(self.path, self.sim)
        await self.backend.__aenter__()
        sleepers = self.sim.sleepers()
        self.router = AdaptiveModelRouter(
            REGISTRY,
            self.backend,
            seed=self.seed * 1_000 + self.generation,
            clock=self.sim.now,
            sleep=self.sim.timer_sleep,
        )
        await self.router.start()
        await self.sim.wait_for_sleepers(sleepers + 1, limit_s=5.0)
        self.adapter = StampingRouter(self.router, self.sim)
        self.executor = EmpathyLLMExecutor(
            [self.provider],
            registry=REGISTRY,
            telemetry_store=self.backend,
            router=self.adapter,
            # the executor's defaults (3 attempts a route, backoff waited in simulated
            # time, then another model), or one attempt per request
            retry=RetryPolicy() if self.retried else RetryPolicy.none(),
            fallback=FallbackPolicy() if self.retried else FallbackPolicy.none(),
            clock=self.sim.now,
            sleep=self.sim.provider_sleep,
        )
        await self.executor.__aenter__()

    async def close(self) -> None:
        if self.executor is not None:
            await self.executor.aclose()
        if self.router is not None:
            await self.router.aclose()
        if self.backend is not None:
            await self.backend.aclose()
        self.executor = self.router = self.adapter = self.backend = None

    async def request(self, trace: Trace) -> None:
        assert self.executor is not None and self.adapter is not None
        self.adapter.forget()
        trace.times.append(self.sim.now())
        try:
            await self.executor.run(PROMPT, CONTEXT)
            ok = True
        except EmpathyModelsError:
            ok = False
        decision = self.adapter.taken()
        trace.models.append(None if decision is None else decision.model)
        trace.explore.append(bool(decision is not None and decision.exploration))
        trace.ok.append(ok)
        trace.reasons.append(None if decision is None else decision.reason)
        if trace.detail:
            rows = {c.model: c for c in decision.candidates} if decision is not None else {}
            row = rows.get(decision.model) if decision is not None else None
            trace.evidence.append(_evidence(row))
            watched = rows.get(DEGRADED)
            trace.watched.append(
                None if watched is None else (watched.status.value, watched.change)
            )

    def pick(self) -> str:
        """
        What the last decision shows as this process's pick: its model, or for an
        exploration the model it would have exploited (the cheapest candidate proven to
        meet every constraint), or `NONE_PROVEN` when none is (a failover, a cold start).
        """
        assert self.adapter is not None
        decision = self.adapter.taken()
        if decision is None:
            return "(no route)"
        if not decision.exploration:
            return decision.model
        proven = [c for c in decision.candidates if c.status == ConstraintStatus.ELIGIBLE]
        if not proven:
            return NONE_PROVEN
        return min(proven, key=lambda c: c.expected_cost_usd or 0.0).model

    def verdicts(self) -> dict[str, tuple[str, ...]]:
        """Every candidate's status and per-constraint statuses, from a fresh decision."""
        assert self.router is not None
        decision = self.router.get_best_model(
            WORKFLOW,
            STAGE,
            candidates=list(IDS),
            input_tokens=len(PROMPT) // 4,
            max_tokens=MAX_TOKENS,
            max_cost=MAX_COST,
            max_latency_ms=MAX_LATENCY_MS,
            min_success_rate=MIN_SUCCESS,
            on_no_match="relax",
        )
        return {
            c.model: (
                str(c.status),
                *(f"{k}={v}" for k, v in sorted(c.constraints.items())),
            )
            for c in decision.candidates
        }


def provider_for(sim: SimTime, seed: int) -> FakeProvider:
    return FakeProvider(
        {t.model: t.behavior() for t in MODELS},
        name=PROVIDER,
        seed=seed,
        sleep=sim.provider_sleep,
    )


async def drive(
    dep: Deployment,
    trace: Trace,
    count: int,
    *,
    start: float,
    rate: float = 1.0,
    schedule: dict[int, float] | None = None,
    first: int = 0,
) -> None:
    """Send requests ``first .. first+count-1``, one every ``1/rate`` simulated seconds."""
    for i in range(first, first + count):
        if schedule and i in schedule:
            dep.provider.set_behavior(DEGRADED, BY_ID[DEGRADED].behavior(schedule[i]))
        await dep.sim.advance_to(start + i / rate)
        await dep.request(trace)


# --------------------------------------------------------------------------- metrics


def true_success(model: str, i: int, schedule: dict[int, float] | None) -> float:
    rate = BY_ID[model].success
    if schedule and model == DEGRADED:
        for at in sorted(schedule):
            if i >= at:
                rate = schedule[at]
    return rate


def violating(trace: Trace, i: int, schedule: dict[int, float] | None = None) -> bool:
    model = trace.models[i]
    return model is not None and BY_ID[model].violates(true_success(model, i, schedule))


def stationary_metrics(trace: Trace, warmup: int) -> dict[str, float]:
    n = len(trace.models)
    after = range(warmup, n)
    routed = [m for m in trace.models if m is not None]
    late = [m for m in trace.models[warmup:] if m is not None]
    return {
        "cost_ratio": _cost(routed) / (max(1, len(routed)) * ORACLE.expected_cost),
        "cost_ratio_after": _cost(late) / (max(1, len(late)) * ORACLE.expected_cost),
        "violations": sum(violating(trace, i) for i in after) / len(after),
        "exploration": sum(trace.explore[i] for i in after) / len(after),
        "failed": float(sum(not ok for ok in trace.ok)),
        "no_route": float(sum(m is None for m in trace.models)),
        "worst_case_calls": float(sum(m == "worst-case" for m in trace.models)),
        "oracle_share": sum(trace.models[i] == ORACLE.model for i in after) / len(after),
    }


def _cost(models: Sequence[str]) -> float:
    return sum(BY_ID[m].expected_cost for m in models)


def degradation_metrics(
    trace: Trace, degrade_at: int, recover_at: int, warmup: int
) -> dict[str, float]:
    schedule = {degrade_at: 0.80, recover_at: BY_ID[DEGRADED].success}
    n = len(trace.models)
    detection = {
        i
        for i in range(degrade_at, recover_at)
        if trace.models[i] == DEGRADED and not trace.explore[i]
    }
    regain = math.inf
    window = 100
    held = sum(m == DEGRADED for m in trace.models[degrade_at - window : degrade_at])
    kept = sum(m == DEGRADED for m in trace.models[recover_at - window : recover_at])
    if held < 0.9 * window or kept >= 0.9 * window:
        # it did not hold the traffic before degrading, or never lost it: nothing to regain
        regain = math.nan
    else:
        for j in range(recover_at, n - window + 1):
            if sum(m == DEGRADED for m in trace.models[j : j + window]) >= 0.9 * window:
                regain = float(j + window - recover_at)
                break
    after = range(warmup, n)
    return {
        "leave_calls": float(len(detection)),
        "failed_degraded": float(sum(not trace.ok[i] for i in range(degrade_at, recover_at))),
        "failed": float(sum(not ok for ok in trace.ok)),
        "regain": regain,
        "violations": sum(violating(trace, i, schedule) and i not in detection for i in after)
        / len(after),
        "violations_raw": sum(violating(trace, i, schedule) for i in after) / len(after),
    }


# --------------------------------------------------------------------------- scenarios


async def scenario_stationary(
    seed: int, sizes: Sizes, workdir: Path, *, detail: bool = False
) -> Trace:
    sim = SimTime()
    dep = Deployment(workdir / f"stationary-{seed}.db", sim, provider_for(sim, seed), seed)
    trace = Trace(detail=detail)
    await dep.open()
    try:
        await drive(dep, trace, sizes.stationary, start=sim.now() + 1.0)
    finally:
        await dep.close()
    return trace


async def store_history(path: Path, seed: int, rows: int, end: float) -> None:
    """``rows`` calls over the 7 days before ``end``, drawn from the truth, for real."""
    rng = random.Random(f"history:{seed}")
    weights = [0.02, 0.02, 0.02, 0.88, 0.02, 0.02, 0.02]
    span = 7 * 86_400.0
    records = []
    for k in range(rows):
        truth = rng.choices(MODELS, weights)[0]
        ts = end - span + (k + rng.random()) * span / rows
        ok = rng.random() < truth.success
        out = rng.randint(*truth.output_tokens) if ok else 0
        records.append(
            LLMCallRecord(
                provider=PROVIDER,
                model=truth.model,
                outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                timestamp=datetime.fromtimestamp(min(ts, end - 1.0), UTC),
                workflow=WORKFLOW,
                stage=STAGE,
                tier=ModelTier.CAPABLE,
                input_tokens=INPUT_TOKENS if ok else 0,
                output_tokens=out,
                cost_usd=truth.info().cost(INPUT_TOKENS, out) if ok else 0.0,
                latency_ms=rng.lognormvariate(
                    math.log(truth.latency_median_ms), truth.latency_sigma
                ),
            )
        )
    async with SQLiteTelemetryBackend(path) as backend:
        for k in range(0, rows, 2_000):
            await backend.record_many(records[k : k + 2_000])
        await backend.flush()


async def scenario_degradation(
    seed: int,
    sizes: Sizes,
    workdir: Path,
    history: bool,
    *,
    detail: bool = False,
    retried: bool = False,
) -> Trace:
    sim = SimTime()
    name = "history" if history else "retried" if retried else "degradation"
    path = workdir / f"{name}-{seed}.db"
    if history:
        await store_history(path, seed, sizes.history_rows, sim.now())
    dep = Deployment(path, sim, provider_for(sim, seed), seed, retried=retried)
    trace = Trace(detail=detail)
    schedule = {sizes.degrade_at: 0.80, sizes.recover_at: BY_ID[DEGRADED].success}
    await dep.open()
    try:
        await drive(dep, trace, sizes.degradation_end, start=sim.now() + 1.0, schedule=schedule)
    finally:
        await dep.close()
    return trace


async def scenario_restart(seed: int, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    sim = SimTime()
    dep = Deployment(workdir / f"restart-{seed}.db", sim, provider_for(sim, seed), seed)
    trace = Trace()
    start = sim.now() + 1.0
    await dep.open()
    try:
        await drive(dep, trace, sizes.restart_at, start=start)
        await sim.advance_to(start + sizes.restart_at)  # every record is now in the past
        before = dep.verdicts()
        await dep.close()
        await dep.open()
        after = dep.verdicts()
        rest = sizes.stationary - sizes.restart_at
        await drive(dep, trace, rest, start=start + 1.0, first=sizes.restart_at)
    finally:
        await dep.close()
    same = sum(before.get(m) == after.get(m) for m in IDS)
    changed = {m: [before.get(m), after.get(m)] for m in IDS if before.get(m) != after.get(m)}
    return {"same": float(same), "changed": changed, "trace": trace}


# --------------------------------------------------------------------------- two processes


async def child_main() -> None:
    """One process of the two-process scenario: JSON-lines commands on stdin."""
    logging.getLogger("empathy_models").setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()
    first = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    sim = SimTime(first["start"])
    seed = int(first["seed"])
    dep = Deployment(Path(first["path"]), sim, provider_for(sim, seed), seed)
    await dep.open()
    trace = Trace()
    rate = float(first["rate"])
    origin = float(first["start"])
    sent = 0
    print(json.dumps({"ready": True}), flush=True)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "close":
                break
            if "success" in cmd:
                dep.provider.set_behavior(DEGRADED, BY_ID[DEGRADED].behavior(cmd["success"]))
            until = float(cmd["until"])
            picks = []
            while origin + (sent + 1) / rate < until:
                sent += 1
                await sim.advance_to(origin + sent / rate)
                await dep.request(trace)
                # the batch writer flushes 0.1 s (real time) after a call; at these
                # rates that is before the next call, which simulated time must keep
                assert dep.backend is not None
                await dep.backend.flush()
                picks.append([trace.times[-1], dep.pick()])
            await sim.advance_to(until)
            print(json.dumps({"picks": picks}), flush=True)
    finally:
        await dep.close()
    print(json.dumps({"closed": True, "settle_timeouts": sim.settle_timeouts}), flush=True)


_REPO = str(Path(__file__).resolve().parent.parent)
CHILD_TIMEOUT_S = 120.0


class ChildStuckError(RuntimeError):
    """A process of the two-process scenario stopped answering."""


async def scenario_two_processes(seed: int, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    path = workdir / f"two-{seed}.db"
    start = DEFAULT_START
    procs = []
    for role, rate in (("a", 1.0), ("b", 0.5)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.bench_routing_quality",
            "--child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=_REPO,
        )
        assert proc.stdin is not None
        first = {"start": start, "seed": seed * 10 + (role == "b"), "path": str(path), "rate": rate}
        proc.stdin.write((json.dumps(first) + "\n").encode())
        await proc.stdin.drain()
        procs.append(proc)

    async def ask(proc: asyncio.subprocess.Process, cmd: dict[str, Any]) -> dict[str, Any]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await proc.stdin.drain()
        try:  # a tick is a few seconds of work; far longer means the child is stuck
            line = await asyncio.wait_for(proc.stdout.readline(), CHILD_TIMEOUT_S)
        except TimeoutError:
            raise ChildStuckError(
                f"a process did not finish {cmd.get('until', 0) - start:,.0f} simulated s "
                f"within {CHILD_TIMEOUT_S:.0f} s of real time"
            ) from None
        if not line:
            raise ChildStuckError("a process exited early")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def ready(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 120)

    await asyncio.gather(*(ready(p) for p in procs))
    # Lockstep: one simulated second at a time, the processes in turn (never at once),
    # so a refresh in one reads exactly the other's calls up to a known simulated time
    # and a seed gives the same figure in every run.
    tick = 1.0
    events: list[tuple[float, int, str]] = []  # (simulated s, process, pick)
    t = 0.0
    try:
        while t < sizes.two_proc_end_s:
            t += tick
            cmd: dict[str, Any] = {"cmd": "run", "until": start + t}
            if abs(t - sizes.two_proc_degrade_s) < tick / 2:
                cmd["success"] = 0.80
            if abs(t - sizes.two_proc_recover_s) < tick / 2:
                cmd["success"] = BY_ID[DEGRADED].success
            replies = [await ask(p, cmd) for p in procs]
            for k, reply in enumerate(replies):
                for at, pick in reply["picks"]:
                    events.append((float(at) - start, k, pick))
        for p in procs:
            await ask(p, {"cmd": "close"})
    finally:
        for p in procs:
            if p.returncode is None:
                try:
                    await asyncio.wait_for(p.wait(), 5)
                except TimeoutError:
                    p.kill()
                    await p.wait()
    return disagreement(events, float(sizes.two_proc_warmup_s), t)


NONE_PROVEN = "(none proven: exploring)"


def disagreement(events: list[tuple[float, int, str]], after: float, end: float) -> dict[str, Any]:
    """
    How long two processes' picks differ, in simulated seconds after ``after``.

    A process's pick at time ``t`` is the model of its last non-exploration decision
    at or before ``t`` (it changes only when the process decides).
    """
    current: list[str | None] = [None, None]
    longest = total = 0.0
    since: float | None = None
    timeline: list[tuple[float, str | None, str | None]] = []
    for at, k, pick in sorted(events, key=lambda e: (e[0], e[1])):
        if current[k] == pick:
            continue
        current[k] = pick
        timeline.append((at, current[0], current[1]))
        differ = current[0] != current[1]
        if differ and since is None:
            since = at
        elif not differ and since is not None:
            if at > after:
                span = at - max(since, after)
                total += span
                longest = max(longest, span)
            since = None
    if since is not None:
        span = end - max(since, after)
        total += max(0.0, span)
        longest = max(longest, span)
    return {"longest": longest, "share": total / max(1.0, end - after), "timeline": timeline}


# --------------------------------------------------------------------------- LiteLLM


async def litellm_quality(
    requests: int, seeds: int, warmup: int
) -> tuple[dict[str, list[dict[str, float]]], str | None]:
    """LiteLLM Router's outcome-blind strategies over the same seven deployments."""
    version = peer_version("litellm")
    if not version:
        return {}, "litellm not installed (pip install -r benchmarks/requirements-peers.txt)"
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    warnings.filterwarnings("ignore")
    import litellm
    from litellm.router import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    out: dict[str, list[dict[str, float]]] = {}
    messages = [{"role": "user", "content": PROMPT}]
    for strategy in ("simple-shuffle", "cost-based-routing"):
        for seed in range(seeds):
            random.seed(seed)
            model_list = [
                {
                    "model_name": "group",
                    "litellm_params": {
                        "model": f"openai/{t.model}",
                        "api_key": "sk-offline",
                        "api_base": "http://127.0.0.1:9",
                        "input_cost_per_token": t.input_price / 1e6,
                        "output_cost_per_token": t.output_price / 1e6,
                    },
                    "model_info": {
                        "id": t.model,
                        "input_cost_per_token": t.input_price / 1e6,
                        "output_cost_per_token": t.output_price / 1e6,
                    },
                }
                for t in MODELS
            ]
            router = Router(model_list=model_list, routing_strategy=strategy, num_retries=0)
            trace = Trace()
            for _ in range(requests):
                dep = await router.async_get_available_deployment(
                    model="group", messages=messages, request_kwargs={}
                )
                trace.models.append(str(dep["model_info"]["id"]))
                trace.explore.append(False)
                trace.ok.append(True)
            out.setdefault(strategy, []).append(stationary_metrics(trace, warmup))
    return out, None


# --------------------------------------------------------------------------- report


def _pct(v: float) -> str:
    return f"{v * 100:.2f}%"


def _ratio(v: float) -> str:
    return f"{v:.3f}x"


def _count(v: float) -> str:
    return "never" if math.isinf(v) else f"{v:,.0f}"


def _seconds(v: float) -> str:
    return "never" if math.isinf(v) else f"{v:,.0f} s"


async def run(quick: bool = False, seeds: int | None = None) -> BenchResult:
    sizes = QUICK if quick else FULL
    if seeds is not None:
        sizes = dataclasses.replace(sizes, seeds=seeds)
    logging.getLogger("empathy_models").setLevel(logging.ERROR)
    started = time.perf_counter()
    per: dict[str, list[dict[str, float]]] = {}
    traces: dict[str, Trace] = {}
    restarts: list[dict[str, Any]] = []
    twos: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="empathy-rq-") as tmp:
        workdir = Path(tmp)
        for seed in range(sizes.seeds):
            trace = await scenario_stationary(seed, sizes, workdir)
            per.setdefault("stationary", []).append(stationary_metrics(trace, sizes.warmup))
            traces.setdefault("stationary", trace)
            for history in (False, True):
                name = "history" if history else "degradation"
                trace = await scenario_degradation(seed, sizes, workdir, history)
                per.setdefault(name, []).append(
                    degradation_metrics(trace, sizes.degrade_at, sizes.recover_at, sizes.warmup)
                )
                traces.setdefault(name, trace)
            trace = await scenario_degradation(seed, sizes, workdir, False, retried=True)
            per.setdefault("retried", []).append(
                degradation_metrics(trace, sizes.degrade_at, sizes.recover_at, sizes.warmup)
            )
            restart = await scenario_restart(seed, sizes, workdir)
            restarts.append(restart)
            per.setdefault("restart", []).append({"same": restart["same"]})
            try:
                two = await scenario_two_processes(seed, sizes, workdir)
            except ChildStuckError as exc:
                two = {"longest": math.inf, "share": math.nan, "timeline": [], "error": str(exc)}
            twos.append(two)
            per.setdefault("two", []).append({"longest": two["longest"], "share": two["share"]})
    peers, skipped = await litellm_quality(sizes.stationary, sizes.seeds, sizes.warmup)

    result = BenchResult(
        name="routing_quality",
        title=(
            f"Routing quality against a known truth ({sizes.seeds} seeds; "
            "median and worst over seeds)"
        ),
        columns=["median", "worst", "goal", "result", "seeds missing it"],
    )

    def row(
        label: str,
        scenario: str,
        key: str,
        fmt: Any,
        goal: str | None,
        ok: Any = None,
        higher_is_worse: bool = True,
        peer_rows: dict[str, list[dict[str, float]]] | None = None,
    ) -> None:
        everything = [m[key] for m in (peer_rows or per)[scenario]]
        values = [v for v in everything if not math.isnan(v)]
        if not values:  # e.g. a recovery when the model never lost its traffic
            result.add(
                label,
                median="n/a",
                worst="n/a",
                goal=goal or "",
                result="n/a",
                **{"seeds missing it": ""},
            )
            return
        worst = max(values) if higher_is_worse else min(values)
        skipped = len(everything) - len(values)
        result.add(
            label,
            median=fmt(statistics.median(values)),
            worst=fmt(worst) + (f" ({skipped} of {len(everything)} n/a)" if skipped else ""),
            goal=goal or "",
            result="" if ok is None else ("met" if ok(worst) else "**missed**"),
            **{
                "seeds missing it": ""
                if ok is None
                else f"{sum(not ok(v) for v in values)} of {len(values)}"
            },
        )

    n = sizes.stationary
    row(
        f"stationary: cost / oracle cost ({n:,} requests)",
        "stationary",
        "cost_ratio",
        _ratio,
        "<= 1.05x",
        lambda v: v <= 1.05,
    )
    row(
        f"stationary: cost / oracle cost, requests {sizes.warmup + 1:,}-{n:,}",
        "stationary",
        "cost_ratio_after",
        _ratio,
        None,
    )
    row(
        f"stationary: requests {sizes.warmup + 1:,}+ served by a violating model",
        "stationary",
        "violations",
        _pct,
        "< 1%",
        lambda v: v < 0.01,
    )
    row(
        f"stationary: exploration share, requests {sizes.warmup + 1:,}+",
        "stationary",
        "exploration",
        _pct,
        "< 1%",
        lambda v: v < 0.01,
    )
    row(
        "stationary: failed requests (no route / provider error)",
        "stationary",
        "failed",
        _count,
        None,
    )
    row(
        "stationary: calls to the compliant model whose worst case > max_cost",
        "stationary",
        "worst_case_calls",
        _count,
        None,
        higher_is_worse=False,
    )
    for name, label in (
        ("degradation", "fresh store"),
        ("history", "7 days of history"),
        ("retried", "the executor's default retries and fallback"),
    ):
        row(
            f"degradation ({label}): non-exploration calls to the degraded model",
            name,
            "leave_calls",
            _count,
            "<= 50",
            lambda v: v <= 50,
        )
        row(
            f"degradation ({label}): failed requests while degraded",
            name,
            "failed_degraded",
            _count,
            None,
        )
        row(f"degradation ({label}): failed requests, whole run", name, "failed", _count, None)
        row(
            f"degradation ({label}): requests until the recovered model has >= 90%",
            name,
            "regain",
            _count,
            "<= 1,000",
            lambda v: v <= 1_000,
        )
        row(
            f"degradation ({label}): violating share, requests {sizes.warmup + 1:,}+, detection "
            "calls excluded",
            name,
            "violations",
            _pct,
            "<= 1%",
            lambda v: v <= 0.01,
        )
        row(
            f"degradation ({label}): violating share, requests {sizes.warmup + 1:,}+, all",
            name,
            "violations_raw",
            _pct,
            None,
        )
    row(
        f"restart halfway: candidates with the same verdict (of {len(IDS)})",
        "restart",
        "same",
        _count,
        f"{len(IDS)} of {len(IDS)}",
        lambda v: v == len(IDS),
        higher_is_worse=False,
    )
    row(
        "two processes, one SQLite file: longest disagreement on the pick",
        "two",
        "longest",
        _seconds,
        "<= 62 s",
        lambda v: v <= 62,
    )
    row("two processes: share of time the picks disagree", "two", "share", _pct, None)
    for strategy in peers:
        row(
            f"LiteLLM {strategy}: cost / oracle cost",
            strategy,
            "cost_ratio",
            _ratio,
            None,
            peer_rows=peers,
        )
        row(
            f"LiteLLM {strategy}: violating share, requests {sizes.warmup + 1:,}+",
            strategy,
            "violations",
            _pct,
            None,
            peer_rows=peers,
        )
    if skipped:
        result.skipped["litellm"] = skipped
    oracle = ORACLE
    result.notes.extend(
        [
            f"constraints: min_success_rate {MIN_SUCCESS}, max_latency_ms {MAX_LATENCY_MS:,.0f} "
            f"(p95), max_cost ${MAX_COST}, max_tokens {MAX_TOKENS:,}; oracle: {oracle.model} "
            f"(${oracle.expected_cost:.5f} a call)",
            "cost: each routed request at its model's true expected cost, over the oracle's; "
            "requests that found no route count as failed, not as cost",
            "violating share: requests routed (exploration included) to a model that truly "
            "misses a constraint at that moment; 'detection calls excluded' leaves out the "
            "degraded model's non-exploration calls, judged by their own row",
            f"degradation: {DEGRADED} 0.99 -> 0.80 success at request {sizes.degrade_at:,}, "
            f"back at {sizes.recover_at:,}, {sizes.degradation_end:,} requests; default "
            "refresh (60 s) over a SQLite file; 1 request per simulated second",
            f"history: {sizes.history_rows:,} calls stored over the 7 days before the run",
            "retries and fallback: the degradation on a fresh store through an executor "
            "with its default RetryPolicy (3 attempts a route, backoff in simulated time) "
            "and FallbackPolicy; a request counts as routed to its first decision's model",
            "recovery: requests after the recovery until the end of the first 100-request "
            "window in which the model serves >= 90% (n/a for a seed where it did not hold "
            ">= 90% before degrading, or kept >= 90% while degraded)",
            f"two processes: 1 and 0.5 requests/s, {sizes.two_proc_end_s:,} simulated s, "
            f"degradation at {sizes.two_proc_degrade_s:,} s, recovery at "
            f"{sizes.two_proc_recover_s:,} s, the processes advanced in turn one simulated "
            "second at a time (a seed gives the same figure in every run); a process's pick "
            "= its last decision's model, or for an exploration the cheapest model it holds "
            "proven (none proven: a state of its own), compared over simulated time after "
            f"the first {sizes.two_proc_warmup_s:,} s; goal: one refresh interval (60 s) plus "
            "the 2 s the slower process takes to decide again",
            f"wall time {time.perf_counter() - started:.0f} s",
        ]
    )
    for k, two in enumerate(twos):
        if "error" in two:
            result.notes.append(f"two processes, seed {k}: {two['error']} (counted as never)")
    for k, r in enumerate(restarts):
        if r["changed"]:
            result.notes.append(f"restart, seed {k}: verdicts changed: {r['changed']}")
    if peers:
        result.notes.append(
            f"LiteLLM {peer_version('litellm')}: selection only "
            "(async_get_available_deployment), no outcome feedback; its strategies have no "
            "success-rate or latency constraints"
        )
    result.data = {
        "sizes": attrs_free(sizes),
        "per_seed": per,
        "litellm": peers,
        "truth": [
            {
                **t.__dict__,
                "p95_ms": t.p95_ms,
                "expected_cost": t.expected_cost,
                "violates": t.violates(),
            }
            for t in MODELS
        ],
        "two_process_timeline_seed0": twos[0]["timeline"] if twos else [],
    }
    _plot(traces, sizes)
    return result


def attrs_free(sizes: Sizes) -> dict[str, int]:
    return dict(sizes.__dict__)


def _plot(traces: dict[str, Trace], sizes: Sizes) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    window = 200
    for name, trace in traces.items():
        n = len(trace.models)
        xs = list(range(window, n + 1, 10))
        fig, ax = plt.subplots(figsize=(9, 4))
        for truth in MODELS:
            ys = [sum(m == truth.model for m in trace.models[x - window : x]) / window for x in xs]
            style = "--" if truth.violates() else "-"
            ax.plot(xs, ys, style, label=f"{truth.model} ({truth.role})")
        ys = [sum(m is None for m in trace.models[x - window : x]) / window for x in xs]
        if any(ys):
            ax.plot(xs, ys, ":", color="black", label="no route (request failed)")
        if name != "stationary":
            ax.axvspan(sizes.degrade_at, sizes.recover_at, color="grey", alpha=0.15)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("request")
        ax.set_ylabel(f"traffic share (last {window})")
        ax.set_title(
            f"Routing quality, {name} scenario (seed 0)\ndashed: truly violating"
            + ("; shaded: oracle's model degraded" if name != "stationary" else ""),
            fontsize=10,
        )
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(RESULTS_DIR / f"routing_quality_{name}.png", dpi=100)
        plt.close(fig)


SCENARIOS = ("stationary", "degradation", "history", "retried")


async def explain_seed(seed: int, scenario: str = "stationary", quick: bool = False) -> str:
    """
    Why one seed's requests after warm-up went where they did, in one scenario: those
    that went to a truly violating model, and those that explored, each grouped by model
    and by the reason their decision gave, with the first and last request of each group
    and the evidence (successes / calls of the current regime) those decisions showed
    for the model (markdown tables).  In the degradation scenarios, also the degraded
    model's own calls while degraded, and how its status changed after it recovered.
    """
    sizes = QUICK if quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="empathy-rq-explain-"))
    schedule: dict[int, float] | None = None
    try:
        if scenario == "stationary":
            trace = await scenario_stationary(seed, sizes, workdir, detail=True)
        else:
            trace = await scenario_degradation(
                seed,
                sizes,
                workdir,
                scenario == "history",
                detail=True,
                retried=scenario == "retried",
            )
            schedule = {sizes.degrade_at: 0.80, sizes.recover_at: BY_ID[DEGRADED].success}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    late = range(sizes.warmup, len(trace.models))
    title = f"{scenario} scenario, seed {seed}"
    parts = [
        _explained(trace, title, late, what, picked)
        for what, picked in (
            ("went to a truly violating model", lambda i: violating(trace, i, schedule)),
            ("explored", lambda i: trace.explore[i]),
        )
    ]
    if schedule is not None:
        degraded = range(sizes.degrade_at, sizes.recover_at)
        parts.append(
            _explained(
                trace,
                title,
                degraded,
                f"went to {DEGRADED} while it was degraded, not to explore",
                lambda i: trace.models[i] == DEGRADED and not trace.explore[i],
            )
        )
        parts.append(_after_recovery(trace, title, sizes.recover_at))
    return "\n\n".join(parts)


def _unrated(text: str) -> str:
    # a reason or a detected change without its success rates, which move with every
    # call ("degraded (success rate 0.988 -> 0.917)" -> "degraded")
    return re.sub(r" \(success rate [^)]*\)", "", text)


def _after_recovery(trace: Trace, title: str, recover_at: int) -> str:
    # each change of the recovered model's status (and detected change) after it
    # recovered, with its share of the requests until the next change
    lines = [
        f"{title}: {DEGRADED}'s status after it recovered at request {recover_at}, and its "
        "share of the requests until the status changed again (success rates left out)",
        "",
        "| from request | status | detected change | requests | its share |",
        "|---|---|---|---|---|",
    ]
    n = len(trace.models)
    spans: list[tuple[int, tuple[str, str | None] | None]] = []
    for i in range(recover_at, n):
        watched = trace.watched[i]
        shown = None if watched is None else (watched[0], _unrated(watched[1] or "") or None)
        if not spans or shown != spans[-1][1]:
            spans.append((i, shown))
    for k, (first, shown) in enumerate(spans[:40]):
        last = spans[k + 1][0] if k + 1 < len(spans) else n
        share = sum(m == DEGRADED for m in trace.models[first:last]) / (last - first)
        status, change = shown if shown is not None else ("-", None)
        lines.append(f"| {first} | {status} | {change or '-'} | {last - first} | {share:.0%} |")
    if len(spans) > 40:
        lines.append(f"| ... | {len(spans) - 40} more changes | | | |")
    return "\n".join(lines)


def _explained(
    trace: Trace, title: str, requests: range, what: str, picked: Callable[[int], bool]
) -> str:
    # one table of `explain_seed`: the ``requests`` that ``picked`` selects
    groups: dict[tuple[str, str], list[int]] = {}
    for i in requests:
        model = trace.models[i]
        if model is not None and picked(i):
            groups.setdefault((model, _unrated(trace.reasons[i] or "")), []).append(i)
    total = sum(len(v) for v in groups.values())
    lines = [
        f"{title}: {total} of the {len(requests)} requests {requests.start}-"
        f"{requests.stop - 1} ({total / max(1, len(requests)):.2%}) {what}",
        "",
        "| model | decision's reason | requests | first | last | its evidence then "
        "(successes / calls, at the first and the last) |",
        "|---|---|---|---|---|---|",
    ]

    def shown(i: int) -> str:
        e = trace.evidence[i]
        return "-" if e is None else f"{e[0]:.0f} / {e[1]}"

    for (model, reason), hits in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(
            f"| {model} | {reason} | {len(hits)} | {hits[0]} | {hits[-1]} | "
            f"{shown(hits[0])}, {shown(hits[-1])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per scenario (default: 5; quick: 1)"
    )
    parser.add_argument(
        "--explain",
        type=int,
        metavar="SEED",
        default=None,
        help="only say why one scenario's requests after warm-up went to violating models "
        "or explored, on this seed (no results written; see --scenario)",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="stationary",
        help="the scenario --explain runs (default: stationary)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(child_main())
        return
    if args.explain is not None:
        print(asyncio.run(explain_seed(args.explain, args.scenario, quick=args.quick)))
        return
    if args.scenario != "stationary":
        parser.error("--scenario goes with --explain")
    write_result(asyncio.run(run(quick=args.quick, seeds=args.seeds)))


if __name__ == "__main__":
    main()
