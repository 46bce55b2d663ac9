"""
The Redis server dies mid-run and comes back: calls never fail, the breaker says so.

The test starts its own ``redis-server`` (no persistence) on a free port, runs calls
through ``CircuitBreaker(store="redis://127.0.0.1:<port>/0")`` from three tasks, kills
the server with SIGKILL partway, restarts it on the same port, and keeps calling.  The
breaker's clock is injected (it times the local view and the store retries), so no
step waits for time to pass; the only waits are for the server process to accept
connections, each bounded.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aioredis
from empathy_models_redis import RedisCircuitStateStore, RedisQuotaStore
from redis.exceptions import RedisError

from empathy_models.breaker import BreakerEvent, BreakerEventKind, CircuitBreaker
from empathy_models.circuit import BreakerPolicy, as_of
from empathy_models.exceptions import CircuitOpenError, StateStoreError
from empathy_models.records import CircuitState

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A throwaway ``redis-server`` on ``port``: started, killed, restarted by the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start the server process (it listens a moment later; see `start`)."""
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self) -> None:
        """Start the server and return once it answers PING (bounded wait)."""
        self.spawn()
        assert self.proc is not None
        client = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(400):  # at most ~20 s for the process to listen
                try:
                    if await client.ping():
                        return
                except (RedisError, OSError):
                    pass
                if self.proc.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.proc.returncode}")
                await anyio.sleep(0.05)
            pytest.fail(f"redis-server on port {self.port} did not answer PING")
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if not shutil.which(REDIS_SERVER):
        pytest.skip(f"{REDIS_SERVER} is not installed; the fault test starts its own server")
    server = PrivateRedis(_free_port())
    yield server
    server.kill()


async def run_through_outage(
    server: PrivateRedis, breaker: CircuitBreaker, clock: list[float]
) -> dict[str, int]:
    """
    Three tasks call through ``breaker`` until the chaos task is done: it kills the
    server after 150 calls, restarts it after 200 more, and stops the callers 250
    calls after the restart.  Returns the call counts and where the phases fell.
    """
    calls = {"ok": 0, "failed": 0}
    marks: dict[str, int] = {}
    done = anyio.Event()
    waiting: list[tuple[int, anyio.Event]] = []

    async def caller() -> None:
        while not done.is_set():
            try:
                async with breaker.guard("provider-a"):
                    await anyio.lowlevel.checkpoint()  # the "provider call"
                calls["ok"] += 1
            except Exception:
                calls["failed"] += 1
                raise
            for target, reached in waiting:
                if calls["ok"] >= target:
                    reached.set()
            clock[0] += 0.05  # every call moves the breaker's clock a little
            await anyio.lowlevel.checkpoint()

    async def wait_for_calls(n: int) -> None:
        reached = anyio.Event()
        waiting.append((n, reached))
        await reached.wait()

    async def chaos() -> None:
        await wait_for_calls(150)
        server.kill()
        marks["killed"] = calls["ok"]
        await wait_for_calls(marks["killed"] + 200)
        marks["degraded_at_restart"] = int(breaker.degraded)
        await server.start()
        marks["restarted"] = calls["ok"]
        await wait_for_calls(marks["restarted"] + 250)
        done.set()

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(caller)
            tg.start_soon(chaos)
    return {**calls, **marks}


def new_breaker(url: str, clock: list[float], events: list[BreakerEvent]) -> CircuitBreaker:
    return CircuitBreaker(
        store=url,
        policy=BreakerPolicy(consecutive_failures=3),
        clock=lambda: clock[0],
        local_view_ttl=0.5,
        store_retry_interval=1.0,
        listeners=[events.append],
    )


