"""
URLs that may hold credentials, for messages: where a URL's userinfo ends
(`userinfo_end`), and what is wrong with a URL `urllib.parse` refused (`url_flaw`),
said without quoting the URL.

A leaf: imports nothing from the package.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["url_flaw", "userinfo_end"]

# what may follow the '@' that ends a userinfo, up to the next '/', '?' or '#': a host
# (a name, an address, a bracketed IPv6 address, a comma-separated list of them) and a
# numeric port
_HOST: Final = r"(?:\[[^\]/?#@]*\]|[^\[\]/?#@:,]*)(?::[0-9]*)?"
_HOST_PORT: Final = re.compile(rf"{_HOST}(?:,{_HOST})*")


def _delimiter(text: str, start: int = 0) -> int:
    """The index of the first '/', '?' or '#' at or after ``start`` (``len(text)`` if none)."""
    found = [i for i in (text.find(c, start) for c in "/?#") if i >= 0]
    return min(found, default=len(text))


def userinfo_end(rest: str) -> int:
    """
    The index of the '@' that ends the userinfo at the start of ``rest`` (a URL after
    its ``scheme://``), or -1 when it has none.

    A userinfo without a password ends at the last '@' before the first '/', '?' or
    '#'.  Once a ``user:`` starts it, the password may hold an unencoded '/', '?', '#'
    or '@' (generated passwords do): the userinfo then runs to the last '@' that a
    host[:port] follows, or to the last '@' at all when none does.  A later '@' of the
    path or query is taken for it too, which hides more than the password but never
    shows part of one.
    """
    end = _delimiter(rest)
    colon = rest.find(":", 0, end)
    if colon >= 0:
        ats = [i for i, c in enumerate(rest) if c == "@" and i > colon]
        for at in reversed(ats):
            if _HOST_PORT.fullmatch(rest, at + 1, _delimiter(rest, at + 1)):
                return at
        if ats:
            return ats[-1]
    return rest.rfind("@", 0, end)


def url_flaw(exc: ValueError) -> str:
    """
    What ``urllib.parse`` found wrong with a URL, said without its message: that quotes
    the text it took for the port or the host, which holds the password when the
    password has an unencoded '/', '?', '#' or '@'.
    """
    text = str(exc)
    if text.startswith("Port"):
        return (
            "its port is not a number from 0 to 65535 (percent-encode a '/', '?', '#' "
            "or '@' in the password)"
        )
    if text == "Invalid IPv6 URL":
        return "a '[' of an IPv6 address is not closed, or a ']' not opened"
    return "its host does not parse"
