"""
How `FakeLLMServer` checks the content of a request as each real API does: tools and
their JSON schemas (and what OpenAI's strict mode adds: closed objects, every property
required), tool choices, content blocks (Anthropic) and parts (OpenAI), the
JSON output format, and the pairing of tool calls with their results.  Each check
returns the API's error for the first thing wrong, or None.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeAlias

from .._jsonschema import schema_problem
from .._validators import shown
from ..content import IMAGE_MEDIA_TYPES
from ._fake_wire import text_of

__all__ = ["Problem", "check_anthropic", "check_openai", "json_type"]

Problem: TypeAlias = tuple[str, str, str | None]
"""A Chat Completions 400: the message, its ``param`` and its ``code``."""

_MEDIA_TYPES_TEXT: Final = "'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
_SERVER_TOOL_TYPE: Final = re.compile(r"[a-z][a-z0-9_]*_[0-9]{8}")
"""A server tool's ``type``: its name and version date, such as ``web_search_20250305``."""
_OPENAI_TOOL_NAME: Final = re.compile(r"[a-zA-Z0-9_-]+")
"""A Chat Completions function's name (at most 64 characters, checked apart)."""
_OPENAI_ID_LENGTH: Final = 40
"""The longest tool call id (``messages[].tool_calls[].id``) Chat Completions takes."""
_ANTHROPIC_TOOL_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,128}")
"""A Messages API custom tool's name."""
_SCHEMA_INVALID: Final = (
    "JSON schema is invalid. It must match JSON Schema draft 2020-12 "
    "(https://json-schema.org/draft/2020-12)"
)


def _base64_ok(data: object) -> bool:
    if not isinstance(data, str) or not data:
        return False
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _schema_why(schema: Mapping[str, Any]) -> str | None:
    """What is wrong with a JSON schema, for a message; None when it is valid."""
    problem = schema_problem(schema)
    if problem is None:
        return None
    where, why = problem
    return f"{where.removeprefix('.') or '(the root)'} {why}"


# --------------------------------------------------------------------------- Anthropic

_BlockCheck: TypeAlias = Callable[[Mapping[str, Any], str, str], "str | None"]


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def _text_block(block: Mapping[str, Any], where: str, role: str) -> str | None:
    if not isinstance(block.get("text"), str):
        return f"{where}.text: Field required"
    if not block["text"]:  # in any role, in a tool result too
        return f"{where}: text content blocks must be non-empty"
    return None


def _image_block(block: Mapping[str, Any], where: str, role: str) -> str | None:
    source = block.get("source")
    if not isinstance(source, Mapping):
        return f"{where}.image.source: Field required"
    kind = source.get("type")
    if kind == "url":
        return (
            None
            if _is_url(source.get("url"))
            else f"{where}.image.source.url.url: Input should be a valid URL"
        )
    if kind == "file":
        if isinstance(source.get("file_id"), str):
            return None
        return f"{where}.image.source.file.file_id: Field required"
    if kind != "base64":
        return f"{where}.image.source: Input tag {shown(kind)} is not a valid source"
    if source.get("media_type") not in IMAGE_MEDIA_TYPES:
        return f"{where}.image.source.base64.media_type: Input should be {_MEDIA_TYPES_TEXT}"
    if not _base64_ok(source.get("data")):
        return f"{where}.image.source.base64: The image data is not valid base64"
    return None


def _document_source(source: Mapping[str, Any], where: str) -> str | None:
    kind = source.get("type")
    if kind == "base64":
        if source.get("media_type") != "application/pdf":
            return f"{where}.base64.media_type: Input should be 'application/pdf'"
        ok = _base64_ok(source.get("data"))
        return None if ok else f"{where}.base64: The PDF data is not valid base64"
    if kind == "text":
        if source.get("media_type") != "text/plain":
            return f"{where}.text.media_type: Input should be 'text/plain'"
        return None if isinstance(source.get("data"), str) else f"{where}.text.data: Field required"
    if kind == "content":
        content = source.get("content")
        if isinstance(content, str):
            return None
        if not isinstance(content, list):
            return f"{where}.content.content: Input should be a valid string or list"
        for index, item in enumerate(content):
            problem = _block(item, f"{where}.content.content.{index}", "user", ("text", "image"))
            if problem:
                return problem
        return None
    if kind == "url":
        return (
            None if _is_url(source.get("url")) else f"{where}.url.url: Input should be a valid URL"
        )
    if kind == "file":
        ok = isinstance(source.get("file_id"), str)
        return None if ok else f"{where}.file.file_id: Field required"
    return f"{where}: Input tag {shown(kind)} is not a valid source"


