"""Budgets and rate limits in Redis: one Lua script per operation, time from Redis."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from empathy_models.abc import QuotaStore
from empathy_models.exceptions import StateStoreError
from empathy_models.limits import BudgetGrant, BudgetUsage, RateGrant
from empathy_models.limits.meter import hold_bucket, usage_of

from ._codec import writable_name
from ._store import (
    URL_PREFIX_KINDS,
    RedisCircuitStateStore,
    _DefaultText,
    _num,
    _text,
    close_owned,
    evalsha_once,
    scan_names,
)

__all__ = ["DEFAULT_QUOTA_PREFIX", "RedisQuotaStore", "quota_script"]

DEFAULT_QUOTA_PREFIX: Final = "empathy:quota:"
"""Prefix of every Redis key the quota store writes."""

RETENTION: Final = 7 * 24 * 3600.0
"""Seconds a budget window stays readable (``budget status``) after it ends."""

_FIELDS: Final = (
    "limit",
    "spent",
    "held",
    "reserved",
    "settled",
    "released",
    "overrun",
    "lapsed",
    "calls",
    "refused",
)


def quota_script() -> str:
    """The Lua source of the quota operations (a port of `empathy_models.limits.meter`)."""
    return files(__package__).joinpath("quota.lua").read_text(encoding="utf-8")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _wrong_type(error: Exception) -> bool:
    """Whether a command failed for the type of the key's value (WRONGTYPE)."""
    return isinstance(error, ResponseError) and str(error).startswith("WRONGTYPE")


def _seconds(clock: Any) -> float:
    """Redis's ``TIME`` reply, ``(seconds, microseconds)`` as redis-py gives it, in seconds."""
    seconds, micros = clock
    return float(seconds) + float(micros) / 1e6


