"""RESP encoding shared by the store's script calls and its change feed."""

from __future__ import annotations


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*parts: bytes) -> bytes:
    """A command as RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(bulk(part) for part in parts)