def _document_block(block: Mapping[str, Any], where: str, role: str) -> str | None:
    source = block.get("source")
    if not isinstance(source, Mapping):
        return f"{where}.document.source: Field required"
    for name in ("title", "context"):
        if block.get(name) is not None and not isinstance(block[name], str):
            return f"{where}.document.{name}: Input should be a valid string"
    return _document_source(source, f"{where}.document.source")


def _search_result_block(block: Mapping[str, Any], where: str, role: str) -> str | None:
    for name in ("source", "title"):
        if not isinstance(block.get(name), str):
            return f"{where}.search_result.{name}: Field required"
    content = block.get("content")
    if not isinstance(content, list):
        return f"{where}.search_result.content: Input should be a valid list"
    for index, item in enumerate(content):
        problem = _block(item, f"{where}.search_result.content.{index}", role, ("text",))
        if problem:
            return problem
    return None


def _fields(*names: str, assistant: bool = False) -> _BlockCheck:
    """A check that ``names`` are strings (and, with ``assistant``, the role is)."""

    def check(block: Mapping[str, Any], where: str, role: str) -> str | None:
        kind = block["type"]
        if assistant and role != "assistant":
            return f"{where}: {kind} blocks may only be in assistant messages"
        for name in names:
            if not isinstance(block.get(name), str):
                return f"{where}.{kind}.{name}: Field required"
        return None

    return check


def _tool_use_block(block: Mapping[str, Any], where: str, role: str) -> str | None:
    kind = block["type"]
    if role != "assistant":
        return f"{where}: {kind} blocks may only be in assistant messages"
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        return f"{where}.{kind}: id and name are required"
    if not isinstance(block.get("input"), Mapping):
        return f"{where}.{kind}.input: Input should be a valid dictionary"
    return None


_RESULT_CONTENT: Final = ("text", "image", "document", "search_result", "tool_reference")


def _tool_result_block(block: Mapping[str, Any], where: str, role: str) -> str | None:
    if role != "user":
        return f"{where}: tool_result blocks may only be in user messages"
    if not isinstance(block.get("tool_use_id"), str):
        return f"{where}.tool_result.tool_use_id: Field required"
    content = block.get("content", "")
    if isinstance(content, list):
        for index, item in enumerate(content):
            allowed = (*_RESULT_CONTENT, "browser_state")
            problem = _block(item, f"{where}.tool_result.content.{index}", "user", allowed)
            if problem:
                return problem
    elif not isinstance(content, str):
        return f"{where}.tool_result.content: Input should be a valid string or list"
    return None


def _server_result_block(block: Mapping[str, Any], where: str, role: str) -> str | None:
    kind = block["type"]
    if role != "assistant":
        return f"{where}: {kind} blocks may only be in assistant messages"
    if not isinstance(block.get("tool_use_id"), str):
        return f"{where}.{kind}.tool_use_id: Field required"
    return None if "content" in block else f"{where}.{kind}.content: Field required"


