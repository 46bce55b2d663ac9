"""
Tool calling, images and structured output for `FakeLLMServer`.

`FakeReply` is a scripted answer (text, tool calls, JSON); the ``check_*`` functions
validate tools, tool choices, content blocks and the tool call / tool result pairing
as each real API does (returning the API's error message, or None); `auto_reply`
answers a request that forces a tool or asks for JSON with a value generated from the
schema, so clients that rely on either get a well-formed answer without a script.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypeAlias

from attrs import field, frozen

from .._validators import failure, optional_str, shown
from ..abc import Completion
from ..content import IMAGE_MEDIA_TYPES, ToolCall
from ..exceptions import RecordValidationError

__all__ = ["FakeReply", "auto_reply", "check_anthropic", "check_openai", "example_for"]

_MEDIA_TYPES_TEXT: Final = "'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"


def _to_calls(value: Iterable[Mapping[str, Any]] | None) -> tuple[Mapping[str, Any], ...]:
    if value is None:
        return ()
    calls: list[Mapping[str, Any]] = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise RecordValidationError(
                f"tool_calls[{index}] must be a dict with a 'name' and optional 'arguments' "
                f"(a dict, or a string sent verbatim) and 'id', got {shown(item)}",
                path=f"tool_calls[{index}]",
            )
        arguments = item.get("arguments", {})
        if not isinstance(arguments, Mapping | str):
            raise RecordValidationError(
                f"tool_calls[{index}].arguments must be a dict or a string",
                path=f"tool_calls[{index}].arguments",
            )
        calls.append(dict(item))
    return tuple(calls)


_opt_str = optional_str(failure(RecordValidationError))


@frozen(kw_only=True)
class FakeReply:
    """
    One scripted successful answer, queued with ``server.script(model, [FakeReply(...)])``.

    Args:
        content: the text (None: the behaviour's text, or none when there are tool calls).
        tool_calls: dicts with a ``name``, ``arguments`` (a dict, or a string sent
            verbatim, so a malformed one can be tested) and an optional ``id`` (default:
            generated in each API's style).
        json: any JSON value, sent as the text instead.
        stop_reason: overrides the stop reason (default: ``"tool_use"`` /
            ``"tool_calls"`` with tool calls, else ``"end_turn"`` / ``"stop"``).
    """

    content: str | None = field(default=None, validator=_opt_str)
    tool_calls: tuple[Mapping[str, Any], ...] = field(default=(), converter=_to_calls)
    json: Any = None
    stop_reason: str | None = field(default=None, validator=_opt_str)

    def text(self, default: str) -> str | None:
        """The text to send (``default`` when nothing else is set and no tool is called)."""
        if self.json is not None:
            return json.dumps(self.json)
        if self.content is not None:
            return self.content
        return None if self.tool_calls else default


_ids = itertools.count(1)


def _call_id(api: str, call: Mapping[str, Any]) -> str:
    given = call.get("id")
    if isinstance(given, str):
        return given
    n = next(_ids)
    return f"toolu_{n:024d}" if api == "anthropic" else f"call_{n:024d}"


def apply_reply(api: str, payload: dict[str, Any], reply: FakeReply, default_text: str) -> None:
    """Put ``reply``'s text and tool calls into a success ``payload`` of ``api``."""
    text = reply.text(default_text)
    if api == "anthropic":
        blocks: list[dict[str, Any]] = []
        if text is not None:
            blocks.append({"type": "text", "text": text})
        for call in reply.tool_calls:
            arguments = call.get("arguments", {})
            if isinstance(arguments, str):
                # a malformed one (or one nested too deeply to parse) is sent as the
                # string it is: not an object
                with contextlib.suppress(ValueError, RecursionError):
                    arguments = json.loads(arguments)
            blocks.append(
                {
                    "type": "tool_use",
                    "id": _call_id(api, call),
                    "name": call["name"],
                    "input": arguments,
                }
            )
        payload["content"] = blocks
        if reply.tool_calls and payload.get("stop_reason") != "max_tokens":
            payload["stop_reason"] = "tool_use"
        if reply.stop_reason is not None:
            payload["stop_reason"] = reply.stop_reason
        return
    choice = payload["choices"][0]
    message = choice["message"]
    message["content"] = text
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": _call_id(api, call),
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": (
                        call.get("arguments")
                        if isinstance(call.get("arguments"), str)
                        else json.dumps(call.get("arguments", {}))
                    ),
                },
            }
            for call in reply.tool_calls
        ]
        if choice.get("finish_reason") != "length":
            choice["finish_reason"] = "tool_calls"
    if reply.stop_reason is not None:
        choice["finish_reason"] = reply.stop_reason


