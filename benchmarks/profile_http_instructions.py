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
from contextlib import AsyncExitStack

from benchmarks._fake_server_proc import ServerProcess
from benchmarks.bench_executor import _batch
from benchmarks.profile_executor_http import layer as http_layer

LAYERS = ("bare", "transport", "provider", "core", "full")
_NAMES = {"core": "run: core", "full": "run: full"} | {n: n for n in LAYERS[:3]}
"""A layer named here -> its name in `profile_executor_http`."""


async def main(layer: str, calls: int) -> None:
    with ServerProcess() as server:
        async with AsyncExitStack() as stack:
            fn = await http_layer(_NAMES[layer], stack, server)
            await _batch(fn, 200, 64)
            await _batch(fn, calls, 64)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("layer", choices=LAYERS)
    parser.add_argument("calls", type=int)
    args = parser.parse_args()
    asyncio.run(main(args.layer, args.calls))
