"""A synthetic stage whose truth is known, for the what-if tests."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from empathy_models import LLMCallRecord, ModelInfo, ModelRegistry, Outcome

WF, ST = "synth", "answer"
INPUT_TOKENS = 500
NOW = datetime(2026, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Truth:
    model: str
    input_price: float
    output_price: float
    success: float
    output_tokens: tuple[int, int]  # uniform integer range
    median_ms: float = 400.0
    share: float = 0.1  # of the recorded history

    @property
    def cost_per_call(self) -> float:
        """True expected cost of one attempt (failures cost nothing)."""
        mean_out = sum(self.output_tokens) / 2
        return self.success * (INPUT_TOKENS * self.input_price + mean_out * self.output_price) / 1e6


TRUTH: tuple[Truth, ...] = (
    Truth("cheap-bad", 0.5, 2.0, 0.85, (100, 300), share=0.15),
    Truth("oracle", 1.0, 4.0, 0.99, (200, 400), share=0.6),
    Truth("pricey", 1.5, 6.0, 0.995, (200, 400), share=0.15),
    Truth("premium", 3.0, 12.0, 0.999, (200, 400), share=0.10),
)
BY_ID = {t.model: t for t in TRUTH}
REGISTRY = ModelRegistry(
    models=tuple(
        ModelInfo(
            id=t.model,
            provider="openai",
            tier="capable",
            input_price_per_mtok=t.input_price,
            output_price_per_mtok=t.output_price,
            context_window=100_000,
            max_output_tokens=4_096,
        )
        for t in TRUTH
    ),
    price_version="synth-1",
)


def history(
    seed: int, calls: int, *, days: float = 7.0, truth: Sequence[Truth] = TRUTH
) -> list[LLMCallRecord]:
    """``calls`` attempts spread evenly over the ``days`` before NOW, drawn from the truth."""
    rng = random.Random(seed)
    models = list(truth)
    weights = [t.share for t in models]
    span = days * 86_400.0
    out = []
    for i in range(calls):
        t = rng.choices(models, weights)[0]
        ok = rng.random() < t.success
        tokens = rng.randint(*t.output_tokens) if ok else 0
        out.append(
            LLMCallRecord(
                provider="openai",
                model=t.model,
                outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
                timestamp=NOW - timedelta(seconds=span * (1 - (i + 0.5) / calls)),
                workflow=WF,
                stage=ST,
                input_tokens=INPUT_TOKENS if ok else 0,
                output_tokens=tokens,
                cost_usd=(INPUT_TOKENS * t.input_price + tokens * t.output_price) / 1e6
                if ok
                else 0.0,
                latency_ms=rng.lognormvariate(0, 0.3) * t.median_ms,
            )
        )
    return out
