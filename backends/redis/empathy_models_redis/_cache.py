"""The response cache in Redis: one string per answer, expiring with its TTL."""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any, Final

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import RedisError, ResponseError

from empathy_models.abc import ResponseCache
from empathy_models.backends import shown
from empathy_models.cache import DEFAULT_MAX_VALUE_BYTES, MAX_TTL, lease_ttl
from empathy_models.exceptions import ConfigurationError, StateStoreError

from ._store import (
    _GLOB_SPECIAL,
    URL_PREFIX_KINDS,
    RedisCircuitStateStore,
    _DefaultText,
    close_owned,
    evalsha_once,
)

__all__ = ["DEFAULT_CACHE_PREFIX", "RedisResponseCache"]

DEFAULT_CACHE_PREFIX: Final = "empathy:cache:"
"""Prefix of every Redis key the response cache writes."""

_CLEAR_BATCH: Final = 500
"""The most keys `RedisResponseCache.clear` asks one SCAN page or one DEL for."""

_LEASE_MARK: Final = b"\xff"
"""The byte after the prefix of every lease key: no key's UTF-8 holds it, so no lease
key is an entry's (`clear` leaves them to expire)."""

# take the lease KEYS[1] for ARGV[1] for ARGV[2] ms when free (or renew the holder's):
# nil; else the holder's name and the milliseconds it has left
_TAKE: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return nil end
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return nil
end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then  -- no time to live (another program's key): taken over
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return nil
end
return {held, left}
"""
_TAKE_SHA: Final = hashlib.sha1(_TAKE.encode("ascii")).hexdigest()

# `_TAKE` (the lease KEYS[1]), and the entry KEYS[2] read with it (another program's key
# of another type as none): {1, value} when taken, else {0, value, holder, ms left}
_TAKE_AND_GET: Final = (
    "local function take()\n"
    + _TAKE
    + """end
local held = take()
local value = redis.pcall('GET', KEYS[2])
if type(value) ~= 'string' then value = false end
if held then return {0, value, held[1], held[2]} end
return {1, value}
"""
)
_TAKE_AND_GET_SHA: Final = hashlib.sha1(_TAKE_AND_GET.encode("ascii")).hexdigest()

_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RELEASE_SHA: Final = hashlib.sha1(_RELEASE.encode("ascii")).hexdigest()

# SET KEYS[1] ARGV[1] PX ARGV[2], then the lease KEYS[2] let go if ARGV[3]'s
_SET_RELEASING: Final = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""
_SET_RELEASING_SHA: Final = hashlib.sha1(_SET_RELEASING.encode("ascii")).hexdigest()

_RAW: Final = {NEVER_DECODE: True}
"""redis-py's option to leave a reply as bytes, whatever the client decodes."""


class RedisResponseCache(ResponseCache):
    """
    Answers shared by every process using the same Redis, with Redis's own expiry.

    One string per key under ``prefix`` (``SET ... PX``).  Redis bounds the memory
    (``maxmemory`` with an eviction policy), on a server of its own: the policy applies
    to every key of the server, budgets and breaker state in any database included.
    Any string is a key, as in `MemoryResponseCache`: the Redis key is the prefix then
    the key's UTF-8 bytes, or, for a key UTF-8 cannot encode (a lone surrogate, which
    no `request_key` digest holds but a caller's own key may), its ``surrogatepass``
    bytes, which no other key has.  Values and keys are read as bytes, also from a
    client that decodes responses.

    Args:
        connection, **client_options: as for `RedisCircuitStateStore`.
        prefix: of the cache keys; a URL's ``prefix`` is the root, under which the
            cache keys go in ``prefix + "cache:"`` (see `RedisCircuitStateStore`).
        max_value_bytes: larger values are not stored.

    Raises:
        StateStoreError: for Redis errors.
    """

    shared = True

    def __init__(
        self,
        connection: str | aioredis.Redis,
        *,
        prefix: str = _DefaultText(DEFAULT_CACHE_PREFIX),
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        **client_options: Any,
    ) -> None:
        if isinstance(max_value_bytes, bool) or not isinstance(max_value_bytes, int):
            raise ConfigurationError(
                f"max_value_bytes must be an integer, got {shown(max_value_bytes)}"
            )
        if not 1 <= max_value_bytes < 2**63:
            raise ConfigurationError(
                f"max_value_bytes must be >= 1 and < 2**63, got {shown(max_value_bytes)}"
            )
        plumbing = RedisCircuitStateStore(
            connection, prefix=prefix, _kind=URL_PREFIX_KINDS["cache"], **client_options
        )
        self._client = plumbing._client
        self._owns_client = plumbing._owns_client
        self._target = plumbing._target
        self.prefix = plumbing.prefix
        self.max_value_bytes = max_value_bytes
        # the prefix as the client writes it (its encoding), then the key's own bytes
        self._prefix_bytes = plumbing._prefix_bytes

    def __repr__(self) -> str:
        return f"RedisResponseCache({self._target!r}, prefix={self.prefix!r})"

    def _error(self, what: str, exc: BaseException) -> StateStoreError:
        return StateStoreError(
            f"Redis response cache {self._target}: {what} failed: {type(exc).__name__}: {exc}",
            target=self._target,
        )

    async def _aclose(self) -> None:
        if self._owns_client:
            try:
                await close_owned(self._client)
            except (RedisError, OSError) as exc:
                raise self._error("close", exc) from exc

    def _key(self, key: str) -> bytes:
        """The Redis key of ``key``: one to one (UTF-8 with lone surrogates kept)."""
        return self._prefix_bytes + key.encode("utf-8", "surrogatepass")

    def _lease_key(self, key: str) -> bytes:
        """The Redis key of ``key``'s lease (see `_LEASE_MARK`)."""
        return self._prefix_bytes + _LEASE_MARK + key.encode("utf-8", "surrogatepass")

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        client: Any = self._client  # redis-py leaves execute_command untyped
        try:
            # never decoded, even by a client with decode_responses: values are bytes
            value = await client.execute_command("GET", self._key(key), **_RAW)
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                # another program's key of another type (a hash, a list) where an answer
                # would be: a miss, which `set` overwrites; not a failure of the store
                return None
            raise self._error("get", exc) from exc
        except (RedisError, OSError) as exc:
            raise self._error("get", exc) from exc
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._check_open()
        if len(value) > self.max_value_bytes or not ttl > 0 or not math.isfinite(ttl):
            await self.delete(key)  # refused: no earlier value is left to be served
            return
        try:
            px = max(1, round(min(ttl, MAX_TTL) * 1000))
            await self._client.set(self._key(key), value, px=px)
        except (RedisError, OSError) as exc:
            raise self._error("set", exc) from exc

    async def delete(self, key: str) -> bool:
        self._check_open()
        try:
            return bool(await self._client.delete(self._key(key)))
        except (RedisError, OSError) as exc:
            raise self._error("delete", exc) from exc

    leases = True

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> tuple[str, float] | None:
        """One Lua script: ``SET NX PX`` the lease key, else its holder and time left."""
        self._check_open()
        px = max(1, round(lease_ttl(ttl) * 1000))
        lease = self._lease_key(key)
        try:
            reply = await evalsha_once(
                self._client, _TAKE_SHA, _TAKE, [1, lease, holder, px], raw=True
            )
        except (RedisError, OSError) as exc:
            raise self._error("acquire_lease", exc) from exc
        if reply is None:
            return None
        held, left = reply
        return bytes(held).decode("utf-8", "replace"), max(int(left), 0) / 1000.0

    async def acquire_lease_and_get(
        self, key: str, holder: str, ttl: float
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        """`acquire_lease` and `get` in one Lua script."""
        self._check_open()
        px = max(1, round(lease_ttl(ttl) * 1000))
        args = [2, self._lease_key(key), self._key(key), holder, px]
        try:
            reply = await evalsha_once(
                self._client, _TAKE_AND_GET_SHA, _TAKE_AND_GET, args, raw=True
            )
        except (RedisError, OSError) as exc:
            raise self._error("acquire_lease", exc) from exc
        value = None if reply[1] is None else bytes(reply[1])
        if int(reply[0]):
            return None, value
        held, left = reply[2], reply[3]
        return (bytes(held).decode("utf-8", "replace"), max(int(left), 0) / 1000.0), value

    async def set_and_release(self, key: str, value: bytes, ttl: float, holder: str) -> None:
        """`set` and `release_lease` in one Lua script (a refused value: in turn)."""
        self._check_open()
        if len(value) > self.max_value_bytes or not ttl > 0 or not math.isfinite(ttl):
            await super().set_and_release(key, value, ttl, holder)
            return
        px = max(1, round(min(ttl, MAX_TTL) * 1000))
        lease = self._lease_key(key)
        args = [2, self._key(key), lease, value, px, holder]
        try:
            await evalsha_once(self._client, _SET_RELEASING_SHA, _SET_RELEASING, args)
        except (RedisError, OSError) as exc:
            with contextlib.suppress(StateStoreError):  # not run: let go on its own
                await self.release_lease(key, holder)
            raise self._error("set", exc) from exc

    async def release_lease(self, key: str, holder: str) -> bool:
        self._check_open()
        lease = self._lease_key(key)
        try:
            reply = await evalsha_once(self._client, _RELEASE_SHA, _RELEASE, [1, lease, holder])
        except (RedisError, OSError) as exc:
            raise self._error("release_lease", exc) from exc
        return bool(reply)

    async def clear(self) -> int:
        self._check_open()
        pattern = "".join("\\" + c if c in _GLOB_SPECIAL else c for c in self.prefix) + "*"
        deleted = 0
        try:
            # the keys as bytes (some are no UTF-8 a decoding client could read), deleted
            # as they are found, at most _CLEAR_BATCH per DEL, so no one command holds
            # Redis up for the whole cache (DEL rather than UNLINK, which needs Redis 4
            # and frees a string, what the cache holds, at once all the same).  A key
            # another client deleted meanwhile, or SCAN found twice, is not counted: DEL
            # counts only what it removed.
            client: Any = self._client
            batch: list[bytes] = []
            leases = self._prefix_bytes + _LEASE_MARK
            async for key in client.scan_iter(match=pattern, count=_CLEAR_BATCH, **_RAW):
                if key.startswith(leases):
                    continue  # a lease, no entry: left to expire
                batch.append(key)
                if len(batch) == _CLEAR_BATCH:
                    deleted += await self._client.delete(*batch)
                    batch.clear()
            if batch:
                deleted += await self._client.delete(*batch)
        except (RedisError, OSError) as exc:
            raise self._error("clear", exc) from exc
        return deleted
