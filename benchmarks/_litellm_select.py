"""
LiteLLM Router's deployment selection, timed in a process of its own.

``bench_routing`` runs this file with the Python of each LiteLLM generation (they
cannot share one environment), so it imports nothing from this project: only the
standard library and litellm.  Argument: a JSON object ``{"candidates": [...],
"calls": N, "strategies": [...]}``.  It prints one JSON line with litellm's version,
then answers every ``run`` line on stdin with one repeat: per
``strategy/api/candidates`` the median and p99 of the selection time in microseconds,
and the (strategy, API) pairs that raised.  The caller interleaves these repeats with
its own.

LiteLLM runs offline (local cost map); only the selection is timed, no completion:
both ``get_available_deployment`` (sync) and ``async_get_available_deployment`` (what
``acompletion`` uses), each call timed alone with ``perf_counter_ns``, each API in a
loop of its own (interleaved, each selection ran after the other API's and measured
up to 2.5x slower: 1.80's sync selection takes ~10x its async one).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import statistics
import sys
import time
import warnings
from typing import Any

REAL = ["gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-3.5-turbo", "gpt-4-turbo"]


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)
    p99 = ordered[min(n - 1, max(0, int(0.99 * n + 0.5) - 1))]
    return {"median": statistics.median(ordered), "p99": p99, "n": float(n)}


def setup(args: dict[str, Any]) -> dict[str, Any]:
    """One Router per (strategy, candidate count), built once and reused by every repeat."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    warnings.filterwarnings("ignore")
    import litellm
    from litellm.router import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    routers: dict[str, Any] = {}
    for strategy in args["strategies"]:
        for n in args["candidates"]:
            model_list = [
                {
                    "model_name": "group",
                    "litellm_params": {
                        "model": f"openai/{REAL[i % len(REAL)]}",
                        "api_key": "sk-offline",
                        "api_base": f"http://127.0.0.1:9/{i}",
                        "mock_response": "hi",
                    },
                    "model_info": {"id": f"dep-{i}"},
                }
                for i in range(n)
            ]
            routers[f"{strategy}/{n}"] = Router(
                model_list=model_list, routing_strategy=strategy, num_retries=0
            )
    return routers


async def measure(
    routers: dict[str, Any], calls: int, unsupported: dict[str, str]
) -> dict[str, Any]:
    """One repeat: ``calls`` timed selections per (strategy, API, candidate count)."""
    out: dict[str, Any] = {}
    messages = [{"role": "user", "content": "hello"}]
    clock = time.perf_counter_ns
    for key, router in routers.items():
        strategy, n = key.rsplit("/", 1)
        sync_samples: list[float] = []
        async_samples: list[float] = []
        has_sync = f"{strategy} (sync)" not in unsupported
        if has_sync:
            try:  # some strategies select only through the async API
                router.get_available_deployment(model="group", messages=messages, request_kwargs={})
            except Exception as exc:
                has_sync = False
                unsupported[f"{strategy} (sync)"] = f"raises {type(exc).__name__}"
        # each API in a loop of its own: alternating them would make each selection run
        # after the other API's (the sync one takes several times as long), with the
        # processor's caches holding that call's code and data, not this one's
        for i in range(calls + 20):  # the first 20 warm up
            t0 = clock()
            await router.async_get_available_deployment(
                model="group", messages=messages, request_kwargs={}
            )
            async_samples.append((clock() - t0) / 1000.0)
            if i % 50 == 0:
                await asyncio.sleep(0)
        for _ in range(calls + 20 if has_sync else 0):
            t0 = clock()
            router.get_available_deployment(model="group", messages=messages, request_kwargs={})
            sync_samples.append((clock() - t0) / 1000.0)
        out[f"{strategy}/async/{n}"] = summarize(async_samples[20:])
        if has_sync:
            out[f"{strategy}/sync/{n}"] = summarize(sync_samples[20:])
    return out


async def serve(args: dict[str, Any]) -> None:
    """Print a ready line, then answer each ``run`` line on stdin with one repeat."""
    routers = setup(args)
    unsupported: dict[str, str] = {}
    write = sys.stdout.write
    write(
        json.dumps(
            {
                "version": importlib.metadata.version("litellm"),
                "python": sys.version.split()[0],
            }
        )
        + "\n"
    )
    sys.stdout.flush()
    while sys.stdin.readline().strip() == "run":
        results = await measure(routers, int(args["calls"]), unsupported)
        write(json.dumps({"results": results, "unsupported": unsupported}) + "\n")
        sys.stdout.flush()


def main() -> None:
    asyncio.run(serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
