"""The Redis circuit-state store: one Lua script per operation, time from Redis."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import hashlib
import inspect
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from importlib.resources import files
from typing import Any, Final
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    BlockingConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.client import NEVER_DECODE
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
)

from empathy_models.abc import ChangeFeed, CircuitStateStore, reset_command
from empathy_models.backends import redact_url, shown, url_flaw
from empathy_models.circuit import BreakerPolicy
from empathy_models.exceptions import (
    ConfigurationError,
    RecordValidationError,
    StateStoreError,
)
from empathy_models.records import (
    Admission,
    CircuitBreakerState,
    CircuitState,
    OutcomeReport,
    Ticket,
)

from ._codec import checked_codec, name_bytes, text_bytes, writable_name
from ._feed import watch
from ._late import LateAdmissions, sent, was_sent
from ._resp import bulk

__all__ = [
    "DEFAULT_KEY_TTL",
    "DEFAULT_PREFIX",
    "URL_PREFIX_KINDS",
    "RedisCircuitStateStore",
    "breaker_script",
]

URL_PREFIX_KINDS: Final = {"breaker": "cb:", "quota": "quota:", "cache": "cache:"}
"""What each store kind appends to a URL's ``prefix`` (the root of all their keys)."""
_KIND_CLASSES: Final = {
    "cb:": "RedisCircuitStateStore",
    "quota:": "RedisQuotaStore",
    "cache:": "RedisResponseCache",
}
"""The store class of each kind, which messages name."""

DEFAULT_PREFIX: Final = "empathy:cb:"
"""Prefix of every Redis key the store writes (one hash per breaker key)."""

DEFAULT_KEY_TTL: Final = 7 * 24 * 3600.0
"""Seconds an untouched breaker key lives (plus any open period still to run)."""


class _DefaultText(str):
    """A keyword's default text, told apart from the same text given (`_given`)."""

    __slots__ = ()


class _DefaultSeconds(float):
    """A keyword's default number, told apart from the same number given (`_given`)."""

    __slots__ = ()


def _given(value: object) -> bool:
    """Whether a keyword was passed rather than left at its default."""
    return type(value) not in (_DefaultText, _DefaultSeconds)


_FORCE_TARGETS: Final = frozenset(
    {CircuitState.FORCED_OPEN, CircuitState.DISABLED, CircuitState.CLOSED}
)
_GLOB_SPECIAL: Final = frozenset("*?[]\\")
_URL_OPTIONS: Final = frozenset({"prefix", "key_ttl"})


def breaker_script() -> str:
    """The Lua source of the breaker (a port of `empathy_models.circuit`)."""
    return files(__package__).joinpath("breaker.lua").read_text(encoding="utf-8")


def _num(value: float | int) -> str:
    """A number as text that Lua's ``tonumber`` reads back to the same double."""
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def _opt_text(value: str | None) -> str:
    return "" if value is None else "=" + value


@functools.lru_cache(maxsize=64)
def _policy_arg(policy: BreakerPolicy) -> bytes:
    """The policy as the script's one policy argument: its 13 values joined by ","."""
    values = (
        _num(policy.consecutive_failures),
        _num(policy.failure_rate_threshold),
        _num(policy.minimum_calls),
        _num(policy.window_seconds),
        _num(policy.window_buckets),
        _num(policy.recovery_seconds),
        _num(policy.max_recovery_seconds),
        policy.backoff,
        _num(policy.healthy_decay_seconds),
        _num(policy.half_open_probes),
        _num(policy.probe_lease_seconds),
        _num(policy.fatal_open_seconds),
        _num(policy.min_retry_after_open),
    )
    if any("," in value or not value for value in values):
        raise ConfigurationError(f"policy values cannot be sent to Redis: {values!r}")
    return ",".join(values).encode("ascii")


_DEFAULT_POLICY_ARG: Final = _policy_arg(BreakerPolicy())
"""The policy argument for operations whose result does not depend on the policy."""

_OPS: Final = {
    op: bulk(op.encode("ascii")) for op in ("admit", "record", "force", "reset", "release")
}
_KEY_CACHE_SIZE: Final = 4096
"""Keys whose last read state (and encoded name) a store keeps, the oldest dropped first."""
_HEADER_SIZE: Final = 7


def _text(value: object, encoding: str = "utf-8", errors: str = "strict") -> str:
    """A reply as text: bytes decoded as the client encodes (a decoding client's is str)."""
    if isinstance(value, bytes):
        return value.decode(encoding, errors)
    return str(value)


def _unreadable(store: RedisCircuitStateStore, key: str, why: object) -> StateStoreError:
    """
    That ``key``'s stored state cannot be read: its fault alone (a reset repairs it, by
    the command the error gives: with the store's URL when the CLI's ``--db`` reaches the
    same keys, the default prefix's).
    """
    target = store._target
    url = target if store.prefix == DEFAULT_PREFIX else ""
    return StateStoreError(
        f"Redis state store {target}: unreadable state for {key!r}: {why}; repair it with "
        f"`{reset_command(key, url)}`",
        target=target,
        key=key,
    )


def _store_error(
    store: RedisCircuitStateStore, what: str, exc: BaseException, key: str | None
) -> StateStoreError:
    """``what`` failed with ``exc``; the script's refusal of ``key``'s unreadable state
    (``UNREADABLE <why>``) names the key."""
    text = str(exc)
    target = store._target
    if key is not None and isinstance(exc, ResponseError) and text.startswith("UNREADABLE "):
        return _unreadable(store, key, text.removeprefix("UNREADABLE "))
    return StateStoreError(
        f"Redis state store {target}: {what} failed: {type(exc).__name__}: {exc}", target=target
    )


def _opt_float(value: str | None) -> float | None:
    return None if value is None or value == "" else float(value)


def _count(text: str) -> int:
    return int(float(text))


