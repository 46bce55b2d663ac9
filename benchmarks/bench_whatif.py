"""
What-if (``empathy-models routing whatif``): how long it takes on a big stage, and how
right it is where the truth is known.

**Time.**  One workflow stage with 10k and 100k recorded calls (four models, spread over
7 days, in a real SQLite file); `empathy_models.whatif.evaluate_policy` with its
defaults (30 replicates x 400 simulated requests through the real router, plus the
off-policy check over the newest 5,000 calls, and ``aggregate()`` over the window for
each model's recorded p95).  Bar: under 5 s at 100k calls.  For scale, the same run
reads the evidence rollups, not the rows: reading every row of the stage
(``recent(limit=calls)``) is timed beside it.

**Accuracy.**  The known-truth store of ``tests/test_whatif.py`` (3,000 calls over a
week; min_success_rate 0.95): the cheaper model is truly below the gate, so the policy's
true cost per request is the oracle model's true expected cost (case A), or, with only
the two pricier models as candidates, the cheaper of them (case B).  Over seeds: the
worst relative error of the estimate and the share of seeds whose 95% interval covers
the truth.  Bars: within 5%, covered in >= 90% of seeds.

``--quick`` (CI: that the code runs, not figures): 3k calls, one run, 2 seeds of 1,500
calls, and every simulation 10 replicates x 200 requests.

Run: ``python -m benchmarks.bench_whatif [--quick]``
"""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks._common import BenchResult, script_main
from empathy_models import LLMCallRecord, Outcome
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.whatif import evaluate_policy, load_stage_evidence, simulate_policy
from tests._whatif_synth import BY_ID, NOW, REGISTRY, ST, TRUTH, WF, history

TIME_BAR_S = 5.0
ERROR_BAR = 0.05
COVERAGE_BAR = 0.90


def _big_history(calls: int, seed: int = 0) -> list[LLMCallRecord]:
    """``calls`` attempts over the week before NOW (minute buckets fill up, as in real use)."""
    rng = random.Random(seed)
    models = list(TRUTH)
    weights = [t.share for t in models]
    span = 7 * 86_400.0
    out = []
    for i in range(calls):
        t = rng.choices(models, weights)[0]
        ok = rng.random() < t.success
        tokens = rng.randint(*t.output_tokens) if ok else 0
        out.append(
            LLMCallRecord(
                provider="openai",
                model=t.model,
                outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                timestamp=NOW - timedelta(seconds=span * (1 - (i + 0.5) / calls)),
                workflow=WF,
                stage=ST,
                input_tokens=500 if ok else 0,
                output_tokens=tokens,
                cost_usd=(500 * t.input_price + tokens * t.output_price) / 1e6 if ok else 0.0,
                latency_ms=rng.lognormvariate(0, 0.3) * t.median_ms,
            )
        )
    return out


async def _timing(
    result: BenchResult, sizes: list[int], repeats: int, options: dict[str, Any]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for calls in sizes:
            db = Path(tmp) / f"calls-{calls}.db"
            records = _big_history(calls)
            async with SQLiteTelemetryBackend(db) as backend:
                for i in range(0, calls, 5_000):
                    await backend.record_many(records[i : i + 5_000])
                await backend.flush()  # all of it in the file, none left to the exit spool
            walls: list[float] = []
            rows: list[float] = []
            for _ in range(repeats):
                async with SQLiteTelemetryBackend(db, read_only=True) as backend:
                    t0 = time.perf_counter()
                    report = await evaluate_policy(
                        backend,
                        WF,
                        ST,
                        registry=REGISTRY,
                        now=NOW,
                        min_success_rate=0.95,
                        **options,
                    )
                    walls.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    everything = await backend.recent(limit=calls, workflow=WF, stage=ST)
                    rows.append(time.perf_counter() - t0)
                    read = len(everything)
            wall = statistics.median(walls)
            result.add(
                f"{calls:,} calls",
                **{
                    "whatif s (median)": wall,
                    "read every row s": statistics.median(rows),
                    "rows read": read,
                    "ratio": wall / statistics.median(rows),
                    "bar s": TIME_BAR_S,
                    "met": "yes" if wall < TIME_BAR_S else "NO",
                    "top model": report.traffic[0].model,
                },
            )
            result.data.setdefault("timing", {})[calls] = {"walls": walls, "rows": rows}


async def _accuracy(result: BenchResult, seeds: int, calls: int, options: dict[str, Any]) -> None:
    cases = {"A (oracle)": (None, "oracle"), "B (pricey)": (["pricey", "premium"], "pricey")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (candidates, chosen) in cases.items():
            truth = BY_ID[chosen].cost_per_call
            errors: list[float] = []
            covered = 0
            for seed in range(seeds):
                async with SQLiteTelemetryBackend(Path(tmp) / f"{name[0]}{seed}.db") as backend:
                    await backend.record_many(history(seed, calls))
                    await backend.flush()
                    evidence = await load_stage_evidence(
                        backend, WF, ST, registry=REGISTRY, now=NOW
                    )
                report = await simulate_policy(
                    evidence,
                    registry=REGISTRY,
                    min_success_rate=0.95,
                    candidates=candidates,
                    seed=seed,
                    **options,
                )
                assert report.cost_per_request.estimate is not None
                errors.append(report.cost_per_request.estimate / truth - 1.0)
                covered += report.cost_per_request.covers(truth)
            worst = max(abs(e) for e in errors)
            result.add(
                f"accuracy {name}, {seeds} seeds",
                **{
                    "worst error %": 100 * worst,
                    "median error %": 100 * statistics.median(abs(e) for e in errors),
                    "covered %": 100 * covered / seeds,
                    "met": "yes"
                    if worst <= ERROR_BAR and covered >= COVERAGE_BAR * seeds
                    else "NO",
                },
            )
            result.data.setdefault("accuracy", {})[name] = errors


async def run(quick: bool) -> BenchResult:
    logging.getLogger("empathy_models").setLevel(logging.ERROR)
    result = BenchResult(
        name="whatif",
        title="What-if: time on a big stage, accuracy against known truth",
        columns=[
            "whatif s (median)",
            "read every row s",
            "rows read",
            "ratio",
            "bar s",
            "top model",
            "worst error %",
            "median error %",
            "covered %",
            "met",
        ],
    )
    # quick: smaller simulations (the full run keeps simulate_policy's defaults)
    options: dict[str, Any] = {"replicates": 10, "requests": 200} if quick else {}
    await _timing(result, [3_000] if quick else [10_000, 100_000], 1 if quick else 3, options)
    await _accuracy(result, 2 if quick else 40, 1_500 if quick else 3_000, options)
    result.notes.append(
        "evaluate_policy defaults: 30 replicates x 400 simulated requests, IPW over the "
        "newest 5,000 calls; SQLite file; times are wall-clock medians of "
        f"{1 if quick else 3} runs"
    )
    if quick:
        result.notes.append(
            "quick run: every simulation 10 replicates x 200 requests; 1,500 calls per seed"
        )
    result.notes.append(
        "accuracy truth: the true expected cost of the cheapest truly compliant model; "
        "the simulated router's transients (a false change alarm, a warm-up of a cheaper "
        "model) are part of the estimate, as they are of a deployment"
    )
    result.data["when"] = datetime.now(UTC).isoformat()
    return result


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
