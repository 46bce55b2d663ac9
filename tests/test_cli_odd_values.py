"""
What the CLI prints for odd recorded values: huge (finite) costs and latencies stay
readable while normal ones print as always, breaker keys and names that blank space or
invisible characters would make ambiguous are quoted (and typed back as shown), and
calls stamped after now (a writer's clock ahead) are counted by every command, which
says so.  Real SQLite files written through the public API, the CLI as users run it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import attrs
import pytest

from empathy_models import (
    CircuitState,
    LLMCallRecord,
    Outcome,
    state_store_from_url,
    telemetry_from_url,
)
from empathy_models.abc import force_for
from empathy_models.cli._common import fmt_ms, fmt_pct, fmt_usd
from tests._cli import run_cli

MODEL = "gpt-4o-mini"


def _call(
    workflow: str | None,
    stage: str | None,
    ts: datetime,
    *,
    ok: bool = True,
    latency_ms: float = 12.0,
    cost_usd: float = 0.001,
) -> LLMCallRecord:
    return LLMCallRecord(
        provider="openai",
        model=MODEL,
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        workflow=workflow,
        stage=stage,
        latency_ms=latency_ms,
        cost_usd=cost_usd,
        input_tokens=10,
        output_tokens=10,
        timestamp=ts,
    )


def _store(path: Path, records: Sequence[LLMCallRecord]) -> Path:
    async def body() -> None:
        async with telemetry_from_url(f"sqlite:///{path}") as telemetry:
            await telemetry.record_many(list(records))

    anyio.run(body)
    return path


def ok(home: Path, *args: str) -> str:
    result = run_cli(home, *args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def _rows(out: str, first: str) -> list[list[str]]:
    """The table rows (split on blanks) of the table whose header starts with ``first``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first)) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith(("total:", "note:", "window:")):
            break
        rows.append(line.split())
    return rows


# --------------------------------------------------------------------------- 1. huge values


@pytest.fixture
def huge_db(tmp_path: Path) -> Path:
    """20 calls of $1e300 taking 1e300 ms, and 20 ordinary ones, five minutes ago."""
    ts = datetime.now(UTC) - timedelta(minutes=5)
    return _store(
        tmp_path / "huge.db",
        [_call("big", "s", ts, latency_ms=1e300, cost_usd=1e300) for _ in range(20)]
        + [_call("small", "s", ts) for _ in range(20)],
    )


def test_huge_costs_and_latencies_print_short_in_the_summary(tmp_path: Path, huge_db: Path) -> None:
    out = ok(tmp_path, "telemetry", "summary", "--db", str(huge_db))
    table = out.split("\nnote:")[0]
    assert table.splitlines()[1:] == [
        "workflow  stage  model        calls  success  95% bounds    p50 ms  p95 ms     cost",
        "--------  -----  -----------  -----  -------  ------------  ------  ------  -------",
        "big       s      gpt-4o-mini     20   100.0%  83.9%-100.0%  1e+300  1e+300  $2e+301",
        "small     s      gpt-4o-mini     20   100.0%  83.9%-100.0%    12.0    12.0  $0.0200",
        "total: 40 calls, $2e+301",
    ]


def test_huge_costs_and_latencies_print_short_in_routing_stats(
    tmp_path: Path, huge_db: Path
) -> None:
    out = ok(tmp_path, "routing", "stats", "--db", str(huge_db))
    assert "big / all stages: 20 calls in 7 day(s), success 100.0%, avg cost $1e+300" in out
    big, small = out.split("\n\n")
    assert _rows(big, "model") == [
        [MODEL, "cheap", "20", "100.0%", "83.9%-100.0%", "1e+300", "1e+300", "$1e+300"]
    ]
    assert _rows(small, "model") == [
        [MODEL, "cheap", "20", "100.0%", "83.9%-100.0%", "12.0", "12.0", "$0.001000"]
    ]
    assert max(len(line) for line in out.splitlines()) < 100, out