def _opt_text_field(text: str) -> str | None:
    return None if text == "" else text[1:]


def _window(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(float(x)) for x in part.split(":")) for part in text.split(";") if part]


def _leases(text: str) -> list[tuple[str, float]]:
    leases = []
    for part in text.split(";"):
        if part:
            lease_id, _, expires = part.rpartition(":")
            leases.append((lease_id, float(expires)))
    return leases


_FIELD_PARSERS: Final[Mapping[str, Callable[[str], object]]] = {
    "state": str,
    "generation": _count,
    "consecutive_failures": _count,
    "window": _window,
    "open_count": _count,
    "opened_at_ts": _opt_float,
    "open_until_ts": _opt_float,
    "closed_at_ts": _opt_float,
    "last_failure_ts": _opt_float,
    "leases": _leases,
    "probe_successes": _count,
    "last_error": _opt_text_field,
    "reason": _opt_text_field,
    "updated_at_ts": _opt_float,
}
"""How each field of the hash the Lua script writes reads (every value a string)."""


def _state_from_fields(key: str, fields: Mapping[str, str]) -> CircuitBreakerState:
    """Build a state from the hash the Lua script writes; a field left out reads as none."""
    values = {name: parse(fields[name]) for name, parse in _FIELD_PARSERS.items() if name in fields}
    return CircuitBreakerState(key=fields.get("key", key), **values)  # type: ignore[arg-type]


def _state_with(state: CircuitBreakerState, fields: Mapping[str, str]) -> CircuitBreakerState:
    """``state`` with the fields of a "d" reply (those that changed, "" for a field now
    unset), each converted and validated; a field this version does not know is left."""
    changes = {
        name: parse(text) for name, text in fields.items() if (parse := _FIELD_PARSERS.get(name))
    }
    return state.with_fields(**changes)


_ESCAPED: Final = re.compile("\x1b(.)", re.DOTALL)


def _unescape(match: re.Match[str]) -> str:
    return "\x1f" if match.group(1) == "|" else match.group(1)


def _values(raw: object) -> list[str]:
    """The script's reply: one string, values separated by \\x1f (escaped within one)."""
    text = _text(raw)
    parts = text.split("\x1f")
    if "\x1b" in text:
        parts = [_ESCAPED.sub(_unescape, part) for part in parts]
    return parts


def _pairs(items: Sequence[str]) -> dict[str, str]:
    return dict(zip(items[0::2], items[1::2], strict=True))


