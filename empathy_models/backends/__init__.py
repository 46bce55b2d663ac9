"""
Built-in backends and the URL factories.

A backend can be given as an object or as a URL:

============================  ============================================  =======================
URL                           backend                                       package
============================  ============================================  =======================
``memory://``                 `MemoryTelemetryBackend` / `MemoryStateStore`  empathy-models
``null://``                   `NullTelemetryBackend` / `NullStateStore`      empathy-models
``sqlite:///relative.db``     SQLite file (``sqlite:////abs/path.db``)      empathy-models
``redis://host:6379/0``       Redis circuit state                           empathy-models-redis
``postgresql://user@host/db`` PostgreSQL telemetry and circuit state        empathy-models-postgres
============================  ============================================  =======================

Other schemes are looked up among the entry points of the group
``empathy_models.backends``.  An unknown scheme, or a known one whose package is not
installed, raises `ConfigurationError` naming the schemes available or the package to
install; so does a scheme that two installed distributions claim, naming both (neither
is picked).  The built-in schemes are never looked up there: a plugin's entry point
named ``memory``, ``null`` or ``sqlite`` is not used.

For implementers of a telemetry backend: `refusals` turns a store's refusal of a value
(an encoding error, a NUL in PostgreSQL text, an integer out of range) into
`TelemetryRejectedError`, which the batching writer answers by storing a sanitized copy
of the record instead of losing it; `stored_forms` gives the texts a query for a value
must match to find the records written with it (stored as given, or made safe);
`stored_tier` reads a row's tier back, one this version does not know as unknown, and
`stored_circuit_state` a row's circuit state the same way (`stored_record` reads a
record's dict with both read so); `known_outcomes` keeps the
rows whose outcome this version knows, with one warning naming the store for the rest.
`gc_paused` holds the cyclic garbage collector off for a short block that builds many
objects at once (the evidence rows of a router's start, which a backend hands over as
they are: `empathy_models.evidence.EvidenceBatch.from_rows`).
`shown` gives a value for an error message about it, never failing and never long (an
enormous integer by its size, a long repr cut).
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import EntryPoint, entry_points
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .._fast import gc_paused
from .._urls import masked_keywords, masked_query, url_flaw, userinfo_end
from .._validators import shown
from ..abc import CircuitStateStore, TelemetryBackend
from ..exceptions import ConfigurationError
from ._plugin import BackendPlugin
from ._storable import (
    known_outcomes,
    refusals,
    stored_circuit_state,
    stored_forms,
    stored_record,
    stored_tier,
)
from .memory import MemoryStateStore, MemoryTelemetryBackend
from .null import NullStateStore, NullTelemetryBackend

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendPlugin",
    "MemoryStateStore",
    "MemoryTelemetryBackend",
    "NullStateStore",
    "NullTelemetryBackend",
    "available_schemes",
    "gc_paused",
    "known_outcomes",
    "redact_url",
    "refusals",
    "shown",
    "state_store_from_url",
    "stored_circuit_state",
    "stored_forms",
    "stored_record",
    "stored_tier",
    "telemetry_from_url",
    "url_flaw",
]

ENTRY_POINT_GROUP = "empathy_models.backends"

_BUILTIN: dict[str, str] = {
    "memory": "empathy_models.backends.memory",
    "null": "empathy_models.backends.null",
    "sqlite": "empathy_models.backends.sqlite",
}

_KNOWN_PLUGINS: dict[str, str] = {
    "redis": "empathy-models-redis",
    "rediss": "empathy-models-redis",
    "postgresql": "empathy-models-postgres",
    "postgres": "empathy-models-postgres",
}


def redact_url(url: str) -> str:
    """
    Return ``url`` safe to log or show.

    A password in the authority part and the value of secret-looking query parameters
    (``password=``, ``sslpassword=``, ``token=``, ``api-key=``, a misspelt ``pasword=``:
    `_urls.secret_param`) are replaced by ``***``; a password
    holding an unencoded '/', '?', '#' or '@' is masked whole (the userinfo runs to
    the last '@' a host follows), and so is an option's holding an unencoded '&' or
    '#' (`_urls.masked_query`).  A string without ``scheme://`` that holds an ``@``
    has everything before the last ``@`` masked, since it may be ``user:password``,
    and the value of each secret-looking ``name=value`` pair in it (a PostgreSQL
    keyword/value string's ``password=...``) masked too.
    """
    if "://" not in url:  # maybe user:password@host, or host=... password=... (libpq's)
        return masked_keywords(f"***@{url.rsplit('@', 1)[1]}" if "@" in url else url)
    head, _, rest = url.partition("://")
    at = userinfo_end(rest)
    userinfo = ""
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        userinfo = f"{user}:***@" if colon else f"{rest[:at]}@"
        rest = rest[at + 1 :]
    try:
        parts = urlsplit(f"{head}://{rest}")
    except ValueError:
        return "<unparseable url>"
    changed = userinfo.endswith(":***@")
    tail = parts.query + (f"#{parts.fragment}" if parts.fragment else "")
    if parts.query:
        masked = masked_query(tail)  # a fragment right after a secret is part of it
        changed = changed or masked != tail
        tail = masked
    if not changed:
        return url
    # not urlunsplit: it drops an empty authority ("sqlite:///x" -> "sqlite:/x")
    if parts.query:
        tail = f"?{tail}"
    elif parts.fragment:
        tail = f"#{parts.fragment}"
    return f"{parts.scheme}://{userinfo}{parts.netloc}{parts.path}{tail}"


# how Python says a call named a keyword argument its function does not take
_UNEXPECTED = re.compile(r"got an unexpected keyword argument '([^']*)'")


def _build(factory: Any, url: str, kind: str, options: dict[str, Any]) -> Any:
    """
    ``factory(url, **options)``; a `TypeError` for an option the factory (or the
    constructor it passes them to) does not take, `ConfigurationError` naming that
    option, and any other `TypeError` with options given, one naming them all.
    """
    try:
        return factory(url, **options)
    except TypeError as exc:
        if not options:
            raise
        unexpected = _UNEXPECTED.search(str(exc))
        if unexpected is not None and unexpected.group(1) in options:
            raise ConfigurationError(
                f"{redact_url(url)!r}: the {kind} factory does not accept the options "
                f"{[unexpected.group(1)]}: {exc}"
            ) from exc
        raise ConfigurationError(
            f"{redact_url(url)!r}: the {kind} factory refused the options {sorted(options)}: {exc}"
        ) from exc


def _check_query(url: str) -> None:
    """Refuse a query option given twice (which value was meant is anyone's guess)."""
    query = url.split("?", 1)[1].split("#", 1)[0] if "?" in url else ""
    seen: set[str] = set()
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name in seen:
            raise ConfigurationError(
                f"{redact_url(url)!r}: the option {name!r} is given more than once; give it once"
            )
        seen.add(name)


def _entry_point_plugins() -> dict[str, list[EntryPoint]]:
    """Each scheme the installed distributions publish, with every entry point claiming
    it: one, unless two distributions name different plugins for the same scheme (two
    naming the same object, ``module:attribute``, claim it once)."""
    claims: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        same = claims.setdefault(ep.name, [])
        if all(other.value != ep.value for other in same):
            same.append(ep)
    return claims


def _distribution(ep: EntryPoint) -> str:
    """The name of the distribution publishing ``ep`` (its value, when unknown)."""
    return ep.dist.name if ep.dist is not None else ep.value


def _claimed(scheme: str, claims: list[EntryPoint]) -> EntryPoint:
    """The one entry point for ``scheme``; `ConfigurationError` naming every
    distribution that claims it when there are more (which one the lookup met last
    depends on the order of sys.path and of the file system, so none is picked)."""
    if len(claims) == 1:
        return claims[0]
    named = ", ".join(sorted(f"{_distribution(ep)} ({ep.value})" for ep in claims))
    raise ConfigurationError(
        f"the {scheme}:// backend is claimed by more than one installed distribution: "
        f"{named}; uninstall all but one of them"
    )


def available_schemes() -> list[str]:
    """Every scheme that resolves here: built-ins plus installed plugins."""
    return sorted(set(_BUILTIN) | set(_entry_point_plugins()))


def _plugin_for(url: str) -> BackendPlugin:
    if not isinstance(url, str):
        raise ConfigurationError(f"expected a backend object or a URL string, got {shown(url)}")
    try:
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    except ValueError as exc:
        raise ConfigurationError(
            f"{redact_url(url)!r} is not a valid URL: {url_flaw(exc)}"
        ) from exc
    if not scheme:
        raise ConfigurationError(
            f"{redact_url(url)!r} is not a backend URL; expected scheme://..., "
            f"known schemes: {', '.join(available_schemes())}"
        )
    _check_query(url)
    if scheme in ("memory", "null") and url.split("://", 1)[1] not in ("", "/"):
        raise ConfigurationError(
            f"{redact_url(url)!r}: a {scheme}:// backend takes no host, path or options; "
            f"use {scheme}:// (options go to the factory as keyword arguments)"
        )
    if scheme in _BUILTIN:
        module = importlib.import_module(_BUILTIN[scheme])
        plugin = module.PLUGIN
    else:
        eps = _entry_point_plugins()
        if scheme not in eps:
            if scheme in _KNOWN_PLUGINS:
                package = _KNOWN_PLUGINS[scheme]
                raise ConfigurationError(
                    f"the {scheme}:// backend needs the package {package!r}: "
                    f"pip install {package} (before it is published on PyPI, install it "
                    "from a checkout of the empathy-models source: pip install "
                    f"./backends/{package.removeprefix('empathy-models-')})"
                )
            raise ConfigurationError(
                f"unknown backend scheme {scheme!r} in {redact_url(url)!r}; known schemes: "
                f"{', '.join(available_schemes())} (plugins: "
                f"{', '.join(f'{s} -> {p}' for s, p in sorted(_KNOWN_PLUGINS.items()))})"
            )
        ep = _claimed(scheme, eps[scheme])
        try:
            plugin = ep.load()
        except Exception as exc:
            raise ConfigurationError(
                f"the plugin for {scheme}:// ({ep.value}) could not be loaded: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(plugin, BackendPlugin):
        raise ConfigurationError(
            f"the plugin for {scheme!r} is {type(plugin).__name__}, not a BackendPlugin"
        )
    return plugin


def telemetry_from_url(url: str | TelemetryBackend, **options: Any) -> TelemetryBackend:
    """
    Return a telemetry backend for ``url``.

    Args:
        url: a backend URL; a `TelemetryBackend` passes through unchanged.
        **options: passed to the backend's constructor.

    Raises:
        ConfigurationError: an unknown scheme, a missing plugin, or an engine without
            telemetry support.
    """
    if isinstance(url, TelemetryBackend):
        return url
    plugin = _plugin_for(url)
    if plugin.telemetry is None:
        raise ConfigurationError(
            f"{redact_url(url)!r}: the {plugin.package} backend holds no telemetry; "
            "use sqlite://, postgresql:// or memory:// for telemetry"
        )
    backend = _build(plugin.telemetry, url, "telemetry", options)
    if not isinstance(backend, TelemetryBackend):
        raise ConfigurationError(f"the plugin for {redact_url(url)!r} returned {shown(backend)}")
    return backend


def state_store_from_url(url: str | CircuitStateStore, **options: Any) -> CircuitStateStore:
    """
    Return a circuit-state store for ``url``.

    Args:
        url: a store URL; a `CircuitStateStore` passes through unchanged.
        **options: passed to the store's constructor.

    Raises:
        ConfigurationError: an unknown scheme, a missing plugin, or an engine without
            circuit-state support.
    """
    if isinstance(url, CircuitStateStore):
        return url
    plugin = _plugin_for(url)
    if plugin.state_store is None:
        raise ConfigurationError(
            f"{redact_url(url)!r}: the {plugin.package} backend holds no circuit state"
        )
    store = _build(plugin.state_store, url, "state store", options)
    if not isinstance(store, CircuitStateStore):
        raise ConfigurationError(f"the plugin for {redact_url(url)!r} returned {shown(store)}")
    return store
