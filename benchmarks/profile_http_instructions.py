"""
Instructions per call over HTTP, counted by callgrind (deterministic, unlike CPU time
on a loaded machine): one layer of `profile_executor_http` (FakeLLMServer in its own
process, which valgrind does not follow, so only the client is counted), ``calls``
calls at concurrency 64 after 200 warm-up calls.

Run it for two call counts and take the difference, which leaves out the interpreter's
start, the setup and the warm-up::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.profile_http_instructions full 200
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.profile_http_instructions full 700

(instructions per call: the difference of the two ``Collected`` totals / 500).  Layers:
``bare`` (`bench_executor`'s bare aiohttp POST), ``transport`` (the POST as the
provider makes it, without the provider's code), ``provider``
(``OpenAIProvider.complete()`` on a bound session), ``core`` (``executor.run()`` with no
router, breaker or telemetry) and ``full`` (all three, as `bench_executor` measures it).
Not part of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from benchmarks._fake_server_proc import ServerProcess
from benchmarks.bench_executor import CTX, _batch
from empathy_models import (
    AdaptiveModelRouter,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ModelRegistry,
    OpenAIProvider,
    TelemetryDisabledWarning,
)
from empathy_models.abc import CompletionRequest

PROMPT = "Summarize the release notes."
LAYERS = ("bare", "transport", "provider", "core", "full")


async def _layer(
    name: str, stack: AsyncExitStack, server: ServerProcess
) -> Callable[[], Awaitable[None]]:
    url = server.openai_base_url + "/chat/completions"
    body: dict[str, Any] = {
        "model": "gpt-4.1-nano",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 64,
    }
    if name == "bare":
        plain = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        )
        headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}

        async def bare() -> None:
            async with plain.post(url, json=body, headers=headers) as resp:
                await resp.json()

        return bare
    provider = OpenAIProvider(api_key="sk-bench", base_url=server.openai_base_url)
    if name in ("transport", "provider"):
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        )
        if name == "transport":
            payload, wire_headers = json.dumps(body).encode(), provider._request_headers()

            async def transport() -> None:
                async with session.post(
                    url, data=payload, headers=wire_headers, allow_redirects=False
                ) as resp:
                    raw = await resp.read()
                json.loads(raw)

            return transport
        await provider.bind(session)
        request = CompletionRequest(model="gpt-4.1-nano", messages=PROMPT, max_tokens=64)

        async def complete() -> None:
            await provider.complete(request)

        return complete
    registry, full = ModelRegistry.default(), name == "full"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryDisabledWarning)
        executor = await stack.enter_async_context(
            EmpathyLLMExecutor(
                [provider],
                registry=registry,
                telemetry_store="memory://" if full else None,
                router=AdaptiveModelRouter(registry, seed=1, refresh_interval=None)
                if full
                else None,
                breaker=await stack.enter_async_context(CircuitBreaker()) if full else None,
            )
        )

    async def run() -> None:
        await executor.run(PROMPT, CTX)

    return run


async def main(layer: str, calls: int) -> None:
    with ServerProcess() as server:
        async with AsyncExitStack() as stack:
            fn = await _layer(layer, stack, server)
            await _batch(fn, 200, 64)
            await _batch(fn, calls, 64)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("layer", choices=LAYERS)
    parser.add_argument("calls", type=int)
    args = parser.parse_args()
    asyncio.run(main(args.layer, args.calls))
