"""
Executor overhead.

1. In-process: ``executor.run()`` with an in-process provider (router + breaker +
   memory telemetry, the full path) against LiteLLM ``Router.acompletion`` with
   ``mock_response`` (offline, no callbacks), sequentially.
2. Over HTTP: ``executor.run()`` against `FakeLLMServer` (OpenAI wire format) against a
   bare aiohttp POST of the same body to the same server, at concurrency 1 and 64.  The
   executor opens its own session, as it does for a user who passes none (proxies read
   from the environment included); the bare POST uses a plain session.

Run: ``python -m benchmarks.bench_executor [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import warnings
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from benchmarks._common import BenchResult, async_timeit, peer_version, summarize, write_result
from empathy_models import (
    AdaptiveModelRouter,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
    OpenAIProvider,
)
from empathy_models.testing.fake_server import FakeLLMServer
from empathy_models.testing.fakes import FakeProvider

CTX = ExecutionContext(workflow="bench", stage="answer", task_type="summarize", max_tokens=64)


PROVIDER_KEYS = "empathy-models run(), in-process, provider-wide breaker keys"


async def bench_in_process(repeats: int, inner: int) -> dict[str, Any]:
    registry = ModelRegistry.default()
    out: dict[str, Any] = {}
    # the default (a breaker key per model, admitted with its provider's key too) against
    # provider-wide keys only (per_model=False, one admission per call); their repeats
    # alternate, so both see the same machine load
    names = {True: "empathy-models run(), in-process provider", False: PROVIDER_KEYS}
    samples: dict[bool, list[float]] = {True: [], False: []}
    async with AsyncExitStack() as stack:
        runs: dict[bool, Any] = {}
        for per_model in (True, False):
            router = AdaptiveModelRouter(registry, seed=1, refresh_interval=None)
            breaker = await stack.enter_async_context(CircuitBreaker(per_model=per_model))
            executor = await stack.enter_async_context(
                EmpathyLLMExecutor(
                    [FakeProvider(name="openai")],
                    registry=registry,
                    telemetry_store="memory://",
                    router=router,
                    breaker=breaker,
                )
            )

            async def ours(executor: EmpathyLLMExecutor = executor) -> object:
                return await executor.run("Summarize the release notes.", CTX)

            await async_timeit(ours, repeats=1, inner=200)
            runs[per_model] = ours
        for index in range(repeats):
            for per_model in (True, False) if index % 2 == 0 else (False, True):
                samples[per_model] += await async_timeit(runs[per_model], repeats=1, inner=inner)
    for per_model, name in names.items():
        out[name] = summarize(samples[per_model])

    bare_provider = FakeProvider(name="openai")
    from empathy_models.abc import CompletionRequest

    request = CompletionRequest(model="gpt-4.1-nano", messages="Summarize.", max_tokens=64)

    async def bare() -> object:
        return await bare_provider.complete(request)

    out["baseline: provider.complete() alone"] = summarize(
        await async_timeit(bare, repeats=repeats, inner=inner)
    )
    return out


async def bench_litellm(repeats: int, inner: int) -> tuple[dict[str, Any], str | None]:
    if not peer_version("litellm"):
        return {}, "not installed (pip install -r benchmarks/requirements-peers.txt)"
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    warnings.filterwarnings("ignore")
    import litellm
    from litellm.router import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.callbacks = []
    router = Router(
        model_list=[
            {
                "model_name": "cheap",
                "litellm_params": {
                    "model": "openai/gpt-4.1-nano",
                    "api_key": "sk-offline",
                    "mock_response": "hi",
                },
            }
        ],
        num_retries=0,
    )
    messages = [{"role": "user", "content": "Summarize the release notes."}]

    async def peer() -> object:
        return await router.acompletion(model="cheap", messages=messages, max_tokens=64)

    await async_timeit(peer, repeats=1, inner=20)
    n = max(20, inner // 10)
    return {
        "LiteLLM Router.acompletion(mock_response)": summarize(
            await async_timeit(peer, repeats=repeats, inner=n)
        )
    }, None


async def _batch(fn: Any, total: int, concurrency: int) -> tuple[float, float]:
    """Run ``total`` calls with ``concurrency`` in flight; return (wall, CPU) seconds."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await fn()

    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.gather(*(one() for _ in range(total)))
    return time.perf_counter() - t0, time.process_time() - c0


