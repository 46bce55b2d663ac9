"""
What `FakeLLMServer` counts as a request's prompt, and its prompt cache.

The prompt's text is what the real APIs bill as input: the tool definitions and a
structured-output schema (their JSON), the system prompt and the messages' text.  An
Anthropic request may mark parts of it for caching (``cache_control`` on a tool, a
system block or a content block; at the top level, the whole prompt), as the real API
takes them: the prompt is cached in the order tools, system, messages, and each mark
ends a prefix.  The first request with a prefix writes it (billed at the write price:
``cache_creation_input_tokens``, split by TTL in ``cache_creation``); a later one with
the same prefix for the same model reads it (``cache_read_input_tokens``); the prompt
after the last mark is ``input_tokens``.  The fake has no minimum cacheable length,
and its entries do not expire (it forgets them all past `_MAX_ENTRIES`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from ._fake_wire import text_of

__all__ = ["CacheUsage", "PromptCache", "anthropic_prompt", "openai_prompt"]

Marks = tuple[tuple[int, str], ...]
"""Where each marked part of a prompt's text ends (its length so far) and its TTL."""

_MAX_ENTRIES: Final = 65_536


class CacheUsage(NamedTuple):
    """Prompt tokens written to the 5-minute and the 1-hour cache, and read from it."""

    write_5m: int
    write_1h: int
    read: int


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _unmarked(block: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in block.items() if key != "cache_control"}


def _ttl(block: object) -> str | None:
    # the TTL a part's mark asks for ("5m" or "1h"), None for an unmarked part
    control = block.get("cache_control") if isinstance(block, Mapping) else None
    if control is None:
        return None
    return "1h" if isinstance(control, Mapping) and control.get("ttl") == "1h" else "5m"


def anthropic_prompt(body: Mapping[str, Any]) -> tuple[str, Marks]:
    """A Messages API request's prompt text, in cache order, and its cache marks."""
    parts: list[str] = []
    marks: list[tuple[int, str]] = []
    length = 0

    def add(text: str, block: object) -> None:
        nonlocal length
        parts.append(text)
        length += len(text)
        ttl = _ttl(block)
        if ttl is not None:
            marks.append((length, ttl))

    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        add(_json(_unmarked(tool) if isinstance(tool, Mapping) else tool), tool)
    output = body.get("output_config")
    if isinstance(output, Mapping) and output.get("format") is not None:
        add(_json(output["format"]), None)
    system = body.get("system")
    for block in system if isinstance(system, list) else [system]:
        add(text_of([block]) if isinstance(block, Mapping) else text_of(block), block)
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        for block in content if isinstance(content, list) else [content]:
            add(text_of([block]) if isinstance(block, Mapping) else text_of(block), block)
    ttl = _ttl(body)  # automatic caching: the whole prompt
    if ttl is not None and length:
        marks.append((length, ttl))
    return "".join(parts), tuple(marks)


def openai_prompt(body: Mapping[str, Any], messages: Sequence[Any]) -> str:
    """A Chat Completions request's prompt text: tools, response format, messages."""
    text = ""
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        text += _json(tools)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        text += _json(response_format.get("json_schema"))
    for message in messages:
        text += text_of(message.get("content"))
    return text


class PromptCache:
    """The prefixes each model has cached (as digests of their text)."""

    def __init__(self) -> None:
        self._entries: dict[str, set[bytes]] = {}
        self._size = 0

    def use(self, model: str, text: str, marks: Marks) -> CacheUsage:
        """
        Read the longest cached prefix ``marks`` end, write the rest up to the last mark
        (each part at the TTL of the mark that ends it); the tokens of each (the
        fake's count: a quarter of the characters).
        """
        if self._size >= _MAX_ENTRIES:
            self._entries.clear()
            self._size = 0
        cached = self._entries.setdefault(model, set())
        digests = [
            hashlib.sha256(text[:end].encode("utf-8", "surrogatepass")).digest() for end, _ in marks
        ]
        hit = 0
        for (end, _), digest in zip(reversed(marks), reversed(digests), strict=True):
            if digest in cached:
                hit = end
                break
        written = {"5m": 0, "1h": 0}
        start = hit
        for (end, ttl), digest in zip(marks, digests, strict=True):
            if end > start:
                written[ttl] += end // 4 - start // 4
                start = end
            if digest not in cached:
                cached.add(digest)
                self._size += 1
        return CacheUsage(written["5m"], written["1h"], hit // 4)

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0
