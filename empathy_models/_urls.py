"""
URLs that may hold credentials, for messages: where a URL's userinfo ends
(`userinfo_end`), which query options may hold a secret (`secret_param`, `masked_query`),
a URL with both masked (`masked_url`; every URL in a text: `masked_urls`), and what is
wrong with a URL `urllib.parse` refused (`url_flaw`), said without quoting the URL; and
the API keys a message must not quote (`masked_keys`).

A leaf: imports nothing from the package.
"""

from __future__ import annotations

import re
from difflib import get_close_matches
from typing import Final
from urllib.parse import unquote_plus

__all__ = [
    "KEYWORD_DSN",
    "KEYWORD_DSN_REFUSED",
    "KEY_PATTERN",
    "masked_keys",
    "masked_keywords",
    "masked_query",
    "masked_url",
    "masked_urls",
    "secret_param",
    "url_flaw",
    "userinfo_end",
]

KEYWORD_DSN: Final = re.compile(
    r"\s*(?:host|hostaddr|port|dbname|user|password|passfile|service|sslmode)\s*=", re.IGNORECASE
)
"""The start of a PostgreSQL keyword/value connection string (``host=db dbname=calls``):
no URL, nor a file's path (and it may hold the password, so it is never quoted)."""

KEYWORD_DSN_REFUSED: Final = (
    "a PostgreSQL keyword/value connection string (host=... dbname=...) is not a backend "
    "URL, nor a SQLite file's path; write it as a URL: "
    "postgresql://user:password@host:5432/dbname"
)
"""Why a `KEYWORD_DSN` is refused where a store's URL or a file's path is expected."""

KEY_PATTERN: Final = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4,}|sk-ant-[A-Za-z0-9_\-*]{4,})")
"""An API key as OpenAI and Anthropic issue them (``sk-...``, ``sk-ant-...``) in a text."""


def masked_keys(text: str) -> str:
    """``text`` with each API key in it (`KEY_PATTERN`) shown as ``sk-***``."""
    return KEY_PATTERN.sub("sk-***", text) if "sk-" in text else text


# what may follow the '@' that ends a userinfo, up to the next '/', '?' or '#': a host
# (a name, an address, a bracketed IPv6 address, a comma-separated list of them) and a
# numeric port
_NAME: Final = r"(?:\[[^\]/?#@]*\]|[^\[\]/?#@:,]*)"
_HOST: Final = rf"{_NAME}(?::[0-9]*)?"
_HOST_PORT: Final = re.compile(rf"{_HOST}(?:,{_HOST})*")
# the same with a port given (on one of its hosts at least)
_PORTED: Final = re.compile(rf"(?:{_HOST},)*{_NAME}:[0-9]+(?:,{_HOST})*")


SECRET_WORDS: Final = ("password", "passwd", "pwd", "secret", "token", "key", "auth", "credential")
"""
A query option whose name holds one of these, in any case, may hold a secret: the
drivers' own (``password``, ``sslpassword``, ``ssl_password``) and a gateway's
(``api-key``, ``client_secret``, ``access_token``), as a header's name may.
"""


NOT_SECRET: Final = frozenset({"key_ttl", "ssl_keyfile", "sslkey", "sslcert", "ssl_certfile"})
"""Options whose names hold a `SECRET_WORDS` word but whose values are no secret: the
Redis stores' key lifetime, and paths to a TLS key or certificate file."""


def secret_param(name: str) -> bool:
    """
    Whether the query option ``name`` may hold a secret: its name (percent-decoded)
    holds one of `SECRET_WORDS` (but for `NOT_SECRET`'s), is ``sig`` (a signed URL's
    signature), or is a misspelling of one of them (``pasword=``, ``passwrd=``: refused
    as unknown options, but what follows is the password all the same).
    """
    lowered = unquote_plus(name).lower()
    if lowered in NOT_SECRET:
        return False
    return (
        lowered == "sig"
        or any(word in lowered for word in SECRET_WORDS)
        or bool(get_close_matches(lowered, SECRET_WORDS, n=1, cutoff=0.8))
    )


def masked_query(query: str) -> str:
    """
    A URL's ``query`` (and the ``#fragment`` after it, if given) with the value of every
    option that may hold a secret (`secret_param`) shown ``***``.

    A secret's value may hold an unencoded '&' or '#' (generated passwords do): what
    follows it up to the next option with a ``=`` (an option without one:
    ``password=Xy7&Qz9``), and a fragment right after it (``password=Xy7#Qz9``), is
    taken for the rest of that value and masked with it.
    """
    query, hash_, fragment = query.partition("#")
    shown: list[str] = []
    in_secret = False
    for pair in query.split("&"):
        name, equals, _ = pair.partition("=")
        if equals and secret_param(name):
            shown.append(f"{name}=***")
            in_secret = True
        elif in_secret and not equals:
            continue  # the secret's value, past an unencoded '&'
        else:
            shown.append(pair)
            in_secret = False
    tail = "" if in_secret else hash_ + fragment  # a fragment right after a secret: its value's
    return "&".join(shown) + tail


