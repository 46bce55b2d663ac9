"""
Provider-neutral requests and responses to and from the two wire formats.

Everything about content blocks, tools, tool results, images, structured output and
the extra sampling options lives here, so the providers only assemble the body and
read the usage.  The mapping (as each API documents it):

====================  ==================================  ===================================
ours                  OpenAI Chat Completions             Anthropic Messages
====================  ==================================  ===================================
`TextBlock`           ``{"type": "text", "text"}``        ``{"type": "text", "text"}``
`ImageBlock` (data)   ``image_url.url``: a ``data:`` URL  ``image``, ``source.type: "base64"``
`ImageBlock` (url)    ``image_url.url``                   ``image``, ``source.type: "url"``
assistant tool calls  ``tool_calls[].function``           ``tool_use`` blocks (``input``)
`ToolResult`, "tool"  ``{"role": "tool", "tool_call_id"}``  ``tool_result`` blocks, first
`Tool`                ``tools[].function.parameters``     ``tools[].input_schema``
tool_choice           auto / none / required / a name     ``{"type": auto/none/any/tool}``
`ResponseFormat`      ``response_format.json_schema``     ``output_config.format``
stop                  ``stop``                            ``stop_sequences``
top_p, seed           ``top_p``, ``seed``                 ``top_p`` (no seed: not sent)
extra_body            merged into the body                merged into the body
====================  ==================================  ===================================

``extra_body`` is merged one level deep: an object for a field the request sets to an
object too (Anthropic's ``output_config``, which holds ``format`` and ``effort``, or its
``tool_choice``, which holds ``disable_parallel_tool_use``) is merged into it key by key,
its keys winning; any other value takes the field's place.

Empty text blocks, which OpenAI takes, are left out for Anthropic, which refuses them,
as is an assistant turn left empty before the last message.
A tool result's images cannot go in an OpenAI ``tool`` message (text only): they follow
in one user message after all the ``tool`` messages answering that turn's calls; nor
has OpenAI an error flag for a result (``is_error`` is not sent there).  Anthropic tool
ids must match ``[A-Za-z0-9_-]+``: an id from another provider with other characters
has them as ``_`` and a hash of the whole id appended (the same every time, so calls
and results still pair up, and distinct ids stay distinct); OpenAI takes ids of at most
40 characters: a longer one is cut to its first 23 and a hash of the whole id.  A
``tool_choice`` without tools (only ``"none"`` is allowed so) is not sent to OpenAI,
which refuses one.  Anthropic's structured outputs (and strict tools) refuse numeric,
length and size bounds in a schema: they go in each schema's description instead
(`anthropic_schema`), as the official SDK sends them.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Final

import attrs

from .._fast import trusted_constructor
from ..abc import Completion, CompletionRequest, Message
from ..content import ImageBlock, TextBlock, ToolCall, ToolResult, to_json
from ..exceptions import InvalidResponseError, RecordValidationError
from ._wire import ResponseReader, estimated_output_tokens, json_text, utf8_size

__all__ = [
    "anthropic_body",
    "anthropic_tool_calls",
    "openai_body",
    "answer_usage",
    "openai_tool_calls",
]

_BAD_ID_CHARS: Final = re.compile(r"[^A-Za-z0-9_-]")
_OPENAI_ID_LENGTH: Final = 40
"""The longest ``tool_calls[].id`` Chat Completions takes (``string_above_max_length``)."""


def _id_digest(value: str) -> str:
    """16 hex digits of a hash of a tool id: what keeps two ids apart once rewritten."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------- OpenAI


def _openai_id(value: str) -> str:
    """
    ``value`` as a Chat Completions tool call id: as it is up to 40 characters, else its
    first 23 and a hash of the whole id (40 in all), so two ids never become one.
    """
    if len(value) <= _OPENAI_ID_LENGTH:
        return value
    return f"{value[: _OPENAI_ID_LENGTH - 17]}_{_id_digest(value)}"


def _openai_part(block: TextBlock | ImageBlock) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    return {"type": "image_url", "image_url": {"url": block.data_url}}


