"""
The commands' time window, and the calls stamped after now.

Every command that reads recorded calls counts those of the ``--days`` before now and
every call stamped after now, as the router does: its evidence window has a start and
no end, so calls a machine whose clock runs ahead recorded are evidence it learns from.
When there are such calls, the command says how many and how far ahead (`Ahead.note`;
``"stamped_after_now"`` in JSON).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

from attrs import frozen

from empathy_models.abc import TelemetryBackend

from ._common import shown_name

__all__ = [
    "Ahead",
    "recorded_elsewhere",
    "seen_only_for",
    "stages_seen",
    "stamped_ahead",
    "whatif_window",
]


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


async def stages_seen(
    backend: TelemetryBackend, days: float, workflow: str | None, stage: str | None
) -> list[tuple[str, str, list[str]]]:
    """(workflow, stage, models) seen in the window, sorted; "" for calls without one."""
    since = datetime.now(UTC) - timedelta(days=days)
    perfs = await backend.aggregate(workflow=workflow, stage=stage, since=since)
    found: dict[tuple[str, str], list[str]] = {}
    for p in perfs:
        found.setdefault((p.workflow or "", p.stage or ""), []).append(p.model)
    return [(w, s, sorted(set(m))) for (w, s), m in sorted(found.items())]


_LISTED_STAGES: Final = 10
"""At most this many stages are named where a stage asked for has no calls."""


async def _listed_stages(backend: TelemetryBackend, days: float) -> str:
    """The stages with calls in the window, as ``docs/outline, docs/write and 3 more``;
    empty when there are none at all."""
    seen = [
        f"{shown_name(w)}/{shown_name(s)}"
        for w, s, _ in await stages_seen(backend, days, None, None)
    ]
    more = len(seen) - _LISTED_STAGES
    return ", ".join(seen[:_LISTED_STAGES]) + (f" and {more} more" if more > 0 else "")


async def recorded_elsewhere(backend: TelemetryBackend, days: float) -> str:
    """
    Where a workflow or stage asked for has no calls (a typo, most often): the stages
    that have some in the window, as `` (only for docs/outline, docs/write)``; empty when
    there are none at all.
    """
    listed = await _listed_stages(backend, days)
    return f" (only for {listed})" if listed else ""


async def seen_only_for(backend: TelemetryBackend, days: float) -> str | None:
    """
    The note a table of a workflow or stage without calls ends with (a typo, most
    often): ``note: calls were recorded in the last 7 day(s) only for docs/write``;
    None when the window has no calls at all.
    """
    listed = await _listed_stages(backend, days)
    if not listed:
        return None
    return f"note: calls were recorded in the last {days:g} day(s) only for {listed}"