_BLOCKS: Final[dict[str, _BlockCheck]] = {
    "text": _text_block,
    "image": _image_block,
    "document": _document_block,
    "search_result": _search_result_block,
    "thinking": _fields("thinking", "signature", assistant=True),
    "redacted_thinking": _fields("data", assistant=True),
    "tool_use": _tool_use_block,
    "tool_result": _tool_result_block,
    "server_tool_use": _tool_use_block,
    "web_search_tool_result": _server_result_block,
    "web_fetch_tool_result": _server_result_block,
    "code_execution_tool_result": _server_result_block,
    "bash_code_execution_tool_result": _server_result_block,
    "text_editor_code_execution_tool_result": _server_result_block,
    "tool_search_tool_result": _server_result_block,
    "container_upload": _fields("file_id"),
    "tool_reference": _fields("tool_name"),
    "browser_state": lambda block, where, role: (
        None
        if isinstance(block.get("tabs"), list)
        else f"{where}.browser_state.tabs: Field required"
    ),
}
_MESSAGE_BLOCKS: Final = tuple(k for k in _BLOCKS if k not in ("tool_reference", "browser_state"))


def _block(
    block: object, where: str, role: str, allowed: Sequence[str] = _MESSAGE_BLOCKS
) -> str | None:
    if not isinstance(block, Mapping):
        return f"{where}: Input should be a valid dictionary"
    kind = block.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        expected = ", ".join(f"'{k}'" for k in allowed)
        return (
            f"{where}: Input tag {shown(kind)} found using 'type' does not match any of the "
            f"expected tags: {expected}"
        )
    return _BLOCKS[kind](block, where, role)


def _anthropic_tools(tools: object, names: list[str]) -> str | None:
    """Check ``tools``, appending each tool's name to ``names``."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            return f"tools.{index}: Input should be a valid dictionary"
        kind = tool.get("type")
        if kind is not None and kind != "custom":  # a server tool: no input_schema
            if not isinstance(kind, str) or not _SERVER_TOOL_TYPE.fullmatch(kind):
                return (
                    f"tools.{index}: Input tag {shown(kind)} found using 'type' does not match "
                    "any of the expected tags"
                )
            if not isinstance(tool.get("name"), str):
                return f"tools.{index}.{kind}.name: Field required"
            names.append(tool["name"])
            continue
        if not isinstance(tool.get("name"), str):
            return f"tools.{index}.custom.name: Field required"
        if not _ANTHROPIC_TOOL_NAME.fullmatch(tool["name"]):
            return (
                f"tools.{index}.custom.name: String should match pattern "
                f"'{_ANTHROPIC_TOOL_NAME.pattern.join('^$')}'"
            )
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping):
            return f"tools.{index}.custom.input_schema: Field required"
        if schema.get("type") != "object":
            return f"tools.{index}.custom.input_schema.type: Input should be 'object'"
        if why := _schema_why(schema):
            return f"tools.{index}.custom.input_schema: {_SCHEMA_INVALID}: {why}"
        names.append(tool["name"])
    return None


def _anthropic_tool_choice(choice: object, names: list[str]) -> str | None:
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    if kind not in ("auto", "any", "tool", "none"):
        return "tool_choice: Input tag does not match any of the expected tags"
    assert isinstance(choice, Mapping)
    if kind in ("any", "tool") and not names:
        return (
            f"tool_choice: tool_choice of type '{kind}' may only be specified while providing tools"
        )
    if kind == "tool" and choice.get("name") not in names:
        return f"tool_choice.tool.name: no tool named {shown(choice.get('name'))} in tools"
    return None


def _anthropic_output(config: object) -> str | None:
    if config is None:
        return None
    if not isinstance(config, Mapping):
        return "output_config: Input should be a valid dictionary"
    fmt = config.get("format")
    if fmt is None:
        return None
    schema = fmt.get("schema") if isinstance(fmt, Mapping) else None
    if not isinstance(schema, Mapping) or fmt.get("type") != "json_schema":
        return "output_config.format: expected {'type': 'json_schema', 'schema': {...}}"
    if why := _schema_why(schema):
        return f"output_config.format.schema: {_SCHEMA_INVALID}: {why}"
    return None


def _anthropic_messages(messages: list[Any]) -> str | None:
    pending: list[str] = []  # tool_use ids of the previous assistant turn
    for index, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        blocks: Sequence[Any] = content if isinstance(content, list) else ()
        if not isinstance(content, str | list):
            return f"messages.{index}.content: Input should be a valid string or list"
        if not content and (role != "assistant" or index < len(messages) - 1):
            return (
                f"messages.{index}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        for n, block in enumerate(blocks):
            problem = _block(block, f"messages.{index}.content.{n}", role)
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


def check_anthropic(body: Mapping[str, Any]) -> str | None:
    """The Messages API's 400 message for a bad tool, block or pairing; None if fine."""
    names: list[str] = []
    messages = body.get("messages")
    assert isinstance(messages, list)
    return (
        _anthropic_tools(body.get("tools"), names)
        or _anthropic_tool_choice(body.get("tool_choice"), names)
        or _anthropic_output(body.get("output_config"))
        or _anthropic_messages(messages)
    )


