"""
What calls were recorded to cost, not only what their tokens list at: the router's
expected cost (and so ``max_cost``) and the what-if's cost per request follow the
recorded cost of a stage whose prompt is cached (Anthropic reports cache reads and
writes apart from ``input_tokens``; OpenAI counts cached tokens among them, at a
discount) and of failed attempts that were billed (a stream cut off mid-answer).  Real
HTTP against a bare aiohttp server on 127.0.0.1 answering with each API's usage shape,
the real executor, real SQLite files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

from empathy_models import (
    AdaptiveModelRouter,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    NoModelMeetsConstraintsError,
    Outcome,
    telemetry_from_url,
)
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.whatif import evaluate_policy
from tests._serving import anthropic_answering, serving

KEY = "test-key-0123"


def _model(model_id: str, provider: str, cached_input_price: float | None = None) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        provider=provider,
        tier="capable",
        input_price_per_mtok=3.0,
        output_price_per_mtok=15.0,
        context_window=200_000,
        max_output_tokens=8192,
        cached_input_price_per_mtok=cached_input_price,
    )


CLAUDE = _model("claude-cached", "anthropic")
GPT = _model("gpt-cached", "openai", cached_input_price=0.3)
REGISTRY = ModelRegistry(models=[CLAUDE, GPT], price_version="recorded-costs-1")

# a cached system prompt: 200 uncached input tokens, 40,000 read from the cache and
# 2,000 written to it (Anthropic reports both apart from input_tokens), 300 out
ANTHROPIC_USAGE = {
    "input_tokens": 200,
    "output_tokens": 300,
    "cache_read_input_tokens": 40_000,
    "cache_creation_input_tokens": 2_000,
}
CLAUDE_BILLED = CLAUDE.cost(200, 300, cache_read_tokens=40_000, cache_write_tokens=2_000)
# OpenAI: 50,000 prompt tokens of which 48,000 served from its cache, 200 out
OPENAI_USAGE = {
    "prompt_tokens": 50_000,
    "completion_tokens": 200,
    "total_tokens": 50_200,
    "prompt_tokens_details": {"cached_tokens": 48_000},
}
GPT_BILLED = GPT.cost(50_000, 200, cached_input_tokens=48_000)


_anthropic = anthropic_answering(ANTHROPIC_USAGE)


async def _openai(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    return web.json_response(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": OPENAI_USAGE,
        }
    )


async def _record_calls(url: str, provider: Any, model: str, calls: int) -> float:
    """``calls`` runs of ``model`` through the executor into ``url``; one's cost."""
    async with EmpathyLLMExecutor([provider], registry=REGISTRY, telemetry_store=url) as executor:
        for _ in range(calls):
            response = await executor.run(
                "hi", ExecutionContext(workflow="docs", stage="write", model=model)
            )
    return response.cost_usd


@pytest.mark.parametrize(
    ("model", "path", "handler", "billed", "make"),
    [
        (
            "claude-cached",
            "/v1/messages",
            _anthropic,
            CLAUDE_BILLED,
            lambda url: AnthropicProvider(api_key=KEY, base_url=url),
        ),
        (
            "gpt-cached",
            "/v1/chat/completions",
            _openai,
            GPT_BILLED,
            lambda url: OpenAIProvider(api_key=KEY, base_url=f"{url}/v1"),
        ),
    ],
)
async def test_a_cached_prompt_is_costed_at_what_its_calls_were_billed(
    tmp_path: Path,
    model: str,
    path: str,
    handler: Any,
    billed: float,
    make: Callable[[str], Any],
) -> None:
    listed = REGISTRY.get(model)
    plain = listed.cost(*((200, 300) if model == "claude-cached" else (50_000, 200)))
    assert not math.isclose(billed, plain, rel_tol=0.5)  # the cache moves the bill far
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    async with serving(path, handler) as base:
        assert await _record_calls(url, make(base), model, 60) == pytest.approx(billed)
    async with (
        telemetry_from_url(url) as store,
        AdaptiveModelRouter(REGISTRY, store, refresh_interval=None) as router,
    ):
        # the router, started from the store: what a call costs is what they cost
        decision = router.get_best_model("docs", "write", candidates=[model], min_success_rate=0)
        (row,) = decision.candidates
        assert row.expected_cost_usd == pytest.approx(billed, rel=1e-9)
        assert row.cost_basis == "estimate"
        # max_cost holds it to that cost, not to its tokens' list price
        if billed > plain:
            with pytest.raises(NoModelMeetsConstraintsError, match="expected cost"):
                router.get_best_model(
                    "docs", "write", candidates=[model], max_cost=(billed + plain) / 2
                )
        else:
            within = router.get_best_model(
                "docs", "write", candidates=[model], max_cost=(billed + plain) / 2
            )
            assert within.model == model and within.constraints_met
        report = await evaluate_policy(
            store, "docs", "write", registry=REGISTRY, requests=100, replicates=5
        )
    assert report.recorded_cost_per_call == pytest.approx(billed)
    (fit,) = report.models
    assert fit.cost_per_call_usd == pytest.approx(billed)
    assert report.cost_per_request.estimate == pytest.approx(billed, rel=0.1)
    assert report.cost_per_request.covers(billed)


