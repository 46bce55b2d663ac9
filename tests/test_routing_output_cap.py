"""
The router holds ``max_cost`` against the output a call may be billed: the cap the
request sends, which ``extra_body`` may raise above the context's ``max_tokens`` (or
lift with ``null``), bounded by each model's own ``max_output_tokens``.  Real HTTP
against `FakeLLMServer` on 127.0.0.1, which answers with as many tokens as the cap
allows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
    ModelTier,
)
from empathy_models.testing import FakeLLMServer, ModelBehavior

from ._fakes import KEY, http_executor

pytestmark = pytest.mark.filterwarnings("error")

# a prompt of 4,000 bytes: the executor's estimate is 1,004 input tokens
PROMPT = "Summarize the ledger entry. " * 142 + "Done"
LONG_ANSWER = 4000
MAX_COST = 0.025
# cheap input, dear output: $0.001 of input, $0.001 for 100 output tokens, $0.04 for 4,000
TERSE = ModelInfo(
    id="gpt-terse",
    provider="openai",
    tier="cheap",
    input_price_per_mtok=1.0,
    output_price_per_mtok=10.0,
    context_window=128_000,
    max_output_tokens=16_384,
)
# dear input, cheap output: $0.005 of input, $0.004 for 4,000 output tokens, $0.016 for
# 16,384 (its longest)
WORDY = ModelInfo(
    id="gpt-wordy",
    provider="openai",
    tier="cheap",
    input_price_per_mtok=5.0,
    output_price_per_mtok=1.0,
    context_window=128_000,
    max_output_tokens=16_384,
)
REGISTRY = ModelRegistry(models=[TERSE, WORDY], price_version="output-cap-1")


@pytest.fixture
async def verbose() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(default=ModelBehavior(output_tokens=LONG_ANSWER), api_key=KEY) as fake:
        yield fake


def context() -> ExecutionContext:
    # nothing measured yet: each model is costed on its worst case, the output cap
    return ExecutionContext(
        tier=ModelTier.CHEAP, max_tokens=100, max_cost=MAX_COST, min_success_rate=0.0, timeout=5.0
    )


async def test_with_the_context_cap_the_cheaper_model_fits_max_cost(
    verbose: FakeLLMServer,
) -> None:
    # the baseline: at 100 output tokens the terse model is the cheaper and within max_cost
    router = AdaptiveModelRouter(REGISTRY, refresh_interval=None, seed=1)
    async with http_executor(verbose, REGISTRY, router=router) as executor:
        answer = await executor.run(PROMPT, context())
    assert answer.model == TERSE.id
    assert answer.cost_usd <= MAX_COST


@pytest.mark.parametrize(
    "extra_body",
    [
        {"max_completion_tokens": LONG_ANSWER},
        {"max_tokens": LONG_ANSWER},
        # null: no cap of the request's own, so each model's longest output
        {"max_tokens": None},
    ],
)
async def test_max_cost_is_judged_on_the_output_cap_extra_body_sends(
    verbose: FakeLLMServer, extra_body: dict[str, Any]
) -> None:
    router = AdaptiveModelRouter(REGISTRY, refresh_interval=None, seed=1)
    async with http_executor(verbose, REGISTRY, router=router) as executor:
        answer = await executor.run(PROMPT, context(), extra_body=extra_body)
    # the terse model may write 4,000 tokens or more ($0.04): over max_cost, not chosen
    assert answer.model == WORDY.id, answer.routing_decision
    assert answer.output_tokens == LONG_ANSWER
    assert answer.cost_usd <= MAX_COST
    decision = answer.routing_decision
    assert decision is not None and decision.constraints_met
    (terse,) = [c for c in decision.candidates if c.model == TERSE.id]
    assert terse.cost_basis == "worst_case"
    assert terse.expected_cost_usd is not None and terse.expected_cost_usd > MAX_COST
