"""The URL factories: built-in schemes, entry-point plugins, clear errors, no secrets."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from empathy_models import (
    CircuitState,
    ConfigurationError,
    backends as backends_module,
    cache_from_url,
    quota_store_from_url,
    state_store_from_url,
    telemetry_from_url,
)
from empathy_models.backends import (
    MemoryStateStore,
    MemoryTelemetryBackend,
    NullStateStore,
    NullTelemetryBackend,
    available_schemes,
    redact_url,
)
from empathy_models.providers import OpenAIProvider
from empathy_models.testing.clock import FakeClock

SECRET = "hunter2-s3cret"


# --------------------------------------------------------------------------- built-ins


def test_memory_urls_build_fresh_memory_backends() -> None:
    first, second = telemetry_from_url("memory://"), telemetry_from_url("memory://")
    assert isinstance(first, MemoryTelemetryBackend) and first is not second
    assert isinstance(state_store_from_url("memory://"), MemoryStateStore)
    assert isinstance(telemetry_from_url("MEMORY://"), MemoryTelemetryBackend)


def test_null_urls_build_null_backends() -> None:
    assert isinstance(telemetry_from_url("null://"), NullTelemetryBackend)
    assert isinstance(state_store_from_url("null://"), NullStateStore)


async def test_options_reach_the_constructor(fake_clock: FakeClock) -> None:
    telemetry = telemetry_from_url("memory://", capacity=7)
    assert isinstance(telemetry, MemoryTelemetryBackend) and telemetry.capacity == 7
    async with state_store_from_url("memory://", clock=fake_clock) as store:
        state = await store.force("k", CircuitState.FORCED_OPEN)
    assert state.updated_at_ts == fake_clock.now


async def test_a_memory_state_store_url_takes_what_the_store_takes(
    fake_clock: FakeClock, tmp_path: Path
) -> None:
    async with state_store_from_url("memory://", clock=fake_clock) as first:
        forced = await first.force("k", CircuitState.FORCED_OPEN)
    # the states to start from and key_ttl (as a redis:// store takes it) reach the store
    async with state_store_from_url("memory://", states=[forced], key_ttl=None) as store:
        assert await store.snapshot_all() == [forced]
    with pytest.raises(ConfigurationError, match="key_ttl must be a number of seconds above 0"):
        state_store_from_url("memory://", key_ttl=0)
    # a clock that is no clock is refused when the store is built, as sqlite:// does
    for url in ("memory://", f"sqlite:///{tmp_path / 'state.db'}"):
        with pytest.raises(ConfigurationError, match="clock must be callable, got 5"):
            state_store_from_url(url, clock=5)


def test_unknown_options_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"does not accept the options \['colour'\]"):
        telemetry_from_url("memory://", colour="blue")
    with pytest.raises(ConfigurationError, match=r"\['clock'\]"):
        state_store_from_url("null://", clock=FakeClock())
    # only the option not taken is named, not the ones beside it that are
    for build, url, taken in (
        (telemetry_from_url, "sqlite:///calls.db", {"max_queue": 10}),
        (state_store_from_url, "memory://", {"clock": FakeClock()}),
        (quota_store_from_url, "sqlite:///calls.db", {"busy_timeout": 1.0}),
    ):
        with pytest.raises(ConfigurationError) as info:
            build(url, **taken, colour="blue")
        message = str(info.value)
        assert "does not accept the options ['colour']" in message, message
        assert repr(next(iter(taken))) not in message, message
    # the quota store's and the cache's too, as their other URLs' options are
    for factory in (quota_store_from_url, cache_from_url):
        with pytest.raises(ConfigurationError, match=r"does not accept the options \['colour'\]"):
            factory("memory://", colour="blue")


def test_objects_pass_through_unchanged() -> None:
    telemetry = MemoryTelemetryBackend()
    store = MemoryStateStore()
    assert telemetry_from_url(telemetry) is telemetry
    assert state_store_from_url(store) is store


def test_the_wrong_kind_of_object_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="expected a backend object or a URL string"):
        telemetry_from_url(MemoryStateStore())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="expected a backend object or a URL string"):
        state_store_from_url(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bad URLs


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        telemetry_from_url("mongodb://db.example/calls")
    message = str(info.value)
    assert "unknown backend scheme 'mongodb'" in message
    for scheme in ("memory", "null", "sqlite"):
        assert scheme in message
    assert "redis -> empathy-models-redis" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("url", ["calls.db", "", "memory", "/var/lib/calls.db"])
def test_a_string_without_a_scheme_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"is not a backend URL; expected scheme://"):
        state_store_from_url(url)


def test_an_unparseable_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not a valid URL"):
        telemetry_from_url("redis://[::1")


@pytest.mark.parametrize(
    ("url", "package"),
    [
        ("redis://127.0.0.1:6379/0", "empathy-models-redis"),
        ("rediss://cache.example:6380/0", "empathy-models-redis"),
        ("postgresql://app@db.example/calls", "empathy-models-postgres"),
        ("postgres://app@db.example/calls", "empathy-models-postgres"),
    ],
)
def test_a_known_plugin_that_is_not_installed_names_its_package(
    url: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plugins may be installed in this environment; simulate an installation without
    # them by letting entry-point discovery find nothing.
    monkeypatch.setattr(backends_module, "_entry_point_plugins", dict)
    with pytest.raises(ConfigurationError) as info:
        state_store_from_url(url)
    assert f"needs the package {package!r}" in str(info.value)
    assert f"pip install {package}" in str(info.value)
    # until the plugins are on PyPI, the message also says how to install from the source
    directory = package.removeprefix("empathy-models-")
    assert f"pip install ./backends/{directory}" in str(info.value)
    assert (
        Path(__file__).resolve().parent.parent / "backends" / directory / "pyproject.toml"
    ).exists()


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "url",
    [
        f"mongodb://admin:{SECRET}@db.example:27017/calls",
        f"mongodb://db.example/calls?sslmode=require&password={SECRET}",
        f"mongodb://db.example/calls?api_key={SECRET}",
        f"admin:{SECRET}@db.example/calls",
    ],
)
def test_credentials_never_appear_in_error_messages(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        telemetry_from_url(url)
    assert SECRET not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize(
    "factory", [telemetry_from_url, state_store_from_url, quota_store_from_url, cache_from_url]
)
def test_a_sqlite_url_with_credentials_is_refused_without_them(factory: Any) -> None:
    # a server database's URL written with sqlite:// (or a password in a file URL)
    with pytest.raises(ConfigurationError, match="has a host part") as info:
        factory(f"sqlite://admin:{SECRET}@db.example/calls.db")
    assert SECRET not in str(info.value)
    assert "admin:***@db.example" in str(info.value)


def test_credentials_stay_out_of_option_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        telemetry_from_url(f"null://user:{SECRET}@host/x", unexpected=1)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@cache:6379/0", "redis://:***@cache:6379/0"),
        (f"redis://user:{SECRET}@[::1]:6379/0", "redis://user:***@[::1]:6379/0"),
        (
            f"postgresql://app:{SECRET}@db/calls?password={SECRET}&sslmode=require#x",
            "postgresql://app:***@db/calls?password=***&sslmode=require#x",
        ),
        # a fragment right after a secret option may be the rest of its value
        (
            f"postgresql://app:{SECRET}@db/calls?sslmode=require&password={SECRET}#x",
            "postgresql://app:***@db/calls?sslmode=require&password=***",
        ),
        (f"sqlite:///calls.db?token={SECRET}", "sqlite:///calls.db?token=***"),
        ("sqlite:///calls.db", "sqlite:///calls.db"),
        ("null://", "null://"),
        ("redis://cache:6379/0?db=1", "redis://cache:6379/0?db=1"),
        (f"user:{SECRET}@host", "***@host"),
        # a password holding an unencoded delimiter: the userinfo runs to the last '@'
        ("redis://default:Xy7/Qz+9@127.0.0.1:6379/13", "redis://default:***@127.0.0.1:6379/13"),
        ("rediss://:Xy7#Qz9@cache:6380/0", "rediss://:***@cache:6380/0"),
        ("redis://u:Xy7?Qz9@cache/0?db=1", "redis://u:***@cache/0?db=1"),
        (
            "postgresql://app:Xy7@Q/z9@db/calls?password=p",
            "postgresql://app:***@db/calls?password=***",
        ),
        ("postgresql://app@db:5432/calls", "postgresql://app@db:5432/calls"),
        ("sqlite:///data/team@work/calls.db", "sqlite:///data/team@work/calls.db"),
        # options named like a secret whose values are none: shown
        (
            "redis://cache/0?key_ttl=60&ssl_keyfile=/tls/k.pem&ssl_password=p",
            "redis://cache/0?key_ttl=60&ssl_keyfile=/tls/k.pem&ssl_password=***",
        ),
        (
            "postgresql://db/c?sslkey=/tls/k&sslpassword=p",
            "postgresql://db/c?sslkey=/tls/k&sslpassword=***",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# (url, as shown): only the userinfo's password is masked, also when an '@' of the path
# or the query comes after a port, or a password holds an unencoded delimiter
EXACT_MASKING = [
    ("postgresql://u:pw@host:5432/db?options=a@b", "postgresql://u:***@host:5432/db?options=a@b"),
    ("redis://u:pw@[::1]:6379/0?x=a@b", "redis://u:***@[::1]:6379/0?x=a@b"),
    ("postgresql://u:pw@h1:5432,h2:5433/db?to=a@b", "postgresql://u:***@h1:5432,h2:5433/db?to=a@b"),
    ("redis://u:Xy7@Q/z9@cache:6379/0?to=a@b", "redis://u:***@cache:6379/0?to=a@b"),
    ("redis://u:Xy7/Q@z9@cache:6379/0", "redis://u:***@cache:6379/0"),
    ("postgresql://app@db:5432/calls?to=a@b", "postgresql://app@db:5432/calls?to=a@b"),
    ("redis://host:6379/0?x=@", "redis://host:6379/0?x=@"),
    ("redis://host:6379/0?to=a@b#c@d", "redis://host:6379/0?to=a@b#c@d"),
    (
        "https://gw:pw@gateway.internal:8443/v1?to=a@b",
        "https://gw:***@gateway.internal:8443/v1?to=a@b",
    ),
]


@pytest.mark.parametrize(("url", "shown"), EXACT_MASKING)
def test_masking_hides_the_password_and_nothing_else(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    if ":***@" in shown:  # a provider refuses a base URL with credentials, masked alike
        https = "https://" + url.partition("://")[2]
        with pytest.raises(ConfigurationError) as info:
            OpenAIProvider(api_key="k", base_url=https)
        assert "https://" + shown.partition("://")[2] in str(info.value)


@pytest.mark.parametrize("password", ["Xy7/Qz+9", "Xy7#Qz9", "Xy7?Qz9"])
@pytest.mark.parametrize(
    "template",
    [
        "redis://default:{}@127.0.0.1:6379/13",
        "rediss://:{}@cache.example:6380/0",
        "postgresql://app:{}@db.example:5432/calls",
        "mongodb://admin:{}@db.example:27017/calls",
    ],
)
def test_a_password_with_an_unencoded_delimiter_never_appears_in_errors(
    template: str, password: str
) -> None:
    # a generated password holding '/', '#' or '?' leaves a URL whose port does not
    # parse: the error says so without quoting the parser (it quotes the password)
    for factory in (state_store_from_url, telemetry_from_url):
        with pytest.raises(ConfigurationError) as info:
            factory(template.format(password))
        message = str(info.value)
        assert "Xy7" not in message and "Qz" not in message, message
        assert ":***@" in message


@pytest.mark.parametrize("password", ["Xy7#Qz9", "Xy7&Qz9", "Xy7#Qz=9&x=1", "Xy7&Qz9#x"])
def test_a_query_password_with_an_unencoded_delimiter_never_appears(password: str) -> None:
    # a generated password holding '#' or '&' in a query option: the text after the
    # delimiter looks like a fragment or an option without a value, and is the password
    # all the same
    url = f"mongodb://db.example/calls?sslmode=require&password={password}"
    assert redact_url(url) == "mongodb://db.example/calls?sslmode=require&password=***"
    with pytest.raises(ConfigurationError) as info:
        telemetry_from_url(url)  # an unknown scheme: the error quotes the URL
    assert "Qz" not in str(info.value) and "password=***" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        OpenAIProvider(api_key="k", base_url=f"ftp://gw.example/v1?api-key={password}")
    assert "Qz" not in str(info.value) and "api-key=***" in str(info.value)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            f"host=db.example user=app password={SECRET} dbname=calls",
            "host=db.example user=app password=*** dbname=calls",
        ),
        (
            f"dbname=calls password='{SECRET} x' sslmode=require",
            "dbname=calls password=*** sslmode=require",
        ),
        (f"password='it\\'s {SECRET}' host=db", "password=*** host=db"),
        (f"db.example:5432/calls?password={SECRET}", "db.example:5432/calls?password=***"),
        (f"app:pw@db/calls?sslpassword={SECRET}", "***@db/calls?sslpassword=***"),
    ],
)
def test_a_connection_string_that_is_no_url_is_refused_without_its_password(
    dsn: str, shown: str
) -> None:
    # a PostgreSQL keyword/value string (what psycopg and asyncpg also take) passed
    # where a URL belongs: the error quotes it, its password masked
    assert redact_url(dsn) == shown
    for factory in (telemetry_from_url, state_store_from_url):
        with pytest.raises(ConfigurationError, match="is not a backend URL") as info:
            factory(dsn)
        assert SECRET not in str(info.value) and shown in str(info.value)


# --------------------------------------------------------------------------- plugins

PLUGIN_MODULE = "empathy_contract_fake_plugin"


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A real installed distribution (a dist-info on sys.path) publishing entry points."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(
        textwrap.dedent(
            """
            from empathy_models.backends import BackendPlugin, MemoryTelemetryBackend

            def telemetry(url, **options):
                return MemoryTelemetryBackend(**options)

            def not_a_backend(url, **options):
                return "not a backend"

            PLUGIN = BackendPlugin(
                schemes=("fakemem",), package="empathy-fake", telemetry=telemetry
            )
            BAD = BackendPlugin(
                schemes=("fakebad",),
                package="empathy-fake",
                telemetry=not_a_backend,
                state_store=not_a_backend,
            )
            NOT_A_PLUGIN = object()
            """
        )
    )
    dist_info = tmp_path / "empathy_fake_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: empathy-fake-plugin\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[empathy_models.backends]\n"
        f"fakemem = {PLUGIN_MODULE}:PLUGIN\n"
        f"fakebad = {PLUGIN_MODULE}:BAD\n"
        f"fakeobj = {PLUGIN_MODULE}:NOT_A_PLUGIN\n"
        "fakebroken = empathy_module_that_does_not_exist:PLUGIN\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.mark.usefixtures("fake_plugins")
def test_a_plugin_is_found_through_its_entry_point() -> None:
    assert {"fakemem", "fakebad", "fakeobj"} <= set(available_schemes())
    backend = telemetry_from_url("fakemem://anything", capacity=3)
    assert isinstance(backend, MemoryTelemetryBackend) and backend.capacity == 3


@pytest.mark.usefixtures("fake_plugins")
def test_a_plugin_without_that_kind_of_backend_says_so() -> None:
    with pytest.raises(ConfigurationError, match="empathy-fake backend holds no circuit state"):
        state_store_from_url("fakemem://anything")


@pytest.mark.usefixtures("fake_plugins")
def test_a_misbehaving_plugin_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="returned 'not a backend'"):
        telemetry_from_url("fakebad://x")
    with pytest.raises(ConfigurationError, match="returned 'not a backend'"):
        state_store_from_url("fakebad://x")
    with pytest.raises(ConfigurationError, match="is object, not a BackendPlugin"):
        telemetry_from_url("fakeobj://x")
    with pytest.raises(ConfigurationError, match=r"fakebroken:// .* could not be loaded") as info:
        telemetry_from_url("fakebroken://x")
    assert isinstance(info.value.__cause__, ImportError)


@pytest.fixture
def rival_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two installed distributions publishing a plugin under the same scheme, and one
    publishing a plugin under the built-in ``sqlite`` scheme."""
    module = "empathy_rival_fake_plugin"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from empathy_models.backends import BackendPlugin, MemoryTelemetryBackend

            def telemetry(url, **options):
                return MemoryTelemetryBackend(**options)

            FIRST = BackendPlugin(schemes=("fakedup",), package="rival-a", telemetry=telemetry)
            SECOND = BackendPlugin(schemes=("fakedup",), package="rival-b", telemetry=telemetry)
            """
        )
    )
    for dist, attr in (("rival_a", "FIRST"), ("rival_b", "SECOND")):
        dist_info = tmp_path / f"{dist}-0.1.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n"
        )
        (dist_info / "entry_points.txt").write_text(
            f"[empathy_models.backends]\nfakedup = {module}:{attr}\nsqlite = {module}:{attr}\n"
            f"fakesame = {module}:FIRST\n"  # both name the same plugin: no rivalry
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(module, None)


@pytest.mark.usefixtures("rival_plugins")
def test_a_scheme_two_distributions_claim_is_refused_naming_both() -> None:
    assert "fakedup" in available_schemes()
    for factory in (telemetry_from_url, state_store_from_url, cache_from_url):
        with pytest.raises(ConfigurationError) as info:
            factory("fakedup://x")
        message = str(info.value)
        assert "more than one installed distribution" in message
        assert "rival-a (empathy_rival_fake_plugin:FIRST)" in message
        assert "rival-b (empathy_rival_fake_plugin:SECOND)" in message
    assert isinstance(telemetry_from_url("fakesame://x"), MemoryTelemetryBackend)


@pytest.mark.usefixtures("rival_plugins")
def test_a_plugin_never_takes_a_builtin_scheme(tmp_path: Path) -> None:
    backend = telemetry_from_url(f"sqlite:///{tmp_path / 'calls.db'}")
    assert type(backend).__name__ == "SQLiteTelemetryBackend"
