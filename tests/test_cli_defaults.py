"""
Smaller defaults of the CLI and the package: the demo asks before writing into a
database that may hold real records and names the real backend; tables fit the
terminal; the progress bar and log lines never share a line; the plugin extras;
a clear error for a provider whose name matches no registry model.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement

from empathy_models import ConfigurationError, EmpathyLLMExecutor
from empathy_models.backends import NullTelemetryBackend
from empathy_models.cli._common import Progress, print_table
from empathy_models.testing import FakeProvider
from tests._cli import run_cli as cli

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- demo --db


def test_demo_refuses_to_write_into_an_existing_database_without_yes(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    first = cli(tmp_path, "demo", "--calls", "20", "--db", str(db))
    assert first.returncode == 0, first.stderr  # a new file: no question asked
    size = db.stat().st_size

    again = cli(tmp_path, "demo", "--calls", "20", "--db", str(db))
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--yes" in again.stderr
    assert "Traceback" not in again.stderr
    assert db.stat().st_size == size

    forced = cli(tmp_path, "demo", "--calls", "20", "--db", str(db), "--yes")
    assert forced.returncode == 0, forced.stderr
    assert "from SQLite telemetry" in forced.stdout


def test_demo_asks_about_a_sqlite_url_only_when_its_file_exists(tmp_path: Path) -> None:
    """
    ``--db sqlite:///new.db`` is a new file, as ``--db new.db`` is: written without a
    question (it was refused as "a SQLite database ... choose a new file"); an
    existing one still needs ``--yes``, and an in-memory one never does.
    """
    db = tmp_path / "new.db"
    url = f"sqlite:///{db}"
    first = cli(tmp_path, "demo", "--calls", "20", "--db", url)
    assert first.returncode == 0, first.stderr
    size = db.stat().st_size
    again = cli(tmp_path, "demo", "--calls", "20", "--db", url)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--yes" in again.stderr
    assert db.stat().st_size == size
    memory = cli(tmp_path, "demo", "--calls", "20", "--db", "sqlite://:memory:")
    assert memory.returncode == 0, memory.stderr


def test_demo_refuses_a_postgresql_url_without_yes(tmp_path: Path) -> None:
    result = cli(
        tmp_path, "demo", "--calls", "20", "--db", "postgresql://app:hunter2@127.0.0.1:1/none"
    )
    assert result.returncode == 1
    assert "PostgreSQL database" in result.stderr and "--yes" in result.stderr
    assert "hunter2" not in result.stderr


needs_postgres = pytest.mark.skipif(
    not os.environ.get("EMPATHY_TEST_POSTGRES_DSN"), reason="EMPATHY_TEST_POSTGRES_DSN not set"
)


def _schema_exists(dsn: str, schema: str, *, drop: bool = False) -> bool:
    import asyncpg

    async def check() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            found = await conn.fetchval(
                "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1", schema
            )
            if drop:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            return bool(found)
        finally:
            await conn.close()

    return asyncio.run(check())


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str, str]]:
    """(dsn, a fresh schema name, the dsn with ?schema=); the schema is dropped after."""
    dsn = os.environ["EMPATHY_TEST_POSTGRES_DSN"]
    schema = f"cli_{uuid.uuid4().hex[:12]}"
    yield dsn, schema, f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
    _schema_exists(dsn, schema, drop=True)


@needs_postgres
def test_demo_json_never_prints_the_databases_password(
    tmp_path: Path, pg_schema: tuple[str, str, str]
) -> None:
    _, _, url = pg_schema
    parts = urlsplit(url)
    secret = parts.password
    if secret is None:  # the server takes any (trust): one to keep out of the output
        secret = "S3cret-for-the-demo"
        host = parts.netloc.rpartition("@")[2]
        url = parts._replace(netloc=f"{parts.username or 'postgres'}:{secret}@{host}").geturl()
    result = cli(tmp_path, "demo", "--calls", "20", "--yes", "--json", "--db", url)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert json.loads(result.stdout)["db"].startswith("postgresql://")


@needs_postgres
def test_demo_header_names_postgresql_and_reports_read_it(
    tmp_path: Path, pg_schema: tuple[str, str, str]
) -> None:
    _, _, url = pg_schema
    result = cli(tmp_path, "demo", "--calls", "20", "--yes", "--db", url)
    assert result.returncode == 0, result.stderr
    assert "from PostgreSQL telemetry" in result.stdout
    assert "SQLite" not in result.stdout
    for command in (("telemetry", "summary"), ("routing", "stats"), ("breaker", "status")):
        report = cli(tmp_path, *command, "--db", url)
        assert report.returncode == 0, (command, report.stderr)


@needs_postgres
def test_read_only_commands_never_create_a_misspelt_schema(
    tmp_path: Path, pg_schema: tuple[str, str, str]
) -> None:
    dsn, schema, url = pg_schema
    for command in (
        ("telemetry", "summary"),
        ("telemetry", "export", "--format", "csv"),
        ("routing", "stats"),
        ("routing", "upgrades"),
        ("breaker", "status"),
    ):
        result = cli(tmp_path, *command, "--db", url)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "no empathy-models tables" in result.stderr, (command, result.stderr)
        assert schema in result.stderr
        assert "Traceback" not in result.stderr
    assert not _schema_exists(dsn, schema)


@needs_postgres
def test_commands_that_write_never_write_into_a_misspelt_schema(
    tmp_path: Path, pg_schema: tuple[str, str, str]
) -> None:
    """
    `breaker open`, `budget set` and `budget reset` on a ``?schema=`` holding no
    empathy-models tables: refused, as a SQLite file that does not exist is (before,
    the schema was created and the key "forced open" where no worker reads it).
    """
    dsn, schema, url = pg_schema
    writes = (
        ("breaker", "open", "openai"),
        ("budget", "set", "global/day", "--limit", "5"),
        ("budget", "reset", "global/day"),
    )
    for command in writes:
        result = cli(tmp_path, *command, "--db", url)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "no empathy-models tables" in result.stderr and schema in result.stderr
        assert "Traceback" not in result.stderr
    assert not _schema_exists(dsn, schema)
    # a schema holding telemetry only: its breaker and quota tables are made as before
    assert cli(tmp_path, "demo", "--calls", "20", "--yes", "--db", url).returncode == 0
    for command in writes[:2]:
        result = cli(tmp_path, *command, "--db", url)
        assert result.returncode == 0, (command, result.stderr)


# --------------------------------------------------------------------------- output


def test_tables_fit_the_width_without_cutting_identifiers_or_numbers() -> None:
    out = io.StringIO()
    rows = [("claude-" + "x" * 30, "a" * 50, 123456.5), ("short", "b", 7.0)]
    print_table(["model", "note", "cost"], rows, file=out, width=60, cut=("note",))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 60 for line in lines), lines
    assert "claude-" + "x" * 30 in lines[2] and "1.235e+05" in lines[2]
    assert "…" in lines[2]  # only the free text gave way
    unlimited = io.StringIO()
    print_table(["model", "note", "cost"], rows, file=unlimited, cut=("note",))
    assert "a" * 50 in unlimited.getvalue()  # a file or a pipe gets every character


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_never_share_a_line_with_the_progress_bar() -> None:
    stream = Terminal()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("tests.progress")
    log.addHandler(handler)
    log.propagate = False
    try:
        with Progress(10, "demo", stream=stream) as bar:
            bar.advance(3)
            log.warning("circuit opened")
            bar.advance(1)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "\r\x1b[2Kcircuit opened\n" in text  # the bar was cleared before the line
    assert "\rdemo [" in text.split("circuit opened\n", 1)[1]  # and drawn again after
    assert not handler.filters  # nothing left behind


# --------------------------------------------------------------------------- packaging


def test_the_plugins_are_extras() -> None:
    """Each extra names its plugin in a range holding the plugin's version, and back."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for engine in ("redis", "postgres"):
        plugin = tomllib.loads((ROOT / "backends" / engine / "pyproject.toml").read_text())
        (extra,) = (Requirement(r) for r in extras[engine])
        assert extra.name == plugin["project"]["name"]
        assert extra.specifier.contains(plugin["project"]["version"], prereleases=True)
        (core,) = (
            r
            for r in map(Requirement, plugin["project"]["dependencies"])
            if r.name == project["name"]
        )
        assert core.specifier.contains(project["version"], prereleases=True)
        assert not core.specifier.contains("0.2.0"), "the plugin must pin the core's 0.1 range"


def test_a_provider_named_after_no_registry_model_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigurationError) as info:
        EmpathyLLMExecutor([FakeProvider()], telemetry_store=NullTelemetryBackend())
    message = str(info.value)
    assert "'fake' has no models in the registry" in message
    assert "FakeProvider(name=" in message and "registry=" in message


@needs_postgres
def test_budget_status_on_postgresql_without_budgets_reads_as_empty_like_sqlite(
    tmp_path: Path, pg_schema: tuple[str, str, str]
) -> None:
    dsn, schema, url = pg_schema
    missing = cli(tmp_path, "budget", "status", "--db", url)  # no empathy-models tables at all
    assert missing.returncode == 1 and "no empathy-models tables" in missing.stderr
    assert not _schema_exists(dsn, schema)
    assert cli(tmp_path, "demo", "--calls", "20", "--yes", "--db", url).returncode == 0
    for db in (url, str(tmp_path / "demo.db")):
        if not db.startswith("postgres"):
            assert cli(tmp_path, "demo", "--calls", "20", "--db", db).returncode == 0
        status = cli(tmp_path, "budget", "status", "--db", db)
        assert status.returncode == 0, (db, status.stderr)
        assert "(no rows)" in status.stdout
