"""
Redis stalls past the socket timeout: a script Redis received runs once, never twice,
and an admission nobody waits for any more strands no probe lease.

Between the stores and the test Redis sits a small TCP proxy that forwards every
command at once but, while the test says so, holds Redis's replies back.  So a script
runs on the server while its caller waits past ``socket_timeout`` for the answer, as
in a stall of the server, a paused VM or a congested link.  The proxy lets the replies
through once the call has ended or the client has reconnected (what a retry does
first), so a store that sent the script again would have it run a second time.  Told
to hold the commands instead, it delivers them once released, after their caller gave
up and closed its connection: Redis runs the script late, as after a stall of the
server or of the link.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
import redis.asyncio as aioredis
from empathy_models_redis import RedisCircuitStateStore, RedisQuotaStore
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from empathy_models.circuit import BreakerPolicy
from empathy_models.exceptions import StateStoreError
from empathy_models.records import CircuitState, Outcome, OutcomeReport

POLICY = BreakerPolicy(consecutive_failures=5)


@pytest.fixture(autouse=True)
def _server_steady(redis_server_steady: None) -> None:
    """
    A command held here reaches Redis with nobody waiting: a script flushed meanwhile
    is not loaded again, and a paused server drops it as its connection closes.
    """


WINDOW = (time.time() - 60.0, time.time() + 3600.0)


class StallingProxy:
    """A TCP proxy to one Redis that holds the server's replies (or, with ``hold=
    "commands"``, the clients' commands) while `stalled` is set."""

    def __init__(self, host: str, port: int, *, hold: str = "replies") -> None:
        self.upstream = (host, port)
        self.hold = hold
        self.stalled = False
        self.released = asyncio.Event()
        self.connections = 0
        self.reconnected = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.log: list[str] = []
        """What the proxy did, for a failure's message."""

    def _note(self, what: str) -> None:
        self.log.append(f"{time.monotonic():.3f} {what}")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stall(self) -> int:
        """Hold replies from now on; the number of connections made so far."""
        self._note("stalled")
        self.stalled = True
        self.released.clear()
        self.reconnected.clear()
        return self.connections

    def release(self) -> None:
        self._note("released")
        self.stalled = False
        self.released.set()

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._note(f"connection {number} opened (stalled: {self.stalled})")
        if self.stalled:
            self.reconnected.set()
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        pumps = {
            asyncio.create_task(
                self._pump(reader, up_writer, hold=self.hold == "commands", name=f"{number}>")
            ),
            asyncio.create_task(
                self._pump(up_reader, writer, hold=self.hold == "replies", name=f"{number}<")
            ),
        }
        self._tasks |= pumps
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            self._note(f"connection {number} closing")
        finally:
            for pump in pumps:
                pump.cancel()
            self._tasks -= pumps
            for w in (writer, up_writer):
                w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, hold: bool, name: str
    ) -> None:
        try:
            while data := await reader.read(65536):
                if hold and self.stalled:
                    self._note(f"{name} holds {data[:60]!r}")
                    await self.released.wait()
                writer.write(data)
                await writer.drain()
                self._note(f"{name} passed {data[:60]!r}")
            self._note(f"{name} read the end")
        except BaseException as exc:  # a closed connection ends the pump quietly
            self._note(f"{name} {exc!r}")
            if not isinstance(exc, OSError):
                raise


async def _started(redis_url: str, hold: str) -> StallingProxy:
    parts = urlsplit(redis_url)
    if parts.scheme != "redis":
        pytest.skip("the stall proxy forwards plain redis:// connections only")
    stalling = StallingProxy(parts.hostname or "127.0.0.1", parts.port or 6379, hold=hold)
    await stalling.start()
    return stalling


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[StallingProxy]:
    stalling = await _started(redis_url, "replies")
    yield stalling
    await stalling.close()


@pytest.fixture
async def command_proxy(redis_url: str) -> AsyncIterator[StallingProxy]:
    """A proxy that holds the commands (they reach Redis once released)."""
    stalling = await _started(redis_url, "commands")
    yield stalling
    await stalling.close()


def _through(proxy: StallingProxy, redis_store_url: str) -> str:
    """The test's store URL through ``proxy``, with a short socket timeout."""
    parts = urlsplit(redis_store_url)
    netloc = parts.netloc.rpartition("@")[0]
    netloc = (netloc + "@" if netloc else "") + f"127.0.0.1:{proxy.port}"
    query = parts.query + "&socket_timeout=0.5"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@pytest.fixture