# --------------------------------------------------------------------------- OpenAI

_USER_PARTS: Final = ("text", "image_url", "input_audio", "file")
_PARTS_BY_ROLE: Final = {"user": _USER_PARTS, "assistant": ("text", "refusal")}


def _image_part(part: Mapping[str, Any], where: str) -> str | None:
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
    if not _is_url(url):
        return f"Invalid 'image_url.url' in '{where}': expected a URL or a data URL."
    return None


def _audio_part(part: Mapping[str, Any], where: str) -> str | None:
    audio = part.get("input_audio")
    if not isinstance(audio, Mapping) or not isinstance(audio.get("data"), str):
        return f"Missing required parameter: '{where}.input_audio.data'."
    if audio.get("format") not in ("wav", "mp3"):
        return (
            f"Invalid value: {shown(audio.get('format'))}. Supported values are: 'wav' and 'mp3'."
        )
    if not _base64_ok(audio["data"]):
        return f"Invalid '{where}.input_audio.data': expected base64-encoded audio."
    return None


def _file_part(part: Mapping[str, Any], where: str) -> str | None:
    spec = part.get("file")
    if not isinstance(spec, Mapping):
        return f"Missing required parameter: '{where}.file'."
    if not isinstance(spec.get("file_id"), str) and not isinstance(spec.get("file_data"), str):
        return f"Invalid '{where}.file': one of 'file_id' or 'file_data' is required."
    return None


def _openai_part(part: object, where: str, role: str) -> str | None:
    if not isinstance(part, Mapping):
        return f"Invalid type for '{where}': expected an object."
    kind = part.get("type")
    allowed = _PARTS_BY_ROLE.get(role, ("text",))
    if kind not in allowed:
        if role == "user":
            return (
                f"Invalid value: {shown(kind)}. Supported values are: 'text', 'image_url', "
                "'input_audio', 'refusal', 'audio', and 'file'."
            )
        listed = " and ".join(f"'{k}'" for k in allowed)
        return f"Invalid value: {shown(kind)}. Supported values are: {listed}."
    if kind in ("text", "refusal"):
        if isinstance(part.get(kind), str):
            return None
        return f"Missing required parameter: '{where}.{kind}'."
    if kind == "image_url":
        return _image_part(part, where)
    if kind == "input_audio":
        return _audio_part(part, where)
    return _file_part(part, where)


def _is_object_schema(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind)


def _strict_subschemas(schema: Mapping[str, Any]) -> list[tuple[Any, tuple[str, ...]]]:
    """The subschemas of ``schema`` strict mode holds to its rules, with their context."""
    out: list[tuple[Any, tuple[str, ...]]] = []
    for key in ("properties", "$defs", "definitions"):
        subs = schema.get(key)
        if isinstance(subs, Mapping):
            out.extend((sub, (key, name)) for name, sub in subs.items())
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        subs = schema.get(key)
        if isinstance(subs, list):
            out.extend((sub, (key, str(i))) for i, sub in enumerate(subs))
    out.extend((schema[key], (key,)) for key in ("items", "additionalProperties") if key in schema)
    return out


