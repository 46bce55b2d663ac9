"""
Answers whose ``usage`` leaves a count out, and 2xx answers refused as malformed, over
real HTTP against `FakeLLMServer` (``FakeReply(usage=...)`` sends the usage object as
given), both wire formats; the records are read back from a SQLite telemetry file.

A count left out or null is estimated as an answer without any usage has it (the prompt
as the request's estimate, the output from the answer's size) and the count that is
there is kept: the answer is delivered and recorded a success.  A count that is there
but wrong (negative, a string, NaN, a bool) is still a malformed answer.  A 2xx answer
refused as malformed with no usage to read records the request's estimate of the prompt
the provider billed, flagged, as a stream cut off before its usage does.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest

from empathy_models import (
    AllRoutesFailedError,
    Budget,
    CircuitBreaker,
    CircuitState,
    EmpathyLLMExecutor,
    ExecutionContext,
    FallbackPolicy,
    LLMResponse,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
    StreamInterruptedError,
)
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.exceptions import InvalidResponseError
from empathy_models.limits import MemoryQuotaStore
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.testing import FakeLLMServer, FakeReply, ModelBehavior
from tests._usage import INPUT_ESTIMATED, OUTPUT_ESTIMATED, estimate, only_record, spent

pytestmark = pytest.mark.filterwarnings("error")  # an unclosed response would warn

KEY = "test-key-0123"
PROMPT = "word " * 400  # 2,000 bytes
TEXT = "Paris is the capital of France; its river is the Seine."  # 55 bytes, 10 words

Api = Literal["openai", "anthropic"]
MODEL: dict[Api, str] = {"openai": "gpt-partial", "anthropic": "claude-partial"}


def _info(model: str, provider: str) -> ModelInfo:
    return ModelInfo(
        id=model,
        provider=provider,
        tier="cheap",
        input_price_per_mtok=2.0,
        output_price_per_mtok=8.0,
        context_window=128_000,
        max_output_tokens=4096,
    )


INFO: dict[Api, ModelInfo] = {
    "openai": _info(MODEL["openai"], "openai"),
    "anthropic": _info(MODEL["anthropic"], "anthropic"),
}
REGISTRY = ModelRegistry(models=list(INFO.values()), price_version="partial-usage-1")


def output_estimate(text: str) -> int:
    # the documented estimate of output the provider did not count: a quarter of the
    # UTF-8 bytes, rounded up (and at least one token per delta: 10 words, fewer)
    return -(-len(text.encode()) // 4)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    behavior = ModelBehavior(content=TEXT)
    async with FakeLLMServer(
        {MODEL["openai"]: behavior, MODEL["anthropic"]: behavior}, api_key=KEY
    ) as fake:
        yield fake


@pytest.fixture
async def telemetry(tmp_path: Path) -> AsyncIterator[SQLiteTelemetryBackend]:
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        yield backend


@pytest.fixture
def quota() -> MemoryQuotaStore:
    return MemoryQuotaStore()


def executor(
    server: FakeLLMServer,
    api: Api,
    telemetry: SQLiteTelemetryBackend,
    quota: MemoryQuotaStore,
    breaker: CircuitBreaker | None = None,
) -> EmpathyLLMExecutor:
    """Retries allowed (a malformed answer is not retried: it moves on at once)."""
    provider: OpenAIProvider | AnthropicProvider = (
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)
        if api == "openai"
        else AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)
    )
    return EmpathyLLMExecutor(
        [provider],
        registry=REGISTRY,
        telemetry_store=telemetry,
        budgets=[Budget(limit_usd=100)],
        quota_store=quota,
        breaker=breaker,
        retry=RetryPolicy(jitter=False, base_delay=0.0, max_attempts=3),
        fallback=FallbackPolicy(max_routes=1),
    )


def context(api: Api) -> ExecutionContext:
    return ExecutionContext(workflow="w", stage="s", model=MODEL[api], max_tokens=100)


async def answer(ex: EmpathyLLMExecutor, api: Api, mode: str) -> LLMResponse:
    async with ex:
        if mode == "run":
            return await ex.run(PROMPT, context(api))
        async with ex.stream(PROMPT, context(api)) as stream:
            return await stream.get_final_response()


# --------------------------------------------------------------------------- partial usage

# (api, the usage sent, its input count, its output count): None where left out or null
PARTIAL: list[tuple[Api, dict[str, Any], int | None, int | None]] = [
    ("openai", {"prompt_tokens": 12}, 12, None),
    ("openai", {"prompt_tokens": 12, "completion_tokens": None, "total_tokens": 12}, 12, None),
    ("openai", {"completion_tokens": 5}, None, 5),
    ("openai", {"prompt_tokens": None, "completion_tokens": 5}, None, 5),
    ("anthropic", {"input_tokens": 12}, 12, None),
    ("anthropic", {"input_tokens": 12, "output_tokens": None}, 12, None),
    ("anthropic", {"output_tokens": 5}, None, 5),
    ("anthropic", {"input_tokens": None, "output_tokens": 5}, None, 5),
]
PARTIAL_IDS = [
    f"{api}-{'+'.join(f'{k}={v}' for k, v in usage.items())}" for api, usage, _, _ in PARTIAL
]


@pytest.mark.parametrize("mode", ["run", "stream"])
@pytest.mark.parametrize(("api", "usage", "given_in", "given_out"), PARTIAL, ids=PARTIAL_IDS)
async def test_an_answer_missing_a_count_is_delivered_with_that_count_estimated(
    server: FakeLLMServer,
    telemetry: SQLiteTelemetryBackend,
    quota: MemoryQuotaStore,
    api: Api,
    usage: dict[str, Any],
    given_in: int | None,
    given_out: int | None,
    mode: str,
) -> None:
    server.script(MODEL[api], [FakeReply(usage=usage)])
    response = await answer(executor(server, api, telemetry, quota), api, mode)
    # billed and answered: delivered at once, not retried or failed over
    assert response.content == TEXT and server.requests(MODEL[api]) == 1
    record = await only_record(telemetry)
    assert record.outcome is Outcome.SUCCESS and record.error_type is None
    expected_in = estimate(PROMPT) if given_in is None else given_in
    expected_out = output_estimate(TEXT) if given_out is None else given_out
    assert (record.input_tokens, record.output_tokens) == (expected_in, expected_out)
    assert (response.input_tokens, response.output_tokens) == (expected_in, expected_out)
    # the count the answer left out is flagged, a count it gave is not the estimate
    assert record.metadata.get(INPUT_ESTIMATED) is (True if given_in is None else None)
    if given_out is None:
        assert record.metadata[OUTPUT_ESTIMATED] is True
    info = INFO[api]
    assert math.isclose(record.cost_usd, info.cost(expected_in, expected_out))
    assert response.cost_usd == record.cost_usd
    if given_in is None:  # an estimated prompt charges budgets its worst case
        worst = info.cost(4 * estimate(PROMPT), expected_out)
        assert await spent(quota) >= worst * (1 - 1e-9)
    else:  # a reported one what it cost
        assert math.isclose(await spent(quota), record.cost_usd, rel_tol=1e-6)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_answers_missing_a_count_keep_the_circuit_closed(
    server: FakeLLMServer, telemetry: SQLiteTelemetryBackend, quota: MemoryQuotaStore, api: Api
) -> None:
    partial = [usage for given_api, usage, _, _ in PARTIAL if given_api == api]
    server.script(MODEL[api], [FakeReply(usage=usage) for usage in partial * 2])
    breaker = CircuitBreaker(store="memory://")
    async with breaker, executor(server, api, telemetry, quota, breaker) as ex:
        for index in range(len(partial) * 2):
            await (ex.run if index % 2 else _streamed(ex))(PROMPT, context(api))
        status = await breaker.get_status(breaker.key_for(api, MODEL[api]))
    assert server.requests(MODEL[api]) == len(partial) * 2
    assert status.state is CircuitState.CLOSED and status.failure_count == 0
    records = await telemetry.recent(limit=100)
    assert len(records) == len(partial) * 2
    assert {r.outcome for r in records} == {Outcome.SUCCESS}


def _streamed(ex: EmpathyLLMExecutor) -> Any:
    async def stream(prompt: str, ctx: ExecutionContext) -> LLMResponse:
        async with ex.stream(prompt, ctx) as opened:
            return await opened.get_final_response()

    return stream


# --------------------------------------------------------------------------- wrong counts

# (api, the usage sent, what the error says): a count that is there but is no count
WRONG: list[tuple[Api, dict[str, Any], str]] = [
    ("openai", {"prompt_tokens": 12, "completion_tokens": -1}, "completion_tokens"),
    ("openai", {"prompt_tokens": 12, "completion_tokens": "5"}, "completion_tokens"),
    ("openai", {"prompt_tokens": 12, "completion_tokens": math.nan}, "completion_tokens"),
    ("openai", {"prompt_tokens": True, "completion_tokens": 5}, "prompt_tokens"),
    ("openai", {"prompt_tokens": "12"}, "prompt_tokens"),  # beside one left out
    ("openai", {"completion_tokens": False}, "completion_tokens"),
    ("anthropic", {"input_tokens": 12, "output_tokens": -1}, "output_tokens"),
    ("anthropic", {"input_tokens": 12, "output_tokens": "5"}, "output_tokens"),
    ("anthropic", {"input_tokens": math.nan, "output_tokens": 5}, "input_tokens"),
    ("anthropic", {"input_tokens": 12, "output_tokens": True}, "output_tokens"),
    ("anthropic", {"output_tokens": -3}, "output_tokens"),  # beside one left out
    ("anthropic", {"input_tokens": "12"}, "input_tokens"),
]
WRONG_IDS = [f"{api}-{'+'.join(f'{k}={v!r}' for k, v in u.items())}" for api, u, _ in WRONG]


@pytest.mark.parametrize(("api", "usage", "field"), WRONG, ids=WRONG_IDS)
async def test_a_count_that_is_there_but_wrong_is_still_a_malformed_answer(
    server: FakeLLMServer,
    telemetry: SQLiteTelemetryBackend,
    quota: MemoryQuotaStore,
    api: Api,
    usage: dict[str, Any],
    field: str,
) -> None:
    server.script(MODEL[api], [FakeReply(usage=usage)])
    with pytest.raises(AllRoutesFailedError) as caught:
        await answer(executor(server, api, telemetry, quota), api, "run")
    (error,) = caught.value.exceptions
    assert isinstance(error, InvalidResponseError)
    assert re.search(rf"usage\.{field} must be", str(error)), str(error)
    assert server.requests(MODEL[api]) == 1  # malformed: the next route at once
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE
    assert record.error_type == "InvalidResponseError" and record.status_code == 200


@pytest.mark.parametrize(("api", "usage", "field"), WRONG, ids=WRONG_IDS)
async def test_a_streamed_count_that_is_there_but_wrong_is_still_malformed(
    server: FakeLLMServer,
    telemetry: SQLiteTelemetryBackend,
    quota: MemoryQuotaStore,
    api: Api,
    usage: dict[str, Any],
    field: str,
) -> None:
    # OpenAI's usage chunk comes after the text: the stream is cut off then; Anthropic's
    # message_start carries it before any text: the attempt fails before its first delta
    server.script(MODEL[api], [FakeReply(usage=usage)])
    error: BaseException | None
    if api == "openai":
        with pytest.raises(StreamInterruptedError) as interrupted:
            await answer(executor(server, api, telemetry, quota), api, "stream")
        error = interrupted.value.error
    else:
        with pytest.raises(AllRoutesFailedError) as failed:
            await answer(executor(server, api, telemetry, quota), api, "stream")
        (error,) = failed.value.exceptions
    assert isinstance(error, InvalidResponseError)
    assert re.search(rf"usage\.{field} must be", str(error)), str(error)
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE and record.error_type == "InvalidResponseError"


# --------------------------------------------------------------------------- malformed 2xx


@pytest.mark.parametrize(
    "action", ["malformed", "incomplete", "truncated"], ids=["not-json", "no-answer", "cut-off"]
)
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_malformed_2xx_answer_records_the_prompt_it_was_billed_for(
    server: FakeLLMServer,
    telemetry: SQLiteTelemetryBackend,
    quota: MemoryQuotaStore,
    api: Api,
    action: str,
) -> None:
    # a 200 whose body is cut in half (not JSON), JSON without the answer and usage, or
    # a body the connection dropped before its Content-Length: the prompt was sent and
    # accepted, so the provider bills it
    server.script(MODEL[api], [action])
    with pytest.raises(AllRoutesFailedError) as caught:
        await answer(executor(server, api, telemetry, quota), api, "run")
    (error,) = caught.value.exceptions
    assert isinstance(error, InvalidResponseError) and error.status == 200
    assert server.requests(MODEL[api]) == 1
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE
    assert record.error_type == "InvalidResponseError" and record.status_code == 200
    assert (record.input_tokens, record.output_tokens) == (estimate(PROMPT), 0)
    assert record.metadata[INPUT_ESTIMATED] is True
    assert OUTPUT_ESTIMATED not in record.metadata  # nothing was read: no output to count
    info = INFO[api]
    assert math.isclose(record.cost_usd, info.cost(estimate(PROMPT), 0))
    # the prompt's worst case, as budgets reserved it, as for a stream cut off early
    assert await spent(quota) >= info.cost(4 * estimate(PROMPT), 0) * (1 - 1e-9)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_malformed_answer_with_a_partial_usage_records_what_it_reported(
    server: FakeLLMServer, telemetry: SQLiteTelemetryBackend, quota: MemoryQuotaStore, api: Api
) -> None:
    # the answer is refused for a tool call whose arguments are not JSON; the usage it
    # reports (the prompt's count, no output count) is still what the provider billed
    given = {"prompt_tokens": 12} if api == "openai" else {"input_tokens": 12}
    call = {"name": "write", "arguments": '{"text": "cut off'}
    server.script(MODEL[api], [FakeReply(tool_calls=[call], usage=given)])
    with pytest.raises(AllRoutesFailedError) as caught:
        await answer(executor(server, api, telemetry, quota), api, "run")
    (error,) = caught.value.exceptions
    assert isinstance(error, InvalidResponseError)
    record = await only_record(telemetry)
    assert record.outcome is Outcome.FAILURE and record.error_type == "InvalidResponseError"
    assert record.input_tokens == 12
    assert INPUT_ESTIMATED not in record.metadata
    assert math.isclose(await spent(quota), record.cost_usd, rel_tol=1e-6)
