"""
``empathy.toml``: one configuration for the SDK and the CLI.  The executor built with
`EmpathyLLMExecutor.from_config` calls `FakeLLMServer` over real HTTP and writes a real
SQLite file; the CLI runs (in this process, `tests._cli.run_cli`) in the same
directory, with no flags, and must read the same database and registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    AllRoutesFailedError,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    MissingAPIKeyWarning,
    ModelRegistry,
    OpenAIProvider,
)
from empathy_models.config import EmpathyConfig, ProviderConfig, find_config_file
from empathy_models.testing import FakeLLMServer
from tests._cli import run_cli

KEY = "local-key-0123"

MODELS = """
price_version = "config-test-1"

[[models]]
id = "house-small"
provider = "house"
tier = "cheap"
input_price_per_mtok = 0.5
output_price_per_mtok = 1.0
context_window = 32768
max_output_tokens = 4096

[[models]]
id = "house-large"
provider = "house"
tier = "capable"
input_price_per_mtok = 2.0
output_price_per_mtok = 4.0
context_window = 32768
max_output_tokens = 4096
"""


def cli(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(home, *args, cwd=cwd)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory as the working directory, with an empty EMPATHY_HOME."""
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EMPATHY_CONFIG", raising=False)
    return work


def write_config(directory: Path, server: FakeLLMServer) -> None:
    (directory / "models.toml").write_text(MODELS)
    (directory / "empathy.toml").write_text(
        f"""
telemetry = "calls.db"
registry = "models.toml"

[providers.house]
type = "openai"
base_url = "{server.openai_base_url}"
api_key = "{KEY}"
headers = {{ "X-Team" = "search", "X-Gateway-Token" = "tok-do-not-print" }}
"""
    )


