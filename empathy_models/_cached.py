"""
The executor's side of the response cache (see `empathy_models.cache`): the key of a
request, serving a hit, storing an answer.  Imported by `EmpathyLLMExecutor.run` and
`EmpathyLLMExecutor.stream` (`empathy_models.streaming`, which replays a hit as a stream)
only for contexts that set ``cache_ttl``.

A miss is always a correct answer, so the cache never holds a call up: a read is waited
for at most `STORE_TIMEOUT` seconds and half the time left of the run's deadline (a
cancelled run not at all: its read ends in the background); an answer is written behind
(in a task `EmpathyLLMExecutor.aclose` waits for), at most `STORE_TIMEOUT` seconds.  A
read or write that fails or does not answer within `STORE_TIMEOUT` (a read its run
stopped waiting for too, judged when that time is up) puts the cache in a degraded mode
(`empathy_models._outage.Outage`, one warning per outage): for ``RETRY_INTERVAL``
seconds calls skip it (``cache_skipped``), then it is tried again.  A run whose deadline
left it less time than the store took misses, and the store stays in use.
An in-process `MemoryResponseCache` is used as is.

Runs of one request that miss while a run of the same executor asks a model wait for
its answer (`Flight`, `follow`); on a store shared by processes with leases, the run
that leads in its process takes the request's lease there first, reading the entry with
it (one another process stored since this run's read missed answers the run), or waits
for another process's answer while that process holds it (`lead_or_wait`); it renews the
lease while its call runs, up to its deadline or per-attempt timeout (`_Lease`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

import attrs

from ._request_options import structured_result
from ._run import _prompt_text
from ._settled import Expired
from ._values import ExecutionContext, LLMResponse, _new_response
from .abc import Completion, Message, ResponseCache
from .cache import MemoryResponseCache, request_key
from .circuit import CLOCK_STEP
from .content import ToolCall
from .records import _INT_LIMIT, LLMCallRecord, ModelTier, Outcome, _trusted_call_record

if TYPE_CHECKING:
    from ._executor import EmpathyLLMExecutor

__all__ = [
    "LEASE_SECONDS",
    "RENEW_MOST",
    "RETRY_INTERVAL",
    "STORE_TIMEOUT",
    "UNCACHED_STOPS",
    "Flight",
    "cache_key_of",
    "follow",
    "lead_or_wait",
    "lookup",
    "read_or_lead",
    "store",
]

logger = logging.getLogger("empathy_models.cache")

_VERSION = 1

STORE_TIMEOUT = 1.0
"""Seconds a read or a write of a cache store may take before it counts as failed."""

RETRY_INTERVAL = 5.0
"""Seconds calls skip a cache store after it failed, before it is tried again."""

LEASE_SECONDS = 30.0
"""The longest one take or renewal of a request's lease in a shared cache store lasts
(`lead_or_wait`; less when the run's deadline comes sooner): a crashed holder's lease
expires this long after its last renewal (`_Lease`)."""

RENEW_MOST = 600.0
"""Seconds from its take that a run with neither a deadline nor a per-attempt timeout
(``ExecutionContext.timeout=None``) keeps its lease renewed (and its rate-limit wait,
`_renewed_until`): a call nothing bounds does not hold the copies of other processes up
for ever."""

_POLL_FIRST = 0.01
_POLL_MOST = 0.25
"""Seconds between a waiting run's reads of the entry: doubling from the first to the most."""

UNCACHED_STOPS = frozenset({"content_filter", "refusal"})
"""Stop reasons of answers never cached: cut by OpenAI's (or Azure's) content filter, or
refused (OpenAI's ``refusal`` message, Anthropic's ``refusal`` stop reason)."""


def cache_key_of(
    ctx: ExecutionContext,
    task_type: str,
    messages: Sequence[Message],
    system: str | None,
    options: Mapping[str, Any],
) -> str | None:
    """
    The request's cache key, or None when the answer is not to be cached (its output is
    sampled: by the context's temperature, or by a ``temperature`` in ``extra_body``,
    which is the one sent).  The key covers the routing policy, the parameters, the
    messages whole (content blocks, tool calls and results included) and the run
    options (tools, tool choice, response format, stop, top_p, seed, extra_body) that
    are sent: no tools, no stop sequences and an empty ``extra_body`` key as the option
    not given.
    """
    temperature = ctx.temperature
    if not ctx.cache_sampled:
        sent: object = temperature
        extra = options.get("extra_body")
        if extra and "temperature" in extra:
            sent = extra["temperature"]  # what is sent: extra_body's replaces the context's
        if isinstance(sent, bool) or not isinstance(sent, int | float) or not sent <= 0:
            return None  # sampled (None: the provider's default temperature samples)
    parts: tuple[object, ...] = (
        _VERSION,
        ctx.model,
        ctx.workflow,
        ctx.stage,
        task_type,
        None if ctx.tier is None else ctx.tier.value,
        ctx.max_cost,
        ctx.max_latency_ms,
        ctx.min_success_rate,
        ctx.max_ttft_ms,
        ctx.on_no_match,
        ctx.max_tokens,
        None if temperature is None else float(temperature),
    )
    sent_options = _sent_options(options)
    if sent_options or any(
        m.tool_calls or m.tool_call_id is not None or not isinstance(m.content, str)
        for m in messages
    ):
        # more than text: the messages and options in one canonical JSON part
        whole = json.dumps(
            [_canonical(sent_options), _canonical(list(messages))],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=True,
        )
        return request_key((*parts, whole), (), system)
    return request_key(parts, messages, system)


def _sent_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """
    The run options that make a request differ from one without them: an option left
    unset (None), no tools, no stop sequences or an empty ``extra_body`` is sent as no
    option at all, so it keys the same request.
    """
    return {k: v for k, v in options.items() if v is not None and not _empty(k, v)}


def _empty(name: str, value: Any) -> bool:
    if name in ("tools", "stop"):
        return not value
    return name == "extra_body" and isinstance(value, Mapping) and not value


def _canonical(value: Any) -> Any:
    """``value`` as JSON-encodable data that names each attrs class (so no two differ alike)."""
    cls = type(value)
    if attrs.has(cls):
        return [
            cls.__name__,
            {f.name: _canonical(getattr(value, f.name)) for f in attrs.fields(cls)},
        ]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


async def lookup(
    executor: EmpathyLLMExecutor,
    key: str,
    ctx: ExecutionContext,
    task_type: str,
    messages: Sequence[Message],
    system: str | None,
    options: Mapping[str, Any],
    start: float,
    stored: bytes | None = None,
) -> LLMResponse | None:
    """
    The cached answer for ``key`` as an `LLMResponse` (recorded as a hit), or None (a
    miss, or no answer from the store within its time: see the module docstring).
    An answer stored ``ctx.cache_ttl`` seconds ago or longer (by the executor's wall
    clock) is a miss, however long the run that stored it had it kept; so is one
    stored more than `empathy_models.circuit.CLOCK_STEP` (a second) ahead of that
    clock (it stepped back since: the answer's age is not known).
    ``start``: when the run started (the executor's clock; its deadline counts from it);
    ``stored``: the value to judge instead of reading the cache (`read_or_lead`).
    """
    assert ctx.cache_ttl is not None
    entry = await _entry_for(executor, key, ctx, start, stored)
    if entry is None:
        return None
    content, model, provider, tier, input_tokens, output_tokens, saved, data = entry
    stored_at = data.get("at")
    age = None if stored_at is None else executor._wall_clock() - stored_at
    if age is None or not -CLOCK_STEP <= age < ctx.cache_ttl:
        # older than this run asks for, or of no known age: none recorded, or stored
        # more than `CLOCK_STEP` ahead of the clock (which stepped back since)
        return None
    tool_calls = _tool_calls(data.get("tool_calls"))
    if tool_calls is None:
        executor.cache_errors += 1
        logger.warning("response cache entry %s is unreadable; calling a model instead", key[:12])
        return None
    parsed, parse_error = (
        (None, None)
        if not options
        else structured_result(
            Completion(content=content, model=model, tool_calls=tool_calls), options
        )
    )
    ids = os.urandom(32).hex()
    request_id = ids[:32]
    latency_ms = max(0.0, (executor._clock() - start) * 1000.0)
    response = _new_response(
        content=content,
        model=model,
        provider=provider,
        tier=tier,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=0.0,
        latency_ms=latency_ms,
        attempts=(),
        fallback_chain=(model,),
        fallback_used=False,
        routing_decision=None,
        request_id=request_id,
        response_model=str(data.get("response_model") or model),
        price_version=str(data.get("price_version") or executor.registry.price_version),
        stop_reason=data.get("stop_reason"),
        tool_calls=tool_calls,
        parsed=parsed,
        parse_error=parse_error,
        ttft_ms=None,
    )
    telemetry = executor._telemetry
    if telemetry is not None:
        record = _hit_record(
            executor, ctx, task_type, response, saved, messages, system, _prompt_text, ids[32:]
        )
        try:
            await telemetry.record(record)
        except Exception:
            executor.telemetry_errors += 1
            logger.exception("telemetry write of a cache hit failed")
    return response


async def _entry_for(
    executor: EmpathyLLMExecutor,
    key: str,
    ctx: ExecutionContext,
    start: float,
    stored: bytes | None,
) -> _Entry | None:
    """The entry `lookup` answers from: ``stored`` (see `Flight`), else the cache's."""
    if stored is not None:
        return _entry_of(executor, key, stored)
    return await _read(executor, key, None if ctx.deadline is None else start + ctx.deadline)


class Flight:
    """
    A run of one executor asking a model for a request it missed in the cache, which
    later runs of the same request (its cache key) wait for instead of asking too
    (`_inflight.InFlight.flights`): they are answered with what it stored once it ends
    (``value``, the entry `store` kept, or wrote behind, or would have written to a
    cache store it skips while degraded: the runs that waited do not depend on the
    store).  ``deadline_at`` is the leading run's (the executor's clock; ``None``:
    none).  The leading run holds it as a context manager around its call: leaving it,
    however the call ended, wakes the runs that wait, stops the renewal of the
    request's lease in a shared store and lets go of it (``lease``, see `_Lease` and
    `lead_or_wait`) unless `store` took it over, to let go once the entry is written.
    """

    __slots__ = ("deadline_at", "ended", "flights", "key", "lease", "value")

    def __init__(self, flights: dict[str, Any], key: str, deadline_at: float | None) -> None:
        self.flights = flights
        self.key = key
        self.deadline_at = deadline_at
        self.ended = asyncio.Event()
        self.value: bytes | None = None  # the entry stored for ``key`` meanwhile
        self.lease: _Lease | None = None

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        if self.flights.get(self.key) is self:
            del self.flights[self.key]
        self.ended.set()
        lease, self.lease = self.lease, None
        if lease is not None:  # no answer stored: the runs of other processes ask now
            lease.stop()
            executor = lease.executor
            executor._fb.behind.background(
                _released(executor, self.key, lease.holder, lease.landed)
            )


async def follow(
    executor: EmpathyLLMExecutor, key: str, deadline_at: float | None
) -> tuple[Flight | None, Flight | None]:
    """
    For a run that missed ``key`` in the cache: ``(led, followed)``.

    When a run of this executor is asking a model for the same request already and will
    end no later than this run's deadline (its own deadline is not later, or this run
    has none), wait for it to end (``followed``: its `Flight`, whose ``value`` is the
    answer when that run kept one; an answer `store` leaves out, a failure or a
    cancellation leave none, and the caller asks a model itself).  A run whose
    deadline passes while it waits goes on as a run whose time ran out.  When there is
    no such run, this one leads: ``led`` is registered under ``key`` until the caller
    leaves it (see `Flight`).
    """
    flights = executor._inflight.flights
    flight = flights.get(key)
    if flight is None:
        flight = flights[key] = Flight(flights, key, deadline_at)
        return flight, None
    leader_at = flight.deadline_at
    if deadline_at is None:
        await flight.ended.wait()
    elif leader_at is None or leader_at > deadline_at:
        return None, None  # it may outlast this run: ask a model alongside it
    else:
        try:
            async with asyncio.timeout(max(deadline_at - executor._clock(), 0.0)):
                await flight.ended.wait()
        except TimeoutError:
            pass
    return None, flight


async def read_or_lead(
    executor: EmpathyLLMExecutor,
    ctx: ExecutionContext,
    task_type: str,
    messages: Sequence[Message],
    system: str | None,
    options: Mapping[str, Any],
    start: float,
    deadline_at: float | None,
) -> tuple[LLMResponse | None, str | None, Flight | None]:
    """
    What a run with ``ctx.cache_ttl`` finds in the cache before asking a model:
    ``(hit, key, flight)``.  ``hit``: the answer (recorded as a hit), read at once or,
    once the run of this executor asking a model for the same request has ended
    (`follow`), the one it stored; ``key``: the request's cache key, under which the
    run stores its answer (`store`), ``None`` for a request that is not cached;
    ``flight``: when this run leads, the `Flight` it holds around its call.
    """
    key = cache_key_of(ctx, task_type, messages, system, options)
    if key is None:
        return None, None, None
    hit, read = None, await _read_raw(executor, key, deadline_at)
    if read is not None:
        hit = await lookup(executor, key, ctx, task_type, messages, system, options, start, read)
        if hit is not None:
            return hit, key, None
    led, followed = await follow(executor, key, deadline_at)
    if followed is not None:
        # its answer as stored (the cache is read again when it kept none)
        hit = await lookup(
            executor, key, ctx, task_type, messages, system, options, start, followed.value
        )
    elif led is not None and _coalesces(executor, ctx):
        try:
            hit = await lead_or_wait(
                executor, led, ctx, task_type, messages, system, options, start, deadline_at, read
            )
        except BaseException:
            led.__exit__()  # cancelled while waiting: the runs waiting for it ask now
            raise
        if hit is not None:  # another process's run stored it: this one asked no model
            led.__exit__()
            return hit, key, None
    return hit, key, led


def _coalesces(executor: EmpathyLLMExecutor, ctx: ExecutionContext) -> bool:
    """Whether a run leading in this process takes its request's lease in the store."""
    cache = executor._cache
    return cache is not None and ctx.cache_coalesce and cache.leases and cache.shared


async def lead_or_wait(
    executor: EmpathyLLMExecutor,
    led: Flight,
    ctx: ExecutionContext,
    task_type: str,
    messages: Sequence[Message],
    system: str | None,
    options: Mapping[str, Any],
    start: float,
    deadline_at: float | None,
    read: bytes | None = None,
) -> LLMResponse | None:
    """
    For a run that leads ``led.key`` in this process, on a cache store shared by
    processes: take the request's lease in the store, reading the entry with it
    (`ResponseCache.acquire_lease_and_get`, for `LEASE_SECONDS` at most, no longer than
    the run's deadline), and return None: the run asks a model, ``led.lease`` renewed
    while it does (`_Lease`) and let go once its answer is written (or it failed).
    An entry the take read is returned instead (a hit; the lease, if taken, let go
    when the caller leaves ``led``): another process's run stored it since this run's
    read missed, and let go of the lease (or is letting go).
    While a run of another process holds the lease, wait instead: take it again, with
    the entry, at growing intervals (`_POLL_FIRST` doubling to `_POLL_MOST`) and return
    the entry (a hit) once stored; the run asks a model itself (None) when the holder
    let go with no answer (or its lease expired: this run then holds it) or another
    took it since, when the lease may outlast this run's deadline (as `follow`), or
    when the store does not answer (`_take`, as a read).  A value the run judged
    already (``read``, what its read found; each take's) is not judged again: the
    same bytes are no hit, and an unreadable entry is counted once.
    """
    holder = os.urandom(16).hex()
    waited_for = None
    delay = _POLL_FIRST
    while True:
        ttl = LEASE_SECONDS
        if deadline_at is not None:
            ttl = min(ttl, deadline_at - executor._clock())
            if ttl <= 0.0:
                return None  # its time ran out: it goes on as such
        if executor._cache_outage.skip():
            return None  # the store is skipped for now (its read was counted): no lease
        until = _renewed_until(executor, ctx, deadline_at)
        lease = led.lease = _Lease(executor, led.key, holder, until)  # let go when it lands
        held, value = await _take(executor, lease, ttl, deadline_at)
        if not isinstance(held, bool):
            led.lease = None  # another's
        if value is not None and value != read:
            hit = await lookup(
                executor, led.key, ctx, task_type, messages, system, options, start, value
            )
            if hit is not None:
                return hit
            read = value
        if isinstance(held, bool):  # this run's now (renewed), or no answer: it asks a model
            return None
        if waited_for is not None and held[0] != waited_for:
            return None  # let go with no answer and taken since: ask alongside
        waited_for, left = held
        if deadline_at is not None and executor._clock() + left > deadline_at:
            return None  # it may outlast this run: ask a model alongside it
        await asyncio.sleep(max(min(delay, left), _POLL_FIRST))
        delay = min(2 * delay, _POLL_MOST)


def _renewed_until(
    executor: EmpathyLLMExecutor, ctx: ExecutionContext, deadline_at: float | None
) -> float:
    """
    The latest a run's lease is renewed to (the executor's clock): its deadline; without
    one, its per-attempt timeout from now (the take), or `RENEW_MOST` when it has none
    either, plus the longest the run may wait for its rate-limit places before its call
    is sent (``rate_limit_wait``, as `Limiter.lease` counts it for budget holds): the
    copies that wait for it meanwhile would wait for the same places.
    """
    if deadline_at is not None:
        return deadline_at
    limiter = executor._limiter
    wait = 0.0 if limiter is None else limiter.max_wait
    return executor._clock() + (RENEW_MOST if ctx.timeout is None else ctx.timeout) + wait


async def _take(
    executor: EmpathyLLMExecutor, lease: _Lease, ttl: float, deadline_at: float | None
) -> tuple[tuple[str, float] | bool, bytes | None]:
    """
    `ResponseCache.acquire_lease_and_get` of ``lease`` bounded as a read (`_get`):
    ``(held, value)``, ``held`` the live lease another holds, True when taken, or False
    for no answer (failed or late, counted as a read's, and ``value`` None), when the
    run asks a model as it would without leases; ``value`` the entry read with it.
    ``lease.landed`` is set once the take has ended, also one its caller stopped
    waiting for (`_released` waits for it); a take that lands granting the lease, late
    or not, starts its renewal (`_Lease.landing`) unless the run let go of it meanwhile.
    """
    cache = executor._cache
    assert cache is not None
    outage = executor._cache_outage
    within = STORE_TIMEOUT
    if deadline_at is not None:
        within = min(within, max(deadline_at - executor._clock(), 0.0) / 2)
    take = _Read(executor, within)
    try:
        held, value = await executor._fb.behind.run(
            take.of(lease.landing(cache.acquire_lease_and_get(lease.key, lease.holder, ttl), ttl)),
            within,
            carried=False,
            late=take.late,
        )
    except Expired:
        take.late()
    except Exception as exc:
        executor.cache_errors += 1
        outage.failed(exc)
        logger.debug("response cache lease failed", exc_info=True)
    else:
        return True if held is None else held, value
    return False, None


class _Lease:
    """
    A run's lease on its request (``key``) in a shared cache store, held as ``holder``
    (`lead_or_wait`), and its renewal while the run's call goes on.

    ``landed`` is clear while a take or a renewal of it is out (a release waits for it
    to land first, `_released`).  Once taken (`landing`), the lease is renewed every
    third of `LEASE_SECONDS`, each time for `LEASE_SECONDS` at most and never past
    ``until`` (`_renewed_until`), so a call longer than a lease keeps it; no task runs
    until the first renewal falls due (a shorter call only cancels its timer).  The
    renewal stops when the run lets go of it (`stop`: its call ended, however), when
    it finds the lease another's (it lapsed, and was taken meanwhile), or at
    ``until``; a renewal that fails is counted as a failed read and tried again a
    third of a lease later (the lease may still be live), also while the cache is
    skipped (`Outage`): a renewal holds no call up, and a call long enough to renew
    its lease outlasts the skip, then stores its answer for the copies that wait.  A
    renewal is waited for at most `STORE_TIMEOUT`, as a read: one the store has not
    answered by then is counted so, goes on in the background (setting ``landed`` once
    it ends) and is not sent again while it is out; the lease, not renewed meanwhile,
    lapses at its last expiry, and the copies in other processes then ask a model
    alongside, as they do when its holder died.
    """

    __slots__ = ("executor", "expires", "holder", "key", "landed", "stopped", "timer", "until")

    def __init__(self, executor: EmpathyLLMExecutor, key: str, holder: str, until: float) -> None:
        self.executor = executor
        self.key = key
        self.holder = holder
        self.until = until  # the executor's clock: renewed no further
        self.landed = asyncio.Event()
        self.stopped = False
        self.timer: asyncio.TimerHandle | None = None
        self.expires = 0.0  # the executor's clock: when the last take or renewal lapses

    async def landing(
        self, take: Awaitable[tuple[tuple[str, float] | None, bytes | None]], ttl: float
    ) -> tuple[tuple[str, float] | None, bytes | None]:
        """``await take`` (for ``ttl``), then ``landed`` set however it ended; renewed if taken."""
        try:
            taken = await take
        finally:
            self.landed.set()
        if taken[0] is None and not self.stopped:
            self.expires = self.executor._clock() + ttl
            self._next(0.0)
        return taken

    def stop(self) -> None:
        """No renewal from now on (one already out still lands, and sets ``landed``)."""
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _next(self, spent: float) -> None:
        """The next renewal, a third of a lease after the last began (``spent`` ago)."""
        if self.stopped or self.until - self.expires < _RENEW_GAIN:
            return  # nothing left to renew: the lease lasts until ``until`` already
        delay = max(LEASE_SECONDS / 3 - spent, 0.0)
        self.timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self.timer = None
        if self.stopped:
            return
        if not self.landed.is_set():  # the last renewal is still out: not sent again
            self._next(0.0)
            return
        self.landed.clear()
        self.executor._fb.behind.background(self._renew())

    async def _renew(self) -> None:
        executor = self.executor
        loop = asyncio.get_running_loop()
        began, now = loop.time(), executor._clock()
        ttl = min(LEASE_SECONDS, self.until - now)
        try:
            if self.stopped or ttl <= 0.0:
                self.landed.set()
                return  # let go meanwhile, or at its end
            cache = executor._cache
            assert cache is not None
            renewal = self._landing(cache.acquire_lease(self.key, self.holder, ttl))
            held = await executor._fb.behind.run(renewal, STORE_TIMEOUT, carried=False)
            if held is not None:  # it lapsed and another took it: theirs now
                self.stopped = True
                return
            self.expires = now + ttl
        except Expired:  # it goes on in the background, and sets ``landed`` once it ends
            executor.cache_errors += 1
            executor._cache_outage.failed(TimeoutError(f"no answer within {STORE_TIMEOUT:g} s"))
            logger.debug("response cache lease renewal: no answer within %g s", STORE_TIMEOUT)
        except Exception as exc:
            executor.cache_errors += 1
            executor._cache_outage.failed(exc)
            logger.debug("response cache lease renewal failed", exc_info=True)
        finally:
            if ttl > 0.0:
                self._next(loop.time() - began)

    async def _landing(self, renewal: Awaitable[_T]) -> _T:
        """``await renewal``, then ``landed`` set however it ended."""
        try:
            return await renewal
        finally:
            self.landed.set()


_RENEW_GAIN = 1e-3
"""Seconds a renewal must add to a lease's time for it to be made."""


_T = TypeVar("_T")


async def _released(
    executor: EmpathyLLMExecutor, key: str, holder: str, landed: asyncio.Event | None = None
) -> None:
    """
    Let go of ``holder``'s lease on ``key``, at most `STORE_TIMEOUT`; failures logged.
    A take or renewal of the lease still out (``landed`` not set: its run stopped
    waiting for it, or ended while it was out) is waited for first, `LEASE_SECONDS` at
    most: a release that came before it would leave the lease it takes held until it
    expires.
    """
    cache = executor._cache
    assert cache is not None
    if landed is not None and not landed.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LEASE_SECONDS):
                await landed.wait()
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            await cache.release_lease(key, holder)
    except Exception:  # it expires all the same
        logger.debug("response cache lease release failed", exc_info=True)


