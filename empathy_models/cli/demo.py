"""
``empathy-models demo``: the whole SDK at work against a local fake, no API key needed.

A `FakeLLMServer` on 127.0.0.1 serves seven real model ids in both wire formats
(Anthropic Messages and OpenAI Chat Completions), each with its own latency and
failure rate.  A few thousand calls from four workflow stages (one streamed through
``executor.stream()``) go through `EmpathyLLMExecutor` with an `AdaptiveModelRouter`,
a `CircuitBreaker` and SQLite telemetry.  A third of the way in, every OpenAI-format
model goes down (503) and comes back later.  The summary shows, per workflow and
stage, which models the router chose with their success rates and Wilson bounds,
p50/p95 latencies (and the streamed stage's time to first token), the cost against an
always-premium baseline priced from the registry for the same tokens, and every breaker
transition the listener saw.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from attrs import define, evolve, field, frozen

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    AnthropicProvider,
    BreakerPolicy,
    CircuitBreaker,
    ConfigurationError,
    EmpathyLLMExecutor,
    EmpathyModelsError,
    ExecutionContext,
    LLMResponse,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    OpenAIProvider,
    Outcome,
    RetryPolicy,
    RoutingPolicy,
    state_store_from_url,
    telemetry_from_url,
)
from empathy_models.backends import redact_url
from empathy_models.breaker import BreakerEvent
from empathy_models.records import ModelPerformance
from empathy_models.testing import FakeLLMServer, Latency, ModelBehavior

from ._common import (
    CliError,
    Progress,
    SubParsers,
    add_common,
    ask,
    db_path,
    emit_json,
    fmt_ms,
    fmt_pct,
    fmt_usd,
    number_arg,
    print_table,
    printable,
    run_async,
    secret_in_path,
    sqlite_file,
    sqlite_url,
    stdin_is_terminal,
)

__all__ = ["DemoResult", "cmd_demo", "register", "run_demo"]

_API_KEY = "demo-key-not-a-secret"


@frozen(kw_only=True)
class _Model:
    id: str
    median_ms: float
    failure_rate: float
    output_tokens: tuple[int, int]


# Real ids and list prices from the default registry; behaviour is the fake's.
_MODELS: tuple[_Model, ...] = (
    _Model(id="gpt-4o-mini", median_ms=6, failure_rate=0.12, output_tokens=(80, 220)),
    _Model(id="gpt-4.1-mini", median_ms=9, failure_rate=0.01, output_tokens=(80, 220)),
    _Model(id="claude-haiku-4-5", median_ms=10, failure_rate=0.02, output_tokens=(80, 220)),
    _Model(id="gpt-4.1", median_ms=16, failure_rate=0.06, output_tokens=(300, 700)),
    _Model(id="claude-sonnet-4-5", median_ms=20, failure_rate=0.01, output_tokens=(300, 700)),
    _Model(id="gpt-5", median_ms=28, failure_rate=0.01, output_tokens=(300, 700)),
    _Model(id="claude-opus-4-5", median_ms=32, failure_rate=0.005, output_tokens=(300, 700)),
)


@frozen(kw_only=True)
class _Stage:
    workflow: str
    stage: str
    task_type: str
    weight: float
    prompt_chars: int
    min_success_rate: float
    max_latency_ms: float | None = None
    max_ttft_ms: float | None = None
    streamed: bool = False  # through executor.stream(), with its time to first token


_STAGES: tuple[_Stage, ...] = (
    _Stage(
        workflow="support",
        stage="triage",
        task_type="classify",
        weight=0.45,
        prompt_chars=1_200,
        min_success_rate=0.95,
        max_latency_ms=250.0,
    ),
    _Stage(
        workflow="docs",
        stage="outline",
        task_type="summarize",
        weight=0.30,
        prompt_chars=4_000,
        min_success_rate=0.90,
    ),
    _Stage(
        workflow="docs",
        stage="write",
        task_type="document_code",
        weight=0.25,
        prompt_chars=6_000,
        min_success_rate=0.97,
    ),
    _Stage(
        workflow="chat",
        stage="reply",
        task_type="simple_qa",
        weight=0.20,
        prompt_chars=800,
        min_success_rate=0.95,
        streamed=True,
    ),
)

_OUTAGE_PROVIDER = "openai"

_MAX_CALLS = 1_000_000
"""The most ``--calls`` runs: an hour or more of calls."""
_MAX_CONCURRENCY = 1_000
"""The most ``--concurrency`` keeps in flight (each request one connection)."""

_calls = number_arg(int, minimum=1, maximum=_MAX_CALLS, what="a whole number")
_concurrency = number_arg(int, minimum=1, maximum=_MAX_CONCURRENCY, what="a whole number")


def register(subparsers: SubParsers) -> None:
    """Add the ``demo`` command."""
    demo = subparsers.add_parser(
        "demo",
        help="run thousands of routed, guarded, recorded calls against a local fake (no API key)",
        description=(
            "Start a local fake LLM server (Anthropic and OpenAI wire formats), run calls "
            "through the executor, router, circuit breaker and telemetry, switch the "
            "OpenAI models into an outage midway and back, and summarize. By default the "
            "database is a temporary SQLite file; pass --db to keep it for the other "
            "commands (an existing or non-SQLite database needs --yes or a confirmation)."
        ),
    )
    add_common(
        demo,
        db_help="keep the calls in this SQLite file or backend URL, to explore them with "
        "the other commands (default: a temporary database, removed at the end)",
    )
    demo.add_argument(
        "--calls",
        type=_calls,
        default=3000,
        help=f"requests to run (default 3000, at most {_MAX_CALLS:,})",
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.add_argument(
        "--yes",
        action="store_true",
        help="write the fake traffic into an existing or non-SQLite --db without asking",
    )
    demo.add_argument(
        "--concurrency",
        type=_concurrency,
        default=24,
        help=f"requests in flight (default 24, at most {_MAX_CONCURRENCY:,})",
    )
    demo.set_defaults(func=cmd_demo)


# --------------------------------------------------------------------------- result


@define(kw_only=True)
class _StageTally:
    requests: int = 0
    answered: int = 0
    failed: int = 0
    fallbacks: int = 0
    cost: float = 0.0
    baseline: float = 0.0
    latencies: list[float] = field(factory=list)
    ttfts: list[float] = field(factory=list)
    models: dict[str, int] = field(factory=dict)


@frozen(kw_only=True)
class DemoResult:
    """Everything the demo measured; `to_dict` is what ``--json`` prints."""

    calls: int
    seed: int
    db: str
    """The database written, its password and secret-looking options masked (`redact_url`)."""
    wall_seconds: float
    baseline_model: str
    outage: dict[str, Any]
    stages: list[dict[str, Any]]
    models: list[dict[str, Any]]
    transitions: list[dict[str, Any]]
    breakers: list[dict[str, Any]]
    totals: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "seed": self.seed,
            "db": self.db,
            "wall_seconds": self.wall_seconds,
            "baseline_model": self.baseline_model,
            "outage": self.outage,
            "stages": self.stages,
            "models": self.models,
            "breaker_transitions": self.transitions,
            "breakers": self.breakers,
            "totals": self.totals,
        }


def _nearest_rank(values: Sequence[float], p: float) -> float | None:
    # nearest rank, as the telemetry backends compute their percentiles (the command
    # line reads the public API only, so the formula is written here too)
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(p * len(ordered)))) - 1]


def _stages_with(constraints: Mapping[tuple[str, str], Mapping[str, float | None]]) -> list[_Stage]:
    known = {(s.workflow, s.stage): s for s in _STAGES}
    for key, values in constraints.items():
        if key not in known:
            raise ConfigurationError(
                f"the demo has no stage {key!r}; its stages: {', '.join(map(str, known))}"
            )
        unknown = set(values) - {"min_success_rate", "max_latency_ms", "max_ttft_ms"}
        if unknown:
            raise ConfigurationError(
                f"demo stage constraints are min_success_rate, max_latency_ms and "
                f"max_ttft_ms, got {', '.join(sorted(unknown))}"
            )
    out = []
    for s in _STAGES:
        values = constraints.get((s.workflow, s.stage), {})
        rate = values.get("min_success_rate", s.min_success_rate)
        if rate is None:
            raise ConfigurationError("a demo stage's min_success_rate cannot be None")
        out.append(
            evolve(
                s,
                min_success_rate=rate,
                max_latency_ms=values.get("max_latency_ms", s.max_latency_ms),
                max_ttft_ms=values.get("max_ttft_ms", s.max_ttft_ms),
            )
        )
    return out


def _demo_registry() -> ModelRegistry:
    base = ModelRegistry.default()
    models: list[ModelInfo] = [base.get(m.id) for m in _MODELS]
    return base.replace(models=tuple(models))


# --------------------------------------------------------------------------- the run


def _premium_baseline(registry: ModelRegistry) -> dict[str, ModelInfo]:
    """Per provider, its most expensive premium model: what every call is compared with."""
    return {
        provider: max(
            (m for m in registry.for_tier(ModelTier.PREMIUM) if m.provider == provider),
            key=lambda m: m.price_per_mtok,
        )
        for provider in registry.providers()
    }


def _fake_behaviors() -> dict[str, ModelBehavior]:
    """How the fake server answers each demo model: latency, failures, output size."""
    return {
        m.id: ModelBehavior(
            latency=Latency.lognormal(m.median_ms, 0.35),
            failure_rate=m.failure_rate,
            failures=(500, 503, 529),
            output_tokens=m.output_tokens,
        )
        for m in _MODELS
    }


_EVERY_RECORD = 2**63 - 1
"""A `TelemetryBackend.recent` limit no run reaches: every record of the run."""


def _breaker_policy() -> BreakerPolicy:
    """A breaker quick enough to trip, probe and close within a few-second demo."""
    return BreakerPolicy(
        consecutive_failures=5,
        failure_rate_threshold=0.5,
        minimum_calls=20,
        window_seconds=5.0,
        recovery_seconds=0.1,
        max_recovery_seconds=0.8,
        probe_lease_seconds=5.0,
    )


def _prompts() -> dict[str, str]:
    """Each stage's prompt, ``prompt_chars`` long."""
    return {
        s.stage: ("Please handle this request carefully. " * (s.prompt_chars // 38 + 1))[
            : s.prompt_chars
        ]
        for s in _STAGES
    }


@define(kw_only=True)
class _TransitionLog:
    """The breaker listener: each state change, with the seconds since the demo started."""

    started: float
    entries: list[dict[str, Any]] = field(factory=list)

    def on_event(self, event: BreakerEvent) -> None:
        """Log ``event`` when it is a state change, with a plain reason for probes."""
        if event.new_state is None or event.old_state is None:
            return
        if event.kind.value != "state_changed":
            return
        reason = event.reason
        if event.new_state.value == "half_open":
            reason = "open time elapsed: probing"
        elif event.new_state.value == "closed" and event.old_state.value == "half_open":
            reason = "probe succeeded"
        self.entries.append(
            {
                "at_s": round(time.perf_counter() - self.started, 3),
                "key": event.key,
                "from": event.old_state.value,
                "to": event.new_state.value,
                "reason": reason,
            }
        )


@define(kw_only=True)
class _Traffic:
    """
    The demo's requests, sent by a few concurrent workers through one executor.

    Workers take the next index in turn and draw its stage from ``plan`` (no await
    between reading the index, advancing it and drawing, so each index is sent once and
    the stages come in the seed's order whatever the number of calls, none drawn ahead),
    switch the outage on and off at its indexes, and add what each request did to its
    stage's `_StageTally`.
    """

    calls: int
    plan: Callable[[], _Stage]
    prompts: dict[str, str]
    tallies: dict[tuple[str, str], _StageTally]
    baseline: dict[str, ModelInfo]
    outage: bool
    outage_start: int
    outage_end: int
    outage_log: dict[str, Any]
    started: float
    progress: Progress | None
    next_index: int = 0

    async def run(
        self, server: FakeLLMServer, executor: EmpathyLLMExecutor, concurrency: int
    ) -> None:
        """
        Send every planned request, ``concurrency`` at a time.

        Args:
            server: the fake, whose outage the workers switch.
            executor: what every request goes through.
            concurrency: requests in flight.
        """
        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, self.calls)):
                tg.start_soon(self._worker, server, executor)
        if self.outage_end >= self.calls and server.outages:
            server.set_outage(_OUTAGE_PROVIDER, False)

    async def _worker(self, server: FakeLLMServer, executor: EmpathyLLMExecutor) -> None:
        while self.next_index < self.calls:
            index = self.next_index
            self.next_index += 1
            self._switch_outage(server, index)
            await self._request(executor, self.plan())
            if self.progress is not None:
                self.progress.advance()

    def _switch_outage(self, server: FakeLLMServer, index: int) -> None:
        """Take the outage provider down at ``outage_start``, bring it back at ``outage_end``."""
        if not self.outage:
            return
        if index == self.outage_start:
            server.set_outage(_OUTAGE_PROVIDER, True, action=503)
            self.outage_log["started_at_s"] = round(time.perf_counter() - self.started, 3)
        elif index == self.outage_end:
            server.set_outage(_OUTAGE_PROVIDER, False)
            self.outage_log["ended_at_s"] = round(time.perf_counter() - self.started, 3)

    async def _request(self, executor: EmpathyLLMExecutor, stage: _Stage) -> None:
        """One request of ``stage``, counted in its tally whether it is answered or not."""
        tally = self.tallies[(stage.workflow, stage.stage)]
        tally.requests += 1
        context = ExecutionContext(
            workflow=stage.workflow,
            stage=stage.stage,
            task_type=stage.task_type,
            min_success_rate=stage.min_success_rate,
            max_latency_ms=stage.max_latency_ms,
            max_ttft_ms=stage.max_ttft_ms,
            max_tokens=1024,
            timeout=5.0,
        )
        t0 = time.perf_counter()
        try:
            response: LLMResponse
            if stage.streamed:
                async with executor.stream(self.prompts[stage.stage], context) as stream:
                    async for _ in stream:
                        pass
                    response = await stream.get_final_response()
                if response.ttft_ms is not None:
                    tally.ttfts.append(response.ttft_ms)
            else:
                response = await executor.run(self.prompts[stage.stage], context)
        except (AllRoutesFailedError, EmpathyModelsError):
            tally.failed += 1
        else:
            tally.answered += 1
            tally.latencies.append((time.perf_counter() - t0) * 1000.0)
            tally.cost += response.cost_usd
            tally.baseline += self.baseline[response.provider].cost(
                response.input_tokens, response.output_tokens
            )
            tally.models[response.model] = tally.models.get(response.model, 0) + 1
            if response.fallback_used:
                tally.fallbacks += 1