class RedisCircuitStateStore(CircuitStateStore):
    """
    Circuit-breaker state shared by every process that points at the same Redis.

    Every mutation (`admit`, `record`, `force`, `reset`) is one Lua script run with
    ``EVALSHA`` (the script is cached by the server): it reads the key's hash, takes
    ``now`` from the server's ``TIME``, applies the same state machine as
    `empathy_models.circuit` (a Lua port held to it by a differential test), and writes
    the result back, all atomically, so concurrent processes never lose an update and
    never disagree about time.  Generations are checked in the script: outcomes for an
    older generation are dropped.  A key that expired reads as a fresh CLOSED breaker.

    Each write also stores a revision in the hash (field ``rev``).  The store remembers,
    per key (for the last 4,096 keys used), the state it last read and its revision and
    sends that revision along: when the script writes nothing and the revision is
    unchanged the reply is a header only and the remembered state is returned; after a
    write over that revision only the changed fields come back.  Either way the state
    returned equals what a full reply gives.  The command is packed by the store and
    sent on a pool connection directly (not through redis-py's command layers); from a
    URL, connections are kept between runs while nothing else waits for the pool.

    Args:
        connection: a ``redis://`` / ``rediss://`` URL or an existing
            ``redis.asyncio.Redis`` client, which the store uses but does not close.
            From a URL the store builds and owns a client over a blocking pool of at
            most ``max_connections`` (64) connections, waiting up to ``timeout`` (5 s)
            for one; socket timeouts of 2 s and a single quick retry of connecting keep
            a dead server from stalling callers (the breaker then runs degraded).  A
            script run is never sent twice: Redis may have run one whose answer timed
            out, so that operation fails (and the breaker runs degraded for it); an
            admission given up on so strands no probe lease (see `admit`).
        prefix: each breaker key is one hash at ``prefix + key``.  A URL's ``prefix``
            is the root of every store sharing it: the breaker's keys go under
            ``prefix + "cb:"``, the quota store's under ``prefix + "quota:"`` and the
            cache's under ``prefix + "cache:"`` (as the defaults do under
            ``"empathy:"``), so one URL serves all three.
        key_ttl: every write sets a key's TTL to this many seconds plus whatever remains
            of an open period, so keys of breakers nobody uses expire on their own; a
            FORCED_OPEN without an end never expires, nor does a DISABLED key (both hold
            until a reset).
        **client_options: ``max_connections``, ``timeout`` and other redis-py options,
            with a URL only; these may also be given in the URL's query, and so may
            ``prefix`` and ``key_ttl``.  A setting given twice (in the query and as an
            option or keyword, ``?prefix=`` with ``prefix=`` too, a user name or
            password in the userinfo and in the query or the options) is refused.

    Raises:
        StateStoreError: for Redis errors, naming the URL without its password.
    """

    shared = True
    _feed: ChangeFeed | None = None

    def __init__(
        self,
        connection: str | aioredis.Redis,
        *,
        prefix: str = _DefaultText(DEFAULT_PREFIX),
        key_ttl: float = _DefaultSeconds(DEFAULT_KEY_TTL),
        _kind: str = URL_PREFIX_KINDS["breaker"],
        **client_options: Any,
    ) -> None:
        if isinstance(connection, str):
            url, url_options = _split_url(connection)
            keywords = [n for n, v in (("prefix", prefix), ("key_ttl", key_ttl)) if _given(v)]
            _check_option_names(client_options, "client", connection)
            _check_db(connection, urlsplit(connection), client_options)
            _check_given_once(connection, client_options, keywords)
            if "prefix" in url_options:  # the root of every store kind's keys
                prefix = _url_root(url_options["prefix"]) + _kind
            if "key_ttl" in url_options:  # text: a number as written
                key_ttl = _url_seconds(str(url_options["key_ttl"]))
            self._target = redact_url(url)
            self._client: aioredis.Redis = _owned_client(url, client_options)
            self._owns_client = True
        elif isinstance(connection, aioredis.Redis):
            if client_options:
                raise ConfigurationError(
                    "client_options apply only when the store is given a URL, not a client"
                )
            self._client = connection
            self._owns_client = False
            self._target = _client_target(connection.connection_pool)
        else:
            raise _not_a_connection(_KIND_CLASSES[_kind], connection)
        if not _is_number(key_ttl) or not 1 <= key_ttl <= sys.float_info.max:  # NaN too
            raise ConfigurationError(
                f"key_ttl must be a number of seconds >= 1, got {shown(key_ttl)}"
            )
        self.key_ttl = float(key_ttl)
        self._source = source = breaker_script()
        self._sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        connection_kwargs = self._client.connection_pool.connection_kwargs
        self._codec = checked_codec(
            connection_kwargs.get("encoding", "utf-8"),
            connection_kwargs.get("encoding_errors", "strict"),
        )
        """How the client encodes text, by which replies are decoded."""
        self._encoding, self._encoding_errors = self._codec
        self._prefix_bytes = _prefix_bytes(prefix, self._encoding)
        self.prefix = prefix = str(prefix)  # a plain str, the default's too
        self.channel = f"{prefix}@db{int(connection_kwargs.get('db') or 0)}"
        """The pub/sub channel of the store's announcements: the prefix and the database
        (Redis's channels are the server's, not a database's)."""
        self._channel_arg = self._bulk_text(self.channel)
        # EVALSHA <sha> 1 (the count of keys), then per call the key and arguments
        self._command_head = b"".join(
            bulk(x) for x in (b"EVALSHA", self._sha.encode("ascii"), b"1")
        )
        self._ttl_arg = bulk(_num(self.key_ttl).encode("ascii"))
        self._last_policy: tuple[object, bytes] = (None, b"")  # and its script argument
        # per breaker key: [its Redis key and its name (as RESP bulk strings), the
        # revision of the state last read (b"" for none) and that state]; see `_run`
        self._keys: dict[str, list[Any]] = {}
        # connections of an owned pool kept between script runs (taking one from the
        # pool and giving it back costs about 15 µs); see `_roundtrip`
        self._idle: list[Any] | None = [] if self._owns_client else None
        self._idle_pid = os.getpid()
        self._pool_users = 0
        """Callers waiting for (or using) a connection of the pool itself."""
        self.last_server_time: float | None = None
        """Redis ``TIME`` (epoch seconds) seen by the last script run; for diagnostics."""
        self._late = LateAdmissions(connection_kwargs.get("socket_timeout"))

    def __repr__(self) -> str:
        return f"RedisCircuitStateStore({self._target!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------ plumbing

    def _redis_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"a breaker key must be a non-empty string, got {key!r}")
        return self.prefix + writable_name(key, "a breaker key", self._encoding)

    def _error(self, what: str, exc: BaseException, key: str | None = None) -> StateStoreError:
        return _store_error(self, what, exc, key)

    def _entry(self, key: str) -> list[Any]:
        try:
            entry = self._keys.get(key)
        except TypeError:  # unhashable: not a key (`checked_key` says why)
            entry = None
        if entry is None:  # a key this store has not sent yet: checked once
            self.checked_key(key)
            redis_key = self._redis_key(key)
            if len(self._keys) >= _KEY_CACHE_SIZE:
                del self._keys[next(iter(self._keys))]
            entry = [self._bulk_text(redis_key), self._bulk_text(key), b"", None]
            self._keys[key] = entry
        return entry

    def _bulk_text(self, text: str) -> bytes:
        return bulk(text.encode(self._encoding, self._encoding_errors))

    async def _run(
        self, op: str, key: str, policy_arg: bytes, extra: Sequence[str]
    ) -> tuple[float, list[str], CircuitBreakerState]:
        """
        One run of the script.  The command is packed here (the constant parts once)
        and sent on a connection of the client's pool, under the client's retry policy;
        the script is loaded when Redis does not know it (a restart, ``SCRIPT FLUSH``).

        The revision of the state last read for ``key`` goes with it: when the script
        wrote nothing and the stored state is still that revision, the reply carries
        only the header and the state read then is returned (the same value a full
        reply would give: the revision names one write of the key's hash).
        """
        self._check_open()
        entry = self._entry(key)
        known_rev: bytes = entry[2]  # empty while no state was read
        known_state: CircuitBreakerState | None = entry[3]
        extra_args = [text_bytes(value, *self._codec) for value in extra]  # errors, reasons
        parts = [
            b"*%d\r\n" % (10 + len(extra_args)),
            self._command_head,
            entry[0],
            _OPS[op],
            entry[1],
            self._ttl_arg,
            bulk(policy_arg),
            bulk(known_rev),
            self._channel_arg,
        ]
        parts.extend(map(bulk, extra_args))
        command = b"".join(parts)
        try:
            if self._client.single_connection_client:
                # a client bound to one connection: its own command path holds its lock
                raw = await self._evalsha_by_client(key, op, policy_arg, known_rev, extra_args)
            else:
                raw = await self._send(command)
        except (RedisError, OSError) as exc:
            raise self._error(f"{op} {key!r}", exc, key) from exc
        reply = _values(raw.decode(self._encoding, self._encoding_errors))
        header = reply[:_HEADER_SIZE]
        form = header[6]
        if form == "f":
            state = self._parse(key, _pairs(reply[_HEADER_SIZE:]))
        elif known_state is None or form not in ("s", "d"):
            raise StateStoreError(
                f"Redis state store {self._target}: unexpected reply form {form!r} for {key!r}",
                target=self._target,
            )
        elif form == "s":
            state = known_state
        else:
            state = self._parse(key, _pairs(reply[_HEADER_SIZE:]), known_state)
        if form != "s" and header[5]:
            entry[2] = header[5].encode(self._encoding, self._encoding_errors)
            entry[3] = state
        now = float(header[0])
        self.last_server_time = now
        self._late.seen(now)
        return now, header, state

    async def _evalsha_by_client(
        self, key: str, op: str, policy_arg: bytes, known_rev: bytes, extra: list[bytes]
    ) -> bytes:
        args = [1, self._redis_key(key), op, key, _num(self.key_ttl), policy_arg, known_rev]
        args.append(self.channel)
        raw = await evalsha_once(self._client, self._sha, self._source, args + extra, raw=True)
        return self._check_reply(raw)

    def _check_reply(self, reply: object) -> bytes:
        if not isinstance(reply, bytes):
            raise StateStoreError(
                f"Redis state store {self._target}: unexpected reply {reply!r}",
                target=self._target,
            )
        return reply

    async def _send(self, command: bytes) -> bytes:
        """
        Send a packed EVALSHA; the raw reply.  NOSCRIPT (it did not run) loads the script
        and resends, as `evalsha_once` does.
        """
        for _ in range(_NOSCRIPT_TRIES - 1):
            try:
                return await self._roundtrip(command)
            except NoScriptError:
                async with self._using_pool():
                    await self._client.script_load(self._source)
        return await self._roundtrip(command)

    async def _roundtrip(self, command: bytes) -> bytes:
        """
        One exchange on a connection, the command written at most once: a failure after
        it was written (above all a timeout: Redis may run the script and answer late)
        is raised, never retried, as a script run twice would count twice.  Connecting
        (and the health check) before it follow the client's retry policy, and a kept
        connection the server closed meanwhile is connected again before the command is
        written.  With a client the store owns, the connection is kept for the next run
        instead of going back to the pool, unless someone waits for the pool; a
        caller's client gets each connection back at once.
        """
        pool: Any = self._client.connection_pool  # get_connection is untyped
        idle = self._idle
        if idle is not None and self._idle_pid != os.getpid():
            # a forked child: the parent's sockets are not ours (the pool resets itself)
            idle.clear()
            self._idle_pid = os.getpid()
        if idle:
            conn = idle.pop()
            if _closed_by_server(conn):
                await conn.disconnect()  # `_exchange` connects it again first
        else:
            async with self._using_pool():
                conn = await pool.get_connection()
        done = False
        try:
            reply = await _exchange(conn, command)
            done = True
        finally:
            # read_response and send_packed_command disconnect a connection on any
            # error or cancellation, so a connection is never kept with a reply unread
            if done and self._idle is not None and not self._pool_users and conn.is_connected:
                self._idle.append(conn)  # (none once the store closed)
            else:
                await pool.release(conn)
        return self._check_reply(reply)

    @contextlib.asynccontextmanager
    async def _using_pool(self) -> AsyncIterator[None]:
        """
        Around anything that takes a connection from the pool: the kept connections go
        back to it, and none is kept until the block ends, so nothing waits on the pool
        for a connection the store holds idle.
        """
        self._pool_users += 1
        try:
            if self._idle:
                pool: Any = self._client.connection_pool
                while self._idle:
                    await pool.release(self._idle.pop())
            yield
        finally:
            self._pool_users -= 1

    def _parse(
        self, key: str, fields: Mapping[str, str], base: CircuitBreakerState | None = None
    ) -> CircuitBreakerState:
        try:
            return _state_from_fields(key, fields) if base is None else _state_with(base, fields)
        except (ValueError, ArithmeticError, RecordValidationError) as exc:
            raise _unreadable(self, key, exc) from exc

    def change_feed(self) -> ChangeFeed:
        """
        The script's announcements of new generations, read by a subscription to
        `channel` (one connection of its own while a breaker listens).
        """
        if self._feed is None:
            self._feed = ChangeFeed(
                functools.partial(watch, self._client, self.channel), repr(self)
            )
        return self._feed

    async def _aclose(self) -> None:
        self._late.cancel()
        if self._feed is not None:
            await self._feed.aclose()
        if self._owns_client:
            try:
                async with self._using_pool():
                    pass  # the kept connections go back to the pool, which closes them
                self._idle = None  # and calls still running keep none
                await close_owned(self._client)
            except (RedisError, OSError) as exc:
                raise self._error("close", exc) from exc

    # ------------------------------------------------------------------ operations

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        """
        One atomic admission (lazy OPEN -> HALF_OPEN, probe leases) with Redis's time.
        One the store stops waiting for after writing it strands no probe lease (`_late`).

        Raises:
            StateStoreError: Redis cannot be reached or fails.
        """
        lease_id = os.urandom(16).hex()  # uuid4's randomness, a quarter of its cost
        deadline, passed_at = self._late.deadline()
        try:
            _, header, state = await self._run(
                "admit", key, self._policy(policy), [lease_id, deadline]
            )
        except BaseException as exc:
            if was_sent(exc):  # it may run, or have run, with nobody waiting: give back by id
                release = functools.partial(self._run, "release", key, _DEFAULT_POLICY_ARG)
                self._late.give_back(functools.partial(release, [lease_id]), passed_at)
            raise
        admitted = header[1] == "1"
        if not admitted:
            return Admission(admitted=False, state=state, retry_after=_opt_float(header[2]))
        granted = header[3] or None
        return Admission(
            admitted=True,
            state=state,
            ticket=Ticket(
                key=state.key,
                generation=state.generation,
                lease_id=granted,
                lease_expires_ts=_opt_float(header[4]),
            ),
        )

    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        """
        Apply ``reports`` in order in one script; stale tickets are dropped.

        Equal reports in a row (a written-behind batch of successes) are sent once with
        a repeat count, so a batch of a thousand costs about what one report does.
        """
        if key.__class__ is not str or key not in self._keys:  # not sent yet: checked once
            self.checked_key(key)
        extra: list[str] = []
        previous: OutcomeReport | None = None
        repeat = 0
        for report in reports:
            if previous is not None and (report is previous or report == previous):
                repeat += 1
                continue
            if previous is not None:
                extra.append(str(repeat))
            ticket = report.ticket
            if ticket.key != key:
                raise ConfigurationError(
                    f"a ticket for {ticket.key!r} was reported against {key!r}"
                )
            extra += [
                str(int(ticket.generation)),
                _opt_text(ticket.lease_id),
                report.outcome.value,
                "" if report.retry_after is None else _num(float(report.retry_after)),
                _opt_text(report.error),
            ]
            previous, repeat = report, 1
        if previous is not None:
            extra.append(str(repeat))
        _, _, state = await self._run("record", key, self._policy(policy), extra)
        return state

    async def force(
        self,
        key: str,
        state: CircuitState,
        *,
        until: datetime | None = None,
        reason: str | None = None,
        for_seconds: float | None = None,
    ) -> CircuitBreakerState:
        """Force ``key`` to FORCED_OPEN (``for_seconds`` counts from TIME), DISABLED or CLOSED."""
        target = CircuitState(state)
        if target not in _FORCE_TARGETS:
            raise ConfigurationError(
                f"cannot force a circuit to {target.value!r}; use forced_open, disabled or closed"
            )
        until_ts, span = self.checked_force_end(until, for_seconds)
        reason = self.checked_reason(reason)
        extra = [
            target.value,
            "" if until_ts is None else _num(until_ts),
            _opt_text(reason),
            "" if span is None else _num(span),
        ]
        _, _, new = await self._run("force", key, _DEFAULT_POLICY_ARG, extra)
        return new

    async def reset(self, key: str | None = None) -> None:
        """Return ``key`` (or every key under the prefix) to a fresh CLOSED state."""
        if key is None:
            for state in await self.snapshot_all():
                await self.reset(state.key)
            return
        await self._run("reset", key, _DEFAULT_POLICY_ARG, [])

    async def snapshot(self, key: str) -> CircuitBreakerState:
        """The state of ``key`` (one ``HGETALL``); an unknown key reads as CLOSED."""
        self._check_open()
        self.checked_key(key)
        try:
            async with self._using_pool():
                raw = await self._client.hgetall(self._redis_key(key))
        except (RedisError, OSError) as exc:
            raise self._error(f"snapshot {key!r}", exc) from exc
        if not raw:
            return CircuitBreakerState(key=key)
        codec = self._codec
        return self._parse(key, {_text(k, *codec): _text(v, *codec) for k, v in raw.items()})

    async def now(self) -> float:
        """The Redis server's clock (``TIME``), which every script times states by."""
        self._check_open()
        try:
            async with self._using_pool():
                seconds, micros = await self._client.time()
        except (RedisError, OSError) as exc:
            raise self._error("read the clock", exc) from exc
        return float(seconds) + float(micros) / 1e6

    async def snapshot_all(self) -> list[CircuitBreakerState]:
        """
        Every key under the prefix (``SCAN`` then ``HGETALL`` each), sorted by key; keys
        there that hold no breaker state (another store's, given the same prefix) or
        whose names the client's encoding cannot read (`scan_names`) are passed over.
        """
        self._check_open()
        out: list[CircuitBreakerState] = []
        codec = self._codec
        try:
            async with self._using_pool():
                async for redis_key, name in scan_names(self._client, self.prefix, codec):
                    if await self._client.type(redis_key) not in (b"hash", "hash"):
                        continue
                    raw = await self._client.hgetall(redis_key)
                    if raw and (b"generation" in raw or "generation" in raw):
                        fields = {_text(k, *codec): _text(v, *codec) for k, v in raw.items()}
                        out.append(self._parse(name[len(self.prefix) :], fields))
        except (RedisError, OSError) as exc:
            raise self._error("snapshot_all", exc) from exc
        return sorted(out, key=lambda s: s.key)

    def _policy(self, policy: BreakerPolicy) -> bytes:
        last = self._last_policy
        if policy is last[0]:  # a breaker passes the same (frozen) policy every time
            return last[1]
        if not isinstance(policy, BreakerPolicy):
            raise ConfigurationError(f"expected a BreakerPolicy, got {type(policy).__name__}")
        arg = _policy_arg(policy)
        self._last_policy = (policy, arg)
        return arg


