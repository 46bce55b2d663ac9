"""`OpenAIProvider`: OpenAI Chat Completions (``POST {base_url}/chat/completions``) over aiohttp."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from .._validators import shown
from ..abc import Completion, CompletionRequest
from ..exceptions import ConfigurationError
from ._convert import answer_usage, new_completion, openai_body, openai_tool_calls
from ._http import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_STREAM_BYTES,
    DEFAULT_TIMEOUT,
    HTTPProvider,
)
from ._sse import OpenAIStreamDecoder
from ._wire import ResponseReader, openai_cached_tokens, reported_model, text_of_chunks

if TYPE_CHECKING:
    import aiohttp

__all__ = ["OpenAIProvider"]


class OpenAIProvider(HTTPProvider):
    """
    Calls any server speaking OpenAI Chat Completions: OpenAI itself, vLLM, Ollama,
    OpenRouter, a LiteLLM proxy (set ``base_url``, e.g. ``"http://localhost:11434/v1"``,
    and ``name`` so records and breaker keys tell them apart).

    The completion's ``content`` is the first choice's message content (``""`` when the
    model refused; ``stop_reason`` is then ``"refusal"``; content sent as a list of
    chunks, as Mistral's reasoning models send it, answer and deltas alike, is its
    ``text`` chunks' text, the thinking left out); tokens are
    ``usage.prompt_tokens`` / ``usage.completion_tokens`` (of the prompt tokens,
    ``usage.prompt_tokens_details.cached_tokens`` came from the prompt cache: the
    completion's ``cached_input_tokens``, priced at the model's cached input price; a
    count sent as a whole-number float, ``10.0``, is that integer; an answer without
    ``usage``, or with null, or with one of the two counts left out or null, has what
    it left out estimated, what it gave kept, and ``usage_reported`` False, see
    `Completion`; a count that is there but no count (negative, fractional, a string, a
    bool) makes the answer malformed); ``request_id`` is the ``x-request-id`` header.
    The ``model`` of the `Completion` is the id the response reports (often a dated
    snapshot of the one asked for), else the id asked for.
    Tool calls are read from ``message.tool_calls`` (``content`` is then ``""`` when the
    server sent null); a null ``content`` with a ``finish_reason`` and no call (Azure's
    output filter: ``"content_filter"``; a reasoning model out of tokens: ``"length"``)
    is ``""`` with that stop reason, as the same answer streamed is; tools, images, tool
    results and ``response_format`` are sent as the API documents them (see
    ``empathy_models.providers._convert``).

    Args:
        api_key: defaults to ``OPENAI_API_KEY`` (read at construction) only for
            api.openai.com or a base URL from ``OPENAI_BASE_URL``: an explicit
            third-party ``base_url`` needs its own ``api_key`` (or
            ``api_key_from_env=True``), so a real OpenAI key never reaches another server
            by accident.  Without a key, `complete` raises `AuthenticationError` saying
            what to set, before any request (servers that need no key accept any
            placeholder, e.g. ``api_key="ollama"``).
        base_url: defaults to ``OPENAI_BASE_URL`` when set, else
            ``https://api.openai.com/v1``.
        name: the provider's name in the registry, records and breaker keys.
        timeout: the per-request total in seconds (or an ``aiohttp.ClientTimeout``).
        max_response_bytes: a larger response body is not read (see `HTTPProvider`).
        max_stream_bytes: a streamed answer is not read past this many bytes (see
            `HTTPProvider`).
        organization: sent as the ``OpenAI-Organization`` header when given.
        max_tokens_field: the body field that carries the request's ``max_tokens``: by
            default ``"max_completion_tokens"`` for api.openai.com (its reasoning models
            reject ``max_tokens``) and ``"max_tokens"`` for every other server.
        headers: sent with every request (see `HTTPProvider`): for Azure OpenAI pass
            ``headers={"api-key": ...}`` and no ``api_key``.
        api_key_from_env: ``True`` reads ``OPENAI_API_KEY`` for any base URL, ``False``
            never (see `HTTPProvider`).
        api_key_env: the environment variable to read the key from instead of
            ``OPENAI_API_KEY``, for any base URL (see `HTTPProvider`).

    Raises:
        ConfigurationError: a ``max_tokens_field`` other than those two.
    """

    env_var = "OPENAI_API_KEY"
    base_url_env_var = "OPENAI_BASE_URL"
    default_base_url = "https://api.openai.com/v1"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        name: str = "openai",
        timeout: float | aiohttp.ClientTimeout | None = DEFAULT_TIMEOUT,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
        organization: str | None = None,
        max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None = None,
        headers: Mapping[str, str] | None = None,
        api_key_from_env: bool | None = None,
        api_key_env: str | None = None,
    ) -> None:
        if max_tokens_field not in (None, "max_tokens", "max_completion_tokens"):
            raise ConfigurationError(
                "max_tokens_field must be 'max_tokens' or 'max_completion_tokens', "
                f"got {shown(max_tokens_field)}"
            )
        self._organization = organization
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            name=name,
            timeout=timeout,
            headers=headers,
            api_key_from_env=api_key_from_env,
            max_response_bytes=max_response_bytes,
            max_stream_bytes=max_stream_bytes,
            api_key_env=api_key_env,
        )
        if max_tokens_field is None:
            official = urlsplit(self.base_url).hostname == "api.openai.com"
            max_tokens_field = "max_completion_tokens" if official else "max_tokens"
        self.max_tokens_field = max_tokens_field

    _stream_decoder = OpenAIStreamDecoder

    _answer_field = "choices"

    def _endpoint(self) -> str:
        return "/chat/completions"

    def _headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        if self._organization:
            headers["OpenAI-Organization"] = self._organization
        return headers

    def _payload(self, request: CompletionRequest) -> dict[str, Any]:
        return openai_body(request, self.max_tokens_field)

    def _parse(
        self,
        reader: ResponseReader,
        data: dict[str, Any],
        request: CompletionRequest,
        headers: Mapping[str, str],
    ) -> Completion:
        choices = reader.get(data, "choices", list, "response")
        if not choices:
            reader.fail("response.choices is empty")
        choice = choices[0]
        if not isinstance(choice, Mapping):
            reader.fail("response.choices[0] must be an object")
        message = reader.get(choice, "message", dict, "response.choices[0]")
        content = message.get("content")
        stop_reason = reader.optional_str(choice, "finish_reason")
        tool_calls = openai_tool_calls(reader, message, "response.choices[0].message")
        if content is None and isinstance(message.get("refusal"), str) and not tool_calls:
            content, stop_reason = "", "refusal"
        elif content is None:
            # a call, or a finish reason saying why nothing was written (an output
            # filter's "content_filter", "length" after reasoning): empty, as streamed
            if not tool_calls and stop_reason is None:
                reader.fail("response.choices[0].message.content is missing")
            content = ""
        elif not isinstance(content, str):
            # a list of chunks (Mistral's reasoning models): its text chunks
            text = text_of_chunks(content) if isinstance(content, list) else None
            if text is None:
                reader.fail(
                    "response.choices[0].message.content must be a string or a list of "
                    "content chunks"
                )
            content = text
        usage = answer_usage(self._usage(reader, data), content, tool_calls)
        return new_completion(
            content=content,
            model=reported_model(data.get("model"), request.model),
            stop_reason=stop_reason,
            request_id=headers.get("x-request-id") or reader.optional_str(data, "id"),
            tool_calls=tool_calls,
            response_id=reader.optional_str(data, "id"),
            service_tier=reader.optional_str(data, "service_tier"),
            **usage,
        )

    def _usage(self, reader: ResponseReader, data: dict[str, Any]) -> dict[str, Any] | None:
        if data.get("usage") is None:  # left out or null: none reported
            return None
        usage = reader.get(data, "usage", dict, "response")
        return {
            "input_tokens": reader.count(usage, "prompt_tokens", "response.usage"),
            "output_tokens": reader.count(usage, "completion_tokens", "response.usage"),
            "cached_input_tokens": openai_cached_tokens(usage, reader.count, "response.usage"),
        }
