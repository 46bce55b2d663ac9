"""
What OpenTelemetry instrumentation adds to ``executor.run()``.

The in-process path of bench_executor (router + breaker + memory telemetry, a provider
that answers at once), measured with the instrumentation off (the baseline, measured in
the same run) and on with: the OpenTelemetry API's no-op providers; the SDK with every
span sampled and handed to an exporter that does nothing, and the metrics aggregated by
the SDK (the goal: under 30 µs added per run); the SDK sampling 1% of traces.  The
configurations' repeats alternate, so all see the same machine load.

Spans go to the exporter through a ``SimpleSpanProcessor``: it hands each ended span to
the exporter at once, so the figure is what making the spans costs.  A
``BatchSpanProcessor`` at these rates (thousands of spans a second, back to back)
measures something else: its worker thread can miss a wake-up and sleep its full 5 s
schedule delay while the queue fills, and every span after that is dropped with a
logged "Queue full" warning, whose cost then dominates.

Run: ``python -m benchmarks.bench_otel [--quick]``
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

from opentelemetry import context, metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from benchmarks._common import BenchResult, script_main, summarize
from empathy_models import (
    AdaptiveModelRouter,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
)
from empathy_models.testing.fakes import FakeProvider

CTX = ExecutionContext(workflow="bench", stage="answer", task_type="summarize", max_tokens=64)
GOAL_US = 30.0
OFF = "off (baseline)"
NOOP_API = "on: OpenTelemetry API no-op providers"
SDK = "on: SDK, every span to a no-op exporter, SDK metrics"
SAMPLED = "on: SDK, 1% of traces sampled, SDK metrics"
FLOOR = "SDK floor: the same spans, event and metric points made directly"


class _NullExporter(SpanExporter):
    """Takes every span and sends it nowhere."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _providers(name: str) -> dict[str, Any]:
    if name == OFF:
        return {}
    if name == NOOP_API:
        return {
            "tracer_provider": trace.NoOpTracerProvider(),
            "meter_provider": metrics.NoOpMeterProvider(),
        }
    sampler = ParentBased(TraceIdRatioBased(0.01)) if name == SAMPLED else None
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(SimpleSpanProcessor(_NullExporter()))
    return {
        "tracer_provider": tracer_provider,
        "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()]),
    }


async def cpu_timeit(fn: Callable[[], Awaitable[object]], inner: int) -> float:
    """CPU µs per await over ``inner`` sequential awaits (steadier than wall time when
    other processes share the machine; the loop runs nothing else)."""
    t0 = time.process_time_ns()
    for _ in range(inner):
        await fn()
    return (time.process_time_ns() - t0) / inner / 1000.0


