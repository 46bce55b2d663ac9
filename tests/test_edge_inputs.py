"""
User mistakes at the edges get the project's own errors, naming what was wrong, before
anything is sent or opened.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import attrs
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    BreakerPolicy,
    Budget,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    Message,
    ModelInfo,
    ModelRegistry,
    RetryPolicy,
    RoutingPolicy,
    cache_from_url,
    quota_store_from_url,
    state_store_from_url,
    telemetry_from_url,
)
from empathy_models.abc import CompletionRequest
from empathy_models.auth import AuthStrategy
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.backends.sqlite import SQLiteStateStore
from empathy_models.cache import MemoryResponseCache, SQLiteResponseCache
from empathy_models.cli import main as cli_main
from empathy_models.content import ResponseFormat, Tool, ToolCall
from empathy_models.exceptions import (
    AuthFileError,
    EmpathyModelsError,
    ModelNotFoundError,
    RecordValidationError,
    StateStoreError,
    TelemetryError,
)
from empathy_models.limits import RateLimit, SQLiteQuotaStore
from empathy_models.providers import AnthropicProvider, OpenAIProvider
from empathy_models.records import CandidateEvaluation
from empathy_models.testing import FakeLLMServer

KEY = "test-key-edge-0001"
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
    price_version="edge-1",
)
CHEAP = ExecutionContext(tier="cheap")


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=3) as fake:
        yield fake


def executor_for(server: FakeLLMServer) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)],
        registry=REGISTRY,
        telemetry_store=MemoryTelemetryBackend(),
    )


# --------------------------------------------------------------------------- URLs (item 18)


@pytest.mark.parametrize("url", ["memory://foo", "null://x", "memory://h/p", "null://?a=1"])
def test_memory_and_null_urls_with_anything_after_the_scheme_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="takes no host, path or options"):
        telemetry_from_url(url)
    with pytest.raises(ConfigurationError, match="takes no host, path or options"):
        state_store_from_url(url)


def test_a_repeated_url_option_is_an_error_naming_it(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/x.db?busy_timeout=1&busy_timeout=9"
    with pytest.raises(ConfigurationError, match="'busy_timeout' is given more than once"):
        telemetry_from_url(url)
    with pytest.raises(ConfigurationError, match="'busy_timeout' is given more than once"):
        state_store_from_url(url)
    with pytest.raises(ConfigurationError, match="'read_only' is given more than once"):
        quota_store_from_url(f"sqlite:///{tmp_path}/x.db?read_only=true&read_only=false")
    with pytest.raises(ConfigurationError, match="'busy_timeout' is given more than once"):
        cache_from_url(url)
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("store_type", [SQLiteStateStore, SQLiteQuotaStore])
async def test_the_sqlite_stores_check_the_clock_first_and_raise_state_store_errors(
    tmp_path: Path, store_type: type[SQLiteStateStore] | type[SQLiteQuotaStore]
) -> None:
    # the circuit-state and the quota store open their file alike: the clock is checked
    # before the path, and a file that cannot be used is a StateStoreError naming it
    for path in (tmp_path / "x.db", ""):
        with pytest.raises(ConfigurationError, match="clock must be callable, got 5"):
            store_type(path, clock=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="path must be a non-empty file path"):
        store_type("", clock=lambda: 0.0)
    assert not (tmp_path / "x.db").exists()
    for path, shared in ((":memory:", False), (tmp_path / "x.db", True)):
        kept = store_type(path)
        assert kept.shared is shared
        await kept.aclose()
    (tmp_path / "dir.db").mkdir()
    store = store_type(tmp_path / "dir.db")
    with pytest.raises(StateStoreError, match="directory") as info:
        if isinstance(store, SQLiteStateStore):
            await store.snapshot("k")
        else:
            await store.usages()
    await store.aclose()
    assert info.value.target == str(tmp_path / "dir.db")


# --------------------------------------------------------------------------- prompts (16, 18)


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        (None, "got NoneType"),
        (5, "got int"),
        (b"hi", "got bytes"),
        (bytearray(b"hi"), "got bytearray"),
        ("", "prompt is empty"),
        ("   \n", "prompt is empty"),
        ([Message(role="user", content="")], "prompt is empty"),
    ],
)
async def test_bad_prompts_are_refused_before_anything_is_sent(
    server: FakeLLMServer, prompt: Any, named: str
) -> None:
    async with executor_for(server) as executor:
        with pytest.raises(ConfigurationError, match=named):
            await executor.run(prompt, CHEAP)
        assert (await executor.run("hello", CHEAP)).content  # the executor still works
    assert server.requests() == 1


def test_an_absurd_max_tokens_is_refused_with_the_bound() -> None:
    with pytest.raises(ConfigurationError, match=r"max_tokens must be at most 1,000,000"):
        ExecutionContext(max_tokens=10**30)
    with pytest.raises(RecordValidationError, match=r"max_tokens must be at most 1,000,000"):
        CompletionRequest(model="m", messages="hi", max_tokens=10**30)
    assert ExecutionContext(max_tokens=1_000_000).max_tokens == 1_000_000


# --------------------------------------------------------------------------- files (item 16)


def test_a_nul_byte_in_a_sqlite_path_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="NUL character"):
        telemetry_from_url("sqlite:///%00x.db")
    with pytest.raises(ConfigurationError, match="NUL character"):
        state_store_from_url("sqlite:///%00x.db")


def test_a_deeply_nested_auth_file_is_one_line_from_auth_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "auth_strategy.json"
    file.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AuthFileError, match="nested too deeply"):
        AuthStrategy.load(file)
    assert cli_main(["auth", "status", "--file", str(file)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nested too deeply" in err and "Traceback" not in err


async def test_a_bad_json_row_in_llm_calls_is_a_telemetry_error_and_one_cli_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "calls.db"
    async with telemetry_from_url(f"sqlite:///{db}") as backend:
        await backend.record(
            LLMCallRecord(call_id="c1", provider="p", model="m", outcome="success")
        )
        await backend.record(
            LLMCallRecord(call_id="c2", provider="p", model="m", outcome="success")
        )
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE llm_calls SET metadata = '{oops' WHERE call_id = 'c2'")
    async with telemetry_from_url(f"sqlite:///{db}") as backend:
        with pytest.raises(TelemetryError, match="call_id 'c2' cannot be read"):
            await backend.recent()
    args = ["telemetry", "export", "--format", "jsonl", "--db", str(db)]
    assert await anyio.to_thread.run_sync(cli_main, args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'c2'" in err and "Traceback" not in err


HUGE = 10**400  # a whole number no float holds


def _anything(value: object) -> Any:
    # ``value`` as the type checker lets any argument be (what a user may pass anyway)
    return value


@pytest.mark.parametrize(
    "build",
    [
        lambda: ExecutionContext(max_cost=HUGE),
        lambda: ExecutionContext(timeout=-HUGE),
        lambda: RetryPolicy(base_delay=HUGE),
        lambda: RoutingPolicy(window_days=HUGE),
        lambda: AdaptiveModelRouter(REGISTRY, refresh_interval=HUGE),
        lambda: BreakerPolicy(window_buckets=HUGE),
        lambda: Budget(limit_usd=1.0, window=HUGE),
        lambda: RetryPolicy(retry_on=_anything(None)),
        lambda: RetryPolicy(retry_on=_anything(3.5)),
    ],
    ids=[
        "max_cost",
        "timeout",
        "base_delay",
        "window_days",
        "refresh_interval",
        "window_buckets",
        "budget_window",
        "retry_on-None",
        "retry_on-float",
    ],
)
def test_a_number_no_float_holds_or_a_non_iterable_is_a_configuration_error(
    build: Callable[[], object],
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        build()
    assert "integer of 1329 bits" in str(caught.value) or "retry_on" in str(caught.value)


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(base_delay=1e30, max_delay=0.0, jitter=False),
        RetryPolicy(base_delay=1e-10, multiplier=10.0, max_delay=1e300, jitter=False),
        RetryPolicy(base_delay=1e300, multiplier=1e300, max_delay=1e308, jitter=False),
    ],
)
def test_backoff_stays_a_number_up_to_its_cap_at_any_attempt(policy: RetryPolicy) -> None:
    delays = [policy.backoff(attempt) for attempt in range(1, 500)]
    assert all(0.0 <= d <= policy.max_delay for d in delays)
    assert delays == sorted(delays)
    assert policy.compute_delay(10**6) is not None or policy.max_delay == 0.0


def test_router_arguments_of_the_wrong_kind_are_configuration_errors() -> None:
    router = AdaptiveModelRouter(REGISTRY)
    ids = ["claude-fake-haiku"]
    decide: Any = router.get_best_model  # called with what its signature refuses
    recommend: Any = router.recommend_tier_upgrade
    bad: list[tuple[Callable[[], object], str]] = [
        # one id, not a collection of them: its characters are no model ids
        (lambda: decide("wf", "s", candidates=ids, unavailable=ids[0]), "unavailable"),
        (lambda: decide("wf", "s", candidates=ids, unavailable=5), "unavailable"),
        (lambda: decide("wf", "s", candidates=ids, unavailable=[["x"]]), "unavailable"),
        (lambda: decide("wf", "s", candidates=5), "candidates"),
        (lambda: decide("wf", ["x"], candidates=ids), "stage"),
        (lambda: decide("wf", "s", candidates=ids, max_cost=HUGE), "max_cost"),
        (lambda: decide("wf", "s", candidates=ids, max_tokens=HUGE), "max_tokens"),
        (lambda: recommend("wf", ["x"]), "stage"),
        (lambda: recommend(5, None), "workflow"),
    ]
    for call, name in bad:
        with pytest.raises(ConfigurationError, match=name):
            call()


async def test_routing_stats_of_a_stage_of_the_wrong_kind_is_a_configuration_error() -> None:
    async with AdaptiveModelRouter(REGISTRY, telemetry_store=MemoryTelemetryBackend()) as router:
        stats: Any = router.get_routing_stats  # called with what its signature refuses
        with pytest.raises(ConfigurationError, match="stage"):
            await stats("wf", ["x"])
        with pytest.raises(ConfigurationError, match="workflow"):
            await stats(None)


# --------------------------------------------------------------------------- values shown in errors

GIANT = 10**5000  # past 4,300 digits: ``repr`` and ``str`` refuse it (ValueError)
_MODEL: dict[str, Any] = {
    "id": "m",
    "provider": "p",
    "input_price_per_mtok": 1.0,
    "output_price_per_mtok": 1.0,
    "context_window": 10,
    "max_output_tokens": 10,
}


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: BreakerPolicy(backoff=_anything(GIANT)), ConfigurationError),
        (lambda: RoutingPolicy(relax_order=_anything(GIANT)), ConfigurationError),
        (lambda: RoutingPolicy(relax_order=_anything([GIANT])), ConfigurationError),
        (lambda: ExecutionContext(tier=_anything(GIANT)), ConfigurationError),
        (lambda: ExecutionContext(metadata=_anything(GIANT)), ConfigurationError),
        (lambda: ExecutionContext(metadata=_anything({GIANT: 1})), ConfigurationError),
        (lambda: Budget(limit_usd=1.0, scope=_anything(GIANT)), ConfigurationError),
        (lambda: RetryPolicy(retry_on=_anything([GIANT])), ConfigurationError),
        (lambda: telemetry_from_url(_anything(GIANT)), ConfigurationError),
        (lambda: EmpathyLLMExecutor(_anything([GIANT])), ConfigurationError),
        (lambda: AnthropicProvider(KEY, headers=_anything({"X-Team": GIANT})), ConfigurationError),
        (
            lambda: CompletionRequest(model="m", messages="hi", max_tokens=GIANT),
            RecordValidationError,
        ),
        (lambda: ModelInfo(**_MODEL, tier=_anything(GIANT)), RecordValidationError),
        (lambda: AuthStrategy(subscription_tier=_anything(GIANT)), RecordValidationError),
        (
            lambda: LLMCallRecord(call_id="c", provider="p", model="m", outcome=_anything(GIANT)),
            RecordValidationError,
        ),
        (lambda: REGISTRY.get(_anything(GIANT)), ModelNotFoundError),
        (
            lambda: CandidateEvaluation(model="m", constraints=_anything({GIANT: "eligible"})),
            RecordValidationError,
        ),
    ],
    ids=[
        "BreakerPolicy.backoff",
        "RoutingPolicy.relax_order",
        "RoutingPolicy.relax_order-list",
        "ExecutionContext.tier",
        "ExecutionContext.metadata",
        "ExecutionContext.metadata-key",
        "Budget.scope",
        "RetryPolicy.retry_on",
        "telemetry_from_url",
        "EmpathyLLMExecutor.providers",
        "AnthropicProvider.headers",
        "CompletionRequest.max_tokens",
        "ModelInfo.tier",
        "AuthStrategy.subscription_tier",
        "LLMCallRecord.outcome",
        "ModelRegistry.get",
        "CandidateEvaluation.constraints-key",
    ],
)
def test_an_integer_too_long_to_print_is_shown_by_its_size_in_the_error(
    build: Callable[[], object], error: type[EmpathyModelsError]
) -> None:
    with pytest.raises(error) as caught:
        build()
    message = str(caught.value)
    assert "integer of 16610 bits" in message or "that cannot be shown" in message, message


def test_a_value_is_shown_in_an_error_cut_to_a_few_hundred_characters() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BreakerPolicy(backoff=_anything("x" * 100_000))
    message = str(caught.value)
    assert len(message) < 400 and message.endswith("xxx... (100,000 characters)"), message
    with pytest.raises(ConfigurationError) as caught:
        BreakerPolicy(backoff=_anything("exponentiel"))
    assert str(caught.value).endswith("got 'exponentiel'")  # a short value is shown whole


# --------------------------------------------------------------------------- rate limits


LARGEST_RATE = 2**63 - 1  # the most requests or tokens per minute a limit may name


@pytest.mark.parametrize("field", ["rpm", "tpm"])
@pytest.mark.parametrize("value", [LARGEST_RATE + 1, 10**400], ids=["2**63", "10**400"])
def test_a_rate_limit_past_the_largest_is_refused_naming_the_bound(field: str, value: int) -> None:
    limit: dict[str, Any] = {field: value}
    with pytest.raises(RecordValidationError, match=rf"^{field} must be < 2\*\*63, got "):
        ModelInfo(**_MODEL, tier="cheap", **limit)
    entry = {**_MODEL, "tier": "cheap", **limit}
    with pytest.raises(ConfigurationError, match=rf"models\[0\]\.{field}: {field} must be < 2"):
        ModelRegistry.from_dict({"price_version": "v", "models": [entry]})
    with pytest.raises(ConfigurationError, match=rf"RateLimit\.{field} must be < 2\*\*63"):
        RateLimit(**limit)


async def test_the_largest_rate_limits_leave_calls_unhindered(server: FakeLLMServer) -> None:
    model = REGISTRY.get("claude-fake-haiku")
    registry = REGISTRY.with_models(attrs.evolve(model, rpm=LARGEST_RATE, tpm=LARGEST_RATE))
    largest = RateLimit(
        rpm=LARGEST_RATE,
        tpm=LARGEST_RATE,
        burst_requests=LARGEST_RATE,
        burst_tokens=LARGEST_RATE,
    )
    async with EmpathyLLMExecutor(
        [AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)],
        registry=registry,
        rate_limits={"anthropic": largest},
        telemetry_store=MemoryTelemetryBackend(),
    ) as executor:
        for _ in range(3):
            assert (await executor.run("hello", CHEAP)).content
    assert server.requests() == 3


# --------------------------------------------------------------------------- sizes

LARGEST_SIZE = 2**63 - 1  # the largest byte or entry count, concurrency a size may name


def _sized(kind: str, value: object, tmp_path: Path) -> object:
    anthropic = AnthropicProvider(api_key=KEY, base_url="http://127.0.0.1:1")
    if kind == "openai.max_response_bytes":
        return OpenAIProvider(api_key=KEY, max_response_bytes=_anything(value))
    if kind == "anthropic.max_response_bytes":
        return AnthropicProvider(api_key=KEY, max_response_bytes=_anything(value))
    if kind == "openai.max_stream_bytes":
        return OpenAIProvider(api_key=KEY, max_stream_bytes=_anything(value))
    if kind == "anthropic.max_stream_bytes":
        return AnthropicProvider(api_key=KEY, max_stream_bytes=_anything(value))
    if kind == "concurrency_per_provider":
        return EmpathyLLMExecutor(
            [anthropic], registry=REGISTRY, concurrency_per_provider=_anything(value)
        )
    if kind == "concurrency_per_provider-mapping":
        limits = _anything({"anthropic": value})
        return EmpathyLLMExecutor([anthropic], registry=REGISTRY, concurrency_per_provider=limits)
    cls, field = kind.split(".")
    options = {field: _anything(value)}
    if cls == "memory":
        return MemoryResponseCache(**options)
    return SQLiteResponseCache(tmp_path / "cache.db", **options)


SIZES = [
    "openai.max_response_bytes",
    "anthropic.max_response_bytes",
    "openai.max_stream_bytes",
    "anthropic.max_stream_bytes",
    "concurrency_per_provider",
    "concurrency_per_provider-mapping",
    "memory.max_entries",
    "memory.max_value_bytes",
    "sqlite.max_entries",
    "sqlite.max_value_bytes",
]


@pytest.mark.parametrize("kind", SIZES)
@pytest.mark.parametrize(
    "value", [LARGEST_SIZE + 1, HUGE, GIANT], ids=["2**63", "10**400", "giant"]
)
def test_a_size_past_the_largest_is_refused_naming_the_bound(
    kind: str, value: int, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=r"must be < 2\*\*63, got ") as caught:
        _sized(kind, value, tmp_path)
    if value > 10**30:
        assert "bits" in str(caught.value)  # an absurd integer is shown by its size
    assert not (tmp_path / "cache.db").exists()


@pytest.mark.parametrize("kind", SIZES)
@pytest.mark.parametrize("value", [0, -1, 1.5, True, None])
def test_a_size_that_is_not_a_whole_number_above_0_is_refused(
    kind: str, value: object, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=r"must be an integer >= 1"):
        _sized(kind, value, tmp_path)


async def test_the_largest_sizes_leave_calls_and_the_cache_unhindered(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    provider = AnthropicProvider(
        api_key=KEY,
        base_url=server.anthropic_base_url,
        max_response_bytes=LARGEST_SIZE,
        max_stream_bytes=LARGEST_SIZE,
    )
    cache = SQLiteResponseCache(
        tmp_path / "cache.db", max_entries=LARGEST_SIZE, max_value_bytes=LARGEST_SIZE
    )
    async with (
        cache,
        EmpathyLLMExecutor(  # a cache passed in is borrowed: ours to close
            [provider],
            registry=REGISTRY,
            telemetry_store=MemoryTelemetryBackend(),
            concurrency_per_provider=LARGEST_SIZE,
            cache=cache,
        ) as executor,
    ):
        cached = ExecutionContext(tier="cheap", temperature=0, cache_ttl=600)
        for prompt in ("hello", "again", "hello"):
            assert (await executor.run(prompt, cached)).content
        async with executor.stream("streamed", CHEAP) as stream:
            assert "".join([delta async for delta in stream])
    assert server.requests() == 3  # the third answer came from the cache


# --------------------------------------------------------------------------- JSON integers

# an integer past what a float holds: no JSON decoder reads it as a number, and one past
# 4,300 digits Python's JSON encoder refuses (ValueError) when the body is written
PAST_JSON = [10**400, -(10**400), GIANT]
LARGEST_JSON = int(sys.float_info.max)  # what a float64 holds; 2**64 - 1 and such pass


def _schema_with(number: int) -> dict[str, Any]:
    return {"type": "object", "properties": {"n": {"type": "integer", "maximum": number}}}


def _options_with(option: str, number: int) -> dict[str, Any]:
    if option == "extra_body":
        return {"extra_body": {"metadata": {"deep": [number]}}}
    if option == "response_format":
        return {"response_format": {"name": "answer", "schema": _schema_with(number)}}
    if option == "tools":
        return {"tools": [{"name": "lookup", "parameters": _schema_with(number)}]}
    return {"seed": number}


@pytest.mark.parametrize("option", ["extra_body", "response_format", "tools", "seed"])
@pytest.mark.parametrize("number", PAST_JSON, ids=["10**400", "-10**400", "giant"])
async def test_an_integer_past_json_numbers_is_refused_before_anything_is_sent(
    server: FakeLLMServer, option: str, number: int
) -> None:
    telemetry = MemoryTelemetryBackend()
    executor = EmpathyLLMExecutor(
        [AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)],
        registry=REGISTRY,
        telemetry_store=telemetry,
    )
    async with executor:
        with pytest.raises(ConfigurationError, match=r"integer of \d+ bits") as caught:
            await executor.run("hello", CHEAP, **_options_with(option, number))
        assert "JSON" in str(caught.value) or "seed" in str(caught.value)
        assert (await executor.run("hello", CHEAP)).content  # nothing was held against it
    assert server.requests() == 1
    assert [r.outcome.value for r in await telemetry.recent()] == ["success"]


@pytest.mark.parametrize("number", PAST_JSON, ids=["10**400", "-10**400", "giant"])
def test_an_integer_past_json_numbers_is_refused_by_the_request_values(number: int) -> None:
    with pytest.raises(RecordValidationError, match=r"parameters\.properties\.n\.maximum"):
        Tool(name="lookup", parameters=_schema_with(number))
    with pytest.raises(RecordValidationError, match=r"response_format\.schema\.properties"):
        ResponseFormat(schema=_schema_with(number))
    with pytest.raises(RecordValidationError, match=r"arguments\.n"):
        ToolCall(id="call_1", name="lookup", arguments={"n": number})
    with pytest.raises(RecordValidationError, match=r"extra_body\.x\[0\]"):
        CompletionRequest(model="m", messages="hi", extra_body={"x": [number]})
    with pytest.raises(RecordValidationError, match=r"seed"):
        CompletionRequest(model="m", messages="hi", seed=number)


async def test_the_largest_json_integers_are_sent(server: FakeLLMServer) -> None:
    async with executor_for(server) as executor:
        for number in (LARGEST_JSON, -LARGEST_JSON, 2**64 - 1):
            tools = [{"name": "lookup", "parameters": _schema_with(number)}]
            assert (await executor.run("hello", CHEAP, tools=tools)).content
            assert (await executor.run("hello", CHEAP, extra_body={"x": number})).content
    assert server.requests() == 6


@pytest.mark.parametrize(
    "number", [2**63, -(2**63) - 1, HUGE, GIANT], ids=["2**63", "-2**63-1", "10**400", "giant"]
)
def test_a_metadata_integer_no_store_keeps_is_refused(number: int) -> None:
    with pytest.raises(ConfigurationError, match=r"metadata\['n'\] must be an integer from -2"):
        ExecutionContext(metadata={"n": number})


async def test_the_largest_metadata_integers_are_recorded_as_given(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    metadata = {"top": 2**63 - 1, "bottom": -(2**63), "flag": True}
    async with EmpathyLLMExecutor(
        [AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url)],
        registry=REGISTRY,
        telemetry_store=f"sqlite:///{tmp_path}/calls.db",
    ) as executor:
        await executor.run("hello", ExecutionContext(tier="cheap", metadata=metadata))
    async with telemetry_from_url(f"sqlite:///{tmp_path}/calls.db") as telemetry:
        [record] = await telemetry.recent()
    assert dict(record.metadata) == metadata
