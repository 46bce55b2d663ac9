"""
Streaming overhead, against a bare aiohttp SSE reader on the same server.

The server (`FakeLLMServer`, OpenAI wire format with the usage chunk) runs in an OS
process of its own (`benchmarks._fake_server_proc`), so this process's CPU time is the
client's alone; the server process's CPU over the same batches is reported beside it.

1. Per chunk, at 64 concurrent streams: ``executor.stream()`` (router + breaker +
   memory telemetry, the full path) reading every delta, against a bare aiohttp POST
   with ``"stream": true`` whose body is read as it arrives (``iter_any``) and split into
   lines (faster than aiohttp's own line iterator, which the first version of this
   benchmark used), each ``data:`` line decoded with ``json.loads`` and its
   ``choices[0].delta.content`` taken.  Both read the same
   server through one aiohttp session; the client's CPU time and the wall time are
   divided by the chunks read.  Goal: the client's CPU per chunk within 10% of the bare
   reader's.
2. Time to first token, one stream at a time: from the call to the first delta in
   hand, for both; the difference of the medians is what the executor adds (routing,
   breaker admission, building the request, decoding).  Goal: under 100 µs.
3. Where the client's CPU goes: per stream, for streams of 20 and 400 chunks (the model
   pinned, both sides at 64 concurrent streams); the line through the two gives each
   side's cost per chunk (its slope) and per stream (its value at 0 chunks).

Run: ``python -m benchmarks.bench_streaming [--quick]``
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp

from benchmarks._common import BenchResult, script_main, summarize
from benchmarks._fake_server_proc import ServerProcess
from empathy_models import (
    AdaptiveModelRouter,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
    OpenAIProvider,
)

MODEL = "gpt-bench-long"
SHORT_MODEL = "gpt-bench-short"
FIT = (20, 400)  # chunks per stream of the two lengths part 3 fits a line through
FIT_MODELS = {n: f"gpt-bench-fit-{n}" for n in FIT}


def _info(model: str, tier: str, input_price: float, output_price: float) -> ModelInfo:
    return ModelInfo(
        id=model,
        provider="openai",
        tier=tier,
        input_price_per_mtok=input_price,
        output_price_per_mtok=output_price,
        context_window=128_000,
        max_output_tokens=16_384,
    )


# one model in each of the capable and cheap tiers, so the router decides (with its one
# candidate) on every call; the fitted rows' models (premium) are pinned
REGISTRY = ModelRegistry(
    models=[
        _info(MODEL, "capable", 1.0, 4.0),
        _info(SHORT_MODEL, "cheap", 0.1, 0.4),
        *(_info(model, "premium", 1.0, 4.0) for model in FIT_MODELS.values()),
    ],
    price_version="bench-streaming",
)
CTX = ExecutionContext(workflow="bench", stage="stream", tier="capable", max_tokens=1024)
SHORT_CTX = ExecutionContext(workflow="bench", stage="ttft", tier="cheap", max_tokens=64)
PINNED_CTX = ExecutionContext(workflow="bench", stage="ttft", model=SHORT_MODEL, max_tokens=64)
PROMPT = "Tell me a story."
CONCURRENCY = 64
GOAL_RATIO = 1.10
GOAL_TTFT_US = 100.0


def _words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


async def _batch(
    fn: Callable[[], Awaitable[int]], total: int, concurrency: int
) -> tuple[float, float, int]:
    """Run ``total`` streams, ``concurrency`` at once: (wall s, CPU s, chunks read)."""
    sem = asyncio.Semaphore(concurrency)
    chunks = 0

    async def one() -> None:
        nonlocal chunks
        async with sem:
            got = await fn()  # (not `chunks += await ...`: that reads chunks before awaiting)
        chunks += got

    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.gather(*(one() for _ in range(total)))
    return time.perf_counter() - t0, time.process_time() - c0, chunks


async def bench(quick: bool) -> dict[str, Any]:
    registry = REGISTRY
    chunks_per_stream = 50 if quick else 200
    repeats = 1 if quick else 7
    streams = CONCURRENCY if quick else 512
    fit_streams = 16 if quick else CONCURRENCY  # the fewest streams per batch of part 3
    ttft_samples = 60 if quick else 2_000
    ttft_warm = 5 if quick else 20
    out: dict[str, Any] = {"chunks_per_stream": chunks_per_stream, "streams": streams}
    models = {
        MODEL: {"content": _words(chunks_per_stream), "output_tokens": chunks_per_stream},
        SHORT_MODEL: {"content": _words(4), "output_tokens": 4},
        **{model: {"content": _words(n), "output_tokens": n} for n, model in FIT_MODELS.items()},
    }
    with ServerProcess(models, api_key="sk-bench") as server:
        url = server.openai_base_url + "/chat/completions"
        headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def bare_stream(model: str, first: list[float] | None = None) -> int:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": 1024,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                t0 = time.perf_counter()
                count = 0
                async with session.post(url, json=body, headers=headers) as response:
                    # the body as it arrives, split into lines here (faster than
                    # aiohttp's line iterator); a line cut by a read waits in ``rest``
                    rest = b""
                    async for piece in response.content.iter_any():
                        lines = (rest + piece).split(b"\n")
                        rest = lines.pop()
                        for line in lines:
                            if not line.startswith(b"data: "):
                                continue
                            data = line[6:].strip()
                            if data == b"[DONE]":
                                return count
                            chunk = json.loads(data)
                            choices = chunk.get("choices")
                            if choices and choices[0]["delta"].get("content"):
                                count += 1
                                if first is not None and count == 1:
                                    first.append(time.perf_counter() - t0)
                return count

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
                    session=session,
                    concurrency_per_provider=CONCURRENCY,
                ) as executor,
            ):

                async def ours_stream(
                    context: ExecutionContext, first: list[float] | None = None
                ) -> int:
                    t0 = time.perf_counter()
                    count = 0
                    async with executor.stream(PROMPT, context) as stream:
                        async for _ in stream:
                            count += 1
                            if first is not None and count == 1:
                                first.append(time.perf_counter() - t0)
                    return count

                sides: dict[str, Callable[[], Awaitable[int]]] = {
                    "bare": lambda: bare_stream(MODEL),
                    "ours": lambda: ours_stream(CTX),
                }
                for side in sides.values():  # warm up: connections, caches
                    await _batch(side, CONCURRENCY, CONCURRENCY)
                wall: dict[str, list[float]] = {"bare": [], "ours": []}
                cpu: dict[str, list[float]] = {"bare": [], "ours": []}
                server_cpu: dict[str, list[float]] = {"bare": [], "ours": []}
                for repeat in range(repeats):
                    order = ("bare", "ours") if repeat % 2 == 0 else ("ours", "bare")
                    for name in order:
                        server_before = server.cpu()
                        seconds, cpu_seconds, chunks = await _batch(
                            sides[name], streams, CONCURRENCY
                        )
                        server_seconds = server.cpu() - server_before
                        assert chunks == streams * chunks_per_stream, (name, chunks)
                        wall[name].append(seconds / chunks * 1e6)
                        cpu[name].append(cpu_seconds / chunks * 1e6)
                        server_cpu[name].append(server_seconds / chunks * 1e6)
                for name in ("bare", "ours"):
                    out[f"wall {name}"] = summarize(wall[name])
                    out[f"cpu {name}"] = summarize(cpu[name])
                    out[f"server cpu {name}"] = summarize(server_cpu[name])

                # ---- per chunk and per stream: client CPU per stream at two lengths
                fit: dict[str, list[float]] = {}
                for n, model in FIT_MODELS.items():
                    pinned = ExecutionContext(
                        workflow="bench", stage="fit", model=model, max_tokens=1024
                    )
                    fit_sides: dict[str, Callable[[], Awaitable[int]]] = {
                        "bare": partial(bare_stream, model),
                        "ours": partial(ours_stream, pinned),
                    }
                    count = max(fit_streams, streams * chunks_per_stream // n)
                    for repeat in range(repeats + 1):  # the first warms up
                        order = ("bare", "ours") if repeat % 2 == 0 else ("ours", "bare")
                        for name in order:
                            _, cpu_seconds, _ = await _batch(fit_sides[name], count, CONCURRENCY)
                            if repeat:
                                fit.setdefault(f"{name} {n}", []).append(cpu_seconds / count * 1e6)
                for key, samples in fit.items():
                    out[f"fit {key}"] = summarize(samples)

                # ---- time to first token, one stream at a time, alternating sides
                ttft_sides: dict[str, Callable[[list[float]], Awaitable[int]]] = {
                    "bare": lambda into: bare_stream(SHORT_MODEL, into),
                    "ours": lambda into: ours_stream(SHORT_CTX, into),
                    "pinned": lambda into: ours_stream(PINNED_CTX, into),
                }
                firsts: dict[str, list[float]] = {name: [] for name in ttft_sides}
                for _ in range(ttft_warm):
                    for side_fn in ttft_sides.values():
                        await side_fn([])
                names = list(ttft_sides)
                for i in range(ttft_samples):
                    shift = i % len(names)  # rotate which side goes first
                    for name in names[shift:] + names[:shift]:
                        await ttft_sides[name](firsts[name])
                for name, samples in firsts.items():
                    out[f"ttft {name}"] = summarize([s * 1e6 for s in samples])
    return out


async def run(quick: bool = False) -> BenchResult:
    data = await bench(quick)
    result = BenchResult(
        name="streaming",
        title="Streaming overhead (µs per chunk at 64 concurrent streams; TTFT in µs)",
        columns=["median µs", "p99 µs", "ratio", "goal"],
    )
    bare_cpu = data["cpu bare"]["median"]
    ours_cpu = data["cpu ours"]["median"]
    ratio = ours_cpu / bare_cpu
    result.add(
        "bare aiohttp SSE reader, per chunk (client CPU)",
        **{"median µs": bare_cpu, "p99 µs": data["cpu bare"]["p99"], "ratio": "1.00x"},
    )
    result.add(
        "empathy-models executor.stream(), per chunk (client CPU)",
        **{
            "median µs": ours_cpu,
            "p99 µs": data["cpu ours"]["p99"],
            "ratio": f"{ratio:.2f}x of bare",
            "goal": f"<= {GOAL_RATIO:.2f}x: {'met' if ratio <= GOAL_RATIO else 'NOT met'}",
        },
    )
    bare_wall = data["wall bare"]["median"]
    ours_wall = data["wall ours"]["median"]
    result.add(
        "bare aiohttp SSE reader, per chunk (wall)",
        **{"median µs": bare_wall, "p99 µs": data["wall bare"]["p99"], "ratio": "1.00x"},
    )
    result.add(
        "empathy-models executor.stream(), per chunk (wall)",
        **{
            "median µs": ours_wall,
            "p99 µs": data["wall ours"]["p99"],
            "ratio": f"{ours_wall / bare_wall:.2f}x of bare",
        },
    )
    for side, label in (("bare", "bare aiohttp SSE reader"), ("ours", "executor.stream()")):
        server = data[f"server cpu {side}"]
        result.add(
            f"server process CPU per chunk, serving {label}",
            **{"median µs": server["median"], "p99 µs": server["p99"]},
        )
    short, long = FIT
    for side, label in (("bare", "bare aiohttp SSE reader"), ("ours", "executor.stream()")):
        a, b = data[f"fit {side} {short}"]["median"], data[f"fit {side} {long}"]["median"]
        per_chunk = (b - a) / (long - short)
        result.add(
            f"{label}, client CPU per chunk, fitted (model pinned)",
            **{"median µs": per_chunk},
        )
        result.add(
            f"{label}, client CPU per stream beside its chunks, fitted (model pinned)",
            **{"median µs": a - short * per_chunk},
        )
    bare_ttft = data["ttft bare"]["median"]
    ours_ttft = data["ttft ours"]["median"]
    added = ours_ttft - bare_ttft
    result.add(
        "TTFT, bare aiohttp SSE reader",
        **{"median µs": bare_ttft, "p99 µs": data["ttft bare"]["p99"], "ratio": "1.00x"},
    )
    result.add(
        "TTFT, empathy-models executor.stream()",
        **{
            "median µs": ours_ttft,
            "p99 µs": data["ttft ours"]["p99"],
            "ratio": f"+{added:.1f} µs",
            "goal": f"added < {GOAL_TTFT_US:.0f} µs: "
            f"{'met' if added < GOAL_TTFT_US else 'NOT met'}",
        },
    )
    pinned = data["ttft pinned"]["median"]
    result.add(
        "TTFT, executor.stream() with a pinned model (no routing decision)",
        **{
            "median µs": pinned,
            "p99 µs": data["ttft pinned"]["p99"],
            "ratio": f"+{pinned - bare_ttft:.1f} µs",
        },
    )
    result.notes.append(
        f"{data['streams']} streams of {data['chunks_per_stream']} text chunks per repeat, "
        f"{CONCURRENCY} at once, through one aiohttp session (connector limit 100) to "
        "FakeLLMServer in a process of its own (OpenAI format with the usage chunk); the "
        "figures are this process's CPU time (the client's alone) or the wall time, "
        "divided by chunks read (repeats' median); the goal is judged on client CPU.  "
        "Which side runs first alternates."
    )
    result.notes.append(
        "executor.stream() runs the full path: router decision, breaker admission (model "
        "and provider keys), the provider slot, SSE decoding, the record to memory "
        "telemetry and the breaker/router feedback at the end of each stream.  "
        f"Per-chunk overhead: {ours_wall - bare_wall:+.2f} µs wall, "
        f"{ours_cpu - bare_cpu:+.2f} µs CPU."
    )
    result.notes.append(
        f"Fitted rows: the client's CPU per stream (median of the repeats) for streams of "
        f"{short} and {long} chunks, the model pinned (no routing decision), sides "
        "alternating; the line through the two gives the cost per chunk (its slope) and "
        "per stream (its value at 0 chunks: the request, the breaker, the record)."
    )
    result.notes.append(
        "TTFT: from the call (``session.post`` / ``executor.stream``) to the first text "
        "delta in hand, one stream at a time, the sides taking turns; the added time is "
        "the difference of the medians.  The full path includes the router's decision "
        "(the same call `run()` makes); the pinned row skips it."
    )
    result.data = data
    return result


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
