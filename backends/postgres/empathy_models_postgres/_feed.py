"""
The PostgreSQL state store's change feed: its ``NOTIFY`` announcements, by ``LISTEN``.

A write that gives a key a new generation also runs ``pg_notify(channel, "<generation>
<key>")`` in its own transaction, so the announcement is delivered when (and only if)
the write commits.  `watch` listens on a connection of its own (outside the pool),
first checks that notifications reach it (it notifies a channel only its session
listens to and must hear that come back), then proves it is in sync with a ``SELECT
1`` every ``feed.interval`` seconds and whenever a breaker asks (`ChangeFeed.sync`,
the exact mode), a round trip the asking task makes itself on the listening session
(`Rounds`: one at a time; one that began before the asker did is waited for and the
next one shared): a listening session that is idle sends the notifications committed
before it reads the next query, and asyncpg hands them to the listener before the
query's result to its caller, so the query's send time is a sync point.  That needs a
session of its own on the server: a pooler that hands the connection's statements to
different server sessions (PgBouncer in transaction or statement mode) can lose
announcements, so behind one build the store with ``listen=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from empathy_models.abc import ChangeFeed

if TYPE_CHECKING:
    from ._common import Database

SYNC_TIMEOUT = 2.0
"""Seconds the listening session may take to answer before it counts as lost."""

CLOSE_TIMEOUT = 1.0


def channel_of(table: str) -> str:
    """The ``NOTIFY`` channel of a state table (a short name: at most 63 bytes)."""
    return "empathy_circuit_" + hashlib.sha1(table.encode("utf-8")).hexdigest()[:20]


def application_name(channel: str) -> str:
    """The listening session's ``application_name``."""
    return f"empathy-models feed {channel}"


def payload(key: str, generation: int) -> str:
    return f"{generation} {key}"


class Session(Protocol):
    """What `Rounds` needs of the listening session (an asyncpg connection)."""

    async def fetchval(self, query: str) -> Any: ...

    def terminate(self) -> None: ...


class Rounds:
    """
    ``SELECT 1`` round trips on the listening session, one at a time, each a sync point
    of ``feed`` at its send time.  `sync` is `ChangeFeed`'s ``direct``: the caller's
    task sends the query itself.  A caller cancelled while its query is in flight cuts
    the session (what it would answer next is unknown), as does a failed or late
    answer: the watcher then subscribes again, and until it has, `sync` answers false.
    """

    def __init__(self, conn: Session, feed: ChangeFeed, lost: Callable[[], None]) -> None:
        self._conn = conn
        self._feed = feed
        self._lost = lost  # wakes the watcher, which finds the session gone
        self._round: asyncio.Future[bool] | None = None  # the query in flight
        self._sent = -math.inf  # its send time
        self.failed: str | None = None  # why the session was cut

    async def sync(self) -> bool:
        """A sync point sent after this call began; false once the session is lost."""
        begun = time.monotonic()
        while self.failed is None:
            current = self._round
            if current is None:
                return await self._send()
            sent = self._sent
            if not await asyncio.shield(current):  # a cancelled waiter leaves it running
                return False
            if sent >= begun:
                return True
        return False

    async def _send(self) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._round = done
        at = self._sent = time.monotonic()
        ok = False
        try:
            async with asyncio.timeout(SYNC_TIMEOUT):
                await self._conn.fetchval("SELECT 1")
            ok = True
        except Exception as exc:
            self._cut(f"no answer to a sync point ({type(exc).__name__})")
            return False
        except BaseException:
            self._cut("a sync point's caller was cancelled while it was in flight")
            raise
        finally:
            self._round = None
            done.set_result(ok)
        # asyncpg schedules a (sync) listener with call_soon as each notification is
        # read, before the query's result resumes this task: those that came first
        # have been handed on
        self._feed.synced(at)
        return True

    def _cut(self, why: str) -> None:
        self.failed = why
        self._conn.terminate()
        self._lost()


async def watch(db: Database, channel: str, feed: ChangeFeed) -> None:
    """
    One ``LISTEN`` on ``channel`` feeding ``feed``, until it fails (it raises then: a
    connection error, no answer within `SYNC_TIMEOUT` seconds, or notifications that
    do not reach the session).
    """
    # a channel only this session listens to, for the check that notifications arrive
    private = f"{channel}_{os.urandom(8).hex()}"
    came_back: list[str] = []

    def on_notify(_conn: object, _pid: int, heard: str, text: str) -> None:
        if heard == private:
            came_back.append(text)
            return
        generation, _, key = text.partition(" ")
        if key and generation.isdigit():
            feed.announce(key, int(generation))

    # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the inner call's
    # outcome, instead of raising, when cancelled just as that call ends
    async with asyncio.timeout(SYNC_TIMEOUT):
        conn = await db.connect(application_name(channel))
    try:
        async with asyncio.timeout(SYNC_TIMEOUT):
            await conn.add_listener(channel, on_notify)
            await conn.add_listener(private, on_notify)
            # notifications reach this session: its own comes back (a session hears it
            # when its transaction commits, before the statement's result)
            await conn.execute("SELECT pg_notify($1, 'check')", private)
            if not came_back:
                raise ConnectionError("notifications do not reach the listening session")
        asked = asyncio.Event()
        rounds = Rounds(conn, feed, asked.set)
        feed.begin(asked.set, rounds.sync)
        while True:
            asked.clear()
            if not await rounds.sync():
                raise ConnectionError(f"the listening session was cut: {rounds.failed}")
            if not asked.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(feed.interval):
                        await asked.wait()
    finally:
        try:
            await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT)
        except asyncio.CancelledError:
            conn.terminate()
            raise
        except Exception:  # a session that cannot be closed politely is cut
            conn.terminate()