async def test_live_outcomes_and_a_restart_cost_a_call_alike(tmp_path: Path) -> None:
    # the executor's router learns from each call as it ends; a router started later
    # from the store reads the same buckets: the same expected cost either way
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    async with (
        serving("/v1/messages", _anthropic) as base,
        telemetry_from_url(url) as store,
        AdaptiveModelRouter(REGISTRY, store, refresh_interval=None) as live,
        EmpathyLLMExecutor(
            [AnthropicProvider(api_key=KEY, base_url=base)],
            registry=REGISTRY,
            telemetry_store=store,
            router=live,
        ) as executor,
    ):
        for _ in range(30):
            await executor.run(
                "hi", ExecutionContext(workflow="docs", stage="write", model="claude-cached")
            )
        ask: dict[str, Any] = {"candidates": ["claude-cached"], "input_tokens": 200}
        seen_live = live.get_best_model("docs", "write", **ask).candidates[0].expected_cost_usd
        await store.flush()
        async with AdaptiveModelRouter(REGISTRY, store, refresh_interval=None) as restarted:
            seen_after = restarted.get_best_model("docs", "write", **ask)
    assert seen_live == pytest.approx(CLAUDE_BILLED, rel=1e-9)
    assert seen_after.candidates[0].expected_cost_usd == pytest.approx(seen_live, rel=1e-12)


