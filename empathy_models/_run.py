"""
One run's state and the request it sends: the prompt turned into messages, the
request per model, the helpers `EmpathyLLMExecutor.run` and `stream` share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any, Final

from ._fast import trusted_constructor
from ._request_options import NO_OPTIONS
from ._values import AttemptSummary, ExecutionContext
from .abc import CompletionRequest, Message, split_system
from .content import ImageBlock, TextBlock, ToolCall, ToolResult
from .exceptions import ConfigurationError, RecordValidationError
from .limits.values import WORST_PER_ESTIMATE
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


def _request_for(model: str, run: _Run) -> CompletionRequest:
    """
    ``run``'s request to ``model``, built without re-validating what is already valid:
    the messages (system messages split off) from `_to_messages`, ``max_tokens`` and
    ``temperature`` from the `ExecutionContext`, the options from `run_options`.
    """
    ctx = run.context
    return _request_with_defaults(
        model=model,
        messages=run.messages,
        system=run.system,
        max_tokens=ctx.max_tokens,
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


def _estimate_tokens(messages: Sequence[Message], system: str | None) -> int:
    """
    The prompt's token estimate: a quarter of its worst case, rounded up, so that
    `WORST_PER_ESTIMATE` (4) times it is the worst case.

    The worst case counts a token per UTF-8 byte of the text sent (a byte-level
    tokenizer never makes more: text, tool calls' names, arguments and ids, the system
    prompt), plus `_FRAME_TOKENS` per message, for the system prompt and for the reply,
    and `_IMAGE_TOKENS` per image.  A quarter of it is about what providers count for
    English text (four bytes a token): the router and rate limits use the estimate,
    budgets reserve the worst case.  Tool definitions are not counted (they are not
    passed here).
    """
    worst = _FRAME_TOKENS * (len(messages) + 1)
    if system:
        worst += _FRAME_TOKENS + _utf8_len(system)
    for m in messages:
        content = m.content
        worst += _utf8_len(content) if isinstance(content, str) else sum(map(_block_worst, content))
        if m.tool_calls:
            worst += sum(map(_block_worst, m.tool_calls))
        if m.tool_call_id is not None:
            worst += _utf8_len(m.tool_call_id)
    return -(-worst // WORST_PER_ESTIMATE)


def _utf8_len(text: str) -> int:
    # lone surrogates (which no provider accepts) count as the 3 bytes they would take
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _block_worst(block: object) -> int:
    # the worst case in tokens of one content block (see `_estimate_tokens`)
    if isinstance(block, TextBlock):
        return _utf8_len(block.text)
    if isinstance(block, ImageBlock):
        return _IMAGE_TOKENS
    if isinstance(block, ToolCall):
        return _utf8_len(block.id) + _utf8_len(block.name) + _utf8_len(block.arguments_json)
    if isinstance(block, ToolResult):
        content = block.content
        inner = _utf8_len(content) if isinstance(content, str) else sum(map(_block_worst, content))
        return _utf8_len(block.tool_call_id) + inner
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
    """Everything one `run` call accumulates; never shared between calls."""

    __slots__ = (
        "attempts",
        "attempts_cost",
        "chain",
        "context",
        "decision",
        "errors",
        "messages",
        "options",
        "original",
        "prompt_text",
        "request_id",
        "system",
        "task_type",
    )

    def __init__(
        self,
        context: ExecutionContext,
        messages: tuple[Message, ...],
        original: ModelInfo,
        decision: RoutingDecision | None,
        task_type: str,
        system: str | None,
        options: Mapping[str, Any] = NO_OPTIONS,
    ) -> None:
        self.options = options
        self.context = context
        self.messages = messages
        self.original = original
        self.decision = decision
        self.request_id = os.urandom(16).hex()
        self.attempts: list[AttemptSummary] = []
        self.attempts_cost = 0.0  # the answering attempt's cost, as its record has it
        self.errors: list[Exception] = []
        self.chain: list[str] = []
        self.task_type = task_type
        self.system = system
        self.prompt_text = _prompt_text(messages, system) if context.record_text else None


class _DeadlineExceeded(Exception):
    """Internal: the overall deadline passed; ``error`` is still to be added to the group."""

    def __init__(self, error: Exception | None) -> None:
        super().__init__(str(error))
        self.error = error