async def run_demo(
    *,
    calls: int,
    seed: int,
    db_url: str,
    concurrency: int = 24,
    progress: Progress | None = None,
    constraints: Mapping[tuple[str, str], Mapping[str, float | None]] | None = None,
    outage: bool = True,
) -> DemoResult:
    """
    Run the demo against a fresh `FakeLLMServer` and return what it measured.

    ``db_url`` is the SQLite database (telemetry and breaker state) to write.  The
    OpenAI-format models are down (503) from call ``calls * 0.35`` to ``calls * 0.65``.
    ``constraints`` replaces a stage's ``min_success_rate`` / ``max_latency_ms`` /
    ``max_ttft_ms`` (judged on the streamed stage's time to first token), keyed
    by (workflow, stage): the demo run under another policy (what `routing whatif`
    predicts).  ``outage=False`` leaves every model up for the whole run.
    """
    stages = _stages_with(constraints or {})
    rng = random.Random(seed)
    registry = _demo_registry()
    baseline = _premium_baseline(registry)
    outage_start = max(1, int(calls * 0.35))
    outage_end = max(outage_start + 1, int(calls * 0.65))
    started = time.perf_counter()
    transitions = _TransitionLog(started=started)
    cum_weights = list(itertools.accumulate(s.weight for s in stages))
    traffic = _Traffic(
        calls=calls,
        plan=lambda: rng.choices(stages, cum_weights=cum_weights)[0],
        prompts=_prompts(),
        tallies={(s.workflow, s.stage): _StageTally() for s in _STAGES},
        baseline=baseline,
        outage=outage,
        outage_start=outage_start,
        outage_end=outage_end,
        outage_log={"provider": _OUTAGE_PROVIDER, "from_call": outage_start, "to_call": outage_end},
        started=started,
        progress=progress,
    )
    performance, rejected, breakers, wall = await _send_through_the_sdk(
        traffic,
        registry=registry,
        db_url=db_url,
        seed=seed,
        concurrency=concurrency,
        transitions=transitions,
    )
    return _result(
        calls=calls,
        seed=seed,
        db_url=db_url,
        wall=wall,
        baseline_model=", ".join(f"{m.id} for {p} calls" for p, m in sorted(baseline.items())),
        outage=traffic.outage_log,
        tallies=traffic.tallies,
        performance=performance,
        rejected=rejected,
        transitions=transitions.entries,
        states=breakers,
    )


