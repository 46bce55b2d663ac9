"""
Every code block of README.md runs here, extracted from the file itself so that the
text cannot drift: the Python blocks against `FakeLLMServer` (and the real SQLite,
Redis and PostgreSQL where a block uses them), the command-line block through the
CLI's entry point.  Only the install commands at the top are not run (they are what
runs this suite).  The Python blocks also pass ``mypy --strict``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    ConfigurationWarning,
    EmpathyLLMExecutor,
    LLMCallRecord,
    MissingAPIKeyWarning,
    ModelRegistry,
    ModelTier,
    Outcome,
    telemetry_from_url,
)
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.cli import main as cli_main
from empathy_models.providers import AnthropicProvider
from empathy_models.testing import FakeLLMServer

from ._threaded_server import threaded_fake_server

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


@attrs.frozen
class Block:
    lang: str
    code: str
    section: str


def _blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    out = []
    for match in _FENCE.finditer(text):
        headings = re.findall(r"^## (.+)$", text[: match.start()], re.M)
        out.append(Block(match.group(1), match.group(2), headings[-1] if headings else ""))
    return out


# Each Python block is found by a marker only it contains; the coverage test below fails
# when a block is added without a test (or a marker stops matching).
MARKERS = {
    "without_key": 'telemetry_store="memory://"',
    "quick_start": 'on_no_match="relax"',
    "streaming": "async for delta in stream:",
    "sync": "from empathy_models.sync import SyncExecutor",
    "messages": "async def translate(",
    "tools": "async def answer_with_tools(",
    "ollama": "http://localhost:11434/v1",
    "shared_breaker": 'STATE = "sqlite:///state.db"',
    "postgres": 'DSN = "postgresql://',
    "pandas": "import pandas as pd",
    "testing": "async def test_my_summarizer_survives_two_503s",
    "backend_urls": 'store = state_store_from_url("redis://',
    "contracts": "class TestMyTelemetry(TelemetryBackendContract)",
    "evidence": "await telemetry.evidence(since=week_ago)",
    "from_config": "EmpathyLLMExecutor.from_config()",
    "otel": "tracer_provider=tracer_provider,",
    "limits": 'SHARED = "sqlite:///quota.db"',
}
# fragments run inside a test that provides their names (and an event loop): no mypy
FRAGMENTS = ("evidence", "from_config")
INSTALL_COMMANDS = ("python3 -m venv", ".venv/bin/pip install")


def block(name: str) -> str:
    (found,) = [b.code for b in _blocks() if b.lang == "python" and MARKERS[name] in b.code]
    return found


def toml_block(section: str) -> str:
    (found,) = [b.code for b in _blocks() if b.lang == "toml" and b.section == section]
    return found


def test_every_readme_block_is_run_by_a_test() -> None:
    python = [b for b in _blocks() if b.lang == "python"]
    matched = {name: [b for b in python if marker in b.code] for name, marker in MARKERS.items()}
    assert {name: len(found) for name, found in matched.items()} == dict.fromkeys(MARKERS, 1)
    assert len(python) == len(MARKERS)
    others = [b for b in _blocks() if b.lang not in ("python", "toml")]
    assert {b.lang for b in others} == {"bash"}
    assert [b.section for b in _blocks() if b.lang == "toml"] == [
        "Recipes",  # the registry file
        "Configuration: `empathy.toml`",
    ]
    cli_blocks = [b for b in others if b.section == "The command line"]
    assert len(cli_blocks) == 1
    for b in others:
        if b is not cli_blocks[0]:  # the install commands that run this very suite
            assert b.code.startswith(INSTALL_COMMANDS), b.code


def test_the_readme_starts_with_the_two_commands() -> None:
    head = README.read_text(encoding="utf-8")[:1500]
    assert "empathy-models demo" in head
    assert "python -m pytest" in head


def test_the_constants_the_readme_names_are_public() -> None:
    # `limits.UNBOUNDED_HOLD`, `cache.MAX_TTL`, ...: each a name in its module's __all__
    text = README.read_text(encoding="utf-8")
    named = set(re.findall(r"`(?:empathy_models\.)?([a-z_.]+)\.([A-Z][A-Z0-9_]+)`", text))
    assert ("limits", "UNBOUNDED_HOLD") in named
    for module, name in sorted(named):
        public = importlib.import_module(f"empathy_models.{module}").__all__
        assert name in public, f"README names {module}.{name}, not in its __all__"


def test_the_task_types_the_readme_names_have_the_tiers_it_says() -> None:
    from empathy_models.tasks import TaskType, get_tier_for_task, normalize_task_type

    text = " ".join(README.read_text(encoding="utf-8").split())
    said = re.search(r"`task_type` picks the tier: (.*?) \(`empathy_models\.tasks", text)
    assert said is not None
    groups = re.findall(r"((?:`\w+`,? )+)(?:and )?the other (\w+)", said.group(1))
    named = {
        tier: re.findall(r"`(\w+)`", names) for names, tier in groups
    }  # every name the sentence gives, by the tier it says
    assert set(named) == {"cheap", "capable", "premium"}
    for tier, names in named.items():
        assert names and all(get_tier_for_task(n).value == tier for n in names), (tier, names)
    assert f"lists all {len(TaskType)};" in text
    assert normalize_task_type("Fix-Bug") == "fix_bug"


async def test_the_sqlite_worker_thread_is_a_daemon_as_the_readme_says(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    async with SQLiteTelemetryBackend(tmp_path / "calls.db") as backend:
        await backend.recent(limit=1)
        started = [t for t in threading.enumerate() if t not in before]
        workers = [t for t in started if "connection_worker" in t.name]  # aiosqlite's
        assert workers and all(t.daemon for t in workers)
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "its worker thread is a daemon" in text
    assert "not a daemon" not in text and "waits for it at exit" not in text


async def _run_main(code: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute a block whose last line is ``asyncio.run(main())``, awaiting main()."""
    assert code.rstrip().endswith("asyncio.run(main())")
    ns: dict[str, Any] = {} if namespace is None else namespace
    exec(compile(code.replace("asyncio.run(main())", ""), str(README), "exec"), ns)
    await ns["main"]()
    return ns


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider key in the environment: each block gets what its test gives it."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# --------------------------------------------------------------------------- the start


