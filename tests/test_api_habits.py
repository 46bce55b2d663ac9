"""
Habits a newcomer brings: OpenAI-style message dicts and a system role, counts named
for what they count, and logs that tell what the executor did.  Real HTTP to
`FakeLLMServer` through the real providers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

import empathy_models
from empathy_models import (
    AnthropicProvider,
    ConfigurationError,
    ConfigurationWarning,
    EmpathyLLMExecutor,
    ExecutionContext,
    Message,
    MissingAPIKeyWarning,
    OpenAIProvider,
    RetryPolicy,
    TelemetryDisabledWarning,
)
from empathy_models.abc import CompletionRequest
from empathy_models.exceptions import RecordValidationError
from empathy_models.testing import FakeLLMServer

from ._fakes import CHEAP_ONLY, KEY, NoSleep

REGISTRY = CHEAP_ONLY
CHEAP = ExecutionContext(workflow="docs", stage="draft", tier="cheap")


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=5) as fake:
        yield fake


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    options.setdefault("retry", RetryPolicy(jitter=False))
    return EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        registry=REGISTRY,
        telemetry_store="null://",
        sleep=options.pop("sleep", NoSleep()),
        **options,
    )


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("model", "api"), [("claude-fake-haiku", "anthropic"), ("gpt-fake-mini", "openai")]
)
async def test_openai_style_dicts_and_a_system_role_reach_each_wire_format(
    server: FakeLLMServer, model: str, api: str
) -> None:
    prompt: list[Message | dict[str, str]] = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        Message(role="assistant", content="Bonjour"),
        {"role": "user", "content": "How are you?"},
    ]
    ctx = ExecutionContext(workflow="docs", stage="draft", model=model, system="Be brief.")
    async with make(server) as executor:
        response = await executor.run(prompt, ctx)
    assert response.model == model
    sent = server.last_request(model)
    assert sent is not None and sent.api == api
    roles = [m["role"] for m in sent.body["messages"]]
    if api == "anthropic":
        assert sent.body["system"] == "Be brief.\n\nAnswer in French."
        assert roles == ["user", "assistant", "user"]
    else:
        assert sent.body["messages"][0] == {
            "role": "system",
            "content": "Be brief.\n\nAnswer in French.",
        }
        assert roles == ["system", "user", "assistant", "user"]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([{"role": "robot", "content": "x"}], "messages[0]: Message.role must be one of"),
        ([{"role": "tool", "content": "x"}], "messages[0]: a tool message needs tool_call_id"),
        ([{"role": "user"}], "messages[0] must have the keys 'role' and 'content'"),
        (
            [{"role": "user", "content": "hi", "name": "bob"}],
            "unsupported name",
        ),
        (
            [{"role": "user", "content": [{"type": "text"}]}],
            "content must be a string or a list of content blocks",
        ),
        ([{"role": "system", "content": "only a system prompt"}], "at least one user"),
        (["hello"], "messages[0] must be a Message or a"),
        ([], "at least one user or assistant message"),
        ({"role": "user", "content": "hi"}, "prompt must be a string or a non-empty list"),
    ],
)
async def test_malformed_messages_raise_configuration_errors_naming_the_problem(
    server: FakeLLMServer, prompt: Any, expected: str
) -> None:
    async with make(server) as executor:
        with pytest.raises(ConfigurationError) as raised:
            await executor.run(prompt, CHEAP)
    assert expected in str(raised.value)
    assert "Attribute(" not in str(raised.value)
    assert server.requests() == 0


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"temperature": 0}, "executor.run(prompt, ExecutionContext(temperature=0, ...))"),
        (
            {"max_tokens": 50, "model": "gpt-fake-mini"},
            "ExecutionContext(max_tokens=50, model='gpt-fake-mini', ...)",
        ),
        ({"frequency_penalty": 0.5}, "extra_body={'frequency_penalty': ...}"),
        ({"tool": []}, "did you mean tools=?"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "pass the messages as the prompt"),
        ({"api_key": f"sk-{KEY}"}, "give it to the provider"),
        ({"extra_headers": {"X-Team": "docs"}}, "OpenAIProvider(headers={...})"),
    ],
)
async def test_an_option_run_does_not_take_says_where_it_goes(
    server: FakeLLMServer, options: dict[str, Any], expected: str
) -> None:
    # each error says where the option goes, before anything is sent
    async with make(server) as executor:
        with pytest.raises(TypeError) as raised:
            await executor.run("hello", CHEAP, **options)
        with pytest.raises(TypeError) as streamed:
            executor.stream("hello", CHEAP, **options)
        assert (await executor.run("hello", CHEAP, seed=3)).content
    assert expected in str(raised.value)
    assert expected.replace("executor.run(", "executor.stream(") in str(streamed.value)
    assert KEY not in str(raised.value)
    assert server.requests() == 1


@pytest.mark.parametrize("name", ["openai_api_key", "anthropic_api_key", "apikey", "auth_token"])
async def test_a_credential_given_to_run_is_pointed_to_the_provider_not_to_extra_body(
    server: FakeLLMServer, name: str
) -> None:
    # extra_body goes in the body of every route's request, whichever provider serves
    # it: a key put there would be sent to providers it is not for
    async with make(server) as executor:
        with pytest.raises(TypeError) as raised:
            credential: dict[str, Any] = {name: f"sk-{KEY}"}
            await executor.run("hello", CHEAP, **credential)
    message = str(raised.value)
    assert f"{name}= is not an option of run(): " in message
    assert "OpenAIProvider(api_key=...)" in message
    assert "extra_body={" not in message and KEY not in message
    assert server.requests() == 0


async def test_a_dict_as_context_says_how_to_build_the_context(server: FakeLLMServer) -> None:
    settings: Any = {"workflow": "docs", "tier": "cheap"}
    async with make(server) as executor:
        with pytest.raises(ConfigurationError) as raised:
            await executor.run("hello", settings)
        with pytest.raises(ConfigurationError) as streamed:
            executor.stream("hello", settings)
    fix = "build one, ExecutionContext(workflow='docs', tier='cheap')"
    assert fix in str(raised.value) and fix in str(streamed.value)
    assert server.requests() == 0


async def test_a_dict_as_context_builds_only_from_the_contexts_settings(
    server: FakeLLMServer,
) -> None:
    # a request's dict (OpenAI's shape): the ExecutionContext shown to build takes the
    # settings it has; the keys it has not are named as such, not put in the call
    request: Any = {"model": "gpt-fake-mini", "messages": [], "temperature": 0}
    async with make(server) as executor:
        with pytest.raises(ConfigurationError) as raised:
            await executor.run("hello", request)
    message = str(raised.value)
    assert "build one, ExecutionContext(model='gpt-fake-mini', temperature=0)" in message
    assert "'messages' is not a setting of ExecutionContext" in message
    assert server.requests() == 0


def test_message_role_errors_are_the_librarys_not_attrs() -> None:
    with pytest.raises(RecordValidationError) as raised:
        Message(role="robot", content="x")  # type: ignore[arg-type]
    assert raised.value.path == "role"
    assert "'system', 'user', 'assistant'" in str(raised.value)
    assert "Attribute(" not in str(raised.value)
    assert Message(role="system", content="s").role == "system"


def test_a_completion_request_moves_system_messages_into_the_system_prompt() -> None:
    request = CompletionRequest(
        model="m",
        messages=[Message(role="system", content="rules"), Message(role="user", content="q")],
    )
    assert request.system == "rules"
    assert [m.role for m in request.messages] == ["user"]


# --------------------------------------------------------------------------- counts


async def test_a_fallback_is_not_counted_as_a_retry(server: FakeLLMServer) -> None:
    server.script("claude-fake-haiku", [503])
    async with make(server, retry=RetryPolicy.none()) as executor:
        response = await executor.run("hello", CHEAP)
    assert response.fallback_chain == ("claude-fake-haiku", "gpt-fake-mini")
    assert (response.retry_count, response.fallback_count, response.attempt_count) == (0, 1, 2)


async def test_retries_and_fallbacks_are_counted_apart(server: FakeLLMServer) -> None:
    server.script("claude-fake-haiku", [503, 503, 503])
    server.script("gpt-fake-mini", [503])
    async with make(server) as executor:
        response = await executor.run("hello", CHEAP)
    assert response.model == "gpt-fake-mini"
    # three attempts on the first route (two retries), two on the second (one retry)
    assert (response.retry_count, response.fallback_count, response.attempt_count) == (3, 1, 5)


# --------------------------------------------------------------------------- logs


async def test_a_misspelt_task_type_warns_at_the_callers_line_with_the_name_meant(
    server: FakeLLMServer,
) -> None:
    # a warning, not only a log line: seen with no logging set up
    async with make(server) as executor:
        with pytest.warns(ConfigurationWarning, match="did you mean 'summarize'") as given:
            await executor.run("hello", ExecutionContext(task_type="sumarize"))
    assert len(given) == 1 and given[0].filename == __file__


async def test_cache_ttl_without_a_cache_warns_once_per_executor(server: FakeLLMServer) -> None:
    cached = ExecutionContext(workflow="docs", tier="cheap", temperature=0, cache_ttl=60)
    async with make(server) as executor:
        with pytest.warns(ConfigurationWarning, match="without a response cache") as given:
            first = await executor.run("hello", cached)
            again = await executor.run("hello", cached)
            async with executor.stream("hello", cached) as stream:
                await stream.get_final_response()
    assert len(given) == 1 and given[0].filename == __file__
    assert "cache='sqlite:///cache.db'" in str(given[0].message)
    assert not first.cached and not again.cached and server.requests() == 3
    async with make(server) as other:  # another executor is warned again
        with pytest.warns(ConfigurationWarning, match="without a response cache"):
            await other.run("hello", cached)


async def test_cache_ttl_on_a_sampled_request_warns_once_per_executor(
    server: FakeLLMServer,
) -> None:
    sampled = ExecutionContext(workflow="docs", tier="cheap", cache_ttl=60)  # no temperature
    async with make(server, cache="memory://") as executor:
        with pytest.warns(ConfigurationWarning, match="on a request that samples") as given:
            first = await executor.run("hello", sampled)
            again = await executor.run("hello", sampled)
            async with executor.stream("hello", sampled) as stream:
                await stream.get_final_response()
        zero = attrs.evolve(sampled, temperature=0)
        assert not (await executor.run("hello", zero)).cached
        assert (await executor.run("hello", zero)).cached  # no warning: it is cached
    assert len(given) == 1 and given[0].filename == __file__
    assert "set temperature=0, or cache_sampled=True" in str(given[0].message)
    assert not first.cached and not again.cached and server.requests() == 4


def test_the_librarys_setup_warnings_are_configuration_warnings() -> None:
    # one category to silence, or to make errors of in a test suite
    assert issubclass(MissingAPIKeyWarning, ConfigurationWarning)
    assert issubclass(TelemetryDisabledWarning, ConfigurationWarning)
    assert issubclass(ConfigurationWarning, UserWarning)  # shown by Python's default filters


def test_the_package_root_logger_has_a_null_handler() -> None:
    root = logging.getLogger(empathy_models.__name__)
    assert any(isinstance(h, logging.NullHandler) for h in root.handlers)


async def test_the_executor_logs_errors_retries_and_fallbacks(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script("claude-fake-haiku", [503, 503])
    with caplog.at_level(logging.INFO, logger="empathy_models.executor"):
        async with make(server, retry=RetryPolicy(max_attempts=2, jitter=False)) as executor:
            response = await executor.run("hello", CHEAP)
    assert response.model == "gpt-fake-mini"
    lines = [r.getMessage() for r in caplog.records if r.name == "empathy_models.executor"]
    assert any("attempt 1 on claude-fake-haiku failed: ServerError (503)" in m for m in lines)
    assert any("retrying claude-fake-haiku in 1.00s (attempt 2 of 2" in m for m in lines)
    assert any("falling back from claude-fake-haiku to gpt-fake-mini" in m for m in lines)
    assert all(KEY not in m for m in lines)
