"""
Run every benchmark and write the tables: ``python -m benchmarks [--quick] [--only NAME]``.

Each script writes ``benchmarks/results/<name>.json`` and ``<name>.md`` (plus PNG plots
when matplotlib is installed); the runner also writes ``benchmarks/results/RESULTS.md``
with every table and the machine they came from.  ``--quick`` (under two minutes on two
cores) is what CI runs so the scripts never rot; the full run takes under ten minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from benchmarks import (
    bench_breaker,
    bench_breaker_rates,
    bench_cache,
    bench_executor,
    bench_limits,
    bench_otel,
    bench_pattern_cost,
    bench_router_start,
    bench_routing,
    bench_routing_quality,
    bench_streaming,
    bench_telemetry,
    bench_whatif,
)
from benchmarks._common import RESULTS_DIR, BenchResult, machine_info, write_result

SCRIPTS: dict[str, Callable[[bool], Coroutine[Any, Any, BenchResult]]] = {
    "routing": bench_routing.run,
    "routing_history": bench_routing.run_history,
    "routing_quality": bench_routing_quality.run,
    "breaker": bench_breaker.run,
    "breaker_keys": bench_breaker.run_keys,
    "breaker_rates": bench_breaker_rates.run,
    "telemetry": bench_telemetry.run,
    "executor": bench_executor.run,
    "router_start": bench_router_start.run,
    "otel": bench_otel.run,
    "streaming": bench_streaming.run,
    "limits": bench_limits.run,
    "cache": bench_cache.run,
    "whatif": bench_whatif.run,
    "pattern_cost": bench_pattern_cost.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI, < 2 minutes)")
    parser.add_argument("--only", choices=sorted(SCRIPTS), action="append")
    args = parser.parse_args(argv)
    names = args.only or list(SCRIPTS)
    started = time.perf_counter()
    sections = []
    for name in names:
        t0 = time.perf_counter()
        result = asyncio.run(SCRIPTS[name](args.quick))
        write_result(result)
        sections.append(result.markdown())
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]\n")
    info = machine_info()
    header = (
        f"# Benchmark results{' (quick)' if args.quick else ''}\n\n"
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"{info['platform']}; {info['when']}.\n"
        f"Command: `python -m benchmarks{' --quick' if args.quick else ''}`; "
        f"total {time.perf_counter() - started:.0f} s.\n\n"
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "RESULTS.md").write_text(header + "\n".join(sections), encoding="utf-8")
    print(f"wrote {RESULTS_DIR / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