def test_huge_costs_print_short_in_whatif(tmp_path: Path, huge_db: Path) -> None:
    args = ("--db", str(huge_db), "--replicates", "3", "--requests", "20")
    out = ok(tmp_path, "routing", "whatif", "big", "s", *args)
    assert max(len(line) for line in out.splitlines()) < 200, out
    figures = {" ".join(row[:3]): row for row in _rows(out, "figure")}
    assert figures["cost per request"][-1] == "$1e+300"  # as recorded
    assert figures["cost per 1,000"][-1] == "$1e+303"
    assert figures["p95 latency ms"][-3:-1] == ["1e+300", "(fit"]
    (traffic,) = _rows(out, "model")
    assert traffic[-1] == "$1e+300"
    # the ordinary stage prints as it always has
    small = ok(tmp_path, "routing", "whatif", "small", "s", *args)
    assert "cost per request       $0.001" in small and "$1.0000" in small


def test_whatif_takes_the_largest_latencies_a_float_holds(tmp_path: Path) -> None:
    ts = datetime.now(UTC) - timedelta(minutes=5)
    most = 1.7e308
    db = _store(
        tmp_path / "most.db",
        [_call("wf", "s", ts, ok=i % 3 > 0, latency_ms=most, cost_usd=most) for i in range(40)],
    )
    args = ("--db", str(db), "--replicates", "3", "--requests", "20")
    out = ok(tmp_path, "routing", "whatif", "wf", "s", *args)
    assert max(len(line) for line in out.splitlines()) < 400, out
    figures = {" ".join(row[:3]): row for row in _rows(out, "figure")}
    assert figures["p95 latency ms"][-3] == "1.7e+308"  # as recorded
    assert "its recorded p95 latency (1.7e+308 ms) is 2.1x its log-normal fit's" in out


def test_whatif_checks_huge_costs_off_policy_and_prints_valid_json(tmp_path: Path) -> None:
    """
    Calls of $1e300 and of the largest float, recorded by a router (with their
    selection probability): the off-policy estimate over them is a number, in the
    table and in JSON that a strict parser reads (it squared a $1e300 deviation before:
    OverflowError, a traceback instead of a report).
    """
    ts = datetime.now(UTC) - timedelta(minutes=5)
    calls = [
        attrs.evolve(
            _call("wf", "s", ts, cost_usd=1.7e308 if i == 0 else 1e300), routing_propensity=1.0
        )
        for i in range(40)
    ]
    db = _store(tmp_path / "ipw.db", calls)
    args = ("routing", "whatif", "wf", "s", "--db", str(db), "--replicates", "3")
    out = ok(tmp_path, *args, "--requests", "20")
    assert "off-policy check (inverse propensity weighting over 40 recorded calls" in out
    assert "cost per request $1e+300 ($" in out

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    report = json.loads(ok(tmp_path, *args, "--requests", "20", "--json"), parse_constant=refuse)
    ipw = report["ipw"]["cost_per_request"]
    assert ipw["estimate"] == pytest.approx(1e300)  # each cost counts for at most 1e300
    assert ipw["low"] <= ipw["estimate"] <= ipw["high"] < 1e301


def test_numbers_keep_their_format_up_to_a_billion() -> None:
    assert fmt_usd(0.0015) == "$0.001500"
    assert fmt_usd(0.0) == "$0.0000"
    assert fmt_usd(123_456_789.5) == "$123,456,789.5000"
    assert fmt_usd(999_999_999.99) == "$999,999,999.9900"
    assert fmt_usd(1e9) == "$1e+09"
    assert fmt_usd(1.7976931348623157e308) == "$1.798e+308"
    assert fmt_ms(999_999_999.9) == "999999999.9"
    assert fmt_ms(12.34) == "12.3"
    assert fmt_ms(1.5e9) == "1.5e+09"
    assert fmt_pct(0.9876) == "98.8%"
    assert fmt_pct(-2e300) == "-2e+302%"
    assert fmt_usd(float("inf")) == "$inf"


