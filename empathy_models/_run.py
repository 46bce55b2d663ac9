"""
One run's state and the request it sends: the prompt turned into messages, the
request per model, the helpers `EmpathyLLMExecutor.run` and `stream` share.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any, Final

from ._fast import trusted_constructor
from ._request_options import NO_OPTIONS
from ._text import utf8_size
from ._values import AttemptSummary, ExecutionContext
from .abc import CompletionRequest, Message, split_system
from .content import ImageBlock, ResponseFormat, TextBlock, Tool, ToolCall, ToolResult
from .exceptions import ConfigurationError, RecordValidationError
from .limits.values import WORST_PER_ESTIMATE, CacheWrite
from .records import RoutingDecision
from .registry import ModelInfo

__all__ = ["Prompt"]

_trusted_message: Callable[..., Message] = trusted_constructor(Message)

Prompt = str | Sequence[Message | Mapping[str, Any]]
"""A string (one user message), or `Message` objects and OpenAI-style message dicts."""


def _to_messages(prompt: Prompt, system: str | None) -> tuple[tuple[Message, ...], str | None]:
    """The messages to send and the system prompt (system messages folded into it)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigurationError("prompt is empty: there is nothing to send")
        # a user message of text: nothing for Message's checks to check
        message = _trusted_message(role="user", content=prompt, tool_calls=(), tool_call_id=None)
        return (message,), system
    given: object = prompt  # checked as what it is, not as what it is annotated to be
    if isinstance(given, Mapping | bytes | bytearray | memoryview) or not isinstance(
        given, Sequence
    ):
        raise ConfigurationError(
            "prompt must be a string or a non-empty list of messages (Message objects or "
            f"{{'role': ..., 'content': ...}} dicts), got {type(given).__name__}"
        )
    try:
        messages = tuple(Message.of(item, index=i) for i, item in enumerate(prompt))
    except RecordValidationError as exc:
        raise ConfigurationError(f"prompt {exc}") from None
    messages, system = split_system(messages, system)
    if not messages:
        raise ConfigurationError(
            "prompt must hold at least one user or assistant message"
            + (" (system messages become the system prompt)" if prompt else "")
        )
    if not any(m.text.strip() or not isinstance(m.content, str) or m.tool_calls for m in messages):
        raise ConfigurationError("prompt is empty: every message's content is blank")
    return messages, system


_trusted_request: Callable[..., CompletionRequest] = trusted_constructor(CompletionRequest)
_NO_REQUEST_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "tools": (),
        "tool_choice": None,
        "response_format": None,
        "stop": (),
        "top_p": None,
        "seed": None,
        "extra_body": None,
    }
)
# every option at its default unless the run gives it: `partial` merges the keywords in C
# (~0.5 µs less than unpacking the merged mapping in Python)
_request_with_defaults: Callable[..., CompletionRequest] = partial(
    _trusted_request, **_NO_REQUEST_OPTIONS
)


def _max_tokens_for(info: ModelInfo, context: ExecutionContext) -> int:
    """
    The output tokens ``info`` is asked for: ``context.max_tokens``, or the model's own
    limit (`ModelInfo.max_output_tokens`) when that is lower, since a provider refuses a
    request asking for more (a 400, which no retry or fallback would get past).
    """
    asked = context.max_tokens
    most = info.max_output_tokens
    return asked if asked <= most else most


def _request_for(info: ModelInfo, run: _Run) -> CompletionRequest:
    """
    ``run``'s request to ``info``, built without re-validating what is already valid:
    the messages (system messages split off) from `_to_messages`, ``max_tokens``
    (`_max_tokens_for`) and ``temperature`` from the `ExecutionContext`, the options
    from `run_options`.
    """
    ctx = run.context
    return _request_with_defaults(
        model=info.id,
        messages=run.messages,
        system=run.system,
        max_tokens=_max_tokens_for(info, ctx),
        temperature=ctx.temperature,
        **run.options,
    )


_FRAME_TOKENS: Final = 8
"""Tokens allowed per message, for the system prompt and for the reply: roles, delimiters."""

