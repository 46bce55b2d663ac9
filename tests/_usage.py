"""
What the usage tests share: the record metadata keys of estimated counts, the executor's
documented input estimate, and reads of the one record and of the one budget's spend.
"""

from __future__ import annotations

from empathy_models import LLMCallRecord
from empathy_models.abc import QuotaStore, TelemetryBackend

INPUT_ESTIMATED = "empathy_models.input_tokens_estimated"
OUTPUT_ESTIMATED = "empathy_models.output_tokens_estimated"


def estimate(prompt: str) -> int:
    """
    The executor's documented estimate of a one-message prompt: a quarter of its worst
    case (a token per UTF-8 byte, plus 8 for the message and 8 for the reply), rounded up.
    """
    return -(-(len(prompt.encode()) + 16) // 4)


async def only_record(telemetry: TelemetryBackend) -> LLMCallRecord:
    """The one record ``telemetry`` holds."""
    (record,) = await telemetry.recent(limit=10)
    return record


async def spent(quota: QuotaStore) -> float:
    """What the one budget window ``quota`` holds has spent, in dollars."""
    (usage,) = await quota.usages()
    return usage.spent_usd
