"""
The request options of `EmpathyLLMExecutor.run` beyond the prompt: tools, tool choice,
structured output, stop sequences, ``top_p``, ``seed`` and the ``extra_body``
passthrough.  Validated once per run (bad input raises `ConfigurationError` naming the
option) and then handed to every route's `CompletionRequest`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from ._jsonschema import parse_structured
from ._validators import shown
from .abc import Completion, Message
from .content import (
    ImageBlock,
    ResponseFormat,
    ToolCall,
    ToolResult,
    check_options,
    to_extra_body,
    to_response_format,
    to_stop,
    to_tool_choice,
    to_tools,
)
from .exceptions import ConfigurationError, RecordValidationError
from .records import CandidateEvaluation
from .registry import ModelInfo

__all__ = [
    "NO_OPTIONS",
    "capable",
    "misplaced",
    "required_capabilities",
    "run_options",
    "structured_result",
]

NO_OPTIONS: Final[Mapping[str, Any]] = {}

_SET_BY_EXECUTOR: Final = frozenset({"model", "messages", "stream"})
"""
The body's keys ``extra_body`` may not set: a route's model and messages, and
``stream``, which says how the answer is read (a ``run`` given an event stream would
read it as a malformed answer, held against every model tried).
"""


def _check_choices(extra_body: Mapping[str, Any]) -> None:
    """
    Refuse an ``extra_body`` whose ``n`` (OpenAI's number of choices) asks for more
    than one answer: a run returns one (the first choice; a stream reads only it), so
    the others would be billed (every choice's output tokens) and thrown away, beyond
    what budgets reserve and rate limits count for one answer.  ``n`` 1 or ``null``
    passes.
    """
    if "n" not in extra_body:
        return
    n = extra_body["n"]
    if n is None or (type(n) is int and n == 1):
        return
    raise ConfigurationError(
        f"extra_body must not set n to {shown(n)}: a run returns one answer (the first "
        "choice), while every choice asked for is billed, beyond what budgets reserve "
        "and rate limits count; send n=1 or leave it out"
    )


_RUN_OPTIONS: Final = (
    "tools",
    "tool_choice",
    "response_format",
    "stop",
    "top_p",
    "seed",
    "extra_body",
)
"""The request options `EmpathyLLMExecutor.run` and ``stream`` take as keywords."""


_PROVIDERS_OWN: Final = frozenset({"api_key", "base_url", "api_base", "organization"})
"""Keywords of a provider's constructor that newcomers pass to a call."""

_KEY_HINT: Final = (
    "a key is the provider's, OpenAIProvider(api_key=...) or AnthropicProvider(api_key=...) "
    "(or its environment variable); extra_body is no place for it, as it goes in the body "
    "of every route's request, whichever provider serves it."
)


def misplaced(unknown: Mapping[str, object], call: str) -> TypeError:
    """
    The error for keyword arguments ``unknown`` that `EmpathyLLMExecutor` ``call``
    (``"run"`` or ``"stream"``) does not take, saying where each belongs: a setting of
    `ExecutionContext` (``temperature``, ``max_tokens``, ``model``, ...) in the context,
    the messages as the prompt, a provider's key, URL or headers in the provider (any
    name that looks like a credential's, `_credential`, too: ``extra_body`` goes to every
    route), and any other field of the provider's request in ``extra_body``.  A
    `TypeError`, as Python's own for an unexpected keyword.
    """
    import difflib

    from ._values import ExecutionContext  # read on this error's path only

    fields = [f.name for f in attrs.fields(ExecutionContext)]
    in_context = {name: value for name, value in unknown.items() if name in fields}
    sentences = [
        f"EmpathyLLMExecutor.{call}() got unexpected keyword argument(s) "
        f"{', '.join(repr(name) for name in unknown)}."
    ]
    if in_context:
        given = ", ".join(f"{name}={shown(value)}" for name, value in in_context.items())
        sentences.append(
            f"{', '.join(f'{name}=' for name in in_context)} "
            f"{'is a setting' if len(in_context) == 1 else 'are settings'} of the run's "
            f"ExecutionContext: executor.{call}(prompt, ExecutionContext({given}, ...)), "
            f"or attrs.evolve(context, {given}) for a context you have."
        )
    for name in (name for name in unknown if name not in in_context):
        if name == "messages":
            hint = f"pass the messages as the prompt, executor.{call}([...], context)."
        elif name in _PROVIDERS_OWN:
            hint = f"give it to the provider, OpenAIProvider({name}=...) or AnthropicProvider."
        elif close := difflib.get_close_matches(name, [*_RUN_OPTIONS, *fields], n=1, cutoff=0.75):
            meant = (
                f"{close[0]}=" if close[0] in _RUN_OPTIONS else f"ExecutionContext({close[0]}=...)"
            )
            hint = f"did you mean {meant}?"
        elif _credential(name):  # openai_api_key=, auth_token=: not to be sent to every route
            hint = _KEY_HINT
        elif name.endswith("headers"):
            hint = "give them to the provider, OpenAIProvider(headers={...}) or AnthropicProvider."
        else:
            hint = (
                "a field of the provider's request goes in "
                f"extra_body={{{name!r}: ...}} (sent to every route as given)."
            )
        sentences.append(f"{name}= is not an option of {call}(): {hint}")
    taken = ", ".join(f"{name}=" for name in _RUN_OPTIONS)
    sentences.append(f"{call}() takes the prompt, an ExecutionContext and {taken}.")
    return TypeError(" ".join(sentences))


def _credential(name: str) -> bool:
    """
    Whether a keyword argument named ``name`` most likely holds a credential (an API
    key, a token, a secret), never a field of a request: ``prompt_cache_key`` and
    ``max_completion_tokens`` are fields, ``openai_api_key`` and ``auth_token`` are not.
    """
    lowered = name.lower().replace("-", "_")
    return (
        lowered in ("key", "token")
        or "api_key" in lowered
        or "apikey" in lowered
        or lowered.endswith(("_token", "bearer"))
        or any(word in lowered for word in ("secret", "password", "credential", "authoriz"))
    )


class _RunOptions(dict[str, Any]):
    """
    `run_options`' result: the request's keyword arguments, and ``schema_checked``, true
    when its ``response_format`` was built there from the caller's dict: its schema, a
    copy only the run and its requests hold, passed `schema_problem` then, and
    `structured_result` does not check it again.  (A `ResponseFormat` the caller passed
    is checked again: the caller may have changed its schema since it was built.)
    """

    __slots__ = ("schema_checked",)

    schema_checked: bool


def run_options(
    tools: object,
    tool_choice: object,
    response_format: object,
    stop: object,
    top_p: object,
    seed: object,
    extra_body: object,
    unknown: Mapping[str, object],
    call: str,
    /,
) -> Mapping[str, Any]:
    """
    The `CompletionRequest` keyword arguments for these options (validated): those of
    `EmpathyLLMExecutor` ``call`` (``"run"`` or ``"stream"``), in its order, and the
    keyword arguments it does not take, ``unknown``, refused (`misplaced`).  Positional:
    a call with keywords costs each run more than the check it makes.
    """
    if (
        tools is None
        and tool_choice is None
        and response_format is None
        and stop is None
        and top_p is None
        and seed is None
        and extra_body is None
        and not unknown
    ):
        return NO_OPTIONS
    if unknown:
        raise misplaced(unknown, call)
    tool_choice = to_tool_choice(tool_choice)
    try:
        options = _RunOptions(
            tools=to_tools(tools),
            tool_choice=tool_choice,
            response_format=to_response_format(response_format),
            stop=to_stop(stop),
            top_p=top_p,
            seed=seed,
            extra_body=to_extra_body(extra_body),
        )
        options["top_p"], options["seed"] = check_options(
            tools=options["tools"], tool_choice=tool_choice, top_p=top_p, seed=seed
        )
    except RecordValidationError as exc:
        raise ConfigurationError(str(exc)) from None
    if isinstance(extra_body := options["extra_body"], Mapping):
        clash = sorted(_SET_BY_EXECUTOR & set(extra_body))
        if clash:
            raise ConfigurationError(
                f"extra_body must not set {', '.join(clash)}: the executor sets model and "
                "messages per route, and stream by the call (run() or stream())"
            )
        _check_choices(extra_body)
    fmt = options["response_format"]
    options.schema_checked = fmt is not None and fmt is not response_format
    return options


def required_capabilities(
    messages: Sequence[Message], options: Mapping[str, Any]
) -> frozenset[str]:
    """What a model must support to serve this request (see `registry.CAPABILITIES`)."""
    needs: set[str] = set()
    if options.get("tools"):
        needs.add("tools")
    if options.get("response_format") is not None:
        needs.add("json_schema")
    for message in messages:
        if message.tool_calls or message.role == "tool":
            needs.add("tools")
        if isinstance(message.content, tuple):
            for block in message.content:
                if isinstance(block, ImageBlock):
                    needs.add("images")
                elif isinstance(block, ToolCall | ToolResult):
                    needs.add("tools")
                    if (
                        isinstance(block, ToolResult)
                        and not isinstance(block.content, str)
                        and any(isinstance(b, ImageBlock) for b in block.content)
                    ):
                        needs.add("images")
    return frozenset(needs)


def capable(
    models: Sequence[ModelInfo], needs: frozenset[str]
) -> tuple[tuple[ModelInfo, ...], tuple[CandidateEvaluation, ...]]:
    """``models`` that serve ``needs``, and the others as excluded candidates with reasons."""
    fit: list[ModelInfo] = []
    unfit: list[CandidateEvaluation] = []
    for model in models:
        missing = sorted(needs - model.capabilities)
        if not missing:
            fit.append(model)
            continue
        unfit.append(
            CandidateEvaluation(
                model=model.id,
                provider=model.provider,
                tier=model.tier,
                excluded=True,
                reasons=(
                    f"cannot serve this request: no {', '.join(missing)} support "
                    "(registry capabilities)",
                ),
            )
        )
    return tuple(fit), tuple(unfit)


def structured_result(completion: Completion, options: Mapping[str, Any]) -> tuple[Any, str | None]:
    """
    ``(parsed, parse_error)`` for a completion of a run with a ``response_format``
    (``options`` from `run_options`, whose schema check is not repeated).  An answer
    that does not parse because the model refused, a content filter stopped it or it
    was cut off (its stop reason says so, `_ENDED`) has a ``parse_error`` saying that
    first: "not JSON" alone would blame the schema or the model's JSON.
    """
    fmt = options.get("response_format")
    if not isinstance(fmt, ResponseFormat):
        return None, None
    if completion.tool_calls and not completion.content:
        return None, "the model called a tool instead of answering"
    checked = isinstance(options, _RunOptions) and options.schema_checked
    parsed, why = parse_structured(completion.content, fmt.schema, checked=checked)
    if why is not None and (ended := _ENDED.get(completion.stop_reason or "")) is not None:
        # not a model that wrote the wrong JSON: one that stopped before writing it
        why = f"{ended} (stop_reason {completion.stop_reason!r}); {why}"
    return parsed, why


_ENDED: Final = {
    "refusal": "the model refused to answer",
    "content_filter": "the provider's content filter stopped the answer",
    "length": "the answer was cut off at max_tokens",
    "max_tokens": "the answer was cut off at max_tokens",
    "model_context_window_exceeded": "the answer was cut off at the model's context window",
}
"""
Why an answer ended before it was written whole, by the stop reasons that say so
(OpenAI's and Anthropic's): a `parse_error` names it before the JSON's own fault.
"""