# a ``name=value`` pair in text that is no URL: a PostgreSQL keyword/value connection
# string (``host=db password=x``, a value maybe quoted: ``password='a b'``) or a query
# after a scheme-less address; a value runs to the next blank (an unclosed quote to the end)
_KEYWORD: Final = re.compile(
    r"""(?P<name>[^\s=?&;'"]+)[ \t]*=[ \t]*(?P<value>'(?:[^'\\]|\\.)*(?:'|$)|\S*)""",
    re.DOTALL,
)


def masked_keywords(text: str) -> str:
    """
    ``text`` (a connection string that is no URL) with the value of every ``name=value``
    pair whose name may hold a secret (`secret_param`) shown ``***``: a PostgreSQL
    keyword/value string's ``password='...'``, a query's ``?password=...``; a value
    holding a '&' masked to its end.
    """
    return _KEYWORD.sub(
        lambda m: f"{m['name']}=***" if secret_param(m["name"]) else m[0],
        text,
    )


def _delimiter(text: str, start: int = 0) -> int:
    """The index of the first '/', '?' or '#' at or after ``start`` (``len(text)`` if none)."""
    found = [i for i in (text.find(c, start) for c in "/?#") if i >= 0]
    return min(found, default=len(text))


def userinfo_end(rest: str) -> int:
    """
    The index of the '@' that ends the userinfo at the start of ``rest`` (a URL after
    its ``scheme://``), or -1 when it has none.

    A userinfo without a password ends at the last '@' before the first '/', '?' or
    '#' (a ':' after that '@' is the port's).  Once a ``user:`` starts it, the
    password may hold an unencoded '/', '?', '#' or '@' (generated passwords do), and
    the path or query an '@' of its own (an e-mail address in a parameter).  The
    userinfo then ends at an '@' that a host[:port] follows: the first one whose host
    has a port (a password is not likely to hold ``@host:port`` and a delimiter, a path
    or query with an '@' after a port is); else the last one.  A URL whose text up to
    the first delimiter is itself a ``host:port``, with every '@' after its '?' or
    '#', has no userinfo (``redis://cache:6379/0?x=a@b``).  When no '@' is followed by
    a host[:port], the userinfo runs to the last '@'.  Where it cannot tell, it hides
    more than the password (``redis://u:pw@cache/0?x=a@b`` shows ``u:***@b``), never
    part of one.
    """
    end = _delimiter(rest)
    last = rest.rfind("@", 0, end)
    colon = rest.find(":", 0, end)
    if colon < 0 or colon > last >= 0:  # no password: a colon after the '@' is a port's
        return last
    ats = [i for i, c in enumerate(rest) if c == "@" and i > colon]
    hosts = [at for at in ats if _HOST_PORT.fullmatch(rest, at + 1, _delimiter(rest, at + 1))]
    for at in hosts:
        if _PORTED.fullmatch(rest, at + 1, _delimiter(rest, at + 1)):
            return at
    query = min((i for i in (rest.find("?", end), rest.find("#", end)) if i >= 0), default=-1)
    if ats and 0 <= query < ats[0] and _PORTED.fullmatch(rest, 0, end):
        return -1  # host:port, then a query or fragment holding every '@'
    return hosts[-1] if hosts else ats[-1] if ats else last


def masked_url(url: str) -> str:
    """
    ``url`` for a message: a ``user:password@`` before its host shown ``user:***@``, a
    lone ``user@`` (it may be a token) ``***@``; a password holding an unencoded '/',
    '?', '#' or '@' is masked whole (`userinfo_end`); the value of a query option that
    may hold a secret (``?api-key=``: `masked_query`) shown ``***``.  Needs no parsing,
    so an unparseable URL is masked too.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    at = userinfo_end(rest)
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        rest = (f"{user}:***" if colon else "***") + rest[at:]
    before, question, query = rest.partition("?")
    if question:  # the query and its fragment: a fragment right after a secret is part of it
        rest = f"{before}?{masked_query(query)}"
    return f"{head}{sep}{rest}"


_URL_IN_TEXT: Final = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
"""A URL inside free text, up to a blank, a quote or an angle bracket."""


def masked_urls(text: str) -> str:
    """``text`` (an exception's message, say) with every URL in it `masked_url`."""
    return _URL_IN_TEXT.sub(lambda m: masked_url(m[0]), text) if "://" in text else text


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
