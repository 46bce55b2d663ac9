"""
``empathy-models auth``: set up, inspect, reset and restore the auth strategy, and
recommend a mode for a file.

Every subcommand takes ``--file PATH`` to work on another strategy file than
``$EMPATHY_HOME/auth_strategy.json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from empathy_models import ModelRegistry
from empathy_models.auth import (
    DOC_PIPELINE,
    AuthMode,
    AuthStrategy,
    SubscriptionTier,
    auth_strategy_file,
    count_lines_of_code,
    list_auth_strategy_backups,
    reset_auth_strategy,
    restore_auth_strategy,
)
from empathy_models.exceptions import RecordValidationError

from ._common import (
    CliError,
    SubParsers,
    add_common,
    ask,
    configured_registry_file,
    emit_json,
    fmt_usd,
    path_arg,
    print_pairs,
    print_table,
    printable,
    stdin_is_terminal,
)

__all__ = [
    "cmd_auth_recommend",
    "cmd_auth_reset",
    "cmd_auth_restore",
    "cmd_auth_setup",
    "cmd_auth_status",
    "register",
]

_TIERS = [t.value for t in SubscriptionTier]
_MODES = [m.value for m in AuthMode]


def register(subparsers: SubParsers) -> None:
    """Add the ``auth`` command group."""
    auth = subparsers.add_parser(
        "auth",
        help="subscription-or-API strategy: setup, status, reset, restore, recommend",
        description="Manage the saved auth strategy ($EMPATHY_HOME/auth_strategy.json).",
    )
    sub = auth.add_subparsers(dest="auth_command", metavar="SUBCOMMAND")
    auth.set_defaults(func=None, help_parser=auth)

    def leaf(name: str, help_text: str, *, json_flag: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        add_common(p, json_flag=json_flag, db=False)
        p.add_argument(
            "--file",
            type=path_arg,
            default=None,
            help="strategy file (default: $EMPATHY_HOME/auth_strategy.json)",
        )
        return p

    setup = leaf("setup", "create or update the strategy; fields you do not change are kept")
    setup.add_argument("--tier", choices=_TIERS, help="subscription tier")
    setup.add_argument("--mode", choices=_MODES, help="default mode (auto decides by size)")
    setup.add_argument("--small", type=int, metavar="LINES", help="small-module threshold")
    setup.add_argument("--medium", type=int, metavar="LINES", help="medium-module threshold")
    setup.add_argument("--multiplier", type=float, help="tokens per line of code")
    prefer = setup.add_mutually_exclusive_group()
    prefer.add_argument(
        "--prefer-subscription",
        dest="prefer_subscription",
        action="store_true",
        default=None,
        help="prefer the subscription when both fit",
    )
    prefer.add_argument(
        "--no-prefer-subscription",
        dest="prefer_subscription",
        action="store_false",
        help="prefer the API when both fit",
    )
    setup.set_defaults(func=cmd_auth_setup)

    leaf("status", "show the saved strategy and what it recommends per module size").set_defaults(
        func=cmd_auth_status
    )

    reset = leaf(
        "reset",
        "back the strategy file up, then remove it (asks on a terminal; --yes elsewhere)",
        json_flag=False,
    )
    reset.add_argument(
        "--yes", "-y", action="store_true", help="do not ask; required without a terminal"
    )
    reset.set_defaults(func=cmd_auth_reset)

    restore = leaf("restore", "bring back the newest backup (or --backup PATH)", json_flag=False)
    restore.add_argument("--backup", type=path_arg, default=None, help="a specific backup file")
    restore.set_defaults(func=cmd_auth_restore)

    recommend = leaf("recommend", "count a file's lines and recommend a mode with its cost")
    recommend.add_argument("path", metavar="FILE", type=path_arg, help="a source file")
    recommend.add_argument(
        "--registry",
        type=path_arg,
        default=None,
        help="models and prices from a TOML or JSON file (default: the one named in "
        "empathy.toml, else the built-in table)",
    )
    recommend.add_argument(
        "--provider",
        default="anthropic",
        metavar="NAME",
        help="price each stage on this provider's models in the registry (default: anthropic)",
    )
    recommend.set_defaults(func=cmd_auth_recommend)


def _file(args: argparse.Namespace) -> Path:
    value = getattr(args, "file", None)
    return Path(value) if value is not None else auth_strategy_file()


# --------------------------------------------------------------------------- setup


def _ask(prompt: str, choices: list[str], current: str) -> str:
    numbered = ", ".join(f"{i}={c}" for i, c in enumerate(choices, start=1))
    while True:
        answer = ask(f"{prompt} ({numbered}) [{current}]: ")
        if answer is None:
            raise CliError("setup cancelled (end of input)")
        answer = answer.strip().lower()
        if not answer:
            return current
        if answer.isdigit() and 1 <= int(answer) <= len(choices):
            return choices[int(answer) - 1]
        if answer in choices:
            return answer
        print(f"  please answer one of: {', '.join(choices)}", file=sys.stderr)


def cmd_auth_setup(args: argparse.Namespace) -> int:
    """
    Update the strategy file with the given options, keeping every other field
    (custom thresholds, multiplier, preferences, metadata).  On a terminal with no
    options, asks for the tier and the mode.  A corrupt file is an error, not reset.
    """
    file = _file(args)
    existing = AuthStrategy.load_existing(file)
    current = existing if existing is not None else AuthStrategy()
    changes: dict[str, Any] = {}
    for option, name in (
        ("tier", "subscription_tier"),
        ("mode", "default_mode"),
        ("small", "small_module_threshold"),
        ("medium", "medium_module_threshold"),
        ("multiplier", "loc_to_tokens_multiplier"),
        ("prefer_subscription", "prefer_subscription"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            changes[name] = value
    if not changes and stdin_is_terminal():
        changes["subscription_tier"] = _ask(
            "Subscription tier", _TIERS, current.subscription_tier.value
        )
        changes["default_mode"] = _ask("Default mode", _MODES, current.default_mode.value)
    changes["setup_completed"] = True
    try:
        # read, changed and written under the file's lock: a concurrent setup of another
        # field is kept
        updated = AuthStrategy.update(file, **changes)
    except RecordValidationError as exc:
        raise CliError(f"invalid setting: {exc}", code=2) from exc
    if args.json:
        emit_json({"config_file": str(file), **updated.to_dict()})
        return 0
    verb = "Updated" if existing is not None else "Created"
    print(f"{verb} {printable(str(file))}")
    _print_strategy(updated)
    return 0


# --------------------------------------------------------------------------- status


def _print_strategy(strategy: AuthStrategy, *, configured: bool = True) -> None:
    mark = "" if configured else " (default)"
    rows = [
        (name, f"{value.value if hasattr(value, 'value') else value}{mark}")
        for name, value in (
            ("subscription_tier", strategy.subscription_tier),
            ("default_mode", strategy.default_mode),
            ("small_module_threshold", strategy.small_module_threshold),
            ("medium_module_threshold", strategy.medium_module_threshold),
            ("loc_to_tokens_multiplier", strategy.loc_to_tokens_multiplier),
            ("prefer_subscription", strategy.prefer_subscription),
            ("cost_optimization", strategy.cost_optimization),
        )
    ]
    rows.append(
        ("setup_completed", str(strategy.setup_completed) if configured else "False (no file)")
    )
    if strategy.metadata:
        rows.append(("metadata", f"{len(strategy.metadata)} key(s)"))
    print_table(["field", "value"], rows)


def _size_rows(strategy: AuthStrategy) -> list[dict[str, Any]]:
    samples = (
        ("small", strategy.small_module_threshold - 1),
        ("medium", strategy.medium_module_threshold - 1),
        ("large", strategy.medium_module_threshold),
    )
    out = []
    for category, lines in samples:
        lines = max(0, lines)
        out.append(
            {
                "category": category,
                "example_lines": lines,
                "mode": strategy.get_recommended_mode(lines).value,
                "reason": strategy.explain_recommended_mode(lines),
            }
        )
    return out


def cmd_auth_status(args: argparse.Namespace) -> int:
    """Show the strategy (marked "(default)" when no file exists) and its recommendations."""
    file = _file(args)
    existing = AuthStrategy.load_existing(file)
    strategy = existing if existing is not None else AuthStrategy()
    configured = existing is not None
    if args.json:
        data = strategy.to_dict()
        emit_json(
            {
                "subscription_tier": data["subscription_tier"],
                "default_mode": data["default_mode"],
                "small_module_threshold": data["small_module_threshold"],
                "medium_module_threshold": data["medium_module_threshold"],
                "loc_to_tokens_multiplier": data["loc_to_tokens_multiplier"],
                "prefer_subscription": data["prefer_subscription"],
                "cost_optimization": data["cost_optimization"],
                "setup_completed": configured and data["setup_completed"],
                "configured": configured,
                "config_file": str(file),
                "metadata": data["metadata"],
                "recommendations": _size_rows(strategy),
                "backups": [str(p) for p in list_auth_strategy_backups(file)],
            }
        )
        return 0
    print(f"Auth strategy: {printable(str(file))}" + ("" if configured else " (not created yet)"))
    _print_strategy(strategy, configured=configured)
    print()
    rows = [
        (
            r["category"],
            f"< {strategy.small_module_threshold}"
            if r["category"] == "small"
            else f"< {strategy.medium_module_threshold}"
            if r["category"] == "medium"
            else f">= {strategy.medium_module_threshold}",
            r["mode"],
            r["reason"],
        )
        for r in _size_rows(strategy)
    ]
    print_table(
        ["size", "lines", "recommended", "why"],
        rows,
        title="Recommendation by module size",
        cut=("why",),
    )
    backups = list_auth_strategy_backups(file)
    if backups:
        print()
        print(f"{len(backups)} backup(s); newest: {printable(str(backups[0]))}")
    if not configured:
        print()
        print(
            "Not set up yet: these recommendations follow the defaults above. Save your "
            f"tier with `empathy-models auth setup --tier {{{','.join(_TIERS)}}}` (on a "
            "terminal, `empathy-models auth setup` asks)."
        )
    return 0


# --------------------------------------------------------------------------- reset / restore


def _present(file: Path) -> bool:
    """
    Whether ``file`` exists (a symlink counts, even a dangling one).  A path the system
    cannot look up (a directory on the way is a file) raises the library's
    `AuthFileError` naming the part in the way, rather than reading as "no file".
    """
    try:
        os.lstat(file)
    except FileNotFoundError:
        return False
    except OSError:
        reset_auth_strategy(file)  # raises AuthFileError saying what is in the way
        raise
    return True


def cmd_auth_reset(args: argparse.Namespace) -> int:
    """
    Back the strategy file up (timestamped, 0600, next to it), then remove it.

    On a terminal asks first unless ``--yes``; without a terminal refuses (exit 1,
    file untouched) unless ``--yes``.  Prints the backup's path.  Nothing to reset -> 0.
    A symlink counts as a file, even a dangling one, as for `reset_auth_strategy`,
    which refuses that one (exit 1, the link left in place).
    """
    file = _file(args)
    if not _present(file):
        print(f"Nothing to reset: {printable(str(file))} does not exist")
        return 0
    if not args.yes:
        if not stdin_is_terminal():
            print(
                f"empathy-models: refusing to reset {printable(str(file))} without --yes "
                "(stdin is not a terminal); nothing was changed",
                file=sys.stderr,
            )
            return 1
        answer = ask(f"Remove {printable(str(file))}? A backup is kept next to it. [y/N]: ")
        if (answer or "").strip().lower() not in ("y", "yes"):
            raise CliError("reset cancelled; nothing was changed")
    backup = reset_auth_strategy(file)
    if backup is None:
        print(f"Nothing to reset: {printable(str(file))} does not exist")
        return 0
    print(f"Removed {printable(str(file))}")
    print(f"Backup: {printable(str(backup))}")
    again = f" --file {printable(shlex.quote(str(file)))}" if args.file else ""
    print(f"Undo with: empathy-models auth restore{again}")
    return 0


def cmd_auth_restore(args: argparse.Namespace) -> int:
    """Copy the newest backup (or ``--backup``) into place, backing up the current file first."""
    file = _file(args)
    source, previous = restore_auth_strategy(file, backup=args.backup)
    print(f"Restored {printable(str(file))} from {printable(str(source))}")
    if previous is not None:
        print(f"The file it replaced was backed up to {printable(str(previous))}")
    return 0


# --------------------------------------------------------------------------- recommend


def _registry(args: argparse.Namespace) -> ModelRegistry:
    """``--registry``, else the registry named in empathy.toml, else the built-in table."""
    path = args.registry if args.registry is not None else configured_registry_file()
    return ModelRegistry.default() if path is None else ModelRegistry.from_file(path)


def _pricing_provider(registry: ModelRegistry, provider: str) -> str:
    """
    ``provider`` when ``registry`` has a model of every tier `DOC_PIPELINE` runs on for
    it; else a usage error naming the providers that have (or saying none has).
    """

    def prices(name: str) -> bool:
        return all(registry.for_tier(stage.tier, provider=name) for stage in DOC_PIPELINE)

    if prices(provider):
        return provider
    tiers = "/".join(dict.fromkeys(stage.tier.value for stage in DOC_PIPELINE))
    able = [name for name in registry.providers() if prices(name)]
    fix = (
        "pass " + " or ".join(f"--provider {shlex.quote(name)}" for name in able)
        if able
        else "no provider there has a model of each; pass --registry with a table that does"
    )
    raise CliError(
        f"the registry (prices {registry.price_version}) has no {provider!r} model of each "
        f"tier the estimate prices ({tiers}): {fix}"
    )


def cmd_auth_recommend(args: argparse.Namespace) -> int:
    """
    Count ``FILE``'s lines, then print its size category, the mode, why, and the cost,
    priced from ``--registry`` (default: the registry of empathy.toml, else built in) on
    ``--provider``'s models.
    """
    strategy = AuthStrategy.load(_file(args))
    registry = _registry(args)
    provider = _pricing_provider(registry, args.provider)
    report = count_lines_of_code(args.path)
    lines = report.effective_lines
    mode = strategy.get_recommended_mode(lines)
    estimate = strategy.estimate_cost(lines, mode, registry=registry, provider=provider)
    category = strategy.size_category(lines)
    if args.json:
        emit_json(
            {
                "file": str(args.path),
                "lines": report.to_dict(),
                "size_category": category,
                "recommended_mode": mode.value,
                "reason": strategy.explain_recommended_mode(lines),
                "estimate": estimate.to_dict(),
                "warnings": list(report.warnings),
            }
        )
        return 0
    rows = [
        ("file", str(args.path)),
        (
            "lines (total / code / comment / blank)",
            f"{report.total_lines} / {report.code_lines} / "
            f"{report.comment_lines} / {report.blank_lines}",
        ),
        ("effective lines", report.effective_lines),
        (
            "size category",
            f"{category} (thresholds {strategy.small_module_threshold} / "
            f"{strategy.medium_module_threshold})",
        ),
        ("recommended mode", mode.value),
        ("why", strategy.explain_recommended_mode(lines)),
        ("estimated tokens", f"{estimate.tokens_used:,}"),
        (
            "cost in this mode",
            fmt_usd(estimate.monetary_cost)
            if estimate.quota_cost is None
            else f"$0 ({estimate.quota_cost})",
        ),
        (
            "API price for comparison",
            f"{fmt_usd(estimate.api_cost)} (prices {estimate.price_version})",
        ),
        ("fits in context", "yes" if estimate.fits_in_context else "no"),
    ]
    print_pairs(rows, title=f"Recommendation for {args.path}")
    for warning in report.warnings:
        print(f"warning: {printable(str(warning))}", file=sys.stderr)
    return 0