def proxied_url(proxy: StallingProxy, redis_store_url: str) -> str:
    """The test's store URL through the proxy, with a short socket timeout."""
    return _through(proxy, redis_store_url)


async def during_a_stall(proxy: StallingProxy, call: Callable[[], Awaitable[object]]) -> None:
    """
    Run ``call`` while Redis's replies are held, letting them through once it ended (a
    timeout) or the client connected again; a `StateStoreError` is its expected end.
    """
    before = proxy.stall()
    task = asyncio.ensure_future(call())
    reconnect = asyncio.ensure_future(proxy.reconnected.wait())
    await asyncio.wait({task, reconnect}, return_when=asyncio.FIRST_COMPLETED)
    reconnect.cancel()
    proxy.release()
    with suppress(StateStoreError):
        await task
    assert proxy.connections >= before


@pytest.fixture(params=["url", "caller's client", "single connection"])
async def breaker_store(
    request: pytest.FixtureRequest, proxied_url: str, redis_prefix: str
) -> AsyncIterator[RedisCircuitStateStore]:
    """A breaker store through the proxy: from the URL, or over a client of the caller's."""
    if request.param == "url":
        async with RedisCircuitStateStore(proxied_url) as store:
            yield store
        return
    base = proxied_url.partition("?")[0] + "?socket_timeout=0.5"
    client = aioredis.Redis.from_url(  # which retries a command that timed out
        base,
        single_connection_client=request.param == "single connection",
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
    )
    try:
        async with RedisCircuitStateStore(client, prefix=redis_prefix + "cb:") as store:
            yield store
    finally:
        await client.aclose()


async def test_a_failure_reported_during_a_stall_counts_once(
    proxy: StallingProxy, breaker_store: RedisCircuitStateStore, redis_store_url: str
) -> None:
    admission = await breaker_store.admit("m", POLICY)
    assert admission.ticket is not None
    report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE, error="503")
    await during_a_stall(proxy, lambda: breaker_store.record("m", POLICY, [report]))
    async with RedisCircuitStateStore(redis_store_url) as direct:
        assert (await direct.snapshot("m")).consecutive_failures == 1


async def test_the_only_probe_admitted_during_a_stall_takes_one_lease(
    proxy: StallingProxy, breaker_store: RedisCircuitStateStore, redis_store_url: str
) -> None:
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=0.01, half_open_probes=1)
    admission = await breaker_store.admit("p", policy)
    assert admission.ticket is not None
    report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE, error="503")
    await breaker_store.record("p", policy, [report])
    await asyncio.sleep(0.05)  # the open period (10 ms by Redis's clock) runs out
    leases: list[str | None] = []

    async def probe() -> None:
        probe = await breaker_store.admit("p", policy)
        leases.append(None if probe.ticket is None else probe.ticket.lease_id)

    await during_a_stall(proxy, probe)
    async with RedisCircuitStateStore(redis_store_url) as direct:
        held = (await direct.snapshot("p")).leases
    # one run of the script took the slot; a second one would have been refused
    assert len(held) == 1
    assert leases in ([], [held[0][0]])


PROBING = BreakerPolicy(
    consecutive_failures=1, recovery_seconds=0.01, half_open_probes=1, probe_lease_seconds=60.0
)
"""One probe at a time, whose lease a stranded admission would hold for a minute."""


async def _opened(store: RedisCircuitStateStore, key: str) -> None:
    """Trip ``key`` (open for 10 ms) and wait until a probe may be admitted."""
    admission = await store.admit(key, PROBING)
    assert admission.ticket is not None
    report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE, error="503")
    assert (await store.record(key, PROBING, [report])).state is CircuitState.OPEN
    await asyncio.sleep(0.05)  # the open period (10 ms by Redis's clock) runs out


