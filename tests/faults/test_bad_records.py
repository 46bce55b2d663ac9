"""
One odd value among 200 calls: through the real executor over real
HTTP on 127.0.0.1, into a real SQLite file and a real PostgreSQL schema.

Odd values the caller gives are refused at the boundary (`ConfigurationError` from
`ExecutionContext`, before any request is sent); odd values a provider hands back are
stored made safe and flagged.  Either way the 199 (or 200) other records are stored.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from empathy_models_postgres import PostgresTelemetryBackend

from empathy_models import (
    AllRoutesFailedError,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    Outcome,
)
from empathy_models.abc import TelemetryBackend
from empathy_models.backends.batching import BatchingTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.exceptions import InvalidResponseError
from empathy_models.providers import AnthropicProvider

from .conftest import POSTGRES_DSN_ENV

KEY = "test-key-0123"
CALLS = 200
ODD = 100  # the call that carries the odd value
REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id="claude-fake-haiku",
            provider="anthropic",
            tier="cheap",
            input_price_per_mtok=0.8,
            output_price_per_mtok=4.0,
            context_window=200_000,
            max_output_tokens=8192,
        )
    ],
    price_version="faults-1",
)


class AnthropicStub:
    """A real HTTP server speaking the Messages API; answer ``ODD`` is ``odd_answer``."""

    def __init__(self) -> None:
        self.requests = 0
        self.odd_answer: dict[str, Any] = {}
        self.url = ""

    async def messages(self, request: web.Request) -> web.Response:
        await request.json()
        self.requests += 1
        answer = {"text": f"answer {self.requests}", "input_tokens": 12, "output_tokens": 5}
        if self.requests == ODD + 1:
            answer.update(self.odd_answer)
        body = {
            "id": f"msg_{self.requests}",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": answer["text"]}],
            "model": "claude-fake-haiku",
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": answer["input_tokens"],
                "output_tokens": answer["output_tokens"],
            },
        }
        # json.dumps escapes a lone surrogate as \\udXXX: the client decodes it back
        return web.Response(text=json.dumps(body), content_type="application/json")


@pytest.fixture
async def stub() -> AsyncIterator[AnthropicStub]:
    server = AnthropicStub()
    app = web.Application()
    app.router.add_post("/v1/messages", server.messages)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Any
) -> AsyncIterator[Callable[[], TelemetryBackend]]:
    if request.param == "sqlite":
        yield lambda: SQLiteTelemetryBackend(tmp_path / "calls.db")
        return
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    if not dsn:
        pytest.skip(f"{POSTGRES_DSN_ENV} is not set; the PostgreSQL fault tests need it")
    schema = f"empathy_fault_{uuid.uuid4().hex[:16]}"
    yield lambda: BatchingTelemetryBackend(PostgresTelemetryBackend(f"{dsn}?schema={schema}"))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _run_calls(
    stub: AnthropicStub,
    telemetry: TelemetryBackend,
    odd_context: Callable[[], ExecutionContext] | None = None,
    record_text: bool = False,
) -> int:
    """200 calls, the 101st with ``odd_context``; returns how many the caller saw refused."""
    refused = 0
    provider = AnthropicProvider(api_key=KEY, base_url=stub.url)
    async with EmpathyLLMExecutor([provider], registry=REGISTRY, telemetry_store=telemetry) as ex:
        for i in range(CALLS):
            try:
                if i == ODD and odd_context is not None:
                    context = odd_context()
                else:
                    context = ExecutionContext(
                        workflow="faults", stage="bad-input", tier="cheap", record_text=record_text
                    )
            except ConfigurationError:
                refused += 1
                continue
            await ex.run(f"question {i}", context)
    return refused


async def _stored(telemetry: TelemetryBackend) -> list[LLMCallRecord]:
    return await telemetry.recent(limit=10_000)


@pytest.mark.parametrize(
    "odd",
    [
        {"workflow": "wf\ud800"},
        {"user_id": "user\udcff"},
        {"metadata": {"x": math.nan}},
        {"workflow": "wf\x00"},
    ],
    ids=["surrogate-workflow", "surrogate-user_id", "nan-metadata", "nul-workflow"],
)
async def test_an_odd_context_is_refused_before_the_request_and_costs_no_other_record(
    stub: AnthropicStub, store: Callable[[], TelemetryBackend], odd: dict[str, Any]
) -> None:
    async with store() as telemetry:
        refused = await _run_calls(stub, telemetry, lambda: ExecutionContext(tier="cheap", **odd))
        stored = await _stored(telemetry)
    print(f"\n{odd!r}: refused {refused}, {len(stored)} of {CALLS - 1} other calls stored")
    assert refused == 1 and stub.requests == CALLS - 1
    assert len(stored) == CALLS - 1


@pytest.mark.parametrize(
    ("answer", "record_text", "field", "check"),
    [
        (
            {"text": "half a pair \ud83d"},
            True,
            "response_text",
            lambda r: r.response_text == "half a pair \\ud83d",
        ),
    ],
    ids=["surrogate-response-record_text"],
)
async def test_an_odd_answer_is_stored_made_safe_and_flagged_with_every_other_record(
    stub: AnthropicStub,
    store: Callable[[], TelemetryBackend],
    answer: dict[str, Any],
    record_text: bool,
    field: str,
    check: Callable[[LLMCallRecord], bool],
) -> None:
    stub.odd_answer = answer
    async with store() as telemetry:
        refused = await _run_calls(stub, telemetry, record_text=record_text)
        stored = await _stored(telemetry)
        failed = getattr(telemetry, "failed", 0)
    flagged = [r for r in stored if "empathy_models.sanitized" in r.metadata]
    print(f"\n{field}: {len(stored)} of {CALLS} stored, {len(flagged)} flagged")
    assert refused == 0 and failed == 0
    assert len(stored) == CALLS
    assert len(flagged) == 1 and flagged[0].metadata["empathy_models.sanitized"] == field
    assert check(flagged[0])


async def test_a_usage_count_no_record_can_hold_fails_its_call_and_costs_no_other_record(
    stub: AnthropicStub, store: Callable[[], TelemetryBackend]
) -> None:
    """2**70 input tokens is no count: that answer is malformed, as a negative count is."""
    stub.odd_answer = {"input_tokens": 2**70}
    async with store() as telemetry:
        with pytest.raises(AllRoutesFailedError) as caught:
            await _run_calls(stub, telemetry)
        stored = await _stored(telemetry)
    assert isinstance(caught.value.exceptions[0], InvalidResponseError)
    assert len(stored) == ODD + 1  # every call up to the odd one, that one as a failure
    assert [r.outcome for r in stored].count(Outcome.FAILURE) == 1
