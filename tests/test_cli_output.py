"""
What the CLI prints: an output it cannot write is one error line, tables on a narrow
terminal never cut identifiers (nor numbers, times, headers) and count wide characters
as two columns, and recorded names cannot put control characters on the terminal.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from empathy_models import LLMCallRecord, Outcome, state_store_from_url, telemetry_from_url
from empathy_models.cli import main
from empathy_models.cli._common import print_table
from tests._cli import _environment, run_cli

FULL = Path("/dev/full")


def display_width(text: str) -> int:
    """Terminal columns: East Asian wide and fullwidth characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _record_calls(db: Path, workflows: list[str], models: list[str]) -> None:
    now = datetime.now(UTC) - timedelta(minutes=5)

    async def body() -> None:
        async with telemetry_from_url(f"sqlite:///{db}") as telemetry:
            await telemetry.record_many(
                [
                    LLMCallRecord(
                        provider="openai",
                        model=model,
                        outcome=Outcome.SUCCESS,
                        workflow=workflow,
                        stage="reply",
                        latency_ms=12.0,
                        cost_usd=0.001,
                        timestamp=now,
                    )
                    for workflow in workflows
                    for model in models
                ]
            )

    anyio.run(body)


# --------------------------------------------------------------------------- 1. full stdout


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
@pytest.mark.parametrize(
    "command",
    [
        ("telemetry", "summary", "--json"),
        ("telemetry", "summary"),
        ("telemetry", "export", "--format", "csv"),
        ("config", "show"),
    ],
)
def test_an_output_that_cannot_be_written_is_one_error_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    db = tmp_path / "calls.db"
    _record_calls(db, ["chat"], ["gpt-4o-mini"])
    env = {k: v for k, v in os.environ.items() if k != "EMPATHY_CONFIG"}
    env["EMPATHY_HOME"] = str(tmp_path / "home")
    db_args = ("--db", str(db)) if command[0] != "config" else ()
    with FULL.open("w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "empathy_models", *command, *db_args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=110,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "empathy-models: error: cannot write the output: No space left on device"
    ]