async def _get(executor: EmpathyLLMExecutor, key: str, deadline_at: float | None) -> bytes | None:
    """
    The value stored under ``key``, or None: a miss, a read that failed or did not
    answer within `STORE_TIMEOUT` (counted in ``cache_errors``) or within half the time
    left of the run's deadline (counted only if the store takes longer than its time),
    or skipped while the cache is degraded (``cache_skipped``).
    """
    cache = executor._cache
    assert cache is not None
    if type(cache) is MemoryResponseCache:  # in-process: never held up
        return await cache.get(key)
    written = executor._cache_pending.get(key)
    if written is not None and written[0] == cache._generation:
        return written[1]  # written behind, in flight: this process reads its writes
    outage = executor._cache_outage
    if outage.skip():
        executor.cache_skipped += 1
        return None
    within = STORE_TIMEOUT
    if deadline_at is not None:
        within = min(within, max(deadline_at - executor._clock(), 0.0) / 2)
    read = _Read(executor, within)
    try:
        # a caller that stops waiting (its share of the deadline ran out, or it was
        # cancelled) leaves the read to go on in the background: it counts as a
        # failure only if it has not ended within the store's own time (`_Read.late`)
        return await executor._fb.behind.run(
            read.of(cache.get(key)), within, carried=False, late=read.late
        )
    except Expired:
        read.late()
    except Exception as exc:
        executor.cache_errors += 1
        outage.failed(exc)
        logger.debug("response cache read failed", exc_info=True)
    return None