def _openai_tool_message(
    tool_call_id: str,
    content: str | Sequence[TextBlock | ImageBlock],
    images: list[dict[str, Any]],
) -> dict[str, Any]:
    """
    The ``tool`` message of one result; its images (a ``tool`` message holds text only)
    go to ``images``, for the user message that follows the turn's tool messages.
    """
    tool_call_id = _openai_id(tool_call_id)
    if isinstance(content, str):
        return {"role": "tool", "tool_call_id": tool_call_id, "content": content}
    texts = [{"type": "text", "text": b.text} for b in content if isinstance(b, TextBlock)]
    pictures = [_openai_part(b) for b in content if isinstance(b, ImageBlock)]
    if pictures:
        note = {"type": "text", "text": f"(images returned by tool call {tool_call_id})"}
        images += [note, *pictures]
    return {"role": "tool", "tool_call_id": tool_call_id, "content": texts or ""}


def _openai_message(message: Message, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``message`` on the wire; tool results' images go to ``images`` (`openai_body`)."""
    if message.role == "tool":
        assert message.tool_call_id is not None
        return [_openai_tool_message(message.tool_call_id, message.content, images)]  # type: ignore[arg-type]
    if message.role == "assistant":
        calls = message.calls
        text = message.text
        out: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            out["tool_calls"] = [
                {
                    "id": _openai_id(call.id),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in calls
            ]
        return [out]
    # user
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, ToolResult):
            messages.append(_openai_tool_message(block.tool_call_id, block.content, images))
        elif isinstance(block, TextBlock | ImageBlock):
            parts.append(_openai_part(block))
    if parts:
        messages.append({"role": "user", "content": parts})
    return messages


def _openai_messages(request: CompletionRequest) -> list[dict[str, Any]]:
    """
    The wire messages of ``request``.  The images of a turn's tool results follow all
    its ``tool`` messages, in one user message: OpenAI wants every call of an assistant
    message answered by the ``tool`` messages right after it.
    """
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": request.system})
    images: list[dict[str, Any]] = []
    for message in request.messages:
        for wire in _openai_message(message, images):
            if images and wire["role"] != "tool":
                messages.append({"role": "user", "content": [*images]})
                images.clear()
            messages.append(wire)
    if images:
        messages.append({"role": "user", "content": images})
    return messages


def openai_body(request: CompletionRequest, max_tokens_field: str) -> dict[str, Any]:
    """The Chat Completions body for ``request``."""
    payload: dict[str, Any] = {
        "model": request.model,
        "messages": _openai_messages(request),
        max_tokens_field: request.max_tokens,
    }
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    if request.top_p is not None:
        payload["top_p"] = request.top_p
    if request.seed is not None:
        payload["seed"] = request.seed
    if request.stop:
        payload["stop"] = list(request.stop)
    if request.tools:
        tools = []
        for tool in request.tools:
            function: dict[str, Any] = {"name": tool.name}
            if tool.description is not None:
                function["description"] = tool.description
            function["parameters"] = to_json(tool.parameters)
            if tool.strict:
                function["strict"] = True
            tools.append({"type": "function", "function": function})
        payload["tools"] = tools
    choice = request.tool_choice
    if choice is not None and request.tools:  # OpenAI refuses a tool_choice without tools
        payload["tool_choice"] = (
            choice
            if choice in ("auto", "none", "required")
            else {"type": "function", "function": {"name": choice}}
        )
    if request.response_format is not None:
        fmt = request.response_format
        payload["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": to_json(fmt.schema), "strict": fmt.strict},
        }
    if request.extra_body:
        _merge_extra(payload, request.extra_body)
    return payload


