"""
A fast router-level simulation of routing quality, for tuning the router.

Seven models with known truth in one tier; each request asks the router, draws the
outcome from the chosen model's truth, records it in a telemetry backend (memory by
default) and reports it to the router, as the executor does.  One request per
simulated second; the router refreshes from the backend on its default interval.
Figures: cost against the oracle (the cheapest truly compliant model every time), the
share of requests after warm-up served by a truly violating model, exploration share,
calls until a degrading model loses its non-exploration traffic, requests until a
recovered model regains 90% of the traffic, false alarms of the change test.

Run: ``python -m benchmarks._routing_sim [--seeds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from attrs import define, field

from empathy_models import (
    AdaptiveModelRouter,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    Outcome,
    RoutingPolicy,
)
from empathy_models.abc import TelemetryBackend
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.testing.clock import FakeClock

MIN_SUCCESS = 0.95
MAX_LATENCY_MS = 1000.0
INPUT_TOKENS = 500
MAX_TOKENS = 1000
WARM_UP = 500
WF, ST = "sim", "answer"


@define
class Truth:
    """One model's truth: prices per million tokens, success rate, latency, verbosity."""

    id: str
    input_price: float
    output_price: float
    success: float
    median_ms: float = 300.0
    output_tokens: float = 200.0
    sigma: float = 0.3
    history: int = 0  # calls of it already in the store (7 days of history)


def models() -> list[Truth]:
    return [
        Truth("near-gate", 0.5, 2.0, 0.93),  # cheapest, just under the success gate
        Truth("slow", 0.6, 2.4, 0.995, median_ms=1600.0),  # violates latency
        Truth("oracle", 1.0, 4.0, 0.99),  # cheapest compliant; worst case > max_cost
        Truth("verbose", 0.8, 3.2, 0.99, output_tokens=1200.0),  # expected cost > max_cost
        Truth("solid", 1.5, 6.0, 0.995),
        Truth("premium", 3.0, 12.0, 0.998),
        Truth("flagship", 6.0, 24.0, 0.999),
    ]


def expected_cost(m: Truth) -> float:
    return (INPUT_TOKENS * m.input_price + m.output_tokens * m.output_price) / 1e6


# max_cost: the oracle's expected cost fits, its worst case (MAX_TOKENS out) does not
MAX_COST = 2.0 * expected_cost(models()[2])


def registry(ms: Sequence[Truth]) -> ModelRegistry:
    return ModelRegistry(
        models=tuple(
            ModelInfo(
                id=m.id,
                provider="openai",
                tier="cheap",
                input_price_per_mtok=m.input_price,
                output_price_per_mtok=m.output_price,
                context_window=64_000,
                max_output_tokens=4096,
            )
            for m in ms
        ),
        price_version="sim",
    )


def violates(m: Truth) -> bool:
    p95 = m.median_ms * math.exp(1.6449 * m.sigma)
    return m.success < MIN_SUCCESS or p95 > MAX_LATENCY_MS or expected_cost(m) > MAX_COST


def draw(m: Truth, rng: random.Random, clock: float) -> LLMCallRecord:
    ok = rng.random() < m.success
    latency = rng.lognormvariate(math.log(m.median_ms), m.sigma)
    out = max(1, int(rng.lognormvariate(math.log(m.output_tokens), 0.3))) if ok else 0
    return LLMCallRecord(
        provider="openai",
        model=m.id,
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        timestamp=datetime.fromtimestamp(clock, UTC),
        workflow=WF,
        stage=ST,
        input_tokens=INPUT_TOKENS,
        output_tokens=out,
        cost_usd=(INPUT_TOKENS * m.input_price + out * m.output_price) / 1e6,
        latency_ms=latency,
    )


@define
class Run:
    picks: list[str] = field(factory=list)
    explored: list[bool] = field(factory=list)
    changes: list[str | None] = field(factory=list)
    cost: float = 0.0
    oracle_cost: float = 0.0
    errors: int = 0


