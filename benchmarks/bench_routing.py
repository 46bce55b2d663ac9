"""
Routing decision latency: ``AdaptiveModelRouter.get_best_model`` for 4 / 16 / 64
candidates after 1k / 100k / 1M recorded calls, against LiteLLM Router's deployment
selection (simple-shuffle, latency-based, cost-based, least-busy) for the same number
of deployments.

History is fed the way the executor feeds it (``record_outcome`` per call); a decision
reads only the per-model summaries, so its cost should not depend on the history size.
LiteLLM runs offline (local cost map) and only its selection is timed
(``async_get_available_deployment``), no completion.

Run: ``python -m benchmarks.bench_routing [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
import warnings
from datetime import UTC, datetime
from typing import Any

from benchmarks._common import (
    RESULTS_DIR,
    BenchResult,
    async_timeit,
    peer_version,
    summarize,
    timeit,
    write_result,
)
from empathy_models import (
    AdaptiveModelRouter,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    ModelTier,
    Outcome,
)

CANDIDATES = (4, 16, 64)


def make_registry(n: int) -> ModelRegistry:
    rng = random.Random(n)
    models = tuple(
        ModelInfo(
            id=f"model-{i:03d}",
            provider="anthropic" if i % 2 else "openai",
            tier=ModelTier.CAPABLE,
            input_price_per_mtok=round(rng.uniform(0.1, 15.0), 3),
            output_price_per_mtok=round(rng.uniform(0.4, 75.0), 3),
            context_window=200_000,
            max_output_tokens=8_192,
        )
        for i in range(n)
    )
    return ModelRegistry(models=models, price_version="bench")


def feed(router: AdaptiveModelRouter, ids: list[str], history: int) -> float:
    """Feed ``history`` outcomes round-robin over ``ids``; return seconds taken."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    profiles = {m: (rng.uniform(0.85, 0.999), rng.uniform(100, 2_000)) for m in ids}
    # a few distinct records per model, re-used: we time the router, not record creation
    pool: dict[str, list[LLMCallRecord]] = {}
    for m in ids:
        ok, lat = profiles[m]
        pool[m] = [
            LLMCallRecord(
                provider="openai",
                model=m,
                outcome=Outcome.SUCCESS if rng.random() < ok else Outcome.FAILURE,
                workflow="bench",
                stage="answer",
                latency_ms=rng.lognormvariate(0, 0.3) * lat,
                input_tokens=500,
                output_tokens=rng.randint(100, 400),
                cost_usd=0.001,
                timestamp=now,
            )
            for _ in range(16)
        ]
    t0 = time.perf_counter()
    n = len(ids)
    for i in range(history):
        m = ids[i % n]
        router.record_outcome(pool[m][(i // n) % 16])
    return time.perf_counter() - t0


def bench_ours(histories: tuple[int, ...], repeats: int, inner: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in CANDIDATES:
        registry = make_registry(n)
        ids = [m.id for m in registry.models]
        for history in histories:
            router = AdaptiveModelRouter(registry, seed=1, refresh_interval=None)
            fed = feed(router, ids, history)

            def decide(router: AdaptiveModelRouter = router, ids: list[str] = ids) -> object:
                return router.get_best_model(
                    "bench",
                    "answer",
                    candidates=ids,
                    input_tokens=500,
                    max_tokens=400,
                    max_cost=0.05,
                    min_success_rate=0.8,
                    on_no_match="relax",
                )

            timeit(decide, repeats=1, inner=200)
            samples = timeit(decide, repeats=repeats, inner=inner)
            out[f"{n}/{history}"] = {**summarize(samples), "feed_s": fed}
    return out


async def bench_litellm(repeats: int, inner: int) -> tuple[dict[str, Any], str | None]:
    if not peer_version("litellm"):
        return {}, "not installed (pip install -r benchmarks/requirements-peers.txt)"
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    warnings.filterwarnings("ignore")
    import litellm
    from litellm import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    real = ["gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-3.5-turbo", "gpt-4-turbo"]
    out: dict[str, Any] = {}
    messages = [{"role": "user", "content": "hello"}]
    for strategy in ("simple-shuffle", "latency-based-routing", "cost-based-routing", "least-busy"):
        for n in CANDIDATES:
            model_list = [
                {
                    "model_name": "group",
                    "litellm_params": {
                        "model": f"openai/{real[i % len(real)]}",
                        "api_key": "sk-offline",
                        "api_base": f"http://127.0.0.1:9/{i}",
                        "mock_response": "hi",
                    },
                    "model_info": {"id": f"dep-{i}"},
                }
                for i in range(n)
            ]
            router = Router(model_list=model_list, routing_strategy=strategy, num_retries=0)

            async def select(router: Any = router) -> object:
                return await router.async_get_available_deployment(
                    model="group", messages=messages, request_kwargs={}
                )

            await async_timeit(select, repeats=1, inner=20)
            samples = await async_timeit(select, repeats=repeats, inner=max(5, inner // 20))
            out[f"{strategy}/{n}"] = summarize(samples)
    return out, None


async def run(quick: bool = False) -> BenchResult:
    histories = (1_000, 100_000) if quick else (1_000, 100_000, 1_000_000)
    repeats, inner = (5, 500) if quick else (15, 2_000)
    ours = bench_ours(histories, repeats, inner)
    peers, skipped = await bench_litellm(repeats, inner)
    result = BenchResult(
        name="routing",
        title="Routing decision latency, p50 / p99 (µs)",
        columns=[f"{n} candidates" for n in CANDIDATES],
    )
    for history in histories:
        result.add(
            f"empathy-models, {history:,} calls of history",
            **{
                f"{n} candidates": f"{ours[f'{n}/{history}']['median']:.1f} / "
                f"{ours[f'{n}/{history}']['p99']:.1f}"
                for n in CANDIDATES
            },
        )
    fastest: dict[int, float] = {}
    for key, stats in peers.items():
        count = int(key.rsplit("/", 1)[1])
        fastest[count] = min(fastest.get(count, float("inf")), stats["median"])
    for strategy in ("simple-shuffle", "latency-based-routing", "cost-based-routing", "least-busy"):
        if f"{strategy}/4" in peers:
            result.add(
                f"LiteLLM Router, {strategy}",
                **{
                    f"{n} candidates": f"{peers[f'{strategy}/{n}']['median']:.1f} / "
                    f"{peers[f'{strategy}/{n}']['p99']:.1f}"
                    for n in CANDIDATES
                },
            )
    if skipped:
        result.skipped["litellm"] = skipped
    if fastest:
        small = min(histories)
        result.add(
            "speed-up vs LiteLLM's fastest strategy",
            **{
                f"{n} candidates": f"{fastest[n] / ours[f'{n}/{small}']['median']:.0f}x"
                for n in CANDIDATES
            },
        )
    big, small = max(histories), min(histories)
    for n in CANDIDATES:
        ratio = ours[f"{n}/{big}"]["median"] / ours[f"{n}/{small}"]["median"]
        result.notes.append(
            f"{n} candidates: {big:,}-call history vs {small:,}: {ratio:.2f}x decision time"
        )
    per_call = {
        h: statistics.median([ours[f"{n}/{h}"]["feed_s"] / h * 1e6 for n in CANDIDATES])
        for h in histories
    }
    result.notes.append(
        "feeding history through record_outcome: "
        + ", ".join(f"{v:.2f} µs/call at {h:,}" for h, v in per_call.items())
    )
    result.data = {"ours": ours, "litellm": peers}
    _plot(ours, peers, histories)
    return result


def _plot(ours: dict[str, Any], peers: dict[str, Any], histories: tuple[int, ...]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for h in histories:
        ax.plot(
            CANDIDATES,
            [ours[f"{n}/{h}"]["median"] for n in CANDIDATES],
            marker="o",
            label=f"empathy-models ({h:,} calls)",
        )
    for strategy in ("simple-shuffle", "latency-based-routing", "cost-based-routing", "least-busy"):
        if f"{strategy}/4" in peers:
            ax.plot(
                CANDIDATES,
                [peers[f"{strategy}/{n}"]["median"] for n in CANDIDATES],
                marker="x",
                linestyle="--",
                label=f"LiteLLM {strategy}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("candidates")
    ax.set_ylabel("median decision time (µs)")
    ax.set_title("Routing decision latency vs candidates")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "routing_latency.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    write_result(asyncio.run(run(quick=args.quick)))


if __name__ == "__main__":
    main()