async def bench_http(repeats: int, total: int) -> dict[str, Any]:
    registry = ModelRegistry.default()
    out: dict[str, Any] = {}
    async with FakeLLMServer() as server:
        body = {
            "model": "gpt-4.1-nano",
            "messages": [{"role": "user", "content": "Summarize the release notes."}],
            "max_tokens": 64,
        }
        url = server.openai_base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def bare() -> None:
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.json()

            provider = OpenAIProvider(api_key="sk-bench", base_url=server.openai_base_url)
            router = AdaptiveModelRouter(registry, seed=1, refresh_interval=None)
            async with (
                CircuitBreaker() as breaker,
                EmpathyLLMExecutor(
                    [provider],
                    registry=registry,
                    telemetry_store="memory://",
                    router=router,
                    breaker=breaker,
                ) as executor,
            ):

                async def ours() -> None:
                    await executor.run("Summarize the release notes.", CTX)

                for concurrency in (1, 64):
                    n = total if concurrency > 1 else max(200, total // 4)
                    await _batch(bare, 100, concurrency)
                    await _batch(ours, 100, concurrency)
                    times: dict[str, list[float]] = {"bare": [], "ours": []}
                    cpu: dict[str, list[float]] = {"bare": [], "ours": []}
                    sides = {"bare": bare, "ours": ours}
                    for repeat in range(repeats):
                        # alternate which side goes first, so drift (GC state, telemetry
                        # growing, other load) does not always land on the same side
                        order = ("bare", "ours") if repeat % 2 == 0 else ("ours", "bare")
                        for side in order:
                            seconds, cpu_seconds = await _batch(sides[side], n, concurrency)
                            times[side].append(seconds / n * 1e6)
                            cpu[side].append(cpu_seconds / n * 1e6)
                    out[f"bare aiohttp POST, concurrency {concurrency}"] = summarize(times["bare"])
                    out[f"empathy-models run() over HTTP, concurrency {concurrency}"] = summarize(
                        times["ours"]
                    )
                    out[f"CPU: bare aiohttp POST, concurrency {concurrency}"] = summarize(
                        cpu["bare"]
                    )
                    out[f"CPU: empathy-models run() over HTTP, concurrency {concurrency}"] = (
                        summarize(cpu["ours"])
                    )
    return out


async def run(quick: bool = False) -> BenchResult:
    repeats, inner, total = (3, 300, 1_000) if quick else (7, 2_000, 5_000)
    in_proc = await bench_in_process(repeats, inner)
    peers, skipped = await bench_litellm(repeats, inner)
    http = await bench_http(repeats, total)
    result = BenchResult(
        name="executor",
        title="Executor overhead (µs per call; over HTTP: wall time per call / throughput)",
        columns=["median µs", "p99 µs", "ratio"],
    )
    ours_key = "empathy-models run(), in-process provider"
    ours_med = in_proc[ours_key]["median"]
    for name, stats in {**in_proc, **peers}.items():
        ratio = None
        if name.startswith("LiteLLM"):
            ratio = f"{stats['median'] / ours_med:.0f}x slower than ours"
        elif name == PROVIDER_KEYS:
            ratio = f"per-model default: {ours_med / stats['median']:.2f}x of this"
        result.add(name, **{"median µs": stats["median"], "p99 µs": stats["p99"], "ratio": ratio})
    if skipped:
        result.skipped["litellm"] = skipped
    for concurrency in (1, 64):
        bare = http[f"bare aiohttp POST, concurrency {concurrency}"]
        ours = http[f"empathy-models run() over HTTP, concurrency {concurrency}"]
        result.add(
            f"bare aiohttp POST, concurrency {concurrency}",
            **{"median µs": bare["median"], "p99 µs": bare["p99"], "ratio": "1.00x"},
        )
        result.add(
            f"empathy-models run() over HTTP, concurrency {concurrency}",
            **{
                "median µs": ours["median"],
                "p99 µs": ours["p99"],
                "ratio": f"{ours['median'] / bare['median']:.2f}x of bare",
            },
        )
    result.notes.append(
        "In-process: router + breaker (memory) + memory telemetry on every call; the "
        "provider answers immediately, so the figure is the executor's own overhead plus "
        f"the fake's ({in_proc['baseline: provider.complete() alone']['median']:.1f} µs)."
    )
    result.notes.append(
        "HTTP figures are wall time divided by calls (repeats' median); the server is "
        "FakeLLMServer in the same process, so both sides share the one event loop. "
        "Both sides use one aiohttp session (connector limit 100) and send the same "
        "messages and max_tokens; which side runs first alternates between repeats."
    )
    cpu_parts = []
    for concurrency in (1, 64):
        bare_cpu = http[f"CPU: bare aiohttp POST, concurrency {concurrency}"]["median"]
        ours_cpu = http[f"CPU: empathy-models run() over HTTP, concurrency {concurrency}"]["median"]
        cpu_parts.append(
            f"concurrency {concurrency}: {ours_cpu:.0f} vs {bare_cpu:.0f} µs "
            f"({ours_cpu / bare_cpu:.2f}x)"
        )
    result.notes.append(
        "CPU time per call over HTTP (process time; client and server both run in this "
        "process, so this is all the work, and it moves less than wall time when other "
        "processes share the machine): " + "; ".join(cpu_parts) + "."
    )
    result.data = {"in_process": in_proc, "litellm": peers, "http": http}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    write_result(asyncio.run(run(quick=args.quick)))


if __name__ == "__main__":
    main()
