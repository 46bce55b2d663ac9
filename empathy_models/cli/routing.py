"""``empathy-models routing``: routing statistics, the best model now, tier-upgrade advice."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from empathy_models import (
    AdaptiveModelRouter,
    ModelRegistry,
    ModelTier,
    RoutingDecision,
    RoutingPolicy,
    telemetry_from_url,
)

from ._common import (
    MAX_DAYS,
    CliError,
    Shown,
    SubParsers,
    add_common,
    configured_registry_file,
    db_url,
    emit_json,
    fmt_ms,
    fmt_pct,
    fmt_usd,
    number_arg,
    path_arg,
    print_pairs,
    print_table,
    printable,
    private_file,
    read_only,
    run_async,
    shown_name,
    typed_name,
)
from ._window import (
    Ahead,
    recorded_elsewhere,
    seen_only_for,
    stages_seen,
    stamped_ahead,
    whatif_window,
)

if TYPE_CHECKING:
    from empathy_models.whatif import WhatIfReport

__all__ = [
    "cmd_routing_best",
    "cmd_routing_stats",
    "cmd_routing_upgrades",
    "cmd_routing_whatif",
    "register",
]


_positive_float = number_arg(float, minimum=0, strict=True)
_days = number_arg(float, minimum=0, strict=True, maximum=MAX_DAYS, too_big=" (100 years)")
_non_negative_float = number_arg(float, minimum=0)
_rate = number_arg(float, minimum=0, maximum=1)
# the most a call's token counts hold (a 64-bit integer), as the router checks them
_tokens = number_arg(
    int, minimum=0, maximum=2**63 - 1, what="a whole number", too_big=" (2**63 - 1)"
)
_count = number_arg(int, minimum=1, maximum=1_000_000, what="a whole number")
_replicates = number_arg(int, minimum=2, maximum=10_000, what="a whole number")

_AS_SHOWN = " (as the tables show it: (none) for calls without one, a quoted name in its quotes)"

_SWEEP = "0.8,0.85,0.9,0.93,0.95,0.97,0.98,0.99"
"""The ``min_success_rate`` values ``routing whatif --plot`` draws without ``--sweep``."""


def register(subparsers: SubParsers) -> None:
    """Add the ``routing`` command group."""
    group = subparsers.add_parser(
        "routing",
        help="adaptive routing from recorded telemetry: stats, best model, what-if, tier upgrades",
        description="What the adaptive router sees in the telemetry database.",
    )
    sub = group.add_subparsers(dest="routing_command", metavar="SUBCOMMAND")
    group.set_defaults(func=None, help_parser=group)
    _register_stats(sub)
    _register_best(sub)
    _register_whatif(sub)
    _register_upgrades(sub)


def _leaf(sub: SubParsers, name: str, help_text: str) -> argparse.ArgumentParser:
    """
    Add one ``routing`` sub-command with the options every one of them takes.

    Args:
        sub: the ``routing`` group's sub-parsers.
        name: the sub-command.
        help_text: its help line (``%%`` for a percent sign) and description.

    Returns:
        The sub-command's parser, for its own arguments.
    """
    # `help` is %-formatted by argparse, a description is printed as written
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text.replace("%%", "%")
    )
    add_common(p)
    p.add_argument(
        "--registry",
        type=path_arg,
        default=None,
        help="models and prices from a TOML or JSON file (default: the one named in "
        "empathy.toml, else the built-in table)",
    )
    p.add_argument("--days", type=_days, default=7.0, help="window in days (default 7)")
    return p


def _register_stats(sub: SubParsers) -> None:
    """Add ``routing stats``."""
    stats = _leaf(sub, "stats", "per-model calls, success rate with 95%% bounds, latency and cost")
    stats.add_argument(
        "workflow", nargs="?", type=typed_name, help=f"one workflow{_AS_SHOWN} (default: every)"
    )
    stats.add_argument(
        "--stage", type=typed_name, help=f"one stage{_AS_SHOWN} (default: all stages together)"
    )
    stats.set_defaults(func=cmd_routing_stats)


def _register_best(sub: SubParsers) -> None:
    """Add ``routing best``."""
    best = _leaf(sub, "best", "the model the router would pick now for a workflow stage, and why")
    best.add_argument("workflow", type=typed_name, help=f"the workflow to route{_AS_SHOWN}")
    best.add_argument("stage", type=typed_name, help=f"its stage{_AS_SHOWN}")
    best.add_argument("--max-cost", type=_non_negative_float, help="USD per call")
    best.add_argument("--max-latency-ms", type=_positive_float, help="p95 latency bound")
    best.add_argument(
        "--max-ttft-ms", type=_positive_float, help="p95 time-to-first-token bound (streams)"
    )
    best.add_argument("--min-success-rate", type=_rate, help="0..1 (default 0.8)")
    best.add_argument("--input-tokens", type=_tokens, help="prompt size, for the expected cost")
    best.add_argument("--max-tokens", type=_tokens, help="output cap, for the expected cost")
    choose = best.add_mutually_exclusive_group()
    choose.add_argument(
        "--tier",
        choices=[t.value for t in ModelTier],
        help="candidates: the registry's models of this tier",
    )
    choose.add_argument(
        "--candidates",
        metavar="MODEL[,MODEL...]",
        help="candidate model ids (default: the models that served this stage)",
    )
    best.add_argument(
        "--on-no-match",
        default="raise",
        metavar="raise|relax|MODEL",
        help="when nothing qualifies: fail (default), relax constraints, or pin a model",
    )
    best.set_defaults(func=cmd_routing_best)


def _register_whatif(sub: SubParsers) -> None:
    """Add ``routing whatif``."""
    whatif = _leaf(
        sub,
        "whatif",
        "what a routing policy would cost and deliver on a stage, estimated from its "
        "recorded telemetry before you deploy it",
    )
    whatif.add_argument("workflow", type=typed_name, help=f"the workflow{_AS_SHOWN}")
    whatif.add_argument("stage", type=typed_name, help=f"its stage{_AS_SHOWN}")
    whatif.add_argument("--max-cost", type=_non_negative_float, help="USD per call")
    whatif.add_argument("--max-latency-ms", type=_positive_float, help="p95 latency bound")
    whatif.add_argument(
        "--max-ttft-ms", type=_positive_float, help="p95 time-to-first-token bound (streams)"
    )
    whatif.add_argument("--min-success-rate", type=_rate, help="0..1 (default 0.8)")
    whatif.add_argument(
        "--on-no-match",
        default="raise",
        metavar="raise|relax|MODEL",
        help="when nothing qualifies: no answer (default), relax constraints, or pin a model",
    )
    whatif.add_argument(
        "--candidates",
        metavar="MODEL[,MODEL...]",
        help="candidate model ids, from the registry (default: the models that served "
        "this stage); one without data in the window is reported as unknown",
    )
    whatif.add_argument(
        "--input-tokens",
        type=_tokens,
        help="prompt size of each simulated request, for the router and the cost "
        "(default: as recorded)",
    )
    whatif.add_argument("--max-tokens", type=_tokens, help="output cap, for the expected cost")
    whatif.add_argument(
        "--requests", type=_count, default=400, help="simulated requests per replicate (400)"
    )
    whatif.add_argument(
        "--replicates",
        type=_replicates,
        default=30,
        help="replicates drawn from the evidence's uncertainty (default 30)",
    )
    whatif.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    whatif.add_argument(
        "--plot",
        type=path_arg,
        metavar="FILE.png",
        help="also plot cost per request against min_success_rate over --sweep (needs "
        "matplotlib; the format follows the suffix, .png added to a name without one)",
    )
    whatif.add_argument(
        "--sweep",
        metavar="RATE[,RATE...]",
        default=None,
        help=f"min_success_rate values --plot draws (default {_SWEEP})",
    )
    whatif.set_defaults(func=cmd_routing_whatif)


def _register_upgrades(sub: SubParsers) -> None:
    """Add ``routing upgrades``."""
    upgrades = _leaf(
        sub, "upgrades", "stages whose recent failure rate advises a more capable tier"
    )
    upgrades.add_argument(
        "workflow", nargs="?", type=typed_name, help=f"one workflow{_AS_SHOWN} (default: every)"
    )
    upgrades.add_argument("--stage", type=typed_name, help=f"one stage{_AS_SHOWN}")
    upgrades.set_defaults(func=cmd_routing_upgrades)


def _registry(args: argparse.Namespace) -> ModelRegistry:
    path = args.registry if args.registry is not None else configured_registry_file()
    if path is None:
        return ModelRegistry.default()
    return ModelRegistry.from_file(path)


def _stage_name(args: argparse.Namespace) -> str:
    """``workflow/stage`` of the arguments, each name as the tables show it."""
    return f"{shown_name(args.workflow)}/{shown_name(args.stage)}"


# --------------------------------------------------------------------------- stats


def cmd_routing_stats(args: argparse.Namespace) -> int:
    """`AdaptiveModelRouter.get_routing_stats` for one workflow or every workflow."""
    url = db_url(args.db)
    registry = _registry(args)

    async def body() -> tuple[list[tuple[dict[str, Any], Ahead]], str | None]:
        async with telemetry_from_url(url, **read_only(url)) as backend:
            router = AdaptiveModelRouter(registry, backend, refresh_interval=None)
            if args.workflow is not None:
                workflows = [args.workflow]
            else:  # the workflows with calls in the window (of --stage, when given)
                seen = await stages_seen(backend, args.days, None, args.stage)
                workflows = sorted({w for w, _, _ in seen})
            now = datetime.now(UTC)
            results = [
                (
                    (await router.get_routing_stats(w, stage=args.stage, days=args.days)).to_dict(),
                    await stamped_ahead(backend, now, workflow=w, stage=args.stage),
                )
                for w in workflows
            ]
            # a workflow or stage asked for without calls (a typo?): where there are some
            asked = args.workflow is not None or args.stage is not None
            quiet = asked and not any(stats["total_calls"] for stats, _ in results)
            return results, await seen_only_for(backend, args.days) if quiet else None

    results, elsewhere = run_async(body)
    if args.json:
        emit_json(
            {
                "workflows": [
                    {**stats, "stamped_after_now": ahead.to_dict()} for stats, ahead in results
                ]
            }
        )
        return 0
    if not results:
        of = "" if args.stage is None else f" for stage {shown_name(args.stage)}"
        print(f"No calls recorded{of} in the last {args.days:g} day(s).")
    for i, (stats, ahead) in enumerate(results):
        if i:
            print()
        _print_stats(stats, args.stage, ahead)
    if elsewhere is not None:
        print(elsewhere)
    return 0


def _print_stats(stats: dict[str, Any], stage: str | None, ahead: Ahead) -> None:
    """
    One workflow's routing stats (of ``stage``; None: all its stages): a row per model,
    the notes, sample-size warnings.
    """
    called = stats["total_calls"] > 0  # no calls: no success rate or cost to show
    title = (
        f"{shown_name(stats['workflow'])} / "
        f"{'all stages' if stage is None else f'stage {shown_name(stage)}'}: "
        f"{stats['total_calls']} call{'' if stats['total_calls'] == 1 else 's'} in "
        f"{stats['days_analyzed']:g} day(s), "
        f"success {fmt_pct(stats['avg_success_rate'] if called else None)}, "
        f"avg cost {fmt_usd(stats['avg_cost'] if called else None)}"
    )
    rows = []
    warnings: list[str] = []
    # a warning read apart from its table (stderr) names the workflow and stage it is of
    of = shown_name(stats["workflow"]) + ("" if stage is None else f"/{shown_name(stage)}")
    # time to first token columns only where some model streamed
    streamed = any(m["ttft_p50"] is not None for m in stats["performance_by_model"].values())
    for model, m in stats["performance_by_model"].items():
        ttft = (fmt_ms(m["ttft_p50"]), fmt_ms(m["ttft_p95"])) if streamed else ()
        rows.append(
            (
                shown_name(model),
                m["tier"],
                m["calls"],
                fmt_pct(m["success_rate"]),
                f"{fmt_pct(m['success_rate_lower'])}-{fmt_pct(m['success_rate_upper'])}",
                fmt_ms(m["p50"]),
                fmt_ms(m["p95"]),
                *ttft,
                fmt_usd(m["avg_cost"]),
            )
        )
        if m["sample_size_warning"]:
            calls = m["calls"]
            warnings.append(
                f"{shown_name(model)} in {of}: only {calls} call{'' if calls == 1 else 's'}: the "
                f"success rate is known only to within {fmt_pct(m['success_rate_lower'])}-"
                f"{fmt_pct(m['success_rate_upper'])} (95%)"
            )
    print_table(
        [
            "model",
            "tier",
            "calls",
            "success",
            "95% bounds",
            "p50 ms",
            "p95 ms",
            *(("ttft p50 ms", "ttft p95 ms") if streamed else ()),
            "avg cost",
        ],
        rows,
        title=Shown(title),
    )
    if stats["message"]:
        print(f"note: {printable(stats['message'])}")
    if (note := ahead.note()) is not None:
        print(f"note: {note}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


# --------------------------------------------------------------------------- best


def decision_dict(decision: RoutingDecision) -> dict[str, Any]:
    """A `RoutingDecision` as the JSON the CLI prints."""
    return decision.to_dict()


def cmd_routing_best(args: argparse.Namespace) -> int:
    """Seed a router from the database and ask it for ``workflow``/``stage`` (no exploration)."""
    url = db_url(args.db)
    registry = _registry(args)
    candidates = _best_candidates(args, registry)
    if candidates is not None:  # else checked against the stage's models once read
        _check_on_no_match(args.on_no_match, registry, candidates)
    decision = run_async(lambda: _best_decision(args, url, registry, candidates))
    if args.json:
        emit_json(decision_dict(decision))
        return 0
    _print_best(args, decision)
    return 0


def _best_candidates(args: argparse.Namespace, registry: ModelRegistry) -> list[str] | None:
    """
    The candidates ``--tier`` or ``--candidates`` name, or ``None`` for the stage's own.

    Raises:
        CliError: ``--tier`` names a tier the registry has no model of, ``--candidates``
            is empty or names a model the registry does not know.
    """
    if args.tier is not None:
        tier = [m.id for m in registry.for_tier(args.tier)]
        if not tier:
            raise CliError(
                f"--tier {args.tier}: the registry has no {args.tier} model (its models: "
                f"{', '.join(sorted(m.id for m in registry.models)) or 'none'}; pass "
                "--registry FILE for your own models)",
                code=2,
            )
        return tier
    if args.candidates is None:
        return None
    candidates: list[str] = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if not candidates:
        raise CliError("--candidates needs at least one model id", code=2)
    known = {m.id for m in registry.models}
    unknown = [c for c in candidates if c not in known]
    if unknown:
        raise CliError(
            f"unknown model id(s) in --candidates: {', '.join(unknown)} (known: "
            f"{', '.join(sorted(known))}; pass --registry FILE for your own models)",
            code=2,
        )
    return candidates


async def _best_decision(
    args: argparse.Namespace, url: str, registry: ModelRegistry, candidates: list[str] | None
) -> RoutingDecision:
    """
    The router's decision for the stage, seeded from the database at ``url``.

    Args:
        args: the parsed ``routing best`` arguments (stage and constraints).
        url: the telemetry database, opened read-only.
        registry: the models and prices.
        candidates: the models to choose among; ``None``: those seen in the window.

    Returns:
        The decision, without exploration.

    Raises:
        CliError: no candidates given and no call recorded for the stage in the window,
            or an ``--on-no-match`` model neither recorded nor in the registry.
    """
    policy = RoutingPolicy(explore_rate=0.0, window_days=args.days)
    async with telemetry_from_url(url, **read_only(url)) as backend:
        chosen = candidates
        if chosen is None:
            seen = await stages_seen(backend, args.days, args.workflow, args.stage)
            chosen = sorted({m for _, _, models in seen for m in models})
            if not chosen:
                raise CliError(
                    f"no calls recorded for {_stage_name(args)} in the last "
                    f"{args.days:g} day(s){await recorded_elsewhere(backend, args.days)}; "
                    "pass --tier or --candidates to choose among models without history",
                    shown=True,
                )
            _check_on_no_match(args.on_no_match, registry, chosen)
        async with AdaptiveModelRouter(
            registry, backend, policy=policy, refresh_interval=None, seed=0
        ) as router:
            return router.get_best_model(
                args.workflow,
                args.stage,
                candidates=chosen,
                input_tokens=args.input_tokens,
                max_tokens=args.max_tokens,
                max_cost=args.max_cost,
                max_latency_ms=args.max_latency_ms,
                min_success_rate=args.min_success_rate,
                on_no_match=args.on_no_match,
                max_ttft_ms=args.max_ttft_ms,
            )


def _print_best(args: argparse.Namespace, decision: RoutingDecision) -> None:
    """The decision and its candidates, as tables."""
    print_pairs(
        [
            ("model", shown_name(decision.model)),
            ("constraints met", "yes" if decision.constraints_met else "no"),
            ("reason", decision.reason),
            ("policy applied", decision.policy_applied or "-"),
            ("relaxed", ", ".join(decision.relaxed) or "-"),
        ],
        title=Shown(f"Best model for {_stage_name(args)}"),
    )
    print()
    # the time-to-first-token column only where some candidate streamed or it is asked for
    ttft = args.max_ttft_ms is not None or any(
        c.ttft_p95_ms is not None for c in decision.candidates
    )
    headers = ["candidate", "status", "calls", "success", "95% bounds", "p95 ms"]
    headers += ["ttft p95 ms"] * ttft + ["exp. cost", "notes"]
    print_table(
        headers,
        [
            (
                shown_name(c.model),
                c.status.value,
                c.sample_size,
                fmt_pct(c.success_rate),
                f"{fmt_pct(c.success_rate_lower)}-{fmt_pct(c.success_rate_upper)}",
                fmt_ms(c.latency_p95_ms),
                *([fmt_ms(c.ttft_p95_ms)] if ttft else []),
                fmt_usd(c.expected_cost_usd),
                "; ".join(c.reasons) or None,
            )
            for c in decision.candidates
        ],
        cut=("notes",),
    )


# --------------------------------------------------------------------------- whatif


def cmd_routing_whatif(args: argparse.Namespace) -> int:
    """`empathy_models.whatif.evaluate_policy` for one stage: a table, JSON, or a plot."""
    url = db_url(args.db)
    registry = _registry(args)
    # checked as `routing best` checks them (whatif has no --tier): known ids only
    candidates = _best_candidates(
        argparse.Namespace(tier=None, candidates=args.candidates), registry
    )
    # a registry model only, as a deployed router pins: a model recorded for the stage
    # but not in the registry could not be pinned live (`simulate_policy` refuses it)
    _check_on_no_match(args.on_no_match, registry, candidates or ())
    sweep = _whatif_sweep(args)
    plot = _plot_file(args.plot) if args.plot is not None else None
    options: dict[str, Any] = {
        "max_cost": args.max_cost,
        "max_latency_ms": args.max_latency_ms,
        "max_ttft_ms": args.max_ttft_ms,
        "on_no_match": args.on_no_match,
        "candidates": candidates,
        "input_tokens": args.input_tokens,
        "max_tokens": args.max_tokens,
        "requests": args.requests,
        "replicates": args.replicates,
        "seed": args.seed,
    }
    report, swept, ahead = run_async(lambda: _whatif_reports(args, url, registry, sweep, options))
    if plot is not None:
        _plot_sweep(swept, report, *plot)
    if args.json:
        out = _whatif_json(report, swept, None if plot is None else plot[0])
        emit_json({**out, "stamped_after_now": ahead.to_dict()})
        return 0
    _print_whatif(report)
    if (note := ahead.note()) is not None:
        print(f"note: {note}")
    if plot is not None:
        print(f"\nplot: cost per request against min_success_rate written to {plot[0]}")
    return 0


def _check_on_no_match(value: str, registry: ModelRegistry, candidates: Sequence[str]) -> None:
    """
    ``--on-no-match``: ``raise``, ``relax``, or a model the router can pin (a candidate
    or one of the registry's), checked before any simulated request.

    Raises:
        CliError: anything else, as a usage error naming the choices.
    """
    if value in ("raise", "relax") or value in candidates or value in registry:
        return
    known = sorted({*candidates, *(m.id for m in registry.models)})
    raise CliError(
        f"--on-no-match {value}: expected raise, relax or a model id of the candidates or "
        f"the registry (known: {', '.join(known)}; pass --registry FILE for your own models)",
        code=2,
    )


def _whatif_sweep(args: argparse.Namespace) -> list[float]:
    """
    The ``--sweep`` rates (default `_SWEEP`) for ``--plot``, sorted; none without it.

    Raises:
        CliError: ``--sweep`` without ``--plot``, or a rate outside 0..1.
    """
    if args.plot is None:
        if args.sweep is not None:
            raise CliError("--sweep gives the rates --plot draws: pass --plot FILE.png too", 2)
        return []
    text = _SWEEP if args.sweep is None else args.sweep
    try:
        sweep = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        sweep = []
    if not sweep or any(not 0.0 <= v <= 1.0 for v in sweep):
        raise CliError(f"--sweep: expected numbers between 0 and 1, got {text!r}", 2)
    return sweep


def _plot_file(path: Path) -> tuple[Path, str]:
    """
    The file ``--plot`` writes and its format (its suffix; ``.png`` added to a name
    without one), checked before the simulation runs.

    Raises:
        CliError: no matplotlib, a format it cannot write, a directory, a missing
            directory, or a file or directory the user cannot write.
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    if not path.suffix and not path.is_dir():
        path = path.with_name(path.name.rstrip(".") + ".png")
    if path.is_dir():
        raise CliError(f"--plot {path}: is a directory; name a file, e.g. {path / 'cost.png'}")
    fmt = path.suffix[1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        known = ", ".join(f".{f}" for f in sorted(formats))
        raise CliError(
            f"--plot {path}: matplotlib cannot write .{fmt} files (it writes {known})", 2
        )
    if not path.parent.is_dir():
        why = "is not a directory" if path.parent.exists() else "does not exist"
        raise CliError(f"--plot {path}: {path.parent} {why}")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise CliError(f"--plot {path}: cannot write there (permission denied)")
    return path, fmt


async def _whatif_reports(
    args: argparse.Namespace,
    url: str,
    registry: ModelRegistry,
    sweep: list[float],
    options: dict[str, Any],
) -> tuple[WhatIfReport, list[WhatIfReport], Ahead]:
    """
    The stage's evidence read once, evaluated under the asked policy and over ``sweep``.
    The window is the ``--days`` before now and, as the router counts them, the calls
    stamped after now, up to the newest (`whatif_window`).

    Args:
        args: the parsed ``routing whatif`` arguments.
        url: the telemetry database, opened read-only.
        registry: the models and prices.
        sweep: ``min_success_rate`` values to evaluate too (empty: none).
        options: `simulate_policy` keywords shared by every evaluation.

    Returns:
        The `WhatIfReport`, one report per swept rate, and the calls stamped after now.

    Raises:
        CliError: no call recorded for the stage in the window and no candidates given,
            or calls stamped so far after now that the window would span more than
            `MAX_DAYS`.
    """
    from empathy_models.whatif import (
        evaluate_policy,
        load_stage_evidence,
        sweep_min_success_rate,
    )

    async with telemetry_from_url(url, **read_only(url)) as backend:
        now = datetime.now(UTC)
        ahead = await stamped_ahead(backend, now, workflow=args.workflow, stage=args.stage)
        end, days = whatif_window(now, args.days, ahead)
        if days > MAX_DAYS and ahead.newest is not None:
            calls = "1 call of" if ahead.calls == 1 else f"{ahead.calls} calls of"
            raise CliError(
                f"{calls} {_stage_name(args)} {'is' if ahead.calls == 1 else 'are'} stamped "
                f"after now, the newest at {ahead.newest.isoformat()}: the window, which "
                f"reaches up to it as the router counts such calls, would span {days:.0f} "
                f"days, more than the {MAX_DAYS} it can (a clock far ahead wrote them)",
                shown=True,
            )
        evidence = await load_stage_evidence(
            backend, args.workflow, args.stage, registry=registry, days=days, now=end
        )
        if not evidence.samples and options["candidates"] is None:
            raise CliError(
                f"no calls recorded for {_stage_name(args)} in the last "
                f"{args.days:g} day(s){await recorded_elsewhere(backend, args.days)}; "
                "pass --candidates to evaluate models without history (they will be "
                "reported as unknown)",
                shown=True,
            )
        report = await evaluate_policy(
            backend,
            args.workflow,
            args.stage,
            registry=registry,
            evidence=evidence,
            min_success_rate=args.min_success_rate,
            **options,
        )
        swept: list[WhatIfReport] = []
        if sweep:
            swept = await sweep_min_success_rate(evidence, sweep, registry=registry, **options)
        return report, swept, ahead


def _whatif_json(
    report: WhatIfReport, swept: list[WhatIfReport], plot: Path | None
) -> dict[str, Any]:
    """What ``routing whatif --json`` prints: the report, and the sweep and file when plotted."""
    out = report.to_dict()
    if plot is not None:
        out["plot"] = str(plot)
    if swept:
        out["sweep"] = [
            {
                "min_success_rate": r.constraints["min_success_rate"],
                "cost_per_request": r.cost_per_request.to_dict(),
                "success_rate": r.success_rate.to_dict(),
                "no_match_share": r.no_match_share.to_dict(),
                "unproven_share": r.unproven_share.to_dict(),
            }
            for r in swept
        ]
    return out


def _ci(value: Any, fmt: Any) -> str:
    """``estimate (low-high)`` of an Interval, formatted with ``fmt``."""
    if value.estimate is None:
        return "-"
    return f"{fmt(value.estimate)} ({fmt(value.low)}-{fmt(value.high)})"


def _with_fit(recorded: float | None, fitted: float | None) -> str:
    """A recorded p95, and the log-normal fit's beside it (what the simulation draws from)."""
    if fitted is None:
        return fmt_ms(recorded)
    return f"{fmt_ms(recorded)} (fit {fmt_ms(fitted)})"


def _as_given(value: object) -> str:
    """A bound of the policy as given: 0.9999999 is not 1 (what ``{:g}``'s six digits show)."""
    return f"{value:.15g}" if isinstance(value, float) else str(value)


def _print_whatif(r: Any) -> None:
    c = r.constraints
    policy = ", ".join(
        f"{k}={_as_given(c[k])}"
        for k in ("min_success_rate", "max_latency_ms", "max_ttft_ms", "max_cost", "on_no_match")
        if c[k] is not None
    )
    recorded_share = {t.model: t.recorded_share for t in r.traffic}
    print_pairs(
        [
            ("policy", policy),
            (
                "evidence",
                f"{r.recorded_calls} recorded calls, {r.since:%Y-%m-%d %H:%M} -> "
                f"{r.until:%Y-%m-%d %H:%M} UTC; prices {r.price_version}",
            ),
            ("simulated", f"{r.replicates} replicates x {r.requests} requests (95% intervals)"),
        ],
        title=Shown(
            f"What if {shown_name(r.workflow)}/{shown_name(r.stage)} were routed with this policy"
        ),
    )
    print()
    print_table(
        ["figure", "this policy (95% interval)", "recorded"],
        [
            (
                "cost per request",
                _ci(r.cost_per_request, fmt_usd),
                fmt_usd(r.recorded_cost_per_call),
            ),
            ("cost per 1,000", _ci(r.cost_per_1k, fmt_usd), fmt_usd(r.recorded_cost_per_1k)),
            ("success rate", _ci(r.success_rate, fmt_pct), fmt_pct(r.recorded_success_rate)),
            (
                "p95 latency ms",
                _ci(r.latency_p95_ms, fmt_ms),
                _with_fit(r.recorded_latency_p95_ms, r.fitted_latency_p95_ms),
            ),
            *(
                [
                    (
                        "p95 ttft ms",
                        _ci(r.ttft_p95_ms, fmt_ms),
                        _with_fit(r.recorded_ttft_p95_ms, r.fitted_ttft_p95_ms),
                    )
                ]
                if r.recorded_ttft_p95_ms is not None or r.ttft_p95_ms.estimate is not None
                else []
            ),
            ("no model qualifies", _ci(r.no_match_share, fmt_pct), "-"),
            ("answered, none proven", _ci(r.unproven_share, fmt_pct), "-"),
        ],
    )
    print()
    fits = {m.model: m for m in r.models}
    print_table(
        ["model", "traffic (95% interval)", "recorded", "calls", "success", "cost/call"],
        [
            (
                shown_name(t.model),
                _ci(t.share, fmt_pct),
                fmt_pct(recorded_share.get(t.model)),
                fits[t.model].samples if t.model in fits else 0,
                fmt_pct(t.success_rate) if t.known else "unknown",
                fmt_usd(t.cost_per_call_usd),
            )
            for t in r.traffic
        ],
        title="Which models would take the traffic",
    )
    if r.ipw is not None and r.ipw.cost_per_request.estimate is not None:
        print()
        print(
            f"off-policy check (inverse propensity weighting over {r.ipw.with_propensity} "
            f"recorded calls, effective sample size {r.ipw.effective_sample_size:.0f}): "
            f"cost per request {_ci(r.ipw.cost_per_request, fmt_usd)}, "
            f"success {_ci(r.ipw.success_rate, fmt_pct)}"
        )
    for note in r.notes:
        print(f"note: {printable(note)}")


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _plot_sweep(swept: list[Any], report: Any, path: Path, fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.constraints["min_success_rate"] for r in swept]
    # a cost not estimated (no call of the stage succeeded) is a gap in the line, not $0
    est = [_or_nan(r.cost_per_1k.estimate) for r in swept]
    low = [_or_nan(r.cost_per_1k.low) for r in swept]
    high = [_or_nan(r.cost_per_1k.high) for r in swept]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, est, "o-", label="expected cost per 1,000 requests")
    ax.fill_between(xs, low, high, alpha=0.25, label="95% interval")
    if report.recorded_cost_per_1k is not None:
        ax.axhline(report.recorded_cost_per_1k, linestyle=":", color="black", label="recorded")
    ax.set_xlabel("min_success_rate")
    ax.set_ylabel("USD per 1,000 requests")
    # the names as they are: a "$" in one is not matplotlib's math (a parse error)
    title = f"{report.workflow}/{report.stage}: cost against min_success_rate"
    ax.set_title(title, parse_math=False)
    ax.legend()
    fig.tight_layout()
    try:
        # 0600, as the database and exports: the plot says what the calls cost; a
        # format given, matplotlib writes the file as named
        with open(private_file(path), "wb") as out:
            fig.savefig(out, format=fmt)
    except OSError as exc:
        raise CliError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- upgrades


def cmd_routing_upgrades(args: argparse.Namespace) -> int:
    """`AdaptiveModelRouter.recommend_tier_upgrade` for every stage seen in the window."""
    url = db_url(args.db)
    registry = _registry(args)
    # every stage's recent calls read at start, not the policy's first 1,000: each
    # stage listed is judged on its own calls
    policy = RoutingPolicy(window_days=args.days, seed_stage_limit=sys.maxsize)

    async def body() -> tuple[list[dict[str, Any]], Ahead, str]:
        async with telemetry_from_url(url, **read_only(url)) as backend:
            seen = await stages_seen(backend, args.days, args.workflow, args.stage)
            ahead = await stamped_ahead(
                backend, datetime.now(UTC), workflow=args.workflow, stage=args.stage
            )
            asked = args.workflow is not None or args.stage is not None
            elsewhere = await recorded_elsewhere(backend, args.days) if asked and not seen else ""
            async with AdaptiveModelRouter(
                registry, backend, policy=policy, refresh_interval=None
            ) as router:
                out = []
                for workflow, stage, _ in seen:
                    rec = router.recommend_tier_upgrade(workflow, stage)
                    out.append(
                        {
                            "workflow": workflow,
                            "stage": stage,
                            "should_upgrade": rec.should_upgrade,
                            "suggested_tier": rec.suggested_tier.value
                            if rec.suggested_tier is not None
                            else None,
                            "current_tiers": [t.value for t in rec.current_tiers],
                            "failure_rate": rec.failure_rate,
                            "failures": rec.failures,
                            "window": rec.window,
                            "reason": rec.reason,
                        }
                    )
                return out, ahead, elsewhere

    rows, ahead, elsewhere = run_async(body)
    if args.json:
        emit_json({"stages": rows, "stamped_after_now": ahead.to_dict()})
        return 0
    if not rows:
        of = [] if args.workflow is None else [f"workflow {shown_name(args.workflow)}"]
        of += [] if args.stage is None else [f"stage {shown_name(args.stage)}"]
        asked = f" for {', '.join(of)}" if of else ""
        print(f"No calls recorded{asked} in the last {args.days:g} day(s){elsewhere}.")
        return 0
    print_table(
        ["workflow", "stage", "recent", "failure", "upgrade", "to", "reason"],
        [
            (
                shown_name(r["workflow"]),
                shown_name(r["stage"]),
                r["window"],
                fmt_pct(r["failure_rate"]),
                "yes" if r["should_upgrade"] else "no",
                r["suggested_tier"],
                r["reason"],
            )
            for r in rows
        ],
        cut=("reason",),
    )
    if (note := ahead.note()) is not None:
        print(f"note: {note}")
    return 0