def _in_latin1(home: Path, *args: str) -> bytes:
    """Run the CLI in this process with stdout in Latin-1 (a terminal so set, a file on
    Windows); return the bytes it wrote."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="latin-1", newline="")
    err = io.StringIO()
    with (
        _environment({"EMPATHY_HOME": str(home), "EMPATHY_CONFIG": None}),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        code = main(list(args))
    out.flush()
    assert code == 0, err.getvalue()
    assert out.encoding == "latin-1" and out.errors == "strict"  # given back as it was
    return raw.getvalue()


def test_a_name_the_outputs_encoding_cannot_hold_ends_in_no_traceback(tmp_path: Path) -> None:
    """
    stdout in an encoding other than UTF-8: a table shows a name it cannot encode
    escaped, and an export writes its records in UTF-8, every character kept (both
    ended in a UnicodeEncodeError traceback before).
    """
    db = tmp_path / "calls.db"
    _record_calls(db, ["支援", "café"], ["gpt-4o-mini"])
    summary = _in_latin1(tmp_path, "telemetry", "summary", "--db", str(db))
    assert b"\\u652f\\u63f4  reply" in summary
    assert "café  ".encode("latin-1") in summary  # what the encoding holds, as it is
    export = _in_latin1(tmp_path, "telemetry", "export", "--format", "csv", "--db", str(db))
    workflows = {row["workflow"] for row in csv.DictReader(io.StringIO(export.decode()))}
    assert workflows == {"支援", "café"}


# --------------------------------------------------------------------------- 2. narrow terminals


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _on_terminal(home: Path, columns: int, *args: str) -> str:
    """Run the CLI in this process with stdout a terminal of ``columns`` columns."""
    out, err = Terminal(), io.StringIO()
    changes = {"COLUMNS": str(columns), "EMPATHY_HOME": str(home), "EMPATHY_CONFIG": None}
    with (
        _environment(changes),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        code = main(list(args))
    assert code == 0, err.getvalue()
    return out.getvalue()


def test_breaker_keys_are_never_cut_on_an_80_column_terminal(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    anyio.run(_open_state, db)
    keys = ["openai:gpt-4.1-mini", "openai:gpt-4o-mini", "openai:gpt-4.1-nano"]
    reason = "maintenance window announced by the provider for the whole afternoon (ticket 4711)"
    for key in keys[:2]:  # open: times and a reason fill the row
        opened = run_cli(tmp_path, "breaker", "open", key, "--reason", reason, "--db", str(db))
        assert opened.returncode == 0, opened.stderr
    run_cli(tmp_path, "breaker", "open", keys[2], "--db", str(db))
    run_cli(tmp_path, "breaker", "reset", keys[2], "--db", str(db))
    for columns in (120, 80):
        out = _on_terminal(tmp_path, columns, "breaker", "status", "--db", str(db))
        for key in keys:
            assert key in out, out
        assert all(display_width(line) <= columns for line in out.splitlines()), out
        assert "last error" in out and "open until" in out  # headers whole
        assert "…" in out  # the reason is what gives way


def test_summary_rows_stay_distinct_and_within_the_terminal(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    models = ["gpt-4.1-mini-2025-04-14", "gpt-4.1-nano-2025-04-14", "claude-sonnet-4-20250514"]
    _record_calls(db, ["support-tickets"], models)
    for columns in (80, 60, 40):
        out = _on_terminal(tmp_path, columns, "telemetry", "summary", "--db", str(db))
        for model in models:
            assert model in out, (columns, out)
        for header in ("workflow", "95% bounds", "p95 ms", "cost"):
            assert header in out, (columns, out)
        table = out.split("\ntotal:")[0].splitlines()
        assert all(display_width(line) <= columns for line in table), (columns, out)


def test_wide_characters_count_as_two_columns() -> None:
    out = io.StringIO()
    print_table(["name", "calls"], [("日本語", 1), ("abc", 22)], file=out)
    lines = out.getvalue().splitlines()
    # the numbers end in the same terminal column on every row
    assert len({display_width(line) for line in (lines[0], lines[2], lines[3])}) == 1, lines


def test_a_table_cuts_only_the_columns_it_may_cut() -> None:
    rows = [("claude-" + "x" * 40, "a" * 50, 123456.5), ("short", "b", 7.0)]
    out = io.StringIO()
    print_table(["model", "note", "cost"], rows, file=out, width=70, cut=("note",))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 70 for line in lines), lines
    assert "claude-" + "x" * 40 in lines[2] and "1.235e+05" in lines[2] and "…" in lines[2]
    narrow = io.StringIO()
    print_table(["model", "note", "cost"], rows, file=narrow, width=30, cut=("note",))
    text = narrow.getvalue()
    assert "claude-" + "x" * 40 in text and "1.235e+05" in text  # one block per row


# --------------------------------------------------------------------------- 3. control characters

ODD = ["line1\nline2", "\x1b[31mRED\x1b[0m", "\r overwrite", "rtl\u202eevil"]


@pytest.mark.parametrize(
    "command",
    [("telemetry", "summary"), ("routing", "stats"), ("routing", "upgrades")],
)
def test_control_characters_in_names_are_escaped(tmp_path: Path, command: tuple[str, ...]) -> None:
    db = tmp_path / "calls.db"
    _record_calls(db, ODD, ["gpt-4o-mini"])
    result = run_cli(tmp_path / "home", *command, "--db", str(db))
    assert result.returncode == 0, result.stderr
    for raw in ("\x1b", "\r", "\u202e", "line1\nline2"):
        assert raw not in result.stdout, (raw, result.stdout)
    assert "line1\\nline2" in result.stdout and "\\x1b[31mRED" in result.stdout
    data = run_cli(tmp_path / "home", *command, "--db", str(db), "--json").stdout
    assert "\\u001b[31mRED" in data and json.loads(data)  # JSON keeps the exact names


def test_a_typed_backslash_and_a_real_newline_are_told_apart(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    _record_calls(db, ["real\nbreak", "typed\\nslash"], ["gpt-4o-mini"])
    result = run_cli(tmp_path / "home", "telemetry", "summary", "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert "real\\nbreak" in result.stdout and "typed\\\\nslash" in result.stdout


def test_a_control_character_in_an_argument_is_escaped_in_messages(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    anyio.run(_open_state, db)
    result = run_cli(tmp_path, "breaker", "reset", "\x1b[2Jkey", "--yes", "--db", str(db))
    assert "\x1b" not in result.stdout + result.stderr, result


async def _open_state(db: Path) -> None:
    async with state_store_from_url(f"sqlite:///{db}"):
        pass


# --------------------------------------------------------------------------- 6. small ones


def test_an_in_memory_database_is_refused_for_what_it_is(tmp_path: Path) -> None:
    for url in ("sqlite://:memory:", "sqlite:///:memory:"):
        result = run_cli(tmp_path, "telemetry", "summary", "--db", url)
        assert result.returncode == 1
        assert "read_only" not in result.stderr
        assert "in-memory database" in result.stderr and "database file" in result.stderr


def test_demo_refuses_a_url_it_cannot_use_before_asking(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "demo", "--calls", "20", "--db", "redis://127.0.0.1:1/0")
    assert result.returncode == 1
    assert "--yes" not in result.stderr, result.stderr
    assert "holds no telemetry" in result.stderr


def test_the_top_level_help_names_whatif() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--help"]) == 0
    commands = " ".join(out.getvalue().split())
    routing = commands.split(" routing ", 1)[1].split(" breaker ", 1)[0]
    assert "what-if" in routing, routing


SECRET = "Zq8-not-for-your-eyes"


@pytest.mark.parametrize(
    "args",
    [
        # a password option of the drivers, under a name of their own
        ("telemetry", "summary", "--db", f"redis://127.0.0.1:1/0?ssl_password={SECRET}"),
        ("breaker", "status", "--db", f"redis://127.0.0.1:1/0?ssl_password={SECRET}&x=1"),
        # a password option misspelt (refused by name before any connection)
        ("breaker", "status", "--db", f"redis://127.0.0.1:1/0?pasword={SECRET}"),
        ("budget", "status", "--db", f"redis://127.0.0.1:1/0?passwrd={SECRET}"),
    ],
)
def test_a_secret_option_of_a_url_is_never_printed(tmp_path: Path, args: tuple[str, ...]) -> None:
    for json_flag in ((), ("--json",)):
        result = run_cli(tmp_path, *args, *json_flag)
        assert result.returncode == 1, result
        assert "***" in result.stderr, result.stderr
        assert SECRET not in result.stdout + result.stderr, result


def test_config_show_prints_no_secret_option_of_a_url(tmp_path: Path) -> None:
    (tmp_path / "empathy.toml").write_text(
        f'telemetry = "postgresql://app@db/calls?sslpassword={SECRET}&sslmode=require"\n'
        f'state = "redis://cache:6379/0?ssl_password={SECRET}"\n'
        "[providers.openai]\n"
        f'base_url = "https://example.openai.azure.com/openai/v1?api-key={SECRET}"\n'
        'api_key = "placeholder"\n'
    )
    for json_flag in ((), ("--json",)):
        result = run_cli(tmp_path, "config", "show", *json_flag, cwd=tmp_path)
        assert "sslpassword=***" in result.stdout, result
        assert SECRET not in result.stdout + result.stderr, result


def test_config_show_prints_no_api_key_a_header_holds(tmp_path: Path) -> None:
    """
    A header whose name does not look secret but whose value holds an API key (an
    ``sk-`` key, or the provider's own ``api_key``): its value is not printed (it was).
    """
    (tmp_path / "empathy.toml").write_text(
        "[providers.openai]\n"
        'base_url = "https://gateway.example/v1"\n'
        f'api_key = "gw-{SECRET}"\n'
        f'headers = {{ "X-Upstream" = "sk-proj-{SECRET}", "X-Forward" = "Bearer gw-{SECRET}", '
        '"X-Team" = "search" }\n'
    )
    for json_flag in ((), ("--json",)):
        result = run_cli(tmp_path, "config", "show", *json_flag, cwd=tmp_path)
        assert result.returncode == 0, result
        assert "X-Team=search" in result.stdout, result
        assert SECRET not in result.stdout + result.stderr, result