async def test_try_it_without_a_key(keys: None, capsys: pytest.CaptureFixture[str]) -> None:
    await _run_main(block("without_key"))
    model, _, content = capsys.readouterr().out.strip().partition(" ")
    assert ModelRegistry.default().get(model).provider == "openai"
    assert content


def _quick_start(server: FakeLLMServer, db: Path, *, anthropic_key: bool, openai_key: bool) -> str:
    def provider(name: str, base_url: str, key: bool) -> str:
        return f'{name}({"api_key=" + repr("sk-test") + ", " if key else ""}base_url="{base_url}")'

    return (
        block("quick_start")
        .replace(
            "AnthropicProvider()",
            provider("AnthropicProvider", server.anthropic_base_url, anthropic_key),
        )
        .replace("OpenAIProvider()", provider("OpenAIProvider", server.openai_base_url, openai_key))
        .replace("sqlite:///calls.db", f"sqlite:///{db}")
    )


async def test_quick_start_runs_against_fake_llm_server(
    keys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "calls.db"
    async with FakeLLMServer() as server:
        await _run_main(_quick_start(server, db, anthropic_key=True, openai_key=True))
        assert server.requests() >= 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) >= 2
    assert "$" in out[-1]
    assert db.exists()


@pytest.mark.parametrize("keyed", ["anthropic", "openai"])
async def test_quick_start_with_only_one_providers_key_answers_every_time(
    keys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], keyed: str
) -> None:
    """The other provider is configured without a key: never routed to, warned once."""
    db = tmp_path / "calls.db"
    async with FakeLLMServer() as server:
        code = _quick_start(
            server, db, anthropic_key=keyed == "anthropic", openai_key=keyed == "openai"
        )
        for _ in range(8):
            with pytest.warns(MissingAPIKeyWarning) as caught:
                await _run_main(code)
            assert len(caught) == 1
        counts = server.request_counts()
    answered = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "$" in line]
    assert len(answered) == 8
    prefix = "claude-" if keyed == "anthropic" else "gpt-"
    assert all(model.startswith(prefix) for model in answered)
    assert counts and all(model.startswith(prefix) for model in counts)


