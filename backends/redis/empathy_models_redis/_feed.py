"""
The Redis store's change feed: the breaker script's announcements, read by pub/sub.

The script PUBLISHes ``"<generation> <key>"`` on the store's channel (its prefix and
database, ``<prefix>@db<n>``: Redis's channels are the server's, not a database's)
whenever a key gets a new generation.  `watch` subscribes to it on a connection
of its own (made and authenticated like the pool's, not taken from it, so a dead
subscription never holds a pool slot), reads what arrives in one task and proves it is
in sync with PINGs: every ``feed.interval`` seconds and whenever a breaker asks
(`ChangeFeed.sync`, the exact mode).  Redis answers a PING on a subscribed connection
after every message it published to that connection before, so a PING's send time is
a sync point once its answer is read.

The subscription's replies are read from the connection's streams directly (a PING is
written by whoever asks, without waiting, and answered in order); redis-py connects,
authenticates and selects the database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import redis.asyncio as aioredis

from empathy_models.abc import ChangeFeed

from ._resp import command

SYNC_TIMEOUT = 2.0
"""Seconds a subscription may take to answer a PING before it counts as lost."""

_PING = command(b"PING")


def client_name(channel: str) -> str:
    """The subscription's ``CLIENT SETNAME`` (what ``CLIENT LIST`` shows operators): the
    channel with each character Redis refuses in a name (all but ASCII ``!`` to ``~``:
    a space, a control character, any letter outside ASCII) shown as ``_``."""
    shown = "".join(c if "!" <= c <= "~" else "_" for c in channel)
    return "empathy-models-feed:" + shown


class _Refused(ConnectionError):
    """Redis answered a command of the subscription with an error."""


async def _reply(reader: asyncio.StreamReader) -> Any:
    """One RESP2 / RESP3 reply: bytes, an int, None or a list (a push is a list)."""
    line = await reader.readuntil(b"\r\n")
    kind, body = line[:1], line[1:-2]
    if kind in (b"+", b"(", b","):
        return body
    if kind in (b"-", b"!"):
        raise _Refused(f"Redis refused the subscription: {body.decode(errors='replace')}")
    if kind == b":":
        return int(body)
    if kind in (b"$", b"="):
        size = int(body)
        return None if size < 0 else (await reader.readexactly(size + 2))[:-2]
    if kind in (b"*", b">", b"~"):
        size = int(body)
        return None if size < 0 else [await _reply(reader) for _ in range(size)]
    if kind == b"%":
        return [await _reply(reader) for _ in range(2 * int(body))]
    if kind == b"_":
        return None
    raise ConnectionError(f"unexpected reply from Redis: {line[:40]!r}")


def _kind(reply: Any) -> bytes:
    """``pong``, ``message``, ``subscribe`` ... (lower case), or ``b""``."""
    if isinstance(reply, bytes):
        return reply.lower()  # "+PONG"
    if isinstance(reply, list) and reply and isinstance(reply[0], bytes):
        return reply[0].lower()
    return b""


async def _read(
    reader: asyncio.StreamReader,
    feed: ChangeFeed,
    sent: collections.deque[float],
    encoding: tuple[str, str],
) -> None:
    """Hand every announcement to ``feed``; each PING's answer syncs it."""
    while True:
        reply = await _reply(reader)
        kind = _kind(reply)
        if kind == b"pong":
            feed.synced(sent.popleft())
        elif kind == b"message" and len(reply) == 3:
            try:  # a message no store sent (another program's, another encoding's) is
                # passed over: it names no key this store's breakers hold
                text = bytes(reply[2]).decode(encoding[0])
            except UnicodeDecodeError:
                continue
            generation, _, key = text.partition(" ")
            if key and generation.isascii() and generation.isdigit():
                feed.announce(key, int(generation))


async def watch(client: aioredis.Redis, channel: str, feed: ChangeFeed) -> None:
    """
    One subscription to ``channel`` feeding ``feed``, until it fails (it raises then:
    a connection error, or no answer to a PING within `SYNC_TIMEOUT` seconds).
    """
    pool = client.connection_pool
    conn = pool.make_connection()  # type: ignore[no-untyped-call]
    # the store's encoding: the script publishes the prefix and keys as it sent them
    encoding = (
        pool.connection_kwargs.get("encoding", "utf-8"),
        pool.connection_kwargs.get("encoding_errors", "strict"),
    )
    clock = time.monotonic
    task = asyncio.current_task()
    cancelling = 0 if task is None else task.cancelling()
    try:
        await conn.connect()
        if task is not None and task.cancelling() > cancelling:
            # redis-py's connect swallows a cancellation now and then: raise it here
            raise asyncio.CancelledError("the change feed was stopped while it connected")
        reader, writer = conn._reader, conn._writer
        if not isinstance(reader, asyncio.StreamReader) or not isinstance(
            writer, asyncio.StreamWriter
        ):
            raise ConnectionError(f"a {type(conn).__name__} has no asyncio streams to subscribe on")
        async with asyncio.timeout(SYNC_TIMEOUT):
            name = client_name(channel).encode("ascii")
            writer.write(command(b"CLIENT", b"SETNAME", name))
            writer.write(command(b"SUBSCRIBE", channel.encode(*encoding)))
            with contextlib.suppress(_Refused):
                # the name only shows operators what the connection is: a user whose
                # ACL refuses CLIENT (@dangerous on Redis 6) subscribes all the same
                await _reply(reader)
            if _kind(await _reply(reader)) != b"subscribe":
                raise ConnectionError("SUBSCRIBE was refused")
        sent: collections.deque[float] = collections.deque()

        def ping() -> None:
            if not writer.transport.is_closing():
                sent.append(clock())
                writer.write(_PING)

        feed.begin(ping)
        reading = asyncio.get_running_loop().create_task(_read(reader, feed, sent, encoding))
        try:
            while not reading.done():
                ping()
                await asyncio.wait({reading}, timeout=feed.interval)
                if sent and clock() - sent[0] > SYNC_TIMEOUT:
                    raise TimeoutError(f"no answer to PING within {SYNC_TIMEOUT:g} s")
            reading.result()  # its failure
        finally:
            reading.cancel()
            await asyncio.wait({reading})
    finally:
        await conn.disconnect(nowait=True)
