"""``empathy-models config``: the configuration the SDK and the CLI use, and its origin."""

from __future__ import annotations

import argparse
import sys
import warnings

from empathy_models import (
    AdaptiveModelRouter,
    EmpathyLLMExecutor,
    EmpathyModelsError,
)
from empathy_models.config import EmpathyConfig

from ._common import SubParsers, emit_json, print_table, printable

__all__ = ["check_config", "cmd_config_show", "register"]


def register(subparsers: SubParsers) -> None:
    """Add the ``config`` command group."""
    group = subparsers.add_parser(
        "config",
        help="the configuration (empathy.toml) the SDK and the CLI use",
        description="Where the telemetry database, breaker state, registry and providers "
        "come from: EMPATHY_CONFIG, ./empathy.toml, $EMPATHY_HOME/empathy.toml, or the "
        "defaults.",
    )
    sub = group.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    group.set_defaults(func=None, help_parser=group)
    show = sub.add_parser(
        "show",
        help="print every resolved setting and where it came from (never a secret)",
        description="Print every resolved setting and where it came from, and check them "
        "as EmpathyLLMExecutor.from_config() would, without connecting anywhere (exit 1 "
        "with its error when it would refuse them). API keys, secret-looking header values "
        "and passwords in URLs are never printed.",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=cmd_config_show)


def check_config(config: EmpathyConfig) -> None:
    """
    Build what `EmpathyLLMExecutor.from_config` builds from ``config`` (the registry,
    the providers, the telemetry and state stores, the router, the executor) and drop
    it unopened: nothing connects, nothing is created.

    Raises:
        EmpathyModelsError: what ``from_config()`` would raise for this configuration.
    """
    with warnings.catch_warnings():
        # a missing API key is not a refusal (from_config warns when a call needs it)
        warnings.simplefilter("ignore")
        registry = config.registry()
        providers = config.build_providers(registry)
        telemetry = config.telemetry_store()
        config.ensure_directory("telemetry", create=False)  # as from_config() makes it
        config.state_store()  # as from_config() checks it, naming the file and key
        config.ensure_directory("state", create=False)
        EmpathyLLMExecutor(
            providers,
            registry=registry,
            telemetry_store=telemetry,
            router=AdaptiveModelRouter(registry, telemetry),
            breaker=config.state_url,
        )


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print `EmpathyConfig.describe`'s rows, then refuse what ``from_config()`` would."""
    config = EmpathyConfig.load()
    rows = config.describe()
    try:
        check_config(config)
        error: EmpathyModelsError | None = None
    except EmpathyModelsError as exc:
        error = exc
    if args.json:
        out: dict[str, object] = {
            "settings": [{"setting": s, "value": v, "source": src} for s, v, src in rows]
        }
        if error is not None:
            out["error"] = {"type": type(error).__name__, "message": str(error), "exit_code": 1}
        emit_json(out)
    else:
        print_table(["setting", "value", "source"], rows, cut=("source",))
    if error is not None:
        message = "\n".join(printable(line) for line in str(error).split("\n"))
        print(f"empathy-models: error: {message}", file=sys.stderr)
        return 1
    return 0