_IMAGE_TOKENS: Final = 1_600
"""
Tokens allowed per image: the most Anthropic's models and GPT-4o count for one (each
resizes a larger image).  A model that counts an image as more tokens at a lower price
(gpt-4o-mini) can cost more than this allows: images are estimated, not bounded.
"""


_TOOL_USE_TOKENS: Final = 600
"""
Tokens allowed for the system prompt a provider adds to a request that offers tools or
asks for a JSON schema: Anthropic lists up to 530 for its tool use ("Tool use pricing
and tokens": Claude 3 Opus, ``tool_choice`` auto), beside the definitions themselves.
"""


def _estimate_tokens(
    messages: Sequence[Message], system: str | None, options: Mapping[str, Any] = NO_OPTIONS
) -> int:
    """
    The prompt's token estimate: a quarter of its worst case, rounded up, so that
    `WORST_PER_ESTIMATE` (4) times it is the worst case.

    The worst case counts a token per UTF-8 byte of the text sent (a byte-level
    tokenizer never makes more: text, tool calls' names, arguments and ids, the system
    prompt), plus `_FRAME_TOKENS` per message, for the system prompt and for the reply,
    and `_IMAGE_TOKENS` per image; and, from the request ``options`` (`run_options`),
    what the provider counts as input beside the messages (`_options_worst`): the tool
    definitions, a structured-output schema and ``extra_body``.  A quarter of it is
    about what providers count for English text (four bytes a token): the router and
    rate limits use the estimate, budgets reserve the worst case.
    """
    worst = _FRAME_TOKENS * (len(messages) + 1)
    if system:
        worst += _FRAME_TOKENS + utf8_size(system)
    for m in messages:
        content = m.content
        worst += utf8_size(content) if isinstance(content, str) else sum(map(_block_worst, content))
        if m.tool_calls:
            worst += sum(map(_block_worst, m.tool_calls))
        if m.tool_call_id is not None:
            worst += utf8_size(m.tool_call_id)
    if options:
        worst += _options_worst(options)
    return -(-worst // WORST_PER_ESTIMATE)


def _options_worst(options: Mapping[str, Any]) -> int:
    """
    The worst case in tokens of what a request sends as input beside its messages: each
    tool's name, description and parameters' JSON (a token per UTF-8 byte) with
    `_FRAME_TOKENS`, a structured-output schema's name and JSON likewise, and
    `_TOOL_USE_TOKENS` once when there is either (the provider's own system prompt for
    them); ``extra_body``'s JSON whole, since what it holds is sent (a system prompt in
    blocks marked for caching, say).
    """
    worst = 0
    tools = options.get("tools")
    if tools:
        worst += _TOOL_USE_TOKENS + sum(map(_definition_worst, tools))
    fmt = options.get("response_format")
    if fmt is not None:
        worst += _definition_worst(fmt) + (0 if tools else _TOOL_USE_TOKENS)
    extra = options.get("extra_body")
    if extra:
        worst += _json_len(extra)
    return worst


_DEFINITIONS: dict[int, tuple[weakref.ref[Tool | ResponseFormat], int]] = {}
"""
Each live tool's and schema's worst case by its id, dropped when it is collected: runs
reuse their tools (by identity: their equality compares the JSON this spares).
"""


def _definition_worst(item: Tool | ResponseFormat) -> int:
    # a tool's or a schema's worst case in tokens (see `_options_worst`), computed once
    key = id(item)
    known = _DEFINITIONS.get(key)
    if known is not None and known[0]() is item:
        return known[1]
    if isinstance(item, Tool):
        worst = utf8_size(item.name) + utf8_size(item.description or "")
        worst += _json_len(item.parameters)
    else:
        worst = utf8_size(item.name) + _json_len(item.schema)
    worst += _FRAME_TOKENS
    _DEFINITIONS[key] = (weakref.ref(item, partial(_forget, key)), worst)
    return worst


def _forget(key: int, ref: weakref.ref[Tool | ResponseFormat]) -> None:
    # an item collected: its entry goes, unless a newer item under its id replaced it
    known = _DEFINITIONS.get(key)
    if known is not None and known[0] is ref:
        del _DEFINITIONS[key]


def _as_dict(value: object) -> dict[Any, Any]:
    # `_COMPACT`'s reading of what is not a dict, list or tuple: a mapping as a dict,
    # anything else refused as `json.dumps` refuses it
    if isinstance(value, Mapping):
        return dict(value.items())
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_COMPACT: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_as_dict)
"""
A JSON value's compact text, as the provider reads it.  The values it measures are
plain JSON already, copied when they were converted (a `Tool`'s parameters and a
`ResponseFormat`'s schema when it was built, ``extra_body`` by `run_options`), so it
encodes them as they are, without a copy of its own.
"""