def _merge_extra(payload: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """
    ``extra`` (``extra_body``) merged into ``payload``: an object for a key ``payload``
    holds as an object too is merged into it (``extra``'s keys win), any other replaces.
    """
    for key, value in to_json(extra).items():
        held = payload.get(key)
        if isinstance(held, dict) and isinstance(value, dict):
            payload[key] = {**held, **value}
        else:
            payload[key] = value


def _bad_arguments(
    reader: ResponseReader, path: str, name: str, raw: str, why: str
) -> InvalidResponseError:
    error = reader.error(
        f"{path} of tool call {name!r} is not a JSON object ({why}); the raw text is in the "
        "error's raw_arguments"
    )
    error.raw_arguments = raw  # type: ignore[attr-defined]
    return error


def _new_call_id() -> str:
    """An id for a call a server sent without one, in OpenAI's shape (``call_`` and 24)."""
    return f"call_{secrets.token_hex(12)}"


def openai_tool_calls(
    reader: ResponseReader, message: Mapping[str, Any], path: str
) -> tuple[ToolCall, ...]:
    """
    The ``tool_calls`` of a Chat Completions message, arguments parsed.  A call without
    an id, or with an empty one (Gemini's OpenAI-compatible endpoint sends ``""``), is
    given a new one, so its result can be paired with it.
    """
    raw_calls = message.get("tool_calls")
    if raw_calls is None:
        return ()
    if not isinstance(raw_calls, list):
        reader.fail(f"{path}.tool_calls must be a list")
    calls: list[ToolCall] = []
    for index, item in enumerate(raw_calls):
        where = f"{path}.tool_calls[{index}]"
        if not isinstance(item, Mapping):
            reader.fail(f"{where} must be an object")
        call_id = item.get("id")
        if call_id is None or call_id == "":
            call_id = _new_call_id()
        elif not isinstance(call_id, str):
            reader.fail(f"{where}.id must be a string")
        function = reader.get(item, "function", dict, where)
        name = reader.get(function, "name", str, f"{where}.function")
        raw = function.get("arguments", "")
        if not isinstance(raw, str):
            reader.fail(f"{where}.function.arguments must be a string")
        try:
            arguments = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise _bad_arguments(reader, f"{where}.function.arguments", name, raw, why) from None
        if not isinstance(arguments, dict):
            raise _bad_arguments(
                reader,
                f"{where}.function.arguments",
                name,
                raw,
                f"a JSON {type(arguments).__name__}",
            )
        calls.append(_tool_call(reader, call_id, name, arguments, where))
    return tuple(calls)


def _tool_call(
    reader: ResponseReader, call_id: str, name: str, arguments: dict[str, Any], where: str
) -> ToolCall:
    try:
        return ToolCall(id=call_id, name=name, arguments=arguments)
    except RecordValidationError as exc:
        reader.fail(f"{where}: {exc}")


# --------------------------------------------------------------------------- Anthropic


def _anthropic_id(value: str) -> str:
    """
    ``value`` as an Anthropic tool id: as it is when it fits, else with the other
    characters as ``_`` and a hash of the whole id after it, so two ids never become one.
    """
    if _BAD_ID_CHARS.search(value) is None:
        return value
    return f"{_BAD_ID_CHARS.sub('_', value)}_{_id_digest(value)}"


def _anthropic_media(block: TextBlock | ImageBlock) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    if block.url is not None:
        return {"type": "image", "source": {"type": "url", "url": block.url}}
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": block.media_type, "data": block.data},
    }


def _anthropic_blocks(content: Sequence[object]) -> list[dict[str, Any]]:
    """
    The text and image blocks of ``content`` on the wire, but for empty texts: the
    Messages API refuses an empty text block ("text content blocks must be non-empty"),
    which OpenAI takes (a conversation may come from there).
    """
    return [
        _anthropic_media(b)
        for b in content
        if isinstance(b, ImageBlock) or (isinstance(b, TextBlock) and b.text)
    ]


def _anthropic_result(
    tool_call_id: str, content: str | Sequence[TextBlock | ImageBlock], is_error: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "tool_result", "tool_use_id": _anthropic_id(tool_call_id)}
    blocks = content if isinstance(content, str) else _anthropic_blocks(content)
    if blocks or isinstance(content, str):  # a result of empty texts only: no content
        out["content"] = blocks
    if is_error:
        out["is_error"] = True
    return out


