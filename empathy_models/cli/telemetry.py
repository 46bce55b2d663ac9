"""``empathy-models telemetry``: per-model summary and export of recorded calls."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from empathy_models import LLMCallRecord, telemetry_from_url
from empathy_models.records import ModelPerformance

from ._common import (
    MAX_DAYS,
    CliError,
    Progress,
    SubParsers,
    add_common,
    db_url,
    emit_json,
    fmt_ms,
    fmt_pct,
    fmt_usd,
    number_arg,
    path_arg,
    print_table,
    private_file,
    read_only,
    run_async,
    shown_name,
    sqlite_file,
    typed_name,
    utf8_output,
)
from ._window import Ahead, seen_only_for, stamped_ahead

__all__ = ["cmd_telemetry_export", "cmd_telemetry_summary", "register"]


_MAX_LIMIT = 2**63 - 1
"""The most records ``telemetry export --limit`` takes: what a store's 64-bit integer holds."""

_limit = number_arg(
    int, minimum=1, maximum=_MAX_LIMIT, what="a whole number", too_big=" (2**63 - 1)"
)
_days = number_arg(int, minimum=1, maximum=MAX_DAYS, what="a whole number", too_big=" (100 years)")


_COUNTED = (
    "Calls counts the attempts the router learns from (success, failure, rate_limited, "
    "fatal); breaker rejections, cancellations, ignored and not-sent attempts are left "
    "out (`telemetry export` lists every attempt). Latencies (p50, p95, TTFT) are those "
    "of the successful calls. Cost is what every attempt in the "
    "window cost, those left out of Calls included (a stream abandoned or cut short is "
    "billed for what it used). The window is the days before now and the calls stamped "
    "after now, as the router counts them."
)

_NAME_HELP = " (as the table shows it: (none) for calls without one, a quoted name in its quotes)"


def register(subparsers: SubParsers) -> None:
    """Add the ``telemetry`` command group."""
    group = subparsers.add_parser(
        "telemetry",
        help="recorded calls: per-model summary, export as CSV or JSON lines",
        description="Read the call records in the telemetry database.",
    )
    sub = group.add_subparsers(dest="telemetry_command", metavar="SUBCOMMAND")
    group.set_defaults(func=None, help_parser=group)

    summary = sub.add_parser(
        "summary",
        help="per workflow/stage/model: calls, success, latency, cost",
        description="Per workflow, stage and model: calls, success rate with 95% bounds, "
        f"latency and cost. {_COUNTED}",
    )
    add_common(summary)
    summary.add_argument("--workflow", type=typed_name, help=f"only this workflow{_NAME_HELP}")
    summary.add_argument("--stage", type=typed_name, help=f"only this stage{_NAME_HELP}")
    summary.add_argument("--days", type=_days, default=7, help="window in days (default 7)")
    summary.set_defaults(func=cmd_telemetry_summary)

    export = sub.add_parser(
        "export",
        help="write call records as CSV or JSON lines",
        description="Write every call record (every attempt, whatever its outcome), oldest "
        "first, as CSV with a header or as JSON lines, to stdout or --output; at most the "
        "newest --limit (1,000,000 unless given), a note on stderr saying when older "
        "records were left out. A CSV text cell that a spreadsheet would read as a formula "
        "(starting with =, +, -, @, a tab or a carriage return) is written after a ' ; "
        "JSON lines keep every value as stored.",
    )
    add_common(export, json_flag=False)
    export.add_argument("--format", choices=("csv", "jsonl"), required=True, help="output format")
    export.add_argument(
        "--output", "-o", type=_output_arg, default=None, help="file (default, or '-': stdout)"
    )
    export.add_argument("--workflow", type=typed_name, help=f"only this workflow{_NAME_HELP}")
    export.add_argument("--stage", type=typed_name, help=f"only this stage{_NAME_HELP}")
    export.add_argument("--days", type=_days, default=None, help="only the last N days")
    export.add_argument("--limit", type=_limit, default=1_000_000, help="at most N newest records")
    export.set_defaults(func=cmd_telemetry_export)


def _since(days: int | None) -> datetime | None:
    return None if days is None else datetime.now(UTC) - timedelta(days=days)


