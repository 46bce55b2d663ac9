"""
Patterns in structured output and the time ``re`` takes to search a model's answer with
them (``empathy_models._regex_cost``).

For each pattern: what the check makes of it (refused, or the exponent of its search
time and the longest string searched with it), how long the analysis takes (once per
pattern; then cached), and the time of ``re.search`` on a near miss crafted for it:

* a refused pattern, at the shortest lengths where the time passes 0.1 s (it grows by
  a factor with each few characters): what a model's answer of that length would cost
  without the check;
* an accepted pattern whose time grows faster than the length, at its length limit (the
  most one string costs) and at four times it (what the limit keeps away);
* a linear pattern, at 100,000 characters.

Bar: no accepted pattern takes more than 0.25 s at its limit; no refused one is fast
(under 0.1 s at 40 characters).  ``--quick`` (CI: that the code runs) searches refused
patterns until 0.02 s, and an accepted n^2 pattern at twice its limit, not four times.

Run: ``python -m benchmarks.bench_pattern_cost [--quick]``
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from benchmarks._common import BenchResult, script_main
from empathy_models._regex_cost import length_limit, pattern_cost

BAR_S = 0.25
REFUSED_BAR_S = 0.1

Crafted = Callable[[int], str]
"""A near miss of about ``n`` characters."""

CASES: list[tuple[str, Crafted]] = [
    (r"^(a+)+$", lambda n: "a" * n + "!"),
    (r"(a|aa)*b", lambda n: "a" * n),
    (r"(\w+\s?)*$", lambda n: "a" * n + "!"),
    (r"^(a*)*$", lambda n: "a" * n + "!"),
    (r"^(\w|ab)+$", lambda n: "ab" * (n // 2) + "!"),
    (r"^([a-z]+\.?)*[a-z]+$", lambda n: "a" * n + "!"),
    (r"^(.*?,){11}P", lambda n: "," * n),
    (r"^[^@\s]+@[^@\s]+\.[^@\s]+$", lambda n: "a@" + "a." * (n // 2) + " "),
    (r"\w+@", lambda n: "a" * n),
    (r"\d+$", lambda n: "1" * n + "x"),
    (r"^\s*(.*?)\s*$", lambda n: " " * (n // 2) + "x" + " " * (n // 2) + "\n!"),
    (r".*.*=", lambda n: "a" * n),
    (r"^[a-z]+$", lambda n: "a" * n + "!"),
    (r"\d{3}-\d{4}", lambda n: "1" * n),
    (r"^(\+\d{1,3})?\d+$", lambda n: "+" + "1" * n + "x"),
    (r"^(foo|bar)+$", lambda n: "foo" * (n // 3) + "!"),
    (r"^(\w++\s?)*$", lambda n: "a" * n + "!"),
]


def _search_s(pattern: str, text: str) -> float:
    compiled = re.compile(pattern)
    started = time.perf_counter()
    compiled.search(text)
    return time.perf_counter() - started


def _analysis_ms(pattern: str, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        pattern_cost.__wrapped__(pattern)
    return (time.perf_counter() - started) / repeats * 1000


def _refused_growth(pattern: str, crafted: Crafted, longest: int, bar: float) -> tuple[int, float]:
    """The first length (by steps of 2) where a search passes ``bar`` s, and its time."""
    seconds = 0.0
    for length in range(4, longest + 1, 2):
        seconds = _search_s(pattern, crafted(length))
        if seconds > bar:
            return length, seconds
    return longest, seconds


async def run(quick: bool) -> BenchResult:
    refused_bar = 0.02 if quick else REFUSED_BAR_S
    beyond_factor = 2 if quick else 4
    beyond_column = f"{beyond_factor}x chars s"
    result = BenchResult(
        name="pattern_cost",
        title="Schema patterns: the analysis, and re.search on crafted near misses",
        columns=["verdict", "limit chars", "analysis ms", "chars", "search s", beyond_column],
    )
    worst_accepted = 0.0
    fast_refused: list[str] = []
    for pattern, crafted in CASES:
        exponent, refused = pattern_cost(pattern)
        analysis = _analysis_ms(pattern, 1 if quick else 20)
        if refused is not None:
            verdict = "refused: " + ("exponential" if "exponential" in refused else "power")
            length, seconds = _refused_growth(pattern, crafted, 40, refused_bar)
            if seconds <= refused_bar:
                fast_refused.append(pattern)
            result.add(
                pattern,
                verdict=verdict,
                **{"analysis ms": analysis, "chars": length},
                **{"search s": seconds},
            )
            continue
        limit = length_limit(exponent) if exponent >= 2 else 100_000
        seconds = _search_s(pattern, crafted(limit))
        worst_accepted = max(worst_accepted, seconds)
        beyond = None
        if exponent >= 2 and not (quick and exponent >= 3):
            beyond = _search_s(pattern, crafted(beyond_factor * limit))
        result.add(
            pattern,
            verdict=f"n^{exponent}",
            **{
                "limit chars": limit if exponent >= 2 else "any",
                "analysis ms": analysis,
                "chars": limit,
                "search s": seconds,
                beyond_column: beyond,
            },
        )
    result.notes.append(
        f"worst accepted search at its limit: {worst_accepted:.3f} s (bar {BAR_S} s): "
        + ("met" if worst_accepted <= BAR_S else "**missed**")
    )
    result.notes.append(
        "refused patterns fast at 40 characters: "
        + (", ".join(map(repr, fast_refused)) if fast_refused else "none")
    )
    result.data = {"worst_accepted_s": worst_accepted, "fast_refused": fast_refused}
    return result


def main(argv: list[str] | None = None) -> None:
    script_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