async def test_the_cli_reads_what_from_config_wrote(
    project: Path, server: FakeLLMServer, tmp_path: Path
) -> None:
    write_config(project, server)
    async with EmpathyLLMExecutor.from_config() as executor:
        for _ in range(3):
            response = await executor.run(
                "hello", ExecutionContext(workflow="support", stage="triage", tier="cheap")
            )
    assert response.model == "house-small"
    assert (project / "calls.db").is_file()
    assert server.requests("house-small") == 3

    stats = cli(project, tmp_path / "home", "routing", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    [support] = json.loads(stats.stdout)["workflows"]
    assert support["workflow"] == "support"
    assert support["performance_by_model"]["house-small"]["calls"] == 3

    # the registry too: only the file's models are cheap candidates
    best = cli(project, tmp_path / "home", "routing", "best", "support", "triage", "--json")
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["model"] == "house-small"
    capable = cli(
        project, tmp_path / "home", "routing", "best", "support", "triage", "--tier", "capable"
    )
    assert capable.returncode == 0, capable.stderr
    assert "house-large" in capable.stdout

    # the breaker state is in the same database, keyed per model
    breakers = cli(project, tmp_path / "home", "breaker", "status", "--json")
    assert breakers.returncode == 0, breakers.stderr
    keys = {b["key"] for b in json.loads(breakers.stdout)["breakers"]}
    assert "house:house-small" in keys


async def test_config_show_names_every_source_and_no_secret(
    project: Path, server: FakeLLMServer, tmp_path: Path
) -> None:
    write_config(project, server)
    result = cli(project, tmp_path / "home", "config", "show")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert str(project / "empathy.toml") in out
    assert "working directory" in out
    assert str(project / "calls.db") in out
    assert str(project / "models.toml") in out
    assert "X-Team=search" in out
    assert KEY not in out and "tok-do-not-print" not in out
    data = json.loads(cli(project, tmp_path / "home", "config", "show", "--json").stdout)
    sources = {row["setting"]: row["source"] for row in data["settings"]}
    assert sources["state"] == "default (the telemetry database)"
    assert sources["telemetry"] == str(project / "empathy.toml")


def test_config_show_masks_a_password_with_an_unencoded_delimiter(
    project: Path, tmp_path: Path
) -> None:
    # generated passwords hold '/', '#', '?': the URL no longer parses, and must still
    # be shown (and refused) masked
    (project / "empathy.toml").write_text(
        'telemetry = "postgresql://app:Xy7/Qz+9@db.internal:5432/llm"\n'
        'state = "redis://default:Xy7#Qz9@cache:6379/0"\n'
    )
    shown = cli(project, tmp_path / "home", "config", "show")
    assert "Xy7" not in shown.stdout + shown.stderr and "Qz" not in shown.stdout + shown.stderr
    assert "postgresql://app:***@db.internal:5432/llm" in shown.stdout
    assert "redis://default:***@cache:6379/0" in shown.stdout
    assert shown.returncode == 1 and "port" in shown.stderr


def test_a_url_the_parser_refuses_is_refused_without_its_password(
    project: Path, tmp_path: Path
) -> None:
    # a fullwidth '#' (U+FF03) in a password: urllib refuses the host part, quoting it
    # whole (password included) in its own message
    path = project / "empathy.toml"
    path.write_text('state = "postgresql://app:Xy7\\uff03Qz9@db.internal:5432/llm"\n')
    with pytest.raises(ConfigurationError) as refused:
        EmpathyConfig.load(path)
    assert "Xy7" not in str(refused.value) and "Qz9" not in str(refused.value), refused.value
    assert "state: not a valid URL: its host does not parse" in str(refused.value)
    shown = cli(project, tmp_path / "home", "config", "show")
    assert shown.returncode == 1 and "state: not a valid URL" in shown.stderr
    assert "Xy7" not in shown.stdout + shown.stderr and "Qz9" not in shown.stdout + shown.stderr


@pytest.mark.parametrize("key", ["telemetry", "state"])
def test_a_keyword_connection_string_is_no_file_path(
    project: Path, tmp_path: Path, key: str
) -> None:
    # a PostgreSQL keyword/value string where a URL belongs: refused, not taken for the
    # name of a SQLite file (a file named with the password, telemetry silently local)
    path = project / "empathy.toml"
    path.write_text(f'{key} = "host=db.internal user=app password=Xy7Qz9 dbname=llm"\n')
    with pytest.raises(ConfigurationError) as refused:
        EmpathyConfig.load(path)
    assert "Xy7Qz9" not in str(refused.value), refused.value
    assert f"{key}: a PostgreSQL keyword/value connection string" in str(refused.value)
    assert "postgresql://user:password@host:5432/dbname" in str(refused.value)
    shown = cli(project, tmp_path / "home", "config", "show")
    assert shown.returncode == 1 and "Xy7Qz9" not in shown.stdout + shown.stderr
    assert sorted(p.name for p in project.iterdir()) == ["empathy.toml"]


async def test_the_directories_made_for_the_database_are_private_under_any_umask(
    project: Path, server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "a" / "b" / "home"  # three directories to make, not one
    monkeypatch.setenv("EMPATHY_HOME", str(home))
    old = os.umask(0)
    try:
        async with EmpathyLLMExecutor.from_config(
            providers=[OpenAIProvider(KEY, base_url=server.openai_base_url)], router=False
        ):
            pass
    finally:
        os.umask(old)
    assert (home / "empathy.db").is_file()
    for directory in (tmp_path / "a", tmp_path / "a" / "b", home):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


async def test_a_tilde_in_a_sqlite_url_is_the_home_directory_where_it_is_opened(
    project: Path, server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "user-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (project / "empathy.toml").write_text('telemetry = "sqlite:///~/calls.db?busy_timeout=5"\n')
    assert EmpathyConfig.load().telemetry_url == f"sqlite:///{home / 'calls.db'}?busy_timeout=5"
    async with EmpathyLLMExecutor.from_config(
        providers=[OpenAIProvider(KEY, base_url=server.openai_base_url)], router=False
    ) as executor:
        await executor.run("hello", ExecutionContext(workflow="w", stage="s"))
    assert (home / "calls.db").is_file()
    assert not (project / "~").exists()
    for db in ([], ["--db", "sqlite:///~/calls.db"]):  # the CLI reads the same file
        summary = cli(project, tmp_path / "home", "telemetry", "summary", "--json", *db)
        assert summary.returncode == 0, summary.stderr
        assert sum(m["calls"] for m in json.loads(summary.stdout)["models"]) == 1


@pytest.mark.parametrize("given", ["file", "option", "router"])
async def test_a_memory_telemetry_is_the_one_the_router_reads(
    project: Path, server: FakeLLMServer, given: str
) -> None:
    # memory:// built twice, once for the executor and once for the router, gave the
    # router an empty store of its own: its stats (and evidence) never saw a call
    write_config(project, server)
    config = project / "empathy.toml"
    if given != "option":
        config.write_text(config.read_text().replace('"calls.db"', '"memory://"'))
    options: dict[str, Any] = {"telemetry_store": "memory://"} if given == "option" else {}
    context = ExecutionContext(workflow="w", stage="s", tier="cheap")
    own = AdaptiveModelRouter.from_config() if given == "router" else None
    async with contextlib.AsyncExitStack() as stack:
        if own is not None:
            await stack.enter_async_context(own)
        executor = await stack.enter_async_context(
            EmpathyLLMExecutor.from_config(router=own if own is not None else True, **options)
        )
        await executor.run("hello", context)
        router = own if own is not None else executor._router
        assert isinstance(router, AdaptiveModelRouter)
        assert router.telemetry_store is executor.telemetry_store
        stats = await router.get_routing_stats("w", "s")
        assert stats.total_calls == 1


async def test_the_default_state_leaves_the_telemetry_only_options_out(
    project: Path, server: FakeLLMServer, tmp_path: Path
) -> None:
    """The breaker state defaults to the telemetry database, not to its batching."""
    (project / "empathy.toml").write_text(
        'telemetry = "sqlite:///calls.db?max_queue=50000&busy_timeout=5&flush_interval=0.5"\n'
    )
    config = EmpathyConfig.load()
    db = project / "calls.db"
    assert config.telemetry_url.endswith("?max_queue=50000&busy_timeout=5&flush_interval=0.5")
    assert config.state_url == f"sqlite:///{db}?busy_timeout=5"
    async with EmpathyLLMExecutor.from_config(
        providers=[OpenAIProvider(KEY, base_url=server.openai_base_url)], router=False
    ) as executor:
        await executor.run("hello", ExecutionContext(workflow="w", stage="s"))
    breakers = cli(project, tmp_path / "home", "breaker", "status", "--json")
    assert breakers.returncode == 0, breakers.stderr
    assert any(b["key"].startswith("openai:") for b in json.loads(breakers.stdout)["breakers"])


def test_the_file_is_found_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("EMPATHY_HOME", str(home))
    monkeypatch.delenv("EMPATHY_CONFIG", raising=False)
    assert find_config_file() == (None, "none")
    defaults = EmpathyConfig.load()
    assert defaults.telemetry_url.endswith("/home/empathy.db")
    assert defaults.state_url == defaults.telemetry_url
    assert [p.name for p in defaults.providers] == ["openai", "anthropic"]

    (home / "empathy.toml").write_text('telemetry = "home.db"\n')
    assert find_config_file() == (home / "empathy.toml", "EMPATHY_HOME")
    # relative to the file, not to the working directory
    assert EmpathyConfig.load().telemetry_url == f"sqlite:///{home / 'home.db'}"

    (work / "empathy.toml").write_text('telemetry = "sqlite:///work.db"\nstate = "memory://"\n')
    assert find_config_file() == (work / "empathy.toml", "working directory")
    loaded = EmpathyConfig.load()
    assert loaded.telemetry_url == f"sqlite:///{work / 'work.db'}"
    assert loaded.state_url == "memory://"

    named = tmp_path / "elsewhere.toml"
    named.write_text('telemetry = "postgresql://app:hunter2@db/empathy"\n')
    monkeypatch.setenv("EMPATHY_CONFIG", str(named))
    assert find_config_file() == (named, "EMPATHY_CONFIG")
    rows = EmpathyConfig.load().describe()
    assert "hunter2" not in repr(rows)

    monkeypatch.setenv("EMPATHY_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match=r"EMPATHY_CONFIG=.*missing\.toml"):
        find_config_file()
    monkeypatch.setenv("EMPATHY_CONFIG", str(work))  # a directory: said so
    with pytest.raises(ConfigurationError, match=r"is a directory: name the file .*empathy\.toml"):
        find_config_file()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('telemetri = "x.db"\n', "unknown key"),
        ("telemetry = 3\n", "telemetry must be a non-empty string"),
        ("[providers.mine]\nbase_url = 'http://x'\n", 'needs type = "openai"'),
        ("[providers.openai]\ntimeout = -1\n", "timeout must be"),
        ("[providers.openai]\nmax_stream_bytes = 0\n", r"max_stream_bytes must be an integer"),
        ("[providers.openai]\nmax_response_bytes = 1.5\n", r"max_response_bytes must be an"),
        ("[providers.openai]\nsecret = 'x'\n", "unknown key"),
        ("telemetry = \n", "invalid TOML"),
        ("telemetry = " + "[" * 100_000 + "]" * 100_000 + "\n", "invalid TOML: .*too deeply"),
        ('telemetry = "~nosuchuser-empathy/x.db"\n', "telemetry: cannot expand '~nosuch"),
        ('state = "sqlite:///~nosuchuser-empathy/x.db"\n', "state: cannot expand '~nosuch"),
        ('registry = "~nosuchuser-empathy/m.toml"\n', "registry: cannot expand '~nosuch"),
    ],
)
def test_invalid_files_name_the_file_and_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "empathy.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=message) as info:
        EmpathyConfig.load(path)
    assert str(path) in str(info.value)


def test_blanks_around_a_value_are_not_part_of_it(project: Path) -> None:
    # they were: the database became "./ calls.db " (a new, empty one, not calls.db),
    # the registry " models.toml" was not found, while EMPATHY_HOME and EMPATHY_CONFIG
    # are read without them
    (project / "models.toml").write_text(MODELS)
    (project / "empathy.toml").write_text(
        'telemetry = " calls.db "\nstate = "sqlite:///state.db  "\nregistry = " models.toml"\n'
    )
    config = EmpathyConfig.load()
    assert config.telemetry_url == "sqlite:///" + str(project / "calls.db")
    assert config.state_url == "sqlite:///" + str(project / "state.db")
    assert config.registry().price_version == "config-test-1"


def test_blanks_around_api_key_env_are_not_part_of_the_name(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the provider read the variable "TEAM_KEY " (which no shell can set) and was
    # keyless, config show saying "key from $TEAM_KEY  (not set)" while TEAM_KEY was set
    monkeypatch.setenv("TEAM_KEY", KEY)
    (project / "empathy.toml").write_text(
        '[providers.gw]\ntype = "openai"\nbase_url = "http://gw/v1"\napi_key_env = " TEAM_KEY "\n'
    )
    config = EmpathyConfig.load()
    assert "key from $TEAM_KEY (set)" in config.describe()[-1][1]
    assert [p.has_api_key for p in config.build_providers()] == [True]


@pytest.mark.parametrize("key", ["api_key", "base_url"])
def test_a_provider_value_of_blanks_is_refused(
    project: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    # api_key = "   " was taken: config show said "api_key=<set in file>" while the
    # provider was keyless (a key of blanks is none) and read no $OPENAI_API_KEY either,
    # its warning saying to set the variable that was set
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-0123456789")
    (project / "empathy.toml").write_text(f'[providers.openai]\n{key} = "   "\n')
    with pytest.raises(
        ConfigurationError, match=rf"\[providers.openai\] {key} must be a non-empty"
    ):
        EmpathyConfig.load()
    shown = cli(project, project.parent / "home", "config", "show")
    assert shown.returncode == 1
    assert f"{key} must be a non-empty string" in shown.stderr
    assert "<set in file>" not in shown.stdout


def test_a_file_saved_with_a_byte_order_mark_is_read(project: Path) -> None:
    # Windows editors save UTF-8 with a byte order mark; the file was refused:
    # "invalid TOML: Invalid statement (at line 1, column 1)", in a line that looked right
    (project / "empathy.toml").write_bytes(b'\xef\xbb\xbftelemetry = "calls.db"\n')
    config = EmpathyConfig.load()
    assert config.telemetry_url == "sqlite:///" + str(project / "calls.db")
    assert config.sources["telemetry"] == str(project / "empathy.toml")


def test_an_unexpandable_home_is_one_error_line(tmp_path: Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    (work / "empathy.toml").write_text('telemetry = "~nosuchuser-empathy/x.db"\n')
    result = cli(work, home, "config", "show")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("empathy-models: error: "), result.stderr
    assert "cannot expand '~nosuchuser-empathy/x.db'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_an_infinite_provider_timeout_is_no_timeout(
    project: Path, server: FakeLLMServer
) -> None:
    # ``timeout = inf`` is accepted (an infinite timeout is no timeout), but every call
    # without a timeout of its own failed: OverflowError: cannot convert float infinity
    write_config(project, server)
    with (project / "empathy.toml").open("a") as file:
        file.write("timeout = inf\n")  # the last table's: [providers.house]
    context = ExecutionContext(tier="cheap", timeout=None)
    async with EmpathyLLMExecutor.from_config(router=False) as executor:
        assert (await executor.run("hello", context)).model == "house-small"
        async with executor.stream("hello", context) as stream:
            assert (await stream.get_final_response()).model == "house-small"
    assert server.requests("house-small") == 2


def test_providers_are_built_as_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_GATEWAY_KEY", "gw-secret")
    path = tmp_path / "empathy.toml"
    path.write_text(
        """
[providers.gateway]
type = "openai"
base_url = "http://gateway.internal/v1"
api_key_env = "TEAM_GATEWAY_KEY"
timeout = 120
"""
    )
    [provider] = EmpathyConfig.load(path).build_providers()
    assert isinstance(provider, OpenAIProvider)
    assert (provider.name, provider.base_url, provider.has_api_key) == (
        "gateway",
        "http://gateway.internal/v1",
        True,
    )
    assert "gw-secret" not in repr(EmpathyConfig.load(path))


def test_a_providers_body_bounds_are_configured(tmp_path: Path) -> None:
    # the streamed answer's bound and the whole answer's, beside the timeout
    path = tmp_path / "empathy.toml"
    path.write_text(
        "[providers.anthropic]\nmax_response_bytes = 1048576\nmax_stream_bytes = 67108864\n"
    )
    config = EmpathyConfig.load(path)
    [provider] = config.build_providers()
    assert (provider._max_body, provider._max_stream) == (1 << 20, 64 << 20)
    described = config.providers[0].describe()
    assert "max_response_bytes=1,048,576" in described
    assert "max_stream_bytes=67,108,864" in described


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ('{ "X Team" = "search" }', "header name 'X Team' is not an HTTP token"),
        ('{ "X(Team)" = "search" }', "header name 'X(Team)' is not an HTTP token"),
        ('{ "Équipe" = "search" }', "header name 'Équipe' is not an HTTP token"),
        ('{ "X:Team" = "search" }', "header name 'X:Team' is not an HTTP token"),
        ('{ "X-Team" = "a\\u0000b" }', "header 'X-Team' must have a one-line string value"),
        ('{ "X-Team" = "a\\u007fb" }', "header 'X-Team' must have a one-line string value"),
    ],
)
def test_a_header_no_request_can_carry_is_refused_naming_it(
    tmp_path: Path, headers: str, message: str
) -> None:
    # each was taken, and every call then failed: sent, and answered 400 "Invalid
    # header token", or never built ("Forbidden control character detected")
    path = tmp_path / "empathy.toml"
    path.write_text(f'[providers.house]\ntype = "openai"\nheaders = {headers}\n')
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        EmpathyConfig.load(path).build_providers()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('base_url = "localhost:8000/v1"', "base_url must be an http(s) URL"),
        ('base_url = "https://u:pa55word@gw/v1"', "base_url must not hold credentials"),
        ('headers = { "X Team" = "a" }', "header name 'X Team' is not an HTTP token"),
    ],
)
def test_a_provider_value_refused_names_the_file_and_the_table(
    project: Path, tmp_path: Path, table: str, message: str
) -> None:
    # the provider's own message came alone ("base_url must be an http(s) URL ..."):
    # which file, which of several [providers.*] tables, was left to guess
    path = project / "empathy.toml"
    path.write_text(f'[providers.anthropic]\n[providers.house]\ntype = "openai"\n{table}\n')
    with pytest.raises(ConfigurationError) as refused:
        EmpathyLLMExecutor.from_config()
    assert str(refused.value).startswith(f"{path}: [providers.house] "), refused.value
    assert message in str(refused.value) and "pa55word" not in str(refused.value)
    shown = cli(project, tmp_path / "cli-home", "config", "show")
    assert shown.stderr.strip() == f"empathy-models: error: {refused.value}"


