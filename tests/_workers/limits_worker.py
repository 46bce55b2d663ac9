"""
Child-process entry point for ``tests/test_limits_multiprocess.py``: one executor with
budgets or rate limits on a shared quota store, calling a `FakeLLMServer` over HTTP.

Run as ``python limits_worker.py CONFIG_JSON``; the config holds ``quota`` (the store
URL), ``base_url`` (the server's OpenAI base URL), ``mode`` (``"budget"`` or
``"rate"``), ``concurrency`` (calls in flight), and ``limit_usd`` (budget mode) or
``rpm``, ``burst`` (None: the default) and ``duration`` (rate mode).  Prints
``{"ready": true}``, waits for a line on stdin, runs, and prints one JSON line with
what it did:

* budget mode: every task calls until `BudgetExceededError`; ``calls``, ``spent``
  (the sum of the answers' ``cost_usd``), ``refused``;
* rate mode: every task calls until ``duration`` seconds have passed; ``calls`` and
  ``provider_429`` (attempts the server answered 429);

and ``degraded``: the quota store's outages (`Limiter.degraded_events`).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Any

import anyio
import anyio.to_thread

from empathy_models import (
    AllRoutesFailedError,
    Budget,
    BudgetExceededError,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
    OpenAIProvider,
    RateLimit,
    RetryPolicy,
)
from empathy_models.backends import NullTelemetryBackend

KEY = "test-key-0123"
MODEL = "gpt-quota"
REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id=MODEL,
            provider="openai",
            tier="cheap",
            input_price_per_mtok=100.0,
            output_price_per_mtok=400.0,
            context_window=64_000,
            max_output_tokens=4096,
        )
    ],
    price_version="limits-worker-1",
)
PROMPT = "x" * 400
MAX_TOKENS = 64


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def serve(config: dict[str, Any]) -> None:
    provider = OpenAIProvider(api_key=KEY, base_url=config["base_url"])
    options: dict[str, Any] = {"quota_store": config["quota"]}
    if config["mode"] == "budget":
        options["budgets"] = [Budget(limit_usd=config["limit_usd"], window="day")]
    else:
        options["rate_limits"] = {
            "openai": RateLimit(rpm=config["rpm"], burst_requests=config.get("burst"))
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        executor = EmpathyLLMExecutor(
            [provider],
            registry=REGISTRY,
            telemetry_store=NullTelemetryBackend(),
            retry=RetryPolicy.none(),
            **options,
        )
    # the tests are about the shared store's accounting: a store operation slower than
    # the limiter's store_timeout (5 s: seen on a machine at load 30) would put this
    # process in degraded mode, where it enforces the full limits on its own (documented,
    # covered by tests/test_store_stalls.py) and the processes together spend up to
    # their number times a budget; here a slow store is waited for, however slow
    assert executor.limiter is not None
    executor.limiter._store_timeout = None
    context = ExecutionContext(workflow="quota", max_tokens=MAX_TOKENS)
    result: dict[str, Any] = {"calls": 0, "spent": 0.0, "refused": 0, "provider_429": 0}
    async with executor:
        emit({"ready": True})
        await anyio.to_thread.run_sync(sys.stdin.readline)
        end = time.monotonic() + float(config.get("duration", 0))

        async def task() -> None:
            while True:
                if config["mode"] == "rate" and time.monotonic() >= end:
                    return
                try:
                    response = await executor.run(PROMPT, context)
                except BudgetExceededError:
                    result["refused"] += 1
                    return
                except AllRoutesFailedError as exc:
                    result["provider_429"] += sum(
                        getattr(e, "status", None) == 429 for e in exc.exceptions
                    )
                    continue
                result["calls"] += 1
                result["spent"] += response.cost_usd
                result["provider_429"] += sum(a.status_code == 429 for a in response.attempts)

        async with anyio.create_task_group() as tg:
            for _ in range(int(config["concurrency"])):
                tg.start_soon(task)
    result["degraded"] = executor.limiter.degraded_events
    emit({"done": True, **result})


def main() -> None:
    anyio.run(serve, json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
