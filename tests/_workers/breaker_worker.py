"""
Child-process entry point for ``tests/test_breaker_multiprocess.py``: one `CircuitBreaker`
on a shared store, driven by JSON lines.

Run as ``python breaker_worker.py CONFIG_JSON`` where the config holds ``url`` (the
store), ``policy`` (keyword arguments of `BreakerPolicy`), ``ttl`` (``local_view_ttl``)
and ``fake_time`` (true: the breaker's and the store's clock are set by each command's
``now``, so no test waits for time to pass; false: the real clock, for stores that take
time from their server).  Prints ``{"ready": true}`` once the store is open, then
answers one command per stdin line:

* ``{"op": "fail", "key": K}``: a guarded call that raises a 503.  Answers
  ``{"admitted": bool, "state": state that rejected or null}``.
* ``{"op": "try", "key": K}``: a guarded call that succeeds; same answer.
* ``{"op": "hold", "key": K}``: admit and keep the ticket; answers ``admitted``,
  ``lease`` (a half-open probe lease id or null) and ``state`` when rejected.
* ``{"op": "release", "outcome": "success"}``: report the held ticket.
* ``{"op": "quit"}``: close the breaker (flushing) and exit.

Anything that escapes is a traceback on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import anyio.to_thread

from empathy_models import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    Outcome,
    state_store_from_url,
)
from empathy_models.exceptions import ServerError
from empathy_models.records import Ticket


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def guarded(breaker: CircuitBreaker, key: str, *, fail: bool) -> dict[str, Any]:
    try:
        async with breaker.guard(key):
            if fail:
                raise ServerError("provider down", status=503)
    except CircuitOpenError as exc:
        return {"admitted": False, "state": exc.state.value}
    except ServerError:
        pass
    answer: dict[str, Any] = {"admitted": True, "state": None}
    if breaker.degraded:
        answer["degraded"] = True  # the store failed: the assertions show it, not hide it
    return answer


async def serve(config: dict[str, Any]) -> None:
    now = [time.time()]

    def clock() -> float:
        return now[0] if config["fake_time"] else time.time()

    options: dict[str, Any] = {"clock": clock} if config["fake_time"] else {}
    store = state_store_from_url(config["url"], **options)
    policy = BreakerPolicy(**config["policy"])
    held: Ticket | None = None
    async with (
        store,
        # store_timeout=None: a slow store is waited for, however slow.  The test is about
        # the shared store's state; a store operation slower than the default 5 s (seen on
        # a machine at load 30) would put this process in degraded mode, where a local
        # breaker that saw none of the others' failures admits the call
        CircuitBreaker(
            store, policy, clock=clock, local_view_ttl=config["ttl"], store_timeout=None
        ) as breaker,
    ):
        emit({"ready": True})
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            if "now" in command:
                now[0] = float(command["now"])
            op = command["op"]
            if op == "quit":
                return
            if op in ("fail", "try"):
                emit(await guarded(breaker, command["key"], fail=op == "fail"))
            elif op == "hold":
                try:
                    held = await breaker.admit(command["key"])
                except CircuitOpenError as exc:
                    emit({"admitted": False, "lease": None, "state": exc.state.value})
                else:
                    emit({"admitted": True, "lease": held.lease_id, "state": None})
            elif op == "release":
                assert held is not None, "release without a held ticket"
                await breaker.report(held, Outcome(command["outcome"]))
                held = None
                emit({"released": True})
            else:
                raise ValueError(f"unknown op {op!r}")


def main() -> None:
    anyio.run(serve, json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
