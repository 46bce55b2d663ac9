"""
``sqlite://`` URLs: their options, and the plugin the URL factories use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from ..._paths import unquoted_path
from ...exceptions import (
    ConfigurationError,
)
from .. import redact_url, url_flaw
from .._plugin import BackendPlugin
from ..batching import URL_OPTIONS, url_flag, url_number
from ._database import MEMORY
from ._state import SQLiteStateStore
from ._telemetry import SQLiteTelemetryBackend

# --------------------------------------------------------------------------- URLs


_COMMON_OPTIONS: Final[Mapping[str, Callable[[str, str], Any]]] = {
    "busy_timeout": partial(url_number(float), "sqlite"),
    "lock_timeout": partial(url_number(float), "sqlite"),
    "read_only": partial(url_flag, "sqlite"),
    "allow_foreign": partial(url_flag, "sqlite"),
}
_TELEMETRY_OPTIONS: Final[Mapping[str, Callable[[str, str], Any]]] = {
    **_COMMON_OPTIONS,
    **{name: partial(convert, "sqlite") for name, convert in URL_OPTIONS.items()},
}


def _expand_home(path: str, url: str) -> str:
    """``path`` with a leading ``~`` or ``~user`` expanded."""
    if not path.startswith("~"):
        return path
    try:
        return str(Path(path).expanduser())
    except RuntimeError:  # the user does not exist, or has no home directory
        raise ConfigurationError(
            f"sqlite URL {redact_url(url)!r}: cannot expand {path!r}: no home directory for "
            "that user; "
            "write the path in full"
        ) from None


def parse_sqlite_url(
    url: str, allowed: Mapping[str, Callable[[str, str], Any]] = _TELEMETRY_OPTIONS
) -> tuple[str, dict[str, Any]]:
    """
    Split a ``sqlite://`` URL into a path and keyword options.

    ``sqlite:///rel.db`` -> ``rel.db`` (relative to the working directory),
    ``sqlite:////abs/x.db`` -> ``/abs/x.db``, ``sqlite:///~/x.db`` -> ``$HOME/x.db`` (a
    leading ``~`` or ``~user`` expanded, as in ``empathy.toml``), ``sqlite://:memory:`` and
    ``sqlite:///:memory:`` -> ``:memory:``.  Raises `ConfigurationError` for another
    scheme, a host part, an empty path, a ``~user`` without a home directory or an
    unknown option, the URL in it with any password masked.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"not a valid sqlite:// URL: {shown!r} ({url_flaw(exc)})") from exc
    if parts.scheme.lower() != "sqlite":
        raise ConfigurationError(f"not a sqlite:// URL: {shown!r}")
    if parts.netloc == MEMORY and parts.path in ("", "/"):
        path = MEMORY
    elif parts.netloc:
        raise ConfigurationError(
            f"sqlite URL {shown!r} has a host part; use sqlite:///relative.db, "
            "sqlite:////absolute/path.db or sqlite://:memory:"
        )
    else:
        path = unquoted_path(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ConfigurationError(
                f"sqlite URL {shown!r} names no file; use sqlite:///relative.db, "
                "sqlite:////absolute/path.db or sqlite://:memory:"
            )
        path = _expand_home(path, url)
    options: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if name in URL_OPTIONS:
                hint = " (a telemetry URL's option: this store does not take it)"
            raise ConfigurationError(
                f"unknown sqlite URL option {name!r}{hint}; known: {', '.join(sorted(allowed))}"
            )
        options[name] = allowed[name](name, value)
    return path, options


def _telemetry(url: str, **options: Any) -> SQLiteTelemetryBackend:
    path, query = parse_sqlite_url(url, _TELEMETRY_OPTIONS)
    return SQLiteTelemetryBackend(path, **{**query, **options})


def _store(url: str, **options: Any) -> SQLiteStateStore:
    path, query = parse_sqlite_url(url, _COMMON_OPTIONS)
    return SQLiteStateStore(path, **{**query, **options})


PLUGIN = BackendPlugin(
    schemes=("sqlite",),
    package="empathy-models",
    telemetry=_telemetry,
    state_store=_store,
)