@pytest.mark.parametrize(
    ("toml", "key", "advice"),
    [
        (
            '[providers.gateway]\ntype = "openai"\nbase_url = "http://127.0.0.1:9/v1"',
            "[providers.gateway]",
            "name the table [providers.anthropic] or [providers.openai]",
        ),
        ('registry = "models.toml"', "registry:", "add a [providers.house] table"),
    ],
)
def test_providers_the_registry_has_no_models_of_name_the_file(
    project: Path, tmp_path: Path, toml: str, key: str, advice: str
) -> None:
    # the executor's message spoke to Python code, not to the file:
    # "provider 'gateway' has no models in the registry ... name it after one of those
    # (e.g. OpenAIProvider(name='anthropic')) or pass registry= with models of 'gateway'"
    (project / "models.toml").write_text(MODELS)
    path = project / "empathy.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigurationError) as refused:
        EmpathyLLMExecutor.from_config()
    assert str(refused.value).startswith(f"{path}: {key} "), refused.value
    assert advice in str(refused.value) and "registry=" not in str(refused.value)
    shown = cli(project, tmp_path / "cli-home", "config", "show")
    assert shown.stderr.strip() == f"empathy-models: error: {refused.value}"


def test_a_registry_file_that_is_not_there_names_the_key_and_what_to_do(
    project: Path, tmp_path: Path
) -> None:
    # it read "/app/models.toml: cannot read the registry file (No such file or
    # directory)", naming neither the file that named it nor a way out
    path = project / "empathy.toml"
    path.write_text('registry = "models.toml"\n')
    with pytest.raises(ConfigurationError) as refused:
        EmpathyLLMExecutor.from_config()
    message = str(refused.value)
    assert message.startswith(f"{path}: registry: {project / 'models.toml'}: "), message
    assert "no such file" in message and "remove `registry`" in message
    shown = cli(project, tmp_path / "cli-home", "config", "show")
    assert shown.stderr.strip() == f"empathy-models: error: {refused.value}"