def _json_len(value: object) -> int:
    # the UTF-8 bytes of a JSON value's compact text (`_COMPACT`)
    return utf8_size(_COMPACT.encode(value))


def _asked_tier(options: Mapping[str, Any]) -> str | None:
    # the service tier ``extra_body`` asks for (OpenAI's "flex", "priority", ...)
    extra = options.get("extra_body")
    tier = extra.get("service_tier") if isinstance(extra, Mapping) else None
    return tier if isinstance(tier, str) else None


def _cache_write(options: Mapping[str, Any]) -> CacheWrite:
    """
    The prompt-cache writes ``options`` ask for, which a call is billed at the cache
    write price (Anthropic's ``cache_control``; a request can mark parts only in its
    ``extra_body``): "1h" when a ``cache_control`` there asks for the 1-hour cache
    (``"ttl": "1h"``), "5m" when one asks for any other; None when none does.
    """
    extra = options.get("extra_body")
    if not extra:
        return None
    found: CacheWrite = None
    pending: list[object] = [extra]
    while pending:  # not recursive: the body may be nested as deep as JSON goes
        value = pending.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                if key != "cache_control":
                    pending.append(item)
                elif item is None:  # JSON null: nothing marked
                    continue
                elif isinstance(item, Mapping) and item.get("ttl") == "1h":
                    return "1h"
                else:
                    found = "5m"
        elif isinstance(value, list | tuple):
            pending.extend(value)
    return found


_OUTPUT_CAPS: Final = ("max_tokens", "max_completion_tokens")
"""The body fields that cap a call's output (Anthropic's; OpenAI's two)."""


def _output_cap(max_tokens: int, options: Mapping[str, Any]) -> int | None:
    """
    The most output tokens a request with ``options`` may be billed: ``max_tokens``
    (the context's), or a larger cap ``extra_body`` sends (``max_tokens`` or
    ``max_completion_tokens``: it is merged over the body, so its value is what the
    provider reads); None when it sets one to what is no integer >= 1 (``null``: no
    cap of the request's own, so as much as the model writes).
    """
    extra = options.get("extra_body")
    if not extra:
        return max_tokens
    cap = max_tokens
    for name in _OUTPUT_CAPS:
        if name in extra:
            value = extra[name]
            if type(value) is not int or value < 1:
                return None
            cap = max(cap, value)
    return cap


def _block_worst(block: object) -> int:
    # the worst case in tokens of one content block (see `_estimate_tokens`)
    if isinstance(block, TextBlock):
        return utf8_size(block.text)
    if isinstance(block, ImageBlock):
        return _IMAGE_TOKENS
    if isinstance(block, ToolCall):
        return utf8_size(block.id) + utf8_size(block.name) + utf8_size(block.arguments_json)
    if isinstance(block, ToolResult):
        content = block.content
        inner = utf8_size(content) if isinstance(content, str) else sum(map(_block_worst, content))
        return utf8_size(block.tool_call_id) + inner
    return 0


def _prompt_text(messages: Sequence[Message], system: str | None) -> str:
    parts = [f"system: {system}"] if system else []
    parts.extend(f"{m.role}: {m.text}" for m in messages)
    return "\n".join(parts)


def _plain_non_negative(value: object) -> bool:
    # what LLMCallRecord accepts for a float field: a finite int or float >= 0, not a bool
    if type(value) is float or type(value) is int:
        return 0 <= value < math.inf
    return False


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool) and status >= 0:
        return status
    return None


def _describe(exc: BaseException) -> str:
    status = _status_of(exc)
    return f"{type(exc).__name__}" + ("" if status is None else f" ({status})")


# --------------------------------------------------------------------------- per-run state


