"""
The commands' time window, and the calls stamped after now.

Every command that reads recorded calls counts those of the ``--days`` before now and
every call stamped after now, as the router does: its evidence window has a start and
no end, so calls a machine whose clock runs ahead recorded are evidence it learns from.
When there are such calls, the command says how many and how far ahead (`Ahead.note`;
``"stamped_after_now"`` in JSON).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from attrs import frozen

from empathy_models.abc import TelemetryBackend

__all__ = ["Ahead", "stamped_ahead", "whatif_window"]


@frozen
class Ahead:
    """The sample calls stamped at or after ``now`` and the newest one's time."""

    now: datetime
    calls: int = 0
    newest: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"calls", "newest"}`` (ISO time, None without such calls), for JSON output."""
        return {
            "calls": self.calls,
            "newest": None if self.newest is None else self.newest.isoformat(),
        }

    def note(self) -> str | None:
        """The line that says these calls were counted (None when there are none)."""
        if not self.calls or self.newest is None:
            return None
        ahead = timedelta(seconds=round((self.newest - self.now).total_seconds()))
        calls = "1 call is" if self.calls == 1 else f"{self.calls} calls are"
        return (
            f"{calls} stamped after now (the newest {ahead} ahead): a clock that runs "
            "ahead wrote them; they are counted, as the router counts them"
        )


async def stamped_ahead(
    backend: TelemetryBackend,
    now: datetime,
    *,
    workflow: str | None = None,
    stage: str | None = None,
) -> Ahead:
    """
    The sample calls (`Outcome.is_sample`, those the router learns from) of
    ``workflow`` / ``stage`` (None: any; ``""``: the calls recorded without one)
    stamped at or after ``now``.
    """
    perfs = await backend.aggregate(workflow=workflow, stage=stage, since=now)
    calls = sum(p.sample_size for p in perfs)
    if not calls:
        return Ahead(now)
    newest = await backend.recent(
        limit=1, workflow=workflow, stage=stage, since=now, samples_only=True
    )
    return Ahead(now, calls, newest[0].timestamp if newest else None)


def whatif_window(now: datetime, days: float, ahead: Ahead) -> tuple[datetime, float]:
    """
    The end and length in days of the window ``routing whatif`` evaluates: the
    ``days`` before ``now``, and up to the newest call stamped after it.
    """
    if ahead.newest is None or ahead.newest < now:
        return now, days
    try:
        end = ahead.newest + timedelta(microseconds=1)
    except OverflowError:  # the last instant a datetime holds: a window too long anyway
        end = ahead.newest
    return end, (end - (now - timedelta(days=days))) / timedelta(days=1)
