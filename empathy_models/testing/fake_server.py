"""
`FakeLLMServer`: a real HTTP server on 127.0.0.1 that speaks the Anthropic Messages and
OpenAI Chat Completions wire formats, with scripted faults per model.

::

    async with FakeLLMServer(
        {"claude-haiku-4-5": ModelBehavior(latency=Latency.lognormal(40, 0.5)),
         "gpt-4o-mini": ModelBehavior(failure_rate=0.1, failures=(429, 500), retry_after=2)},
        api_key="test-key",
    ) as server:
        provider = AnthropicProvider(api_key="test-key", base_url=server.anthropic_base_url)
        server.script("claude-haiku-4-5", [529, "hang", "ok"])   # the next three answers
        server.set_outage("openai", True)                        # every OpenAI-format model down
        ...
        assert server.requests("claude-haiku-4-5") == 3

Endpoints: ``POST /v1/messages`` (Anthropic: ``x-api-key`` or ``Authorization: Bearer``,
and ``anthropic-version``) and ``POST /v1/chat/completions`` (OpenAI: ``Authorization:
Bearer``).
Requests are validated as the real APIs do (missing fields -> 400, missing or wrong key
-> 401, unknown model -> 404 when no default behaviour is set) and errors come back in
each API's own body shape; so are tools, tool choices, images and the pairing of tool
calls with their results.  Scripts may hold `FakeReply` answers (text, tool calls,
JSON); a request that forces a tool or asks for a JSON schema gets a value generated
from the schema.  The official ``openai`` and ``anthropic`` SDKs work against it as
configured for the real services (``api_key=...``, ``base_url=...``): every response
carries a request id and rate-limit headers, and unknown routes answer with JSON
errors.  Usage is estimated: input tokens ``len(text) // 4 + 1``,
output tokens drawn from the behaviour.

What happens to one request, in order: authentication and validation; model lookup;
the context-window check (when the behaviour has one); the latency draw (sleeping that
long); then the first of: an outage for the model or its API, the model's script, a
failure drawn with ``failure_rate``, or success.

Fault actions (in ``failures``, scripts and outages): an HTTP status (400-599; 429,
503 and 529 carry ``Retry-After`` when the behaviour sets ``retry_after``; 502 and 504
come back as HTML, as from a gateway), or ``"ok"``, ``"hang"`` (never answer, until
the client gives up or the server stops), ``"malformed"`` (200 with invalid JSON),
``"timeout"`` (the same as ``"hang"`` over HTTP; the in-process
`FakeProvider` raises `ProviderTimeoutError` at once instead), ``"incomplete"`` (200
with valid JSON missing required fields), ``"truncated"`` (200
whose body stops before its Content-Length), ``"reset"`` (the connection is closed
without an answer), ``"context_length"`` and ``"content_policy"`` (400 with the body
each API sends for those).

The server logs nothing per request and keeps only counters and the last request per
model, so it can serve thousands of requests in a benchmark.  It is single-loop: use it
from the event loop that entered it.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, Self, TypeAlias

import attrs
from aiohttp import web
from attrs import field, frozen

from ..exceptions import ConfigurationError, RecordValidationError
from ._fake_stream import StreamBehavior, serve_stream
from ._fake_tools import (
    FakeReply,
    apply_reply,
    auto_reply,
    check_anthropic,
    check_openai,
    streamed_calls,
)

__all__ = [
    "Action",
    "FAULT_ACTIONS",
    "FakeLLMServer",
    "Latency",
    "ModelBehavior",
    "RecordedRequest",
    "StreamBehavior",
    "estimate_tokens",
]

Action: TypeAlias = "int | str | FakeReply"
"""An HTTP status code (400-599), one of `FAULT_ACTIONS`, or a scripted `FakeReply`."""

FAULT_ACTIONS: Final = frozenset(
    {
        "ok",
        "hang",
        "timeout",
        "malformed",
        "incomplete",
        "truncated",
        "reset",
        "context_length",
        "content_policy",
    }
)

_ANTHROPIC: Final = "anthropic"
_OPENAI: Final = "openai"
_Api: TypeAlias = Literal["anthropic", "openai"]


def estimate_tokens(text: str) -> int:
    """The fake's token estimate for ``text``: ``len(text) // 4 + 1``."""
    return len(text) // 4 + 1


