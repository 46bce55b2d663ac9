"""
LiteLLM Router's deployment selection, timed in a process of its own.

``bench_routing`` runs this file with the Python of each LiteLLM generation (they
cannot share one environment), so it imports nothing from this project: only the
standard library and litellm.  Argument: a JSON object ``{"candidates": [...],
"calls": N, "strategies": [...]}``.  Output (stdout, one JSON object): litellm's
version, per ``strategy/api/candidates`` the median and p99 of the selection time in
microseconds, and the (strategy, API) pairs that raised.

LiteLLM runs offline (local cost map); only the selection is timed, no completion:
both ``get_available_deployment`` (sync) and ``async_get_available_deployment`` (what
``acompletion`` uses), each call timed alone with ``perf_counter_ns``.
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


async def measure(args: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    warnings.filterwarnings("ignore")
    import litellm
    from litellm.router import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    calls = int(args["calls"])
    out: dict[str, Any] = {}
    unsupported: dict[str, str] = {}
    messages = [{"role": "user", "content": "hello"}]
    clock = time.perf_counter_ns
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
            router = Router(model_list=model_list, routing_strategy=strategy, num_retries=0)
            sync_samples: list[float] = []
            async_samples: list[float] = []
            try:  # some strategies select only through the async API
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
    return {
        "version": importlib.metadata.version("litellm"),
        "python": sys.version.split()[0],
        "results": out,
        "unsupported": unsupported,
    }


def main() -> None:
    args = json.loads(sys.argv[1])
    result = asyncio.run(measure(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
