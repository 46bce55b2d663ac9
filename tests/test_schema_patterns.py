"""
Patterns in a structured-output schema and the time ``re`` takes to search the model's
answer with them (ReDoS), through `ResponseFormat` and `EmpathyLLMExecutor.run` over real
HTTP to `FakeLLMServer`: a pattern whose search time can grow exponentially is refused
when the schema is given, before any call; a safe one still checks the answer, and a
string too long for a pattern whose search time grows faster than its length is not
searched with it.  (The time ``re`` takes on these patterns is measured in
``benchmarks/bench_pattern_cost.py``.)
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from empathy_models import (
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMResponse,
    OpenAIProvider,
    RetryPolicy,
)
from empathy_models.content import ResponseFormat
from empathy_models.exceptions import RecordValidationError
from empathy_models.providers import AnthropicProvider
from empathy_models.testing import FakeLLMServer, FakeReply

from ._fakes import CHEAP_ONLY, KEY, NoSleep

CLAUDE = "claude-fake-haiku"
GPT = "gpt-fake-mini"
MODELS = [CLAUDE, GPT]
EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
DATE = r"^\d{4}-\d{2}-\d{2}$"

SAFE = [
    r"^[a-z]+$",
    r"\d{3}-\d{4}",
    r"^(\+\d{1,3})?\d+$",
    EMAIL,
    r"^[\w.+-]+@[\w-]+(\.[\w-]+)+$",
    DATE,
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?$",
    r"^([01]?\d|2[0-3]):[0-5]\d$",
    r"^(foo|bar)+$",
    r"^(\d{1,3}\.){3}\d{1,3}$",
    r"^(\d{1,3}\.?){4}$",  # ambiguous, but bounded: four numbers of one to three digits
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
    r"^-?\d+(\.\d+)?([eE][+-]?\d+)?$",
    r"^v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$",
    r"^https?://[^\s/$.?#].[^\s]*$",
    r"^([a-z0-9]+(-[a-z0-9]+)*\.)+[a-z]{2,}$",
    r"^(?:\d+,)*\d+$",
    r"^\w+( \w+)*$",
    r"^(\w+\s)*$",  # each word ends with a space: one way to split
    r"^[A-Z]{2}\d{2}[A-Z0-9]{1,30}$",
    r"^(?=.*\d)(?=.*[a-z]).{8,}$",
    r"(?i)^[a-z_][a-z0-9_]*$",
    r"^(\w)\1$",
    r"^(a+)+",  # nothing after the repetition can fail: the first way matches
    r"(a|a)*",
    r"^(\w|\d)+$",  # Python's parser makes the branch one set of characters
    r"(?a)^(\u06f5a|\da)+x",  # with re.ASCII, \d is [0-9] only
    r"^(\w++\s?)*$",  # possessive: re never backtracks into it
    r"^((?>\w+)\s?)*$",  # atomic
    r"^\s*(.*?)\s*$",  # cubic, searched in strings up to 215 characters
    r"\w+@",  # quadratic (every start is tried), up to 3,162 characters
]

DANGEROUS = [  # (pattern, the repetition the message names)
    (r"^(a+)+$", "(a+)+"),
    (r"(a|aa)*b", "(a|aa)*"),
    (r"(\w+\s?)*$", r"(\w+\s?)*"),
    (r"^(a*)*$", "(a*)*"),
    (r"^(a|a)*$", "(a|a)*"),
    (r"^(\w|ab)+$", r"(\w|ab)+"),
    (r"^(\d+)*$", r"(\d+)*"),
    (r"^([a-z]+\.?)*[a-z]+$", r"([a-z]+\.?)*"),
    (r"^(\s*\w+\s*)*$", r"(\s*\w+\s*)*"),
    (r"(x+x+)+y", "(x+x+)+"),
    (r"^(a{1,3}){1,10}$", "(a{1,3}){1,10}"),  # bounded, by 3**10 ways
    (r"(?=(a+)+$)", "(a+)+"),  # in a lookahead
    (r"(?i)^(kx|\u212ax)+$", r"(kx|\u212ax)+"),  # the Kelvin sign is a k, ignoring case
    (r"^(\u06f5a|\da)+x", r"(\u06f5a|\da)+"),  # an Extended Arabic-Indic five is a \d
    (
        r"^([a-zA-Z0-9])(([\-.]|[_]+)?([a-zA-Z0-9]+))*(@){1}[a-z0-9]+[.]{1}"
        r"(([a-z]{2,3})|([a-z]{2,3}[.]{1}[a-z]{2,3}))$",
        r"(([\-.]|[_]+)?([a-zA-Z0-9]+))*",
    ),
]


# --------------------------------------------------------------------------- the schema


@pytest.mark.parametrize("pattern", SAFE)
def test_a_safe_pattern_is_accepted(pattern: str) -> None:
    ResponseFormat(schema={"type": "string", "pattern": pattern})
    ResponseFormat(schema={"type": "object", "patternProperties": {pattern: {}}})


@pytest.mark.parametrize(("pattern", "culprit"), DANGEROUS)
def test_a_pattern_that_can_take_exponential_time_is_refused(pattern: str, culprit: str) -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": pattern}}}
    with pytest.raises(RecordValidationError) as raised:
        ResponseFormat(schema=schema)
    assert raised.value.path == "response_format.schema.properties.code.pattern"
    message = str(raised.value)
    assert message.startswith(f"response_format.schema.properties.code.pattern {pattern!r} ")
    assert f"can take time exponential in the length of the string: {culprit!r}" in message
    with pytest.raises(RecordValidationError) as raised:
        ResponseFormat(schema={"type": "object", "patternProperties": {pattern: {}}})
    assert raised.value.path == "response_format.schema.patternProperties"
    assert repr(pattern) in str(raised.value) and repr(culprit) in str(raised.value)


def test_a_pattern_whose_time_grows_as_a_high_power_is_refused() -> None:
    pattern = r"^(.*?,){11}P"  # eleven .*? that can take the same commas: length ** 11
    with pytest.raises(RecordValidationError, match="to the power 11") as raised:
        ResponseFormat(schema={"type": "string", "pattern": pattern})
    assert raised.value.path == "response_format.schema.pattern"
    assert repr(pattern) in str(raised.value)


def test_a_pattern_with_too_many_ways_to_match_the_same_text_is_refused() -> None:
    """Not in the length of the string, in the pattern's: 2 ** 16 ways to match 'ab' * 16."""
    ResponseFormat(schema={"type": "string", "pattern": r"^(ab|\wb){12}$"})  # 4,096 ways
    for pattern in (r"^(ab|\wb){16}$", r"^((ab|\wb){16}){16}$"):
        with pytest.raises(RecordValidationError, match="exponential in its size") as raised:
            ResponseFormat(schema={"type": "string", "pattern": pattern})
        assert raised.value.path == "response_format.schema.pattern"