class _OwnedPool(aioredis.BlockingConnectionPool):
    """
    The pool of a client a store owns, which lets no connection outlive the store.

    Calls still running when the store closes would otherwise give their connections
    back to a pool already disconnected, or connect new ones for calls that waited for
    a connection, and each stayed open until the process ended.  Once `shut`, the pool
    makes no connection (a call waiting for one fails) and disconnects every
    connection given back.
    """

    shut = False

    def _refuse_when_shut(self) -> None:
        if self.shut:
            raise RedisConnectionError("the store was closed")

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_when_shut()
        conn = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        try:
            self._refuse_when_shut()  # it closed while this call waited
        except RedisConnectionError:
            await self.release(conn)
            raise
        return conn

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        if self.shut:
            await connection.disconnect()


async def close_owned(client: aioredis.Redis) -> None:
    """Close a client `_owned_client` built, and every connection it still has in use."""
    pool = client.connection_pool
    if isinstance(pool, _OwnedPool):
        pool.shut = True
    await client.aclose()


def _owned_client(url: str, client_options: Mapping[str, Any]) -> aioredis.Redis:
    """A client of the store's own over a blocking pool: a burst of concurrent calls
    waits for a connection (up to ``timeout`` seconds) instead of failing with "Too
    many connections"."""
    options: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": 2.0,
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        "health_check_interval": 30,
        "max_connections": 64,
        "timeout": 5.0,
    }
    options.update(client_options)
    try:
        pool = _OwnedPool.from_url(url, **options)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"cannot use {redact_url(url)!r} as a Redis URL: {exc}") from exc
    _check_seconds(url, pool)
    _check_database(url, pool)
    _check_connection_options(url, pool)
    return aioredis.Redis.from_pool(pool)