def _anthropic_message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        assert message.tool_call_id is not None
        content = message.content
        return {
            "role": "user",
            "content": [_anthropic_result(message.tool_call_id, content, False)],  # type: ignore[arg-type]
        }
    if message.role == "assistant":
        calls = message.calls
        if isinstance(message.content, str) and not calls:
            return {"role": "assistant", "content": message.content}
        blocks: list[dict[str, Any]] = []
        text = message.text
        if text:
            blocks.append({"type": "text", "text": text})
        blocks.extend(
            {
                "type": "tool_use",
                "id": _anthropic_id(call.id),
                "name": call.name,
                "input": to_json(call.arguments),
            }
            for call in calls
        )
        return {"role": "assistant", "content": blocks}
    if isinstance(message.content, str):
        return {"role": "user", "content": message.content}
    # tool results first in the turn, as the Messages API requires
    results = [
        _anthropic_result(b.tool_call_id, b.content, b.is_error)
        for b in message.content
        if isinstance(b, ToolResult)
    ]
    return {"role": "user", "content": results + _anthropic_blocks(message.content)}


def _has_results(message: Mapping[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(b, Mapping) and b.get("type") == "tool_result" for b in content
    )


def anthropic_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """
    ``messages`` in the Messages API's shape.  Tool results that follow one another
    (OpenAI's one ``tool`` message per call) are merged into one user turn, with any
    user message right after them, so every result answers the assistant turn before.
    An assistant turn with nothing to send (an empty answer sent back, which OpenAI
    takes) is left out unless it is the last, as the API allows only there; the user
    turns around it are one turn to the API.
    """
    out: list[dict[str, Any]] = []
    last = len(messages) - 1
    for index, message in enumerate(messages):
        converted = _anthropic_message(message)
        if converted["role"] == "assistant" and not converted["content"] and index < last:
            continue
        previous = out[-1] if out else None
        if (
            previous is not None
            and previous["role"] == "user"
            and converted["role"] == "user"
            and _has_results(previous)
        ):
            extra = converted["content"]
            if isinstance(extra, str):
                extra = [{"type": "text", "text": extra}] if extra else []
            results = [b for b in extra if b.get("type") == "tool_result"]
            rest = [b for b in extra if b.get("type") != "tool_result"]
            head = [b for b in previous["content"] if b.get("type") == "tool_result"]
            tail = [b for b in previous["content"] if b.get("type") != "tool_result"]
            previous["content"] = head + results + tail + rest
            continue
        out.append(converted)
    return out


def anthropic_body(request: CompletionRequest) -> dict[str, Any]:
    """The Messages API body for ``request`` (``seed`` has no counterpart: not sent)."""
    payload: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": anthropic_messages(request.messages),
    }
    if request.system is not None:
        payload["system"] = request.system
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    if request.top_p is not None:
        payload["top_p"] = request.top_p
    if request.stop:
        payload["stop_sequences"] = list(request.stop)
    if request.tools:
        tools = []
        for tool in request.tools:
            spec: dict[str, Any] = {"name": tool.name}
            if tool.description is not None:
                spec["description"] = tool.description
            spec["input_schema"] = to_json(tool.parameters)
            if tool.strict:  # compiled into a grammar, as a structured answer's schema is
                spec["input_schema"] = anthropic_schema(spec["input_schema"])
                spec["strict"] = True
            tools.append(spec)
        payload["tools"] = tools
    choice = request.tool_choice
    if choice is not None:
        if choice == "required":
            payload["tool_choice"] = {"type": "any"}
        elif choice in ("auto", "none"):
            payload["tool_choice"] = {"type": choice}
        else:
            payload["tool_choice"] = {"type": "tool", "name": choice}
    if request.response_format is not None:
        schema = anthropic_schema(to_json(request.response_format.schema))
        payload["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    if request.extra_body:
        _merge_extra(payload, request.extra_body)
    return payload


_BOUNDS: Final = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
    }
)
"""Keywords Anthropic's structured outputs refuse (a 400: "For 'integer' type, property
'minimum' is not supported"), as ``minItems`` above 1 is."""

