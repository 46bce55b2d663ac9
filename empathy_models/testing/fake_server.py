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
and ``anthropic-version``), its token count ``POST /v1/messages/count_tokens`` (the
input tokens the same request is billed), ``POST /v1/chat/completions`` (OpenAI:
``Authorization: Bearer``), and in either API's shape ``GET /v1/models`` (the models
given a behaviour) and ``GET /v1/models/{id}`` (a model it serves, else 404).
Requests are validated as the real APIs do (missing fields, and fields of the wrong
type or out of range -> 400, missing or wrong key -> 401, unknown model -> 404 when no
default behaviour is set) and errors come back in each API's own body shape; so are
tools, their names (letters, digits, ``_`` and ``-``: at most 64 for OpenAI, 128 for
Anthropic) and JSON schemas (one that is not JSON Schema -> 400), tool choices, the
content blocks and parts each API takes (images, documents, search results, thinking
blocks and server tools in Anthropic's; audio, file and refusal parts in OpenAI's; no
Anthropic message without content but a final assistant one) and the pairing of tool
calls with their results.  A body that is not JSON (``NaN``, or
nested deeper than the parser goes) gets 400, one over 64 MiB 413, both in the API's
shape.  Scripts may hold `FakeReply` answers (text, tool calls, JSON, a ``usage``
object sent as given); a request that forces a tool or asks for a JSON schema gets a
value the schema accepts, generated from it (OpenAI's ``json_object`` gets ``{}``); a
schema with no value the fake can make, or whose smallest value is over 1 MB of JSON,
gets 400 instead (script a `FakeReply` for such a request).  The official ``openai``
and ``anthropic`` SDKs work against it as configured for the real services
(``api_key=...``, ``base_url=...``): every response carries a request id and
rate-limit headers, and unknown routes answer with JSON
errors.  Usage is estimated: input tokens ``len(text) // 4 + 1`` of what the real APIs
bill as input (the tool definitions' and a structured-output schema's JSON, the system
prompt and the messages' text), output tokens drawn from the behaviour.  An Anthropic
request that marks parts for prompt caching (``cache_control``, e.g. through
``extra_body``) has them billed apart as the real API does: the first request with a
marked prefix writes it (``cache_creation_input_tokens``, split by TTL in
``cache_creation``), a later one for the same model reads it
(``cache_read_input_tokens``), the rest is ``input_tokens`` (no minimum length, no
expiry).  As the APIs do, an answer ends before the request's first stop sequence it
holds, an Anthropic answer with extended thinking on opens with a thinking block, and
an OpenAI answer carries the ``n`` choices, the ``logprobs`` and the ``service_tier``
asked for.

What happens to one request, in order: authentication and validation; model lookup;
the context-window check (when the behaviour has one); the latency draw (sleeping that
long); then the first of: an outage for the model or its API, the model's script, a
failure drawn with ``failure_rate``, or success (where a value is generated for a
forced tool or a JSON schema, and a schema the fake cannot answer gets its 400).

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

The server logs nothing per request (only a fault in the fake itself would: aiohttp's
500 with a traceback; a client leaving a stream before its end is normal and quiet)
and keeps only counters and the last request per model, so it can serve thousands of
requests in a benchmark.  It is single-loop: use it
from the event loop that entered it.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final, Self

from aiohttp import web

from .._validators import check, failure, integer
from ..exceptions import ConfigurationError
from ._fake_behavior import (
    DEFAULT_BEHAVIOR,
    FAULT_ACTIONS,
    Action,
    Latency,
    ModelBehavior,
    RecordedRequest,
    estimate_tokens,
)
from ._fake_controls import Controls
from ._fake_faults import serve_fault
from ._fake_fields import (
    SIGNATURE,
    THOUGHT,
    choices_asked,
    openai_logprobs,
    openai_served_tier,
    thinking_asked,
)
from ._fake_models import model_list, model_object
from ._fake_prompt import CacheUsage, PromptCache
from ._fake_requests import (
    MAX_BODY_BYTES,
    Accepted,
    Reject,
    authenticate,
    read_anthropic,
    read_openai,
)
from ._fake_rpm import RpmBucket
from ._fake_stop import cut_at_stop, stop_whole
from ._fake_stream import StreamBehavior, serve_stream
from ._fake_tools import AutoReplyRefused, FakeReply, apply_reply, auto_reply, streamed_calls
from ._fake_wire import ANTHROPIC, OPENAI, Api, Replies, api_of, json_response

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

_opt_count = integer(
    failure(ConfigurationError), low=1, optional=True, why="must be an integer >= 1 or None"
)

# a body fault asked of a streamed request becomes the stream's fault, at its start
_STREAMED_FAULTS: Final = {
    "malformed": "malformed",
    "incomplete": "incomplete",
    "truncated": "reset",
}
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})


