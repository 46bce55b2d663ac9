"""
Cancel a guarded call while its half-open admission is in flight, many times, and
count what went wrong.  Shared by the SQLite, Redis and
PostgreSQL tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta

import attrs

from empathy_models import CircuitBreaker, CircuitOpenError

__all__ = ["CancelTrials", "cancel_during_admission"]


@attrs.define
class CancelTrials:
    trials: int = 0
    cancelled_before_the_body: int = 0
    """Trials whose cancel landed before the guarded body began (the window tested)."""
    leaked: int = 0
    """Trials after which a probe lease was still held with nobody probing."""
    ran_after_cancel: int = 0
    """Trials whose guarded body began although the task had been cancelled."""


def _live_leases(leases: tuple[tuple[str, float], ...]) -> int:
    now = time.time()
    return sum(1 for _, expires in leases if expires > now)


async def cancel_during_admission(
    breaker: CircuitBreaker,
    key: str,
    *,
    trials: int = 100,
    window_hits: int = 10,
    settle_seconds: float = 3.0,
) -> CancelTrials:
    """
    For each trial: hold ``key`` open until a moment already past (so the next admission
    is a half-open probe taking a lease), start a guarded call, cancel it after a
    varying delay, then check the store within ``settle_seconds`` for a lease left
    behind.  ``breaker`` must use ``local_view_ttl=0`` so every admission asks the store.

    Runs at least ``trials`` trials, and more (up to five times as many) until
    ``window_hits`` cancels have landed before the guarded body began: how many do
    depends on the machine's load, and fewer would not test the window.
    """
    out = CancelTrials()
    i = -1
    while out.trials < trials * 5 and (
        out.trials < trials or out.cancelled_before_the_body < window_hits
    ):
        i += 1
        await breaker.reset(key)
        await breaker.force_open(key, until=datetime.now(UTC) - timedelta(seconds=1))
        flags = {"cancel_sent": False, "body_started": False}

        async def call(flags: dict[str, bool] = flags) -> None:
            with contextlib.suppress(CircuitOpenError):
                async with breaker.guard(key):
                    flags["body_started"] = True
                    if flags["cancel_sent"]:
                        out.ran_after_cancel += 1
                    await asyncio.sleep(0)

        task = asyncio.ensure_future(call())
        delay = (i % 25) * 0.0002
        if delay:
            await asyncio.sleep(delay)
        else:
            for _ in range(i % 5):
                await asyncio.sleep(0)
        flags["cancel_sent"] = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        out.trials += 1
        if not flags["body_started"]:
            out.cancelled_before_the_body += 1
        deadline = time.monotonic() + settle_seconds
        while True:
            state = await breaker.store.snapshot(key)
            if _live_leases(state.leases) == 0:
                break
            if time.monotonic() >= deadline:
                out.leaked += 1
                break
            await asyncio.sleep(0.01)
    return out