def _check_action(value: object, where: str) -> Action:
    if isinstance(value, bool):
        raise RecordValidationError(f"{where} {value!r} is not an action", path=where)
    if isinstance(value, int):
        if 400 <= value <= 599:
            return value
        raise RecordValidationError(
            f"{where} must be an HTTP error status 400-599, got {value!r}", path=where
        )
    if isinstance(value, str) and value in FAULT_ACTIONS:
        return value
    if isinstance(value, FakeReply):
        return value
    allowed = ", ".join(sorted(FAULT_ACTIONS))
    raise RecordValidationError(
        f"{where} must be a status code 400-599 or one of {allowed}; got {value!r}", path=where
    )


# --------------------------------------------------------------------------- behaviour


@frozen
class Latency:
    """
    A latency distribution in milliseconds; build it with `fixed`, `uniform` or
    `lognormal`.  Draws use the server's seeded per-model RNG, so a run is repeatable.
    """

    kind: Literal["fixed", "uniform", "lognormal"]
    a: float
    b: float = 0.0

    @classmethod
    def fixed(cls, ms: float) -> Latency:
        """Always ``ms`` milliseconds."""
        if not math.isfinite(ms) or ms < 0:
            raise RecordValidationError(f"latency must be >= 0 ms, got {ms!r}", path="latency")
        return cls("fixed", float(ms))

    @classmethod
    def uniform(cls, low_ms: float, high_ms: float) -> Latency:
        """Uniform between ``low_ms`` and ``high_ms``."""
        if not (0 <= low_ms <= high_ms and math.isfinite(high_ms)):
            raise RecordValidationError(
                f"latency needs 0 <= low <= high, got {low_ms!r}, {high_ms!r}", path="latency"
            )
        return cls("uniform", float(low_ms), float(high_ms))

    @classmethod
    def lognormal(cls, median_ms: float, sigma: float = 0.5) -> Latency:
        """Log-normal with the given median and shape ``sigma`` (a long right tail)."""
        if not (median_ms > 0 and math.isfinite(median_ms) and sigma >= 0):
            raise RecordValidationError(
                f"lognormal latency needs median > 0 and sigma >= 0, got {median_ms!r}, {sigma!r}",
                path="latency",
            )
        return cls("lognormal", float(median_ms), float(sigma))

    def sample(self, rng: random.Random) -> float:
        """One draw, in milliseconds."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        return rng.lognormvariate(math.log(self.a), self.b)


def _to_latency(value: Latency | float) -> Latency:
    if isinstance(value, Latency):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Latency.fixed(value)
    raise RecordValidationError(
        f"latency must be a Latency or a number of ms, got {value!r}", path="latency"
    )


def _to_token_range(value: int | tuple[int, int]) -> tuple[int, int]:
    low, high = (value, value) if isinstance(value, int) else tuple(value)
    if (
        isinstance(low, bool)
        or isinstance(high, bool)
        or not isinstance(low, int)
        or not isinstance(high, int)
        or not 0 <= low <= high
    ):
        raise RecordValidationError(
            f"output_tokens must be an int >= 0 or a (low, high) range, got {value!r}",
            path="output_tokens",
        )
    return (low, high)


def _to_actions(value: Iterable[Action]) -> tuple[Action, ...]:
    actions = tuple(_check_action(a, f"failures[{i}]") for i, a in enumerate(value))
    if not actions:
        raise RecordValidationError("failures must not be empty", path="failures")
    return actions


def _rate(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise RecordValidationError(
            f"{attribute.name} must be between 0 and 1, got {value!r}", path=attribute.name
        )


def _opt_non_negative(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise RecordValidationError(
            f"{attribute.name} must be None or a number >= 0, got {value!r}", path=attribute.name
        )


def _opt_positive_int(_: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RecordValidationError(
            f"{attribute.name} must be None or an integer >= 1, got {value!r}",
            path=attribute.name,
        )


@frozen(kw_only=True)
class ModelBehavior:
    """
    How the fake answers for one model.

    ``latency`` (a `Latency` or fixed milliseconds) is slept before every answer.
    With probability ``failure_rate`` the answer is one of ``failures`` (chosen
    uniformly; see the module doc for the actions).  ``retry_after`` (seconds) is sent
    with 429, 503 and 529.  ``output_tokens`` is a count or a uniform ``(low, high)``
    range, capped by the request's max tokens.  ``content`` is the reply text (default:
    a short line naming the model).  ``context_window``, when set, makes prompts that do
    not fit fail with each API's context-length error.  ``stream`` (a `StreamBehavior`)
    sets the chunk timing and a fault after N chunks for requests with ``"stream": true``.
    """

    latency: Latency = field(default=Latency("fixed", 0.0), converter=_to_latency)
    failure_rate: float = field(default=0.0, validator=_rate)
    failures: tuple[Action, ...] = field(default=(500,), converter=_to_actions)
    retry_after: float | None = field(default=None, validator=_opt_non_negative)
    output_tokens: tuple[int, int] = field(default=(16, 16), converter=_to_token_range)
    content: str | None = None
    context_window: int | None = field(default=None, validator=_opt_positive_int)
    stream: StreamBehavior | None = field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(StreamBehavior)),
    )

    @classmethod
    def always(cls, action: Action, **changes: Any) -> ModelBehavior:
        """A behaviour whose every answer is ``action`` (``"ok"`` for plain success)."""
        return cls(failure_rate=1.0, failures=(action,), **changes)


@frozen(kw_only=True)
class RecordedRequest:
    """The last request the server accepted for a model (keys are not kept)."""

    api: str
    model: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]


# a body fault asked of a streamed request becomes the stream's fault, at its start
_STREAMED_FAULTS: Final = {
    "malformed": "malformed",
    "incomplete": "incomplete",
    "truncated": "reset",
}
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})
_DEFAULT_BEHAVIOR = ModelBehavior()


# --------------------------------------------------------------------------- wire shapes

_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_OPENAI_ERRORS: Final = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    529: ("server_error", "overloaded"),
}
_STATUS_MESSAGES: Final = {
    400: "Invalid request.",
    401: "Invalid API key.",
    403: "Your API key does not have permission to use the specified resource.",
    404: "The requested resource could not be found.",
    429: "Rate limit exceeded; please slow down.",
    500: "Internal server error.",
    503: "The service is temporarily unavailable.",
    529: "Overloaded",
}
_HTML_STATUSES: Final = frozenset({502, 504})
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503, 529})


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(block.get("text", "")) for block in content if isinstance(block, Mapping)
        )
    return ""


class _Reject(Exception):
    """Internal: stop handling with this response."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__()
        self.response = response


