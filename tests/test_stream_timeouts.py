"""
A stream's two limits over real HTTP (`FakeLLMServer` on 127.0.0.1, the real OpenAI
provider): ``ExecutionContext.timeout`` bounds the first byte and every gap between
chunks (an idle timeout, so a long answer is not cut off), ``deadline`` bounds the whole
stream; each combination, before and after the first delta, and the error naming the
limit that ended the stream.  The waits are short budgets against a slow or stalled
server, with wide margins between a gap and the limit it must not reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import attrs
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

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
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.testing import FakeClock, FakeLLMServer, ModelBehavior, StreamBehavior
from tests._serving import serving

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

# a stream that must open before a limit runs out has 2 s or more: a busy machine's
# connect and first chunk stay well inside that
STEADY = StreamBehavior(chunk_interval_ms=250)  # 12 chunks 0.25 s apart: about 2.75 s in all
SLOW_STEADY = StreamBehavior(chunk_interval_ms=500)  # about 5.5 s: past a 3 s deadline
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
    [(2.0, None), (2.0, 30.0), (None, 30.0), (None, None)],
    ids=["timeout only", "timeout and deadline", "deadline only", "neither"],
)
async def test_a_long_stream_whose_chunks_keep_coming_is_not_cut_off(
    server: FakeLLMServer, per_attempt: float | None, deadline: float | None
) -> None:
    # the stream lasts longer than the timeout; no gap comes near it
    context = ExecutionContext(tier="cheap", timeout=per_attempt, deadline=deadline)
    content, telemetry = await read_all(server, context, STEADY)
    assert content == TEXT
    (record,) = await telemetry.recent(limit=10)
    assert record.outcome is Outcome.SUCCESS


@pytest.mark.parametrize(
    ("per_attempt", "deadline", "behavior", "limit"),
    [
        (2.0, None, STALL_AFTER_TWO, IDLE),
        (2.0, 30.0, STALL_AFTER_TWO, IDLE),
        (None, 3.0, STALL_AFTER_TWO, DEADLINE),
        (30.0, 3.0, SLOW_STEADY, DEADLINE),
        (None, 3.0, SLOW_STEADY, DEADLINE),
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
    assert caught.value.__cause__ is error  # the one underlying error, as documented
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


class _SilentResolver(AbstractResolver):
    """A DNS resolver that never answers: no connection can be made (as to a host whose
    packets are dropped), until `release`."""

    def __init__(self) -> None:
        self.released = asyncio.Event()

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[Any]:
        await self.released.wait()
        raise OSError(f"{host} was not resolved")

    async def close(self) -> None:
        self.released.set()


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_the_timeout_bounds_a_streams_wait_for_a_connection(api: str) -> None:
    resolver = _SilentResolver()
    base_url = "http://llm.invalid/v1" if api == "openai" else "http://llm.invalid"
    provider = (OpenAIProvider if api == "openai" else AnthropicProvider)(
        api_key=KEY, base_url=base_url
    )
    model = MODEL if api == "openai" else "claude-fake-haiku"
    registry = ModelRegistry(
        models=[attrs.evolve(REGISTRY.get(MODEL), id=model, provider=api)],
        price_version="stream-timeouts-1",
    )
    telemetry = MemoryTelemetryBackend()
    context = ExecutionContext(model=model, timeout=0.3)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) as session,
        EmpathyLLMExecutor(
            [provider],
            registry=registry,
            telemetry_store=telemetry,
            retry=RetryPolicy.none(),
            session=session,
        ) as llm,
    ):
        with anyio.fail_after(30), pytest.raises(AllRoutesFailedError) as caught:
            async with llm.stream("hi", context) as stream:
                async for _ in stream:
                    pass
        await resolver.close()
    (error,) = caught.value.exceptions
    assert isinstance(error, ProviderTimeoutError) and IDLE in str(error)
    (record,) = await telemetry.recent(limit=10)
    assert record.outcome is Outcome.FAILURE and record.error_type == "ProviderTimeoutError"


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


def _openai_answer() -> list[bytes]:
    def chunk(delta: dict[str, str], reason: str | None = None) -> dict[str, object]:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}

    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    events: list[object] = [
        chunk({"content": "Hello"}),
        chunk({"content": " world"}),
        chunk({}, "stop"),
        {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage},
    ]
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def _anthropic_answer() -> list[bytes]:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
    events: list[dict[str, object]] = [
        {"type": "message_start", "message": {**message, "usage": {"input_tokens": 5}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Hello"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": " world"},
        },
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 2},
        },
        {"type": "message_stop"},
    ]
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_an_answer_is_complete_at_its_end_marker_though_the_body_stays_open(
    api: str,
) -> None:
    # a proxy that keeps the response open after [DONE] / message_stop: the answer is
    # whole, so the idle timeout that runs out while the body stays open is no failure
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in _openai_answer() if api == "openai" else _anthropic_answer():
            await response.write(event)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 10)  # open until the client is done
        with contextlib.suppress(ConnectionError):  # the client may have closed it
            await response.write_eof()
        return response

    registry = ModelRegistry(
        models=[
            REGISTRY.get(MODEL),
            attrs.evolve(REGISTRY.get(MODEL), id="claude-fake", provider="anthropic"),
        ],
        price_version="stream-timeouts-2",
    )
    model = MODEL if api == "openai" else "claude-fake"
    telemetry = MemoryTelemetryBackend()
    async with serving("/{tail:.*}", handler) as url:
        llm = EmpathyLLMExecutor(
            [
                OpenAIProvider(api_key=KEY, base_url=f"{url}/v1"),
                AnthropicProvider(api_key=KEY, base_url=url),
            ],
            registry=registry,
            telemetry_store=telemetry,
            retry=RetryPolicy.none(),
        )
        try:
            async with llm, llm.stream("hi", ExecutionContext(model=model, timeout=0.2)) as stream:
                response = await stream.get_final_response()
        finally:
            done.set()
    assert (response.content, response.input_tokens, response.output_tokens) == (
        "Hello world",
        5,
        2,
    )
    (record,) = await telemetry.recent(limit=5)
    assert record.outcome is Outcome.SUCCESS and record.error_type is None


async def _whole_answer_at_once(request: web.Request) -> web.StreamResponse:
    """The whole OpenAI answer in one write: read whole by the second delta."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"".join(_openai_answer()))
    await response.write_eof()
    return response