def _stage(
    *, calls: int, ok: Callable[[int], bool], out: Callable[[bool], int], info: ModelInfo
) -> list[LLMCallRecord]:
    """``calls`` attempts of docs/write, one a minute back from now, billed as executed."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return [
        LLMCallRecord(
            provider=info.provider,
            model=info.id,
            outcome=Outcome.SUCCESS if ok(i) else Outcome.FAILURE,
            workflow="docs",
            stage="write",
            timestamp=now - timedelta(minutes=i + 1),
            latency_ms=3000.0 + i,
            input_tokens=20_000,
            output_tokens=out(ok(i)),
            cost_usd=info.cost(20_000, out(ok(i))),
            error_type=None if ok(i) else "StreamInterruptedError",
        )
        for i in range(calls)
    ]


async def test_failed_attempts_that_were_billed_are_charged_what_they_cost(
    tmp_path: Path,
) -> None:
    # 30% of the attempts are streams cut off after 400 of their 500 tokens: billed for
    # their prompt and what they streamed, recorded as failures with that cost
    records = _stage(
        calls=200, ok=lambda i: i % 10 >= 3, out=lambda ok: 500 if ok else 400, info=CLAUDE
    )
    per_attempt = sum(r.cost_usd for r in records) / len(records)
    per_answer = sum(r.cost_usd for r in records) / sum(r.success for r in records)
    async with telemetry_from_url(f"sqlite:///{tmp_path / 'calls.db'}") as store:
        await store.record_many(records)
        report = await evaluate_policy(
            store,
            "docs",
            "write",
            registry=REGISTRY,
            min_success_rate=0.5,
            requests=200,
            replicates=10,
            ipw_limit=0,
        )
        async with AdaptiveModelRouter(REGISTRY, store, refresh_interval=None) as router:
            decision = router.get_best_model(
                "docs", "write", candidates=["claude-cached"], min_success_rate=0.5
            )
    assert report.no_match_share.estimate == 0.0
    assert report.recorded_cost_per_call == pytest.approx(per_attempt)
    assert report.cost_per_request.estimate == pytest.approx(per_attempt, rel=0.02)
    assert report.cost_per_request.covers(per_attempt)
    (fit,) = report.models
    assert fit.success_cost_factor == 1.0  # successes at their list price
    assert fit.failure_cost_factor == pytest.approx(
        CLAUDE.cost(20_000, 400) / CLAUDE.cost(20_000, 500)
    )
    # the router's cost of a call is what an answer costs, the billed failures included
    assert decision.candidates[0].expected_cost_usd == pytest.approx(per_answer, rel=1e-9)


async def test_a_simulated_call_stops_at_max_tokens_as_the_router_costs_it(
    tmp_path: Path,
) -> None:
    # calls that answered 2,000 tokens each, asked again with max_tokens=50
    records = _stage(calls=300, ok=lambda i: True, out=lambda ok: 2_000, info=CLAUDE)
    capped = CLAUDE.cost(20_000, 50)
    async with telemetry_from_url(f"sqlite:///{tmp_path / 'calls.db'}") as store:
        await store.record_many(records)
        report = await evaluate_policy(
            store,
            "docs",
            "write",
            registry=REGISTRY,
            max_tokens=50,
            max_cost=capped * 1.05,
            requests=100,
            replicates=5,
            ipw_limit=0,
        )
    assert report.no_match_share.estimate == 0.0  # the router admits the capped call
    assert report.cost_per_request.estimate == pytest.approx(capped, rel=0.02)
    assert (
        report.cost_per_request.high is not None and report.cost_per_request.high <= capped * 1.05
    )


async def test_calls_recorded_without_a_cost_are_costed_at_list_price() -> None:
    # records never priced (cost 0, as records written by hand): the list price, not $0
    records = _stage(calls=50, ok=lambda i: True, out=lambda ok: 300, info=CLAUDE)
    unpriced = [attrs.evolve(r, cost_usd=0.0) for r in records]
    async with (
        telemetry_from_url("memory://") as store,
        AdaptiveModelRouter(REGISTRY, store, refresh_interval=None) as router,
    ):
        await store.record_many(unpriced)
        await router.refresh()
        decision = router.get_best_model("docs", "write", candidates=["claude-cached"])
    assert decision.candidates[0].expected_cost_usd == pytest.approx(CLAUDE.cost(20_000, 300))


async def test_a_cost_too_large_to_add_up_counts_alike_live_and_after_a_restart() -> None:
    # a recorded cost counts for at most 1e300 in the store's evidence (1.7e308 is a
    # valid number; two would overflow a sum): the outcomes reported live count alike,
    # so a router learning live judges the model as one started over the store, which
    # holds it far over max_cost (live, the sums overflowed and the model was costed at
    # its list price, within $1)
    records = _stage(calls=50, ok=lambda i: True, out=lambda ok: 300, info=CLAUDE)
    absurd = [attrs.evolve(r, cost_usd=1.7e308) for r in records]
    ask: dict[str, Any] = {"candidates": ["claude-cached"], "input_tokens": 20_000}
    live = AdaptiveModelRouter(REGISTRY)
    for record in absurd:
        live.record_outcome(record)
    async with telemetry_from_url("memory://") as store:
        await store.record_many(absurd)
        async with AdaptiveModelRouter(REGISTRY, store, refresh_interval=None) as restarted:
            after = restarted.get_best_model("docs", "write", **ask).candidates[0]
            seen = live.get_best_model("docs", "write", **ask).candidates[0]
            assert seen.expected_cost_usd == pytest.approx(after.expected_cost_usd, rel=1e-9)
            for router in (live, restarted):
                with pytest.raises(NoModelMeetsConstraintsError, match="expected cost"):
                    router.get_best_model("docs", "write", max_cost=1.0, **ask)


def test_calls_recorded_at_a_cost_no_factor_holds_are_not_costed_at_list_price() -> None:
    # a local model at $0.001 per million tokens whose one-token calls were recorded at
    # $1e300 each: what they cost over their list price (5e308) is past a float, and
    # that must not make the model as cheap as its list price (within $1)
    local = ModelInfo(
        id="local",
        provider="ollama",
        tier="cheap",
        input_price_per_mtok=0.001,
        output_price_per_mtok=0.001,
        context_window=8192,
        max_output_tokens=8192,
    )
    registry = ModelRegistry(models=[local], price_version="local-1")
    router = AdaptiveModelRouter(registry)
    now = datetime.now(UTC)
    for i in range(30):
        router.record_outcome(
            LLMCallRecord(
                provider="ollama",
                model="local",
                outcome=Outcome.SUCCESS,
                workflow="docs",
                stage="write",
                timestamp=now - timedelta(seconds=i),
                latency_ms=100.0,
                input_tokens=1,
                output_tokens=1,
                cost_usd=1e300,
            )
        )
    ask: dict[str, Any] = {"candidates": ["local"], "input_tokens": 1}
    (row,) = router.get_best_model("docs", "write", **ask).candidates
    assert row.expected_cost_usd is not None and row.expected_cost_usd >= 1e290
    with pytest.raises(NoModelMeetsConstraintsError, match="expected cost"):
        router.get_best_model("docs", "write", max_cost=1.0, **ask)
