"""
Instructions per routing decision, counted by callgrind (deterministic, unlike timings
on a loaded machine): `bench_routing`'s router (``n`` candidates, 1,000 outcomes
reported first), its decisions made as that benchmark makes them, a new prompt size
for each.

Run it for two call counts and take the difference, which leaves out the interpreter's
start and the router's setup::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.profile_routing_instructions 2000 --candidates 64 --mode live
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m benchmarks.profile_routing_instructions 4000 --candidates 64 --mode live

(instructions per call: the difference of the two ``Collected`` totals / 2000).
``--mode live``: an outcome reported before each decision (`bench_routing`'s headline
rows: the decision and the outcome together; ``record`` counts the outcome alone);
``steady``: the decision repeated on unchanged evidence.  Not part of
``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from benchmarks.bench_routing import PROMPT_TOKENS, feed, make_pool, make_registry
from empathy_models import AdaptiveModelRouter

OPTIONS: dict[str, Any] = {
    "max_tokens": 400,
    "max_cost": 0.05,
    "min_success_rate": 0.8,
    "on_no_match": "relax",
}
"""`bench_routing`'s constraints."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", type=int, help="timed calls, after 500 to warm up")
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--mode", choices=("live", "record", "steady"), default="live")
    args = parser.parse_args(argv)
    n = args.candidates
    registry = make_registry(n)
    ids = [m.id for m in registry.models]
    pool = make_pool(registry)
    router = AdaptiveModelRouter(registry, seed=1, refresh_interval=None)
    feed(router, ids, pool, 1_000)
    decide, record = router.get_best_model, router.record_outcome
    sizes = random.Random(n)
    total = args.calls + 500
    outcomes = [pool[ids[i % n]][(i // n) % 16] for i in range(total)]
    tokens = [sizes.randint(*PROMPT_TOKENS) for _ in range(total)]
    for i in range(total):  # the first 500 warm up: the same in both runs
        if args.mode != "steady" or i < 500:
            record(outcomes[i])
        if args.mode != "record" or i < 500:
            decide("bench", "answer", candidates=ids, input_tokens=tokens[i], **OPTIONS)


if __name__ == "__main__":
    main()