@pytest.mark.slow
@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11),
    reason="checked with --python-version 3.11 whichever Python runs it: once, on 3.11",
)
def test_the_python_blocks_pass_mypy_strict(tmp_path: Path) -> None:
    for name in MARKERS:
        if name not in FRAGMENTS:
            (tmp_path / f"readme_{name}.py").write_text(block(name), encoding="utf-8")
    args = [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.11"]
    args += ["--cache-dir", str(ROOT / ".mypy_cache"), "--no-error-summary"]
    if importlib.util.find_spec("pandas") is None:
        (tmp_path / "readme_pandas.py").unlink()  # checked where pandas is installed
    else:
        # pandas ships no type information of its own (pandas-stubs is separate)
        args += ["--disable-error-code", "import-untyped"]
    done = subprocess.run(
        [*args, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_streaming_block_prints_the_deltas_then_the_usage(
    keys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from empathy_models.testing import ModelBehavior, StreamBehavior

    text = "Lisbon sits on seven hills above the Tagus."
    behavior = ModelBehavior(content=text, output_tokens=9)
    async with FakeLLMServer(default=behavior) as server:
        code = block("streaming").replace(
            "AnthropicProvider()",
            f'AnthropicProvider(api_key="sk-test", base_url="{server.anthropic_base_url}")',
        )
        code = code.replace("sqlite:///calls.db", f"sqlite:///{tmp_path / 'calls.db'}")
        await _run_main(code)
        out = capsys.readouterr().out
        assert out.startswith(text + "\n")
        assert ": 9 tokens, $" in out and "first token after" in out
        # a failure after three deltas: the partial text, then the cut-short line
        failing = ModelBehavior(content=text, stream=StreamBehavior(fault_after=3))
        for model in ModelRegistry.default().models:
            if model.provider == "anthropic":
                server.set_behavior(model.id, failing)
        await _run_main(code)
    out = capsys.readouterr().out
    assert out.startswith("Lisbon sits on\n[cut short after 14 characters: ")
    assert "overloaded_error" in out


# --------------------------------------------------------------------------- recipes


def test_sync_recipe(keys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with threaded_fake_server() as server:
        code = block("sync").replace(
            "AnthropicProvider()",
            f'AnthropicProvider(api_key="sk-test", base_url="{server.anthropic_base_url}")',
        )
        code = code.replace("sqlite:///calls.db", f"sqlite:///{tmp_path / 'calls.db'}")
        exec(compile(code, str(README), "exec"), {})
        assert server.requests() == 3
    assert capsys.readouterr().out.strip().endswith("tokens)")


async def test_opentelemetry_block_prints_spans_and_metrics(
    keys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeLLMServer() as server:
        code = block("otel").replace(
            "AnthropicProvider()",
            f'AnthropicProvider(api_key="sk-test", base_url="{server.anthropic_base_url}")',
        )
        code = code.replace("sqlite:///calls.db", f"sqlite:///{tmp_path / 'calls.db'}")
        # the console exporters' default stream is the sys.stdout of when the SDK was
        # first imported (perhaps under another test's capture): give them this one's
        for exporter in ("ConsoleSpanExporter()", "ConsoleMetricExporter()"):
            code = code.replace(exporter, exporter.replace("()", "(out=sys.stdout)"))
        await _run_main(code, {"sys": sys})
        (model,) = server.request_counts()
        sent = server.last_request(model)
    out = capsys.readouterr().out
    assert '"name": "run docs/outline"' in out
    assert f'"name": "chat {model}"' in out
    assert "gen_ai.client.operation.duration" in out
    assert sent is not None and sent.headers["traceparent"].startswith("00-")
    assert "sk-test" not in out


async def test_messages_recipe(keys: None) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(block("messages"), str(README), "exec"), namespace)
    async with (
        FakeLLMServer() as server,
        EmpathyLLMExecutor(
            [AnthropicProvider(api_key="sk-test", base_url=server.anthropic_base_url)],
            telemetry_store="null://",
        ) as executor,
    ):
        answer = await namespace["translate"](executor, "Good morning")
        sent = server.last_request("claude-haiku-4-5")
    assert answer
    assert sent is not None
    assert sent.body["system"] == "Translate into French."
    assert sent.body["messages"] == [{"role": "user", "content": "Good morning"}]


async def test_tools_recipe(keys: None) -> None:
    from empathy_models.testing import FakeReply

    namespace: dict[str, Any] = {}
    exec(compile(block("tools"), str(README), "exec"), namespace)
    async with (
        FakeLLMServer() as server,
        EmpathyLLMExecutor(
            [AnthropicProvider(api_key="sk-test", base_url=server.anthropic_base_url)],
            telemetry_store="null://",
        ) as executor,
    ):
        server.script(
            "claude-haiku-4-5",
            [
                FakeReply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
                FakeReply(content="3 C in Oslo."),
            ],
        )
        answer = await namespace["answer_with_tools"](executor, "Weather in Oslo?")
        sent = server.last_request("claude-haiku-4-5")
    assert answer == "3 C in Oslo."
    assert sent is not None
    result = sent.body["messages"][2]["content"][0]
    assert result["type"] == "tool_result"
    assert json.loads(result["content"]) == {"city": "Oslo", "celsius": 3}


async def test_own_openai_compatible_server_recipe(
    keys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeLLMServer() as server:
        code = (
            block("ollama")
            .replace("http://localhost:11434/v1", server.openai_base_url)
            .replace("sqlite:///calls.db", f"sqlite:///{tmp_path / 'calls.db'}")
        )
        namespace = await _run_main(code)
        assert server.requests("llama3.1:8b") == 1
    assert capsys.readouterr().out.startswith("llama3.1:8b ")
    assert namespace["registry"].get("qwen2.5:32b").tier is ModelTier.CAPABLE


async def test_the_registry_file_is_the_recipes_registry_over_the_built_in_table(
    tmp_path: Path,
) -> None:
    namespace: dict[str, Any] = {}
    code = block("ollama").replace("asyncio.run(main())", "")
    exec(compile(code, str(README), "exec"), namespace)
    path = tmp_path / "models.toml"
    path.write_text(toml_block("Recipes"), encoding="utf-8")
    loaded = ModelRegistry.from_file(path)
    own = namespace["registry"]
    assert loaded.price_version == own.price_version
    for model in own:
        assert loaded.get(model.id) == model
    built_in = {m.id for m in ModelRegistry.default()}
    assert {m.id for m in loaded} == built_in | {m.id for m in own}


async def test_shared_breaker_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = block("shared_breaker").replace("sqlite:///state.db", f"sqlite:///{tmp_path / 's.db'}")
    await _run_main(code)
    assert capsys.readouterr().out.strip() == "forced_open provider maintenance"


async def test_budgets_rate_limits_and_cache_recipe(
    keys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with FakeLLMServer(api_key="test-key") as server:
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
        await _run_main(block("limits"))
        assert server.requests() == 1
    assert capsys.readouterr().out.strip() == "False True 0.0"
    assert (tmp_path / "quota.db").exists()


async def test_budgets_recipe_prints_when_a_spent_budget_resets(
    keys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = block("limits").replace("Budget(limit_usd=50,", "Budget(limit_usd=0,")
    async with FakeLLMServer(api_key="test-key") as server:
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
        await _run_main(code)
        assert server.requests() == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"global/day: \$0\.0000 left until \d{4}-\d\d-\d\d 00:00 UTC", out), out


async def test_cache_ttl_does_nothing_without_both_halves_as_the_readme_says(keys: None) -> None:
    from empathy_models import ExecutionContext, OpenAIProvider

    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "a context's `cache_ttl` does nothing in an executor built without `cache=`" in text
    assert "either warns once per executor, a `ConfigurationWarning` naming the fix" in text

    async def twice(ctx: ExecutionContext, **cache: str) -> tuple[bool, bool]:
        async with (
            FakeLLMServer() as server,
            EmpathyLLMExecutor(
                [OpenAIProvider(api_key="k", base_url=server.openai_base_url)],
                telemetry_store="null://",
                **cache,  # type: ignore[arg-type]
            ) as executor,
        ):
            first, again = [await executor.run("What is GCRA?", ctx) for _ in range(2)]
        return first.cached, again.cached

    with pytest.warns(ConfigurationWarning, match="without a response cache") as given:
        assert await twice(ExecutionContext(cache_ttl=60, temperature=0)) == (False, False)
    assert len(given) == 1
    with pytest.warns(ConfigurationWarning, match="on a request that samples") as given:
        assert await twice(ExecutionContext(cache_ttl=60), cache="memory://") == (False, False)
    assert len(given) == 1
    sampled = ExecutionContext(cache_ttl=60, cache_sampled=True)
    assert await twice(sampled, cache="memory://") == (False, True)
    zero = ExecutionContext(cache_ttl=60, temperature=0)
    assert await twice(zero, cache="memory://") == (False, True)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    dsn = os.environ.get("EMPATHY_TEST_POSTGRES_DSN")
    if not dsn:
        pytest.skip("EMPATHY_TEST_POSTGRES_DSN is not set")
    schema = f"readme_{uuid.uuid4().hex[:12]}"
    yield f"{dsn}?schema={schema}"

    async def drop() -> None:
        asyncpg: Any = importlib.import_module("asyncpg")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    anyio.run(drop)


def test_postgres_recipe(keys: None, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> list[LLMCallRecord]:
        async with FakeLLMServer() as server:
            code = re.sub(r'DSN = "[^"]*"', f"DSN = {postgres_url!r}", block("postgres"))
            code = code.replace(
                "AnthropicProvider()",
                f'AnthropicProvider(api_key="sk-test", base_url="{server.anthropic_base_url}")',
            )
            await _run_main(code)
        async with telemetry_from_url(postgres_url) as telemetry:
            return await telemetry.recent(limit=10)

    records = anyio.run(body)
    assert [r.outcome for r in records] == [Outcome.SUCCESS]
    assert capsys.readouterr().out.startswith("claude-")


async def test_pandas_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pandas", reason="pandas is optional; the recipe runs where installed")
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    async with telemetry_from_url(url) as telemetry:
        await telemetry.record_many(
            [
                LLMCallRecord(provider="openai", model="gpt-4o-mini", outcome="success", cost_usd=c)
                for c in (0.25, 0.5)
            ]
        )
    code = block("pandas").replace("sqlite:///calls.db", url)
    assert code.rstrip().endswith('print(frame.groupby("model")["cost_usd"].sum())')
    code = code.replace("frame = asyncio.run(calls_frame())", "frame = await calls_frame()")
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    pending = eval(compile(code, str(README), "exec", flags=flags), {})
    assert pending is not None
    await pending
    out = capsys.readouterr().out
    assert "gpt-4o-mini" in out and "0.75" in out


async def test_testing_recipe(keys: None) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(block("testing"), str(README), "exec"), namespace)
    await namespace["test_my_summarizer_survives_two_503s"]()


@pytest.mark.slow
def test_testing_recipe_runs_under_plain_pytest(tmp_path: Path) -> None:
    """A newcomer's project has no `asyncio_mode = "auto"`: pytest alone runs the test."""
    (tmp_path / "test_summarizer.py").write_text(block("testing"), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_backend_url_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(block("backend_urls"), str(README), "exec"), namespace)
    assert type(namespace["telemetry"]).__name__ == "SQLiteTelemetryBackend"
    assert type(namespace["store"]).__name__ == "RedisCircuitStateStore"


def test_contract_suite_block() -> None:
    from empathy_models.testing.contracts import TelemetryBackendContract

    namespace: dict[str, Any] = {}
    exec(compile(block("contracts"), str(README), "exec"), namespace)
    assert issubclass(namespace["TestMyTelemetry"], TelemetryBackendContract)


def test_the_contract_suites_say_what_to_install_where_pytest_asyncio_is_missing() -> None:
    # the suites' fixtures are pytest-asyncio's: without it the import failed with a bare
    # "No module named 'pytest_asyncio'", naming neither the package nor why it is needed
    code = (
        "import sys\n"
        "sys.modules['pytest_asyncio'] = None\n"
        "try:\n"
        "    import empathy_models.testing.contracts\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name, '|', exc)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    name, _, message = done.stdout.strip().partition(" | ")
    assert name == "pytest_asyncio"
    assert "pip install pytest pytest-asyncio" in message
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "run under pytest with pytest-asyncio" in text


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_the_command_line_block_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (code,) = [b.code for b in _blocks() if b.section == "The command line"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "home"))
    (tmp_path / "src" / "app").mkdir(parents=True)
    (tmp_path / "src" / "app" / "models.py").write_text("x = 1\n" * 300, encoding="utf-8")
    for line in code.splitlines():
        command = line.split("#", 1)[0].strip()
        if not command:
            continue
        words = shlex.split(command)
        assert words[0] == "empathy-models", line
        target = None
        if ">" in words:
            words, target = words[: words.index(">")], words[words.index(">") + 1]
        code_ = cli_main(words[1:])
        out, err = capsys.readouterr()
        assert code_ == 0, (line, out, err)
        assert out.strip(), line
        if target is not None:
            (tmp_path / target).write_text(out, encoding="utf-8")
    header = (tmp_path / "calls.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "provider,model,outcome" in header


async def _run_fragment(code: str, namespace: dict[str, Any]) -> None:
    """Run a block with top-level ``await`` in ``namespace``."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    pending = eval(compile(code, str(README), "exec", flags=flags), namespace)
    if pending is not None:
        await pending


async def test_evidence_block(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    async with telemetry_from_url(url) as telemetry:
        await telemetry.record_many(
            # three calls (distinct call ids: a repeated call_id is stored once)
            [
                LLMCallRecord(provider="openai", model="gpt-4o-mini", outcome="success")
                for _ in range(3)
            ]
        )
        namespace: dict[str, Any] = {
            "telemetry": telemetry,
            "week_ago": datetime.now(UTC) - timedelta(days=7),
        }
        await _run_fragment(block("evidence"), namespace)
        await telemetry.record(
            LLMCallRecord(provider="openai", model="gpt-4o-mini", outcome="failure")
        )
        later = await telemetry.evidence(after_version=namespace["batch"].version)
    assert sum(b.samples for b in namespace["batch"].buckets) == 3
    assert namespace["later"].buckets == ()  # nothing changed between the two reads
    assert sum(b.samples for b in later.buckets) == 4  # a changed bucket comes back whole


async def test_configuration_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's empathy.toml, with the fake server's URLs, read by from_config()."""
    toml = toml_block("Configuration: `empathy.toml`")
    async with FakeLLMServer() as server:
        toml = toml.replace("http://localhost:11434/v1", server.openai_base_url)
        redis_url = os.environ.get("EMPATHY_TEST_REDIS_URL")
        prefix = f"empathy-test-readme-{uuid.uuid4().hex}:"  # its keys, deleted after
        if redis_url:
            joined = "&" if "?" in redis_url else "?"
            toml = toml.replace("redis://cache:6379/0", f"{redis_url}{joined}prefix={prefix}")
        else:
            toml = toml.replace('"redis://cache:6379/0"', '"calls.db"')
        # the registry file the README shows: the built-in table and Ollama's models
        (tmp_path / "models.toml").write_text(toml_block("Recipes"), encoding="utf-8")
        (tmp_path / "empathy.toml").write_text(toml, encoding="utf-8")
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("EMPATHY_CONFIG", raising=False)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
        namespace: dict[str, Any] = {
            "EmpathyLLMExecutor": EmpathyLLMExecutor,
            "AdaptiveModelRouter": AdaptiveModelRouter,
        }
        await _run_fragment(block("from_config"), namespace)
        assert namespace["response"].content
        assert server.requests() == 1
        last = server.last_request(namespace["response"].model)
        assert last is not None
        if namespace["response"].provider == "ollama":
            assert last.headers.get("X-Team") == "search"
    assert (tmp_path / "calls.db").exists()
    if redis_url:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        try:
            written = [k async for k in client.scan_iter(match=f"{prefix}*")]
            assert written  # the breaker's state went to the test's own keys
            await client.delete(*written)
        finally:
            await client.aclose()