async def _send_through_the_sdk(
    traffic: _Traffic,
    *,
    registry: ModelRegistry,
    db_url: str,
    seed: int,
    concurrency: int,
    transitions: _TransitionLog,
) -> tuple[list[ModelPerformance], int, list[dict[str, Any]], float]:
    """
    Start the fake, telemetry, breaker, router and executor, and send ``traffic``.

    Args:
        traffic: the planned requests, tallied as they are answered.
        registry: the demo's models and prices.
        db_url: the database for telemetry and breaker state.
        seed: seeds the fake, the router and the retry jitter.
        concurrency: requests in flight.
        transitions: the breaker listener.

    Returns:
        What telemetry recorded per model and stage since the start, how many calls an
        open breaker turned away (recorded as ``rejected``, not in the first), every
        breaker key's state, and the seconds since ``traffic.started``.
    """
    # the default number of attempts per route, with waits short enough for the demo
    retry = RetryPolicy(base_delay=0.005, max_delay=0.05, rng=random.Random(seed + 1))
    run_start = datetime.now(UTC)
    async with (
        AsyncExitStack() as stack,
        FakeLLMServer(_fake_behaviors(), api_key=_API_KEY, seed=seed) as server,
        telemetry_from_url(db_url) as telemetry,
        # entered here so that it is closed (after the breaker) however the demo ends
        state_store_from_url(db_url) as store,
        CircuitBreaker(
            store=store, policy=_breaker_policy(), listeners=[transitions.on_event]
        ) as breaker,
    ):
        router = AdaptiveModelRouter(
            registry=registry,
            telemetry_store=telemetry,
            policy=RoutingPolicy(),
            refresh_interval=None,
            seed=seed,
        )
        await stack.enter_async_context(router)
        providers = [
            AnthropicProvider(api_key=_API_KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=_API_KEY, base_url=server.openai_base_url),
        ]
        async with EmpathyLLMExecutor(
            providers=providers,
            registry=registry,
            telemetry_store=telemetry,
            router=router,
            breaker=breaker,
            retry=retry,
        ) as executor:
            await traffic.run(server, executor, concurrency)
        await telemetry.flush()
        performance = await telemetry.aggregate(since=run_start)
        records = await telemetry.recent(since=run_start, limit=_EVERY_RECORD)
        rejected = sum(r.outcome is Outcome.REJECTED for r in records)
        await breaker.flush()
        states = await breaker.snapshot()
        wall = time.perf_counter() - traffic.started
    breakers = [
        {
            "key": s.key,
            "state": s.state.value,
            "trips": s.open_count,
            "consecutive_failures": s.consecutive_failures,
        }
        for s in states
    ]
    return performance, rejected, breakers, wall