def _sdk_floor() -> tuple[Callable[[], Awaitable[object]], list[Any]]:
    """What the SDK itself costs for one traced run: the spans, event and metric
    points the instrumentation makes, with the same attribute counts, made directly."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(_NullExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    tracer = tracer_provider.get_tracer("floor")
    meter = meter_provider.get_meter("floor")
    duration = meter.create_histogram("duration")
    tokens = meter.create_histogram("tokens")
    common = {f"common.{i}": f"value-{i}" for i in range(5)}
    response = {**common, "response": "model"}
    inputs = {**response, "type": "input"}
    outputs = {**response, "type": "output"}
    run_end = {f"run.{i}": f"value-{i}" for i in range(13)}
    start: dict[str, Any] = {**common, "max_tokens": 64, "attempt": 1}
    ended = {f"end.{i}": i for i in range(7)}
    event: dict[str, Any] = {"keys": ["a", "b"], "states": ["closed", "closed"], "probe": False}

    async def one() -> object:
        run = tracer.start_span("run bench/answer", attributes={"w": "bench", "s": "answer"})
        ctx = trace.set_span_in_context(run)
        token = context.attach(ctx)  # metric points recorded inside the run, as a run does
        attempt = tracer.start_span("chat model", context=ctx, attributes=start)
        attempt.add_event("admitted", event)
        attempt.set_attributes(ended)
        attempt.end()
        duration.record(0.001, response)
        tokens.record(10, inputs)
        tokens.record(20, outputs)
        run.set_attributes(run_end)
        context.detach(token)
        run.end()
        return None

    return one, [tracer_provider, meter_provider]


async def bench(repeats: int, inner: int) -> dict[str, dict[str, float]]:
    registry = ModelRegistry.default()
    names = (OFF, NOOP_API, SDK, SAMPLED)
    samples: dict[str, list[float]] = {name: [] for name in names}
    runs: dict[str, Any] = {}
    owned: list[Any] = []
    async with AsyncExitStack() as stack:
        for name in names:
            options = _providers(name)
            owned.extend(options.values())
            breaker = await stack.enter_async_context(CircuitBreaker())
            executor = await stack.enter_async_context(
                EmpathyLLMExecutor(
                    [FakeProvider(name="openai")],
                    registry=registry,
                    telemetry_store="memory://",
                    router=AdaptiveModelRouter(registry, seed=1, refresh_interval=None),
                    breaker=breaker,
                    **options,
                )
            )

            async def one(executor: EmpathyLLMExecutor = executor) -> object:
                return await executor.run("Summarize the release notes.", CTX)

            await cpu_timeit(one, min(200, inner))  # warm up
            runs[name] = one
        floor, floor_providers = _sdk_floor()
        owned.extend(floor_providers)
        runs[FLOOR] = floor
        samples[FLOOR] = []
        order_of = (*names, FLOOR)
        for index in range(repeats):
            k = index % len(order_of)
            for name in order_of[k:] + order_of[:k]:
                samples[name].append(await cpu_timeit(runs[name], inner))
    for provider in owned:
        shutdown = getattr(provider, "shutdown", None)
        if callable(shutdown):
            shutdown()
    return {name: summarize(values) for name, values in samples.items()}


async def run(quick: bool = False) -> BenchResult:
    repeats, inner = (5, 100) if quick else (24, 2_000)  # quick: each order once
    stats = await bench(repeats, inner)
    base = stats[OFF]["median"]
    result = BenchResult(
        name="otel",
        title="OpenTelemetry instrumentation: executor.run() in process (µs per run)",
        columns=["median µs", "p99 µs", "added µs", "ratio"],
    )
    floor = stats.pop(FLOOR)["median"]
    for name, s in stats.items():
        result.add(
            name,
            **{
                "median µs": s["median"],
                "p99 µs": s["p99"],
                "added µs": None if name == OFF else s["median"] - base,
                "ratio": f"{s['median'] / base:.2f}x",
            },
        )
    added = stats[SDK]["median"] - base
    own = stats[NOOP_API]["median"] - base
    result.add(FLOOR, **{"median µs": floor, "added µs": floor})
    result.notes.append(
        f"Added per run with the SDK and a no-op exporter: {added:.1f} µs "
        f"(goal < {GOAL_US:.0f} µs: {'met' if added < GOAL_US else 'NOT met'}). A run makes "
        "one run span and one attempt span (about 35 attributes), one admission event, the "
        "traceparent, and three histogram points (duration, two token counts; cost and "
        "router picks are summed in process and observed at collection)."
    )
    result.notes.append(
        f"The instrumentation's own code is the no-op providers row: {own:.1f} µs (every "
        "hook runs, every OpenTelemetry call is a no-op). The rest of the SDK row, "
        f"{added - own:.1f} µs, is the SDK making and processing those spans and points; "
        f"made directly in a tight loop (the 'SDK floor' row) they cost {floor:.1f} µs on "
        "this machine in this run, and more inside a run, with the caches shared."
    )
    result.notes.append(
        "Off, the executor checks one attribute at each of eight hooks and imports nothing "
        "of OpenTelemetry; 'off' here is that path (against the code before the hooks, "
        "see the README)."
    )
    result.notes.append(
        f"CPU time (process time): {repeats} repeats of {inner} sequential runs per "
        "configuration, alternating; median and p99 over the repeats' per-run means."
    )
    result.data = {
        "stats": stats,
        "goal_us": GOAL_US,
        "added_us_sdk": added,
        "sdk_floor_us": floor,
        "added_us_noop_api": own,
    }
    return result


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
