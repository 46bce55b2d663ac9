"""
The client's text encoding, as the stores write with it: checked once, names refused,
free text escaped.

The scripts' operations, numbers and field names are ASCII, so the stores speak any
encoding that writes ASCII as ASCII (UTF-8, Latin-1, ...) and refuse the others
(UTF-16, an unknown codec) at construction.  A name (a prefix, a breaker, budget or
rate-limit key) the encoding cannot write is refused, saying which: written any other
way it would be another key, or the same as another.  Free text (a failure's error, a
force's reason) keeps what the encoding cannot write as backslash escapes
(``\\u6a21``), so a provider's error in any script never fails the store's call.
"""

from __future__ import annotations

import codecs
from typing import Final

from empathy_models.backends import shown
from empathy_models.exceptions import ConfigurationError

__all__ = ["checked_codec", "name_bytes", "text_bytes", "writable_name"]

_ASCII: Final = "".join(map(chr, range(128)))


def checked_codec(encoding: object, errors: object) -> tuple[str, str]:
    """
    ``(encoding, errors)`` of a client the stores can speak through.

    Raises:
        ConfigurationError: an unknown encoding or error handler, or an encoding that
            does not write ASCII as ASCII.
    """
    if not isinstance(encoding, str) or not isinstance(errors, str):
        raise ConfigurationError(
            f"the Redis client's encoding and errors must be text, got {shown(encoding)} "
            f"and {shown(errors)}"
        )
    try:
        codecs.lookup(encoding)
        codecs.lookup_error(errors)
        as_ascii = _ASCII.encode(encoding) == _ASCII.encode("ascii")
    except LookupError as exc:
        raise ConfigurationError(
            f"the Redis client's encoding {encoding!r} (errors={errors!r}) cannot be used: "
            f"unknown encoding or error handler ({exc})"
        ) from None
    except (UnicodeError, ValueError, TypeError):  # a codec of bytes, not of text
        as_ascii = False
    if not as_ascii:
        raise ConfigurationError(
            f"the Redis client's encoding {encoding!r} cannot be used: the stores need one "
            "that writes ASCII as ASCII (the scripts read ASCII commands and numbers), "
            "such as 'utf-8' (the default) or 'latin-1'"
        )
    return encoding, errors


def writable_name(name: str, what: str, encoding: str) -> str:
    """
    ``name`` if ``encoding`` writes it as it is (no error handler needed).

    Raises:
        ConfigurationError: a name it cannot write, ``what`` saying what it is.
    """
    if isinstance(name, str) and not name.isascii():
        try:
            name.encode(encoding)
        except UnicodeEncodeError:
            raise ConfigurationError(
                f"{what} must be text the client's encoding ({encoding}) can write, "
                f"got {shown(name)}"
            ) from None
    return name


def name_bytes(name: str, what: str, encoding: str) -> bytes:
    """``name`` as the client writes it (`writable_name`'s refusal otherwise)."""
    return writable_name(name, what, encoding).encode(encoding)


def text_bytes(text: str, encoding: str, errors: str) -> bytes:
    """Free text as the client writes it, what it cannot write as backslash escapes."""
    try:
        return text.encode(encoding, errors)
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace")
