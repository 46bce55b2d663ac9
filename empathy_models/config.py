"""
One configuration for the SDK and the CLI: ``empathy.toml``.

The file is found by `find_config_file`: the path in ``EMPATHY_CONFIG`` (which must
exist), else ``./empathy.toml`` in the working directory, else
``$EMPATHY_HOME/empathy.toml``.  Without one, the defaults apply.  Every key is
optional::

    # empathy.toml
    telemetry = "sqlite:///calls.db"    # telemetry URL, or a path to a SQLite file
    state = "sqlite:///calls.db"        # circuit-breaker state URL (default: = telemetry,
                                        # without its batching options, ?max_queue=...)
    registry = "models.toml"            # models and prices (default: the built-in table)

    [providers.openai]                  # default: openai and anthropic, keys from the env
    [providers.anthropic]

    [providers.ollama]
    type = "openai"                     # the wire format: "openai" or "anthropic"
    base_url = "http://localhost:11434/v1"
    api_key = "ollama"                  # a placeholder; real keys belong in the env:
    # api_key_env = "OLLAMA_KEY"        # the name of the variable holding the key
    headers = { "X-Team" = "search" }
    timeout = 120
    max_response_bytes = 16777216       # a whole answer's bound (the default, 16 MiB)
    max_stream_bytes = 268435456        # a streamed answer's (the default, 256 MiB)

A URL missing its ``//`` (``sqlite:calls.db``) is refused, not taken for a file's name.
Relative paths (``calls.db``, ``sqlite:///calls.db``, ``models.toml``) are relative to
the directory of the file that names them, so a file in ``$EMPATHY_HOME`` keeps its
databases there whatever the working directory.  The default telemetry database is
``$EMPATHY_HOME/empathy.db``, the CLI's default, so the SDK and the CLI read and write
the same file out of the box.

`EmpathyConfig.load` reads it; `EmpathyLLMExecutor.from_config`,
`AdaptiveModelRouter.from_config` and every CLI command without ``--db`` /
``--registry`` use it; ``empathy-models config show`` prints each resolved value and
where it came from.  Secrets (API keys, secret-looking header values, URL passwords)
are never printed or put in a repr.
"""

from __future__ import annotations

import errno
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote_plus, urlsplit

from attrs import field, frozen

from ._paths import empathy_home, make_private_dirs, quoted_path, unquoted_path
from ._urls import KEYWORD_DSN, KEYWORD_DSN_REFUSED, masked_keys, url_flaw
from ._validators import check, failure, number, shown
from .backends import _KNOWN_PLUGINS, available_schemes, redact_url
from .exceptions import ConfigurationError
from .providers._http import HTTPProvider, _body_bound, _looks_secret, env_name_flaw
from .registry import ModelRegistry

if TYPE_CHECKING:
    from .abc import CircuitStateStore, TelemetryBackend

__all__ = [
    "CONFIG_FILE_NAME",
    "EmpathyConfig",
    "ProviderConfig",
    "ensure_sqlite_parent",
    "find_config_file",
]

CONFIG_FILE_NAME = "empathy.toml"
"""The name looked for in the working directory and in ``$EMPATHY_HOME``."""

_TOP_KEYS = frozenset({"telemetry", "state", "registry", "providers"})
_PROVIDER_KEYS = frozenset(
    {
        "type",
        "base_url",
        "api_key",
        "api_key_env",
        "api_key_from_env",
        "headers",
        "timeout",
        "max_response_bytes",
        "max_stream_bytes",
    }
)
_SIZES = ("max_response_bytes", "max_stream_bytes")
"""A provider table's body bounds, passed as they are to the provider (which checks them)."""
_KINDS = ("openai", "anthropic")


_timeout = number(
    failure(ConfigurationError),
    low=0,
    low_open=True,
    finite=False,
    optional=True,
    why="must be a number of seconds > 0",
)


