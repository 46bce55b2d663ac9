"""
The figures the CLI prints say what the data says: a success rate short of 100% never
reads as 100.0% (nor one above 0% as 0.0%), a cost or a budget's spend that is not zero
never reads as $0, and times say their time zone.  Real SQLite files written through the
public API, the CLI as users run it.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import attrs

from empathy_models import (
    Budget,
    CircuitState,
    LLMCallRecord,
    Outcome,
    state_store_from_url,
)
from empathy_models.limits import quota_store_from_url
from tests.test_cli_odd_values import _store, ok


def _call(model: str, *, ok: bool = True, cost_usd: float = 0.001) -> LLMCallRecord:
    return LLMCallRecord(
        provider="openai",
        model=model,
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        workflow="wf",
        stage="st",
        latency_ms=20.0,
        cost_usd=cost_usd,
        input_tokens=10,
        output_tokens=10,
        timestamp=datetime.now(UTC) - timedelta(minutes=5),
    )


def _row(out: str, model: str) -> list[str]:
    """The cells (split on blanks) of the first table row that names ``model``."""
    return next(line.split() for line in out.splitlines() if model in line.split())


# --------------------------------------------------------------------------- 1. rates


def test_a_success_rate_short_of_100_percent_never_reads_as_100(tmp_path: Path) -> None:
    # 1999 successes in 2000 calls (99.95%), 2999 in 3000 (99.97%); one perfect model
    db = _store(
        tmp_path / "t.db",
        [_call("gpt-4o", ok=i > 0) for i in range(2000)]
        + [_call("gpt-4o-mini", ok=i > 0) for i in range(3000)]
        + [_call("gpt-4.1", ok=True) for _ in range(50)],
    )
    summary = ok(tmp_path, "telemetry", "summary", "--db", str(db))
    stats = ok(tmp_path, "routing", "stats", "wf", "--db", str(db))
    for out in (summary, stats):
        assert "99.95%" in _row(out, "gpt-4o"), out
        assert "99.97%" in _row(out, "gpt-4o-mini"), out
        assert "100.0%" in _row(out, "gpt-4.1"), out  # exactly 100% stays as it was
        # an upper bound short of 1 is not 100% either
        assert not any(cell.endswith("-100.0%") for cell in _row(out, "gpt-4o")), out
    rate = json.loads(ok(tmp_path, "telemetry", "summary", "--db", str(db), "--json"))
    assert {m["model"]: m["success_rate"] for m in rate["models"]}["gpt-4o"] == 0.9995


def test_a_rate_keeps_one_decimal_when_that_is_not_misleading() -> None:
    from empathy_models.cli._common import fmt_pct

    assert fmt_pct(0.9876) == "98.8%"
    assert fmt_pct(1.0) == "100.0%"
    assert fmt_pct(0.0) == "0.0%"
    assert fmt_pct(0.9995) == "99.95%"
    assert fmt_pct(0.99999) == "99.999%"
    assert fmt_pct(1 - 1e-9) == "99.9999%"  # never 100%, however close
    assert fmt_pct(1 - 2e-16) == "100.0%"  # but for float noise
    assert fmt_pct(1 / 3000) == "0.03%"
    assert fmt_pct(1e-9) == "1e-07%"  # never 0%, however small
    assert fmt_pct(-0.0004) == "-0.04%"


# --------------------------------------------------------------------------- 2. money


def test_a_cost_too_small_for_six_decimals_is_not_shown_as_zero(tmp_path: Path) -> None:
    db = _store(tmp_path / "t.db", [_call("tiny-model", cost_usd=4e-7) for _ in range(3)])
    summary = ok(tmp_path, "telemetry", "summary", "--db", str(db))
    assert _row(summary, "tiny-model")[-1] == "$0.0000012", summary
    assert "total: 3 calls, $0.0000012" in summary
    stats = ok(tmp_path, "routing", "stats", "wf", "--db", str(db))
    assert _row(stats, "tiny-model")[-1] == "$0.00000040", stats


def test_small_amounts_keep_their_digits() -> None:
    from empathy_models.cli._common import fmt_usd

    assert fmt_usd(4e-5) == "$0.000040"
    assert fmt_usd(0.0015) == "$0.001500"
    assert fmt_usd(4e-7) == "$0.00000040"  # two significant digits, as $0.000040 has
    assert fmt_usd(-4e-7) == "$-0.00000040"
    assert fmt_usd(1e-15) == "$1e-15"
    assert fmt_usd(0.0) == "$0.0000"


def test_budget_status_shows_a_small_spend_and_hold(tmp_path: Path) -> None:
    db = tmp_path / "quota.db"
    budget = Budget(limit_usd=1.0)

    async def body() -> None:
        ws, we = budget.window_bounds(time.time())
        async with quota_store_from_url(f"sqlite:///{db}") as store:
            # a call that cost $0.00004, and one in flight holding $0.000004
            await store.reserve(
                "global/day", window_start=ws, window_end=we, amount=100_000, limit=10**9
            )
            await store.settle(
                "global/day", window_start=ws, window_end=we, held=100_000, actual=40_000
            )
            await store.reserve(
                "user_id=bob/day", window_start=ws, window_end=we, amount=4_000, limit=10**9
            )

    anyio.run(body)
    out = ok(tmp_path, "budget", "status", "--db", str(db))
    spent = _row(out, "global/day")
    assert spent[1:4] == ["$1.0000", "$0.000040", "$0.0000"], out
    held = _row(out, "user_id=bob/day")
    assert held[1:4] == ["$1.0000", "$0.0000", "$0.0000040"], out


# --------------------------------------------------------------------------- 3. times


def test_breaker_times_say_they_are_utc(tmp_path: Path) -> None:
    db = tmp_path / "state.db"

    async def body() -> None:
        async with state_store_from_url(f"sqlite:///{db}") as store:
            await store.force("openai", CircuitState.FORCED_OPEN, reason="test", for_seconds=60)

    anyio.run(body)
    out = ok(tmp_path, "breaker", "status", "--db", str(db))
    header = out.splitlines()[0]
    assert "opened at (UTC)" in header and "open until (UTC)" in header, out


# --------------------------------------------------------------------------- 4. latencies


def test_the_summary_says_its_latencies_are_those_of_successful_calls(tmp_path: Path) -> None:
    slow_failure = attrs.evolve(_call("gpt-4o", ok=False), latency_ms=5000.0)
    db = _store(
        tmp_path / "t.db",
        [_call("gpt-4o") for _ in range(10)] + [attrs.evolve(slow_failure) for _ in range(10)],
    )
    out = ok(tmp_path, "telemetry", "summary", "--db", str(db))
    assert _row(out, "gpt-4o")[6:8] == ["20.0", "20.0"], out  # the failures' 5 s left out
    assert "Latencies (p50, p95, TTFT) are those of the successful calls" in out


def test_the_demo_says_its_latencies_are_those_of_successful_calls(tmp_path: Path) -> None:
    out = ok(tmp_path, "demo", "--calls", "60")
    assert "attempts include failures, latencies are of the successful ones" in out
    assert "TTFT p50 ms" in out  # every latency header has its unit
