"""
Routing decision latency: ``AdaptiveModelRouter.get_best_model`` for 4 / 16 / 64
candidates after 1k / 100k / 1M recorded calls, against LiteLLM Router's deployment
selection (simple-shuffle, latency-based, cost-based, least-busy) for the same number
of deployments.

History is fed the way the executor feeds it (``record_outcome`` per call); a decision
reads only the per-model summaries, so its cost should not depend on the history size.
The headline rows time decisions the way the executor makes them: before each one an
outcome is recorded for one of the candidates (round-robin) and the prompt size
(``input_tokens``) changes, so nothing a router caches stays valid for free.  A second
row repeats one decision on unchanged state, for reference.

LiteLLM runs offline (local cost map) and only its selection is timed, no completion:
both ``get_available_deployment`` (sync, like ours) and
``async_get_available_deployment`` (what ``acompletion`` uses); the baseline of the
speed-up is the fastest strategy *and* API.  Every figure is timed per call
(``perf_counter_ns`` around the call alone, garbage collector left on for both sides):
medians and p99 over all calls.

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
    peer_version,
    summarize,
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
STRATEGIES = ("simple-shuffle", "latency-based-routing", "cost-based-routing", "least-busy")
PROMPT_TOKENS = (500, 731, 1_200, 350, 2_048, 96)


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


def make_pool(ids: list[str]) -> dict[str, list[LLMCallRecord]]:
    """A few distinct records per model, re-used: we time the router, not record creation."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    profiles = {m: (rng.uniform(0.85, 0.999), rng.uniform(100, 2_000)) for m in ids}
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
    return pool