def test_a_min_length_no_string_would_be_searched_at_is_refused() -> None:
    ResponseFormat(schema={"type": "string", "pattern": EMAIL, "minLength": 3162})
    with pytest.raises(RecordValidationError, match="over the 3,162 characters") as raised:
        ResponseFormat(schema={"type": "string", "pattern": EMAIL, "minLength": 3163})
    assert raised.value.path == "response_format.schema.minLength"


# --------------------------------------------------------------------------- through run()


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY, seed=5) as fake:
        yield fake


def make(server: FakeLLMServer) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [
            AnthropicProvider(api_key=KEY, base_url=server.anthropic_base_url),
            OpenAIProvider(api_key=KEY, base_url=server.openai_base_url),
        ],
        registry=CHEAP_ONLY,
        telemetry_store="null://",
        retry=RetryPolicy.none(),
        sleep=NoSleep(),
    )


def pinned(model: str) -> ExecutionContext:
    return ExecutionContext(workflow="agent", stage="json", model=model)


async def answer(
    executor: EmpathyLLMExecutor, server: FakeLLMServer, model: str, value: Any, schema: Any
) -> LLMResponse:
    """The response of a run whose model answers ``value`` as JSON."""
    server.script(model, [FakeReply(content=json.dumps(value))])
    return await executor.run("Answer.", pinned(model), response_format=schema)


@pytest.mark.parametrize("model", MODELS)
async def test_the_executor_refuses_a_dangerous_pattern_before_any_call(
    server: FakeLLMServer, model: str
) -> None:
    pattern = r"^(\w+\s?)*$"
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": pattern}}}
    async with make(server) as executor:
        with pytest.raises(ConfigurationError) as raised:
            await answer(executor, server, model, {"name": "a" * 40 + "!"}, schema)
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert f"response_format.schema.properties.name.pattern {pattern!r} can take time " in message
    assert r"'(\\w+\\s?)*' repeats a part that can match the same text" in message
    assert server.requests() == 0