class _Read:
    """
    One read of a cache store, judged on the store's time (`STORE_TIMEOUT` from when
    the caller began to wait), not on how long its caller waited: a run whose deadline
    left it less time misses, and the store is not degraded by a read that answers in
    its time.
    """

    __slots__ = ("ended", "executor", "started", "waited")

    def __init__(self, executor: EmpathyLLMExecutor, waited: float) -> None:
        self.executor = executor
        self.waited = waited
        self.started = asyncio.get_running_loop().time()
        self.ended = False

    async def of(self, operation: Awaitable[_T]) -> _T:
        try:
            return await operation
        finally:
            self.ended = True

    def late(self) -> None:
        """Its caller stopped waiting with the read still out: judged at the store's time."""
        left = self.started + STORE_TIMEOUT - asyncio.get_running_loop().time()
        if self.waited < STORE_TIMEOUT and left > 0.0:
            asyncio.get_running_loop().call_later(left, self._judge)
        else:
            self._judge()

    def _judge(self) -> None:
        if not self.ended:
            self.executor.cache_errors += 1
            self.executor._cache_outage.failed(
                TimeoutError(f"no answer within {STORE_TIMEOUT:.3g} s")
            )


async def _read(
    executor: EmpathyLLMExecutor, key: str, deadline_at: float | None = None
) -> _Entry | None:
    """
    The decoded entry stored under ``key``, or None (a miss, or a failed, late or
    unreadable read, counted in ``executor.cache_errors``; see `_get`).

    Args:
        executor: The executor whose cache is read (it has one).
        key: The request's cache key.
        deadline_at: When the run's deadline runs out (the executor's clock), if any.

    Returns:
        The entry's fields, decoded once per stored value (see `_Memo`), or None.
    """
    raw = await _read_raw(executor, key, deadline_at)
    return None if raw is None else _entry_of(executor, key, raw)


