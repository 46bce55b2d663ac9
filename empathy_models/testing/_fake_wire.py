"""
The two wire formats' answers as `FakeLLMServer` sends them: error bodies, success
bodies, context-length errors, and the request id and rate-limit headers every response
carries, numbered from one counter per server.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

from aiohttp import web

from ._fake_rpm import RpmBucket

__all__ = [
    "ANTHROPIC",
    "OPENAI",
    "STATUS_MESSAGES",
    "Api",
    "Replies",
    "api_of",
    "json_response",
    "text_of",
]

ANTHROPIC: Final = "anthropic"
OPENAI: Final = "openai"
Api: TypeAlias = Literal["anthropic", "openai"]

ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
OPENAI_ERRORS: Final = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    529: ("server_error", "overloaded"),
}
STATUS_MESSAGES: Final = {
    400: "Invalid request.",
    401: "Invalid API key.",
    403: "Your API key does not have permission to use the specified resource.",
    404: "The requested resource could not be found.",
    429: "Rate limit exceeded; please slow down.",
    500: "Internal server error.",
    503: "The service is temporarily unavailable.",
    529: "Overloaded",
}


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """``data`` as a compact JSON body."""
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the ``text`` of its blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(block.get("text", "")) for block in content if isinstance(block, Mapping)
        )
    return ""


def anthropic_usage(
    input_tokens: int, output_tokens: int, cache: tuple[int, int, int] | None
) -> dict[str, Any]:
    """A Messages API ``usage``; with the prompt cache's counts when ``cache`` is given."""
    usage: dict[str, Any] = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    if cache is not None:
        write_5m, write_1h, read = cache
        usage["cache_creation_input_tokens"] = write_5m + write_1h
        usage["cache_read_input_tokens"] = read
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": write_5m,
            "ephemeral_1h_input_tokens": write_1h,
        }
    return usage


def api_of(request: web.Request) -> Api:
    """The wire format a request speaks, by its path or its Anthropic headers."""
    if (
        request.path.startswith("/v1/messages")
        or "anthropic-version" in request.headers
        or "x-api-key" in request.headers
    ):
        return ANTHROPIC
    return OPENAI


