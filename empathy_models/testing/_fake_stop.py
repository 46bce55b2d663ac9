"""
Stop sequences as `FakeLLMServer` honours them: a text answer ends before the first of
the request's stop sequences it holds (OpenAI's ``stop``, Anthropic's
``stop_sequences``), the sequence left out, as the real APIs end it: OpenAI's
``finish_reason`` ``"stop"``, Anthropic's ``stop_reason`` ``"stop_sequence"`` with the
sequence in ``stop_sequence``.  An answer that calls a tool is left whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["cut_at_stop", "stop_whole"]


def _sequences(api: str, body: Mapping[str, Any]) -> list[str]:
    # the request's stop sequences (the request checks refused any of the wrong type)
    given = body.get("stop_sequences" if api == "anthropic" else "stop")
    if isinstance(given, str):
        return [given] if given else []
    return [s for s in given if isinstance(s, str) and s] if isinstance(given, list) else []


def cut_at_stop(api: str, body: Mapping[str, Any], text: str) -> tuple[str, str | None]:
    """``text`` up to the first of ``body``'s stop sequences in it, and that sequence (None
    and ``text`` whole when it holds none)."""
    found: tuple[int, str] | None = None
    for sequence in _sequences(api, body):
        at = text.find(sequence)
        if at >= 0 and (found is None or at < found[0]):
            found = (at, sequence)
    return (text, None) if found is None else (text[: found[0]], found[1])


def stop_whole(api: str, body: Mapping[str, Any], payload: dict[str, Any]) -> None:
    """A whole answer's ``payload`` (text only, no tool call) ended at a stop sequence."""
    if api == "anthropic":
        blocks = payload.get("content")
        if not isinstance(blocks, list) or len(blocks) != 1 or blocks[0].get("type") != "text":
            return
        text, sequence = cut_at_stop(api, body, blocks[0]["text"])
        if sequence is not None:
            blocks[0]["text"] = text
            payload["stop_reason"], payload["stop_sequence"] = "stop_sequence", sequence
        return
    choice = payload["choices"][0]
    message = choice["message"]
    if message.get("tool_calls") or not isinstance(message.get("content"), str):
        return
    text, sequence = cut_at_stop(api, body, message["content"])
    if sequence is not None:
        message["content"], choice["finish_reason"] = text, "stop"