class _Run:
    """
    Everything one `run` or `stream` call accumulates; never shared between calls.

    Its routes come from `planned` (after the response cache missed, when it is read): a
    run answered from the cache has no route and no routing decision (``original`` unset).
    """

    __slots__ = (
        "_estimate",
        "attempts",
        "attempts_cost",
        "cache_write",
        "chain",
        "context",
        "decision",
        "errors",
        "messages",
        "options",
        "original",
        "output_cap",
        "prompt_text",
        "request_id",
        "service_tier",
        "system",
        "task_type",
    )

    original: ModelInfo
    """The first route planned (`planned`)."""

    def __init__(
        self,
        context: ExecutionContext,
        messages: tuple[Message, ...],
        task_type: str,
        system: str | None,
        options: Mapping[str, Any] = NO_OPTIONS,
    ) -> None:
        self.options = options
        self.context = context
        self.messages = messages
        self.decision: RoutingDecision | None = None
        self.request_id = os.urandom(16).hex()
        self.attempts: list[AttemptSummary] = []
        self.attempts_cost = 0.0  # the answering attempt's cost, as its record has it
        self.errors: list[Exception] = []
        self.chain: list[str] = []
        self.task_type = task_type
        self.system = system
        self.prompt_text = _prompt_text(messages, system) if context.record_text else None
        # the prompt-cache writes the request asks for: its prompt's worst case is
        # reserved at the cache write price (`Limiter.estimate`)
        self.cache_write = None if options is NO_OPTIONS else _cache_write(options)
        # the service tier ``extra_body`` asks for: budgets reserve at its prices (`priced`)
        self.service_tier = None if options is NO_OPTIONS else _asked_tier(options)
        # the output the request may be billed, when extra_body raises or lifts the
        # context's max_tokens (`max_output`)
        self.output_cap = (
            context.max_tokens
            if options is NO_OPTIONS
            else _output_cap(context.max_tokens, options)
        )
        self._estimate: int | None = None

    def planned(self, plan: tuple[list[ModelInfo], RoutingDecision | None]) -> list[ModelInfo]:
        """The planner's routes (never empty) and decision, taken as this run's; the routes."""
        routes, self.decision = plan
        self.original = routes[0]
        return routes

    def priced(self, info: ModelInfo) -> ModelInfo:
        """
        ``info`` at the prices of the service tier the request asks for
        (``extra_body["service_tier"]``, `ModelInfo.at_service_tier`), which budgets
        reserve a call at; ``info`` when it asks for none or one the entry does not price.
        """
        tier = self.service_tier
        return info if tier is None else info.at_service_tier(tier)

    def max_output(self, info: ModelInfo) -> int:
        """
        The most output tokens a call of this request to ``info`` may be billed, what
        budgets reserve and rate limits count: the ``max_tokens`` it is asked for
        (`_max_tokens_for`), or a larger cap ``extra_body`` sends in its place, never
        more than the model writes (a provider refuses to be asked for more); the
        model's longest output when ``extra_body`` lifts the cap (``null``:
        `_output_cap`).
        """
        cap = self.output_cap
        most = info.max_output_tokens
        return most if cap is None or cap > most else cap

    def routed_cap(self, models: Sequence[ModelInfo]) -> int:
        """
        The output cap the router judges ``models``' cost of this request by: the one
        it sends (`_output_cap`: ``max_tokens``, or a larger cap ``extra_body`` sends),
        or, when ``extra_body`` lifts the cap, the longest output of ``models`` (the
        router bounds each model's cap by its own ``max_output_tokens``, as
        `max_output` does).
        """
        cap = self.output_cap
        if cap is None:
            return max((m.max_output_tokens for m in models), default=self.context.max_tokens)
        return cap

    def estimate(self) -> int:
        """
        The request's input token estimate (`_estimate_tokens`), computed once: the
        router's decision (`_Planner.plan`) and the budgets' reservations see one value.
        """
        estimate = self._estimate
        if estimate is None:
            estimate = self._estimate = _estimate_tokens(self.messages, self.system, self.options)
        return estimate


class _DeadlineExceeded(Exception):
    """Internal: the overall deadline passed; ``error`` is still to be added to the group."""

    def __init__(self, error: Exception | None) -> None:
        super().__init__(str(error))
        self.error = error