class Replies:
    """
    Builds one server's answers in both wire formats.  Every body and header id comes
    from one counter, so ids are unique across the server's responses.
    """

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def number(self) -> int:
        """The next id number."""
        return next(self._ids)

    def error(
        self,
        api: Api,
        status: int,
        message: str | None,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> web.Response:
        """
        An error in the API's body shape, with its request id.

        Args:
            api: The wire format.
            status: The HTTP status.
            message: The error's message; None for the status's usual one.
            param: OpenAI's ``param``.
            code: OpenAI's ``code``; None for the status's usual one.
            retry_after: Seconds sent as ``Retry-After`` (and OpenAI's ``retry-after-ms``).

        Returns:
            The response.
        """
        text = message or STATUS_MESSAGES.get(status, "Error.")
        kind_4xx = "invalid_request_error"  # 413, 422 and other 4xx not in the tables
        headers: dict[str, str] = {}
        n = self.number()
        if retry_after is not None:
            headers["retry-after"] = str(math.ceil(retry_after))
        if api == ANTHROPIC:
            headers["request-id"] = f"req_{n:024d}"
            kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else kind_4xx)
            return json_response(
                {
                    "type": "error",
                    "error": {"type": kind, "message": text},
                    "request_id": headers["request-id"],
                },
                status,
                headers,
            )
        headers["x-request-id"] = f"req_{n:024d}"
        if retry_after is not None:
            headers["retry-after-ms"] = str(round(retry_after * 1000))
        kind, default_code = OPENAI_ERRORS.get(
            status, ("server_error" if status >= 500 else kind_4xx, None)
        )
        return json_response(
            {
                "error": {
                    "message": text,
                    "type": kind,
                    "param": param,
                    "code": code if code is not None else default_code,
                }
            },
            status,
            headers,
        )

    def success(
        self,
        api: Api,
        model: str,
        content: str,
        input_tokens: int,
        output_tokens: int,
        truncated: bool,
        *,
        cache: tuple[int, int, int] | None = None,
    ) -> dict[str, Any]:
        """
        The body of a plain text answer (``truncated``: stopped at max tokens; ``cache``:
        the prompt tokens written to the 5-minute and 1-hour cache and read from it).
        """
        n = self.number()
        if api == ANTHROPIC:
            return {
                "id": f"msg_{n:024d}",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": content}],
                "model": model,
                "stop_reason": "max_tokens" if truncated else "end_turn",
                "stop_sequence": None,
                "usage": anthropic_usage(input_tokens, output_tokens, cache),
            }
        return {
            "id": f"chatcmpl-{n:024d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "length" if truncated else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }

    def context_error(
        self, api: Api, input_tokens: int, max_tokens: int, window: int
    ) -> web.Response:
        """
        The 400 each API sends for a prompt and max tokens (0: none asked) over the
        context window.
        """
        if api == ANTHROPIC:
            if input_tokens > window:
                message = f"prompt is too long: {input_tokens} tokens > {window} maximum"
            else:
                message = (
                    f"input length and `max_tokens` exceed context limit: {input_tokens} + "
                    f"{max_tokens} > {window}, decrease input length or `max_tokens` and try "
                    "again"
                )
            return self.error(api, 400, message)
        if max_tokens:
            asked = (
                f"you requested {input_tokens + max_tokens} tokens ({input_tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion."
            )
        else:
            asked = (
                f"your messages resulted in {input_tokens} tokens. Please reduce the length "
                "of the messages."
            )
        return self.error(
            api,
            400,
            f"This model's maximum context length is {window} tokens. However, {asked}",
            param="messages",
            code="context_length_exceeded",
        )

    def output_limit_error(
        self, api: Api, model: str, body: Mapping[str, Any], max_tokens: int, most: int
    ) -> web.Response:
        """The 400 each API sends for ``max_tokens`` above the model's output limit."""
        if api == ANTHROPIC:
            return self.error(
                api,
                400,
                f"max_tokens: {max_tokens} > {most}, which is the maximum allowed number "
                f"of output tokens for {model}",
            )
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        return self.error(
            api,
            400,
            f"{name} is too large: {max_tokens}. This model supports at most {most} "
            f"completion tokens, whereas you provided {max_tokens}.",
            param=name,
            code="invalid_value",
        )

    def unknown_model(self, api: Api, model: str) -> web.Response:
        """The 404 for a model with no behaviour (and no default)."""
        if api == ANTHROPIC:
            return self.error(api, 404, f"model: {model}")
        return self.error(
            api,
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )

    def stamp(self, response: web.StreamResponse, *, anthropic: bool, rpm: RpmBucket) -> None:
        """
        Give a response a request id and rate-limit headers, as the real APIs send.

        With ``rpm`` set, the request figures are the bucket's: ``remaining`` is what is
        left after this request and ``reset`` the time until the bucket is full again
        (Anthropic: the instant, to the millisecond; OpenAI: a duration such as
        ``"1.5s"``).  Otherwise fixed, generous figures.

        Args:
            response: The response about to be sent; its headers are set in place.
            anthropic: Whether the request spoke the Anthropic format.
            rpm: The server's requests-per-minute bucket.
        """
        headers = response.headers
        id_header = "request-id" if anthropic else "x-request-id"
        if id_header not in headers:
            headers[id_header] = f"req_{self.number():024d}"
        retry = headers.get("retry-after")
        if response.status == 429 and retry is None:
            return  # a reset time would read as a retry-after the scenario did not set
        wait = float(retry) if retry is not None else 60.0
        limits = [("requests", 1000, 999, wait), ("tokens", 1_000_000, 999_999, wait)]
        figures = rpm.figures()
        if figures is not None:
            limits[0] = ("requests", *figures)
        for kind, limit, left, reset in limits:
            if response.status == 429:
                left = 0
            if anthropic:
                at = datetime.fromtimestamp(time.time() + reset, UTC)
                headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
                headers[f"anthropic-ratelimit-{kind}-remaining"] = str(left)
                headers[f"anthropic-ratelimit-{kind}-reset"] = at.isoformat(
                    timespec="milliseconds"
                ).replace("+00:00", "Z")
            else:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(left)
                headers[f"x-ratelimit-reset-{kind}"] = f"{reset:.3f}".rstrip("0").rstrip(".") + "s"