# --------------------------------------------------------------------------- shared controls


class _Controls:
    """Behaviours, outages, scripts and counters shared by the server and `FakeProvider`."""

    def __init__(
        self,
        behaviors: Mapping[str, ModelBehavior] | None,
        default: ModelBehavior | None,
        seed: int,
    ) -> None:
        self._behaviors: dict[str, ModelBehavior] = {}
        for model, behavior in (behaviors or {}).items():
            self.set_behavior(model, behavior)
        if default is not None and not isinstance(default, ModelBehavior):
            raise ConfigurationError(
                f"default must be a ModelBehavior or None, got {type(default).__name__}"
            )
        self._default = default
        self._seed = seed
        self._rngs: dict[str, random.Random] = {}
        self._scripts: dict[str, collections.deque[Action]] = {}
        self._outages: dict[str, Action] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._total = 0
        self._waiters: list[tuple[str | None, int, asyncio.Future[None]]] = []

    def set_behavior(self, model: str, behavior: ModelBehavior | None) -> None:
        """Change ``model``'s behaviour (None: back to the default)."""
        if behavior is None:
            self._behaviors.pop(model, None)
        elif not isinstance(behavior, ModelBehavior):
            raise ConfigurationError(
                f"behavior for {model!r} must be a ModelBehavior, got {type(behavior).__name__}"
            )
        else:
            self._behaviors[model] = behavior

    def set_outage(self, target: str, enabled: bool = True, *, action: Action = 503) -> None:
        """
        Switch an outage on or off for ``target``: a model id, an API or provider name
        (``"anthropic"``, ``"openai"``, a `FakeProvider`'s name), or ``"*"`` (everything).
        While on, every request for the target gets ``action`` (default 503).
        """
        if enabled:
            self._outages[target] = _check_action(action, "action")
        else:
            self._outages.pop(target, None)

    @property
    def outages(self) -> Mapping[str, Action]:
        """The outages in force: target -> action."""
        return MappingProxyType(dict(self._outages))

    def script(self, model: str, actions: Iterable[Action]) -> None:
        """Queue ``actions`` as ``model``'s next answers, after any already queued."""
        checked = [_check_action(a, f"actions[{i}]") for i, a in enumerate(actions)]
        self._scripts.setdefault(model, collections.deque()).extend(checked)

    def pending(self, model: str) -> int:
        """How many scripted answers are still queued for ``model``."""
        return len(self._scripts.get(model, ()))

    def requests(self, model: str | None = None) -> int:
        """
        Requests that reached ``model`` (after authentication and validation), or, with
        no argument, every request received.
        """
        return self._total if model is None else self._counts[model]

    async def wait_for_requests(self, count: int = 1, model: str | None = None) -> None:
        """
        Return once `requests` (for ``model``, or in total) has reached ``count``: a way
        for tests to know a request is in flight without sleeping.  Put a deadline
        around it if the request might never come.
        """
        if self.requests(model) >= count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (model, count, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _counted(self, model: str | None) -> None:
        if model is None:
            self._total += 1
        else:
            self._counts[model] += 1
        if self._waiters:
            for wanted, count, waiter in list(self._waiters):
                if not waiter.done() and self.requests(wanted) >= count:
                    waiter.set_result(None)

    def request_counts(self) -> dict[str, int]:
        """Requests per model, as a new dict."""
        return dict(self._counts)

    def reset_counters(self) -> None:
        """Zero every counter."""
        self._counts.clear()
        self._total = 0

    def _rng(self, model: str) -> random.Random:
        rng = self._rngs.get(model)
        if rng is None:
            rng = self._rngs[model] = random.Random(f"{self._seed}:{model}")
        return rng

    def _action(
        self, model: str, group: str, behavior: ModelBehavior, rng: random.Random
    ) -> Action:
        """The answer for this request: outage, then script, then a failure draw, else ok."""
        outages = self._outages
        if outages:
            for target in (model, group, "*"):
                action = outages.get(target)
                if action is not None:
                    return action
        queue = self._scripts.get(model)
        if queue:
            return queue.popleft()
        if behavior.failure_rate and rng.random() < behavior.failure_rate:
            return rng.choice(behavior.failures)
        return "ok"

    def _output_tokens(
        self, behavior: ModelBehavior, rng: random.Random, max_tokens: int | None
    ) -> tuple[int, bool]:
        low, high = behavior.output_tokens
        out = low if low == high else rng.randint(low, high)
        if max_tokens is not None and out >= max_tokens:
            return max_tokens, True
        return out, False


# --------------------------------------------------------------------------- the server


class FakeLLMServer(_Controls):
    """
    A real aiohttp server on ``host`` (default 127.0.0.1) and a random free port.

    ``behaviors`` maps model ids to `ModelBehavior`; any other model gets ``default``
    (a plain success), or 404 when ``default`` is None.  With ``api_key`` set, a request
    carrying another key gets 401 (a missing key always does).  ``seed`` fixes every
    random draw (one RNG per model, so concurrency does not change a model's sequence).

    Use ``async with``: the server listens on enter and stops on exit, releasing
    hanging requests.  `url`, `anthropic_base_url` and `openai_base_url` are valid
    inside the block.  The control methods (`set_outage`, `script`, `set_behavior`) take
    effect for the next request; outage targets are model ids, ``"anthropic"``,
    ``"openai"`` or ``"*"``.

    ``rpm`` makes the server enforce a provider's requests-per-minute limit over every
    model: a token bucket of ``rpm_burst`` requests (default one second's worth,
    ``ceil(rpm / 60)``) refilled at ``rpm / 60`` per second; a request finding it empty
    gets 429 with ``Retry-After``.  `rpm_stats` says how many were accepted and refused
    and over how long.
    """

    def __init__(
        self,
        behaviors: Mapping[str, ModelBehavior] | None = None,
        *,
        default: ModelBehavior | None = _DEFAULT_BEHAVIOR,
        api_key: str | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        rpm: int | None = None,
        rpm_burst: int | None = None,
    ) -> None:
        super().__init__(behaviors, default, seed)
        for name, value in (("rpm", rpm), ("rpm_burst", rpm_burst)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(f"{name} must be an integer >= 1 or None, got {value!r}")
        self._rpm = rpm
        self._rpm_burst = float(rpm_burst or math.ceil((rpm or 60) / 60))
        self._rpm_tokens = self._rpm_burst
        self._rpm_at: float | None = None
        self._rpm_accepted: list[float] = []  # first and last acceptance times
        self._rpm_counts = [0, 0]  # accepted, refused
        self._api_key = api_key
        self._host = host
        self._last: dict[str, RecordedRequest] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._url: str | None = None

    def __repr__(self) -> str:
        return f"FakeLLMServer(url={self._url!r})"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._runner is not None:
            raise ConfigurationError("FakeLLMServer is already running")
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._json_errors])
        app.on_response_prepare.append(self._stamp)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_post("/v1/chat/completions", self._openai)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, 0)
            await site.start()
            host, port = runner.addresses[0][:2]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._closing = asyncio.Event()
        self._url = f"http://{host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening and release hanging requests; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``; raises `ConfigurationError` before enter."""
        if self._url is None or self._runner is None:
            raise ConfigurationError("FakeLLMServer is not running; use `async with` first")
        return self._url

    @property
    def anthropic_base_url(self) -> str:
        """The ``base_url`` for `AnthropicProvider` (it appends ``/v1/messages``)."""
        return self.url

    @property
    def openai_base_url(self) -> str:
        """The ``base_url`` for `OpenAIProvider` (it appends ``/chat/completions``)."""
        return self.url + "/v1"

    # ------------------------------------------------------------------ control

    def last_request(self, model: str) -> RecordedRequest | None:
        """The last request that reached ``model`` (body and headers, keys removed)."""
        return self._last.get(model)

    def reset_counters(self) -> None:
        """Zero every counter and forget the last requests."""
        super().reset_counters()
        self._last.clear()
        self._rpm_accepted.clear()
        self._rpm_counts = [0, 0]

    def rpm_stats(self) -> dict[str, float]:
        """
        With ``rpm`` set: ``accepted`` and ``refused`` (429) requests, and ``span_s``,
        the seconds from the first accepted request to the last (so the rate they came
        at is ``(accepted - 1) / span_s``).
        """
        span = self._rpm_accepted[-1] - self._rpm_accepted[0] if self._rpm_accepted else 0.0
        return {
            "accepted": self._rpm_counts[0],
            "refused": self._rpm_counts[1],
            "span_s": span,
        }

    def _rpm_tokens_now(self, rate: float) -> float:
        """The bucket's tokens, refilled up to now."""
        now = time.monotonic()
        if self._rpm_at is not None:
            self._rpm_tokens = min(self._rpm_burst, self._rpm_tokens + (now - self._rpm_at) * rate)
        self._rpm_at = now
        return self._rpm_tokens

    def _rpm_admit(self) -> float | None:
        """Take a token from the bucket; None when taken, else the seconds until one is."""
        assert self._rpm is not None
        rate = self._rpm / 60.0
        self._rpm_tokens_now(rate)
        if self._rpm_tokens >= 1.0:
            self._rpm_tokens -= 1.0
            self._rpm_counts[0] += 1
            now = time.monotonic()
            if len(self._rpm_accepted) < 2:
                self._rpm_accepted.append(now)
            else:
                self._rpm_accepted[1] = now
            return None
        self._rpm_counts[1] += 1
        return (1.0 - self._rpm_tokens) / rate

    # ------------------------------------------------------------------ handlers

    @staticmethod
    def _api_of(request: web.Request) -> _Api:
        if (
            request.path.startswith("/v1/messages")
            or "anthropic-version" in request.headers
            or "x-api-key" in request.headers
        ):
            return _ANTHROPIC
        return _OPENAI

    @web.middleware
    async def _json_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Unknown routes and methods answer in the API's JSON error shape."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status not in (404, 405):
                raise
            api = self._api_of(request)
            if api == _ANTHROPIC:
                message = "Not Found" if exc.status == 404 else "Method Not Allowed"
                return self._error(api, exc.status, message)
            message = f"Invalid URL ({request.method} {request.path})"
            return self._error(api, exc.status, message, code="unknown_url")

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        """
        Every response: a request id and rate-limit headers, as the real APIs send.

        With ``rpm`` set, the request figures are the bucket's: ``remaining`` is what is
        left after this request and ``reset`` the time until the bucket is full again
        (Anthropic: the instant, to the millisecond; OpenAI: a duration such as
        ``"1.5s"``).  Otherwise fixed, generous figures.
        """
        headers = response.headers
        anthropic = self._api_of(request) == _ANTHROPIC
        id_header = "request-id" if anthropic else "x-request-id"
        if id_header not in headers:
            headers[id_header] = f"req_{next(self._ids):024d}"
        retry = headers.get("retry-after")
        if response.status == 429 and retry is None:
            return  # a reset time would read as a retry-after the scenario did not set
        wait = float(retry) if retry is not None else 60.0
        limits = [("requests", 1000, 999, wait), ("tokens", 1_000_000, 999_999, wait)]
        if self._rpm is not None:
            rate = self._rpm / 60.0
            tokens = self._rpm_tokens_now(rate)
            full = (self._rpm_burst - tokens) / rate
            limits[0] = ("requests", self._rpm, math.floor(tokens), full)
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

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        self._counted(None)
        try:
            key = request.headers.get("x-api-key")
            scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
            if not key and scheme.lower() == "bearer":
                key = bearer.strip()  # the official SDK sends its api_key this way
            if not key:
                raise _Reject(self._error(_ANTHROPIC, 401, "x-api-key header is required"))
            self._check_key(_ANTHROPIC, key)
            if not request.headers.get("anthropic-version"):
                raise _Reject(self._error(_ANTHROPIC, 400, "anthropic-version: header is required"))
            body = await self._read_json(_ANTHROPIC, request)
            model = self._require_str(_ANTHROPIC, body, "model")
            max_tokens = body.get("max_tokens")
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
                raise _Reject(self._error(_ANTHROPIC, 400, "max_tokens: Field required"))
            if max_tokens < 1:
                raise _Reject(
                    self._error(_ANTHROPIC, 400, "max_tokens: Input should be greater than 0")
                )
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _Reject(self._error(_ANTHROPIC, 400, "messages: Field required"))
            text = _text_of(body.get("system"))
            for index, message in enumerate(messages):
                if not isinstance(message, Mapping) or message.get("role") not in (
                    "user",
                    "assistant",
                ):
                    raise _Reject(
                        self._error(
                            _ANTHROPIC,
                            400,
                            f"messages.{index}.role: Input should be 'user' or 'assistant'",
                        )
                    )
                if "content" not in message:
                    raise _Reject(
                        self._error(_ANTHROPIC, 400, f"messages.{index}.content: Field required")
                    )
                text += _text_of(message["content"])
            if problem := check_anthropic(body):
                raise _Reject(self._error(_ANTHROPIC, 400, problem))
            return await self._serve(_ANTHROPIC, request, model, body, text, max_tokens)
        except _Reject as reject:
            return reject.response

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        self._counted(None)
        try:
            auth = request.headers.get("Authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise _Reject(
                    self._error(
                        _OPENAI,
                        401,
                        "You didn't provide an API key. You need to provide your API key in an "
                        "Authorization header using Bearer auth.",
                        code=None,
                    )
                )
            self._check_key(_OPENAI, key.strip())
            body = await self._read_json(_OPENAI, request)
            model = self._require_str(_OPENAI, body, "model")
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _Reject(
                    self._error(
                        _OPENAI, 400, "Missing required parameter: 'messages'.", param="messages"
                    )
                )
            text = ""
            for index, message in enumerate(messages):
                if not isinstance(message, Mapping) or message.get("role") not in (
                    "system",
                    "developer",
                    "user",
                    "assistant",
                    "tool",
                ):
                    raise _Reject(
                        self._error(
                            _OPENAI,
                            400,
                            f"Invalid value for 'messages[{index}].role'.",
                            param=f"messages.[{index}].role",
                        )
                    )
                text += _text_of(message.get("content"))
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            if max_tokens is not None and (
                isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
            ):
                raise _Reject(
                    self._error(
                        _OPENAI, 400, "Invalid 'max_tokens': must be >= 1.", param="max_tokens"
                    )
                )
            if problem_param := check_openai(body):
                raise _Reject(self._error(_OPENAI, 400, problem_param[0], param=problem_param[1]))
            return await self._serve(_OPENAI, request, model, body, text, max_tokens)
        except _Reject as reject:
            return reject.response

    def _check_key(self, api: _Api, key: str) -> None:
        if self._api_key is not None and not hmac.compare_digest(
            key.encode(), self._api_key.encode()
        ):
            message = (
                "invalid x-api-key"
                if api == _ANTHROPIC
                else "Incorrect API key provided. You can find your API key in your account."
            )
            raise _Reject(self._error(api, 401, message))

    async def _read_json(self, api: _Api, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise _Reject(self._error(api, 400, "The request body is not valid JSON.")) from None
        if not isinstance(body, dict):
            raise _Reject(self._error(api, 400, "The request body must be a JSON object."))
        return body

    def _require_str(self, api: _Api, body: Mapping[str, Any], name: str) -> str:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            message = (
                f"{name}: Field required"
                if api == _ANTHROPIC
                else f"you must provide a {name} parameter"
            )
            raise _Reject(self._error(api, 400, message, param=name))
        return value

    async def _serve(
        self,
        api: _Api,
        request: web.Request,
        model: str,
        body: Mapping[str, Any],
        text: str,
        max_tokens: int | None,
    ) -> web.StreamResponse:
        behavior = self._behaviors.get(model, self._default)
        if behavior is None:
            if api == _ANTHROPIC:
                return self._error(api, 404, f"model: {model}")
            return self._error(
                api,
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        self._counted(model)
        self._last[model] = RecordedRequest(
            api=api,
            model=model,
            body=body,
            headers={k: v for k, v in request.headers.items() if k.lower() not in _SECRET_HEADERS},
        )
        if self._rpm is not None and (wait := self._rpm_admit()) is not None:
            return self._error(api, 429, "Rate limit reached for requests.", retry_after=wait)
        input_tokens = estimate_tokens(text)
        window = behavior.context_window
        if window is not None and input_tokens + (max_tokens or 0) > window:
            return self._context_error(api, input_tokens, max_tokens or 0, window)

        rng = self._rng(model)
        delay_ms = behavior.latency.sample(rng)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)

        action = self._action(model, api, behavior, rng)
        streamed = body.get("stream") is True
        if (
            action == "ok"
            or isinstance(action, FakeReply)
            or (streamed and isinstance(action, str) and action in _STREAMED_FAULTS)
        ):
            out, truncated = self._output_tokens(behavior, rng, max_tokens)
            content = behavior.content if behavior.content is not None else f"Reply from {model}."
            if streamed:  # Server-Sent Events, never a plain JSON body
                reply = action if isinstance(action, FakeReply) else auto_reply(api, body)
                calls: list[tuple[str, str, str]] = []
                if reply is not None:
                    content = reply.text(content) or ""
                    calls = streamed_calls(api, reply)
                return await serve_stream(
                    request,
                    api=api,
                    model=model,
                    number=next(self._ids),
                    body=body,
                    content=content,
                    input_tokens=input_tokens,
                    output_tokens=out,
                    truncated=truncated,
                    behavior=behavior.stream,
                    closing=self._closing,
                    fault=_STREAMED_FAULTS.get(action) if isinstance(action, str) else None,
                    calls=calls,
                    stop_reason=None if reply is None else reply.stop_reason,
                )
            payload = self._success(api, model, content, input_tokens, out, truncated)
            reply = action if isinstance(action, FakeReply) else auto_reply(api, body)
            if reply is not None:
                apply_reply(api, payload, reply, content)
            return _json(payload)
        return await self._fault(api, request, model, behavior, action, input_tokens, max_tokens)

    def _success(
        self,
        api: _Api,
        model: str,
        content: str,
        input_tokens: int,
        output_tokens: int,
        truncated: bool,
    ) -> dict[str, Any]:
        n = next(self._ids)
        if api == _ANTHROPIC:
            return {
                "id": f"msg_{n:024d}",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": content}],
                "model": model,
                "stop_reason": "max_tokens" if truncated else "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
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

    async def _fault(
        self,
        api: _Api,
        request: web.Request,
        model: str,
        behavior: ModelBehavior,
        action: Action,
        input_tokens: int,
        max_tokens: int | None,
    ) -> web.StreamResponse:
        if isinstance(action, int):
            if action in _HTML_STATUSES:
                reason = "Bad Gateway" if action == 502 else "Gateway Timeout"
                return web.Response(
                    status=action,
                    text=f"<html><body><h1>{action} {reason}</h1></body></html>",
                    content_type="text/html",
                )
            retry = behavior.retry_after if action in _RETRY_AFTER_STATUSES else None
            return self._error(api, action, _STATUS_MESSAGES.get(action), retry_after=retry)
        if action in ("hang", "timeout"):
            await self._closing.wait()
            return self._error(api, 503, "The server is shutting down.")
        if action == "reset":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if action == "context_length":
            window = max(1, input_tokens - 1)
            return self._context_error(api, input_tokens, max_tokens or 0, window)
        if action == "content_policy":
            if api == _ANTHROPIC:
                return self._error(
                    api,
                    400,
                    "Output blocked by content filtering policy: the request violates the "
                    "usage policy.",
                )
            return self._error(
                api,
                400,
                "Your request was rejected as a result of our safety system.",
                code="content_policy_violation",
            )
        good = self._success(api, model, "x" * 40, input_tokens, 16, False)
        payload = json.dumps(good).encode()
        if action == "malformed":
            return web.Response(
                body=payload[: len(payload) // 2], status=200, content_type="application/json"
            )
        if action == "incomplete":
            good.pop("content" if api == _ANTHROPIC else "choices", None)
            good.pop("usage", None)
            return _json(good)
        # truncated: promise the whole body, send half, drop the connection
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        if request.transport is not None:
            request.transport.close()
        return response

    def _context_error(
        self, api: _Api, input_tokens: int, max_tokens: int, window: int
    ) -> web.Response:
        if api == _ANTHROPIC:
            if input_tokens > window:
                message = f"prompt is too long: {input_tokens} tokens > {window} maximum"
            else:
                message = (
                    f"input length and `max_tokens` exceed context limit: {input_tokens} + "
                    f"{max_tokens} > {window}, decrease input length or `max_tokens` and try "
                    "again"
                )
            return self._error(api, 400, message)
        return self._error(
            api,
            400,
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{input_tokens + max_tokens} tokens ({input_tokens} in the messages, {max_tokens} "
            "in the completion). Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )

    def _error(
        self,
        api: _Api,
        status: int,
        message: str | None,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> web.Response:
        text = message or _STATUS_MESSAGES.get(status, "Error.")
        kind_4xx = "invalid_request_error"  # 413, 422 and other 4xx not in the tables
        headers: dict[str, str] = {}
        n = next(self._ids)
        if retry_after is not None:
            headers["retry-after"] = str(math.ceil(retry_after))
        if api == _ANTHROPIC:
            headers["request-id"] = f"req_{n:024d}"
            kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else kind_4xx)
            return _json(
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
        kind, default_code = _OPENAI_ERRORS.get(
            status, ("server_error" if status >= 500 else kind_4xx, None)
        )
        return _json(
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
