"""
The types and ranges of a request's plain fields (``temperature``, ``stream``,
``stop``, ...) as `FakeLLMServer` checks them, with each real API's message for a value
of the wrong type or out of range.  A field that is absent or ``null`` passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Literal, TypeAlias

from .._validators import shown
from ._fake_checks import Problem, json_type

__all__ = [
    "SIGNATURE",
    "THOUGHT",
    "anthropic_field_problem",
    "choices_asked",
    "openai_field_problem",
    "openai_logprobs",
    "openai_served_tier",
    "thinking_asked",
]

_Kind: TypeAlias = Literal["number", "integer", "boolean", "string", "object", "list"]
_Field: TypeAlias = tuple[str, _Kind, float | None, float | None]

_OPENAI_FIELDS: Final[tuple[_Field, ...]] = (
    ("temperature", "number", 0, 2),
    ("top_p", "number", 0, 1),
    ("frequency_penalty", "number", -2, 2),
    ("presence_penalty", "number", -2, 2),
    ("n", "integer", 1, 128),
    ("seed", "integer", None, None),
    ("top_logprobs", "integer", 0, 20),
    ("stream", "boolean", None, None),
    ("logprobs", "boolean", None, None),
    ("store", "boolean", None, None),
    ("parallel_tool_calls", "boolean", None, None),
    ("user", "string", None, None),
    ("prompt_cache_key", "string", None, None),
    ("safety_identifier", "string", None, None),
    ("reasoning_effort", "string", None, None),
    ("service_tier", "string", None, None),
    ("verbosity", "string", None, None),
    ("metadata", "object", None, None),
    ("logit_bias", "object", None, None),
    ("stream_options", "object", None, None),
    ("response_format", "object", None, None),
    ("modalities", "list", None, None),
)
_ANTHROPIC_FIELDS: Final[tuple[_Field, ...]] = (
    ("temperature", "number", 0, 1),
    ("top_p", "number", 0, 1),
    ("top_k", "integer", 0, None),
    ("stream", "boolean", None, None),
    ("service_tier", "string", None, None),
    ("metadata", "object", None, None),
    ("thinking", "object", None, None),
    ("output_config", "object", None, None),
)
_OPENAI_NAMES: Final = {
    "number": "a decimal",
    "integer": "an integer",
    "boolean": "a boolean",
    "string": "a string",
    "object": "an object",
    "list": "an array",
}
_ANTHROPIC_NAMES: Final = {
    "number": "a valid number",
    "integer": "a valid integer",
    "boolean": "a valid boolean",
    "string": "a valid string",
    "object": "a valid dictionary",
    "list": "a valid list",
}


def _is(kind: _Kind, value: object) -> bool:
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return isinstance(value, int) or (kind == "number" and math.isfinite(value))
    types: dict[str, type | tuple[type, ...]] = {
        "boolean": bool,
        "string": str,
        "object": Mapping,
        "list": list,
    }
    return isinstance(value, types[kind])


def _openai_field(
    name: str, kind: _Kind, low: float | None, high: float | None, value: Any
) -> Problem | None:
    if not _is(kind, value):
        return (
            f"Invalid type for '{name}': expected {_OPENAI_NAMES[kind]}, but got "
            f"{json_type(value)} instead.",
            name,
            "invalid_type",
        )
    word = "decimal" if kind == "number" else "integer"
    if low is not None and value < low:
        return (
            f"Invalid '{name}': {word} below minimum value. Expected a value >= {low:g}, but "
            f"got {shown(value)} instead.",
            name,
            f"{word}_below_min_value",
        )
    if high is not None and value > high:
        return (
            f"Invalid '{name}': {word} above maximum value. Expected a value <= {high:g}, but "
            f"got {shown(value)} instead.",
            name,
            f"{word}_above_max_value",
        )
    return None


_OPENAI_TIERS: Final = ("auto", "default", "flex", "scale", "priority")
"""The ``service_tier`` values Chat Completions accepts, in its message's order."""
_ANTHROPIC_TIERS: Final = ("auto", "standard_only")
"""The ``service_tier`` values the Messages API accepts."""


def openai_served_tier(body: Mapping[str, Any]) -> str | None:
    """
    The ``service_tier`` an answer to ``body`` reports: the one asked for, ``"default"``
    for ``"auto"`` (a project without a tier's commitment is served at the standard
    one), or None, not reported, when none was asked for (as in the recorded samples of
    the API's answers, `tests/data`).
    """
    asked = body.get("service_tier")
    if asked is None or asked not in _OPENAI_TIERS:
        return None
    return "default" if asked == "auto" else str(asked)


