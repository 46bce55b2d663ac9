"""
Instructions per ``executor.run()``, counted by callgrind (deterministic, unlike timings
on a loaded machine): the executor of `bench_executor`'s in-process part (an in-process
`FakeProvider`, router, breaker, memory telemetry) with a global `Budget`, so that both
the router's decision and the budget's reservation read the request's input estimate.

Run it for two call counts and take the difference, which leaves out the interpreter's
start and the executor's setup::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.profile_run_instructions 200 --prompt tools
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.profile_run_instructions 1200 --prompt tools

(instructions per run: the difference of the two ``Collected`` totals / 1000).
``--prompt plain`` sends a one-line prompt; ``tools`` the same prompt with two tools,
a ``response_format`` schema and an ``extra_body`` (given as dicts, as callers do), where
the request's estimate has the most to read.  Not part of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from empathy_models import (
    AdaptiveModelRouter,
    Budget,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
)
from empathy_models.testing.fakes import FakeProvider

CTX = ExecutionContext(workflow="bench", stage="answer", task_type="summarize", max_tokens=64)
PROMPT = "Summarize the release notes."

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": f"lookup_{name}",
            "description": f"Look up a {name} by its id and return its fields.",
            "parameters": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "description": f"the {name}'s id"},
                    "fields": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["id"],
            },
        },
    }
    for name in ("release", "ticket")
]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "highlights": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["summary", "highlights"],
    "additionalProperties": False,
}
EXTRA_BODY: dict[str, Any] = {"metadata": {"team": "docs", "purpose": "release notes"}}


async def main(calls: int, prompt: str) -> None:
    registry = ModelRegistry.default()
    options: dict[str, Any] = (
        {"tools": TOOLS, "tool_choice": "none", "response_format": SCHEMA, "extra_body": EXTRA_BODY}
        if prompt == "tools"
        else {}
    )
    async with (
        CircuitBreaker() as breaker,
        EmpathyLLMExecutor(
            [FakeProvider(name="openai", seed=1)],
            registry=registry,
            telemetry_store="memory://",
            router=AdaptiveModelRouter(registry, seed=1, refresh_interval=None),
            breaker=breaker,
            budgets=[Budget(limit_usd=1_000_000)],
        ) as executor,
    ):
        for _ in range(calls):
            await executor.run(PROMPT, CTX, **options)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", type=int)
    parser.add_argument("--prompt", choices=("plain", "tools"), default="plain")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.prompt))
