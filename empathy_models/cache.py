"""
The response cache: answers kept under a hash of the normalized request, opt-in per
call with ``ExecutionContext(cache_ttl=...)``.

::

    async with EmpathyLLMExecutor(providers, cache="sqlite:///cache.db") as executor:
        ctx = ExecutionContext(workflow="faq", temperature=0, cache_ttl=3600)
        first = await executor.run("What is GCRA?", ctx)    # calls a model, stores it
        again = await executor.run("What is GCRA?", ctx)    # again.cached is True

What is matched: the pinned model or the routing inputs (workflow, stage, task type,
tier, constraints), the messages and system prompt, ``max_tokens`` and
``temperature``, exactly.  Sampled output is not cached: only calls with
``temperature=0`` are, unless ``cache_sampled=True`` asks for it (a provider's default
temperature samples).  A hit is an answer stored less than the run's own ``cache_ttl``
seconds ago (by the executor's wall clock), however long the run that stored it had it
kept; one stored more than a second ahead of that clock (which stepped back since) is of
no known age, and a miss.  A hit returns the stored answer as an `LLMResponse` with
``cached=True``, ``cost_usd=0`` and no attempts; it is recorded with outcome
``cache_hit`` (cost 0, the cost saved in the record's metadata as
``cache_cost_saved_usd``) and is never reported to the router or the breaker, so it
never counts as a model's success.  `EmpathyLLMExecutor.stream` reads and fills the same
entries: a hit is replayed as a stream (the text as one delta, then each tool call as
one `ToolCallDelta`), and only a stream that ended whole is stored.  An answer cut by a
content filter or refused, or one whose text the run's ``response_format`` could not
parse (``parse_error``), is not stored: the same request asks the model again.

Privacy: keys are SHA-256 digests of the request; prompts are never stored.  Setting
``cache_ttl`` is the consent to store the *answers* in the cache backend (in a file
or server shared by every worker using it; SQLite files are created 0600).

Backends: `MemoryResponseCache` (one process; ``max_entries`` LRU, default 10,000),
`SQLiteResponseCache` (one host), and the ``redis://`` and ``postgresql://`` plugins;
`cache_from_url` builds one.  Every backend refuses values over ``max_value_bytes``
(default 1 MiB), and a TTL that is not a finite number of seconds above 0 (what
`ExecutionContext.cache_ttl` accepts): ``set`` stores nothing then, and removes the
key's earlier value.  A longer TTL than `MAX_TTL` (100 years) keeps the entry
`MAX_TTL`, in every backend.  ``clear`` returns how many unexpired entries it removed.
A cache that fails never fails a call, and one that stalls never holds it up: the
executor waits for a read at most a second (and half the time left of the run's
deadline), writes answers behind, and skips a store that failed or stalled for a few
seconds (one warning per outage on ``empathy_models.cache``; ``cache_errors`` and
``cache_skipped`` count); the call goes to a model.

Coalescing: copies of a request that miss while a run of the same executor asks a
model for it wait for that run's answer.  Every backend here also keeps a lease per
key (``leases``: `ResponseCache.acquire_lease`, `ResponseCache.release_lease`, taken
atomically by one holder, kept apart from the entries), through which the executors of
several processes sharing a SQLite, Redis or PostgreSQL cache do the same: the first
to miss takes the lease (one write, with a read of the entry,
`ResponseCache.acquire_lease_and_get`, so a run granted the lease just after another
process stored the answer and let go is answered with it;
``ExecutionContext(cache_coalesce=False)`` skips it) and the others take it again,
reading the entry, until it is stored, the lease is let go with no answer, or it
expires (see `empathy_models._cached.lead_or_wait`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final

import aiosqlite

from ._validators import MAX_SIZE, check, failure, integer, shown
from .abc import MAX_LEASE_TTL, Message, ResponseCache, lease_ttl
from .exceptions import ConfigurationError, StateStoreError

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_LEASE_TTL",
    "MAX_TTL",
    "MemoryResponseCache",
    "SQLiteResponseCache",
    "cache_from_url",
    "lease_ttl",
    "request_key",
]

DEFAULT_MAX_VALUE_BYTES: Final = 1 << 20
"""The largest answer a cache stores (1 MiB of serialized JSON)."""

MAX_TTL: Final = 100 * 365.25 * 86_400.0
"""The longest a cache keeps an entry (100 years, in seconds): every backend keeps one
set with a longer TTL this long, so a huge one ("keep it for good") is stored alike
everywhere, not refused by a store whose time type it overflows."""


_bound = integer(
    failure(ConfigurationError),
    low=1,
    high=MAX_SIZE,  # what SQLite (and PostgreSQL, a bigint) binds
    why="must be an integer >= 1",
    high_why="must be < 2**63",
)


def _check_bound(name: str, value: int) -> int:
    return check(_bound, name, value)


def request_key(parts: Sequence[object], messages: Sequence[Message], system: str | None) -> str:
    """
    The cache key of a request.

    Args:
        parts: strings, numbers and None that identify the request besides its prompt.
        messages: its messages.
        system: its system prompt.

    Returns:
        A SHA-256 hex digest of an unambiguous encoding of ``parts``, the system prompt
        and the messages (every string length-prefixed, so no two requests encode
        alike).
    """
    out = [repr(p) if not isinstance(p, str) else f"s{len(p)}:{p}" for p in parts]
    out.append("n" if system is None else f"s{len(system)}:{system}")
    out.extend(f"{m.role[0]}{len(m.content)}:{m.content}" for m in messages)
    return hashlib.sha256("\x1f".join(out).encode("utf-8", "surrogatepass")).hexdigest()


class MemoryResponseCache(ResponseCache):
    """
    Answers in an in-process LRU.

    Args:
        max_entries: the most entries kept (oldest used evicted first).
        max_value_bytes: a larger value is not stored.
        clock: monotonic seconds; times the TTLs.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = _check_bound("max_entries", max_entries)
        self.max_value_bytes = _check_bound("max_value_bytes", max_value_bytes)
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._leases: dict[str, tuple[str, float]] = {}  # key: (holder, expires at)

    def __repr__(self) -> str:
        return f"MemoryResponseCache(entries={len(self._data)}, max_entries={self.max_entries})"

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._check_open()
        if len(value) > self.max_value_bytes or not ttl > 0 or not math.isfinite(ttl):
            self._data.pop(key, None)  # refused: no earlier value is left to be served
            return
        self._data[key] = (self._clock() + min(ttl, MAX_TTL), value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def delete(self, key: str) -> bool:
        self._check_open()
        return self._data.pop(key, None) is not None

    async def clear(self) -> int:
        self._check_open()
        now = self._clock()
        count = sum(1 for expires_at, _ in self._data.values() if expires_at > now)
        self._data.clear()
        return count

    leases = True

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> tuple[str, float] | None:
        self._check_open()
        ttl = lease_ttl(ttl)
        now = self._clock()
        held = self._leases.get(key)
        if held is not None and held[0] != holder and held[1] > now:
            return held[0], held[1] - now
        if held is None and len(self._leases) >= self.max_entries:  # crashed holders' leases
            self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
        self._leases[key] = (holder, now + ttl)
        return None

    async def release_lease(self, key: str, holder: str) -> bool:
        self._check_open()
        held = self._leases.get(key)
        if held is None or held[0] != holder:
            return False
        del self._leases[key]
        return held[1] > self._clock()  # an expired lease is no one's


_CREATE: Final = (
    "CREATE TABLE IF NOT EXISTS response_cache ("
    " key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID"
)

# How many entries the table holds, kept by triggers (a count(*) reads the whole table):
# what bounds it on every write.  Counted once, when the triggers are made, so a file
# whose table came without them (an earlier version's) is counted when they are added.
_SIZE: Final = (
    "CREATE TABLE IF NOT EXISTS response_cache_size ("
    " id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ix_response_cache_expiry ON response_cache (expires_at)",
    "CREATE TRIGGER response_cache_added AFTER INSERT ON response_cache"
    " BEGIN UPDATE response_cache_size SET n = n + 1 WHERE id = 0; END",
    "CREATE TRIGGER response_cache_removed AFTER DELETE ON response_cache"
    " BEGIN UPDATE response_cache_size SET n = n - 1 WHERE id = 0; END",
    "INSERT OR REPLACE INTO response_cache_size (id, n) SELECT 0, count(*) FROM response_cache",
)

# the leases (`ResponseCache.acquire_lease`), apart from the entries: by wall-clock expiry
_LEASES: Final = (
    "CREATE TABLE IF NOT EXISTS response_cache_lease ("
    " key TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID"
)

_HAS_SIZE: Final = (
    "SELECT count(*) FROM sqlite_master WHERE name IN ('response_cache_size', "
    "'ix_response_cache_expiry', 'response_cache_added', 'response_cache_removed')"
)

_UPSERT: Final = (
    "INSERT INTO response_cache (key, value, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)

# an entry not expired by the time bound; a value another program wrote as TEXT or a
# number read as bytes too (its UTF-8, its digits), for the caller to judge, never as a
# Python str or int
_GET: Final = "SELECT CAST(value AS BLOB) FROM response_cache WHERE key = ? AND expires_at > ?"

# past ``max_entries``, the entries closest to expiry go (the expired first): a walk of
# the expiry index as long as the excess, nothing when there is none
_TRIM: Final = (
    "DELETE FROM response_cache WHERE key IN (SELECT key FROM response_cache "
    "ORDER BY expires_at LIMIT max(0, (SELECT n FROM response_cache_size) - ?))"
)


def _sql_key(key: str) -> str | bytes:
    """
    ``key`` as the SQLite cache binds it: the text itself, or, for a string UTF-8
    cannot encode (a lone surrogate, which no `request_key` digest holds but a caller's
    own key may), its ``surrogatepass`` bytes, stored as a BLOB.  The encoding is one to
    one and SQLite never finds a BLOB equal to a TEXT, so no two keys meet.
    """
    if key.isascii():  # every request_key digest
        return key
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogatepass")
    return key


class SQLiteResponseCache(ResponseCache):
    """
    Answers in a SQLite file shared by every process on a host.

    A ``response_cache`` table, which may share the file with telemetry and state.  A
    `get` is one read; a take of a lease (with the entry, `acquire_lease_and_get`) one
    write transaction; a `set` one write transaction that also drops, past
    ``max_entries``, the entries closest to expiry (the expired first), so the table
    never holds more, whatever the processes writing it; one write in a hundred also
    drops every expired entry.  Any string is a key, as in `MemoryResponseCache` (one
    UTF-8 cannot encode, holding a lone surrogate, is kept as its bytes).

    Args:
        path: the file.
        max_entries: the most entries kept (default 100,000).
        max_value_bytes: a larger value is not stored.
        busy_timeout, lock_timeout, allow_foreign: as for `SQLiteStateStore`.

    Raises:
        StateStoreError: naming the path, for any error of the file.
    """

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_entries: int = 100_000,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        busy_timeout: float = 5.0,
        lock_timeout: float = 30.0,
        allow_foreign: bool = False,
    ) -> None:
        from .backends.sqlite._database import MEMORY, _Database

        self.max_entries = _check_bound("max_entries", max_entries)
        self.max_value_bytes = _check_bound("max_value_bytes", max_value_bytes)
        self._db = _Database(
            path,
            error=StateStoreError,
            busy_timeout=busy_timeout,
            lock_timeout=lock_timeout,
            allow_foreign=allow_foreign,
        )
        self._path = self._db.path
        if self._path == MEMORY:
            self.shared = False  # type: ignore[misc]
        self._ready = False
        self._writes = 0

    def __repr__(self) -> str:
        return f"SQLiteResponseCache({self._path!r})"

    async def _prepare(self, conn: aiosqlite.Connection) -> None:
        if not self._ready:
            from .backends.sqlite._conn import _fetchone

            async def create(c: aiosqlite.Connection) -> None:
                await c.execute(_CREATE)
                await c.execute(_LEASES)
                row = await _fetchone(c, _HAS_SIZE)
                if row is None or row[0] != 4:  # made whole, and the entries counted
                    await c.execute("DROP TRIGGER IF EXISTS response_cache_added")
                    await c.execute("DROP TRIGGER IF EXISTS response_cache_removed")
                    for statement in _SIZE:
                        await c.execute(statement)

            await self._db.transaction(conn, create)
            self._ready = True

    async def _aopen(self) -> None:
        await self._db.run(self._prepare)

    async def _aclose(self) -> None:
        await self._db.close()

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        from .backends.sqlite._conn import _fetchone

        async def job(conn: aiosqlite.Connection) -> sqlite3.Row | None:
            if not self._ready:
                await self._prepare(conn)
            return await self._db.retrying(
                partial(_fetchone, conn, _GET, (_sql_key(key), time.time()))
            )

        row = await self._db.run(job)
        return None if row is None else bytes(row[0])

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._check_open()
        if len(value) > self.max_value_bytes or not ttl > 0 or not math.isfinite(ttl):
            await self.delete(key)  # refused: no earlier value is left to be served
            return
        await self._set(key, value, ttl, None)

    async def _set(self, key: str, value: bytes, ttl: float, holder: str | None) -> None:
        """One write transaction: the entry, the trim, and ``holder``'s lease let go."""
        self._writes += 1
        sweep = self._writes % 100 == 1

        async def body(conn: aiosqlite.Connection) -> None:
            now = time.time()
            await conn.execute(_UPSERT, (_sql_key(key), value, now + min(ttl, MAX_TTL)))
            await conn.execute(_TRIM, (self.max_entries,))
            if sweep:  # one write in a hundred also drops what expired
                await conn.execute("DELETE FROM response_cache WHERE expires_at <= ?", (now,))
            if holder is not None:
                await conn.execute(
                    "DELETE FROM response_cache_lease WHERE key = ? AND holder = ?",
                    (_sql_key(key), holder),
                )

        async def job(conn: aiosqlite.Connection) -> None:
            await self._prepare(conn)
            await self._db.transaction(conn, body)

        await self._db.run(job)

    async def delete(self, key: str) -> bool:
        self._check_open()

        async def body(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "DELETE FROM response_cache WHERE key = ?", (_sql_key(key),)
            )
            return cursor.rowcount

        async def job(conn: aiosqlite.Connection) -> int:
            await self._prepare(conn)
            return await self._db.transaction(conn, body)

        return bool(await self._db.run(job))

    async def clear(self) -> int:
        self._check_open()

        async def body(conn: aiosqlite.Connection) -> int:
            # the expired entries go uncounted, as every backend counts
            await conn.execute("DELETE FROM response_cache WHERE expires_at <= ?", (time.time(),))
            cursor = await conn.execute("DELETE FROM response_cache")
            return cursor.rowcount

        async def job(conn: aiosqlite.Connection) -> int:
            await self._prepare(conn)
            return await self._db.transaction(conn, body)

        return int(await self._db.run(job))

    leases = True

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> tuple[str, float] | None:
        """One write transaction: the lease read, and taken when free (by wall-clock time)."""
        held, _ = await self._take(key, holder, ttl, read=False)
        return held

    async def acquire_lease_and_get(
        self, key: str, holder: str, ttl: float
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        """`acquire_lease` and `get` in one write transaction."""
        return await self._take(key, holder, ttl, read=True)

    async def _take(
        self, key: str, holder: str, ttl: float, *, read: bool
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        self._check_open()
        ttl = lease_ttl(ttl)
        self._writes += 1
        sweep = self._writes % 100 == 1

        async def job(conn: aiosqlite.Connection) -> tuple[tuple[str, float] | None, bytes | None]:
            await self._prepare(conn)
            return await self._db.transaction(
                conn,
                partial(
                    _take_lease, key=_sql_key(key), holder=holder, ttl=ttl, sweep=sweep, read=read
                ),
            )

        return await self._db.run(job)

    async def set_and_release(self, key: str, value: bytes, ttl: float, holder: str) -> None:
        """`set` and `release_lease` in one write transaction (a refused value: in turn)."""
        self._check_open()
        if len(value) > self.max_value_bytes or not ttl > 0 or not math.isfinite(ttl):
            await super().set_and_release(key, value, ttl, holder)
            return
        try:
            await self._set(key, value, ttl, holder)
        except Exception:
            with contextlib.suppress(Exception):  # rolled back: let go on its own
                await self.release_lease(key, holder)
            raise

    async def release_lease(self, key: str, holder: str) -> bool:
        self._check_open()

        async def body(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "DELETE FROM response_cache_lease WHERE key = ? AND holder = ? AND expires_at > ?",
                (_sql_key(key), holder, time.time()),
            )
            if cursor.rowcount:
                return cursor.rowcount
            await conn.execute(  # its expired lease, no one's: removed, not counted
                "DELETE FROM response_cache_lease WHERE key = ? AND holder = ?",
                (_sql_key(key), holder),
            )
            return 0

        async def job(conn: aiosqlite.Connection) -> int:
            await self._prepare(conn)
            return await self._db.transaction(conn, body)

        return bool(await self._db.run(job))


async def _take_lease(
    conn: aiosqlite.Connection, key: str | bytes, holder: str, ttl: float, sweep: bool, read: bool
) -> tuple[tuple[str, float] | None, bytes | None]:
    """
    `SQLiteResponseCache.acquire_lease`'s transaction: read the lease, take it if free;
    with ``read``, the entry read too (`SQLiteResponseCache.acquire_lease_and_get`).
    """
    from .backends.sqlite._conn import _fetchone

    now = time.time()
    if sweep:  # one take in a hundred drops the leases crashed holders left
        await conn.execute("DELETE FROM response_cache_lease WHERE expires_at <= ?", (now,))
    value = None
    if read:
        entry = await _fetchone(conn, _GET, (key, now))
        value = None if entry is None else bytes(entry[0])
    row = await _fetchone(
        conn, "SELECT holder, expires_at FROM response_cache_lease WHERE key = ?", (key,)
    )
    if row is not None and row[0] != holder and row[1] > now:
        return (str(row[0]), float(row[1]) - now), value
    await conn.execute(
        "INSERT OR REPLACE INTO response_cache_lease (key, holder, expires_at) VALUES (?, ?, ?)",
        (key, holder, now + ttl),
    )
    return None, value


def cache_from_url(url: str | ResponseCache, **options: Any) -> ResponseCache:
    """
    A response cache for ``url``.

    Args:
        url: ``memory://``, ``sqlite:///file.db``, or a plugin's (``redis://``,
            ``postgresql://``); a `ResponseCache` passes through unchanged.
        **options: passed to the cache's constructor.

    Raises:
        ConfigurationError: an unknown scheme or an engine without a cache.
    """
    if isinstance(url, ResponseCache):
        return url
    from .backends import _build, _plugin_for, redact_url

    scheme = url.split("://", 1)[0].lower() if isinstance(url, str) else ""
    if scheme == "memory":
        _plugin_for(url)
        memory: ResponseCache = _build(_memory, url, "response cache", options)
        return memory
    if scheme == "sqlite":
        from .backends.sqlite._url import _COMMON_OPTIONS, parse_sqlite_url

        _plugin_for(url)  # the same checks as every sqlite:// URL (an option given twice)
        allowed = {k: v for k, v in _COMMON_OPTIONS.items() if k != "read_only"}
        path, query = parse_sqlite_url(url, allowed)
        built: ResponseCache = _build(
            partial(_sqlite, path), url, "response cache", {**query, **options}
        )
        return built
    plugin = _plugin_for(url)
    if plugin.cache is None:
        raise ConfigurationError(
            f"{redact_url(url)!r}: the {plugin.package} backend keeps no response cache; "
            "use memory://, sqlite://, redis:// or postgresql://"
        )
    cache = _build(plugin.cache, url, "response cache", options)
    if not isinstance(cache, ResponseCache):
        raise ConfigurationError(f"the plugin for {redact_url(url)!r} returned {shown(cache)}")
    return cache


def _memory(_url: str, **options: Any) -> MemoryResponseCache:
    return MemoryResponseCache(**options)


def _sqlite(path: str, _url: str, **options: Any) -> SQLiteResponseCache:
    return SQLiteResponseCache(path, **options)
