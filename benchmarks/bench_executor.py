"""
Executor overhead.

1. In-process: ``executor.run()`` with an in-process provider (router + breaker +
   memory telemetry, the full path) against LiteLLM ``Router.acompletion`` with
   ``mock_response`` (offline, no callbacks), sequentially.
2. Over HTTP: ``executor.run()`` against `FakeLLMServer` (OpenAI wire format) against a
   bare aiohttp POST of the same body to the same server, at concurrency 1 and 64.  The
   server runs in a child process of its own (`benchmarks._fake_server_proc`, its
   defaults: an immediate success), so this process's CPU time is the client's alone:
   per call, wall time and client CPU (`time.process_time`) are reported for each side,
   and the server process's CPU over the same batches beside them.  The sides' batches
   alternate over at least 5 repeats (``--quick``: 2), which goes first alternating
   too; figures are medians over the repeats.  The executor opens its own session, as
   it does for a user who passes none (proxies read from the environment included);
   the bare POST uses a plain session and reads the body with ``resp.json()``.

Run: ``python -m benchmarks.bench_executor [--quick]``
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from benchmarks._common import BenchResult, async_timeit, peer_version, script_main, summarize
from benchmarks._fake_server_proc import ServerProcess
from empathy_models import (
    AdaptiveModelRouter,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
    OpenAIProvider,
)
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

            await async_timeit(ours, repeats=1, inner=min(200, inner))
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
    """
    Run ``total`` calls with ``concurrency`` in flight; return (wall, CPU) seconds, the
    CPU being this process's (`time.process_time`): the client's alone.
    """
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await fn()

    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.gather(*(one() for _ in range(total)))
    return time.perf_counter() - t0, time.process_time() - c0


HTTP_SIDES = ("bare", "ours")
HTTP_KINDS = ("wall", "cpu", "server_cpu")


async def bench_http(repeats: int, total: int, warm: int) -> dict[str, Any]:
    """
    Per call, at concurrency 1 and 64, for each side: wall time, the client's CPU and
    the server process's CPU (µs), one sample per repeat; keys ``"wall"``, ``"cpu"``
    and ``"server_cpu"``, then the side, then ``"c<concurrency>"``.
    """
    registry = ModelRegistry.default()
    out: dict[str, Any] = {kind: {side: {} for side in HTTP_SIDES} for kind in HTTP_KINDS}
    out["repeats"], out["calls"] = repeats, {}
    with ServerProcess() as server:
        body = {
            "model": "gpt-4.1-nano",
            "messages": [{"role": "user", "content": "Summarize the release notes."}],
            "max_tokens": 64,
        }
        url = server.openai_base_url + "/chat/completions"
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

                sides = {"bare": bare, "ours": ours}
                for concurrency in (1, 64):
                    n = total if concurrency > 1 else max(100, total // 4)
                    out["calls"][f"c{concurrency}"] = n
                    await _batch(bare, warm, concurrency)
                    await _batch(ours, warm, concurrency)
                    samples: dict[str, dict[str, list[float]]] = {
                        kind: {side: [] for side in HTTP_SIDES} for kind in HTTP_KINDS
                    }
                    for repeat in range(repeats):
                        # alternate which side goes first, so drift (GC state, telemetry
                        # growing, other load) does not always land on the same side
                        order = HTTP_SIDES if repeat % 2 == 0 else HTTP_SIDES[::-1]
                        for side in order:
                            server_before = server.cpu()
                            seconds, cpu_seconds = await _batch(sides[side], n, concurrency)
                            server_seconds = server.cpu() - server_before
                            samples["wall"][side].append(seconds / n * 1e6)
                            samples["cpu"][side].append(cpu_seconds / n * 1e6)
                            samples["server_cpu"][side].append(server_seconds / n * 1e6)
                    for kind, by_side in samples.items():
                        for side, values in by_side.items():
                            out[kind][side][f"c{concurrency}"] = summarize(values)
    return out


async def run(quick: bool = False) -> BenchResult:
    repeats, inner, total = (2, 150, 160) if quick else (7, 2_000, 5_000)
    in_proc = await bench_in_process(repeats, inner)
    peers, skipped = await bench_litellm(repeats, inner)
    # at least 5 interleaved repeats over HTTP; --quick: 2 (each side first once), after
    # a warm-up of 20 calls per side and concurrency
    http = await bench_http(2 if quick else max(5, repeats), total, 20 if quick else 100)
    result = BenchResult(
        name="executor",
        title=(
            "Executor overhead (µs per call; over HTTP: wall time per call / throughput, "
            "and the client process's CPU per call)"
        ),
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
    labels = {"bare": "bare aiohttp POST", "ours": "empathy-models run() over HTTP"}
    for kind, prefix in (("wall", ""), ("cpu", "client CPU: ")):
        for concurrency in (1, 64):
            key = f"c{concurrency}"
            bare_med = http[kind]["bare"][key]["median"]
            for side in HTTP_SIDES:
                stats = http[kind][side][key]
                ratio = "1.00x" if side == "bare" else f"{stats['median'] / bare_med:.2f}x of bare"
                result.add(
                    f"{prefix}{labels[side]}, concurrency {concurrency}",
                    **{"median µs": stats["median"], "p99 µs": stats["p99"], "ratio": ratio},
                )
    result.notes.append(
        "In-process: router + breaker (memory) + memory telemetry on every call; the "
        "provider answers immediately, so the figure is the executor's own overhead plus "
        f"the fake's ({in_proc['baseline: provider.complete() alone']['median']:.1f} µs)."
    )
    result.notes.append(
        "Over HTTP: FakeLLMServer (defaults: an immediate success) runs in a child process "
        "of its own (`benchmarks/_fake_server_proc.py`), so the client's figures hold no "
        "server work. Wall rows are wall time divided by calls; client CPU rows are the "
        "client process's CPU time (`time.process_time`) divided by calls, which moves "
        "less than wall time when other processes share the machine. Medians over "
        f"{http['repeats']} repeats of {http['calls']['c1']} calls at concurrency 1 and "
        f"{http['calls']['c64']} at 64; "
        "which side runs first alternates between repeats. The bare POST uses a plain "
        "session (connector limit 100) and reads the body with `resp.json()`; the executor "
        "opens its own session, as for a user who passes none, and both send the same "
        "messages and max_tokens."
    )
    server_parts = []
    for concurrency in (1, 64):
        key = f"c{concurrency}"
        bare_srv = http["server_cpu"]["bare"][key]["median"]
        ours_srv = http["server_cpu"]["ours"][key]["median"]
        server_parts.append(
            f"concurrency {concurrency}: {bare_srv:.0f} µs per call during the bare "
            f"batches, {ours_srv:.0f} µs during ours"
        )
    result.notes.append(
        "Server process CPU (its `time.process_time` over each batch, divided by calls; "
        "not in the client figures): " + "; ".join(server_parts) + "."
    )
    result.data = {"in_process": in_proc, "litellm": peers, "http": http}
    return result


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