def _result(
    *,
    calls: int,
    seed: int,
    db_url: str,
    wall: float,
    baseline_model: str,
    outage: dict[str, Any],
    tallies: dict[tuple[str, str], _StageTally],
    performance: list[ModelPerformance],
    rejected: int,
    transitions: list[dict[str, Any]],
    states: list[dict[str, Any]],
) -> DemoResult:
    """The `DemoResult` of a finished run: its stages, models and totals."""
    total_cost = sum(t.cost for t in tallies.values())
    total_baseline = sum(t.baseline for t in tallies.values())
    totals = {
        "requests": sum(t.requests for t in tallies.values()),
        "answered": sum(t.answered for t in tallies.values()),
        "failed": sum(t.failed for t in tallies.values()),
        "attempts_recorded": sum(p.sample_size for p in performance),
        "breaker_rejections": rejected,
        "cost_usd": total_cost,
        "premium_baseline_usd": total_baseline,
        "saving": (1.0 - total_cost / total_baseline) if total_baseline else None,
        "breaker_transitions": len(transitions),
    }
    return DemoResult(
        calls=calls,
        seed=seed,
        db=redact_url(db_url),
        wall_seconds=round(wall, 3),
        baseline_model=baseline_model,
        outage=outage,
        stages=_stage_rows(tallies),
        models=_model_rows(performance, tallies),
        transitions=transitions,
        breakers=states,
        totals=totals,
    )