async def _read_raw(
    executor: EmpathyLLMExecutor, key: str, deadline_at: float | None
) -> bytes | None:
    """The value stored under ``key``, or None (see `_get`; an in-process cache's failure too)."""
    try:
        return await _get(executor, key, deadline_at)
    except Exception:  # an in-process cache's
        executor.cache_errors += 1
        logger.exception("response cache read failed; calling a model instead")
        return None


def _entry_of(executor: EmpathyLLMExecutor, key: str, raw: bytes) -> _Entry | None:
    """The entry ``raw`` holds, decoded once per stored value (see `_Memo`), or None."""
    cache = executor._cache
    assert cache is not None
    memo: _Memo | None = cache._decoded
    entry = None if memo is None else memo.entries.get(raw)
    if entry is None:
        entry = _decode(raw)
        if entry is None:
            executor.cache_errors += 1
            logger.warning(
                "response cache entry %s is unreadable; calling a model instead", key[:12]
            )
            return None
        if memo is None:
            memo = cache._decoded = _Memo()
        memo.add(raw, entry)
    return entry


def _hit_record(
    executor: EmpathyLLMExecutor,
    ctx: ExecutionContext,
    task_type: str,
    response: LLMResponse,
    saved: float,
    messages: Sequence[Message],
    system: str | None,
    prompt_text: Any,
    call_id: str,
) -> LLMCallRecord:
    """The record of a hit: outcome ``cache_hit``, cost 0, the cost saved in metadata."""
    metadata = MappingProxyType({**ctx.metadata, "cache_cost_saved_usd": saved})
    return _trusted_call_record(
        provider=response.provider,
        model=response.model,
        outcome=Outcome.CACHE_HIT,
        call_id=call_id,
        request_id=response.request_id,
        timestamp=datetime.fromtimestamp(executor._wall_clock(), UTC),
        workflow=ctx.workflow,
        stage=ctx.stage,
        task_type=task_type,
        tier=response.tier,
        input_tokens=response.input_tokens,
        output_tokens=response.output_tokens,
        cost_usd=0.0,
        actual_cost_usd=None,
        price_version=response.price_version,
        latency_ms=response.latency_ms,
        ttft_ms=None,
        error_type=None,
        error_message=None,
        status_code=None,
        attempt=1,
        fallback_used=False,
        fallback_chain=(response.model,),
        original_provider=response.provider,
        original_model=response.model,
        exploration=False,
        routing_propensity=None,
        breaker_generation=None,
        circuit_state=None,
        user_id=ctx.user_id,
        session_id=ctx.session_id,
        metadata=metadata,
        prompt_text=prompt_text(messages, system) if ctx.record_text else None,
        response_text=response.content if ctx.record_text else None,
    )