def feed(
    router: AdaptiveModelRouter, ids: list[str], pool: dict[str, list[LLMCallRecord]], history: int
) -> float:
    """Feed ``history`` outcomes round-robin over ``ids``; return seconds taken."""
    t0 = time.perf_counter()
    n = len(ids)
    for i in range(history):
        m = ids[i % n]
        router.record_outcome(pool[m][(i // n) % 16])
    return time.perf_counter() - t0


def bench_ours(histories: tuple[int, ...], calls: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    clock = time.perf_counter_ns
    for n in CANDIDATES:
        registry = make_registry(n)
        ids = [m.id for m in registry.models]
        pool = make_pool(ids)
        for history in histories:
            router = AdaptiveModelRouter(registry, seed=1, refresh_interval=None)
            fed = feed(router, ids, pool, history)
            options: dict[str, Any] = {
                "candidates": ids,
                "max_tokens": 400,
                "max_cost": 0.05,
                "min_success_rate": 0.8,
                "on_no_match": "relax",
            }
            decide = router.get_best_model
            record = router.record_outcome
            live: list[float] = []
            steady: list[float] = []
            for i in range(calls + 200):  # the first 200 warm up
                record(pool[ids[i % n]][(i // n) % 16])
                tokens = PROMPT_TOKENS[i % len(PROMPT_TOKENS)]
                t0 = clock()
                decide("bench", "answer", input_tokens=tokens, **options)
                live.append((clock() - t0) / 1000.0)
            for _ in range(calls + 200):
                t0 = clock()
                decide("bench", "answer", input_tokens=500, **options)
                steady.append((clock() - t0) / 1000.0)
            out[f"{n}/{history}"] = {**summarize(live[200:]), "feed_s": fed}
            out[f"{n}/{history}/unchanged"] = summarize(steady[200:])
    return out


async def bench_litellm(calls: int) -> tuple[dict[str, Any], dict[str, str]]:
    """LiteLLM's selection per strategy and API; also which (strategy, API) cannot run."""
    if not peer_version("litellm"):
        return {}, {"litellm": "not installed (pip install -r benchmarks/requirements-peers.txt)"}
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    warnings.filterwarnings("ignore")
    import litellm
    from litellm import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    real = ["gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-3.5-turbo", "gpt-4-turbo"]
    out: dict[str, Any] = {}
    unsupported: dict[str, str] = {}
    messages = [{"role": "user", "content": "hello"}]
    clock = time.perf_counter_ns
    for strategy in STRATEGIES:
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
            sync_samples: list[float] = []
            async_samples: list[float] = []
            try:  # some strategies (cost-based) select only through the async API
                router.get_available_deployment(model="group", messages=messages, request_kwargs={})
                has_sync = True
            except Exception as exc:
                has_sync = False
                unsupported[f"{strategy} (sync)"] = f"raises {type(exc).__name__}"
            for i in range(calls + 20):  # the first 20 warm up
                t0 = clock()
                await router.async_get_available_deployment(
                    model="group", messages=messages, request_kwargs={}
                )
                async_samples.append((clock() - t0) / 1000.0)
                if has_sync:
                    t0 = clock()
                    router.get_available_deployment(
                        model="group", messages=messages, request_kwargs={}
                    )
                    sync_samples.append((clock() - t0) / 1000.0)
                if i % 50 == 0:
                    await asyncio.sleep(0)
            out[f"{strategy}/async/{n}"] = summarize(async_samples[20:])
            if has_sync:
                out[f"{strategy}/sync/{n}"] = summarize(sync_samples[20:])
    return out, unsupported


async def run(quick: bool = False) -> BenchResult:
    histories = (1_000, 100_000) if quick else (1_000, 100_000, 1_000_000)
    calls, peer_calls = (3_000, 150) if quick else (20_000, 600)
    ours = bench_ours(histories, calls)
    peers, skipped = await bench_litellm(peer_calls)
    result = BenchResult(
        name="routing",
        title="Routing decision latency, p50 / p99 (µs)",
        columns=[f"{n} candidates" for n in CANDIDATES],
    )

    def cell(stats: dict[str, float]) -> str:
        return f"{stats['median']:.1f} / {stats['p99']:.1f}"

    for history in histories:
        result.add(
            f"empathy-models, {history:,} calls of history",
            **{f"{n} candidates": cell(ours[f"{n}/{history}"]) for n in CANDIDATES},
        )
    small, big = min(histories), max(histories)
    result.add(
        f"empathy-models, {small:,} calls, unchanged state (repeated decision)",
        **{f"{n} candidates": cell(ours[f"{n}/{small}/unchanged"]) for n in CANDIDATES},
    )
    fastest: dict[int, tuple[float, str]] = {}
    for key, stats in peers.items():
        strategy, api, count = key.rsplit("/", 2)
        best = fastest.get(int(count))
        if best is None or stats["median"] < best[0]:
            fastest[int(count)] = (stats["median"], f"{strategy} ({api})")
    for strategy in STRATEGIES:
        for api in ("sync", "async"):
            if f"{strategy}/{api}/4" in peers:
                result.add(
                    f"LiteLLM Router, {strategy}, {api}",
                    **{f"{n} candidates": cell(peers[f"{strategy}/{api}/{n}"]) for n in CANDIDATES},
                )
    result.skipped.update(skipped)
    if fastest:
        result.add(
            "speed-up vs LiteLLM's fastest strategy and API",
            **{
                f"{n} candidates": f"{fastest[n][0] / ours[f'{n}/{small}']['median']:.0f}x"
                for n in CANDIDATES
            },
        )
        result.notes.append(
            "LiteLLM's fastest: " + ", ".join(f"{fastest[n][1]} at {n}" for n in CANDIDATES)
        )
    result.notes.append(
        "empathy-models rows: one outcome recorded (untimed) before each timed decision, "
        "prompt size varying, as the executor drives the router"
    )
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
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for h in histories:
        ax.plot(
            CANDIDATES,
            [ours[f"{n}/{h}"]["median"] for n in CANDIDATES],
            marker="o",
            label=f"empathy-models ({h:,} calls)",
        )
    for strategy in STRATEGIES:
        for api in ("sync", "async"):
            if f"{strategy}/{api}/4" in peers:
                ax.plot(
                    CANDIDATES,
                    [peers[f"{strategy}/{api}/{n}"]["median"] for n in CANDIDATES],
                    marker="x",
                    linestyle="--" if api == "sync" else ":",
                    label=f"LiteLLM {strategy} ({api})",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("candidates")
    ax.set_ylabel("median decision time (µs)")
    ax.set_title("Routing decision latency vs candidates")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
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