def _stage_rows(tallies: dict[tuple[str, str], _StageTally]) -> list[dict[str, Any]]:
    """Each stage's requests end to end, as ``--json`` prints them."""
    stages = []
    streamed = {(s.workflow, s.stage) for s in _STAGES if s.streamed}
    for (workflow, stage), t in tallies.items():
        saving = (1.0 - t.cost / t.baseline) if t.baseline else None
        stages.append(
            {
                "workflow": workflow,
                "stage": stage,
                "streamed": (workflow, stage) in streamed,
                "ttft_p50_ms": _nearest_rank(t.ttfts, 0.50),
                "requests": t.requests,
                "answered": t.answered,
                "failed": t.failed,
                "fallbacks": t.fallbacks,
                "p50_ms": _nearest_rank(t.latencies, 0.50),
                "p95_ms": _nearest_rank(t.latencies, 0.95),
                "cost_usd": t.cost,
                "premium_baseline_usd": t.baseline,
                "saving": saving,
                "answered_by": dict(sorted(t.models.items(), key=lambda kv: -kv[1])),
            }
        )
    return stages


def _model_rows(
    performance: list[ModelPerformance], tallies: dict[tuple[str, str], _StageTally]
) -> list[dict[str, Any]]:
    """Each model's attempts per stage from telemetry, with its share of the answers."""
    models = []
    for p in performance:
        low, high = p.success_rate_bounds
        answered = tallies.get((p.workflow or "", p.stage or ""))
        share = (
            answered.models.get(p.model, 0) / answered.answered
            if answered is not None and answered.answered
            else None
        )
        models.append(
            {
                "workflow": p.workflow,
                "stage": p.stage,
                "model": p.model,
                "provider": p.provider,
                "attempts": p.sample_size,
                "share_of_answers": share,
                "success_rate": p.success_rate,
                "success_rate_lower": low,
                "success_rate_upper": high,
                "p50_ms": p.latency_p50_ms,
                "p95_ms": p.latency_p95_ms,
                "ttft_p50_ms": p.ttft_p50_ms,
                "cost_usd": p.avg_cost_usd * p.sample_size,
            }
        )
    return models