def performance_row(p: ModelPerformance, spent: float | None = None) -> dict[str, Any]:
    """
    A `ModelPerformance` as the JSON the CLI prints; ``spent``: what every attempt of
    its group cost (`TelemetryBackend.spend`; default: its samples' cost).
    """
    low, high = p.success_rate_bounds
    samples_cost = p.avg_cost_usd * p.sample_size
    return {
        "workflow": p.workflow,
        "stage": p.stage,
        "model": p.model,
        "provider": p.provider,
        "tier": p.tier.value if p.tier is not None else None,
        "calls": p.sample_size,
        "successes": p.successes,
        "success_rate": p.success_rate,
        "success_rate_lower": low,
        "success_rate_upper": high,
        "latency_p50_ms": p.latency_p50_ms,
        "latency_p95_ms": p.latency_p95_ms,
        "ttft_p50_ms": p.ttft_p50_ms,
        "ttft_p95_ms": p.ttft_p95_ms,
        "avg_cost_usd": p.avg_cost_usd,
        "samples_cost_usd": samples_cost,
        "total_cost_usd": samples_cost if spent is None else spent,
    }


def _spend_only_row(key: tuple[str | None, str | None, str], spent: float) -> dict[str, Any]:
    """The row of a (workflow, stage, model) whose attempts in the window were none samples."""
    workflow, stage, model = key
    return {
        "workflow": workflow,
        "stage": stage,
        "model": model,
        "provider": None,
        "tier": None,
        "calls": 0,
        "successes": 0,
        "success_rate": None,
        "success_rate_lower": None,
        "success_rate_upper": None,
        "latency_p50_ms": None,
        "latency_p95_ms": None,
        "ttft_p50_ms": None,
        "ttft_p95_ms": None,
        "avg_cost_usd": None,
        "samples_cost_usd": 0.0,
        "total_cost_usd": spent,
    }


def _summary_rows(
    perf: list[ModelPerformance], spend: dict[tuple[str | None, str | None, str], float]
) -> list[dict[str, Any]]:
    """
    Each group's row, its cost every attempt's; a group of no sample gets a row when its
    attempts cost something (breaker rejections, cache hits and calls not sent cost
    nothing: a row of no calls and no cost would say nothing).
    """
    rows = [performance_row(p, spend.pop((p.workflow, p.stage, p.model), None)) for p in perf]
    rows.extend(_spend_only_row(key, spent) for key, spent in spend.items() if spent)
    rows.sort(key=lambda r: (r["workflow"] or "", r["stage"] or "", r["model"]))
    return rows


def cmd_telemetry_summary(args: argparse.Namespace) -> int:
    """Aggregate the window per (workflow, stage, model) and print it."""
    url = db_url(args.db)

    async def body() -> tuple[list[dict[str, Any]], Ahead, str | None]:
        now = datetime.now(UTC)
        since = now - timedelta(days=args.days)
        names = {"workflow": args.workflow, "stage": args.stage}
        async with telemetry_from_url(url, **read_only(url)) as backend:
            perf = await backend.aggregate(**names, since=since)
            spend = await backend.spend(**names, since=since)
            ahead = await stamped_ahead(backend, now, **names)
            rows = _summary_rows(perf, spend)
            # a workflow or stage asked for without calls (a typo?): where there are some
            quiet = not rows and (args.workflow is not None or args.stage is not None)
            elsewhere = await seen_only_for(backend, args.days) if quiet else None
        return rows, ahead, elsewhere

    rows, ahead, elsewhere = run_async(body)
    if args.json:
        emit_json(
            {
                "days": args.days,
                "counted": _COUNTED,
                "models": rows,
                "total_cost_usd": sum(r["total_cost_usd"] for r in rows),
                "stamped_after_now": ahead.to_dict(),
            }
        )
        return 0
    # time-to-first-token columns only when some call in the window was streamed
    streamed = any(r["ttft_p50_ms"] is not None for r in rows)
    table = [
        (
            shown_name(r["workflow"]),
            shown_name(r["stage"]),
            shown_name(r["model"]),
            r["calls"],
            fmt_pct(r["success_rate"]),
            f"{fmt_pct(r['success_rate_lower'])}-{fmt_pct(r['success_rate_upper'])}"
            if r["calls"]
            else "-",
            fmt_ms(r["latency_p50_ms"]),
            fmt_ms(r["latency_p95_ms"]),
            *((fmt_ms(r["ttft_p50_ms"]), fmt_ms(r["ttft_p95_ms"])) if streamed else ()),
            fmt_usd(r["total_cost_usd"]),
        )
        for r in rows
    ]
    print_table(
        [
            "workflow",
            "stage",
            "model",
            "calls",
            "success",
            "95% bounds",
            "p50 ms",
            "p95 ms",
            *(("TTFT p50 ms", "TTFT p95 ms") if streamed else ()),
            "cost",
        ],
        table,
        title=f"Calls in the last {args.days} day(s)",
    )
    if rows:
        calls = sum(r["calls"] for r in rows)
        cost = sum(r["total_cost_usd"] for r in rows)
        print(f"total: {calls} call{'' if calls == 1 else 's'}, {fmt_usd(cost)}")
    if (note := ahead.note()) is not None:
        print(f"note: {note}")
    if elsewhere is not None:
        print(elsewhere)
    print(f"note: {_COUNTED}")
    return 0


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a CSV cell as a formula (OWASP's CSV injection list)."""


def _csv_value(value: object) -> object:
    """
    A record's value as a CSV cell: lists and mappings as JSON, None empty, and a text
    that a spreadsheet would run as a formula (an answer, a prompt, a provider's error:
    text the exporter cannot vouch for) after a ``'``, which shows it as text.
    """
    if isinstance(value, str):
        return "'" + value if value.startswith(_FORMULA_STARTS) else value
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if value is None:
        return ""
    return value


def _write(records: list[LLMCallRecord], fmt: str, out: IO[str]) -> None:
    # records printed on a terminal show how far it is: no bar drawn among them
    with Progress(len(records), "export", output=out) as bar:
        if fmt == "jsonl":
            for record in records:
                out.write(json.dumps(record.to_dict(), separators=(",", ":")) + "\n")
                bar.advance()
            return
        header = list(LLMCallRecord(provider="-", model="-", outcome="success").to_dict())
        writer = csv.DictWriter(out, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: _csv_value(v) for k, v in record.to_dict().items()})
            bar.advance()