_SUBSCHEMA: Final = frozenset(
    {"items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames"}
)
_SUBSCHEMA_LISTS: Final = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SUBSCHEMA_MAPS: Final = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def anthropic_schema(schema: Any) -> Any:
    """
    ``schema`` as Anthropic's ``output_config.format`` takes it: each (sub)schema's
    `_BOUNDS` moved to the end of its description as ``{minimum: 0, maximum: 150}``,
    the form the official SDK sends them in (the model reads them; the executor checks
    the answer against the whole schema).  A copy: ``schema`` is left as it is.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    moved: list[str] = []
    for key, value in schema.items():
        if key in _BOUNDS or (key == "minItems" and value not in (0, 1)):
            moved.append(f"{key}: {value}")
        elif key in _SUBSCHEMA:
            out[key] = anthropic_schema(value)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [anthropic_schema(item) for item in value]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: anthropic_schema(item) for name, item in value.items()}
        else:
            out[key] = value
    if moved:
        described = out.get("description")
        hint = "{" + ", ".join(moved) + "}"
        out["description"] = f"{described}\n\n{hint}" if isinstance(described, str) else hint
    return out


def anthropic_tool_calls(
    reader: ResponseReader, blocks: Sequence[Any], path: str
) -> tuple[ToolCall, ...]:
    """The ``tool_use`` blocks of a Messages API response."""
    calls: list[ToolCall] = []
    for index, block in enumerate(blocks):
        if not isinstance(block, Mapping) or block.get("type") != "tool_use":
            continue
        where = f"{path}[{index}]"
        call_id = reader.get(block, "id", str, where)
        name = reader.get(block, "name", str, where)
        arguments = block.get("input")
        if not isinstance(arguments, dict):
            raise _bad_arguments(
                reader,
                f"{where}.input",
                name,
                json_text(arguments),
                f"a JSON {type(arguments).__name__}",
            )
        calls.append(_tool_call(reader, call_id, name, arguments, where))
    return tuple(calls)


# --------------------------------------------------------------------------- usage

new_completion: Callable[..., Completion] = partial(
    trusted_constructor(Completion),
    **{a.name: a.default for a in attrs.fields(Completion) if a.default is not attrs.NOTHING},
)
"""
`Completion` built from the fields a provider read and checked, the others at their
defaults: `Completion` has no converter or validator, so this is the very value its
constructor builds, without attrs' frozen ``__init__`` setting each field through
``object.__setattr__`` (a whole answer's ~17 fields: ~3x cheaper).
"""


def answer_usage(
    reported: Mapping[str, Any] | None, content: str, tool_calls: Sequence[ToolCall]
) -> dict[str, Any]:
    """
    The `Completion` usage fields of a whole answer, from the usage it reported
    (``reported``: `HTTPProvider._usage`'s fields, a count left out or null as None;
    None when the answer carried no usage, ``usage`` left out or null).  The counts it
    reported are kept; one it left out is estimated, and ``usage_reported`` is False
    then: the output tokens from its text and its tool calls' names and arguments
    (`estimated_output_tokens`, as for a stream without usage), the input tokens 0
    (the executor records the request's estimate of the prompt).
    """
    if (
        reported is not None
        and reported.get("input_tokens") is not None
        and reported.get("output_tokens") is not None
    ):
        return {**reported}  # both counts reported: the fields as they are
    fields = dict(reported or {})
    input_tokens = fields.pop("input_tokens", None)
    output_tokens = fields.pop("output_tokens", None)
    if output_tokens is None:
        size = utf8_size(content)
        for call in tool_calls:
            size += utf8_size(call.name) + utf8_size(call.arguments_json)
        output_tokens = estimated_output_tokens(size)
    return {
        **fields,
        "input_tokens": input_tokens or 0,
        "output_tokens": output_tokens,
        "usage_reported": False,
    }