# --------------------------------------------------------------------------- output


def backend_label(url: str) -> str:
    """The engine a backend URL names, for headers: ``SQLite``, ``PostgreSQL``, ..."""
    scheme = url.partition("://")[0].lower()
    return {
        "sqlite": "SQLite",
        "postgres": "PostgreSQL",
        "postgresql": "PostgreSQL",
        "memory": "in-memory",
        "redis": "Redis",
        "rediss": "Redis",
    }.get(scheme, scheme or "unknown")


def _confirm_writing(target: str, why: str, *, assume_yes: bool) -> None:
    """Ask before writing fake traffic into a database that may hold real records."""
    if assume_yes:
        return
    if not stdin_is_terminal():
        raise CliError(
            f"--db {target} {why}: the demo would add fake calls to it; pass --yes to do so, "
            "or choose a new file"
        )
    answer = ask(f"--db {printable(target)} {why}. Write fake demo calls into it? [y/N] ")
    if (answer or "").strip().lower() not in ("y", "yes"):
        raise CliError("demo cancelled; nothing was written")


def _print(
    result: DemoResult, *, kept_db: Path | None, temporary: bool, backend: str = "SQLite"
) -> None:
    """
    The demo's summary as text: the run, two tables, the breaker's transitions, the totals.

    Args:
        result: what the demo measured.
        kept_db: the SQLite file kept for the other commands, if any.
        temporary: the database was a temporary one (removed at the end).
        backend: the telemetry engine's name, for the first table's title.
    """
    _print_run(result)
    print()
    _print_models(result, backend)
    print()
    _print_stages(result)
    print()
    _print_transitions(result)
    _print_totals(result, kept_db=kept_db, temporary=temporary)