class RedisQuotaStore(QuotaStore):
    """
    Spend budgets and rate-limit schedules shared by every process using the same Redis.

    `reserve`, `settle`, `acquire` and `adjust` are each one Lua script (``EVALSHA``),
    atomic on the server and sent at most once (a run whose answer timed out is not
    sent again: it may have run, and would count twice); rate limits take ``now`` from
    the server's ``TIME``, so hosts never disagree about time.  A budget window is a
    hash at ``prefix + "b|" + key + "@" + window start`` that expires a week after the
    window ends; a rate-limit schedule is one string (its end, and while a push back
    holds it, the reset time, and the server time it was written: ``"<end> [<reset>]
    @<written>"``) that expires a minute after it runs
    empty.  The window's holds are kept per lapse time (hash fields ``h:<epoch
    seconds>``); each reservation or settlement first releases those whose time came
    by the server's clock, and reads show them released by it too.  A hold reserved
    under an id keeps its bucket in field ``i:<id>`` until the settlement naming it
    (`QuotaStore.hold_ids`), which then applies once.  A
    window also keeps the server time it was written (``at``): after the server's
    clock stepped back, its holds' lapse times move back by the step (fields
    ``l:<epoch seconds>``, `empathy_models.limits.meter.unstepped`).

    Args:
        connection: as for `RedisCircuitStateStore`.
        prefix: of the quota keys; a URL's ``prefix`` is the root, under which the
            quota keys go in ``prefix + "quota:"`` (see `RedisCircuitStateStore`).
        **client_options: as for `RedisCircuitStateStore`.

    Raises:
        StateStoreError: for Redis errors.
    """

    shared = True
    hold_ids = True

    def __init__(
        self,
        connection: str | aioredis.Redis,
        *,
        prefix: str = _DefaultText(DEFAULT_QUOTA_PREFIX),
        **client_options: Any,
    ) -> None:
        # the circuit-state store parses and checks the URL and builds the client
        plumbing = RedisCircuitStateStore(
            connection, prefix=prefix, _kind=URL_PREFIX_KINDS["quota"], **client_options
        )
        self._client = plumbing._client
        self._owns_client = plumbing._owns_client
        self._target = plumbing._target
        self.prefix = plumbing.prefix
        self._codec = plumbing._codec  # the client's encoding, by which replies decode
        self._source = quota_script()
        self._sha = hashlib.sha1(self._source.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"RedisQuotaStore({self._target!r}, prefix={self.prefix!r})"

    def _error(self, what: str, exc: BaseException) -> StateStoreError:
        return StateStoreError(
            f"Redis quota store {self._target}: {what} failed: {type(exc).__name__}: {exc}",
            target=self._target,
        )

    def _window(self, key: str, window_start: float) -> str:
        return f"{self.prefix}b|{self._budget(key)}@{float(window_start)!r}"  # int: the same

    def _budget(self, key: str) -> str:
        return writable_name(key, "a budget key", self._codec[0])

    def _schedule(self, key: str) -> str:
        return f"{self.prefix}r|{writable_name(key, 'a rate-limit key', self._codec[0])}"

    async def _run(self, what: str, redis_key: str, args: Sequence[str]) -> list[str]:
        self._check_open()
        try:
            raw = await evalsha_once(self._client, self._sha, self._source, [1, redis_key, *args])
        except (RedisError, OSError) as exc:
            raise self._error(what, exc) from exc
        return [_text(x, *self._codec) for x in raw]

    def _usage(
        self, key: str, fields: Mapping[str, str], ws: float, we: float, now: float | None = None
    ) -> BudgetUsage:
        try:
            return self._read_usage(key, fields, ws, we, now)
        except (ValueError, ArithmeticError) as exc:  # RecordValidationError included
            raise StateStoreError(
                f"Redis quota store {self._target}: unreadable budget window for {key!r}: {exc}",
                target=self._target,
            ) from exc

    @staticmethod
    def _read_usage(
        key: str, fields: Mapping[str, str], ws: float, we: float, now: float | None
    ) -> BudgetUsage:
        data: dict[str, Any] = {
            "window_start": float(fields.get("window_start", ws)),
            "window_end": float(fields.get("window_end", we)),
            **{name: int(float(fields.get(name, "0"))) for name in _FIELDS},
            "holds": {f[2:]: int(v) for f, v in fields.items() if f.startswith("h:")},
            "lapses": {f[2:]: float(v) for f, v in fields.items() if f.startswith("l:")},
        }
        if "at" in fields:
            data["at"] = float(fields["at"])
        return usage_of(key, data, data["window_start"], data["window_end"], now)

    def _reply(self, key: str, reply: list[str], ws: float, we: float) -> BudgetGrant:
        fields = dict(zip(reply[1::2], reply[2::2], strict=True))
        return BudgetGrant(granted=reply[0] == "1", usage=self._usage(key, fields, ws, we))

    @staticmethod
    def _ttl(window_end: float) -> str:
        return _num(max(60.0, window_end - time.time()) + RETENTION)

    async def _aclose(self) -> None:
        if self._owns_client:
            try:
                await close_owned(self._client)
            except (RedisError, OSError) as exc:
                raise self._error("close", exc) from exc

    # ------------------------------------------------------------------ budgets

    async def reserve(
        self,
        key: str,
        *,
        window_start: float,
        window_end: float,
        amount: int,
        limit: int,
        lapses_at: float | None = None,
        hold_id: str | None = None,
    ) -> BudgetGrant:
        args = ["reserve", _num(window_start), _num(window_end), str(int(amount))]
        args += [str(int(limit)), self._ttl(window_end), hold_bucket(lapses_at, window_end)]
        if hold_id is not None:
            args.append(hold_id)
        reply = await self._run(f"reserve {key!r}", self._window(key, window_start), args)
        return self._reply(key, reply, window_start, window_end)

    async def settle(
        self,
        key: str,
        *,
        window_start: float,
        window_end: float,
        held: int,
        actual: int,
        lapses_at: float | None = None,
        hold_id: str | None = None,
        resent: bool = False,
    ) -> BudgetUsage:
        args = ["settle", _num(window_start), _num(window_end), str(int(held))]
        args += [str(int(actual)), self._ttl(window_end), hold_bucket(lapses_at, window_end)]
        if hold_id is not None:
            args += [hold_id, "1" if resent else "0"]
        reply = await self._run(f"settle {key!r}", self._window(key, window_start), args)
        return self._reply(key, reply, window_start, window_end).usage

    async def now(self) -> float:
        """The Redis server's clock (``TIME``), by which every script lapses holds."""
        self._check_open()
        try:
            clock = await self._client.time()
        except (RedisError, OSError) as exc:
            raise self._error("read the clock", exc) from exc
        return _seconds(clock)

    async def usage(self, key: str, *, window_start: float, window_end: float) -> BudgetUsage:
        self._check_open()
        try:
            # one round trip: the window and the server's clock, by which its holds are
            # shown released, read together
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.hgetall(self._window(key, window_start))
                clock, raw = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._error(f"read {key!r}", exc) from exc
        fields = {_text(k, *self._codec): _text(v, *self._codec) for k, v in raw.items()}
        return self._usage(key, fields, window_start, window_end, _seconds(clock))

    async def _keys(self, prefix: str) -> list[str]:
        """The names of the keys under ``prefix`` (`scan_names`), each once."""
        try:
            scan = scan_names(self._client, prefix, self._codec)
            return list(dict.fromkeys([name async for _, name in scan]))  # SCAN repeats some
        except (RedisError, OSError) as exc:
            raise self._error("scan", exc) from exc

    async def usages(self) -> list[BudgetUsage]:
        """
        Every budget window under the prefix.  Keys there that cannot be one (another
        program's: a name that ends in no ``@<window start>``, a value that is no hash)
        are passed over, as `reset_budget` passes them over.
        """
        self._check_open()
        found = await self._keys(self.prefix + "b|")
        found = [k for k in found if _is_number(k.rpartition("@")[2])]
        try:
            # one round trip for every window found and the server's clock
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.time()
                for redis_key in found:
                    pipe.hgetall(redis_key)
                clock, *windows = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise self._error("read", exc) from exc
        for reply in (clock, *windows):
            if isinstance(reply, Exception) and not _wrong_type(reply):
                raise self._error("read", reply) from reply
        now = _seconds(clock)
        out = []
        start = len(self.prefix) + 2
        for redis_key, raw in zip(found, windows, strict=True):
            if not raw or isinstance(raw, Exception):  # gone since the scan, or no hash
                continue
            fields = {_text(k, *self._codec): _text(v, *self._codec) for k, v in raw.items()}
            key = redis_key[start:].rsplit("@", 1)[0]
            out.append(self._usage(key, fields, 0.0, 0.0, now))
        return sorted(out, key=lambda u: (u.key, u.window_start))

    async def reset_budget(self, key: str) -> int:
        """
        Delete every window of ``key``; how many Redis deleted.  Keys named like one that
        hold no hash (another program's, which `usages` passes over) are left, and a key
        ``SCAN`` found twice, or one that expired since, is not counted.
        """
        self._check_open()
        prefix = f"{self.prefix}b|{self._budget(key)}@"
        found = [k for k in await self._keys(prefix) if _is_number(k[len(prefix) :])]
        if not found:
            return 0
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for redis_key in found:
                    pipe.type(redis_key)
                kinds = await pipe.execute()
            windows = [k for k, kind in zip(found, kinds, strict=True) if _text(kind) == "hash"]
            return int(await self._client.delete(*windows)) if windows else 0
        except (RedisError, OSError) as exc:
            raise self._error(f"reset {key!r}", exc) from exc

    async def set_limit(self, key: str, limit: int | None) -> None:
        self._check_open()
        try:
            if limit is None:
                await self._client.delete(f"{self.prefix}l|{self._budget(key)}")
            else:
                await self._client.set(f"{self.prefix}l|{self._budget(key)}", str(int(limit)))
        except (RedisError, OSError) as exc:
            raise self._error(f"set the limit of {key!r}", exc) from exc

    async def limit_overrides(self) -> dict[str, int]:
        self._check_open()
        found = await self._keys(self.prefix + "l|")
        if not found:
            return {}
        try:
            values = await self._client.mget(found)
        except (RedisError, OSError) as exc:
            raise self._error("read the limits", exc) from exc
        start = len(self.prefix) + 2
        limits = {}
        for redis_key, value in zip(found, values, strict=True):
            if value is None:  # gone since the scan, or no string
                continue
            text = _text(value, *self._codec)
            try:
                limits[redis_key[start:]] = int(text)
            except ValueError as exc:
                raise StateStoreError(
                    f"Redis quota store {self._target}: unreadable budget limit for "
                    f"{redis_key[start:]!r}: {text[:40]!r} is no whole number of nano-dollars",
                    target=self._target,
                ) from exc
        return limits

    # ------------------------------------------------------------------ rate limits

    async def acquire(
        self, key: str, *, cost: float, interval: float, burst: float, max_wait: float
    ) -> RateGrant:
        args = ["acquire", _num(float(cost)), _num(float(interval))]
        args += [_num(float(burst)), _num(float(max_wait))]
        reply = await self._run(f"acquire {key!r}", self._schedule(key), args)
        place = float(reply[2]) if len(reply) > 2 else None
        return RateGrant(granted=reply[0] == "1", wait=float(reply[1]), place=place)

    async def adjust(self, key: str, *, delta: float, place: float | None = None) -> None:
        args = ["adjust", _num(float(delta))]
        if place is not None:
            args.append(_num(float(place)))
        await self._run(f"adjust {key!r}", self._schedule(key), args)

    async def push_back(self, key: str, *, seconds: float) -> None:
        args = ["push_back", _num(float(seconds))]
        await self._run(f"push back {key!r}", self._schedule(key), args)
