"""
The child process of `empathy_models.testing.fleet.breaker_fleet_check`.

Run as ``python -m empathy_models.testing._fleet_worker KEY POLICY_JSON LOCAL_VIEW_TTL``
with ``{"url": STORE_URL}`` as the first line of its standard input (a URL may hold a
password, which a command line would show to every user of the machine): one
`CircuitBreaker` over the shared store named by STORE_URL (``redis://...``,
``postgresql://...``, or any shared store's URL), guarding KEY under
``BreakerPolicy(**POLICY_JSON)``.  The breaker's own clock (which times its local view)
starts at the wall clock and moves only by ``advance`` commands, so the check decides
when a view goes stale; the store keeps its own (server) time.

Prints ``{"ready": true}`` once the breaker is open, then answers one JSON command per
stdin line with one JSON line:

* ``{"op": "fail", "n": N}``: N calls through ``guard`` that raise a 503 `ServerError`;
  answers ``admitted`` (how many reached the "provider") and ``rejected`` (the states
  that rejected the others).
* ``{"op": "admit", "n": N}``: N admissions held open (not reported); answers
  ``admitted``, the probe ``leases`` granted and ``rejected``.
* ``{"op": "report", "outcome": O}``: report every held ticket with outcome O.
* ``{"op": "advance", "seconds": S}``: move the breaker's clock.
* ``{"op": "status"}``: the store's state of KEY (`to_dict`).
* ``{"op": "quit"}``.

Exits non-zero with a traceback on stderr if anything escapes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from ..breaker import CircuitBreaker
from ..circuit import BreakerPolicy
from ..exceptions import CircuitOpenError, ServerError
from ..records import Outcome, Ticket


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def serve(url: str, key: str, policy: BreakerPolicy, ttl: float) -> None:
    clock = [time.time()]
    held: list[Ticket] = []
    breaker = CircuitBreaker(store=url, policy=policy, clock=lambda: clock[0], local_view_ttl=ttl)
    async with breaker:
        emit({"ready": True})
        while True:
            line = await read_line()
            if not line:
                return
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                emit({"bye": True})
                return
            if op == "fail":
                admitted = 0
                rejected: list[str] = []
                for _ in range(cmd["n"]):
                    try:
                        async with breaker.guard(key):
                            admitted += 1
                            raise ServerError("HTTP 503", provider=key, status=503)
                    except ServerError:
                        pass
                    except CircuitOpenError as exc:
                        rejected.append(exc.state.value)
                emit({"admitted": admitted, "rejected": rejected})
            elif op == "admit":
                leases: list[str] = []
                rejected = []
                count = 0
                for _ in range(cmd["n"]):
                    try:
                        ticket = await breaker.admit(key)
                    except CircuitOpenError as exc:
                        rejected.append(exc.state.value)
                        continue
                    count += 1
                    held.append(ticket)
                    if ticket.lease_id is not None:
                        leases.append(ticket.lease_id)
                emit({"admitted": count, "leases": leases, "rejected": rejected})
            elif op == "report":
                outcome = Outcome(cmd["outcome"])
                reported = len(held)
                for ticket in held:
                    await breaker.report(ticket, outcome)
                held.clear()
                emit({"reported": reported})
            elif op == "advance":
                clock[0] += float(cmd["seconds"])
                emit({"clock": clock[0]})
            elif op == "status":
                emit((await breaker.get_status(key)).to_dict())
            else:
                raise ValueError(f"unknown command {op!r}")


def main() -> None:
    key, policy_json, ttl = sys.argv[1:4]
    url = json.loads(sys.stdin.readline())["url"]
    policy = BreakerPolicy(**json.loads(policy_json))
    asyncio.run(serve(url, key, policy, float(ttl)))


if __name__ == "__main__":
    main()