def _not_a_connection(name: str, connection: object) -> ConfigurationError:
    """What is wrong with a store's ``connection`` that is neither a URL nor a client."""
    got = type(connection).__name__
    if got == "RedisCluster":  # its commands find each key's node: ours go to one server
        got = "a RedisCluster: Redis Cluster is not supported (a single server or Sentinel)"
    return ConfigurationError(f"{name} needs a redis:// URL or a redis.asyncio.Redis, got {got}")


def _client_target(pool: Any) -> str:
    """
    Where a caller's client connects, as a URL without credentials: its socket or host
    and port, TLS and database (``unix:///path?db=N``, ``rediss://host:port/N``); a
    client of `Sentinel.master_for`, its sentinels, service and database
    (``redis+sentinel://host:port,host:port/service/N``).

    Raises:
        ConfigurationError: a client of ``Sentinel.slave_for`` (a read-only replica).
    """
    kwargs = pool.connection_kwargs
    db = kwargs.get("db") or 0
    if isinstance(pool, SentinelConnectionPool):
        if not pool.is_master:
            raise ConfigurationError(
                "a client of Sentinel.slave_for reaches a read-only replica, where no "
                "store can write: give one of Sentinel.master_for"
            )
        sentinels = pool.sentinel_manager.sentinels
        where = ",".join(_host_port(s.connection_pool.connection_kwargs) for s in sentinels)
        return f"redis+sentinel://{where}/{pool.service_name}/{db}"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    return f"{scheme}://{_host_port(kwargs)}/{db}"


