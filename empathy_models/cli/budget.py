"""``empathy-models budget``: show, set and reset spend budgets in the shared quota store."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from empathy_models import Budget, ConfigurationError
from empathy_models.limits import NANO, SCOPES, BudgetUsage, quota_store_from_url

from ._common import (
    CliError,
    Shown,
    SubParsers,
    add_common,
    db_url,
    emit_json,
    fmt_usd,
    print_table,
    printable,
    read_only,
    refuse_missing_schema,
    run_async,
    shown_name,
    typed_key,
)

__all__ = ["cmd_budget_reset", "cmd_budget_set", "cmd_budget_status", "register"]


def _dollars(text: str) -> float:
    try:
        value = float(text.strip().lstrip("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of dollars, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of dollars >= 0, got {text!r}")
    if value * NANO > 2**53:  # the most a store counts exactly in nano-dollars
        raise argparse.ArgumentTypeError(
            f"expected at most ${math.floor(2**53 / NANO):,} (the largest budget a store "
            f"counts exactly), got {text!r}"
        )
    return value


def _key(text: str) -> str:
    """A budget key as typed: as the tables show it (an odd one quoted, `shown_name`)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a budget, e.g. global/day or user_id=bob/day, got {text!r}"
        )
    return typed_key(text)


_KEY_SHAPES = (
    "budget keys look like global/day, workflow=docs/hour, user_id=bob/month or "
    f"global/3600s (a scope: {', '.join(SCOPES)}; a window: hour, day, month or whole "
    "seconds), or a Budget's own name"
)


def _window_label(text: str) -> bool:
    """True when ``text`` is a window as a `Budget`'s key has it (whole seconds: "600s")."""
    if text in ("hour", "day", "month"):
        return True
    try:
        budget = Budget(limit_usd=0, window=float(text.removesuffix("s")))
    except (ValueError, ConfigurationError):
        return False
    return text.endswith("s") and budget.window_label == text


def key_flaw(key: str) -> str | None:
    """
    Why ``key`` cannot be a budget's key in the store, or None.

    A key with ``/`` or ``=`` must be one a `Budget` without a name makes:
    ``global/<window>`` or ``<scope>=<value>/<window>``; any other text is a name (a
    `Budget` given ``name=``).
    """
    if "/" not in key and "=" not in key:
        return None
    head, _, window = key.rpartition("/")
    if not head or not _window_label(window):
        return f"{window!r} is not a window" if head else "no /window at the end"
    if head == "global":
        return None
    scope, eq, value = head.partition("=")
    if not eq:
        return f"{head!r} is neither global nor scope=value"
    if scope not in SCOPES or scope == "global":
        return f"{scope!r} is not a scope"
    return None if value else f"{scope}= has no value"


def _check_key(key: str, known: Collection[str]) -> None:
    """Refuse a malformed ``key`` the store does not hold (a named budget may be odd)."""
    flaw = key_flaw(key)
    if flaw is not None and key not in known:
        raise CliError(f"{printable(repr(key))} is not a budget key ({flaw}): {_KEY_SHAPES}")


def register(subparsers: SubParsers) -> None:
    """Add the ``budget`` command group."""
    group = subparsers.add_parser(
        "budget",
        help="spend budgets in the shared quota store: status, set, reset",
        description="Spend budgets (empathy_models.limits.Budget) as every worker sharing "
        "the quota store sees them.",
    )
    sub = group.add_subparsers(dest="budget_command", metavar="SUBCOMMAND")
    group.set_defaults(func=None, help_parser=group)
    db_help = (
        "quota store: SQLite file or URL (sqlite:///..., redis://..., postgresql://...); "
        "default: the state database named in empathy.toml, else $EMPATHY_HOME/empathy.db "
        "(see `empathy-models config show`)"
    )

    status = sub.add_parser(
        "status",
        help="spend of every budget (or one) in its current window",
        description="Show each budget the store holds: its latest window, limit, spent, "
        "held by calls in flight and when that hold lapses if no call settles it (a "
        "killed worker's), left, and when it resets; below it, what was held for calls "
        "whose hold lapsed before they settled.",
    )
    add_common(status, db_help=db_help)
    status.add_argument(
        "key", nargs="?", type=_key, help="one budget, e.g. global/day or user_id=bob/day"
    )
    status.add_argument("--history", action="store_true", help="every window kept, not the latest")
    status.set_defaults(func=cmd_budget_status)

    set_ = sub.add_parser(
        "set",
        help="override a budget's limit for every worker (or --clear the override)",
        description="Set the limit of a budget in the store; every worker uses it instead "
        "of the limit in its code (within five seconds) until --clear.",
    )
    add_common(set_, db_help=db_help)
    set_.add_argument("key", type=_key, help="the budget, e.g. global/day")
    what = set_.add_mutually_exclusive_group(required=True)
    what.add_argument("--limit", type=_dollars, metavar="USD", help="the new limit in dollars")
    what.add_argument("--clear", action="store_true", help="drop the override")
    set_.set_defaults(func=cmd_budget_set)

    reset = sub.add_parser(
        "reset",
        help="forget a budget's spend (it starts again from zero)",
        description="Delete every window of a budget: its spend starts again from zero for "
        "every worker.  Calls in flight still settle into a fresh window.",
    )
    add_common(reset, db_help=db_help)
    reset.add_argument("key", type=_key, help="the budget, e.g. global/day")
    reset.set_defaults(func=cmd_budget_reset)