def _fake_clocked(url: str, clock: FakeClock, telemetry: MemoryTelemetryBackend) -> Any:
    return EmpathyLLMExecutor(
        [OpenAIProvider(api_key=KEY, base_url=f"{url}/v1")],
        registry=REGISTRY,
        telemetry_store=telemetry,
        retry=RetryPolicy.none(),
        clock=clock,
    )


async def test_a_slow_readers_time_after_the_answer_arrived_is_not_the_models_latency() -> None:
    # the executor's clock moves only while the caller reads: a minute after each delta
    # from the second on, by when the whole answer had been read (it came in one piece)
    clock, telemetry = FakeClock(1000.0), MemoryTelemetryBackend()
    async with serving("/v1/chat/completions", _whole_answer_at_once) as url:
        llm = _fake_clocked(url, clock, telemetry)
        async with llm, llm.stream("hi", ExecutionContext(model=MODEL)) as stream:
            async for _ in stream:
                if stream.text != "Hello":
                    clock.advance(60.0)
            response = await stream.get_final_response()
    (record,) = await telemetry.recent(limit=5)
    assert record.outcome is Outcome.SUCCESS and response.content == "Hello world"
    assert record.latency_ms < 60_000 and response.latency_ms < 60_000


async def test_the_deadline_bounds_the_callers_reading_of_pieces_already_read() -> None:
    clock, telemetry = FakeClock(1000.0), MemoryTelemetryBackend()
    async with serving("/v1/chat/completions", _whole_answer_at_once) as url:
        llm = _fake_clocked(url, clock, telemetry)
        async with llm:
            with pytest.raises(StreamInterruptedError) as caught:
                context = ExecutionContext(model=MODEL, deadline=30.0)
                async with llm.stream("hi", context) as stream:
                    async for _ in stream:
                        clock.advance(60.0)  # past the deadline after the first delta
    assert DEADLINE in str(caught.value)
    assert caught.value.partial_text == "Hello"
    (record,) = await telemetry.recent(limit=5)
    assert record.error_type == "ProviderTimeoutError"


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_the_providers_own_read_timeout_bounds_a_stream_given_no_idle_timeout(
    server: FakeLLMServer, api: str
) -> None:
    # a provider built with a read timeout and no total (a long answer may take minutes,
    # a silent server may not) times out a stalled stream as it does a whole answer
    server.set_behavior(MODEL, ModelBehavior(content=TEXT, stream=STALL_AFTER_TWO))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=2.0)
    provider = (
        OpenAIProvider(api_key=KEY, base_url=server.openai_base_url, timeout=timeout)
        if api == "openai"
        else AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url, timeout=timeout)
    )
    text = ""
    async with provider:
        stream = await provider.stream(CompletionRequest(model=MODEL, messages="hi"))
        with anyio.fail_after(10), pytest.raises(ProviderTimeoutError, match=IDLE):
            async for piece in stream:
                text += str(piece)
    assert text == "w0 w1"  # what came before the stall


@pytest.mark.parametrize(
    ("behavior", "raised"),
    [(STALL_BEFORE_FIRST, AllRoutesFailedError), (STALL_AFTER_TWO, StreamInterruptedError)],
    ids=["before the first delta", "after it"],
)
@pytest.mark.parametrize(
    "own",
    [2.0, aiohttp.ClientTimeout(total=None, sock_read=2.0)],
    ids=["a total timeout", "a read timeout"],
)
async def test_a_providers_own_timeout_shorter_than_the_runs_bounds_a_stream(
    server: FakeLLMServer,
    behavior: StreamBehavior,
    raised: type[Exception],
    own: float | aiohttp.ClientTimeout,
) -> None:
    # the provider's own timeout applies to a stream as it does to run(): the run's
    # longer timeout (30 s) used to replace it, so a stalled stream waited the 30 s
    server.set_behavior(MODEL, ModelBehavior(content=TEXT, stream=behavior))
    telemetry = MemoryTelemetryBackend()
    provider = OpenAIProvider(api_key=KEY, base_url=server.openai_base_url, timeout=own)
    context = ExecutionContext(tier="cheap", timeout=30.0)
    async with EmpathyLLMExecutor(
        [provider], registry=REGISTRY, telemetry_store=telemetry, retry=RetryPolicy.none()
    ) as llm:
        with anyio.fail_after(10), pytest.raises(raised) as caught:
            async with llm.stream("hi", context) as stream:
                async for _ in stream:
                    pass
    failure = caught.value
    error: object
    if isinstance(failure, AllRoutesFailedError):
        (error,) = failure.exceptions
    else:
        assert isinstance(failure, StreamInterruptedError)
        error = failure.error
    assert isinstance(error, ProviderTimeoutError)
    # the error names the limit that ran out, not the run's timeout
    assert "no data for 2.000s (the provider's own timeout" in str(error)
    assert "per-attempt" not in str(failure)
    (record,) = await telemetry.recent(limit=10)
    assert (record.error_type, record.outcome) == ("ProviderTimeoutError", Outcome.FAILURE)