def _host_port(kwargs: Mapping[str, Any]) -> str:
    host = str(kwargs.get("host", "localhost"))
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{kwargs.get('port', 6379)}"


async def scan_names(
    client: aioredis.Redis, prefix: str, codec: tuple[str, str]
) -> AsyncIterator[tuple[bytes, str]]:
    """
    Every key under ``prefix`` (``SCAN``, read as bytes whatever the client decodes) and
    its name in the client's encoding.  A name that encoding cannot read is passed
    over: no name a store writes is one (another program's key, or one written by a
    client of another encoding).
    """
    pattern = "".join("\\" + c if c in _GLOB_SPECIAL else c for c in prefix) + "*"
    scanning: Any = client  # redis-py leaves the options of scan_iter untyped
    async for key in scanning.scan_iter(match=pattern, count=500, **{NEVER_DECODE: True}):
        try:
            yield key, key.decode(codec[0])
        except UnicodeDecodeError:
            continue


def _check_database(url: str, pool: aioredis.BlockingConnectionPool) -> None:
    """
    The database, from ``?db=`` or the ``db`` option (the path's is checked before):
    redis-py takes any integer, and a negative one failed every call with "DB index is
    out of range".
    """
    db = pool.connection_kwargs.get("db", 0)
    if not (_is_number(db) and isinstance(db, int) and db >= 0) and not (
        isinstance(db, str) and db.isascii() and db.isdigit()
    ):
        raise ConfigurationError(
            f"{redact_url(url)!r}: the database must be a number >= 0, got {shown(db)}"
        )


def _check_seconds(url: str, pool: aioredis.BlockingConnectionPool) -> None:
    """
    The pool's waits, from the URL's query or the options: redis-py takes any float, and
    ``nan`` or ``inf`` makes a dead server stall every caller for good, ``0`` or less
    fails every call at once.  ``None`` (given as an option: no limit) is left alone.
    """
    waits = {
        "socket_timeout": pool.connection_kwargs.get("socket_timeout"),
        "socket_connect_timeout": pool.connection_kwargs.get("socket_connect_timeout"),
        "timeout": pool.timeout,
    }
    for name, value in waits.items():
        if value is not None and (not _is_number(value) or not 0 < value <= sys.float_info.max):
            raise ConfigurationError(
                f"{redact_url(url)!r}: {name} must be a finite number of seconds > 0, "
                f"got {shown(value)}"
            )
    interval = pool.connection_kwargs.get("health_check_interval", 0)
    if not _is_number(interval) or not 0 <= interval <= sys.float_info.max:
        raise ConfigurationError(
            f"{redact_url(url)!r}: health_check_interval must be a finite number of "
            f"seconds >= 0, got {shown(interval)}"
        )


def _url_root(text: str) -> str:
    """A URL's ``prefix``: the root every store kind appends its part to, never empty
    (the keys would sit at the top of the database, shared with any program whose root
    was left empty too, as by a variable that was not set)."""
    if not text:
        raise ConfigurationError(
            "prefix in the Redis URL is empty; give the root of the keys (?prefix=myapp:) "
            "or leave it out for the default, 'empathy:'"
        )
    return text


def _url_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise ConfigurationError(
            f"key_ttl in the Redis URL must be a number of seconds: {exc}"
        ) from exc


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _prefix_bytes(prefix: object, encoding: str) -> bytes:
    """``prefix`` as the client writes it, or `ConfigurationError` saying why it cannot be."""
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError(f"prefix must be a non-empty string, got {shown(prefix)}")
    return name_bytes(prefix, "prefix", encoding)  # strictly: no two prefixes alike