def find_config_file(cwd: Path | None = None) -> tuple[Path | None, str]:
    """
    The configuration file to read and why.

    Args:
        cwd: the working directory, where ``empathy.toml`` is looked for second (default:
            the current one).

    Returns:
        ``(path, "EMPATHY_CONFIG")``, ``(path, "working directory")``,
        ``(path, "EMPATHY_HOME")`` or ``(None, "none")``.

    Raises:
        ConfigurationError: ``EMPATHY_CONFIG`` names a file that does not exist, or
            starts with a ``~user`` that has no home directory.
    """
    named = os.environ.get("EMPATHY_CONFIG", "").strip()
    if named:
        path = _expand_home(named, "EMPATHY_CONFIG")
        if path.is_dir():
            raise ConfigurationError(
                f"EMPATHY_CONFIG={named!r} is a directory: name the file "
                f"(e.g. {str(path / CONFIG_FILE_NAME)!r})"
            )
        if not path.is_file():
            raise ConfigurationError(f"EMPATHY_CONFIG={named!r}: no such file")
        return path.absolute(), "EMPATHY_CONFIG"
    here = (cwd if cwd is not None else Path.cwd()) / CONFIG_FILE_NAME
    if here.is_file():
        return here.absolute(), "working directory"
    home = empathy_home() / CONFIG_FILE_NAME
    if home.is_file():
        return home.absolute(), "EMPATHY_HOME"
    return None, "none"


def _expand_home(raw: str, where: str) -> Path:
    """``raw`` as a path, a leading ``~`` or ``~user`` expanded; `ConfigurationError` if
    that user has no home directory."""
    try:
        return Path(raw).expanduser()
    except RuntimeError:  # the user does not exist, or has no home directory
        raise ConfigurationError(
            f"{where}: cannot expand {raw!r}: no home directory for that user; write the "
            "path in full"
        ) from None