@pytest.mark.parametrize(
    "tables",
    [
        "",
        '[providers.openai]\n[providers.house]\ntype = "openai"\n'
        'base_url = "http://h/v1"\napi_key = "k"\n',
    ],
)
async def test_a_registry_file_without_the_default_providers_models_says_extends(
    project: Path, tmp_path: Path, tables: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A file of one's own models beside OpenAI's (the README's empathy.toml): the error
    names `extends = "default"`, which keeps the built-in table's, and that works.
    """
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    (project / "models.toml").write_text(MODELS)
    path = project / "empathy.toml"
    path.write_text(f'registry = "models.toml"\n{tables}')
    with pytest.raises(ConfigurationError) as refused:
        EmpathyLLMExecutor.from_config()
    assert str(refused.value).startswith(f"{path}: "), refused.value
    assert f'extends = "default"` at the top of {project / "models.toml"}' in str(refused.value)
    shown = cli(project, tmp_path / "cli-home", "config", "show")
    assert shown.stderr.strip() == f"empathy-models: error: {refused.value}"
    (project / "models.toml").write_text('extends = "default"\n' + MODELS)
    async with EmpathyLLMExecutor.from_config(telemetry_store="null://") as executor:
        assert {"house-small", "gpt-4o-mini"} <= {m.id for m in executor.registry}


@pytest.mark.parametrize(
    "where",
    ["base_url_from_env", "api_key_from_env"],
)
async def test_an_unset_api_key_env_leaves_the_provider_keyless(
    project: Path, server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The variable ``api_key_env`` names is the only source: never the default one."""
    monkeypatch.delenv("TEAM_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the server's key: sending it would work
    (project / "models.toml").write_text(MODELS)
    table = '[providers.house]\ntype = "openai"\napi_key_env = "TEAM_KEY"\n'
    if where == "base_url_from_env":
        monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
    else:
        table += f'base_url = "{server.openai_base_url}"\napi_key_from_env = true\n'
    (project / "empathy.toml").write_text(f'registry = "models.toml"\n{table}')
    [provider] = EmpathyConfig.load().build_providers()
    assert not provider.has_api_key
    with pytest.warns(MissingAPIKeyWarning, match=r"house \(set TEAM_KEY or pass api_key="):
        executor = EmpathyLLMExecutor.from_config(router=False)
    async with executor:
        with pytest.raises(AllRoutesFailedError, match=r"MissingAPIKeyError: .*set TEAM_KEY"):
            await executor.run("hello", ExecutionContext(model="house-small"))
    assert server.requests() == 0

    monkeypatch.setenv("TEAM_KEY", KEY)
    async with EmpathyLLMExecutor.from_config(router=False) as executor:
        response = await executor.run("hello", ExecutionContext(model="house-small"))
    assert response.model == "house-small" and server.requests() == 1


@pytest.mark.parametrize(
    ("toml", "name"),
    [
        ('""', ""),
        ('"="', "="),
        ('"TEAM_KEY=x"', "TEAM_KEY=x"),
        ('"TEAM\\u0000KEY"', "TEAM\x00KEY"),
        (None, "TEAM\ud800KEY"),  # a lone surrogate: no TOML string holds one
        ("5", 5),
    ],
    ids=["empty", "equals", "assignment", "nul", "surrogate", "number"],
)
def test_an_api_key_env_that_can_name_no_variable_is_refused(
    tmp_path: Path, toml: str | None, name: Any
) -> None:
    with pytest.raises(ConfigurationError, match=r"^ProviderConfig\.api_key_env "):
        ProviderConfig(name="gateway", kind="openai", api_key_env=name)
    if toml is None:
        return
    path = tmp_path / "empathy.toml"
    path.write_text(f'[providers.gateway]\ntype = "openai"\napi_key_env = {toml}\n')
    with pytest.raises(ConfigurationError, match=r"\[providers\.gateway\] api_key_env ") as info:
        EmpathyConfig.load(path)
    assert str(path) in str(info.value)


def test_api_key_env_with_api_key_from_env_false_is_refused(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # refused by OpenAIProvider(api_key_env=..., api_key_from_env=False); the file's
    # "false" was dropped, and the provider read the variable it said not to read
    monkeypatch.setenv("TEAM_KEY", KEY)
    path = project / "empathy.toml"
    path.write_text(
        '[providers.gateway]\ntype = "openai"\nbase_url = "http://gw/v1"\n'
        'api_key_env = "TEAM_KEY"\napi_key_from_env = false\n'
    )
    with pytest.raises(ConfigurationError, match="api_key_from_env = false reads none") as info:
        EmpathyConfig.load()
    assert str(info.value).startswith(f"{path}: [providers.gateway] api_key_env = 'TEAM_KEY'")


@pytest.mark.parametrize("written", ["OPENAI_API_KEY", "$TEAM_KEY", "${TEAM_KEY}", "$env:TEAM_KEY"])
def test_a_variable_name_given_as_api_key_is_refused_with_api_key_env(
    project: Path, written: str
) -> None:
    # the name was sent as the key itself (the file is not expanded): every call failed
    # with 401 "Incorrect API key provided", saying nothing of the file
    path = project / "empathy.toml"
    path.write_text(f'[providers.openai]\nbase_url = "http://gw/v1"\napi_key = "{written}"\n')
    name = written.strip("${}").removeprefix("env:")
    with pytest.raises(ConfigurationError) as refused:
        EmpathyConfig.load()
    assert str(refused.value).startswith(f"{path}: [providers.openai] api_key "), refused.value
    assert f'api_key_env = "{name}"' in str(refused.value)


@pytest.mark.parametrize("key", ["sk-proj-Xy7Qz9AbCdEf0123", "sk-ant-api03-Xy7Qz9AbCdEf"])
def test_an_api_key_given_as_api_key_env_is_refused_unshown(
    project: Path, tmp_path: Path, key: str
) -> None:
    # the key itself where the name of its variable belongs: refused, never shown by
    # config show, a repr or the provider's hints about the variable
    path = project / "empathy.toml"
    path.write_text(f'[providers.openai]\napi_key_env = "{key}"\n')
    with pytest.raises(ConfigurationError, match="not the key itself") as info:
        EmpathyConfig.load(path)
    assert "Xy7Qz9" not in str(info.value) and "sk-***" in str(info.value)
    shown = cli(project, tmp_path / "home", "config", "show")
    assert shown.returncode == 1 and "Xy7Qz9" not in shown.stdout + shown.stderr
    with pytest.raises(ConfigurationError, match="not the key itself") as info:
        ProviderConfig(name="openai", kind="openai", api_key_env=key)
    with pytest.raises(ConfigurationError, match="not the key itself") as info:
        OpenAIProvider(api_key_env=key)
    assert "Xy7Qz9" not in str(info.value)


def test_the_router_reads_the_same_configuration(project: Path) -> None:
    (project / "models.toml").write_text(MODELS)
    (project / "empathy.toml").write_text('registry = "models.toml"\n')
    router = AdaptiveModelRouter.from_config()
    assert {m.id for m in router.registry.models} == {"house-small", "house-large"}


async def test_the_router_from_config_alone_works_as_the_executors_does(
    project: Path, tmp_path: Path
) -> None:
    # AdaptiveModelRouter.from_config() on its own failed where the executor's worked:
    # "TelemetryError: ... the directory .../home does not exist" on a new machine,
    # "TypeError: got multiple values for argument 'registry'" for an option, and a
    # refused URL without the file and key it came from
    async with AdaptiveModelRouter.from_config() as router:
        assert (await router.get_routing_stats("w")).total_calls == 0
    assert (tmp_path / "home" / "empathy.db").is_file()
    (project / "models.toml").write_text(MODELS)
    mine = ModelRegistry.from_file(project / "models.toml")
    assert AdaptiveModelRouter.from_config(registry=mine).registry is mine
    path = project / "empathy.toml"
    path.write_text('telemetry = "sqlite:///c.db?max_batc=1"\n')
    with pytest.raises(ConfigurationError, match="unknown sqlite URL option") as refused:
        AdaptiveModelRouter.from_config()
    assert str(refused.value).startswith(f"{path}: telemetry: "), refused.value


@pytest.mark.parametrize(
    ("toml", "home", "prefix"),
    [
        ('telemetry = "afile/calls.db"', "home", "telemetry: "),
        ('state = "sqlite:///afile/state.db"', "home", "state: "),
        ("", "afile/home", ""),
    ],
)
def test_a_database_directory_that_cannot_be_made_is_a_configuration_error(
    project: Path, monkeypatch: pytest.MonkeyPatch, toml: str, home: str, prefix: str
) -> None:
    # raised as a bare "FileExistsError: [Errno 17] File exists: '.../afile'", naming
    # neither the database nor the setting that put it there
    (project / "afile").write_text("")
    monkeypatch.setenv("EMPATHY_HOME", str(project / home))
    path = project / "empathy.toml"
    path.write_text(toml + "\n")
    for build in (EmpathyLLMExecutor.from_config, AdaptiveModelRouter.from_config):
        if "state" in toml and build == AdaptiveModelRouter.from_config:
            continue  # the router opens no state store
        with pytest.raises(ConfigurationError) as refused:
            build()
        message = str(refused.value)
        start = f"{path}: {prefix}" if prefix else ""
        assert message.startswith(f"{start}cannot create the directory"), message
        assert f"{project / 'afile'} is not a directory" in message
        assert prefix or "EMPATHY_HOME" in message
    # config show said nothing of it and exited 0, though it says from_config's refusal
    before = sorted(project.rglob("*"))
    shown = cli(project, project / home, "config", "show")
    assert shown.returncode == 1, shown.stdout
    assert shown.stderr.strip() == f"empathy-models: error: {message}"
    assert sorted(project.rglob("*")) == before  # checked, nothing made


def test_the_router_defaults_a_registry_like_the_executor() -> None:
    router = AdaptiveModelRouter()
    assert len(router.registry) > 0


async def test_routing_stats_right_after_calls_see_them(tmp_path: Path) -> None:
    """The executor's writes are still queued: the shared backend's reads flush first."""
    from empathy_models import telemetry_from_url
    from empathy_models.testing import FakeProvider

    backend = telemetry_from_url(f"sqlite:///{tmp_path / 'calls.db'}")
    async with backend:
        router = AdaptiveModelRouter(telemetry_store=backend)
        async with (
            router,
            EmpathyLLMExecutor(
                [FakeProvider(name="openai")], telemetry_store=backend, router=router
            ) as executor,
        ):
            await executor.run("hello", ExecutionContext(workflow="w", stage="s", tier="cheap"))
            stats = await router.get_routing_stats("w")
    assert stats.telemetry == "ok"
    assert stats.total_calls == 1


async def test_without_a_file_the_executor_writes_where_the_cli_reads(
    project: Path, server: FakeLLMServer, tmp_path: Path
) -> None:
    """No empathy.toml: telemetry goes to $EMPATHY_HOME/empathy.db, created on first use."""
    (project / "models.toml").write_text(MODELS)

    async with EmpathyLLMExecutor.from_config(
        providers=[OpenAIProvider(KEY, name="house", base_url=server.openai_base_url)],
        registry=ModelRegistry.from_file(project / "models.toml"),
    ) as executor:
        await executor.run("hello", ExecutionContext(workflow="w", stage="s", tier="cheap"))
    home = tmp_path / "home"
    assert (home / "empathy.db").is_file()
    assert (home.stat().st_mode & 0o777) == 0o700
    summary = cli(project, home, "telemetry", "summary", "--json")
    assert summary.returncode == 0, summary.stderr
    assert sum(m["calls"] for m in json.loads(summary.stdout)["models"]) == 1


class CountingRouter(AdaptiveModelRouter):
    """An `AdaptiveModelRouter` that counts the outcomes it is told."""

    told = 0

    def record_outcome(self, record: LLMCallRecord) -> None:
        self.told += 1
        super().record_outcome(record)


async def test_from_config_uses_the_router_it_is_given(
    project: Path, server: FakeLLMServer
) -> None:
    """``router=<a router>`` is used as given, and left open (borrowed), as **options win."""
    write_config(project, server)
    config = EmpathyConfig.load()
    context = ExecutionContext(workflow="support", stage="triage", tier="cheap")
    async with CountingRouter(config.registry(), seed=1) as mine:
        for _ in range(2):
            async with EmpathyLLMExecutor.from_config(router=mine) as executor:
                assert (await executor.run("hello", context)).model == "house-small"
        # borrowed: the first executor's exit left it working for the second
        assert mine.told == 2
    async with EmpathyLLMExecutor.from_config(router=None) as executor:
        await executor.run("hello", context)
    assert mine.told == 2 and server.requests() == 3
    with pytest.raises(ConfigurationError, match=r"router=\) must be True, False, None or a"):
        EmpathyLLMExecutor.from_config(router="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('telemetry = "foo://x"', "telemetry: unknown backend scheme 'foo'"),
        ('telemetry = "sqlite:///c.db?max_batc=1"', "telemetry: unknown sqlite URL option"),
        ('state = "redis://127.0.0.1:6379/0?socket_timout=1"', "state: unknown Redis URL"),
        ('state = "postgresql://u:s3cret@h:99999/db"', "state: 'postgresql://u:\\*\\*\\*@h"),
        ('telemetry = "sqlite:///c.db"\nstate = "memory://x"', "state: 'memory://x': a memory"),
        # a URL missing its '//' was a file's name: ./sqlite:c.db, a directory named
        # after the password ./postgresql:u:s3cret@h/, shown so by config show
        ('telemetry = "sqlite:c.db"', "telemetry: 'sqlite:' .* sqlite:///c.db"),
        # SQLite's own URI form: ./file:c.db was made
        ('telemetry = "file:c.db?mode=rwc"', "telemetry: 'file:' .* sqlite:///c.db"),
        ('state = "postgresql:u:s3cret@h/db"', "state: 'postgresql:' .*postgresql://"),
    ],
)
def test_a_store_url_refused_names_the_file_and_the_key(
    project: Path, tmp_path: Path, toml: str, message: str
) -> None:
    path = project / "empathy.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigurationError) as refused:
        EmpathyLLMExecutor.from_config()
    assert sorted(p.name for p in project.iterdir()) == ["empathy.toml"]
    assert str(refused.value).startswith(f"{path}: "), refused.value
    assert re.search(message, str(refused.value)), refused.value
    assert "s3cret" not in str(refused.value)
    shown = cli(project, tmp_path / "cli-home", "config", "show")
    assert shown.stderr.strip() == f"empathy-models: error: {refused.value}"


@pytest.mark.parametrize(
    "toml",
    [
        'telemetry = "foo://x"',
        'registry = "nofile.toml"',
        'state = "redis://127.0.0.1:6379/0?socket_timout=1"',
        '[providers.house]\ntype = "openai"\nbase_url = "localhost:8000/v1"\napi_key = "k"',
        '[providers.nomodels]\ntype = "openai"\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "k"',
    ],
)
def test_config_show_refuses_what_from_config_refuses(
    project: Path, tmp_path: Path, toml: str
) -> None:
    (project / "empathy.toml").write_text(toml + "\n")
    with pytest.raises(ConfigurationError) as refused:
        EmpathyLLMExecutor.from_config()
    home = tmp_path / "cli-home"  # (from_config above made the directory of its own home)
    shown = cli(project, home, "config", "show")
    assert shown.returncode == 1, shown.stdout
    assert shown.stderr.strip() == f"empathy-models: error: {refused.value}"
    assert str(project / "empathy.toml") in shown.stdout  # still shows what it can
    data = json.loads(cli(project, home, "config", "show", "--json").stdout)
    assert data["error"]["message"] == str(refused.value) and data["settings"]
    assert not home.exists()  # nothing created, nothing connected


def test_the_repr_of_a_configuration_shows_no_url_secret(tmp_path: Path) -> None:
    # a password in a store URL, a key in a gateway's URL: printed or logged with the
    # configuration (print(config), a debugger, an error report), they must not show
    path = tmp_path / "empathy.toml"
    path.write_text(
        'telemetry = "postgresql://app:hunter2@db.example/app"\n'
        'state = "redis://:hunter3@cache:6379/0"\n'
        "[providers.azure]\n"
        'type = "openai"\n'
        'base_url = "https://x.openai.azure.com/openai?api-key=azsecret"\n'
    )
    config = EmpathyConfig.load(path)
    assert config.telemetry_url == "postgresql://app:hunter2@db.example/app"  # still used
    shown = repr(config)
    for secret in ("hunter2", "hunter3", "azsecret"):
        assert secret not in shown, shown
    assert "postgresql://app:***@db.example/app" in shown
    assert "api-key=***" in shown
    provider = ProviderConfig(name="p", kind="openai", base_url="http://u:pw9@gw/v1")
    assert "pw9" not in repr(provider) and "u:***@gw" in repr(provider)
    assert "base_url=None" in repr(ProviderConfig(name="q", kind="openai"))


def _latin1_dir(parent: Path) -> Path:
    """``parent/café`` named in Latin-1 (the byte 0xE9: not valid UTF-8), made."""
    directory = parent / os.fsdecode(b"caf\xe9")
    try:
        directory.mkdir()
    except OSError:  # a file system that takes UTF-8 names only (macOS)
        pytest.skip("this file system refuses a name that is not valid UTF-8")
    return directory


async def test_a_home_and_a_project_named_in_latin1_work_end_to_end(
    project: Path, server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a directory named in a legacy encoding: the URLs made for its files must still
    # name them, byte for byte, for the SDK and the CLI alike
    home = _latin1_dir(tmp_path)
    monkeypatch.setenv("EMPATHY_HOME", str(home))
    (project / "models.toml").write_text(MODELS)

    config = EmpathyConfig.load()
    assert config.telemetry_url.endswith("/caf%E9/empathy.db"), config.telemetry_url
    async with EmpathyLLMExecutor.from_config(
        providers=[OpenAIProvider(KEY, name="house", base_url=server.openai_base_url)],
        registry=ModelRegistry.from_file(project / "models.toml"),
    ) as executor:
        await executor.run("hello", ExecutionContext(workflow="w", stage="s", tier="cheap"))
    assert (home / "empathy.db").is_file()
    for args in (("telemetry", "summary"), ("breaker", "status"), ("config", "show")):
        result = cli(project, home, *args, "--json")
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    summary = json.loads(cli(project, home, "telemetry", "summary", "--json").stdout)
    assert sum(m["calls"] for m in summary["models"]) == 1
    breakers = json.loads(cli(project, home, "breaker", "status", "--json").stdout)
    assert "house:house-small" in {b["key"] for b in breakers["breakers"]}

    # an empathy.toml in such a directory, its database named relative to it
    latin1_project = _latin1_dir(project)
    (latin1_project / "empathy.toml").write_text('telemetry = "calls.db"\n')
    monkeypatch.chdir(latin1_project)
    loaded = EmpathyConfig.load()
    async with loaded.telemetry_store() as store:
        assert await store.recent(limit=1) == []
    assert (latin1_project / "calls.db").is_file()


def test_a_key_variable_of_blanks_is_shown_as_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # the provider takes it for no key: config show must not say it is set
    monkeypatch.setenv("OPENAI_API_KEY", " \n")
    monkeypatch.setenv("TEAM_KEY", "  ")
    assert (
        "key from $OPENAI_API_KEY (not set)"
        in ProviderConfig(name="openai", kind="openai").describe()
    )
    team = ProviderConfig(name="t", kind="openai", base_url="http://gw/v1", api_key_env="TEAM_KEY")
    assert "key from $TEAM_KEY (not set)" in team.describe()
    assert not team.build().has_api_key


@pytest.mark.parametrize(
    ("table", "shown", "keyed"),
    [
        ({"api_key_from_env": False}, "no key (api_key_from_env = false)", False),
        ({"base_url": "http://gw/v1"}, "no key: $OPENAI_API_KEY is not sent to this", False),
        ({"base_url": "https://api.openai.com/v1"}, "key from $OPENAI_API_KEY (set)", True),
    ],
)
def test_config_show_says_whether_the_provider_has_a_key(
    monkeypatch: pytest.MonkeyPatch, table: dict[str, Any], shown: str, keyed: bool
) -> None:
    # config show said "key from $OPENAI_API_KEY (set)" for a provider that reads no key
    # (api_key_from_env = false), and nothing at all for one whose base_url is kept from
    # the environment's key, or is the official one, which reads it
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-0123456789")
    config = ProviderConfig(name="openai", kind="openai", **table)
    assert shown in config.describe(), config.describe()
    assert config.build().has_api_key is keyed


def test_config_show_masks_a_key_in_a_header_whose_name_looks_harmless(
    project: Path, tmp_path: Path
) -> None:
    # "X-Upstream" is not a secret-looking name: its value, an API key, was printed whole
    (project / "empathy.toml").write_text(
        '[providers.openai]\nheaders = { "X-Upstream" = "Bearer sk-ant-api03-Xy7Qz9AbCdEf", '
        '"X-Team" = "search" }\n'
    )
    shown = cli(project, tmp_path / "home", "config", "show", "--json")
    assert "Xy7Qz9" not in shown.stdout + shown.stderr
    assert "X-Upstream=Bearer sk-***" in shown.stdout and "X-Team=search" in shown.stdout


def test_config_show_masks_a_key_in_a_base_url_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # redact_url masks a password and secret-looking options, not a key in the path
    url = "https://gw.example/key/sk-proj-Xy7Qz9AbCdEf/v1"
    described = ProviderConfig(name="openai", kind="openai", base_url=url, api_key="x")
    assert "Xy7Qz9" not in described.describe() + repr(described)
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    assert "Xy7Qz9" not in ProviderConfig(name="openai", kind="openai").describe()


def test_from_configs_warnings_point_at_the_callers_line(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # they pointed into the library (_executor.py, "executor = cls(providers, ...)"),
    # where EmpathyLLMExecutor(...) points at the line that built it
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with pytest.warns(MissingAPIKeyWarning) as caught:
        EmpathyLLMExecutor.from_config(router=False)
    assert [w.filename for w in caught] == [__file__]


def test_config_show_says_an_infinite_timeout_is_none() -> None:
    # shown as "timeout=infs"
    described = ProviderConfig(name="openai", kind="openai", timeout=float("inf")).describe()
    assert described.endswith(", no timeout"), described
    assert (
        ProviderConfig(name="openai", kind="openai", timeout=120)
        .describe()
        .endswith(", timeout=120s")
    )