async def test_an_admission_that_reaches_redis_after_its_caller_gave_up_takes_no_probe(
    command_proxy: StallingProxy, redis_store_url: str
) -> None:
    async with (
        RedisCircuitStateStore(_through(command_proxy, redis_store_url)) as late,
        RedisCircuitStateStore(redis_store_url) as other,
    ):
        await late.admit("p", PROBING)  # connected; the key is CLOSED
        await _opened(other, "p")
        command_proxy.stall()
        with pytest.raises(StateStoreError, match=r"[Tt]imeout"):
            await late.admit("p", PROBING)  # written, held: the store stops waiting
        command_proxy.release()  # Redis runs that admission now, with nobody waiting
        try:
            with anyio.fail_after(10):
                while (await other.snapshot("p")).state is not CircuitState.HALF_OPEN:  # noqa: ASYNC110  # Redis's state
                    await asyncio.sleep(0.01)
        except TimeoutError:
            state = await other.snapshot("p")
            raise AssertionError(
                f"still {state.state} after 10 s; the proxy: " + "; ".join(command_proxy.log)
            ) from None
        # it opened the half-open period but took no lease: another worker probes
        probe = await other.admit("p", PROBING)
        assert probe.admitted
        assert probe.ticket is not None and probe.ticket.lease_id is not None


@pytest.mark.parametrize("gave_up", ["socket timeout", "cancelled"])
async def test_a_probe_lease_whose_answer_was_lost_comes_back_long_before_it_expires(
    proxy: StallingProxy, proxied_url: str, redis_store_url: str, gave_up: str
) -> None:
    async with (
        RedisCircuitStateStore(proxied_url) as lost,
        RedisCircuitStateStore(redis_store_url) as other,
    ):
        await lost.admit("p", PROBING)  # connected; the key is CLOSED
        await _opened(other, "p")

        async def probe() -> None:
            if gave_up == "cancelled":  # as a breaker's store_timeout cancels it
                with anyio.move_on_after(0.1):
                    await lost.admit("p", PROBING)
            else:
                await lost.admit("p", PROBING)

        await during_a_stall(proxy, probe)
        # the script ran at once and took the only lease; its answer never arrived
        assert len((await other.snapshot("p")).leases) == 1
        with anyio.fail_after(10):  # the lease is for 60 s
            while not (admission := await other.admit("p", PROBING)).admitted:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert admission.ticket is not None and admission.ticket.lease_id is not None
        assert [lease for lease, _ in (await other.snapshot("p")).leases] == [
            admission.ticket.lease_id
        ]


@pytest.fixture
async def quota_store(proxied_url: str) -> AsyncIterator[RedisQuotaStore]:
    async with RedisQuotaStore(proxied_url) as store:
        yield store


async def test_a_reservation_made_during_a_stall_is_held_once(
    proxy: StallingProxy, quota_store: RedisQuotaStore, redis_store_url: str
) -> None:
    start, end = WINDOW
    await quota_store.reserve("k", window_start=start, window_end=end, amount=1, limit=10**9)
    await during_a_stall(
        proxy,
        lambda: quota_store.reserve(
            "k", window_start=start, window_end=end, amount=100, limit=10**9
        ),
    )
    async with RedisQuotaStore(redis_store_url) as direct:
        usage = await direct.usage("k", window_start=start, window_end=end)
    assert usage.held == 101
    assert usage.reserved == 101


async def test_a_settlement_made_during_a_stall_is_spent_once(
    proxy: StallingProxy, quota_store: RedisQuotaStore, redis_store_url: str
) -> None:
    start, end = WINDOW
    await quota_store.reserve("k", window_start=start, window_end=end, amount=100, limit=10**9)
    await during_a_stall(
        proxy,
        lambda: quota_store.settle("k", window_start=start, window_end=end, held=100, actual=40),
    )
    async with RedisQuotaStore(redis_store_url) as direct:
        usage = await direct.usage("k", window_start=start, window_end=end)
    assert usage.spent == 40
    assert usage.overrun == 0


async def test_a_place_taken_during_a_stall_is_taken_once(
    proxy: StallingProxy, quota_store: RedisQuotaStore, redis_store_url: str
) -> None:
    await quota_store.acquire("other", cost=1, interval=1.0, burst=1, max_wait=0)  # connected
    await during_a_stall(
        proxy, lambda: quota_store.acquire("r", cost=1, interval=600.0, burst=1, max_wait=3600.0)
    )
    # one place of ten minutes was taken: the next caller waits for it, not for two
    async with RedisQuotaStore(redis_store_url) as direct:
        grant = await direct.acquire("r", cost=1, interval=600.0, burst=1, max_wait=3600.0)
    assert grant.granted
    assert 0 < grant.wait <= 600.0