def _print_run(result: DemoResult) -> None:
    """What ran: requests, stages, models, seed, and when the outage was."""
    o = result.outage
    requests = "1 request" if result.calls == 1 else f"{result.calls} requests"
    print(
        f"empathy-models demo: {requests}, {len(_STAGES)} workflow stages, "
        f"{len(_MODELS)} models on 2 providers (anthropic + openai wire formats), "
        f"seed {result.seed}"
    )
    if o["from_call"] >= result.calls:  # the run ended before the outage's first request
        are = "is" if result.calls == 1 else "are"
        print(f"outage: none ({requests} {are} too few to stage one)")
        return
    print(
        f"outage: every {o['provider']} model answered 503 from request {o['from_call']} "
        f"to request {o['to_call']}"
        + (
            f" ({o['started_at_s']:.2f}s -> {o['ended_at_s']:.2f}s)"
            if "started_at_s" in o and "ended_at_s" in o
            else ""
        )
    )


def _print_models(result: DemoResult, backend: str) -> None:
    """The table of models chosen per workflow/stage."""
    print_table(
        [
            "workflow",
            "stage",
            "model",
            "attempts",
            "answers",
            "success",
            "95% bounds",
            "p50 ms",
            "p95 ms",
            "cost",
        ],
        [
            (
                m["workflow"],
                m["stage"],
                m["model"],
                m["attempts"],
                fmt_pct(m["share_of_answers"]),
                fmt_pct(m["success_rate"]),
                f"{fmt_pct(m['success_rate_lower'])}-{fmt_pct(m['success_rate_upper'])}",
                fmt_ms(m["p50_ms"]),
                fmt_ms(m["p95_ms"]),
                fmt_usd(m["cost_usd"]),
            )
            for m in result.models
        ],
        title=f"Models chosen per workflow/stage (from {backend} telemetry; attempts include "
        "failures, latencies are of the successful ones)",
    )


def _print_stages(result: DemoResult) -> None:
    """The table of requests end to end per stage, with the always-premium baseline."""
    print_table(
        [
            "workflow",
            "stage",
            "requests",
            "answered",
            "failed",
            "fallbacks",
            "p50 ms",
            "p95 ms",
            "TTFT p50 ms",
            "cost",
            "all-premium",
            "saved",
        ],
        [
            (
                s["workflow"],
                s["stage"] + (" (streamed)" if s["streamed"] else ""),
                s["requests"],
                s["answered"],
                s["failed"],
                s["fallbacks"],
                fmt_ms(s["p50_ms"]),
                fmt_ms(s["p95_ms"]),
                fmt_ms(s["ttft_p50_ms"]),
                fmt_usd(s["cost_usd"]),
                fmt_usd(s["premium_baseline_usd"]),
                fmt_pct(s["saving"]),
            )
            for s in result.stages
        ],
        title="Requests end to end; cost vs always premium "
        f"({result.baseline_model}; same tokens, registry prices)",
    )