def _output_arg(text: str) -> Path | None:
    """
    ``--output``: ``None`` for ``-`` (stdout), else the file's path (`path_arg`), told
    apart as written: ``./-`` is the file named ``-``, though a `Path` of either is "-".
    """
    return None if text == "-" else path_arg(text)


def _check_output(output: Path, url: str) -> None:
    """
    Refuse an ``--output`` that is the SQLite database being exported (or its
    ``-wal``, ``-shm`` or ``-journal`` file): writing the export would destroy it.
    """
    db = sqlite_file(url)
    if db is None:
        return
    for name in ("", "-wal", "-shm", "-journal"):
        try:
            same = os.path.samefile(output, f"{db}{name}")
        except (OSError, ValueError):  # either does not exist (or cannot be looked at)
            continue
        if same:
            raise CliError(
                f"--output {shown_name(str(output))} is the database being exported "
                f"({shown_name(str(db))}): writing it would destroy the records; choose "
                "another file",
                2,
                shown=True,
            )


def cmd_telemetry_export(args: argparse.Namespace) -> int:
    """Write the matching records, oldest first, as CSV (with a header) or JSON lines."""
    url = db_url(args.db)
    to_file = args.output is not None  # "-" is None (`_output_arg`), "./-" a file
    if to_file:
        _check_output(args.output, url)

    limit: int = args.limit

    async def body() -> list[LLMCallRecord]:
        async with telemetry_from_url(url, **read_only(url)) as backend:
            return await backend.recent(  # one more: whether the limit left records out
                limit=min(limit + 1, _MAX_LIMIT),
                workflow=args.workflow,
                stage=args.stage,
                since=_since(args.days),
            )

    newest = run_async(body)
    if len(newest) > limit:
        del newest[limit:]
        print(
            f"telemetry export: only the newest {limit} records: older ones were left out "
            f"(--limit {limit})",
            file=sys.stderr,
        )
    records = list(reversed(newest))
    if not to_file:
        with utf8_output(sys.stdout) as out:  # as a file gets them, whatever the locale's
            _write(records, args.format, out)
        return 0
    try:
        with open(private_file(args.output), "w", encoding="utf-8", newline="") as out:
            _write(records, args.format, out)
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror}") from exc
    name = str(args.output)
    name = "./-" if name == "-" else name  # the file, not stdout
    print(f"Wrote {len(records)} record(s) to {shown_name(name)}", file=sys.stderr)
    return 0