def _init_names(cls: type) -> set[str]:
    """The keywords ``cls(...)`` accepts by name (its ``__init__`` and its bases')."""
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
                names.add(param.name)
    names.discard("self")
    return names


def _client_option_names() -> frozenset[str]:
    """Every keyword the redis-py pool and connection classes accept (for typo checks)."""
    names = set(URL_QUERY_ARGUMENT_PARSERS)
    for cls in (SSLConnection, UnixDomainSocketConnection, BlockingConnectionPool):
        names |= _init_names(cls)
    return frozenset(names)


def _check_connection_options(url: str, pool: aioredis.BlockingConnectionPool) -> None:
    """
    Refuse options the pool's connection class does not take: a TLS option (``ssl_*``)
    with a redis:// URL, a socket ``path`` with a host.  redis-py passes them on when
    it makes a connection, so each call would fail with a `TypeError`.
    """
    stray = sorted(set(pool.connection_kwargs) - _init_names(pool.connection_class))
    if not stray:
        return
    scheme = urlsplit(url).scheme.lower()
    hint = ""
    if all(name.startswith("ssl_") for name in stray):
        hint = "; TLS options apply to rediss:// URLs only"
    raise ConfigurationError(
        f"{redact_url(url)!r}: the options {stray} do not apply to a {scheme}:// "
        f"connection ({pool.connection_class.__name__}){hint}"
    )


_CLIENT_OPTIONS: Final = _client_option_names()

_URL_TEXT_OPTIONS: Final = frozenset(URL_QUERY_ARGUMENT_PARSERS) | {
    "username",
    "password",
    "client_name",
    "encoding",
    "encoding_errors",
    "decode_responses",
    "lib_name",
    "lib_version",
    "host",
    "port",
    "path",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_ciphers",
    "ssl_password",
}
"""The client options a URL's query may give: those redis-py converts from text, and
those that are text.  The others take a Python object (a class, a callable, a retry
policy), which only a keyword option can give."""


def _check_url_values(names: Iterable[str], url: str) -> None:
    """Refuse a query option that takes a Python object: redis-py would pass the text on."""
    for name in names:
        if name in _CLIENT_OPTIONS and name not in _URL_TEXT_OPTIONS:
            raise ConfigurationError(
                f"{redact_url(url)!r}: the client option {name} takes a Python object, which "
                "a URL's text cannot give; pass it as a keyword option instead"
            )


def _check_option_names(names: Iterable[str], where: str, url: str) -> None:
    known = _CLIENT_OPTIONS | _URL_OPTIONS
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"unknown Redis {where} option {name!r} in {redact_url(url)!r}{hint}; "
                f"known options: {', '.join(sorted(known))}"
            )


def _check_db(url: str, parts: SplitResult, options: Iterable[str]) -> None:
    """
    The path of a redis:// URL must be empty or ``/<database number>``, and a database
    in the path must not be given again among ``options`` (the query's or the client's
    option names; redis-py would let one of them win).
    """
    if parts.scheme.lower() not in ("redis", "rediss"):
        return
    db = unquote(parts.path).strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigurationError(
            f"{redact_url(url)!r}: the path must be a database number (redis://host:6379/0), "
            f"got {db!r}"
        )
    if db and "db" in options:
        raise ConfigurationError(
            f"{redact_url(url)!r}: the database is given twice, in the path and as db=; "
            "give it once"
        )


