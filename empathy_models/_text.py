"""
The size of text as the executor's token estimates count it: a stdlib-only leaf shared
by the input estimate (`_run`) and the providers' output estimate
(`providers._wire.estimated_output_tokens`), so both count bytes alike.
"""

from __future__ import annotations

__all__ = ["utf8_size"]


def utf8_size(text: str) -> int:
    """The UTF-8 bytes of ``text`` (a lone surrogate, which no provider accepts, as the 3
    it would take)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
