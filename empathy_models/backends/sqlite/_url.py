"""
``sqlite://`` URLs: their options, and the plugin the URL factories use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from ...exceptions import (
    ConfigurationError,
)
from .. import redact_url, url_flaw
from .._plugin import BackendPlugin
from ._database import MEMORY
from ._state import SQLiteStateStore
from ._telemetry import SQLiteTelemetryBackend

# --------------------------------------------------------------------------- URLs


def _parse_bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"sqlite URL option {name}={value!r} must be true or false")


def _parse_number(kind: Callable[[str], Any]) -> Callable[[str, str], Any]:
    def parse(name: str, value: str) -> Any:
        try:
            return kind(value)
        except ValueError as exc:
            raise ConfigurationError(
                f"sqlite URL option {name}={value!r} must be a {kind.__name__}"
            ) from exc

    return parse


_COMMON_OPTIONS: Final[Mapping[str, Callable[[str, str], Any]]] = {
    "busy_timeout": _parse_number(float),
    "lock_timeout": _parse_number(float),
    "read_only": _parse_bool,
    "allow_foreign": _parse_bool,
}
_TELEMETRY_OPTIONS: Final[Mapping[str, Callable[[str, str], Any]]] = {
    **_COMMON_OPTIONS,
    "batch": _parse_bool,
    "max_batch": _parse_number(int),
    "flush_interval": _parse_number(float),
    "max_queue": _parse_number(int),
    "on_full": lambda name, value: value,
    "spool": _parse_bool,
    "close_timeout": _parse_number(float),
    "exit_flush": _parse_bool,
}
TELEMETRY_ONLY: Final = frozenset(_TELEMETRY_OPTIONS) - frozenset(_COMMON_OPTIONS)
"""The telemetry's own options (``batch`` and the write-behind's), which a ``sqlite://``
or ``postgresql://`` telemetry URL takes and a state store's URL does not."""


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
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
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
            if name in TELEMETRY_ONLY:
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
