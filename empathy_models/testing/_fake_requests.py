"""
How `FakeLLMServer` reads a request in each wire format: the key, the JSON body and the
fields the real APIs require, with each API's messages for what is wrong.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from attrs import frozen

from ._fake_checks import check_anthropic, check_openai
from ._fake_fields import anthropic_field_problem, openai_field_problem
from ._fake_prompt import Marks, anthropic_prompt, openai_prompt
from ._fake_wire import ANTHROPIC, OPENAI, Api

__all__ = ["MAX_BODY_BYTES", "Accepted", "Reject", "authenticate", "read_anthropic", "read_openai"]

MAX_BODY_BYTES: Final = 64 * 1024 * 1024
"""The largest request body the server reads; a larger one gets 413."""


class Reject(Exception):
    """
    A request the server refuses: the arguments of `Replies.error` for its answer.

    Args:
        status: The HTTP status (400, 401 or 413).
        message: The API's message.
        param: OpenAI's ``param``.
        code: OpenAI's ``code``.
    """

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@frozen(slots=True)
class Accepted:
    """A request that passed authentication and validation."""

    model: str
    body: dict[str, Any]
    text: str
    """
    The prompt's text (tool definitions, a structured-output schema, system and
    messages), for the token estimate (`_fake_prompt`).
    """
    max_tokens: int | None
    cache_marks: Marks = ()
    """Where the parts of ``text`` marked for caching end, and their TTLs."""


def _check_key(api: Api, key: str, api_key: str | None) -> None:
    # a header that is not UTF-8 arrives with its bytes as surrogates: compare it as
    # it came, never failing on them
    if api_key is not None and not hmac.compare_digest(
        key.encode("utf-8", "surrogatepass"), api_key.encode("utf-8", "surrogatepass")
    ):
        message = (
            "invalid x-api-key"
            if api == ANTHROPIC
            else "Incorrect API key provided. You can find your API key in your account."
        )
        raise Reject(401, message)


def authenticate(api: Api, request: web.Request, api_key: str | None) -> None:
    """
    Check a request's key (``api_key``; None: any) and, for Anthropic, its version
    header, as each API does, raising `Reject` with its error.
    """
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    if api == ANTHROPIC:
        key = request.headers.get("x-api-key")
        if not key and scheme.lower() == "bearer":
            key = bearer.strip()  # the official SDK sends its api_key this way
        if not key:
            raise Reject(401, "x-api-key header is required")
        _check_key(ANTHROPIC, key, api_key)
        if not request.headers.get("anthropic-version"):
            raise Reject(400, "anthropic-version: header is required")
        return
    if scheme.lower() != "bearer" or not bearer.strip():
        raise Reject(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth.",
        )
    _check_key(OPENAI, bearer.strip(), api_key)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _read_json(request: web.Request, api: Api) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        message = (
            "Request exceeds the maximum allowed number of bytes."
            if api == ANTHROPIC
            else f"Request too large: the body is over {MAX_BODY_BYTES:,} bytes."
        )
        raise Reject(413, message) from None
    try:
        # NaN and Infinity are not JSON (Python's parser would take them); a body nested
        # deeper than the parser's stack is refused like any other it cannot read
        body = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Reject(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise Reject(400, "The request body must be a JSON object.")
    return body


def _require_str(api: Api, body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        message = (
            f"{name}: Field required"
            if api == ANTHROPIC
            else f"you must provide a {name} parameter"
        )
        raise Reject(400, message, param=name)
    return value


async def read_anthropic(
    request: web.Request, api_key: str | None, *, counting: bool = False
) -> Accepted:
    """
    Read an Anthropic Messages request as the real API checks it.

    Args:
        request: The request.
        api_key: The key the server wants; None for any key.
        counting: a token count's request (``/v1/messages/count_tokens``), which takes
            no ``max_tokens``.

    Returns:
        The accepted request.

    Raises:
        Reject: With the API's error for a missing or wrong key, a missing version
            header, a body that is not a JSON object, or a missing or invalid field.
    """
    authenticate(ANTHROPIC, request, api_key)
    body = await _read_json(request, ANTHROPIC)
    model = _require_str(ANTHROPIC, body, "model")
    max_tokens = None if counting else body.get("max_tokens")
    if not counting and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise Reject(400, "max_tokens: Field required")
    if max_tokens is not None and max_tokens < 1:
        raise Reject(400, "max_tokens: Input should be greater than 0")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Reject(400, "messages: Field required")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
            raise Reject(400, f"messages.{index}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise Reject(400, f"messages.{index}.content: Field required")
    if problem := anthropic_field_problem(body) or check_anthropic(body):
        raise Reject(400, problem)
    text, marks = anthropic_prompt(body)
    return Accepted(model, body, text, max_tokens, marks)


_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


async def read_openai(request: web.Request, api_key: str | None) -> Accepted:
    """
    Read an OpenAI Chat Completions request as the real API checks it.

    Args:
        request: The request.
        api_key: The key the server wants; None for any key.

    Returns:
        The accepted request.

    Raises:
        Reject: With the API's error for a missing or wrong key, a body that is not a
            JSON object, or a missing or invalid field.
    """
    authenticate(OPENAI, request, api_key)
    body = await _read_json(request, OPENAI)
    model = _require_str(OPENAI, body, "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Reject(400, "Missing required parameter: 'messages'.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in _OPENAI_ROLES:
            raise Reject(
                400,
                f"Invalid value for 'messages[{index}].role'.",
                param=f"messages.[{index}].role",
            )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise Reject(400, "Invalid 'max_tokens': must be >= 1.", param="max_tokens")
    if found := openai_field_problem(body) or check_openai(body):
        raise Reject(400, found[0], param=found[1], code=found[2])
    return Accepted(model, body, openai_prompt(body, messages), max_tokens)
