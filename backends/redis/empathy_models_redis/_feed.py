"""
The Redis store's change feed: the breaker script's announcements, read by pub/sub.

The script PUBLISHes ``"<generation> <key>"`` on the channel named by the store's
prefix whenever a key gets a new generation.  `watch` subscribes to it on a connection
of its own (made like the pool's, not taken from it, so a dead subscription never
holds a pool slot) and proves it is in sync with a PING every ``feed.interval``
seconds: Redis answers a PING on a subscribed connection after every message it
published to that connection before, so the PING's send time is a sync point.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from empathy_models.abc import ChangeFeed

SYNC_TIMEOUT = 2.0
"""Seconds a subscription may take to answer a PING before it counts as lost."""


def client_name(channel: str) -> str:
    """The subscription's ``CLIENT SETNAME`` (what ``CLIENT LIST`` shows operators)."""
    return "empathy-models-feed:" + "".join(
        c if c.isprintable() and c != " " else "_" for c in channel
    )


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _announce(feed: ChangeFeed, reply: Any) -> bool:
    """Pass a message on to ``feed``; True for the answer to a PING."""
    if not isinstance(reply, list) or not reply:
        # a PING on a subscribed connection is answered "PONG" or ["pong", ""], by version
        return _text(reply).lower() == "pong"
    kind = _text(reply[0])
    if kind == "pong":
        return True
    if kind == "message" and len(reply) == 3:
        generation, _, key = _text(reply[2]).partition(" ")
        if key and generation.isdigit():
            feed.announce(key, int(generation))
    return False


async def watch(client: aioredis.Redis, channel: str, feed: ChangeFeed) -> None:
    """
    One subscription to ``channel`` feeding ``feed``, until it fails (it raises then:
    a connection error, or no answer to a PING within `SYNC_TIMEOUT` seconds).
    """
    conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    clock = time.monotonic
    try:
        await conn.connect()
        await conn.send_command("CLIENT", "SETNAME", client_name(channel), check_health=False)
        reply = await conn.read_response(timeout=SYNC_TIMEOUT)
        if _text(reply) != "OK":
            raise ConnectionError(f"CLIENT SETNAME was answered with {reply!r:.80}")
        await conn.send_command("SUBSCRIBE", channel, check_health=False)
        reply = await conn.read_response(timeout=SYNC_TIMEOUT, push_request=True)
        if not isinstance(reply, list) or not reply or _text(reply[0]) != "subscribe":
            raise ConnectionError(f"SUBSCRIBE was answered with {reply!r:.80}")
        feed.begin()
        while True:
            sent = clock()
            # (no health check: its own PING would read the subscription's messages)
            await conn.send_command("PING", check_health=False)
            while True:
                left = sent + SYNC_TIMEOUT - clock()
                reply = (
                    None if left <= 0 else await conn.read_response(timeout=left, push_request=True)
                )
                if reply is None:
                    raise TimeoutError(f"no answer to PING within {SYNC_TIMEOUT:g} s")
                if _announce(feed, reply):
                    break
            feed.synced(sent)
            ping_at = sent + feed.interval
            while (left := ping_at - clock()) > 0:
                reply = await conn.read_response(timeout=left, push_request=True)
                if reply is None:
                    break
                _announce(feed, reply)
    finally:
        await conn.disconnect()