_Entry = tuple[str, str, str, ModelTier, int, int, float, dict[str, Any]]

_MEMO_MAX = 1024
"""The most entries one cache's memo holds."""
_MEMO_BYTES = 8 * 2**20
"""The most bytes one cache's memo holds (counted as twice the stored bytes of each
entry, for the bytes and the decoded text): beyond, it starts again empty."""


class _Memo:
    """
    Entries decoded lately from one cache, by their stored bytes (a memory cache hands
    back the very object, others equal bytes), so a hit decodes no JSON.  Held by the
    cache (`ResponseCache._decoded`), which drops it on `clear` and `aclose`; the
    executor drops it on its own `aclose`.
    """

    __slots__ = ("entries", "size")

    def __init__(self) -> None:
        self.entries: dict[bytes, _Entry] = {}
        self.size = 0

    def add(self, raw: bytes, entry: _Entry) -> None:
        cost = 2 * len(raw)
        if cost > _MEMO_BYTES:
            return
        if self.size + cost > _MEMO_BYTES or len(self.entries) >= _MEMO_MAX:
            self.entries.clear()
            self.size = 0
        self.entries[raw] = entry
        self.size += cost


def _decode(raw: bytes) -> _Entry | None:
    """The fields of a well-formed entry (see `_well_formed`), or None."""
    try:
        data = json.loads(raw)
        if not _well_formed(data):
            return None
        tier = ModelTier(data["tier"])
    except (ValueError, TypeError, RecursionError):  # not JSON (nor UTF-8), or not a tier
        return None
    return (
        data["content"],
        data["model"],
        data["provider"],
        tier,
        data["input_tokens"],
        data["output_tokens"],
        float(data["cost_usd"]),
        data,
    )