def _strict_why(schema: Mapping[str, Any]) -> str | None:
    """
    Why OpenAI's strict mode (``strict: true``) refuses a schema it would otherwise take:
    an object that does not set ``additionalProperties`` to false, or does not require
    every one of its properties.  None when strict mode takes it.
    """
    todo: list[tuple[Any, tuple[str, ...]]] = [(schema, ())]
    seen: set[int] = set()
    while todo:
        node, context = todo.pop(0)
        if not isinstance(node, Mapping) or id(node) in seen:
            continue
        seen.add(id(node))
        if _is_object_schema(node) or "properties" in node:
            if node.get("additionalProperties") is not False:
                return (
                    f"In context={context!r}, 'additionalProperties' is required to be "
                    "supplied and to be false."
                )
            required = node.get("required", [])
            missing = [name for name in node.get("properties", {}) if name not in required]
            if missing:
                return (
                    f"In context={context!r}, 'required' is required to be supplied and to be "
                    f"an array including every key in properties. Missing {missing[0]!r}."
                )
        todo.extend((sub, context + path) for sub, path in _strict_subschemas(node))
    return None


def _openai_tools(tools: object, names: list[str]) -> Problem | None:
    """Check ``tools``, appending each function's name to ``names``."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        return "Invalid type for 'tools': expected an array.", "tools", "invalid_type"
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            return f"Invalid type for 'tools[{index}]': expected an object.", "tools", None
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, Mapping):
            return f"Missing required parameter: 'tools[{index}].function'.", "tools", None
        name = function.get("name")
        if not isinstance(name, str):
            return f"Missing required parameter: 'tools[{index}].function.name'.", "tools", None
        if problem := _openai_tool_name(name, f"tools[{index}].function.name"):
            return problem
        param = f"tools[{index}].function.parameters"
        parameters = function.get("parameters", {})
        if not isinstance(parameters, Mapping):
            return f"Invalid type for '{param}'.", "tools", None
        if why := _schema_why(parameters):
            message = f"Invalid schema for function {shown(name)}: {why}."
            return message, param, "invalid_function_parameters"
        if function.get("strict") is True and (why := _strict_why(parameters)):
            message = f"Invalid schema for function {shown(name)}: {why}"
            return message, param, "invalid_function_parameters"
        names.append(name)
    return None


def _openai_tool_name(name: str, param: str) -> Problem | None:
    """What the API says of a function name it refuses; None for a valid one."""
    if len(name) > 64:
        why = (
            f"string too long. Expected a string with maximum length 64, but got a string "
            f"with length {len(name)} instead."
        )
        return f"Invalid '{param}': {why}", param, "string_above_max_length"
    if not _OPENAI_TOOL_NAME.fullmatch(name):
        why = (
            "string does not match pattern. Expected a string that matches the pattern "
            f"'{_OPENAI_TOOL_NAME.pattern.join('^$')}'."
        )
        return f"Invalid '{param}': {why}", param, "invalid_value"
    return None


def _openai_tool_choice(choice: object, names: list[str]) -> Problem | None:
    if choice is None:
        return None
    param = "tool_choice"
    if not names:
        return (
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
            "are specified.",
            param,
            None,
        )
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if choice.get("type") != "function" or name not in names:
            return f"Invalid value for 'tool_choice': no function named {shown(name)}.", param, None
    elif choice not in ("auto", "none", "required"):
        return (
            f"Invalid value: {shown(choice)}. Supported values are: 'none', 'auto', and "
            "'required'.",
            param,
            None,
        )
    return None


def _openai_response_format(fmt: object, messages: list[Any]) -> Problem | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind not in ("text", "json_object", "json_schema"):
        return "Invalid value for 'response_format.type'.", "response_format", None
    assert isinstance(fmt, Mapping)
    if kind == "json_object":
        said = "".join(text_of(m.get("content")) for m in messages).lower()
        if "json" not in said:
            return (
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'.",
                "messages",
                None,
            )
        return None
    spec = fmt.get("json_schema")
    if kind == "json_schema":
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            name_param = "response_format.json_schema.name"
            return f"Missing required parameter: '{name_param}'.", name_param, None
        schema = spec.get("schema", {})
        if not isinstance(schema, Mapping):
            return "Invalid type for 'response_format.json_schema.schema'.", "response_format", None
        if why := _schema_why(schema):
            message = f"Invalid schema for response_format {shown(spec['name'])}: {why}."
            return message, "response_format", None
        if spec.get("strict") is True and (why := _strict_why(schema)):
            message = f"Invalid schema for response_format {shown(spec['name'])}: {why}"
            return message, "response_format", None
    return None


def _unanswered(pending: list[str]) -> Problem:
    return (
        "An assistant message with 'tool_calls' must be followed by tool messages "
        "responding to each 'tool_call_id'. The following tool_call_ids did not have "
        f"response messages: {', '.join(pending)}",
        "messages",
        None,
    )


def _openai_assistant(index: int, message: Mapping[str, Any]) -> Problem | list[str]:
    """An assistant message's problem, or the ids of its tool calls (to be answered next)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        where = f"messages[{index}].tool_calls"
        return f"Invalid type for '{where}'.", f"messages.[{index}].tool_calls", "invalid_type"
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if (
            not isinstance(function, Mapping)
            or not isinstance(call.get("id"), str)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            return (
                f"Invalid 'messages[{index}].tool_calls[{n}]': needs id and "
                "function.name / function.arguments (a string).",
                f"messages.[{index}].tool_calls",
                None,
            )
        if len(call["id"]) > _OPENAI_ID_LENGTH:
            where = f"messages[{index}].tool_calls[{n}].id"
            return (
                f"Invalid '{where}': string too long. Expected a string with maximum length "
                f"{_OPENAI_ID_LENGTH}, but got a string with length {len(call['id'])} instead.",
                where,
                "string_above_max_length",
            )
    if message.get("content") is None and not calls:
        where = f"messages[{index}].content"
        return f"Missing required parameter: '{where}'.", f"messages.[{index}].content", None
    return [call["id"] for call in calls]


_JSON_TYPES: Final = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a decimal"),
    (str, "a string"),
    (list, "an array"),
    (Mapping, "an object"),
)


