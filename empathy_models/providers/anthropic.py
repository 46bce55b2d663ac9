"""`AnthropicProvider`: the Anthropic Messages API (``POST /v1/messages``) over aiohttp."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from ..abc import Completion, CompletionRequest
from ._convert import answer_usage, anthropic_body, anthropic_tool_calls, new_completion
from ._http import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_STREAM_BYTES,
    DEFAULT_TIMEOUT,
    HTTPProvider,
)
from ._sse import AnthropicStreamDecoder
from ._wire import ResponseReader, anthropic_usage_extras, reported_model

if TYPE_CHECKING:
    import aiohttp

__all__ = ["ANTHROPIC_VERSION", "AnthropicProvider"]

ANTHROPIC_VERSION: Final = "2023-06-01"
"""The ``anthropic-version`` header sent by default."""


class AnthropicProvider(HTTPProvider):
    """
    Calls Claude models through the Messages API.

    The completion's ``content`` is the concatenated text blocks; tokens are the
    response's ``usage.input_tokens`` / ``usage.output_tokens`` (cache reads and writes
    are not included: they are the completion's ``cache_write_tokens``,
    ``cache_write_1h_tokens`` and ``cache_read_tokens``, and the server's web searches
    its ``web_search_requests``, each priced by `ModelInfo.cost`; a count sent as a
    whole-number float, ``10.0``, is that integer; an answer without ``usage``, or with
    null, or with one of the two counts left out or null, has what it left out
    estimated, what it gave kept, and ``usage_reported`` False, see `Completion`; a
    count that is there but no count (negative, fractional, a string, a bool) makes the
    answer malformed); ``request_id`` is the ``request-id`` header.  The ``model`` of
    the `Completion` is the id the response reports (records keep the registry's id
    asked for).  Tool
    calls are the ``tool_use`` blocks (a server tool's ``server_tool_use`` block, run by the
    API itself, is none, streamed or not); a ``response_format`` is sent as the API's
    structured outputs parameter ``output_config.format``; ``seed`` has no counterpart
    and is not sent (see ``empathy_models.providers._convert``).

    Args:
        api_key: defaults to ``ANTHROPIC_API_KEY`` (read at construction) only for
            api.anthropic.com or a base URL from ``ANTHROPIC_BASE_URL``; without a key,
            `complete` raises `AuthenticationError` saying what to set, before any
            request.
        base_url: defaults to ``ANTHROPIC_BASE_URL`` when set, else
            ``https://api.anthropic.com``; it may point at any server speaking the
            Messages API (a proxy, `FakeLLMServer.anthropic_base_url`); a trailing ``/v1``
            is accepted.
        name: the provider's name in the registry, records and breaker keys.
        timeout: the per-request total in seconds (or an ``aiohttp.ClientTimeout``),
            applied on bound sessions too.
        max_response_bytes: a larger response body is not read (see `HTTPProvider`).
        max_stream_bytes: a streamed answer is not read past this many bytes (see
            `HTTPProvider`).
        anthropic_version: the ``anthropic-version`` header.
        headers: sent with every request (see `HTTPProvider`).
        api_key_from_env: ``True`` reads ``ANTHROPIC_API_KEY`` for any base URL,
            ``False`` never (see `HTTPProvider`).
        api_key_env: the environment variable to read the key from instead of
            ``ANTHROPIC_API_KEY``, for any base URL (see `HTTPProvider`).
    """

    env_var = "ANTHROPIC_API_KEY"
    base_url_env_var = "ANTHROPIC_BASE_URL"
    default_base_url = "https://api.anthropic.com"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        name: str = "anthropic",
        timeout: float | aiohttp.ClientTimeout | None = DEFAULT_TIMEOUT,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
        anthropic_version: str = ANTHROPIC_VERSION,
        headers: Mapping[str, str] | None = None,
        api_key_from_env: bool | None = None,
        api_key_env: str | None = None,
    ) -> None:
        self._version = anthropic_version
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

    _stream_decoder = AnthropicStreamDecoder

    _answer_field = "content"

    def _endpoint(self) -> str:
        path = urlsplit(self.base_url).path.rstrip("/")  # not its query
        return "/messages" if path.endswith("/v1") else "/v1/messages"

    def _headers(self, api_key: str | None) -> dict[str, str]:
        headers = {
            "anthropic-version": self._version,
            "content-type": "application/json",
            "accept": "application/json",
        }
        if api_key is not None:
            headers["x-api-key"] = api_key
        return headers

    def _payload(self, request: CompletionRequest) -> dict[str, Any]:
        return anthropic_body(request)

    def _parse(
        self,
        reader: ResponseReader,
        data: dict[str, Any],
        request: CompletionRequest,
        headers: Mapping[str, str],
    ) -> Completion:
        blocks = reader.get(data, "content", list, "response")
        parts: list[str] = []
        for index, block in enumerate(blocks):
            if not isinstance(block, Mapping):
                reader.fail(f"response.content[{index}] must be an object")
            if block.get("type") == "text":
                parts.append(reader.get(block, "text", str, f"response.content[{index}]"))
        content = "".join(parts)
        tool_calls = anthropic_tool_calls(reader, blocks, "response.content")
        usage = answer_usage(self._usage(reader, data), content, tool_calls)
        given = data.get("usage")  # its service tier ("standard", "priority", "batch")
        return new_completion(
            content=content,
            model=reported_model(data.get("model"), request.model),
            stop_reason=reader.optional_str(data, "stop_reason"),
            request_id=headers.get("request-id") or reader.optional_str(data, "id"),
            tool_calls=tool_calls,
            response_id=reader.optional_str(data, "id"),
            service_tier=(
                reader.optional_str(given, "service_tier") if isinstance(given, Mapping) else None
            ),
            **usage,
        )

    def _usage(self, reader: ResponseReader, data: dict[str, Any]) -> dict[str, Any] | None:
        if data.get("usage") is None:  # left out or null: none reported
            return None
        usage = reader.get(data, "usage", dict, "response")
        return {
            "input_tokens": reader.count(usage, "input_tokens", "response.usage"),
            "output_tokens": reader.count(usage, "output_tokens", "response.usage"),
            **anthropic_usage_extras(usage, reader.count, "response.usage"),
        }