def test_a_breaker_forced_open_past_year_9999_prints_as_such(tmp_path: Path) -> None:
    """A key forced open through the SDK for 1e300 seconds (an OverflowError traceback before)."""
    db = tmp_path / "far.db"

    async def body() -> None:
        async with state_store_from_url(f"sqlite:///{db}") as store:
            await force_for(store, "openai", CircuitState.FORCED_OPEN, for_seconds=1e300)

    anyio.run(body)
    out = ok(tmp_path, "breaker", "status", "--db", str(db))
    (row,) = _rows(out, "key")
    assert row[:2] == ["openai", "forced_open"] and "after 9999-12-31" in " ".join(row)
    data = json.loads(ok(tmp_path, "breaker", "status", "--db", str(db), "--json"))
    assert data["breakers"][0]["open_until"].startswith("9999-12-31")


# --------------------------------------------------------------------------- 2. breaker keys

KEYS = {
    "openai": "openai",
    "openai ": "'openai '",
    " openai": "' openai'",
    "open\u200bai": "'open\\u200bai'",
    "open\u00a0ai": "'open\\xa0ai'",
    "open\tai": "'open\\tai'",
    "'quoted'": "\"'quoted'\"",
    "back\\slash": "'back\\\\slash'",
}
"""Each key the store holds and how the breaker table shows it."""


def _forced(db: Path, keys: Sequence[str]) -> None:
    async def body() -> None:
        async with state_store_from_url(f"sqlite:///{db}") as store:
            for key in keys:
                await store.force(key, CircuitState.FORCED_OPEN, reason="test")

    anyio.run(body)


def _states(db: Path) -> dict[str, str]:
    async def body() -> dict[str, str]:
        async with state_store_from_url(f"sqlite:///{db}") as store:
            return {s.key: s.state.value for s in await store.snapshot_all()}

    return anyio.run(body)