def _answered(
    api: Api,
    payload: dict[str, Any],
    reply: FakeReply | None,
    content: str,
    body: Mapping[str, Any],
) -> dict[str, Any]:
    """``payload`` with ``reply`` applied, ended at a stop sequence (`stop_whole`), opened
    with a thinking block when the request turns thinking on (`thinking_asked`), and in
    OpenAI's format with the service tier the request asked for (`openai_served_tier`),
    which prices the call, its text's ``logprobs`` when asked (`openai_logprobs`), and the
    ``n`` choices it asked for (`choices_asked`)."""
    if reply is not None:
        apply_reply(api, payload, reply, content)
    stop_whole(api, body, payload)
    if api == ANTHROPIC and thinking_asked(body):  # its thinking block first
        block = {"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE}
        payload["content"].insert(0, block)
    if api == OPENAI and (tier := openai_served_tier(body)) is not None:
        payload["service_tier"] = tier
    if api == OPENAI and body.get("logprobs") is True:
        text = payload["choices"][0]["message"].get("content")
        payload["choices"][0]["logprobs"] = openai_logprobs(body, text or "")
    if api == OPENAI and (n := choices_asked(body)) > 1:  # alike, each billed
        choice = payload["choices"][0]
        payload["choices"] = [{**copy.deepcopy(choice), "index": i} for i in range(n)]
        if reply is None or reply.usage is None:  # a scripted usage is sent as given
            usage = payload["usage"]
            usage["completion_tokens"] *= n
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return payload


def _stop_reason(api: Api, reply: FakeReply | None, stop: str | None) -> str | None:
    """A stream's stop reason: the reply's, else Anthropic's for a stop sequence met."""
    if reply is not None and reply.stop_reason is not None:
        return reply.stop_reason
    return "stop_sequence" if stop is not None and api == ANTHROPIC else None


class FakeLLMServer(Controls):
    """
    A real aiohttp server on ``host`` and a random free port.

    Use ``async with``: the server listens on enter and stops on exit, releasing
    hanging requests.  `url`, `anthropic_base_url` and `openai_base_url` are valid
    inside the block.  The control methods (`set_outage`, `script`, `set_behavior`) take
    effect for the next request; outage targets are model ids, ``"anthropic"``,
    ``"openai"`` or ``"*"``.  `rpm_stats` says how many requests the ``rpm`` limit
    accepted and refused and over how long.

    Args:
        behaviors: model ids to `ModelBehavior`.
        default: the behaviour of any other model (a plain success); None: 404.
        api_key: when set, a request carrying another key gets 401 (a missing key always
            does).
        seed: fixes every random draw (one RNG per model, so concurrency does not change
            a model's sequence).
        host: default 127.0.0.1.
        rpm: a provider's requests-per-minute limit, enforced over every model: a token
            bucket of ``rpm_burst`` requests refilled at ``rpm / 60`` per second; a
            request finding it empty gets 429 with ``Retry-After``.
        rpm_burst: default one second's worth, ``ceil(rpm / 60)``.

    Raises:
        ConfigurationError: ``rpm`` or ``rpm_burst`` not an integer >= 1 (or None).
    """

    def __init__(
        self,
        behaviors: Mapping[str, ModelBehavior] | None = None,
        *,
        default: ModelBehavior | None = DEFAULT_BEHAVIOR,
        api_key: str | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        rpm: int | None = None,
        rpm_burst: int | None = None,
    ) -> None:
        super().__init__(behaviors, default, seed)
        rpm = check(_opt_count, "rpm", rpm)
        rpm_burst = check(_opt_count, "rpm_burst", rpm_burst)
        self._rpm = RpmBucket(rpm, rpm_burst)
        self._api_key = api_key
        self._host = host
        self._last: dict[str, RecordedRequest] = {}
        self._replies = Replies()
        self._cache = PromptCache()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._url: str | None = None

    def __repr__(self) -> str:
        return f"FakeLLMServer(url={self._url!r})"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._runner is not None:
            raise ConfigurationError("FakeLLMServer is already running")
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._json_errors])
        app.on_response_prepare.append(self._stamp)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._models)
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
        # an IPv6 address goes in brackets: http://[::1]:8080
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
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
        """
        ``http://127.0.0.1:<port>`` (``http://[::1]:<port>`` on an IPv6 host); raises
        `ConfigurationError` before enter.
        """
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
        self._rpm.reset()

    def rpm_stats(self) -> dict[str, float]:
        """
        With ``rpm`` set: ``accepted`` and ``refused`` (429) requests, and ``span_s``,
        the seconds from the first accepted request to the last (so the rate they came
        at is ``(accepted - 1) / span_s``).
        """
        return self._rpm.stats()

    # ------------------------------------------------------------------ handlers

    @web.middleware
    async def _json_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Unknown routes and methods (and any other 4xx) answer in the API's JSON error shape."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if not 400 <= exc.status < 500:
                raise
            api = api_of(request)
            if exc.status not in (404, 405):
                return self._replies.error(api, exc.status, exc.reason)
            if api == ANTHROPIC:
                message = "Not Found" if exc.status == 404 else "Method Not Allowed"
                return self._replies.error(api, exc.status, message)
            message = f"Invalid URL ({request.method} {request.path})"
            return self._replies.error(api, exc.status, message, code="unknown_url")

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every response: a request id and rate-limit headers (`Replies.stamp`)."""
        self._replies.stamp(response, anthropic=api_of(request) == ANTHROPIC, rpm=self._rpm)

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(ANTHROPIC, request, read_anthropic)

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        """
        Anthropic's token count: the input tokens the same request to ``/v1/messages``
        is billed (with its prompt cache's writes and reads), not a model's request.
        """
        try:
            accepted = await read_anthropic(request, self._api_key, counting=True)
        except Reject as reject:
            return self._replies.error(ANTHROPIC, reject.status, reject.message)
        return json_response({"input_tokens": estimate_tokens(accepted.text)})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        """
        The models endpoints in the API the request speaks (`api_of`): the models with a
        behaviour, or one model (any, with a default behaviour); not a model's request.
        """
        api = api_of(request)
        try:
            authenticate(api, request, self._api_key)
        except Reject as reject:
            return self._replies.error(api, reject.status, reject.message)
        model = request.match_info.get("model")
        if model is None:
            return json_response(model_list(api, sorted(self._behaviors)))
        if self._behaviors.get(model, self._default) is None:
            return self._replies.unknown_model(api, model)
        return json_response(model_object(api, model))

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(OPENAI, request, read_openai)

    async def _handle(
        self,
        api: Api,
        request: web.Request,
        read: Callable[[web.Request, str | None], Awaitable[Accepted]],
    ) -> web.StreamResponse:
        """Count the request, read it with ``read`` (an API's checks), then serve it."""
        self._counted(None)
        try:
            accepted = await read(request, self._api_key)
        except Reject as reject:
            return self._replies.error(
                api, reject.status, reject.message, param=reject.param, code=reject.code
            )
        return await self._serve(api, request, accepted)

    async def _serve(
        self, api: Api, request: web.Request, accepted: Accepted
    ) -> web.StreamResponse:
        """
        Answer an accepted request: model lookup, the rate limit, the context window,
        the latency, then the action drawn for it (see the module doc).
        """
        model, body, max_tokens = accepted.model, accepted.body, accepted.max_tokens
        behavior = self._behaviors.get(model, self._default)
        if behavior is None:
            return self._replies.unknown_model(api, model)
        self._counted(model)
        self._last[model] = RecordedRequest(
            api=api,
            model=model,
            body=body,
            headers={k: v for k, v in request.headers.items() if k.lower() not in _SECRET_HEADERS},
        )
        if self._rpm.limit is not None and (wait := self._rpm.admit()) is not None:
            return self._replies.error(
                api, 429, "Rate limit reached for requests.", retry_after=wait
            )
        input_tokens = estimate_tokens(accepted.text)
        window = behavior.context_window
        if window is not None and input_tokens + (max_tokens or 0) > window:
            return self._replies.context_error(api, input_tokens, max_tokens or 0, window)
        most = behavior.max_output_tokens
        if most is not None and max_tokens is not None and max_tokens > most:
            return self._replies.output_limit_error(api, model, body, max_tokens, most)

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
            try:
                reply = action if isinstance(action, FakeReply) else auto_reply(api, body)
            except AutoReplyRefused as refused:  # a schema the fake cannot answer
                return self._replies.error(api, 400, refused.message, param=refused.param)
            cache = None
            if accepted.cache_marks:  # the cached part of the prompt is billed apart
                cache = self._cache.use(model, accepted.text, accepted.cache_marks)
                input_tokens -= sum(cache)
            if streamed:  # Server-Sent Events, never a plain JSON body
                return await self._stream(
                    api,
                    request,
                    accepted,
                    (behavior, action, reply),
                    input_tokens,
                    out,
                    truncated,
                    cache,
                )
            content = behavior.content if behavior.content is not None else f"Reply from {model}."
            payload = self._replies.success(
                api, model, content, input_tokens, out, truncated, cache=cache
            )
            return json_response(_answered(api, payload, reply, content, body))
        return await serve_fault(
            self._replies,
            self._closing,
            api,
            request,
            model,
            behavior,
            action,
            input_tokens,
            max_tokens,
        )

    async def _stream(
        self,
        api: Api,
        request: web.Request,
        accepted: Accepted,
        answer: tuple[ModelBehavior, Action, FakeReply | None],
        input_tokens: int,
        output_tokens: int,
        truncated: bool,
        cache: CacheUsage | None,
    ) -> web.StreamResponse:
        """
        Answer a streamed request: the reply's text and tool calls, or a stream fault
        (``answer``: the model's behaviour, the action drawn and the reply).
        """
        behavior, action, reply = answer
        model, body = accepted.model, accepted.body
        content = behavior.content if behavior.content is not None else f"Reply from {model}."
        calls: list[tuple[str, str, str]] = []
        if reply is not None:
            content = reply.text(content) or ""
            calls = streamed_calls(api, reply)
        stop = None if calls else cut_at_stop(api, body, content)[1]
        if stop is not None:  # the text ends before a stop sequence
            content, truncated = cut_at_stop(api, body, content)[0], False
        return await serve_stream(
            request,
            api=api,
            model=model,
            number=self._replies.number(),
            body=body,
            content=content,
            usage=(input_tokens, output_tokens, cache),
            truncated=truncated,
            behavior=behavior.stream,
            closing=self._closing,
            fault=_STREAMED_FAULTS.get(action) if isinstance(action, str) else None,
            calls=calls,
            stop_reason=_stop_reason(api, reply, stop),
            stop_sequence=stop,
            scripted=None if reply is None else reply.usage,
        )
