"""``empathy-models config``: the configuration the SDK and the CLI use, and its origin."""

from __future__ import annotations

import argparse

from empathy_models.config import EmpathyConfig

from ._common import SubParsers, emit_json, print_table

__all__ = ["cmd_config_show", "register"]


def register(subparsers: SubParsers) -> None:
    """Add the ``config`` command group."""
    group = subparsers.add_parser(
        "config",
        help="the configuration (empathy.toml) the SDK and the CLI use",
        description="Where the telemetry database, breaker state, registry and providers "
        "come from: EMPATHY_CONFIG, ./empathy.toml, $EMPATHY_HOME/empathy.toml, or the "
        "defaults.",
    )
    sub = group.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = sub.add_parser(
        "show",
        help="print every resolved setting and where it came from (never a secret)",
        description="Print every resolved setting and where it came from. API keys, "
        "secret-looking header values and passwords in URLs are never printed.",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print `EmpathyConfig.describe`'s rows."""
    config = EmpathyConfig.load()
    rows = config.describe()
    if args.json:
        emit_json({"settings": [{"setting": s, "value": v, "source": src} for s, v, src in rows]})
        return 0
    print_table(["setting", "value", "source"], rows)
    return 0
