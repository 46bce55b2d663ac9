"""
The CLI's rough edges, each through the real entry point `empathy_models.cli.main`
in process (output captured), against a real SQLite file.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import attrs
import pytest

from empathy_models import (
    CircuitState,
    LLMCallRecord,
    ModelTier,
    Outcome,
    state_store_from_url,
    telemetry_from_url,
)
from empathy_models.cli import build_parser, main


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "home"))


def _record(model: str, provider: str, outcome: Outcome, i: int) -> LLMCallRecord:
    ok = outcome is Outcome.SUCCESS
    return LLMCallRecord(
        provider=provider,
        model=model,
        outcome=outcome,
        workflow="docs",
        stage="write",
        tier=ModelTier.CHEAP,
        input_tokens=400 if ok else 0,
        output_tokens=100 if ok else 0,
        cost_usd=0.0009 if ok else 0.0,
        latency_ms=20.0 + i,
        timestamp=datetime.now(UTC) - timedelta(minutes=5) + timedelta(seconds=i),
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """
    30 haiku calls (3 failed), one gpt-4o-mini call, 4 rejections and 2 attempts not
    sent (no key); a forced-open key.
    """
    path = tmp_path / "calls.db"
    url = f"sqlite:///{path}"
    records = [
        _record("claude-haiku-4-5", "anthropic", Outcome.FAILURE if i < 3 else Outcome.SUCCESS, i)
        for i in range(30)
    ]
    records.append(_record("gpt-4o-mini", "openai", Outcome.SUCCESS, 31))
    records.extend(_record("gpt-4o-mini", "openai", Outcome.REJECTED, 40 + i) for i in range(4))
    records.extend(_record("gpt-4o-mini", "openai", Outcome.NOT_SENT, 50 + i) for i in range(2))

    async def fill() -> None:
        async with telemetry_from_url(url) as telemetry:
            await telemetry.record_many(records)
        async with state_store_from_url(url) as store:
            await store.force("openai", CircuitState.FORCED_OPEN, reason="maintenance")

    anyio.run(fill)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- help


def test_no_command_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 0
    assert "usage: empathy-models" in out and "routing" in out and "demo" in out


@pytest.mark.parametrize("group", ["auth", "routing", "breaker", "budget", "telemetry", "config"])
def test_a_group_without_subcommand_prints_its_help(
    capsys: pytest.CaptureFixture[str], group: str
) -> None:
    code, out, _ = run(capsys, group)
    assert code == 0
    assert f"usage: empathy-models {group}" in out and "SUBCOMMAND" in out


def _parsers(
    parser: argparse.ArgumentParser, path: str = "empathy-models"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(_parsers(sub, f"{path} {name}"))
    return found


def test_every_command_has_a_description_and_every_option_has_help() -> None:
    missing: list[str] = []
    for path, parser in _parsers(build_parser()):
        if not parser.description:
            missing.append(f"{path}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_help_texts_read_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "routing", "stats", "--help")
    assert code == 0 and "95% bounds" in out and "%%" not in out
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "default: a temporary database" in text
    assert "empathy.db" not in text  # no default path contradicting "temporary"
    for command in ("status", "set", "reset"):  # it named empathy.toml's database only
        code, out, _ = run(capsys, "budget", command, "--help")
        assert code == 0
        assert "else $EMPATHY_HOME/empathy.db" in " ".join(out.split()), command


@pytest.mark.parametrize("command", ["setup", "status", "reset", "restore", "recommend"])
def test_auth_commands_take_no_db(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, _, err = run(capsys, "auth", command, "--db", "x.db")
    assert code == 2 and "unrecognized arguments: --db" in err


# --------------------------------------------------------------------------- --json errors


def test_json_errors_are_json_objects_on_stdout(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "telemetry", "summary", "--db", str(tmp_path / "no.db"), "--json")
    assert code == 1
    error = json.loads(out)["error"]
    assert error["type"] == "CliError" and "database not found" in error["message"]
    assert error["exit_code"] == 1
    assert "database not found" in err


def test_a_missing_default_database_points_to_the_one_the_code_writes(
    capsys: pytest.CaptureFixture[str], db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the quick start writes calls.db where it runs; the commands read $EMPATHY_HOME's
    monkeypatch.chdir(db.parent)
    code, _, err = run(capsys, "telemetry", "summary")
    assert code == 1 and "--db left out: the configured database" in err
    assert "--db calls.db for 'sqlite:///calls.db'" in err
    assert "SQLite files here: calls.db" in err
    code, _, err = run(capsys, "budget", "status")
    assert code == 1 and "the file your code's quota_store= or breaker store= names" in err
    code, _, err = run(capsys, "telemetry", "summary", "--db", "other.db")  # typed: as before
    assert code == 1 and "--db left out" not in err and "create one with" in err


def test_json_usage_errors_are_json_objects_too(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "routing", "stats", "--days", "-1", "--json")
    assert code == 2
    assert json.loads(out)["error"] == {
        "type": "UsageError",
        "message": "argument --days: must be > 0, got -1",
        "exit_code": 2,
    }
    assert "usage: empathy-models routing stats" in err
    code, out, err = run(capsys, "routing", "stats", "--days", "-1")
    assert code == 2 and out == "" and "must be > 0" in err


@pytest.mark.parametrize(
    "args",
    [
        ("routing", "best", "docs", "write", "--max-cost", "inf"),
        ("routing", "best", "docs", "write", "--max-latency-ms", "Infinity"),
        ("routing", "stats", "--days", "inf"),
    ],
)
def test_an_infinite_number_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and "expected a finite number" in err


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (("routing", "best", "docs", "write"), "--input-tokens"),
        (("routing", "best", "docs", "write"), "--max-tokens"),
        (("routing", "whatif", "docs", "write"), "--input-tokens"),
        (("routing", "whatif", "docs", "write"), "--max-tokens"),
    ],
)
def test_a_token_count_past_what_a_call_can_have_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], db: Path, command: tuple[str, ...], option: str
) -> None:
    """
    A count of 2**63 or more: a usage error naming the option (exit 1 naming
    input_tokens, the Python argument, once the database was read, before).
    """
    code, _, err = run(capsys, *command, option, str(2**63), "--db", str(db))
    assert code == 2, err
    assert f"argument {option}: must be at most {2**63 - 1:,}" in err


def test_routing_best_no_match_json_has_every_reason_and_prints_it_once(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    args = ("routing", "best", "docs", "write", "--max-cost", "0.0000001", "--db", str(db))
    code, out, err = run(capsys, *args, "--json")
    assert code == 1
    error = json.loads(out)["error"]
    assert error["type"] == "NoModelMeetsConstraintsError"
    assert (error["workflow"], error["stage"]) == ("docs", "write")
    assert set(error["reasons"]) == {"claude-haiku-4-5", "gpt-4o-mini"}
    assert all(
        any("max_cost" in r or "max $" in r for r in why) for why in error["reasons"].values()
    )
    code, out, err = run(capsys, *args)
    assert code == 1 and out == ""
    reason = error["reasons"]["claude-haiku-4-5"][0]
    assert err.count(reason) == 1  # the error only, no log line repeating it


# --------------------------------------------------------------------------- unknowns


def test_an_unknown_breaker_key_is_an_error_naming_the_keys_held(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    code, out, err = run(capsys, "breaker", "status", "anthropc", "--db", str(db))
    assert code == 1 and out == ""
    assert "unknown breaker key 'anthropc'" in err and "keys held: openai" in err
    code, out, _ = run(capsys, "breaker", "status", "openai", "--db", str(db), "--json")
    assert code == 0
    assert [b["state"] for b in json.loads(out)["breakers"]] == ["forced_open"]


def test_an_unknown_candidate_is_an_error_naming_known_ids(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    code, _, err = run(
        capsys,
        "routing",
        "best",
        "docs",
        "write",
        "--candidates",
        "claude-haiku-4-5,gpt-4o-mimi",
        "--db",
        str(db),
    )
    assert code == 2
    assert "unknown model id(s) in --candidates: gpt-4o-mimi" in err
    assert "gpt-4o-mini" in err and "--registry" in err


@pytest.mark.parametrize(
    "command",
    [
        ["routing", "best", "docs", "wrte"],
        ["routing", "whatif", "docs", "wrte"],
        ["routing", "upgrades", "dcs"],
        ["routing", "upgrades", "docs", "--stage", "wrte"],
    ],
)
def test_a_stage_without_calls_names_the_stages_that_have_some(
    capsys: pytest.CaptureFixture[str], db: Path, command: list[str]
) -> None:
    # a typo read "no calls recorded" (upgrades: "No calls recorded in the last 7
    # day(s)", as if the database were empty), with nothing to tell it from a quiet stage
    code, out, err = run(capsys, *command, "--db", str(db))
    assert code == (0 if command[1] == "upgrades" else 1)
    said = out + err
    assert "o calls recorded for " in said, said
    assert "in the last 7 day(s) (only for docs/write)" in said, said


@pytest.mark.parametrize(
    "command",
    [
        ["routing", "stats", "dcs"],
        ["routing", "stats", "--stage", "wrte"],
        ["routing", "stats", "docs", "--stage", "wrte"],
        ["telemetry", "summary", "--workflow", "dcs"],
        ["telemetry", "summary", "--stage", "wrte"],
    ],
)
def test_stats_and_summary_of_a_name_without_calls_name_the_stages_that_have_some(
    capsys: pytest.CaptureFixture[str], db: Path, command: list[str]
) -> None:
    # as routing best / whatif / upgrades do: the typo showed an empty table, or "No
    # calls recorded for stage wrte", with nothing to tell it from a quiet stage
    code, out, err = run(capsys, *command, "--db", str(db))
    assert code == 0
    assert "in the last 7 day(s) only for docs/write" in out + err, out + err


# --------------------------------------------------------------------------- output


def test_routing_stats_warns_on_stderr_with_grammar(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    code, out, err = run(capsys, "routing", "stats", "docs", "--db", str(db))
    assert code == 0
    assert "warning" not in out
    # each warning names the workflow (and stage) its table is of: read apart from the
    # tables (2> file), one of several workflows' would otherwise be anyone's
    assert "warning: gpt-4o-mini in docs: only 1 call: the success rate" in err
    assert "1 calls" not in err
    code, _, err = run(capsys, "routing", "stats", "--stage", "write", "--db", str(db))
    assert code == 0
    assert "warning: gpt-4o-mini in docs/write: only 1 call: the success rate" in err


def test_telemetry_summary_says_rejections_are_left_out(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    code, out, _ = run(capsys, "telemetry", "summary", "--db", str(db))
    assert code == 0
    assert "total: 31 calls" in out  # 4 rejections and 2 not sent are not counted ...
    assert "breaker rejections" in out and "not-sent" in out  # ... and the table says so
    code, out, _ = run(capsys, "telemetry", "summary", "--db", str(db), "--json")
    data = json.loads(out)
    assert sum(m["calls"] for m in data["models"]) == 31
    assert "rejections" in data["counted"]
    code, out, _ = run(capsys, "telemetry", "export", "--format", "jsonl", "--db", str(db))
    outcomes = [json.loads(line)["outcome"] for line in out.splitlines()]
    assert len(outcomes) == 37 and outcomes.count("not_sent") == 2  # export has every one


def test_telemetry_summary_lists_no_model_of_no_calls_and_no_cost(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "odd.db"
    records = [
        _record("claude-haiku-4-5", "anthropic", Outcome.SUCCESS, 0),
        _record("gpt-4o", "openai", Outcome.REJECTED, 1),  # the breaker refused it
        _record("gpt-4o-mini", "openai", Outcome.CACHE_HIT, 2),
        _record("gpt-4o-mini", "openai", Outcome.NOT_SENT, 3),
        attrs.evolve(
            _record("claude-sonnet-4-5", "anthropic", Outcome.CANCELLED, 4), cost_usd=0.002
        ),
    ]

    async def fill() -> None:
        async with telemetry_from_url(f"sqlite:///{path}") as telemetry:
            await telemetry.record_many(records)

    anyio.run(fill)
    code, out, _ = run(capsys, "telemetry", "summary", "--db", str(path), "--json")
    assert code == 0
    rows = {m["model"]: (m["calls"], m["total_cost_usd"]) for m in json.loads(out)["models"]}
    # a cancelled call is billed: its cost is shown though it is no call the router counts
    assert rows == {"claude-haiku-4-5": (1, 0.0009), "claude-sonnet-4-5": (0, 0.002)}
    code, out, _ = run(capsys, "telemetry", "summary", "--db", str(path))
    assert "gpt-4o-mini" not in out and "gpt-4o " not in out and "claude-sonnet-4-5" in out


def test_routing_stats_counts_one_call_in_the_singular(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "one.db"

    async def fill() -> None:
        async with telemetry_from_url(f"sqlite:///{path}") as telemetry:
            await telemetry.record(_record("gpt-4o-mini", "openai", Outcome.SUCCESS, 0))

    anyio.run(fill)
    code, out, _ = run(capsys, "routing", "stats", "--db", str(path))
    assert code == 0 and "docs / all stages: 1 call in 7 day(s)" in out, out


def test_verbose_shows_the_librarys_logs_only_when_asked(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    args = ("routing", "best", "docs", "write", "--db", str(db))
    code, _, err = run(capsys, *args)
    assert code == 0 and "empathy_models.router" not in err
    code, _, err = run(capsys, "--log-level", "debug", *args)
    assert code == 0 and "DEBUG empathy_models.router: routing docs/write ->" in err
    code, _, err = run(capsys, "-v", *args)
    assert code == 0 and "empathy_models.router:" in err
    assert "DEBUG empathy_models" not in err
    code, _, err = run(capsys, *args)
    assert "empathy_models.router" not in err  # the handler went away with the command