def streamed_calls(api: str, reply: FakeReply) -> list[tuple[str, str, str]]:
    """``reply``'s tool calls as (id, name, arguments text) to stream (a string verbatim)."""
    out = []
    for call in reply.tool_calls:
        arguments = call.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        out.append((_call_id(api, call), str(call["name"]), text))
    return out


def reply_completion(
    reply: FakeReply, default_text: str, model: str, input_tokens: int, output_tokens: int, n: int
) -> Completion:
    """`FakeProvider`'s `Completion` for ``reply`` (arguments must be dicts here)."""
    calls = tuple(
        ToolCall(
            id=call.get("id") or f"toolu_fake_{n}_{index}",
            name=call["name"],
            arguments=call.get("arguments") or {},
        )
        for index, call in enumerate(reply.tool_calls)
    )
    return Completion(
        content=reply.text(default_text) or "",
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        stop_reason=reply.stop_reason or ("tool_use" if calls else "end_turn"),
        request_id=f"fake-{n}",
        tool_calls=calls,
    )


# --------------------------------------------------------------------------- examples


def example_for(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A small value matching ``schema`` (enough for the usual structured-output schemas)."""
    root = schema if root is None else root
    if not isinstance(schema, Mapping) or depth > 16:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        return example_for(node, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return example_for(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {name: example_for(sub, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        count = schema.get("minItems", 1)
        return [example_for(schema.get("items", {}), root, depth + 1) for _ in range(count)]
    if kind == "string":
        return "x" * max(int(schema.get("minLength", 0)), 7) if "maxLength" not in schema else ""
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = low + (1 if "exclusiveMinimum" in schema else 0)
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    return None


def auto_reply(api: str, body: Mapping[str, Any]) -> FakeReply | None:
    """
    The answer to a request that forces a tool call (OpenAI ``"required"`` or a named
    function; Anthropic ``any`` or ``tool``) or asks for JSON; None for any other.
    """
    given = body.get("tools")
    tools: list[Any] = given if isinstance(given, list) else []
    choice = body.get("tool_choice")
    name: str | None = None
    if api == "openai":
        if isinstance(choice, Mapping):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, Mapping) else None
        elif choice == "required" and tools:
            name = tools[0].get("function", {}).get("name")
        schemas = {
            t["function"]["name"]: t["function"].get("parameters", {})
            for t in tools
            if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
        }
    else:
        if isinstance(choice, Mapping) and choice.get("type") == "tool":
            name = choice.get("name")
        elif isinstance(choice, Mapping) and choice.get("type") == "any" and tools:
            name = tools[0].get("name")
        schemas = {t["name"]: t.get("input_schema", {}) for t in tools if isinstance(t, Mapping)}
    if isinstance(name, str) and name in schemas:
        return FakeReply(tool_calls=[{"name": name, "arguments": example_for(schemas[name])}])
    schema = _json_schema_of(api, body)
    if schema is not None:
        return FakeReply(json=example_for(schema))
    return None


def _json_schema_of(api: str, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if api == "openai":
        fmt = body.get("response_format")
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            return schema if isinstance(schema, Mapping) else {}
        return None
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        return schema if isinstance(schema, Mapping) else {}
    return None


# --------------------------------------------------------------------------- validation


def _base64_ok(data: object) -> bool:
    if not isinstance(data, str) or not data:
        return False
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _anthropic_block(block: object, where: str, role: str) -> str | None:
    if not isinstance(block, Mapping):
        return f"{where}: Input should be a valid dictionary"
    kind = block.get("type")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            return f"{where}.text: Field required"
        if not block["text"] and role == "assistant":
            return f"{where}: text content blocks must be non-empty"
        return None
    if kind == "image":
        source = block.get("source")
        if not isinstance(source, Mapping):
            return f"{where}.image.source: Field required"
        if source.get("type") == "url":
            url = source.get("url")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                return f"{where}.image.source.url.url: Input should be a valid URL"
            return None
        if source.get("type") != "base64":
            return f"{where}.image.source: Input tag {source.get('type')!r} is not a valid source"
        if source.get("media_type") not in IMAGE_MEDIA_TYPES:
            return f"{where}.image.source.base64.media_type: Input should be {_MEDIA_TYPES_TEXT}"
        if not _base64_ok(source.get("data")):
            return f"{where}.image.source.base64: The image data is not valid base64"
        return None
    if kind == "tool_use":
        if role != "assistant":
            return f"{where}: tool_use blocks may only be in assistant messages"
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            return f"{where}.tool_use: id and name are required"
        if not isinstance(block.get("input"), Mapping):
            return f"{where}.tool_use.input: Input should be a valid dictionary"
        return None
    if kind == "tool_result":
        if role != "user":
            return f"{where}: tool_result blocks may only be in user messages"
        if not isinstance(block.get("tool_use_id"), str):
            return f"{where}.tool_result.tool_use_id: Field required"
        content = block.get("content", "")
        if isinstance(content, list):
            for index, item in enumerate(content):
                problem = _anthropic_block(item, f"{where}.tool_result.content.{index}", "user")
                if problem:
                    return problem
        elif not isinstance(content, str):
            return f"{where}.tool_result.content: Input should be a valid string or list"
        return None
    return f"{where}: Input tag {kind!r} found using 'type' does not match any of the expected tags"


def check_anthropic(body: Mapping[str, Any]) -> str | None:
    """The Messages API's 400 message for a bad tool, block or pairing; None if fine."""
    tools = body.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for index, tool in enumerate(tools):
            if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
                return f"tools.{index}.custom.name: Field required"
            schema = tool.get("input_schema")
            if not isinstance(schema, Mapping):
                return f"tools.{index}.custom.input_schema: Field required"
            if schema.get("type") != "object":
                return f"tools.{index}.custom.input_schema.type: Input should be 'object'"
            names.append(tool["name"])
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, Mapping) else None
        if kind not in ("auto", "any", "tool", "none"):
            return "tool_choice: Input tag does not match any of the expected tags"
        if kind == "tool" and choice.get("name") not in names:
            return f"tool_choice.tool.name: no tool named {choice.get('name')!r} in tools"
    config = body.get("output_config")
    if config is not None:
        fmt = config.get("format") if isinstance(config, Mapping) else None
        if fmt is not None and (
            not isinstance(fmt, Mapping)
            or fmt.get("type") != "json_schema"
            or not isinstance(fmt.get("schema"), Mapping)
        ):
            return "output_config.format: expected {'type': 'json_schema', 'schema': {...}}"
    messages = body.get("messages")
    assert isinstance(messages, list)
    pending: list[str] = []  # tool_use ids of the previous assistant turn
    for index, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        blocks: Sequence[Any] = content if isinstance(content, list) else ()
        if not isinstance(content, str | list):
            return f"messages.{index}.content: Input should be a valid string or list"
        for n, block in enumerate(blocks):
            problem = _anthropic_block(block, f"messages.{index}.content.{n}", role)
            if problem:
                return problem
        results = [b["tool_use_id"] for b in blocks if b.get("type") == "tool_result"]
        if pending:
            missing = [i for i in pending if i not in results]
            if role != "user" or missing:
                return (
                    f"messages.{index}: `tool_use` ids were found without `tool_result` blocks "
                    f"immediately after: {', '.join(missing or pending)}. Each `tool_use` block "
                    "must have a corresponding `tool_result` block in the next message."
                )
        unexpected = [i for i in results if i not in pending]
        if unexpected:
            return (
                f"messages.{index}.content.0: unexpected `tool_use_id` found in `tool_result` "
                f"blocks: {', '.join(unexpected)}. Each `tool_result` block must have a "
                "corresponding `tool_use` block in the previous message."
            )
        pending = [b["id"] for b in blocks if b.get("type") == "tool_use"]
    return None


