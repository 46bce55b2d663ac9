"""``empathy-models budget status|set|reset`` against a SQLite quota store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio

from empathy_models import Budget
from empathy_models.limits import quota_store_from_url
from tests._cli import run_cli


def _charge(db: Path, key: str, reserve: int, cost: int) -> None:
    budget = Budget(limit_usd=1.0)

    async def body() -> None:
        ws, we = budget.window_bounds(1_800_000_000.0)
        async with quota_store_from_url(f"sqlite:///{db}") as store:
            await store.reserve(key, window_start=ws, window_end=we, amount=reserve, limit=10**9)
            await store.settle(key, window_start=ws, window_end=we, held=reserve, actual=cost)

    anyio.run(body)


def test_budget_status_set_and_reset(tmp_path: Path) -> None:
    home, db = tmp_path / "home", tmp_path / "quota.db"
    _charge(db, "global/day", 500_000_000, 100_000_000)
    _charge(db, "user_id=bob/day", 20_000_000, 10_000_000)
    _charge(db, "user_id=ann/day", 20_000_000, 30_000_000)  # cost more than it reserved
    status = run_cli(home, "budget", "status", "--db", str(db), "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["key"]: r for r in json.loads(status.stdout)["budgets"]}
    assert rows["global/day"]["spent_usd"] == 0.1
    assert rows["global/day"]["remaining_usd"] == 0.9
    assert rows["global/day"]["resets_at"] == "2027-01-16T00:00:00+00:00"
    assert rows["user_id=bob/day"]["released_usd"] == 0.01
    assert rows["user_id=bob/day"]["overrun_usd"] == 0
    assert rows["user_id=ann/day"]["overrun_usd"] == 0.01

    assert (
        run_cli(home, "budget", "set", "global/day", "--limit", "2.5", "--db", str(db)).returncode
        == 0
    )
    table = run_cli(home, "budget", "status", "global/day", "--db", str(db)).stdout
    assert "global/day *" in table and "$2.5000" in table and "$2.4000" in table
    assert "user_id=bob" not in table

    reset = run_cli(home, "budget", "reset", "global/day", "--db", str(db))
    assert reset.returncode == 0 and "1 window" in reset.stdout
    again = run_cli(home, "budget", "reset", "global/day", "--db", str(db))
    assert again.returncode == 0 and "already zero" in again.stdout  # the limit set stays
    cleared = run_cli(home, "budget", "set", "global/day", "--clear", "--db", str(db))
    assert cleared.returncode == 0
    gone = run_cli(home, "budget", "reset", "global/day", "--db", str(db))
    assert gone.returncode == 1 and "nothing was reset" in gone.stderr
    missing = run_cli(home, "budget", "status", "global/day", "--db", str(db))
    assert missing.returncode == 1 and "no budget 'global/day'" in missing.stderr


def test_a_budget_with_a_limit_set_and_nothing_spent_is_listed_in_json_as_in_the_table(
    tmp_path: Path,
) -> None:
    home, db = tmp_path / "home", tmp_path / "quota.db"
    _charge(db, "global/day", 500_000_000, 100_000_000)
    limit = run_cli(home, "budget", "set", "workflow=docs/day", "--limit", "5", "--db", str(db))
    assert limit.returncode == 0, limit.stderr
    table = run_cli(home, "budget", "status", "--db", str(db)).stdout
    assert "workflow=docs/day *" in table and "$5.0000" in table
    for key in (), ("workflow=docs/day",):
        status = run_cli(home, "budget", "status", *key, "--db", str(db), "--json")
        assert status.returncode == 0, status.stderr
        rows = {r["key"]: r for r in json.loads(status.stdout)["budgets"]}
        assert set(rows) == ({"workflow=docs/day"} if key else {"global/day", "workflow=docs/day"})
        unspent = rows["workflow=docs/day"]
        assert (unspent["limit_usd"], unspent["spent_usd"], unspent["remaining_usd"]) == (5, 0, 5)
        assert unspent["limit_overridden"] and unspent["calls"] == 0
        assert unspent["window_start"] is None and unspent["resets_at"] is None


def test_budget_set_refuses_a_bad_limit(tmp_path: Path) -> None:
    db = tmp_path / "quota.db"
    _charge(db, "global/day", 1, 1)
    bad = run_cli(tmp_path, "budget", "set", "global/day", "--limit", "-3", "--db", str(db))
    assert bad.returncode == 2 and "dollars" in bad.stderr and "Traceback" not in bad.stderr
    # a limit past the largest a store counts exactly: the message says what the most is
    big = run_cli(tmp_path, "budget", "set", "global/day", "--limit", "10000000", "--db", str(db))
    assert big.returncode == 2 and "at most $9,007,199" in big.stderr, big.stderr
    for command in (["set", " ", "--limit", "5"], ["reset", ""]):
        empty = run_cli(tmp_path, "budget", *command, "--db", str(db))
        assert empty.returncode == 2 and "expected a budget" in empty.stderr


def test_budget_status_reads_a_database_without_budgets_and_changes_nothing(
    tmp_path: Path,
) -> None:
    from empathy_models.backends.sqlite import SQLiteStateStore

    db = tmp_path / "state.db"

    async def create() -> None:
        async with SQLiteStateStore(db) as store:
            await store.snapshot_all()

    anyio.run(create)
    before = db.read_bytes()
    status = run_cli(tmp_path, "budget", "status", "--db", str(db), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {"budgets": [], "overrides": {}}
    assert db.read_bytes() == before  # opened read-only: no quota table was created
    missing = run_cli(tmp_path, "budget", "status", "--db", str(tmp_path / "none.db"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_budget_status_shows_a_window_no_date_can_hold(tmp_path: Path) -> None:
    # a window ending past year 9999 (written before windows were limited to 100 years)
    db = tmp_path / "quota.db"

    async def body() -> None:
        async with quota_store_from_url(f"sqlite:///{db}") as store:
            await store.reserve("far/1e+12s", window_start=0.0, window_end=1e12, amount=5, limit=9)

    anyio.run(body)
    table = run_cli(tmp_path, "budget", "status", "--db", str(db))
    assert table.returncode == 0, table.stderr
    assert "far/1e+12s" in table.stdout and "after 9999-12-31" in table.stdout
    status = run_cli(tmp_path, "budget", "status", "--db", str(db), "--json")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)["budgets"]
    assert row["window_start"] == "1970-01-01T00:00:00+00:00" and row["resets_at"] is None


def test_budget_keys_are_checked_and_set_reset_status_agree(tmp_path: Path) -> None:
    home, db = tmp_path / "home", tmp_path / "quota.db"
    _charge(db, "user_id=bob/day", 20_000_000, 10_000_000)
    for bad in ("globl/day", "global/dya", "user=bob/day", "global/0s", "global/2.592e+06s"):
        for command in (("set", bad, "--limit", "5"), ("reset", bad), ("status", bad)):
            result = run_cli(home, "budget", *command, "--db", str(db))
            assert result.returncode == 1, (command, result.stdout)
            assert "is not a budget key" in result.stderr and "global/day" in result.stderr
    overrides = json.loads(run_cli(home, "budget", "status", "--db", str(db), "--json").stdout)
    assert overrides["overrides"] == {}  # nothing was set

    assert (
        run_cli(home, "budget", "set", "global/day", "--limit", "5", "--db", str(db)).returncode
        == 0
    )
    assert run_cli(home, "budget", "set", "team-a", "--limit", "7", "--db", str(db)).returncode == 0
    month = run_cli(home, "budget", "set", "global/2592000s", "--limit", "9", "--db", str(db))
    assert month.returncode == 0, month.stderr  # a 30-day Budget's key, whole seconds
    table = run_cli(home, "budget", "status", "--db", str(db)).stdout
    assert "global/day *" in table and "$5.0000" in table and "team-a *" in table, table
    one = run_cli(home, "budget", "status", "global/day", "--db", str(db))
    assert one.returncode == 0 and "global/day *" in one.stdout, one.stderr
    reset = run_cli(home, "budget", "reset", "global/day", "--db", str(db))
    assert reset.returncode == 0, reset.stderr
    assert "already zero" in reset.stdout and "$5.0000" in reset.stdout
    unknown = run_cli(home, "budget", "reset", "global/hour", "--db", str(db))
    assert unknown.returncode == 1 and "no budget 'global/hour'" in unknown.stderr


def test_an_odd_budget_key_is_shown_quoted_and_typed_back_the_way_it_is_shown(
    tmp_path: Path,
) -> None:
    # a named budget whose name ends in a space, one whose user id holds a line break
    home, db = tmp_path / "home", tmp_path / "quota.db"
    _charge(db, "nightly ", 20_000_000, 10_000_000)
    _charge(db, "user_id=bob\n/day", 20_000_000, 10_000_000)
    table = run_cli(home, "budget", "status", "--db", str(db))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any(line.startswith("'nightly '  ") for line in lines), table.stdout
    assert any(line.startswith("'user_id=bob\\n/day'  ") for line in lines), table.stdout
    # what the table shows is what the commands take
    one = run_cli(home, "budget", "status", "'nightly '", "--db", str(db), "--json")
    assert one.returncode == 0, one.stderr
    assert [r["key"] for r in json.loads(one.stdout)["budgets"]] == ["nightly "]
    set_ = run_cli(home, "budget", "set", "'nightly '", "--limit", "3", "--db", str(db))
    assert set_.returncode == 0, set_.stderr
    shown = run_cli(home, "budget", "status", "'nightly '", "--db", str(db)).stdout
    assert "'nightly ' *" in shown and "$3.0000" in shown
    reset = run_cli(home, "budget", "reset", "'user_id=bob\\n/day'", "--db", str(db))
    assert reset.returncode == 0 and "1 window" in reset.stdout, reset.stderr


def test_budget_status_says_what_was_held_for_calls_whose_hold_lapsed_unsettled(
    tmp_path: Path,
) -> None:
    # a hold that lapsed before its call settled it (a worker killed or cut off, or its
    # settlement lost, which only that worker's `executor.limiter.unsettled` counts):
    # the table said nothing of it (only --json had `lapsed_usd`), so a spend lower
    # than the calls made had no explanation where one looks
    home, db = tmp_path / "home", tmp_path / "quota.db"
    _charge(db, "global/day", 500_000_000, 100_000_000)
    budget = Budget(limit_usd=1.0)

    async def lapsing() -> None:
        now = time.time()
        ws, we = budget.window_bounds(now)
        async with quota_store_from_url(f"sqlite:///{db}") as store:
            await store.reserve(
                "user_id=bob/day",
                window_start=ws,
                window_end=we,
                amount=400_000_000,
                limit=10**9,
                lapses_at=now - 120,
            )

    anyio.run(lapsing)
    status = run_cli(home, "budget", "status", "--db", str(db))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    notes = [line for line in lines if "lapsed" in line and "$0.4000" in line]
    assert len(notes) == 1, status.stdout
    assert "user_id=bob/day" in notes[0]
    assert "unsettled" in status.stdout  # where the worker that lost it counts it
    assert not any("global/day" in line and "lapsed" in line for line in lines)
    rows = json.loads(run_cli(home, "budget", "status", "--db", str(db), "--json").stdout)
    assert {r["key"]: r["lapsed_usd"] for r in rows["budgets"]} == {
        "global/day": 0,
        "user_id=bob/day": 0.4,
    }
