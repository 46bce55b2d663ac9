"""
Scripted and generated answers for `FakeLLMServer`: tool calls and structured output.

`FakeReply` is a scripted answer (text, tool calls, JSON); `auto_reply` answers a
request that forces a tool or asks for JSON with a value generated from the schema
(`example_for`), so clients that rely on either get a well-formed answer without a
script.  The checks of tools, blocks and parts are in `_fake_checks`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import field, frozen

from .._validators import failure, instance_of, optional_str, shown
from ..abc import Completion
from ..content import ToolCall
from ..exceptions import RecordValidationError
from ._fake_schema import SchemaRefused, example_for

__all__ = ["AutoReplyRefused", "FakeReply", "auto_reply", "streamed_calls"]


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
_opt_usage = instance_of(
    failure(RecordValidationError),
    Mapping,
    why="must be a dict (the usage object) or None",
    optional=True,
)


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
        usage: the ``usage`` object sent instead of the counted one, as given (so a
            partial or malformed usage can be tested): a whole answer's ``usage``; in a
            stream, OpenAI's usage chunk (sent when the request asks for it with
            ``stream_options.include_usage``) and the ``usage`` of Anthropic's
            ``message_start`` and ``message_delta`` alike.  None: the counted usage.
            `FakeLLMServer` only (`FakeProvider`, which returns a `Completion`, ignores it).
    """

    content: str | None = field(default=None, validator=_opt_str)
    tool_calls: tuple[Mapping[str, Any], ...] = field(default=(), converter=_to_calls)
    json: Any = None
    stop_reason: str | None = field(default=None, validator=_opt_str)
    usage: Mapping[str, Any] | None = field(default=None, validator=_opt_usage)

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
        if reply.usage is not None:
            payload["usage"] = dict(reply.usage)
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
    if reply.usage is not None:
        payload["usage"] = dict(reply.usage)


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


# --------------------------------------------------------------------------- answers


class AutoReplyRefused(Exception):
    """
    `auto_reply` made no answer: the schema it was to follow has no value the fake can
    make (see `example_for`).

    Args:
        message: The 400's message.
        param: OpenAI's ``param``: where the schema is.
    """

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _forced_tool(api: str, body: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], str] | None:
    """(name, input schema, param) of the tool the request forces a call of, or None."""
    given = body.get("tools")
    tools = [t for t in given if isinstance(t, Mapping)] if isinstance(given, list) else []
    choice = body.get("tool_choice")
    name: Any = None
    if api == "openai":
        schemas = {
            t["function"]["name"]: (
                t["function"].get("parameters") or {},
                f"tools[{i}].function.parameters",
            )
            for i, t in enumerate(tools)
            if isinstance(t.get("function"), Mapping)
        }
        if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
            name = choice["function"].get("name")
        elif choice == "required" and schemas:
            name = next(iter(schemas))
    else:
        # server tools (a type other than "custom") are run by the API, not answered here
        schemas = {
            t["name"]: (t.get("input_schema", {}), f"tools.{i}")
            for i, t in enumerate(tools)
            if t.get("type") in (None, "custom")
        }
        kind = choice.get("type") if isinstance(choice, Mapping) else None
        if isinstance(choice, Mapping) and kind == "tool":
            name = choice.get("name")
        elif kind == "any" and schemas:
            name = next(iter(schemas))
    if not isinstance(name, str) or name not in schemas:
        return None
    schema, param = schemas[name]
    return name, schema, param


def auto_reply(api: str, body: Mapping[str, Any]) -> FakeReply | None:
    """
    The answer to a request that forces a tool call (OpenAI ``"required"`` or a named
    function; Anthropic ``any`` or ``tool``) or asks for JSON (a JSON schema; OpenAI's
    ``json_object`` gets ``{}``); None for any other.

    Raises:
        AutoReplyRefused: The schema has no value the fake can make (`example_for`).
    """
    forced = _forced_tool(api, body)
    if forced is not None:
        name, schema, param = forced
        try:
            arguments = example_for({"type": "object", **schema})
        except SchemaRefused as refused:
            raise AutoReplyRefused(
                f"FakeLLMServer cannot make arguments for the tool {shown(name)}: "
                f"{refused.reason}. Script a FakeReply for this request instead.",
                param,
            ) from None
        return FakeReply(tool_calls=[{"name": name, "arguments": arguments}])
    if api == "openai":
        fmt = body.get("response_format")
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
            return FakeReply(json={})
    wanted = _json_schema_of(api, body)
    if wanted is None:
        return None
    try:
        return FakeReply(json=example_for(wanted))
    except SchemaRefused as refused:
        raise AutoReplyRefused(
            f"FakeLLMServer cannot make a value for the JSON schema: {refused.reason}. "
            "Script a FakeReply for this request instead.",
            "response_format" if api == "openai" else "output_config.format.schema",
        ) from None


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