@pytest.mark.parametrize("model", MODELS)
async def test_safe_patterns_still_check_the_answer(server: FakeLLMServer, model: str) -> None:
    schema = {
        "type": "object",
        "properties": {
            "email": {"type": "string", "pattern": EMAIL},
            "day": {"type": "string", "pattern": DATE},
            "slug": {"type": "string", "pattern": r"^[a-z]+$"},
        },
        "required": ["email", "day", "slug"],
        "additionalProperties": False,
    }
    async with make(server) as executor:
        # the fake writes a value the schema accepts, and the executor checks it
        made = await executor.run("Answer.", pinned(model), response_format=schema)
        assert made.parse_error is None and re.search(EMAIL, made.parsed["email"])
        good = {"email": "ada@example.org", "day": "2024-02-29", "slug": "a" * 100_000}
        response = await answer(executor, server, model, good, schema)
        assert response.parse_error is None and response.parsed == good  # linear: any length
        bad = good | {"email": "ada at example.org"}
        response = await answer(executor, server, model, bad, schema)
        assert response.parsed is None
        assert response.parse_error == (
            f"the answer does not match the schema: $.email: does not match {EMAIL!r}"
        )
        # a near miss 'a@a.a.a. ... a. ' would take re minutes: it is not searched
        crafted = good | {"email": "a@" + "a." * 100_000 + " "}
        response = await answer(executor, server, model, crafted, schema)
    assert response.parsed is None
    assert response.parse_error == (
        "the answer does not match the schema: $.email: 200,003 characters, over the 3,162 "
        f"searched with {EMAIL!r} (its search time can grow as the length to the power 2)"
    )


async def test_the_strings_of_one_answer_share_a_budget(server: FakeLLMServer) -> None:
    schema = {"type": "array", "items": {"type": "string", "pattern": EMAIL}}
    email = "a" * 994 + "@b.com"  # 1,000 characters: 1,000 ** 2 of the 10,000,000
    async with make(server) as executor:
        response = await answer(executor, server, GPT, [email] * 10, schema)
        assert response.parse_error is None and response.parsed == [email] * 10
        response = await answer(executor, server, GPT, [email] * 11, schema)
    assert response.parsed is None
    assert response.parse_error == (
        f"the answer does not match the schema: $[10]: not searched with {EMAIL!r}: the "
        "answer's strings for patterns whose search time grows faster than their length "
        "are too long in all"
    )


async def test_a_long_property_name_is_not_searched_with_a_slow_pattern(
    server: FakeLLMServer,
) -> None:
    schema = {
        "type": "object",
        "patternProperties": {r"^\w+_\w+$": {"type": "integer"}},  # '_' is a \w: quadratic
        "additionalProperties": False,
    }
    name = "a_" * 2_000 + "!"
    async with make(server) as executor:
        response = await answer(executor, server, CLAUDE, {"a_b": 1}, schema)
        assert response.parse_error is None and response.parsed == {"a_b": 1}
        response = await answer(executor, server, CLAUDE, {name: 1}, schema)
    assert response.parsed is None
    problem = response.parse_error or ""
    assert problem.startswith("the answer does not match the schema: $: the property name 'a_a_")
    assert problem.endswith(
        r"is 4,001 characters, over the 3,162 searched with '^\\w+_\\w+$' (its search time "
        "can grow as the length to the power 2)"
    )


async def test_a_string_not_searched_settles_any_of_and_one_of_only_when_it_cannot_matter(
    server: FakeLLMServer,
) -> None:
    email = "a" * 3994 + "@b.com"  # 4,000 characters: over the 3,162 searched with EMAIL
    any_of = {"anyOf": [{"type": "string", "pattern": EMAIL}, {"maxLength": 5000}]}
    one_of = {"oneOf": [{"type": "string", "pattern": EMAIL}, {"maxLength": 5000}]}
    async with make(server) as executor:
        response = await answer(executor, server, GPT, email, any_of)
        assert response.parse_error is None and response.parsed == email  # the other option
        response = await answer(executor, server, GPT, email, one_of)  # one or two matches?
        assert response.parsed is None
        assert "$: 4,000 characters, over the 3,162 searched with" in (response.parse_error or "")
        response = await answer(executor, server, GPT, email, {"oneOf": [one_of, True, True]})
        assert response.parsed is None  # two options match: settled
        assert response.parse_error == (
            "the answer does not match the schema: $: matches 2 of the oneOf options"
        )
