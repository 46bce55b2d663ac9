"""
The fault actions of `FakeLLMServer` over HTTP: error statuses (HTML from a gateway for
502 and 504), hanging, a reset connection, context-length and content-policy errors,
and bodies that are malformed, incomplete or cut short.
"""

from __future__ import annotations

import asyncio
import json
from typing import Final

from aiohttp import web

from ._fake_behavior import RETRY_AFTER_STATUSES, Action, ModelBehavior
from ._fake_wire import ANTHROPIC, STATUS_MESSAGES, Api, Replies, json_response

__all__ = ["serve_fault"]

_HTML_STATUSES: Final = frozenset({502, 504})


def _content_policy(replies: Replies, api: Api) -> web.Response:
    """The 400 each API sends for a request its safety system refuses."""
    if api == ANTHROPIC:
        return replies.error(
            api,
            400,
            "Output blocked by content filtering policy: the request violates the usage policy.",
        )
    return replies.error(
        api,
        400,
        "Your request was rejected as a result of our safety system.",
        code="content_policy_violation",
    )


async def serve_fault(
    replies: Replies,
    closing: asyncio.Event,
    api: Api,
    request: web.Request,
    model: str,
    behavior: ModelBehavior,
    action: Action,
    input_tokens: int,
    max_tokens: int | None,
) -> web.StreamResponse:
    """
    Answer a request with a fault action (anything but ``"ok"`` and a `FakeReply`).

    Args:
        replies: The server's answer builder.
        closing: Set when the server stops: what ``"hang"`` and ``"timeout"`` wait for.
        api: The request's wire format.
        request: The request.
        model: The model asked for.
        behavior: The model's behaviour (for ``retry_after``).
        action: An HTTP status or a fault name from `FAULT_ACTIONS`.
        input_tokens: The prompt's estimated tokens.
        max_tokens: The request's max tokens, if any.

    Returns:
        The response (for ``"reset"`` and ``"truncated"``, after the connection closed).
    """
    if isinstance(action, int):
        if action in _HTML_STATUSES:
            reason = "Bad Gateway" if action == 502 else "Gateway Timeout"
            return web.Response(
                status=action,
                text=f"<html><body><h1>{action} {reason}</h1></body></html>",
                content_type="text/html",
            )
        retry = behavior.retry_after if action in RETRY_AFTER_STATUSES else None
        return replies.error(api, action, STATUS_MESSAGES.get(action), retry_after=retry)
    if action in ("hang", "timeout"):
        await closing.wait()
        return replies.error(api, 503, "The server is shutting down.")
    if action == "reset":
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)
    if action == "context_length":
        # a window just too small: for the prompt, or (a one-token prompt) with the
        # completion too; the numbers in the message always add up
        completion = max_tokens or 0
        window = input_tokens - 1 if input_tokens > 1 else input_tokens + completion - 1
        return replies.context_error(api, input_tokens, completion, window)
    if action == "content_policy":
        return _content_policy(replies, api)
    good = replies.success(api, model, "x" * 40, input_tokens, 16, False)
    payload = json.dumps(good).encode()
    if action == "malformed":
        return web.Response(
            body=payload[: len(payload) // 2], status=200, content_type="application/json"
        )
    if action == "incomplete":
        good.pop("content" if api == ANTHROPIC else "choices", None)
        good.pop("usage", None)
        return json_response(good)
    # truncated: promise the whole body, send half, drop the connection
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    if request.transport is not None:
        request.transport.close()
    return response