def choices_asked(body: Mapping[str, Any]) -> int:
    """The choices an OpenAI request asks for (``n``; 1 when not given)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def openai_logprobs(body: Mapping[str, Any], text: str) -> dict[str, Any] | None:
    """
    A choice's ``logprobs`` for ``text`` when ``body`` asks for them (``logprobs``: true):
    a token per 4 characters (the fake's count), each as likely as can be, with the
    ``top_logprobs`` alternatives asked for (the token first); None when not asked.
    """
    if body.get("logprobs") is not True:
        return None
    top = body.get("top_logprobs")
    most = top if isinstance(top, int) and not isinstance(top, bool) else 0

    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [
        {
            **token(piece, 0.0),
            "top_logprobs": [token(piece, 0.0)]
            + [token(f"<alt{i}>", -10.0 - i) for i in range(1, most)],
        }
        for piece in (text[i : i + 4] for i in range(0, len(text), 4))
    ]
    return {"content": content, "refusal": None}


def openai_field_problem(body: Mapping[str, Any]) -> Problem | None:
    """Chat Completions' 400 (message, param, code) for a field of the wrong type or range."""
    for name, kind, low, high in _OPENAI_FIELDS:
        value = body.get(name)
        if value is not None and (problem := _openai_field(name, kind, low, high, value)):
            return problem
    tier = body.get("service_tier")
    if tier is not None and tier not in _OPENAI_TIERS:
        listed = ", ".join(repr(t) for t in _OPENAI_TIERS[:-1])
        return (
            f"Invalid value: {shown(tier)}. Supported values are: {listed}, and "
            f"{_OPENAI_TIERS[-1]!r}.",
            "service_tier",
            "invalid_value",
        )
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            return (
                "Invalid type for 'stop': expected one of a string or array of strings, but got "
                f"{json_type(stop)} instead.",
                "stop",
                "invalid_type",
            )
        if len(stop) > 4:
            return (
                f"Invalid 'stop': array too long. Expected an array with maximum length 4, but "
                f"got an array with length {len(stop)} instead.",
                "stop",
                "array_above_max_length",
            )
    if body.get("stream_options") is not None and body.get("stream") is not True:
        return (
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
            None,
        )
    return None


def _anthropic_field(
    name: str, kind: _Kind, low: float | None, high: float | None, value: Any
) -> str | None:
    if not _is(kind, value):
        return f"{name}: Input should be {_ANTHROPIC_NAMES[kind]}"
    if low is not None and value < low:
        return f"{name}: Input should be greater than or equal to {low:g}"
    if high is not None and value > high:
        return f"{name}: Input should be less than or equal to {high:g}"
    return None


THOUGHT: Final = "Thinking about the request."
"""The thought of the thinking block an answer with extended thinking opens with."""
SIGNATURE: Final = "ZmFrZS1zaWduYXR1cmU="
"""That block's signature (opaque, as the API's; base64 of "fake-signature")."""


def thinking_asked(body: Mapping[str, Any]) -> bool:
    """Whether an Anthropic request turns extended thinking on (``"type": "enabled"``)."""
    thinking = body.get("thinking")
    return isinstance(thinking, Mapping) and thinking.get("type") == "enabled"


MIN_THINKING_BUDGET: Final = 1024
"""The fewest tokens extended thinking may be given (``thinking.budget_tokens``)."""


def _thinking_problem(body: Mapping[str, Any]) -> str | None:
    # manual extended thinking: a budget of at least 1,024 tokens, below max_tokens (the
    # other types, "adaptive", "disabled", "between_tools", take no budget; which ones a
    # model accepts depends on the model, left unchecked)
    thinking = body.get("thinking")
    if not isinstance(thinking, Mapping) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int):
        return "thinking.enabled.budget_tokens: Field required"
    if budget < MIN_THINKING_BUDGET:
        return (
            "thinking.enabled.budget_tokens: Input should be greater than or equal to "
            f"{MIN_THINKING_BUDGET}"
        )
    most = body.get("max_tokens")
    if isinstance(most, int) and budget >= most:
        return "`max_tokens` must be greater than `thinking.budget_tokens`."
    return _with_thinking(body)


def _with_thinking(body: Mapping[str, Any]) -> str | None:
    # what extended thinking does not go with: a temperature but 1, a forced tool
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        return "`temperature` may only be set to 1 when thinking is enabled."
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") in ("any", "tool"):
        return "Thinking may not be enabled when tool_choice forces tool use."
    return None


def anthropic_field_problem(body: Mapping[str, Any]) -> str | None:
    """The Messages API's 400 message for a field of the wrong type or range; None if fine."""
    for name, kind, low, high in _ANTHROPIC_FIELDS:
        value = body.get(name)
        if value is not None and (problem := _anthropic_field(name, kind, low, high, value)):
            return problem
    tier = body.get("service_tier")
    if tier is not None and tier not in _ANTHROPIC_TIERS:
        return "service_tier: Input should be 'auto' or 'standard_only'"
    if (thinking := _thinking_problem(body)) is not None:
        return thinking
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        if not isinstance(system, list):
            return "system: Input should be a valid string or a list of text blocks"
        for index, block in enumerate(system):
            if not isinstance(block, Mapping) or block.get("type") != "text":
                return f"system.{index}.type: Input should be 'text'"
            if not isinstance(block.get("text"), str):
                return f"system.{index}.text: Field required"
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list):
            return "stop_sequences: Input should be a valid list"
        for index, item in enumerate(stop):
            if not isinstance(item, str):
                return f"stop_sequences.{index}: Input should be a valid string"
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, Mapping) else None
    if user_id is not None and not isinstance(user_id, str):
        return "metadata.user_id: Input should be a valid string"
    return None