def _well_formed(data: object) -> TypeGuard[dict[str, Any]]:
    """
    True for an entry of this version as `store` writes it: an object whose texts are
    strings, token counts whole numbers a record can hold and cost a number a float
    holds, none negative or infinite, and its time of storing (``at``, epoch seconds)
    a finite number (a garbled one, `[]`, ``"input_tokens": 1e400`` or a cost of 400
    digits, is a miss).
    """
    if not isinstance(data, dict) or data.get("v") != _VERSION:
        return False
    texts = (data.get("content"), data.get("model"), data.get("provider"), data.get("tier"))
    counts = (data.get("input_tokens"), data.get("output_tokens"))
    cost = data.get("cost_usd")
    optional = (data.get("response_model"), data.get("price_version"), data.get("stop_reason"))
    at = data.get("at")
    return (
        all(isinstance(t, str) for t in texts)
        and all(type(n) is int and 0 <= n < _INT_LIMIT for n in counts)
        and isinstance(cost, int | float)
        and not isinstance(cost, bool)
        and 0 <= cost <= sys.float_info.max  # an integer a float cannot hold is none
        and all(t is None or isinstance(t, str) for t in optional)
        and (
            at is None
            or (
                isinstance(at, int | float)
                and not isinstance(at, bool)
                and -sys.float_info.max <= at <= sys.float_info.max
            )
        )
    )


