"""
Child-process entry point for the cross-process case of ``tests/test_cache_coalescing.py``:
one executor with a response cache on a shared store, calling a `FakeLLMServer` over HTTP.

Run as ``python cache_worker.py CONFIG_JSON``; the config holds ``cache`` (the store
URL), ``base_url`` (the server's OpenAI base URL) and ``copies`` (how many copies of one
request to run at once).  Prints ``{"ready": true}``, waits for a line on stdin, runs the
copies, and prints ``{"done": true, "cached": [...]}``: each answer's ``cached``.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import anyio
import anyio.to_thread

from empathy_models import (
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
    OpenAIProvider,
    RetryPolicy,
)
from empathy_models.backends import NullTelemetryBackend

KEY = "test-key-0123"
MODEL = "gpt-cache"
REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id=MODEL,
            provider="openai",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=2.0,
            context_window=64_000,
            max_output_tokens=4096,
        )
    ],
    price_version="cache-worker-1",
)


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def serve(config: dict[str, Any]) -> None:
    provider = OpenAIProvider(api_key=KEY, base_url=config["base_url"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        executor = EmpathyLLMExecutor(
            [provider],
            registry=REGISTRY,
            telemetry_store=NullTelemetryBackend(),
            retry=RetryPolicy.none(),
            cache=config["cache"],
        )
    context = ExecutionContext(workflow="faq", model=MODEL, temperature=0, cache_ttl=600)
    cached: list[bool] = []
    async with executor:
        emit({"ready": True})
        await anyio.to_thread.run_sync(sys.stdin.readline)

        async def copy() -> None:
            cached.append((await executor.run("What is GCRA?", context)).cached)

        async with anyio.create_task_group() as tg:
            for _ in range(int(config["copies"])):
                tg.start_soon(copy)
    emit({"done": True, "cached": cached})


def main() -> None:
    anyio.run(serve, json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