def _print_transitions(result: DemoResult) -> None:
    """Every breaker transition the listener saw."""
    print("Breaker transitions (listener events)")
    if not result.transitions:
        print("  (none)")
    key_width = max((len(t["key"]) for t in result.transitions), default=10)
    for t in result.transitions:
        reason = f"  ({t['reason']})" if t["reason"] else ""
        print(
            f"  +{t['at_s']:7.3f}s  {t['key']:<{key_width}} {t['from']:>11} -> "
            f"{t['to']:<11}{reason}"
        )


def _print_totals(result: DemoResult, *, kept_db: Path | None, temporary: bool) -> None:
    """The totals line, and how to keep or explore the database."""
    t = result.totals
    rejected = t["breaker_rejections"]
    turned_away = f" (and {rejected} calls an open breaker turned away)" if rejected else ""
    print()
    print(
        f"Total: {t['requests']} requests, {t['answered']} answered, {t['failed']} failed, "
        f"{t['attempts_recorded']} attempts recorded{turned_away}; cost "
        f"{fmt_usd(t['cost_usd'])} vs "
        f"{fmt_usd(t['premium_baseline_usd'])} always-premium ({fmt_pct(t['saving'])} saved); "
        f"{result.wall_seconds:.1f} s"
    )
    if temporary:
        print()
        print("The database was temporary; pass --db PATH to keep it and explore it afterwards.")
    if kept_db is not None:
        print()
        print(f"Telemetry and breaker state kept in {kept_db}; explore it with:")
        for command in (
            "telemetry summary",
            "routing stats support",
            f"breaker status{_window_options()}",
        ):
            print(f"  empathy-models {command} --db {shlex.quote(str(kept_db))}")


def _window_options() -> str:
    """
    ``breaker status``'s options for the demo breakers' failure-rate window: the store
    keeps each key's window buckets, not the policy that wrote them, so the command
    counts them right only when told the demo's window.
    """
    policy = _breaker_policy()
    return f" --window {policy.window_seconds:g} --buckets {policy.window_buckets}"


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo and print (or ``--json``) its summary."""
    with tempfile.TemporaryDirectory(prefix="empathy-demo-") as tmp:
        if args.db is None:
            path = Path(tmp) / "demo.db"
            kept = None
            url = sqlite_url(path)
        elif "://" in args.db:
            url = args.db
            kept = None
            # a URL the demo's stores cannot use (redis:// holds no telemetry, a typo) is
            # refused before asking (building a store connects nowhere)
            telemetry_from_url(url)
            state_store_from_url(url)
            file = sqlite_file(url)
            if file is not None:  # asked about as a path is: only when it holds something
                if file.exists() and not file.is_dir() and file.stat().st_size > 0:
                    _confirm_writing(redact_url(url), "already exists", assume_yes=args.yes)
            elif backend_label(url) not in ("in-memory", "SQLite"):  # SQLite: in memory
                _confirm_writing(
                    redact_url(url),
                    f"is a {backend_label(url)} database",
                    assume_yes=args.yes,
                )
        else:
            path = db_path(args.db)
            masked = None if path.exists() else secret_in_path(path)
            if masked is not None:  # a URL without its scheme: not a new file, nor echoed
                raise CliError(
                    f"--db {masked}: not a backend URL (it starts with its scheme: "
                    "postgresql://..., redis://...), and no SQLite file of that name exists",
                    2,
                )
            if path.is_dir():
                raise CliError(f"--db {path} is a directory, not a SQLite file")
            if not path.parent.is_dir():
                why = (
                    f"{path.parent} is not a directory"
                    if path.parent.exists()
                    else f"the directory {path.parent} does not exist"
                )
                raise CliError(f"--db {path}: {why}")
            if path.exists() and path.stat().st_size > 0:
                _confirm_writing(str(path), "already exists", assume_yes=args.yes)
            url = sqlite_url(path)
            kept = path
        with Progress(args.calls, "demo") as bar:
            result = run_async(
                lambda: run_demo(
                    calls=args.calls,
                    seed=args.seed,
                    db_url=url,
                    concurrency=args.concurrency,
                    progress=bar,
                )
            )
    if args.json:
        emit_json(result.to_dict())
    else:
        _print(result, kept_db=kept, temporary=args.db is None, backend=backend_label(url))
    sys.stdout.flush()
    return 0
