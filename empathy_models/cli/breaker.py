"""``empathy-models breaker``: show, reset and force open circuit-breaker keys."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any

from empathy_models import CircuitState, state_store_from_url
from empathy_models.abc import force_for
from empathy_models.circuit import BreakerPolicy, as_of
from empathy_models.exceptions import ConfigurationError, StateStoreError
from empathy_models.records import CircuitBreakerState

from ._common import (
    MAX_DAYS,
    CliError,
    SubParsers,
    add_common,
    db_url,
    emit_json,
    number_arg,
    print_table,
    read_only,
    refuse_missing_schema,
    run_async,
    shown_name,
    typed_key,
)

__all__ = ["cmd_breaker_open", "cmd_breaker_reset", "cmd_breaker_status", "register"]


_seconds = number_arg(
    float,
    minimum=0,
    strict=True,
    maximum=MAX_DAYS * 86_400,
    what="seconds",
    too_big=" (100 years; omit --for to open until reset)",
)


_DEFAULT = BreakerPolicy()
_window_seconds = number_arg(float, minimum=0, strict=True, what="seconds")
_buckets = number_arg(int, minimum=1, maximum=1_000_000, what="an integer")


_AS_SHOWN = (
    ", as the table shows it (a key shown in quotes, such as 'openai ', is typed with its quotes)"
)


def register(subparsers: SubParsers) -> None:
    """Add the ``breaker`` command group."""
    group = subparsers.add_parser(
        "breaker",
        help="circuit breakers in the shared state store: status, reset, open",
        description="Circuit-breaker state as every worker sharing the database sees it.",
    )
    sub = group.add_subparsers(dest="breaker_command", metavar="SUBCOMMAND")
    group.set_defaults(func=None, help_parser=group)

    status = sub.add_parser(
        "status",
        help="state of every key (or one)",
        description="Show each breaker key the store holds as of now: state, failures, "
        "trips and when it opened (expired probe leases and failures out of the window "
        "are not counted; an open key whose time is up says so); an unknown key is an "
        "error that lists the keys held.  The store does not keep the breakers' policy: "
        "the failure-rate window is --window/--buckets, else BreakerPolicy's default, and "
        "the output says which it assumed.",
    )
    add_common(status)
    status.add_argument(
        "key", nargs="?", type=typed_key, help=f"one key (provider or provider:model){_AS_SHOWN}"
    )
    _add_window(status)
    status.set_defaults(func=cmd_breaker_status)

    reset = sub.add_parser(
        "reset",
        help="close a key (or --all) and forget its failures",
        description="Close one key (or every key with --all) for every worker sharing the "
        "store; its failure counts are forgotten and older tickets stop counting.",
    )
    add_common(reset)
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("key", nargs="?", type=typed_key, help=f"the key to reset{_AS_SHOWN}")
    target.add_argument("--all", action="store_true", help="reset every key")
    _add_window(reset)
    reset.set_defaults(func=cmd_breaker_reset)

    force = sub.add_parser(
        "open",
        help="force a key open (until reset, or for --for seconds)",
        description="Force a key open: every worker sharing the store rejects calls for "
        "it until `breaker reset` or, with --for, until the time is up.",
    )
    add_common(force)
    force.add_argument("key", type=typed_key, help=f"the key to open{_AS_SHOWN}")
    force.add_argument(
        "--for",
        dest="seconds",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="open for this many seconds (default: until reset)",
    )
    force.add_argument("--reason", default="forced open from the CLI", help="shown in status")
    _add_window(force)
    force.set_defaults(func=cmd_breaker_open)


def _add_window(parser: argparse.ArgumentParser) -> None:
    """``--window`` and ``--buckets``: the failure-rate window the printed states count."""
    parser.add_argument(
        "--window",
        type=_window_seconds,
        default=None,
        metavar="SECONDS",
        help="the breakers' BreakerPolicy.window_seconds, to count the failure-rate "
        f"window as of now (default {_DEFAULT.window_seconds:g}, assumed)",
    )
    parser.add_argument(
        "--buckets",
        type=_buckets,
        default=None,
        metavar="N",
        help=f"their BreakerPolicy.window_buckets (default {_DEFAULT.window_buckets}, assumed)",
    )


def _listed(keys: list[str]) -> str:
    """Keys for a message, each as the table shows it (`shown_name`)."""
    return ", ".join(shown_name(k) for k in keys) if keys else "none"


def _when(ts: float | None) -> str | None:
    """
    A stored time (never negative) as the tables print it; past what a date holds (a
    key forced open for ``1e300`` seconds through the SDK), ``after 9999-12-31``.
    """
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "after 9999-12-31"


def _policy(args: argparse.Namespace) -> BreakerPolicy:
    """
    The window the states are judged by: ``--window`` and ``--buckets``, each
    `BreakerPolicy`'s default when not given.
    """
    window = getattr(args, "window", None)
    buckets = getattr(args, "buckets", None)
    window = _DEFAULT.window_seconds if window is None else window
    buckets = _DEFAULT.window_buckets if buckets is None else buckets
    try:
        return BreakerPolicy(window_seconds=window, window_buckets=buckets)
    except ConfigurationError as exc:
        raise CliError(str(exc), code=2) from None


def _live(states: list[CircuitBreakerState], args: argparse.Namespace) -> list[CircuitBreakerState]:
    """``states`` as of now (`empathy_models.circuit.as_of`), as `CircuitBreaker.get_status`."""
    policy, now = _policy(args), time.time()
    return [as_of(s, policy, now) for s in states]


def _state_text(s: CircuitBreakerState, now: float) -> str:
    """The state column: an open circuit whose time is up says what its next call does."""
    if s.open_ended(now):
        return f"{s.state.value} (ended: half-open at next call)"
    return s.state.value


def state_row(s: CircuitBreakerState, now: float | None = None) -> dict[str, Any]:
    """
    A `CircuitBreakerState` as the JSON the CLI prints; ``open_ended`` (at ``now``,
    default the current time) tells an open circuit whose time is up.
    """
    return {
        "key": s.key,
        "state": s.state.value,
        "open_ended": s.open_ended(time.time() if now is None else now),
        "consecutive_failures": s.consecutive_failures,
        "window_calls": s.window_calls,
        "window_failures": s.window_failures,
        "open_count": s.open_count,
        "generation": s.generation,
        "opened_at": s.opened_at.isoformat() if s.opened_at else None,
        "open_until": s.open_until.isoformat() if s.open_until else None,
        "probes_in_flight": s.probes_in_flight,
        "last_error": s.last_error,
        "reason": s.reason,
    }


def _print_states(states: list[CircuitBreakerState]) -> None:
    now = time.time()
    print_table(
        [
            "key",
            "state",
            "failures",
            "window",
            "trips",
            "opened at (UTC)",
            "open until (UTC)",
            "last error",
        ],
        [
            (
                shown_name(s.key),
                _state_text(s, now),
                s.consecutive_failures,
                f"{s.window_failures}/{s.window_calls}",
                s.open_count,
                _when(s.opened_at_ts),
                _when(s.open_until_ts),
                s.reason or s.last_error,
            )
            for s in states
        ],
        cut=("last error",),
    )


def cmd_breaker_status(args: argparse.Namespace) -> int:
    """Print every key the store holds, or one key (a key it does not hold is an error)."""
    url = db_url(args.db, kind="state")

    async def body() -> list[CircuitBreakerState]:
        async with state_store_from_url(url, **read_only(url)) as store:
            held = await store.snapshot_all()
            if args.key is None:
                return held
            known = sorted(s.key for s in held)
            if args.key not in known:
                raise CliError(
                    f"unknown breaker key {args.key!r}: this store holds no state for it "
                    f"(keys held: {_listed(known)})",
                    shown=True,
                )
            return [s for s in held if s.key == args.key]

    states = _live(run_async(body), args)
    window = _window(args)
    if args.json:
        emit_json({"breakers": [state_row(s) for s in states], "window": window})
    else:
        _print_states(states)
        if states:
            print(_window_text(args, window))
    return 0


def _window(args: argparse.Namespace) -> dict[str, Any]:
    """
    The failure-rate window the printed states count by, and whether it is assumed: the stores
    keep each key's window buckets, not the policy (length, bucket count) they were
    written with, so a value not given is `BreakerPolicy`'s default.
    """
    policy = _policy(args)
    return {
        "seconds": policy.window_seconds,
        "buckets": policy.window_buckets,
        "assumed": args.window is None or args.buckets is None,
    }


def _window_text(args: argparse.Namespace, window: dict[str, Any]) -> str:
    """The line under the status table that says which window it counts, and why."""
    text = f"window: {window['seconds']:g}s in {window['buckets']} buckets"
    if args.window is None and args.buckets is None:
        return f"{text} (assumed: the default; set --window, --buckets)"
    if args.buckets is None:
        return f"{text} (--window; buckets assumed: the default)"
    if args.window is None:
        return f"{text} (--buckets; length assumed: the default)"
    return f"{text} (--window, --buckets)"


def cmd_breaker_reset(args: argparse.Namespace) -> int:
    """Reset one key or every key: it reads as closed and older tickets stop counting."""
    url = db_url(args.db, kind="state")

    async def body() -> list[CircuitBreakerState]:
        async with state_store_from_url(url, **read_only(url, writes=True)) as store:
            if args.all:
                await store.reset(None)
                return await store.snapshot_all()
            try:
                known = sorted(s.key for s in await store.snapshot_all())
            except StateStoreError as exc:
                if exc.key != args.key:
                    raise
                known = [args.key]  # its state is unreadable: the reset repairs it
            if args.key not in known:
                raise CliError(
                    f"no breaker state for {args.key!r} in this store; nothing was reset "
                    f"(keys held: {_listed(known)})",
                    shown=True,
                )
            await store.reset(args.key)
            return [await store.snapshot(args.key)]

    states = _live(run_async(body), args)
    window = _window(args)
    if args.json:
        emit_json(
            {
                "reset": "all" if args.all else args.key,
                "breakers": [state_row(s) for s in states],
                "window": window,
            }
        )
    else:
        print(f"Reset {'every key' if args.all else shown_name(args.key)}")
        _print_states(states)
        if states:
            print(_window_text(args, window))
    return 0


def cmd_breaker_open(args: argparse.Namespace) -> int:
    """Force a key open: every worker sharing the store rejects it until the time or a reset."""
    url = db_url(args.db, kind="state")
    if not args.key.strip():
        raise CliError("the key must not be empty", code=2)

    async def body() -> tuple[CircuitBreakerState, list[str] | None]:
        await refuse_missing_schema(url, state_store_from_url, lambda s: s.snapshot(args.key))
        async with state_store_from_url(url) as store:
            try:
                known: list[str] | None = sorted(s.key for s in await store.snapshot_all())
            except StateStoreError:  # a key's state unreadable: no note, the force goes on
                known = None
            # --for counts on the store's clock, as every other time in it
            forced = await force_for(
                store,
                args.key,
                CircuitState.FORCED_OPEN,
                for_seconds=args.seconds,
                reason=args.reason,
            )
            return forced, known

    forced, known = run_async(body)
    if known is not None and args.key not in known:
        # opened all the same (ahead of a key's first use), but a typo opens nothing in use
        print(
            f"note: this store held no state for {shown_name(args.key)} (keys held: "
            f"{_listed(known)}): a key is a provider (openai) or provider:model "
            "(openai:gpt-4o), and workers check it only if they call it",
            file=sys.stderr,
        )
    [state] = _live([forced], args)
    window = _window(args)
    if args.json:
        emit_json({**state_row(state), "window": window})
    else:
        print(
            f"Forced {shown_name(args.key)} open"
            + (
                f" until {_when(state.open_until_ts)} UTC"
                if args.seconds is not None
                else " until reset"
            )
        )
        _print_states([state])
        print(_window_text(args, window))
    return 0