def _sqlite_file(url: str, where: str | None = None) -> Path | None:
    """The file of a ``sqlite:///path`` URL as written (maybe relative), else None;
    `ConfigurationError` naming ``where`` (default: the URL) for a ``~user`` path that
    does not expand."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() != "sqlite" or parts.netloc:
        return None
    raw = unquoted_path(parts.path[1:] if parts.path.startswith("/") else parts.path)
    return None if raw in ("", ":memory:") else _expand_home(raw, where or url)


def ensure_sqlite_parent(url: str, *, create: bool = True) -> None:
    """
    Create the directory of a SQLite file URL (``$EMPATHY_HOME`` on first use) and its
    missing parents, each 0700.

    Args:
        url: the database's URL (any other backend's: nothing to do).
        create: False only checks that the directory could be made, making nothing
            (a part of its path that is a file, or a directory that cannot be written).

    Raises:
        ConfigurationError: the directory cannot be made (a part of its path is a
            file, or not writable), naming it and why.
    """
    file = _sqlite_file(url)
    if file is None:
        return
    directory = file.absolute().parent
    try:
        why = None if create else _unmakeable(directory)
        if create:
            make_private_dirs(directory)
    except OSError as exc:
        why = (
            f"{exc.filename} is not a directory"
            if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename
            else exc.strerror or str(exc)
        )
    if why is not None:
        raise ConfigurationError(
            f"cannot create the directory {directory} of the SQLite database ({why})"
        ) from None


def _unmakeable(directory: Path) -> str | None:
    """
    Why `make_private_dirs` could not make ``directory``, said as `ensure_sqlite_parent`
    says it, or None: the first part of its path that is not a directory, or "Permission
    denied" when the nearest directory there is cannot be written to make the others in.
    """
    for path in (directory, *directory.parents):
        if path.is_dir():
            if path == directory or os.access(path, os.W_OK | os.X_OK):
                return None
            return os.strerror(errno.EACCES)
        if os.path.lexists(path):
            return f"{path} is not a directory"
    return None


def _resolve_url(value: str, base: Path, where: str) -> str:
    """
    A URL, a SQLite file's path in it made absolute (a leading ``~`` expanded, a
    relative path taken against ``base``); a path -> URL.  A PostgreSQL keyword/value
    connection string is refused (not taken for a file's name), without quoting it.
    """
    if "://" not in value:
        if KEYWORD_DSN.match(value):
            raise ConfigurationError(f"{where}: {KEYWORD_DSN_REFUSED}")
        _refuse_url_without_slashes(value, where)
        path = _expand_home(value, where)
        if not path.is_absolute():
            path = base / path
        return "sqlite:///" + quoted_path(path)
    try:
        query = urlsplit(value).query
    except ValueError as exc:  # its message may quote the password: said without it
        raise ConfigurationError(f"{where}: not a valid URL: {url_flaw(exc)}") from None
    file = _sqlite_file(value, where)
    if file is None:
        return value
    # the path as it will be opened: a leading ~ expanded, a relative one made absolute
    path = file if file.is_absolute() else base / file
    return "sqlite:///" + quoted_path(path) + (f"?{query}" if query else "")


# a backend's scheme and a colon at the start of a value: a URL missing its ``//``
# (two letters at least: ``C:`` is a Windows drive)
_SCHEME_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")


def _refuse_url_without_slashes(value: str, where: str) -> None:
    """
    `ConfigurationError` for a value that starts with a backend's scheme and a colon
    but no ``//`` (``sqlite:calls.db``, ``redis:host:6379``), or SQLite's own
    ``file:calls.db``: a URL mistyped, not the name of a SQLite file to make.  The
    value is not quoted (it may hold a password), except a SQLite file's path.
    """
    match = _SCHEME_PREFIX.match(value)
    if match is None:
        return
    scheme = match.group(1).lower()
    if scheme != "file" and scheme not in _KNOWN_PLUGINS and scheme not in available_schemes():
        return
    if scheme == "sqlite":
        fix = f"sqlite:///{value[match.end() :]}, or the file's path alone"
    elif scheme == "file":  # SQLite's own URI form: its options are not ours
        fix = f"sqlite:///{value[match.end() :].partition('?')[0]}, or the file's path alone"
    else:
        fix = f"{scheme}://..."
    raise ConfigurationError(
        f"{where}: {scheme + ':'!r} without '//' is neither a backend URL nor a file's "
        f"path; write {fix}"
    )


def _state_default(telemetry_url: str) -> str:
    """
    The telemetry URL as the state URL, without the telemetry's own options in its query
    (``batch`` and the write-behind's: ``max_queue``, ``flush_interval``...), which a
    state store refuses; the others (``busy_timeout``, ``schema``...) kept as written.
    """
    from .backends.batching import URL_OPTIONS

    try:
        query = urlsplit(telemetry_url).query
    except ValueError:
        return telemetry_url  # refused, saying why, when the stores are built
    pairs = query.split("&") if query else []
    kept = [p for p in pairs if unquote_plus(p.partition("=")[0]) not in URL_OPTIONS]
    if len(kept) == len(pairs):
        return telemetry_url
    head, _, rest = telemetry_url.partition("?")
    _, hash_, fragment = rest.partition("#")
    return head + (f"?{'&'.join(kept)}" if kept else "") + hash_ + fragment


def _shown_url(url: str) -> str:
    """``url`` with its password, secret-looking options and any API key in it masked."""
    return masked_keys(redact_url(url))


def _url_repr(value: str | None) -> str:
    """A URL field's repr: `_shown_url`."""
    return repr(None if value is None else _shown_url(value))


def _check_env_name(_: object, attribute: Any, value: object) -> None:
    if value is not None and (flaw := env_name_flaw(value)) is not None:
        raise ConfigurationError(f"ProviderConfig.{attribute.name} {flaw}, got {shown(value)}")


@frozen(kw_only=True)
class ProviderConfig:
    """
    One ``[providers.<name>]`` table: which wire format, where, and how it is keyed.

    ``api_key`` (a literal, for placeholders) and ``headers`` are kept out of the repr,
    and ``base_url`` is shown with any password or secret-looking option masked;
    ``api_key_env`` names the environment variable holding the key.  `build` makes the
    provider.

    Raises:
        ConfigurationError: ``api_key_env`` is not a string that can name an
            environment variable (empty, or holding ``=``, a NUL character or a
            character the OS cannot encode).
    """

    name: str
    kind: Literal["openai", "anthropic"]
    base_url: str | None = field(default=None, repr=_url_repr)
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = field(default=None, validator=_check_env_name)
    api_key_from_env: bool | None = None
    headers: Mapping[str, str] = field(factory=dict, repr=False)
    timeout: float | None = None
    max_response_bytes: int | None = None
    max_stream_bytes: int | None = None

    def build(self) -> HTTPProvider:
        """
        The provider this table describes (keys read from the environment now).

        With ``api_key_env`` (and no ``api_key``) the variable it names is the only
        source of the key: unset, the provider is keyless (and its hints name that
        variable), never keyed by the kind's default variable (``OPENAI_API_KEY``,
        ``ANTHROPIC_API_KEY``).
        """
        from .providers import AnthropicProvider, OpenAIProvider

        named = self.api_key_env if self.api_key is None else None
        options: dict[str, Any] = {
            "name": self.name,
            "base_url": self.base_url,
            "headers": dict(self.headers) or None,
            # the variable api_key_env names replaces the default one, for any base URL
            "api_key_env": named,
            "api_key_from_env": None if named is not None else self.api_key_from_env,
        }
        if self.timeout is not None:
            options["timeout"] = self.timeout
        for size in _SIZES:
            if getattr(self, size) is not None:
                options[size] = getattr(self, size)
        cls = AnthropicProvider if self.kind == "anthropic" else OpenAIProvider
        return cls(self.api_key, **options)

    def _reads_env_key(self) -> bool:
        """Whether the provider reads the kind's key variable (``api_key_from_env``
        unset): for no ``base_url`` (the official one, or the environment's next to the
        key), or the official host over https, as the provider decides."""
        if self.api_key_from_env is not None or self.base_url is None:
            return self.api_key_from_env is not False
        from .providers import AnthropicProvider, OpenAIProvider

        official = (OpenAIProvider if self.kind == "openai" else AnthropicProvider).default_base_url
        try:
            parts = urlsplit(self.base_url)
            return parts.scheme == "https" and parts.hostname == urlsplit(official).hostname
        except ValueError:  # refused when the provider is built
            return False

    def describe(self) -> str:
        """A one-line, secret-free description for ``config show``."""
        parts: list[str] = [self.kind]
        env_url, env_key = (
            ("OPENAI_BASE_URL", "OPENAI_API_KEY")
            if self.kind == "openai"
            else ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")
        )
        if self.base_url is not None:
            parts.append(f"base_url={_shown_url(self.base_url)}")
        elif os.environ.get(env_url, "").strip():
            parts.append(f"base_url={_shown_url(os.environ[env_url].strip())} (${env_url})")
        if self.api_key is not None:
            parts.append("api_key=<set in file>")
        elif self.api_key_env is not None:
            state = "set" if os.environ.get(self.api_key_env, "").strip() else "not set"
            parts.append(f"key from ${self.api_key_env} ({state})")
        elif self.api_key_from_env is False:
            parts.append("no key (api_key_from_env = false)")
        elif self._reads_env_key():
            state = "set" if os.environ.get(env_key, "").strip() else "not set"
            parts.append(f"key from ${env_key} ({state})")
        else:
            parts.append(
                f"no key: ${env_key} is not sent to this base_url (set api_key_env, or "
                "api_key_from_env = true)"
            )
        if self.headers:
            # the provider's own key (from the file or its variable) and any sk- key are
            # secrets under whatever header name they are sent
            variable = self.api_key_env if self.api_key_env is not None else env_key
            key = self.api_key if self.api_key is not None else os.environ.get(variable, "")
            key = key.strip()
            shown = ", ".join(
                f"{k}=<secret>"
                if _looks_secret(k) or (key and key in v)
                else f"{k}={masked_keys(v)}"
                for k, v in self.headers.items()
            )
            parts.append(f"headers: {shown}")
        if self.timeout is not None:
            parts.append(
                "no timeout" if self.timeout == float("inf") else f"timeout={self.timeout:g}s"
            )
        parts.extend(
            f"{size}={getattr(self, size):,}" for size in _SIZES if getattr(self, size) is not None
        )
        return ", ".join(parts)


# an ``api_key`` that names a variable instead of holding a key: ``$NAME``, ``${NAME}``,
# PowerShell's ``$env:NAME``, cmd's ``%NAME%``, or a bare ``..._KEY`` / ``_TOKEN`` name
_VARIABLE_RE = re.compile(
    r"\$\{(\w+)\}|\$(?:env:)?(\w+)|%(\w+)%|([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_(?:KEY|TOKEN|SECRET))"
)


def _provider(name: str, table: object, where: str) -> ProviderConfig:
    if not isinstance(table, Mapping):
        raise ConfigurationError(f"{where}: [providers.{name}] must be a table")
    unknown = sorted(set(table) - _PROVIDER_KEYS)
    if unknown:
        raise ConfigurationError(
            f"{where}: [providers.{name}] has unknown key(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_PROVIDER_KEYS))})"
        )
    kind = table.get("type", name if name in _KINDS else None)
    if kind not in _KINDS:
        raise ConfigurationError(
            f'{where}: [providers.{name}] needs type = "openai" or "anthropic", got {shown(kind)}'
        )
    for key in ("base_url", "api_key"):
        value = table.get(key)
        # one of blanks is a slip: a key of blanks would be no key, read from nowhere
        if value is not None and (not isinstance(value, str) or not value.strip()):
            given = "<secret>" if key == "api_key" else shown(value)
            raise ConfigurationError(
                f"{where}: [providers.{name}] {key} must be a non-empty string, got {given}"
            )
    if isinstance(written := table.get("api_key"), str) and (
        variable := _VARIABLE_RE.fullmatch(written.strip())
    ):
        named = next(group for group in variable.groups() if group)
        raise ConfigurationError(
            f"{where}: [providers.{name}] api_key = {written!r} names an environment "
            "variable, and the file is not expanded (it would be sent as the key): write "
            f'api_key_env = "{named}" to read the key from it'
        )
    env_name = table.get("api_key_env")
    if isinstance(env_name, str):
        env_name = env_name.strip()  # blanks no shell puts in a name: a slip
    if env_name is not None and (flaw := env_name_flaw(env_name)) is not None:
        raise ConfigurationError(
            f"{where}: [providers.{name}] api_key_env {flaw}, got {shown(env_name)}"
        )
    from_env = table.get("api_key_from_env")
    if from_env is not None and not isinstance(from_env, bool):
        raise ConfigurationError(
            f"{where}: [providers.{name}] api_key_from_env must be true or false"
        )
    if env_name is not None and from_env is False:
        raise ConfigurationError(
            f"{where}: [providers.{name}] api_key_env = {env_name!r} names the variable to "
            "read the key from, and api_key_from_env = false reads none: keep one of them"
        )
    headers = table.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigurationError(f"{where}: [providers.{name}] headers must be a table of strings")
    timeout = table.get("timeout")
    timeout = check(_timeout, f"{where}: [providers.{name}] timeout", timeout)
    sizes = {
        size: check(_body_bound, f"{where}: [providers.{name}] {size}", table[size])
        for size in _SIZES
        if size in table
    }
    return ProviderConfig(
        name=name,
        kind=kind,
        base_url=table.get("base_url"),
        api_key=table.get("api_key"),
        api_key_env=env_name,
        api_key_from_env=from_env,
        headers=dict(headers),
        timeout=None if timeout is None else float(timeout),
        **sizes,
    )


def _read_file(
    path: str | os.PathLike[str] | None,
) -> tuple[Path | None, str, Mapping[str, Any]]:
    """
    The configuration file to use, how it was found, and its top-level table.

    Args:
        path: The file named by the caller, or None to look for one with
            `find_config_file`.

    Returns:
        ``(file, found_by, data)``: ``file`` None (and ``data`` empty) when no file was
        given or found.

    Raises:
        ConfigurationError: Naming the file, when it is missing, unreadable, not valid
            TOML (or nested too deeply to parse), or holds an unknown top-level key.
    """
    file: Path | None
    if path is not None:
        file = _expand_home(os.fspath(path), "configuration file").absolute()
        found_by = "argument"
        if not file.is_file():
            raise ConfigurationError(f"{file}: no such configuration file")
    else:
        file, found_by = find_config_file()
    data: Mapping[str, Any] = {}
    if file is not None:
        try:
            # a byte order mark (Windows editors write one) is not part of the TOML
            data = tomllib.loads(file.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{file}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{file}: invalid TOML: {exc}") from None
        except RecursionError:
            raise ConfigurationError(
                f"{file}: invalid TOML: arrays or tables nested too deeply"
            ) from None
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise ConfigurationError(
                f"{file}: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(_TOP_KEYS))})"
            )
    return file, found_by, data


_DEFAULT_PROVIDERS = (
    ProviderConfig(name="openai", kind="openai"),
    ProviderConfig(name="anthropic", kind="anthropic"),
)


@frozen(kw_only=True)
class EmpathyConfig:
    """
    The resolved configuration: what to use and where each value came from.

    ``telemetry_url`` and ``state_url`` are backend URLs (relative SQLite paths already
    resolved; shown in the repr with any password or secret-looking option masked);
    ``registry_file`` is None for the built-in table; ``sources`` maps
    ``"telemetry"``, ``"state"``, ``"registry"`` and ``"providers"`` to a description
    of their origin (the file, or ``"default"``).
    """

    path: Path | None
    found_by: str
    telemetry_url: str = field(repr=_url_repr)
    state_url: str = field(repr=_url_repr)
    registry_file: Path | None
    providers: tuple[ProviderConfig, ...]
    sources: Mapping[str, str]

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> EmpathyConfig:
        """
        Read ``path``, or the file `find_config_file` finds, or nothing (the defaults).

        Raises:
            ConfigurationError: naming the file, for a missing file, invalid TOML (nested
                too deeply included), an unknown key, a value of the wrong type, or a path
                whose ``~user`` has no home directory.
        """
        file, found_by, data = _read_file(path)
        where = str(file)
        base = file.parent if file is not None else Path.cwd()
        sources: dict[str, str] = {}

        def text(key: str) -> str | None:
            value = data.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigurationError(f"{where}: {key} must be a non-empty string")
            # blanks around a path or URL are a slip, never part of it
            return None if value is None else value.strip()

        telemetry = text("telemetry")
        if telemetry is not None:
            telemetry_url = _resolve_url(telemetry, base, f"{where}: telemetry")
            sources["telemetry"] = where
        else:
            telemetry_url = "sqlite:///" + quoted_path((empathy_home() / "empathy.db").absolute())
            sources["telemetry"] = "default ($EMPATHY_HOME/empathy.db)"
        state = text("state")
        if state is not None:
            state_url = _resolve_url(state, base, f"{where}: state")
            sources["state"] = where
        else:
            state_url = _state_default(telemetry_url)
            sources["state"] = "default (the telemetry database)"
        registry = text("registry")
        registry_file: Path | None = None
        if registry is not None:
            registry_file = _expand_home(registry, f"{where}: registry")
            if not registry_file.is_absolute():
                registry_file = base / registry_file
            sources["registry"] = where
        else:
            sources["registry"] = "default (the built-in table)"
        tables = data.get("providers")
        providers: tuple[ProviderConfig, ...]
        if tables is None:
            providers = _DEFAULT_PROVIDERS
            sources["providers"] = "default (openai and anthropic, keys from the environment)"
        else:
            if not isinstance(tables, Mapping) or not tables:
                raise ConfigurationError(f"{where}: [providers] must hold at least one table")
            providers = tuple(_provider(name, table, where) for name, table in tables.items())
            sources["providers"] = where
        return cls(
            path=file,
            found_by=found_by,
            telemetry_url=telemetry_url,
            state_url=state_url,
            registry_file=registry_file,
            providers=providers,
            sources=sources,
        )

    def registry(self) -> ModelRegistry:
        """The registry file's models, or `ModelRegistry.default`."""
        file = self.registry_file
        if file is None:
            return ModelRegistry.default()
        named = self.path is not None and self.sources["registry"] == str(self.path)
        if named and not file.exists() and not file.is_symlink():
            raise ConfigurationError(
                f"{self.path}: registry: {file}: no such file; write your models there "
                '(TOML or JSON; `extends = "default"` keeps the built-in models beside '
                "them), or remove `registry` to use the built-in table"
            )
        return ModelRegistry.from_file(file)

    def telemetry_store(self) -> TelemetryBackend:
        """
        The telemetry backend of ``telemetry_url``, not opened.

        Raises:
            ConfigurationError: the URL's, after the file and key it came from.
        """
        from .backends import telemetry_from_url

        with self._naming("telemetry"):
            return telemetry_from_url(self.telemetry_url)

    def state_store(self) -> CircuitStateStore:
        """
        The circuit-state store of ``state_url``, not opened.

        Raises:
            ConfigurationError: the URL's, after the file and key it came from (the
                telemetry's, when the state is the telemetry database by default).
        """
        from .backends import state_store_from_url

        with self._naming("state" if self.sources["state"] == str(self.path) else "telemetry"):
            return state_store_from_url(self.state_url)

    def ensure_directory(self, key: Literal["telemetry", "state"], *, create: bool = True) -> None:
        """
        Create the directory of the telemetry or state SQLite database
        (`ensure_sqlite_parent`; ``create=False`` only checks that it could be made),
        its error named with the file and key it came from, or said to come from
        ``$EMPATHY_HOME`` for the default database.
        """
        url = self.telemetry_url if key == "telemetry" else self.state_url
        named = (
            "state" if key == "state" and self.sources["state"] == str(self.path) else "telemetry"
        )
        try:
            with self._naming(named):
                ensure_sqlite_parent(url, create=create)
        except ConfigurationError as exc:
            if self.sources["telemetry"].startswith("default") and named == "telemetry":
                raise ConfigurationError(
                    f"{exc} (the default database, in $EMPATHY_HOME: set EMPATHY_HOME to "
                    "a directory, or telemetry in empathy.toml)"
                ) from None
            raise

    @contextmanager
    def _naming(self, key: str) -> Iterator[None]:
        """A `ConfigurationError` raised inside, with the file and ``key`` before its
        message when the value of ``key`` came from the file."""
        try:
            yield
        except ConfigurationError as exc:
            if self.path is None or self.sources[key] != str(self.path):
                raise
            raise ConfigurationError(f"{self.path}: {key}: {exc}") from exc

    def build_providers(self, registry: ModelRegistry | None = None) -> list[HTTPProvider]:
        """
        One provider per ``[providers.*]`` table (keys read from the environment now).

        Args:
            registry: the file's registry (`registry`): a provider it has no models of
                is refused, naming the table, or the ``registry`` key when the
                providers are the defaults.

        Raises:
            ConfigurationError: a value the provider refuses (a ``base_url`` that is no
                http(s) URL, a header no request can carry), after the file and the
                table it came from; a provider ``registry`` has no models of.
        """
        built: list[HTTPProvider] = []
        for provider in self.providers:
            try:
                built.append(provider.build())
            except ConfigurationError as exc:
                if self.path is None or self.sources["providers"] != str(self.path):
                    raise
                raise ConfigurationError(f"{self.path}: [providers.{provider.name}] {exc}") from exc
        if registry is not None:
            self._check_served(registry)
        return built

    def _check_served(self, registry: ModelRegistry) -> None:
        """`ConfigurationError`, said in the file's terms, for a provider ``registry``
        has no models of (the executor refuses it; its message speaks to code)."""
        known = sorted(registry.providers())
        missing = [p.name for p in self.providers if p.name not in known]
        if not missing or not known or self.path is None:
            return
        there = f"price table {registry.price_version}; providers there: {', '.join(known)}"
        tables = " or ".join(f"[providers.{name}]" for name in known)
        built_in = set(ModelRegistry.default().providers())
        extend = ""
        if self.registry_file is not None and missing[0] in built_in:
            extend = (
                f'; or put `extends = "default"` at the top of {self.registry_file}: its '
                f"models are then laid over the built-in table, {missing[0]}'s included"
            )
        if self.sources["providers"] == str(self.path):
            raise ConfigurationError(
                f"{self.path}: [providers.{missing[0]}] has no models in the registry "
                f"({there}): a table is named after the `provider` of its models; name the "
                f"table {tables} (its type and base_url say where they are sent), or name "
                f"in `registry` a file with models of provider {missing[0]!r}{extend}"
            )
        if self.sources["registry"] == str(self.path):
            raise ConfigurationError(
                f"{self.path}: registry: {self.registry_file} has no models of the default "
                f"providers {' and '.join(missing)} ({there}): add a {tables} table "
                f"(type, base_url and the key) to send its models to{extend}"
            )

    def describe(self) -> list[tuple[str, str, str]]:
        """``(setting, value, source)`` rows for ``config show``; no secret is shown."""
        file = str(self.path) if self.path is not None else "(none found)"
        rows = [
            ("config file", file, self.found_by),
            ("telemetry", _shown_url(self.telemetry_url), self.sources["telemetry"]),
            ("state", _shown_url(self.state_url), self.sources["state"]),
            (
                "registry",
                str(self.registry_file) if self.registry_file is not None else "built-in",
                self.sources["registry"],
            ),
        ]
        rows.extend(
            (f"provider {p.name}", p.describe(), self.sources["providers"]) for p in self.providers
        )
        return rows
