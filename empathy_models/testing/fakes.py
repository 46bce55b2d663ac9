"""
`FakeProvider`: an in-process `Provider` with the same `ModelBehavior` scripting as
`FakeLLMServer`, without HTTP, for fast tests and benchmarks of everything above the
wire.

Faults become the errors the HTTP providers would raise for them, through the same
mapping (`empathy_models.providers._http.error_from_response`), so a 429 is a
`RateLimitedError` with ``status`` 429 and the behaviour's ``retry_after``, a 529 an
`OverloadedError`, and so on.  ``"hang"`` waits until the caller cancels (put a
deadline around it); ``"timeout"`` raises `ProviderTimeoutError` at once; ``"reset"``
raises `ProviderConnectionError`; ``"malformed"``, ``"incomplete"`` and
``"truncated"`` raise `InvalidResponseError`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping

from ..abc import Completion, CompletionRequest, Provider
from ..exceptions import (
    InvalidResponseError,
    ModelNotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
)
from ..providers._http import error_from_response
from ._fake_behavior import (
    DEFAULT_BEHAVIOR,
    RETRY_AFTER_STATUSES,
    Action,
    ModelBehavior,
    estimate_tokens,
)
from ._fake_controls import Controls
from ._fake_tools import FakeReply, reply_completion

__all__ = ["FakeProvider"]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class FakeProvider(Controls, Provider):
    """
    A provider that answers in-process according to per-model `ModelBehavior`.

    Control methods (`set_outage`, `script`, `set_behavior`, `requests`) are those of
    `FakeLLMServer`.  Safe for concurrent calls on one loop.

    Args:
        behaviors: model ids to `ModelBehavior`.
        name: labels it in records and breaker keys (and is an outage target, with model
            ids and ``"*"``); in an executor it must be the registry's ``provider`` of the
            models it serves: ``FakeProvider(name="openai")`` serves the default
            registry's OpenAI models, the default ``"fake"`` needs a registry with
            ``provider = "fake"`` models (the executor's error says so).
        default: answers for models without a behaviour (None: they raise
            `ModelNotFoundError`).
        seed: fixes the draws, one RNG per model.
        sleep: awaited with the drawn latency in seconds (inject `FakeClock.sleep` in
            tests; default `asyncio.sleep`).
    """

    def __init__(
        self,
        behaviors: Mapping[str, ModelBehavior] | None = None,
        *,
        name: str = "fake",
        default: ModelBehavior | None = DEFAULT_BEHAVIOR,
        seed: int = 0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(behaviors, default, seed)
        self.name = name
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self._last: dict[str, CompletionRequest] = {}
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"FakeProvider(name={self.name!r})"

    def last_request(self, model: str) -> CompletionRequest | None:
        """The last request that reached ``model``."""
        return self._last.get(model)

    def reset_counters(self) -> None:
        """Zero every counter and forget the last requests."""
        super().reset_counters()
        self._last.clear()

    async def _complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request`` per its model's behaviour, or raise the mapped error."""
        self._counted(None)
        model = request.model
        behavior = self._behaviors.get(model, self._default)
        if behavior is None:
            raise ModelNotFoundError(
                f"{self.name} HTTP 404 not_found_error: model: {model} [model {model}]",
                provider=self.name,
                model=model,
                status=404,
            )
        self._counted(model)
        self._last[model] = request
        text = (request.system or "") + "".join(m.text for m in request.messages)
        input_tokens = estimate_tokens(text)
        window = behavior.context_window
        if window is not None and input_tokens + request.max_tokens > window:
            raise self._http_error(
                model, 400, f"prompt is too long: {input_tokens} tokens > {window} maximum", None
            )
        most = behavior.max_output_tokens
        if most is not None and request.max_tokens > most:
            raise self._http_error(
                model,
                400,
                f"max_tokens: {request.max_tokens} > {most}, which is the maximum allowed "
                f"number of output tokens for {model}",
                None,
            )
        rng = self._rng(model)
        delay_ms = behavior.latency.sample(rng)
        if delay_ms > 0:
            await self._sleep(delay_ms / 1000)
        action = self._action(model, self.name, behavior, rng)
        if action != "ok" and not isinstance(action, FakeReply):
            await self._fault(model, behavior, action)
        out, truncated = self._output_tokens(behavior, rng, request.max_tokens)
        content = behavior.content if behavior.content is not None else f"Reply from {model}."
        if isinstance(action, FakeReply):
            return reply_completion(action, content, model, input_tokens, out, next(self._ids))
        return Completion(
            content=content,
            model=model,
            input_tokens=input_tokens,
            output_tokens=out,
            stop_reason="max_tokens" if truncated else "end_turn",
            request_id=f"fake-{next(self._ids)}",
        )

    def _http_error(
        self, model: str, status: int, message: str | None, retry_after: float | None
    ) -> ProviderError:
        headers = {} if retry_after is None else {"retry-after-ms": str(retry_after * 1000)}
        body = {
            "type": "error",
            "error": {
                "type": _ERROR_TYPES.get(status, "api_error"),
                "message": message or f"simulated HTTP {status}",
            },
        }
        return error_from_response(
            status, json.dumps(body).encode(), headers, provider=self.name, model=model
        )

    async def _fault(self, model: str, behavior: ModelBehavior, action: Action) -> None:
        if isinstance(action, int):
            retry = behavior.retry_after if action in RETRY_AFTER_STATUSES else None
            raise self._http_error(model, action, None, retry)
        where = f"[model {model}]"
        if action == "hang":
            await asyncio.get_running_loop().create_future()  # until cancelled
        if action in ("hang", "timeout"):
            raise ProviderTimeoutError(
                f"{self.name}: no answer before the timeout {where}",
                provider=self.name,
                model=model,
            )
        if action == "reset":
            raise ProviderConnectionError(
                f"{self.name}: connection reset by peer {where}", provider=self.name, model=model
            )
        if action == "context_length":
            raise self._http_error(model, 400, "prompt is too long: simulated", None)
        if action == "content_policy":
            raise self._http_error(model, 400, "Output blocked by content filtering policy", None)
        raise InvalidResponseError(
            f"{self.name}: invalid response: simulated {action} body {where}",
            provider=self.name,
            model=model,
            status=200,
        )