async def simulate(
    seed: int,
    *,
    requests: int = 5000,
    degrade: tuple[int, int] | None = None,
    history_days: float = 0.0,
    store: TelemetryBackend | None = None,
    policy: RoutingPolicy | None = None,
) -> Run:
    rng = random.Random(seed)
    ms = models()
    truth = {m.id: m for m in ms}
    oracle = truth["oracle"]
    clock = FakeClock()
    store = store if store is not None else MemoryTelemetryBackend(capacity=10_000_000)
    if history_days:
        # a week in which the oracle served most calls and the others a few
        n = int(history_days * 2000)
        t0 = clock() - history_days * 86400.0
        recs = []
        for i in range(n):
            m = oracle if i % 10 else ms[i // 10 % len(ms)]
            recs.append(draw(m, rng, t0 + i * history_days * 86400.0 / n))
        await store.record_many(recs)
    router = AdaptiveModelRouter(
        registry(ms), store, seed=seed, clock=clock, policy=policy, refresh_interval=None
    )
    run = Run()
    await router.start()
    last_refresh = clock()
    ids = [m.id for m in ms]
    for i in range(requests):
        if degrade is not None:
            oracle.success = 0.80 if degrade[0] <= i < degrade[1] else 0.99
        if clock() - last_refresh >= 60.0:
            await router.refresh()
            last_refresh = clock()
        try:
            d = router.get_best_model(
                WF,
                ST,
                candidates=ids,
                input_tokens=INPUT_TOKENS,
                max_tokens=MAX_TOKENS,
                max_cost=MAX_COST,
                max_latency_ms=MAX_LATENCY_MS,
                min_success_rate=MIN_SUCCESS,
            )
        except Exception:
            run.errors += 1
            run.picks.append("")
            run.explored.append(False)
            run.changes.append(None)
            clock.advance(1.0)
            continue
        m = truth[d.model]
        rec = draw(m, rng, clock())
        clock.advance(min(rec.latency_ms / 1000.0, 0.9))
        await store.record(rec)
        router.record_outcome(rec)
        run.picks.append(m.id)
        run.explored.append(d.exploration)
        run.changes.append(d.change)
        run.cost += rec.cost_usd
        clock.advance(1.0 - min(rec.latency_ms / 1000.0, 0.9))
    await router.aclose()
    run.oracle_cost = requests * expected_cost(oracle)
    return run


def violation_share(run: Run, degrade: tuple[int, int] | None = None) -> float:
    truth = {m.id: m for m in models()}
    bad = 0
    for i, p in enumerate(run.picks[WARM_UP:], start=WARM_UP):
        if not p:
            continue
        m = truth[p]
        if violates(m) or (p == "oracle" and degrade is not None and degrade[0] <= i < degrade[1]):
            bad += 1
    return bad / max(1, len(run.picks) - WARM_UP)


def leave_calls(run: Run, start: int, end: int) -> int:
    """Non-exploration calls the degraded model served after ``start``, before it lost them."""
    last = start
    count = 0
    for i in range(start, end):
        if run.picks[i] == "oracle" and not run.explored[i]:
            count += 1
            last = i
    del last
    return count


def regain_requests(run: Run, start: int, window: int = 100) -> int | None:
    """Requests after ``start`` until the oracle holds >= 90% of a 100-request window."""
    for i in range(start, len(run.picks) - window + 1):
        share = sum(1 for p in run.picks[i : i + window] if p == "oracle") / window
        if share >= 0.9:
            return i - start + window
    return None


def summary(values: Sequence[float]) -> str:
    return f"median {statistics.median(values):.3g}, worst {max(values):.3g}"


async def main_async(seeds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cost, viol, expl = [], [], []
    for seed in range(seeds):
        run = await simulate(seed)
        cost.append(run.cost / run.oracle_cost)
        viol.append(violation_share(run))
        expl.append(sum(run.explored[WARM_UP:]) / (len(run.picks) - WARM_UP))
        print(
            f"  seed {seed}: cost {cost[-1]:.3f}, violations {viol[-1]:.4f}, "
            f"exploration {expl[-1]:.4f}"
        )
    print(
        f"stationary: cost/oracle {summary(cost)}; violations after warm-up {summary(viol)}; "
        f"exploration after warm-up {summary(expl)}"
    )
    out["stationary"] = {"cost": cost, "violations": viol, "exploration": expl}
    degrade = (2000, 3000)
    leave, regain, viol2, cost2 = [], [], [], []
    for seed in range(seeds):
        run = await simulate(seed, degrade=degrade, history_days=7.0)
        leave.append(leave_calls(run, degrade[0], degrade[1]))
        r = regain_requests(run, degrade[1])
        regain.append(r if r is not None else 99999)
        viol2.append(violation_share(run, degrade))
        cost2.append(run.cost / run.oracle_cost)
        print(
            f"  seed {seed}: leave {leave[-1]}, regain {regain[-1]}, "
            f"violations {viol2[-1]:.4f}, cost {cost2[-1]:.3f}"
        )
    print(
        f"degrade+recover with 7 days of history: calls to leave {summary(leave)}; "
        f"requests to regain 90% {summary(regain)}; violations {summary(viol2)}; "
        f"cost/oracle {summary(cost2)}"
    )
    out["degrade"] = {"leave": leave, "regain": regain, "violations": viol2}
    return out


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("empathy_models").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.seeds))


if __name__ == "__main__":
    main()