async def test_calls_go_on_while_redis_is_killed_and_restarted(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    await private_redis.start()
    clock = [1_800_000_000.0]
    events: list[BreakerEvent] = []
    breaker = new_breaker(private_redis.url, clock, events)
    with caplog.at_level(logging.WARNING, logger="empathy_models.breaker"):
        async with breaker:
            result = await run_through_outage(private_redis, breaker, clock)

            # not one call failed, before, during or after the outage
            assert result["failed"] == 0
            assert result["degraded_at_restart"] == 1, "the breaker did not notice the outage"
            assert result["ok"] >= result["restarted"] + 250

            # one outage: one store_degraded, then one store_recovered
            store_events = [e for e in events if e.kind is not BreakerEventKind.STATE_CHANGED]
            assert [e.kind for e in store_events] == [
                BreakerEventKind.STORE_DEGRADED,
                BreakerEventKind.STORE_RECOVERED,
            ]
            assert not breaker.degraded
            error = store_events[0].error
            assert error is not None and "ConnectionError" in error
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert any("failed" in r.getMessage() for r in warnings), warnings
            assert any("recovered" in r.getMessage() for r in warnings), warnings

            # converged: another "process" opens the circuit on the restarted server;
            # once this breaker's local view is stale it adopts that state and rejects
            other = RedisCircuitStateStore(private_redis.url)
            async with other:
                before = await other.snapshot("provider-a")
                forced = await other.force(
                    "provider-a", CircuitState.FORCED_OPEN, reason="ops: provider outage"
                )
                assert forced.generation == before.generation + 1
                # a second passes: on the breaker's clock, and long enough in real time
                # for the store's announcement of the force to arrive
                clock[0] += 1.0
                await anyio.sleep(0.1)
                with pytest.raises(CircuitOpenError) as info:
                    async with breaker.guard("provider-a"):
                        pass
                assert info.value.state is CircuitState.FORCED_OPEN
                # as of the store's clock (the breaker's is 20 million seconds ahead of
                # it: the failures counted in the store's window are still shown)
                status = await breaker.get_status("provider-a")
                stored = await other.snapshot("provider-a")
                assert status == as_of(stored, breaker.policy, await other.now())
                assert status.window_calls > 0


async def test_a_server_turned_replica_is_left_for_a_new_connection(
    private_redis: PrivateRedis,
) -> None:
    # after a failover the old primary answers every write with READONLY; the stores
    # kept the connection to it (the breaker's kept it idle for the next run), so every
    # later call went on failing there instead of connecting again (to wherever the
    # name, a Sentinel or a DNS failover, now points)
    await private_redis.start()
    admin = aioredis.Redis.from_url(private_redis.url)
    await admin.replicaof("127.0.0.1", "1")  # a replica of nothing: read-only
    try:
        async with (
            RedisCircuitStateStore(private_redis.url) as store,
            RedisQuotaStore(private_redis.url) as quota,
        ):
            with pytest.raises(StateStoreError, match=r"ReadOnlyError: You can.t write"):
                await store.admit("k", BreakerPolicy())
            with pytest.raises(StateStoreError, match=r"ReadOnlyError: You can.t write"):
                await quota.acquire("r", cost=1.0, interval=1.0, burst=1.0, max_wait=0.0)
            # the server's clients: this one only (each store's connection was closed;
            # the server drops a closed one from its list when it reads the close)
            await _until_only_this_client(admin)
            await admin.replicaof("NO", "ONE")  # promoted: both work again
            assert (await store.admit("k", BreakerPolicy())).admitted
            assert (
                await quota.acquire("r", cost=1.0, interval=1.0, burst=1.0, max_wait=0.0)
            ).granted
    finally:
        await admin.aclose()


async def _until_only_this_client(admin: aioredis.Redis) -> None:
    """Until ``admin``'s connection is the server's only client (10 s at most)."""
    left: list[str] = []
    with anyio.move_on_after(10):
        while True:
            left = [c["cmd"] for c in await admin.client_list()]
            if left == ["client|list"]:
                return
            await anyio.sleep(0.02)
    pytest.fail(f"other clients stayed connected: {left}")