def json_type(value: object) -> str:
    """``value``'s JSON type with its article, as OpenAI's messages name it."""
    for kind, name in _JSON_TYPES:
        if isinstance(value, kind):
            return name
    return "null"


def _openai_content(index: int, message: Mapping[str, Any]) -> Problem | None:
    """A message's ``content``: a string or a non-empty list of the role's parts."""
    role = message.get("role")
    param = f"messages.[{index}].content"
    where = f"messages[{index}].content"
    if "content" not in message and role != "assistant":
        return f"Missing required parameter: '{where}'.", param, None
    content = message.get("content")
    if content is None and role == "assistant":
        return None
    if not isinstance(content, str | list):
        return (
            f"Invalid type for '{where}': expected one of a string or array of objects, but "
            f"got {json_type(content)} instead.",
            param,
            "invalid_type",
        )
    if isinstance(content, list):
        if not content:
            return (
                f"Invalid '{where}': empty array. Expected an array with minimum length 1, but "
                "got an empty array instead.",
                param,
                "empty_array",
            )
        for n, part in enumerate(content):
            problem = _openai_part(part, f"{where}[{n}]", str(role))
            if problem:
                return problem, f"{param}.[{n}]", None
    return None


def _openai_messages(messages: list[Any]) -> Problem | None:
    """Content parts, and tool calls each answered by a tool message before anything else."""
    pending: list[str] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if problem := _openai_content(index, message):
            return problem
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                return (
                    "Missing parameter 'tool_call_id': messages with role 'tool' must have a "
                    "'tool_call_id'.",
                    f"messages.[{index}].tool_call_id",
                    None,
                )
            if call_id not in pending:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{index}].role",
                    None,
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


def check_openai(body: Mapping[str, Any]) -> Problem | None:
    """Chat Completions' 400 (message, param, code) for a bad tool, part or pairing."""
    names: list[str] = []
    messages = body.get("messages")
    assert isinstance(messages, list)
    return (
        _openai_tools(body.get("tools"), names)
        or _openai_tool_choice(body.get("tool_choice"), names)
        or _openai_response_format(body.get("response_format"), messages)
        or _openai_messages(messages)
    )
