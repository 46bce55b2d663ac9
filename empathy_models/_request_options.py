"""
The request options of `EmpathyLLMExecutor.run` beyond the prompt: tools, tool choice,
structured output, stop sequences, ``top_p``, ``seed`` and the ``extra_body``
passthrough.  Validated once per run (bad input raises `ConfigurationError` naming the
option) and then handed to every route's `CompletionRequest`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ._jsonschema import parse_structured
from .abc import Completion
from .content import (
    ResponseFormat,
    check_options,
    to_extra_body,
    to_response_format,
    to_stop,
    to_tools,
)
from .exceptions import ConfigurationError, RecordValidationError

__all__ = ["NO_OPTIONS", "run_options", "structured_result"]

NO_OPTIONS: Final[Mapping[str, Any]] = {}


def run_options(
    *,
    tools: object,
    tool_choice: object,
    response_format: object,
    stop: object,
    top_p: object,
    seed: object,
    extra_body: object,
) -> Mapping[str, Any]:
    """The `CompletionRequest` keyword arguments for these options (validated)."""
    if (
        tools is None
        and tool_choice is None
        and response_format is None
        and stop is None
        and top_p is None
        and seed is None
        and extra_body is None
    ):
        return NO_OPTIONS
    try:
        options: dict[str, Any] = {
            "tools": to_tools(tools),
            "tool_choice": tool_choice,
            "response_format": to_response_format(response_format),
            "stop": to_stop(stop),
            "top_p": top_p,
            "seed": seed,
            "extra_body": to_extra_body(extra_body),
        }
        check_options(tools=options["tools"], tool_choice=tool_choice, top_p=top_p, seed=seed)
    except RecordValidationError as exc:
        raise ConfigurationError(str(exc)) from None
    if isinstance(extra_body := options["extra_body"], Mapping):
        clash = sorted({"model", "messages"} & set(extra_body))
        if clash:
            raise ConfigurationError(
                f"extra_body must not set {', '.join(clash)}: the executor sets them per route"
            )
    return options


def structured_result(completion: Completion, options: Mapping[str, Any]) -> tuple[Any, str | None]:
    """``(parsed, parse_error)`` for a completion of a run with a ``response_format``."""
    fmt = options.get("response_format")
    if not isinstance(fmt, ResponseFormat):
        return None, None
    if completion.tool_calls and not completion.content:
        return None, "the model called a tool instead of answering"
    return parse_structured(completion.content, fmt.schema)