def _check_given_once(url: str, client_options: Iterable[str], keywords: Iterable[str]) -> None:
    """
    Refuse a setting given twice: a query option given again in the query, as a client
    option or as the store's own keyword (``prefix``, ``key_ttl``: the query's value
    would win), a user name or password in the userinfo given again as ``username=``
    or ``password=``, the address's host or port again as ``host=`` or ``port=``
    (redis-py would let one of them win: the userinfo and the address over the query,
    the query over the options, the first of a repeated option).  The message names
    where each was given, never a value.
    """
    parts = urlsplit(url)
    query = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
    given: dict[str, str] = {}
    # redis-py takes the userinfo's parts only when they are not empty, and the
    # address's host and port over any other
    for name, value in (("username", parts.username), ("password", parts.password)):
        if value:
            given[name] = "in the URL's userinfo"
    for name, present in (("host", parts.hostname), ("port", parts.port)):
        if present:
            given[name] = "in the URL's address"
    for names, where in (
        (query, "in the URL's query"),
        (client_options, "as a client option"),
        (keywords, "as a keyword"),
    ):
        for name in names:
            if name in given:
                first = given[name]
                also = f"again {where}" if first == where else where
                raise ConfigurationError(
                    f"{redact_url(url)!r}: {name} is given twice, {first} and {also}; give it once"
                )
            given[name] = where


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """
    Take the store's own options (``prefix``, ``key_ttl``) out of the URL's query, after
    checking every option name and the database number (redis-py would accept a typo
    and fail on every later call, or silently use database 0).
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigurationError(
            f"{redact_url(url)!r} is not a valid Redis URL: {url_flaw(exc)}"
        ) from exc
    query = parse_qsl(parts.query, keep_blank_values=True)
    _check_option_names((name for name, _ in query), "URL", url)
    _check_url_values((name for name, _ in query), url)
    _check_db(url, parts, [name for name, _ in query])
    ours = {k: v for k, v in query if k in _URL_OPTIONS}
    if not ours:
        return url, ours
    rest = urlencode([(k, v) for k, v in query if k not in _URL_OPTIONS])
    tail = (f"?{rest}" if rest else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{parts.scheme}://{parts.netloc}{parts.path}{tail}", ours


async def _exchange(conn: Any, command: bytes) -> Any:
    """``command`` on ``conn`` (a connection of the pool), its reply read by the store."""
    reader = getattr(conn, "_reader", None)
    writer = getattr(conn, "_writer", None)
    if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        # not connected (redis-py connects, then checks health, both under the
        # retry policy, before it writes), or a connection class whose streams are
        # not asyncio's: redis-py's own command path
        await conn.send_packed_command(command)
        return await _read_sent(conn, True)
    interval = conn.health_check_interval
    if interval and asyncio.get_running_loop().time() > conn.next_health_check:
        await conn.check_health()
    reply = await _bulk_exchange(conn, reader, writer, command)
    if interval:
        conn.next_health_check = asyncio.get_running_loop().time() + interval
    return reply


async def _bulk_exchange(
    conn: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: bytes
) -> bytes:
    """
    ``command`` written to a connected redis-py connection's streams and the script's
    reply read back: a bulk string (every script of ours answers one) or an error.

    What redis-py's ``send_packed_command`` + ``read_response`` do for such a reply,
    without their layers (a task per write under ``socket_timeout``, the parser's
    generality): a third of an admission's time while the cores are busy, a fifth of
    its CPU on an idle machine (where waking Redis dominates).  Both sit at a reply
    boundary before and after, so the two paths share a connection.  As there, a
    timeout, a broken connection or an interruption (cancellation) disconnects the
    connection (no reply is ever left unread on it), and they are raised as redis-py's
    `TimeoutError` / `ConnectionError` (never retried: the command may have run).
    """
    written = False
    try:
        async with asyncio.timeout(conn.socket_timeout):
            if writer.transport.is_closing():
                raise ConnectionResetError("the connection is closed")
            writer.write(command)
            written = True
            line = await reader.readuntil(b"\r\n")
            kind = line[:1]
            if kind == b"$":
                size = int(line[1:-2])
                if size >= 0:
                    body = await reader.readexactly(size + 2)
                    return body[:-2]
            elif kind == b"-":  # a whole error line: the connection stays usable
                message = line[1:-2].decode("utf-8", "replace")
                if message.startswith("NOSCRIPT "):
                    raise NoScriptError(message.removeprefix("NOSCRIPT "))
                if message.startswith("READONLY "):  # not run: left, as in `_read_sent`
                    await conn.disconnect(nowait=True)
                    raise ReadOnlyError(message.removeprefix("READONLY "))
                raise ResponseError(message)
    except RedisError:
        raise
    except TimeoutError:
        await conn.disconnect(nowait=True)
        raise sent(RedisTimeoutError("Timeout reading from Redis")) from None
    except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
        # EOFError: asyncio.IncompleteReadError (the server closed the connection)
        await conn.disconnect(nowait=True)
        error = RedisConnectionError(f"Error while talking to Redis: {exc!r}")
        raise (sent(error) if written else error) from exc
    except BaseException as exc:
        await conn.disconnect(nowait=True)
        if written:
            sent(exc)  # a cancellation: the script may still run
        raise
    # any other reply (a null, an array, a push message): of unknown length here
    await conn.disconnect(nowait=True)
    raise ResponseError(f"unexpected reply {line[:40]!r} to a script run")


def _closed_by_server(conn: Any) -> bool:
    """Whether a connected connection's server closed it (nothing can be sent on it)."""
    reader = getattr(conn, "_reader", None)
    writer = getattr(conn, "_writer", None)
    if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        return False
    return reader.at_eof() or writer.transport.is_closing()


async def evalsha_once(
    client: aioredis.Redis, sha: str, source: str, args: Sequence[Any], *, raw: bool = False
) -> Any:
    """
    ``EVALSHA sha *args`` on a connection of ``client`` and its reply (bytes left
    undecoded with ``raw``); when Redis does not know the script (NOSCRIPT: it did not
    run), ``source`` is loaded and the command sent again, up to `_NOSCRIPT_TRIES`
    times in all (a ``SCRIPT FLUSH`` may land between a load and its command).

    Unlike ``client.execute_command``, which re-sends a command under the client's
    retry policy after a timeout, the command is written at most once: a script Redis
    received may run and answer late (a stall past the socket timeout), and running it
    again would apply it twice.  Connecting and the health check before the command is
    written follow the retry policy.
    """
    for _ in range(_NOSCRIPT_TRIES - 1):
        try:
            return await _command_once(client, ("EVALSHA", sha, *args), raw)
        except NoScriptError:  # it did not run: load it, send the command again
            await client.script_load(source)
    return await _command_once(client, ("EVALSHA", sha, *args), raw)


_NOSCRIPT_TRIES: Final = 3
"""How many times `evalsha_once` sends a command whose script Redis keeps not knowing."""


async def _command_once(client: aioredis.Redis, args: Sequence[Any], raw: bool) -> Any:
    """``args`` written once on a connection of ``client`` (see `evalsha_once`); the reply."""
    plain: Any = client  # redis-py leaves these attributes untyped
    if client.single_connection_client:
        await client.initialize()
        async with plain._single_conn_lock:
            return await _write_once(plain.connection, args, raw)
    pool: Any = client.connection_pool
    conn = await pool.get_connection()
    try:
        return await _write_once(conn, args, raw)
    finally:
        await pool.release(conn)


async def _write_once(conn: Any, args: Sequence[Any], raw: bool) -> Any:
    # send_command connects first if needed; a failure disconnects the connection
    await conn.send_command(*args)
    return await _read_sent(conn, raw)


async def _read_sent(conn: Any, raw: bool) -> Any:
    """The reply to a command written on ``conn``; a failure is marked `sent` (it may run)."""
    try:
        return await conn.read_response(disable_decoding=raw)
    except ReadOnlyError:
        # a server turned replica (a failover): connected again, the name may lead to
        # the new primary; the connection is left (the command did not run)
        await conn.disconnect(nowait=True)
        raise
    except ResponseError:
        raise  # the command ran, or was refused, and said so
    except BaseException as exc:
        sent(exc)
        raise