def _tool_calls(raw: object) -> tuple[ToolCall, ...] | None:
    """The stored tool calls (none in an entry without them); None when unreadable."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        return None
    try:
        return tuple(ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"]) for c in raw)
    except Exception:  # a malformed entry, whatever it holds
        return None


async def store(
    executor: EmpathyLLMExecutor, key: str, response: LLMResponse, ctx: ExecutionContext
) -> None:
    """
    Keep ``response`` under ``key`` for ``ctx.cache_ttl`` seconds, with the time it was
    stored (``at``, the executor's wall clock), by which `lookup` tells its age: written
    behind (see the module docstring; an in-process cache at once).  Failures are
    logged, counted.  An answer a provider's safety system stopped (`UNCACHED_STOPS`),
    or one whose text its ``response_format`` could not parse (``parse_error``, with no
    tool called), is not kept: the same request asks the model again.  A kept one goes
    to the runs waiting for ``key``'s answer too (`Flight`), whatever the store does.
    """
    cache = executor._cache
    assert cache is not None and ctx.cache_ttl is not None
    if response.stop_reason in UNCACHED_STOPS or (
        response.parse_error is not None and not response.tool_calls
    ):
        return
    payload = {
        "v": _VERSION,
        "at": executor._wall_clock(),
        "content": response.content,
        "model": response.model,
        "provider": response.provider,
        "tier": response.tier.value,
        "input_tokens": response.input_tokens,
        "output_tokens": response.output_tokens,
        "cost_usd": response.cost_usd,
        "response_model": response.response_model,
        "price_version": response.price_version,
        "stop_reason": response.stop_reason,
        "tool_calls": [
            {"id": c.id, "name": c.name, "arguments": dict(c.arguments)}
            for c in response.tool_calls
        ],
    }
    value = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )
    flight = executor._inflight.flights.get(key)
    if flight is not None:  # the runs waiting for this request's answer get it as stored
        flight.value = value
    if type(cache) is not MemoryResponseCache:
        if executor._cache_outage.skip():
            executor.cache_skipped += 1
        else:
            generation = cache._generation
            executor._cache_pending[key] = (generation, value)
            lease = None if flight is None else flight.lease
            if lease is not None:  # let go once the entry is written (other processes read it)
                flight.lease = None  # type: ignore[union-attr]
                lease.stop()
            executor._fb.behind.background(
                _write(executor, key, value, ctx.cache_ttl, generation, lease)
            )
        return
    try:
        await cache.set(key, value, ctx.cache_ttl)
    except Exception:
        executor.cache_errors += 1
        logger.exception("response cache write failed (the answer is returned all the same)")


async def _write(
    executor: EmpathyLLMExecutor,
    key: str,
    value: bytes,
    ttl: float,
    generation: int,
    lease: _Lease | None = None,
) -> None:
    """
    A write behind: at most `STORE_TIMEOUT` seconds (it lands later, if ever); until
    then this process's reads of ``key`` get ``value`` (``_cache_pending``).  Not made
    when the cache was cleared since the answer came, and undone when it was cleared
    while the write was under way (`ResponseCache._let_go`).  The run's ``lease`` on
    ``key`` (its renewal stopped) is let go once the write ended, however.
    """
    cache = executor._cache
    assert cache is not None
    try:
        if cache._generation == generation:
            await executor._fb.behind.run(
                _set_in(executor, key, value, ttl, generation, lease), STORE_TIMEOUT
            )
        elif lease is not None:
            await _released(executor, key, lease.holder, lease.landed)
    except Expired:
        executor.cache_errors += 1
        executor._cache_outage.failed(TimeoutError(f"no answer within {STORE_TIMEOUT:g} s"))
    except Exception as exc:
        executor.cache_errors += 1
        executor._cache_outage.failed(exc)
        logger.debug("response cache write failed", exc_info=True)
    finally:
        pending = executor._cache_pending.get(key)
        if pending is not None and pending[1] is value:
            del executor._cache_pending[key]


async def _set_in(
    executor: EmpathyLLMExecutor,
    key: str,
    value: bytes,
    ttl: float,
    generation: int,
    lease: _Lease | None,
) -> None:
    cache: ResponseCache | None = executor._cache
    assert cache is not None
    if lease is None:
        await cache.set(key, value, ttl)
    elif lease.landed.is_set():  # let go once the entry is there: a waiting process finds it
        await cache.set_and_release(key, value, ttl, lease.holder)
    else:  # a take or renewal is out: the entry first, the lease let go once that landed
        try:
            await cache.set(key, value, ttl)
        finally:
            executor._fb.behind.background(_released(executor, key, lease.holder, lease.landed))
    # a clear that came while the write was under way must not be undone by it
    if cache._generation != generation:
        await cache.delete(key)
