"""
A stream's two limits over real HTTP (`FakeLLMServer` on 127.0.0.1, the real OpenAI
provider): ``ExecutionContext.timeout`` bounds the first byte and every gap between
chunks (an idle timeout, so a long answer is not cut off), ``deadline`` bounds the whole
stream; each combination, before and after the first delta, and the error naming the
limit that ended the stream.  The waits are short budgets against a slow or stalled
server, with wide margins between a gap and the limit it must not reach.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import attrs
import pytest

from empathy_models import (
    AllRoutesFailedError,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RetryPolicy,
    StreamInterruptedError,
)
from empathy_models.abc import Completion, CompletionRequest, CompletionStream, Provider
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import ProviderTimeoutError
from empathy_models.providers import OpenAIProvider
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior

pytestmark = pytest.mark.filterwarnings("error")  # an unclosed response would warn

KEY = "test-key-0123"
MODEL = "gpt-fake-mini"
WORDS = [f"w{i}" for i in range(12)]
TEXT = " ".join(WORDS)

REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id=MODEL,
            provider="openai",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=5.0,
            context_window=128_000,
            max_output_tokens=16384,
        )
    ],
    price_version="stream-timeouts-1",
)

STEADY = StreamBehavior(chunk_interval_ms=100)  # 12 chunks 0.1 s apart: about 1.1 s in all
STALL_AFTER_TWO = StreamBehavior(fault_after=2, fault="hang")
STALL_BEFORE_FIRST = StreamBehavior(first_chunk_ms=60_000)

IDLE = "no data for"
DEADLINE = "deadline"


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer({MODEL: ModelBehavior(content=TEXT)}, api_key=KEY) as fake:
        yield fake


def executor(server: FakeLLMServer, telemetry: MemoryTelemetryBackend) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
        registry=REGISTRY,
        telemetry_store=telemetry,
        retry=RetryPolicy.none(),
    )


async def read_all(
    server: FakeLLMServer,
    context: ExecutionContext,
    behavior: StreamBehavior,
    telemetry: MemoryTelemetryBackend | None = None,
) -> tuple[str, MemoryTelemetryBackend]:
    server.set_behavior(MODEL, ModelBehavior(content=TEXT, stream=behavior))
    telemetry = MemoryTelemetryBackend() if telemetry is None else telemetry
    async with executor(server, telemetry) as llm:
        with anyio.fail_after(30):
            async with llm.stream("hi", context) as stream:
                async for _ in stream:
                    pass
                response = await stream.get_final_response()
    return response.content, telemetry


@pytest.mark.parametrize(
    ("per_attempt", "deadline"),
    [(0.5, None), (0.5, 30.0), (None, 30.0), (None, None)],
    ids=["timeout only", "timeout and deadline", "deadline only", "neither"],
)
async def test_a_long_stream_whose_chunks_keep_coming_is_not_cut_off(
    server: FakeLLMServer, per_attempt: float | None, deadline: float | None
) -> None:
    # the stream lasts about twice the timeout; no gap comes near it
    context = ExecutionContext(tier="cheap", timeout=per_attempt, deadline=deadline)
    content, telemetry = await read_all(server, context, STEADY)
    assert content == TEXT
    (record,) = await telemetry.recent(limit=10)
    assert record.outcome is Outcome.SUCCESS


@pytest.mark.parametrize(
    ("per_attempt", "deadline", "behavior", "limit"),
    [
        (0.3, None, STALL_AFTER_TWO, IDLE),
        (0.3, 30.0, STALL_AFTER_TWO, IDLE),
        (None, 0.5, STALL_AFTER_TWO, DEADLINE),
        (30.0, 0.5, STEADY, DEADLINE),
        (None, 0.5, STEADY, DEADLINE),
    ],
    ids=[
        "stall, timeout only",
        "stall, timeout and a far deadline",
        "stall, deadline only",
        "steady, a long timeout and a near deadline",
        "steady, deadline only",
    ],
)
async def test_after_the_first_delta_the_error_names_the_limit_that_ended_the_stream(
    server: FakeLLMServer,
    per_attempt: float | None,
    deadline: float | None,
    behavior: StreamBehavior,
    limit: str,
) -> None:
    context = ExecutionContext(tier="cheap", timeout=per_attempt, deadline=deadline)
    with pytest.raises(StreamInterruptedError) as caught:
        await read_all(server, context, behavior)
    error = caught.value.error
    assert isinstance(error, ProviderTimeoutError)
    assert limit in str(error) and limit in str(caught.value)
    if limit == IDLE:
        assert f"no data for {per_attempt:.3f}s (the per-attempt timeout" in str(error)
        assert caught.value.partial_text == "w0 w1"
    else:
        assert "the run's deadline passed" in str(error) and IDLE not in str(error)
        assert 0 < len(caught.value.partial_text) < len(TEXT)


@pytest.mark.parametrize(
    ("per_attempt", "deadline", "limit"),
    [(0.3, None, IDLE), (0.3, 30.0, IDLE), (None, 0.5, DEADLINE), (30.0, 0.5, DEADLINE)],
    ids=["timeout only", "timeout and a far deadline", "deadline only", "a near deadline"],
)
async def test_before_the_first_delta_the_error_names_the_limit_that_ended_the_wait(
    server: FakeLLMServer, per_attempt: float | None, deadline: float | None, limit: str
) -> None:
    context = ExecutionContext(tier="cheap", timeout=per_attempt, deadline=deadline)
    with pytest.raises(AllRoutesFailedError) as caught:
        await read_all(server, context, STALL_BEFORE_FIRST)
    (error,) = caught.value.exceptions
    assert isinstance(error, ProviderTimeoutError) and limit in str(error)
    if limit == DEADLINE:
        assert f"deadline of {deadline}s exceeded" in str(caught.value)
        assert IDLE not in str(error)


@pytest.mark.parametrize(
    ("per_attempt", "deadline", "behavior", "outcome"),
    [
        (0.3, None, STALL_BEFORE_FIRST, Outcome.FAILURE),
        (None, 0.5, STALL_BEFORE_FIRST, Outcome.CANCELLED),
        (30.0, 0.5, STALL_BEFORE_FIRST, Outcome.CANCELLED),
        (0.3, None, STALL_AFTER_TWO, Outcome.FAILURE),
        (30.0, 0.5, STEADY, Outcome.CANCELLED),
    ],
    ids=[
        "no first delta within the timeout",
        "no first delta by the deadline",
        "no first delta by a deadline nearer than the timeout",
        "a stall after the first delta",
        "a steady stream past the deadline",
    ],
)
async def test_a_stream_the_runs_deadline_ended_is_not_recorded_as_the_models_failure(
    server: FakeLLMServer,
    per_attempt: float | None,
    deadline: float | None,
    behavior: StreamBehavior,
    outcome: Outcome,
) -> None:
    """
    The run's deadline is the caller's limit, not the model's: a stream it ended is
    recorded as ``cancelled``, which neither the breaker nor the router counts.  The
    idle timeout running out is the model's failure.
    """
    context = ExecutionContext(tier="cheap", timeout=per_attempt, deadline=deadline)
    telemetry = MemoryTelemetryBackend()
    with pytest.raises((AllRoutesFailedError, StreamInterruptedError)):
        await read_all(server, context, behavior, telemetry)
    (record,) = await telemetry.recent(limit=10)
    assert (record.error_type, record.outcome) == ("ProviderTimeoutError", outcome)


class _GatewayTimeout(Provider):
    """A provider whose server answers every streamed request with an HTTP 408."""

    name = "gateway"

    async def _complete(self, request: CompletionRequest) -> Completion:
        raise AssertionError("only streamed here")

    async def stream(
        self,
        request: CompletionRequest,
        *,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> CompletionStream:
        raise ProviderTimeoutError(
            "gateway HTTP 408: request timeout", provider=self.name, model=request.model, status=408
        )


async def test_a_servers_408_is_not_reported_as_the_per_attempt_timeout() -> None:
    registry = ModelRegistry(
        models=[attrs.evolve(REGISTRY.get(MODEL), id="gateway-model", provider="gateway")],
        price_version="gateway-1",
    )
    context = ExecutionContext(tier="cheap", timeout=30.0)
    async with EmpathyLLMExecutor(
        [_GatewayTimeout()], registry=registry, telemetry_store="null://", retry=RetryPolicy.none()
    ) as llm:
        with pytest.raises(AllRoutesFailedError) as caught:
            async with llm.stream("hi", context):
                pytest.fail("the block must not run")  # pragma: no cover
    (error,) = caught.value.exceptions
    assert isinstance(error, ProviderTimeoutError) and error.status == 408
    assert str(error) == "gateway HTTP 408: request timeout"