def _openai_part(part: object, where: str) -> str | None:
    if not isinstance(part, Mapping):
        return f"Invalid type for '{where}': expected an object."
    kind = part.get("type")
    if kind == "text":
        if isinstance(part.get("text"), str):
            return None
        return f"Missing required parameter: '{where}.text'."
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, Mapping) else None
        if not isinstance(url, str):
            return f"Missing required parameter: '{where}.image_url.url'."
        if url.startswith("data:"):
            header, _, data = url.partition(",")
            media_type = header[5:].removesuffix(";base64")
            if not header.endswith(";base64") or media_type not in IMAGE_MEDIA_TYPES:
                return "Invalid image data URL: expected data:image/(jpeg|png|gif|webp);base64,..."
            if not _base64_ok(data):
                return "You uploaded an unsupported image. Please make sure your image is valid."
            return None
        if not url.startswith(("https://", "http://")):
            return f"Invalid 'image_url.url' in '{where}': expected a URL or a data URL."
        return None
    return (
        f"Invalid value: '{kind}'. Supported values are: 'text', 'image_url', 'input_audio', "
        "'refusal', 'audio', and 'file'."
    )


_Problem: TypeAlias = tuple[str, str]
"""A Chat Completions 400: the message and its ``param``."""


def _openai_tools(tools: object, names: list[str]) -> _Problem | None:
    """Check ``tools``, appending each function's name to ``names``."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        return "Invalid type for 'tools': expected an array.", "tools"
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            return f"Invalid type for 'tools[{index}]': expected an object.", "tools"
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, Mapping):
            return f"Missing required parameter: 'tools[{index}].function'.", "tools"
        if not isinstance(function.get("name"), str):
            return f"Missing required parameter: 'tools[{index}].function.name'.", "tools"
        if "parameters" in function and not isinstance(function["parameters"], Mapping):
            return f"Invalid type for 'tools[{index}].function.parameters'.", "tools"
        names.append(function["name"])
    return None


def _openai_tool_choice(choice: object, names: list[str]) -> _Problem | None:
    if choice is None:
        return None
    param = "tool_choice"
    if not names:
        return (
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
            "are specified.",
            "tool_choice",
        )
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if choice.get("type") != "function" or name not in names:
            return f"Invalid value for 'tool_choice': no function named {name!r}.", param
    elif choice not in ("auto", "none", "required"):
        return (
            f"Invalid value: '{choice}'. Supported values are: 'none', 'auto', and 'required'.",
            param,
        )
    return None


def _openai_response_format(fmt: object) -> _Problem | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind not in ("text", "json_object", "json_schema"):
        return "Invalid value for 'response_format.type'.", "response_format"
    assert isinstance(fmt, Mapping)
    spec = fmt.get("json_schema")
    if kind == "json_schema" and (
        not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str)
    ):
        name_param = "response_format.json_schema.name"
        return f"Missing required parameter: '{name_param}'.", name_param
    return None


def _unanswered(pending: list[str]) -> _Problem:
    return (
        "An assistant message with 'tool_calls' must be followed by tool messages "
        "responding to each 'tool_call_id'. The following tool_call_ids did not have "
        f"response messages: {', '.join(pending)}",
        "messages",
    )


def _openai_assistant(index: int, message: Mapping[str, Any]) -> _Problem | list[str]:
    """An assistant message's problem, or the ids of its tool calls (to be answered next)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        where = f"messages[{index}].tool_calls"
        return f"Invalid type for '{where}'.", f"messages.[{index}].tool_calls"
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if (
            not isinstance(function, Mapping)
            or not isinstance(call.get("id"), str)
            or not isinstance(function, Mapping)
            or not isinstance(function.get("arguments"), str)
        ):
            return (
                f"Invalid 'messages[{index}].tool_calls[{n}]': needs id and "
                "function.name / function.arguments (a string).",
                f"messages.[{index}].tool_calls",
            )
    if message.get("content") is None and not calls:
        where = f"messages[{index}].content"
        return f"Missing required parameter: '{where}'.", f"messages.[{index}].content"
    return [call["id"] for call in calls]


def _openai_messages(messages: object) -> _Problem | None:
    """Content parts, and tool calls each answered by a tool message before anything else."""
    assert isinstance(messages, list)
    pending: list[str] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, list):
            for n, part in enumerate(content):
                problem = _openai_part(part, f"messages[{index}].content[{n}]")
                if problem:
                    return problem, f"messages.[{index}].content.[{n}]"
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                return (
                    "Missing parameter 'tool_call_id': messages with role 'tool' must have a "
                    "'tool_call_id'.",
                    f"messages.[{index}].tool_call_id",
                )
            if call_id not in pending:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{index}].role",
                )
            pending.remove(call_id)
            continue
        if pending:
            return _unanswered(pending)
        if role == "assistant":
            answer = _openai_assistant(index, message)
            if isinstance(answer, tuple):
                return answer
            pending = answer
    return _unanswered(pending) if pending else None


def check_openai(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """Chat Completions' 400 (message, param) for a bad tool, part or pairing; None if fine."""
    names: list[str] = []
    return (
        _openai_tools(body.get("tools"), names)
        or _openai_tool_choice(body.get("tool_choice"), names)
        or _openai_response_format(body.get("response_format"))
        or _openai_messages(body.get("messages"))
    )