def test_breaker_keys_are_shown_unambiguously(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    _forced(db, list(KEYS))
    out = ok(tmp_path, "breaker", "status", "--db", str(db))
    shown = [line.split("  ")[0].rstrip() for line in out.splitlines()[2:-1]]
    assert sorted(shown) == sorted(KEYS.values()), out


@pytest.mark.parametrize("key", list(KEYS))
def test_a_breaker_key_typed_as_shown_is_that_key(tmp_path: Path, key: str) -> None:
    db = tmp_path / "state.db"
    _forced(db, list(KEYS))
    typed = KEYS[key]
    status = json.loads(ok(tmp_path, "breaker", "status", typed, "--db", str(db), "--json"))
    assert [b["key"] for b in status["breakers"]] == [key]
    reset = json.loads(ok(tmp_path, "breaker", "reset", typed, "--db", str(db), "--json"))
    assert reset["reset"] == key
    assert _states(db) == {k: "closed" if k == key else "forced_open" for k in KEYS}
    opened = ok(tmp_path, "breaker", "open", typed, "--db", str(db))
    assert opened.splitlines()[0] == f"Forced {typed} open until reset"
    assert _states(db)[key] == "forced_open"


def test_a_key_not_held_is_listed_as_shown(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    _forced(db, ["openai", "openai "])
    result = run_cli(tmp_path, "breaker", "reset", "anthropic", "--db", str(db))
    assert result.returncode == 1
    assert "(keys held: openai, 'openai ')" in result.stderr, result.stderr


def test_forcing_a_key_open_escapes_it_in_the_message(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    _forced(db, ["openai"])
    out = ok(tmp_path, "breaker", "open", "\x1b[2Jkey", "--db", str(db))
    assert "\x1b" not in out and out.startswith("Forced '\\x1b[2Jkey' open until reset")


# --------------------------------------------------------------------------- 3. stamped ahead


@pytest.fixture
def ahead_db(tmp_path: Path) -> Path:
    """20 successes five minutes ago, 10 failures stamped two hours from now."""
    now = datetime.now(UTC)
    return _store(
        tmp_path / "ahead.db",
        [_call("wf", "s", now - timedelta(minutes=5)) for _ in range(20)]
        + [_call("wf", "s", now + timedelta(hours=2), ok=False) for _ in range(10)],
    )


AHEAD_NOTE = (
    "note: 10 calls are stamped after now (the newest 2:00:00 ahead): a clock that runs "
    "ahead wrote them; they are counted, as the router counts them"
)


def _ahead_note(out: str) -> str:
    (line,) = [line for line in out.splitlines() if "are stamped after now" in line]
    # the newest is "2:00:00 ahead" give or take the seconds the test took
    return line.replace(line[line.index("newest ") + 7 : line.index(" ahead")], "2:00:00")


def test_every_command_counts_calls_stamped_after_now_and_says_so(
    tmp_path: Path, ahead_db: Path
) -> None:
    db = ("--db", str(ahead_db))
    summary = ok(tmp_path, "telemetry", "summary", *db)
    assert _rows(summary, "workflow")[0][:5] == ["wf", "s", MODEL, "30", "66.7%"]
    stats = ok(tmp_path, "routing", "stats", *db)
    assert "wf / all stages: 30 calls" in stats
    whatif = ok(tmp_path, "routing", "whatif", "wf", "s", *db, "--replicates", "3")
    assert "30 recorded calls" in whatif, whatif
    for out in (summary, stats, whatif):
        assert _ahead_note(out) == AHEAD_NOTE, out


def test_json_says_how_many_calls_are_stamped_after_now(tmp_path: Path, ahead_db: Path) -> None:
    db = ("--db", str(ahead_db), "--json")
    summary = json.loads(ok(tmp_path, "telemetry", "summary", *db))
    (stats,) = json.loads(ok(tmp_path, "routing", "stats", *db))["workflows"]
    whatif = json.loads(ok(tmp_path, "routing", "whatif", "wf", "s", *db, "--replicates", "3"))
    assert whatif["recorded"]["calls"] == stats["total_calls"] == 30
    assert summary["models"][0]["calls"] == 30
    for data in (summary, stats, whatif):
        assert data["stamped_after_now"]["calls"] == 10
        newest = datetime.fromisoformat(data["stamped_after_now"]["newest"])
        assert timedelta(hours=1) < newest - datetime.now(UTC) <= timedelta(hours=2)


def test_whatif_names_a_call_stamped_centuries_ahead_not_a_days_it_was_not_given(
    tmp_path: Path,
) -> None:
    # the window reaches up to the newest call stamped after now: 150 years ahead, it
    # would span more than the 36,500 days a window can
    now = datetime.now(UTC)
    far = now.replace(year=now.year + 150)
    db = _store(
        tmp_path / "far.db",
        [_call("wf", "s", now - timedelta(minutes=5)) for _ in range(20)] + [_call("wf", "s", far)],
    )
    args = ("routing", "whatif", "wf", "s", "--db", str(db), "--days", "7", "--replicates", "2")
    table = run_cli(tmp_path, *args)
    assert table.returncode == 1 and "Traceback" not in table.stderr
    assert "days must be" not in table.stderr, table.stderr
    assert "1 call of wf/s is stamped after now" in table.stderr
    assert f"the newest at {far.isoformat()}" in table.stderr
    data = json.loads(run_cli(tmp_path, *args, "--json").stdout)
    assert data["error"]["exit_code"] == 1
    assert "is stamped after now" in data["error"]["message"]


def test_whatif_names_a_call_stamped_at_the_last_instant_a_date_holds(tmp_path: Path) -> None:
    """A call stamped 9999-12-31 23:59:59.999999: refused as above (OverflowError before)."""
    last = datetime.max.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    recent = [_call("wf", "s", now - timedelta(minutes=5)) for _ in range(20)]
    db = _store(tmp_path / "last.db", [*recent, _call("wf", "s", last)])
    args = ("routing", "whatif", "wf", "s", "--db", str(db), "--replicates", "2")
    result = run_cli(tmp_path, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "1 call of wf/s is stamped after now" in result.stderr
    assert f"the newest at {last.isoformat()}" in result.stderr


def test_nothing_is_said_when_no_call_is_stamped_after_now(tmp_path: Path, huge_db: Path) -> None:
    out = ok(tmp_path, "telemetry", "summary", "--db", str(huge_db))
    assert "are stamped after now" not in out and "is stamped after now" not in out
    data = json.loads(ok(tmp_path, "telemetry", "summary", "--db", str(huge_db), "--json"))
    assert data["stamped_after_now"] == {"calls": 0, "newest": None}


# --------------------------------------------------------------------------- 4. names


@pytest.fixture
def names_db(tmp_path: Path) -> Path:
    ts = datetime.now(UTC) - timedelta(minutes=5)
    names = [None, " ", "(none)", "all", "wf "]
    return _store(tmp_path / "names.db", [_call(n, n, ts) for n in names for _ in range(3)])


def test_blank_and_lookalike_names_are_shown_apart(tmp_path: Path, names_db: Path) -> None:
    out = ok(tmp_path, "telemetry", "summary", "--db", str(names_db))
    rows = out.splitlines()[3:8]
    assert [row[: 20 + len(MODEL)] for row in rows] == [
        f"(none)    (none)    {MODEL}",
        f"' '       ' '       {MODEL}",
        f"'(none)'  '(none)'  {MODEL}",
        f"all       all       {MODEL}",
        f"'wf '     'wf '     {MODEL}",
    ], out


def test_names_typed_as_shown_find_their_calls(tmp_path: Path, names_db: Path) -> None:
    db = ("--db", str(names_db), "--json")
    for typed, name in (("' '", " "), ("'(none)'", "(none)"), ("'wf '", "wf "), ("all", "all")):
        data = json.loads(ok(tmp_path, "telemetry", "summary", "--workflow", typed, *db))
        assert [(r["workflow"], r["calls"]) for r in data["models"]] == [(name, 3)], typed
        (stats,) = json.loads(ok(tmp_path, "routing", "stats", typed, *db))["workflows"]
        assert (stats["workflow"], stats["total_calls"]) == (name, 3)
    data = json.loads(ok(tmp_path, "telemetry", "summary", "--workflow", "(none)", *db))
    assert [(r["workflow"], r["calls"]) for r in data["models"]] == [(None, 3)]


@pytest.mark.parametrize(
    "command",
    [
        ("budget", "set", "'\\ud800'", "--limit", "5"),
        ("budget", "reset", "'\\ud800'"),
        ("breaker", "open", "'\\ud800'"),
        ("telemetry", "summary", "--workflow", "'\\ud800'"),
        ("routing", "stats", "'\\ud800'"),
    ],
)
def test_a_quoted_name_that_stands_for_no_valid_text_is_a_usage_error(
    tmp_path: Path, names_db: Path, command: tuple[str, ...]
) -> None:
    """
    ``'\\ud800'`` typed as a name stands for a lone surrogate, which no recorded name,
    key or budget can hold (nor UTF-8 encode): a usage error, as an argument that is
    not valid UTF-8 is (before: a UnicodeEncodeError traceback from budget set and
    reset, an empty summary, a library error from the others).
    """
    result = run_cli(tmp_path, *command, "--db", str(names_db))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "lone surrogate" in result.stderr, result.stderr


def test_a_plot_titled_with_a_name_holding_dollar_signs_is_written(tmp_path: Path) -> None:
    """
    ``routing whatif --plot`` titles the plot with the workflow and stage as they are:
    a ``$`` in a name is not read as matplotlib's math (``$\\frac$`` was a
    ParseSyntaxException traceback, after the whole simulation, and no plot).
    """
    pytest.importorskip("matplotlib")
    ts = datetime.now(UTC) - timedelta(minutes=5)
    db = _store(tmp_path / "dollar.db", [_call("price$\\frac$", "s", ts) for _ in range(20)])
    png = tmp_path / "cost.png"
    args = ("--db", str(db), "--replicates", "2", "--requests", "10", "--sweep", "0.9")
    out = ok(tmp_path, "routing", "whatif", "price$\\frac$", "s", *args, "--plot", str(png))
    assert f"written to {png}" in out
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_stage_named_all_is_not_every_stage(tmp_path: Path, names_db: Path) -> None:
    every = ok(tmp_path, "routing", "stats", "all", "--db", str(names_db))
    one = ok(tmp_path, "routing", "stats", "all", "--stage", "all", "--db", str(names_db))
    assert every.splitlines()[0].startswith("all / all stages: 3 calls")
    assert one.splitlines()[0].startswith("all / stage all: 3 calls")