def _utc(ts: float) -> datetime | None:
    # a stored window's bound as a date; None when no date holds it (past year 9999,
    # written by another tool or an older version: windows are at most 100 years now)
    try:
        return datetime.fromtimestamp(ts, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _when(ts: float) -> str:
    t = _utc(ts)
    if t is None:
        return "after 9999-12-31" if ts > 0 else "unknown"
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _iso(ts: float) -> str | None:
    t = _utc(ts)
    return None if t is None else t.isoformat()


def usage_row(u: BudgetUsage, override: int | None = None) -> dict[str, Any]:
    """
    A `BudgetUsage` as the JSON the CLI prints (dollars; ``window_start`` and
    ``resets_at`` in ISO 8601, ``null`` for a stored time no date can hold).
    """
    limit = override if override is not None else u.limit
    return {
        "key": u.key,
        "window_start": _iso(u.window_start),
        "resets_at": _iso(u.window_end),
        "limit_usd": limit / NANO,
        "limit_overridden": override is not None,
        "spent_usd": u.spent / NANO,
        "held_usd": u.held / NANO,
        "remaining_usd": max(0, limit - u.spent - u.held) / NANO,
        "reserved_usd": u.reserved / NANO,
        "settled_usd": u.settled / NANO,
        "released_usd": u.released / NANO,
        "overrun_usd": u.overrun / NANO,
        "lapsed_usd": u.lapsed / NANO,
        "held_until": None if u.held_until is None else _iso(u.held_until),
        "calls": u.calls,
        "refused": u.refused,
    }


def _unspent_row(key: str, limit: int) -> dict[str, Any]:
    """
    The JSON of a budget whose limit is set in the store (``budget set``) and that
    nothing was charged to yet: no window, nothing spent, its limit left.
    """
    return {
        "key": key,
        "window_start": None,
        "resets_at": None,
        "limit_usd": limit / NANO,
        "limit_overridden": True,
        "spent_usd": 0.0,
        "held_usd": 0.0,
        "remaining_usd": limit / NANO,
        "reserved_usd": 0.0,
        "settled_usd": 0.0,
        "released_usd": 0.0,
        "overrun_usd": 0.0,
        "lapsed_usd": 0.0,
        "held_until": None,
        "calls": 0,
        "refused": 0,
    }


def _store(args: argparse.Namespace) -> str:
    return db_url(args.db, kind="state")


def cmd_budget_status(args: argparse.Namespace) -> int:
    """Print the latest window of every budget (or of one), with any limit override."""
    url = _store(args)

    async def body() -> tuple[list[BudgetUsage], dict[str, int]]:
        async with quota_store_from_url(url, **read_only(url)) as store:
            return await store.usages(), await store.limit_overrides()

    usages, overrides = run_async(body)
    if args.key is not None:
        _check_key(args.key, {u.key for u in usages} | set(overrides))
        usages = [u for u in usages if u.key == args.key]
        overrides = {k: v for k, v in overrides.items() if k == args.key}
        if not usages and not overrides:
            raise CliError(
                f"no budget {printable(repr(args.key))} in this store (nothing charged to it "
                "yet, no limit set)"
            )
    if not args.history:
        latest: dict[str, BudgetUsage] = {}
        for u in usages:
            latest[u.key] = u  # sorted by window: the last is the newest
        usages = list(latest.values())
    now = time.time()
    rows = [usage_row(u, overrides.get(u.key)) for u in usages]
    # a limit set for a budget nothing was charged to yet: no window, nothing spent
    charged = {u.key for u in usages}
    unspent = [_unspent_row(k, limit) for k, limit in sorted(overrides.items()) if k not in charged]
    if args.json:
        emit_json(
            {"budgets": rows + unspent, "overrides": {k: v / NANO for k, v in overrides.items()}}
        )
        return 0
    table: list[tuple[object, ...]] = [
        (
            Shown(shown_name(r["key"]) + (" *" if r["limit_overridden"] else "")),
            fmt_usd(r["limit_usd"]),
            fmt_usd(r["spent_usd"]),
            fmt_usd(r["held_usd"]),
            "-" if u.held_until is None or not u.held else _when(u.held_until),
            fmt_usd(r["remaining_usd"]),
            r["calls"],
            r["refused"],
            _when(u.window_end) + (" (ended)" if u.window_end <= now else ""),
        )
        for r, u in zip(rows, usages, strict=True)
    ]
    table.extend(
        (
            Shown(f"{shown_name(r['key'])} *"),
            fmt_usd(r["limit_usd"]),
            fmt_usd(r["spent_usd"]),
            fmt_usd(r["held_usd"]),
            "-",
            fmt_usd(r["remaining_usd"]),
            r["calls"],
            r["refused"],
            None,
        )
        for r in unspent
    )
    print_table(
        [
            "budget",
            "limit",
            "spent",
            "held",
            "held until (UTC)",
            "left",
            "calls",
            "refused",
            "resets (UTC)",
        ],
        table,
    )
    if overrides:
        print("* limit set in the store (`empathy-models budget set`)")
    _print_lapsed(usages)
    return 0


def _print_lapsed(usages: list[BudgetUsage]) -> None:
    """
    A note per window shown whose holds lapsed before their calls settled them: what
    they cost is in ``spent`` only if their settlement came later (as ``overrun``).
    """
    lapsed = [u for u in usages if u.lapsed > 0]
    for u in lapsed:
        print(
            f"{shown_name(u.key)}: {fmt_usd(u.lapsed / NANO)} lapsed in the window of "
            f"{_when(u.window_start)}"
        )
    if lapsed:
        print(
            "lapsed: held for calls that had not settled when their hold lapsed (a worker\n"
            "killed or cut off from the store, or a settlement the store failed, which that\n"
            "worker counts in `executor.limiter.unsettled`); what those calls cost is in\n"
            "spent only if their settlement came later"
        )


def cmd_budget_set(args: argparse.Namespace) -> int:
    """Override a budget's limit in the store, or drop the override."""
    url = _store(args)
    limit = None if args.clear else round(args.limit * NANO)

    async def body() -> None:
        await refuse_missing_schema(url, quota_store_from_url, lambda s: s.limit_overrides())
        async with quota_store_from_url(url) as store:
            if key_flaw(args.key) is not None:  # only a budget the store holds by that name
                known = {u.key for u in await store.usages()} | set(await store.limit_overrides())
                _check_key(args.key, known)
            await store.set_limit(args.key, limit)

    run_async(body)
    if args.json:
        emit_json({"key": args.key, "limit_usd": None if limit is None else limit / NANO})
    elif limit is None:
        print(f"Cleared the limit override of {shown_name(args.key)}: workers use their own again")
    else:
        print(
            f"Set the limit of {shown_name(args.key)} to {fmt_usd(limit / NANO)} for every worker"
        )
    return 0


def cmd_budget_reset(args: argparse.Namespace) -> int:
    """Forget every window of a budget."""
    url = _store(args)

    async def body() -> tuple[int, int | None]:
        await refuse_missing_schema(url, quota_store_from_url, lambda s: s.limit_overrides())
        async with quota_store_from_url(url) as store:
            overrides = await store.limit_overrides()
            if key_flaw(args.key) is not None:
                _check_key(args.key, {u.key for u in await store.usages()} | set(overrides))
            return await store.reset_budget(args.key), overrides.get(args.key)

    count, override = run_async(body)
    if count == 0 and override is None:
        raise CliError(f"no budget {printable(repr(args.key))} in this store; nothing was reset")
    if args.json:
        emit_json({"reset": args.key, "windows": count})
    elif count:
        print(f"Reset {shown_name(args.key)}: {count} window(s) forgotten, spend starts from zero")
    elif override is not None:
        print(
            f"Nothing spent on {shown_name(args.key)} yet: its spend is already zero (its limit "
            f"of {fmt_usd(override / NANO)} set in the store stays; `budget set --clear` drops it)"
        )
    return 0
