"""
The fleet check: three OS processes, each with its own `CircuitBreaker` over one shared
circuit-state store, guard one key, and the store must keep them one breaker.

A plugin's tests run it against their own store::

    from empathy_models.testing.fleet import breaker_fleet_check

    async def test_three_processes_share_one_breaker() -> None:
        await breaker_fleet_check("redis://127.0.0.1:6379/15")

What it checks:

* Failures from all three trip the circuit exactly at the threshold (9): the store
  shows OPEN, generation 1, a streak of exactly 9 (later failures carry the old
  generation and are dropped).
* Once each process's local view is older than ``local_view_ttl`` (their breaker
  clocks are moved, no waiting), every process rejects.
* After recovery (the open period is ended by forcing it to a past time, since the
  store's clock cannot be moved), 3 x 4 concurrent admissions get exactly one probe
  lease in total; its success closes the circuit for everyone.
* On a store that announces changes (`CircuitStateStore.change_feed`), a force made
  by the parent is seen by all three as soon as it is announced, while their local
  views are still fresh by their clocks; and three more processes in exact mode
  (``local_view_ttl=0``) reject at their first admission after each of five forces
  and admit after each reset.

The children run ``python -m empathy_models.testing._fleet_worker`` with the running
interpreter and read the URL from their standard input, never from their command line
(which every user of the machine can read); a child that dies or stays silent for 60 s
fails the check with its stderr.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ..abc import CircuitStateStore
from ..backends import state_store_from_url
from ..records import CircuitState
from ._child import JsonLinesChild

__all__ = ["breaker_fleet_check"]

ANNOUNCEMENT_WAIT = 10.0
"""Seconds the processes get to see an announced change (it takes milliseconds)."""


class _Child(JsonLinesChild):
    """A fleet worker: one breaker over the shared store, guarding one key."""

    def __init__(self, *args: str) -> None:
        super().__init__(
            [sys.executable, "-m", "empathy_models.testing._fleet_worker", *args],
            name="fleet worker",
        )

    def close(self) -> None:
        """Ask the worker to quit (kill it if it does not), then close the pipes."""
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        super().close()


def _ask_all(children: list[_Child], payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``payload`` to every child first (so they run at once), then read each answer."""
    for child in children:
        child.send(payload)
    return [child.read() for child in children]


async def breaker_fleet_check(url: str) -> None:
    """Run the fleet check (see the module docstring) on the shared store at ``url``."""
    children: list[_Child] = []

    def spawn(url: str, key: str, policy: dict[str, Any], ttl: float) -> _Child:
        # the URL goes down the pipe: a command line (and a password in it) is
        # visible to every user of the machine
        child = _Child(key, json.dumps(policy), str(ttl))
        children.append(child)
        child.send({"url": url})
        assert child.read() == {"ready": True}
        return child

    try:
        await _check(url, spawn)
    finally:
        for child in children:
            child.close()


async def _check(url: str, spawn: Callable[[str, str, dict[str, Any], float], _Child]) -> None:
    key = "fleet-" + uuid.uuid4().hex[:8]
    policy = {
        "consecutive_failures": 9,
        "minimum_calls": 1000,
        "recovery_seconds": 3600.0,
        "max_recovery_seconds": 3600.0,
        "half_open_probes": 1,
        "probe_lease_seconds": 3600.0,
    }
    ttl = 5.0
    store = state_store_from_url(url)
    if not store.shared:
        await store.aclose()
        raise AssertionError(
            "the fleet check needs a store shared between processes; "
            f"{type(store).__name__} is not (its `shared` is false)"
        )
    children = [spawn(url, key, policy, ttl) for _ in range(3)]
    async with store:
        answers = _ask_all(children, {"op": "fail", "n": 2})
        assert [a["admitted"] for a in answers] == [2, 2, 2]
        state = await store.snapshot(key)
        assert (state.state, state.generation, state.consecutive_failures) == (
            CircuitState.CLOSED,
            0,
            6,
        )

        answers = _ask_all(children, {"op": "fail", "n": 5})
        assert sum(a["admitted"] for a in answers) >= 3
        state = await store.snapshot(key)
        assert state.state is CircuitState.OPEN
        assert (state.generation, state.consecutive_failures, state.open_count) == (1, 9, 1)

        # every local view goes stale: every process now asks the store and rejects
        _ask_all(children, {"op": "advance", "seconds": ttl})
        answers = _ask_all(children, {"op": "fail", "n": 1})
        assert answers == [{"admitted": 0, "rejected": ["open"]}] * 3

        # recovery: end the open period (a time in the past), let the views go stale
        await store.force(
            key,
            CircuitState.FORCED_OPEN,
            until=datetime.now(UTC) - timedelta(minutes=5),
            reason="recovered",
        )
        _ask_all(children, {"op": "advance", "seconds": ttl})
        answers = _ask_all(children, {"op": "admit", "n": 4})
        assert sum(a["admitted"] for a in answers) == 1, answers
        assert sum(len(a["leases"]) for a in answers) == 1, answers
        state = await store.snapshot(key)
        assert state.state is CircuitState.HALF_OPEN
        assert state.probes_in_flight == 1

        prober = next(c for c, a in zip(children, answers, strict=True) if a["leases"])
        prober.send({"op": "report", "outcome": "success"})
        assert prober.read() == {"reported": 1}
        state = await store.snapshot(key)
        assert state.state is CircuitState.CLOSED

        _ask_all(children, {"op": "advance", "seconds": ttl})
        answers = _ask_all(children, {"op": "admit", "n": 1})
        assert answers == [{"admitted": 1, "leases": [], "rejected": []}] * 3

        if store.change_feed() is not None:
            await _announced(store, children, key)
            exact = [spawn(url, key, policy, 0.0) for _ in range(3)]
            await _exact(store, exact, key)


async def _announced(store: CircuitStateStore, children: list[_Child], key: str) -> None:
    """
    The store announces changes: a force is seen by every process as soon as its
    announcement arrives, with every local view still fresh (no clock moved).
    """
    await store.force(key, CircuitState.FORCED_OPEN, reason="announced")
    deadline = time.monotonic() + ANNOUNCEMENT_WAIT
    while True:
        answers = _ask_all(children, {"op": "admit", "n": 1})
        if all(a["rejected"] == ["forced_open"] for a in answers):
            break
        assert time.monotonic() < deadline, f"the force was not announced: {answers}"
        await asyncio.sleep(0.02)


async def _exact(store: CircuitStateStore, exact: list[_Child], key: str) -> None:
    """
    Processes in exact mode (``local_view_ttl=0``) see every change made before an
    admission at that very admission: after each force returns, without waiting, every
    one of them rejects; after each reset, every one admits.
    """
    for round_ in range(5):
        await store.reset(key)
        answers = _ask_all(exact, {"op": "admit", "n": 1})
        assert all(a["admitted"] == 1 for a in answers), (round_, answers)
        await store.force(key, CircuitState.FORCED_OPEN, reason=f"exact, round {round_}")
        answers = _ask_all(exact, {"op": "admit", "n": 1})
        assert all(a["rejected"] == ["forced_open"] for a in answers), (round_, answers)
