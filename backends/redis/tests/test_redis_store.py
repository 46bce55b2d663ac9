"""RedisCircuitStateStore specifics: keys, TTLs, server time, options, errors."""

from __future__ import annotations

import asyncio
import re
import shlex
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.to_thread
import pytest
import redis.asyncio as aioredis
from empathy_models_redis import (
    DEFAULT_KEY_TTL,
    DEFAULT_PREFIX,
    RedisCircuitStateStore,
    RedisQuotaStore,
    RedisResponseCache,
    breaker_script,
    quota_script,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from empathy_models import CircuitBreaker
from empathy_models.backends import state_store_from_url, telemetry_from_url
from empathy_models.breaker import BreakerEvent, BreakerEventKind
from empathy_models.circuit import BreakerPolicy
from empathy_models.cli import main as cli_main
from empathy_models.exceptions import ConfigurationError, StateStoreError
from empathy_models.records import CircuitState, Outcome, OutcomeReport

POLICY = BreakerPolicy(consecutive_failures=2, recovery_seconds=600.0)


async def _server_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1_000_000


async def test_both_schemes_resolve_and_redis_holds_no_telemetry(redis_store_url: str) -> None:
    store = state_store_from_url(redis_store_url)
    assert isinstance(store, RedisCircuitStateStore)
    assert store.shared
    await store.aclose()
    secure = state_store_from_url("rediss://127.0.0.1:6380/0")
    assert isinstance(secure, RedisCircuitStateStore)
    await secure.aclose()
    with pytest.raises(ConfigurationError, match="holds no telemetry"):
        telemetry_from_url(redis_store_url)


@pytest.mark.parametrize("script", [breaker_script, quota_script], ids=["breaker", "quota"])
def test_every_script_turns_on_effects_replication_before_it_runs_a_command(
    script: Callable[[], str],
) -> None:
    # a script that writes after TIME is refused on Redis 4 ("Write commands not allowed
    # after non deterministic commands") unless it first calls redis.replicate_commands()
    # (Redis 5 and later replicate effects anyway): quota.lua never did, so every
    # budget reservation and rate-limit place failed there
    source = "\n".join(line for line in script().splitlines() if not line.lstrip().startswith("--"))
    first_command = re.search(r"redis\.p?call\(", source)
    assert first_command is not None
    switched = source.find("redis.replicate_commands()")
    assert 0 <= switched < first_command.start()
    # at the top level, where it runs before anything else: not inside a function
    assert "function" not in source[:switched]


async def test_time_comes_from_the_redis_server(redis_url: str, redis_store_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    async with RedisCircuitStateStore(redis_store_url) as store:
        before = await _server_time(client)
        admission = await store.admit("timed", POLICY)
        after = await _server_time(client)
    await client.aclose()
    assert admission.state.updated_at_ts is not None
    assert before <= admission.state.updated_at_ts <= after
    assert store.last_server_time == admission.state.updated_at_ts


async def test_one_hash_per_key_under_the_prefix_with_a_ttl(
    redis_url: str, redis_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    async with RedisCircuitStateStore(redis_url, prefix=redis_prefix, key_ttl=1000) as store:
        admission = await store.admit("a", POLICY)
        assert admission.ticket is not None
        assert sorted(await client.keys(redis_prefix + "*")) == [redis_prefix + "a"]
        assert await client.type(redis_prefix + "a") == "hash"
        assert 990 <= await client.ttl(redis_prefix + "a") <= 1000

        # an open circuit lives at least its open period beyond the TTL
        fail = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE, error="503")
        opened = await store.record("a", POLICY, [fail, fail])
        assert opened.state is CircuitState.OPEN
        assert 1590 <= await client.ttl(redis_prefix + "a") <= 1600

        # held open until a reset: never expires on its own
        await store.force("a", CircuitState.FORCED_OPEN, reason="ops")
        assert await client.ttl(redis_prefix + "a") == -1
        await store.reset("a")
        assert 990 <= await client.ttl(redis_prefix + "a") <= 1000
    await client.aclose()


async def test_url_options_prefix_and_key_ttl(redis_url: str, redis_prefix: str) -> None:
    url = f"{redis_url}?prefix={redis_prefix}&key_ttl=77"
    store = state_store_from_url(url)
    assert isinstance(store, RedisCircuitStateStore)
    # the URL's prefix is the root of every store kind's keys: the breaker's under "cb:"
    assert (store.prefix, store.key_ttl) == (redis_prefix + "cb:", 77.0)
    await store.aclose()
    default = RedisCircuitStateStore(redis_url)
    assert default.key_ttl == DEFAULT_KEY_TTL
    await default.aclose()
    with pytest.raises(ConfigurationError, match="key_ttl"):
        RedisCircuitStateStore(redis_url, key_ttl=0)
    with pytest.raises(ConfigurationError, match="prefix"):
        RedisCircuitStateStore(redis_url, prefix="")


async def test_prefixes_keep_stores_apart(redis_url: str, redis_prefix: str) -> None:
    async with (
        RedisCircuitStateStore(redis_url, prefix=redis_prefix + "one:") as one,
        RedisCircuitStateStore(redis_url, prefix=redis_prefix + "two:") as two,
    ):
        await one.force("k", CircuitState.FORCED_OPEN)
        assert (await two.snapshot("k")).state is CircuitState.CLOSED
        assert [s.key for s in await one.snapshot_all()] == ["k"]
        assert await two.snapshot_all() == []


async def test_a_client_given_by_the_caller_is_used_and_left_open(
    redis_url: str, redis_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = RedisCircuitStateStore(client, prefix=redis_prefix)
    async with store:
        until = datetime.now(UTC) + timedelta(hours=1)
        forced = await store.force("k", CircuitState.FORCED_OPEN, until=until)
        assert forced.open_until_ts == until.timestamp()
    assert await client.ping()
    await client.aclose()


_NO_RETRY = Retry(NoBackoff(), 0)


@pytest.mark.parametrize(
    ("client", "named"),
    [
        (
            lambda: aioredis.Redis(unix_socket_path="/nowhere/redis.sock", db=3, retry=_NO_RETRY),
            "unix:///nowhere/redis.sock?db=3",
        ),
        (
            lambda: aioredis.Redis.from_url("rediss://:pw-secret@127.0.0.1:1/5", retry=_NO_RETRY),
            "rediss://127.0.0.1:1/5",
        ),
        (
            lambda: aioredis.Redis(host="127.0.0.1", port=1, retry=_NO_RETRY),
            "redis://127.0.0.1:1/0",
        ),
    ],
    ids=["unix", "tls", "tcp"],
)
async def test_a_callers_client_is_named_by_where_it_connects(
    client: Callable[[], aioredis.Redis], named: str
) -> None:
    # a client of the caller's was named "redis://?:?" for a Unix socket, and without
    # its database or TLS, in every error and log line (two stores on two databases of
    # one server could not be told apart)
    redis = client()
    try:
        for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
            async with build(redis) as store:
                assert repr(store).startswith(f"{build.__name__}({named!r}, ")
                with pytest.raises(
                    StateStoreError, match=f"^Redis [a-z ]+ {re.escape(named)}: "
                ) as info:
                    if isinstance(store, RedisResponseCache):
                        await store.delete("k")
                    else:
                        await store.now()
                assert info.value.target == named and "pw-secret" not in str(info.value)
    finally:
        await redis.aclose()


async def test_a_sentinel_client_is_named_by_its_sentinels_and_service() -> None:
    # a client of Sentinel.master_for was named "redis://localhost:6379/3" in every
    # error and log line, a server it never connects to (nothing listens on port 1)
    sentinel = Sentinel([("127.0.0.1", 1), ("::1", 1)], password="pw-secret")
    redis = sentinel.master_for("mymaster", db=3, socket_timeout=0.2)
    named = "redis+sentinel://127.0.0.1:1,[::1]:1/mymaster/3"
    try:
        for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
            async with build(redis) as store:
                assert repr(store).startswith(f"{build.__name__}({named!r}, ")
                with pytest.raises(StateStoreError, match=f"^Redis [a-z ]+ {re.escape(named)}: "):
                    if isinstance(store, RedisResponseCache):
                        await store.delete("k")
                    else:
                        await store.now()
    finally:
        await redis.aclose()


def test_a_sentinel_replica_client_is_refused_saying_why() -> None:
    # a client of Sentinel.slave_for reaches a read-only replica: every write failed
    # later with READONLY, and the breaker ran degraded for good
    redis = Sentinel([("127.0.0.1", 1)]).slave_for("mymaster")
    for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
        with pytest.raises(ConfigurationError, match=r"read-only replica.*master_for"):
            build(redis)


async def test_errors_are_state_store_errors_without_the_password() -> None:
    # nothing listens on port 1
    store = RedisCircuitStateStore("redis://:s3cret-pw@127.0.0.1:1/0")
    with pytest.raises(StateStoreError) as info:
        await store.admit("k", POLICY)
    assert isinstance(info.value.__cause__, Exception)
    text = f"{info.value} {info.value.target} {store!r}"
    assert "s3cret-pw" not in text
    assert "127.0.0.1:1" in text
    await store.aclose()


async def test_an_unreadable_hash_is_a_state_store_error(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await client.hset(redis_prefix + "bad", mapping={"state": "closed", "generation": "x"})
    async with RedisCircuitStateStore(redis_url, prefix=redis_prefix) as store:
        with pytest.raises(StateStoreError, match="unreadable state for 'bad'") as info:
            await store.snapshot("bad")
        assert info.value.key == "bad"  # that key's fault alone
        with pytest.raises(StateStoreError, match="unreadable state") as info:
            await store.snapshot_all()
        assert info.value.key == "bad"
    await client.aclose()


@pytest.mark.parametrize(
    ("field", "value"), [("generation", "x"), ("state", "nonsense")], ids=["generation", "state"]
)
async def test_an_unreadable_key_degrades_that_key_only_and_reset_repairs_it(
    redis_url: str, redis_prefix: str, field: str, value: str
) -> None:
    # one key's unreadable hash (a hand edit, another program's write) failed the
    # script, or the reading of its reply, with an error naming no key: the breaker ran
    # degraded for every key, and `breaker reset KEY` failed on it too (the SQLite
    # store sends that key alone to a fallback, and its reset repairs the row)
    events: list[BreakerEvent] = []
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with (
            RedisCircuitStateStore(redis_url, prefix=redis_prefix) as store,
            CircuitBreaker(store, local_view_ttl=0, listeners=[events.append]) as breaker,
        ):
            await breaker.force_open("bad", reason="seed a key")
            await breaker.reset("bad")
            await client.hset(redis_prefix + "bad", field, value)
            async with RedisCircuitStateStore(redis_url, prefix=redis_prefix) as fresh:
                with pytest.raises(StateStoreError, match="unreadable state for 'bad'") as info:
                    await fresh.admit("bad", POLICY)  # no state of it held: read whole
            assert info.value.key == "bad"
            for key in ("bad", "good"):
                async with breaker.guard(key):
                    pass
            assert not breaker.degraded  # the store as a whole is fine
            degraded = [e.key for e in events if e.kind is BreakerEventKind.STORE_DEGRADED]
            assert degraded == ["bad"]
            await breaker.reset("bad")
            repaired = await store.snapshot("bad")
    finally:
        await client.aclose()
    assert repaired.state is CircuitState.CLOSED and repaired.generation >= 1


async def test_the_repair_command_an_unreadable_key_names_repairs_it_as_given(
    redis_url: str, redis_prefix: str
) -> None:
    # the message said `empathy-models breaker reset KEY`: the CLI's default store, not
    # this one, and a key with a space was two arguments. With the default prefix the
    # command names this store; with another, which no --db URL reaches, it says so.
    key = f"repair me {uuid.uuid4().hex}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisCircuitStateStore(redis_url) as store:
            await store.force(key, CircuitState.FORCED_OPEN, reason="seed a key")
            await client.hset(DEFAULT_PREFIX + key, "state", "nonsense")
            with pytest.raises(StateStoreError) as info:
                await store.snapshot(key)
            command = shlex.split(str(info.value).split("`")[1])
            assert command[:4] == ["empathy-models", "breaker", "reset", "--db"], command
            assert await anyio.to_thread.run_sync(cli_main, command[1:]) == 0
            assert (await store.snapshot(key)).state is CircuitState.CLOSED
        async with RedisCircuitStateStore(redis_url, prefix=redis_prefix) as store:
            await store.force("k", CircuitState.FORCED_OPEN, reason="seed a key")
            await client.hset(redis_prefix + "k", "state", "nonsense")
            with pytest.raises(StateStoreError, match=r"--db <this store's URL> k`"):
                await store.snapshot("k")
    finally:
        await client.delete(DEFAULT_PREFIX + key)
        await client.aclose()


async def test_a_disabled_key_is_held_until_a_reset(redis_url: str, redis_prefix: str) -> None:
    # disable() promises "until reset"; admissions and outcomes of a DISABLED key write
    # nothing, so a TTL would silently re-enable the breaker (at generation 0) however
    # busy the key is
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    async with RedisCircuitStateStore(redis_url, prefix=redis_prefix, key_ttl=1000) as store:
        await store.force("d", CircuitState.DISABLED, reason="ops")
        assert await client.ttl(redis_prefix + "d") == -1
        admission = await store.admit("d", POLICY)
        assert admission.ticket is not None
        fail = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE, error="503")
        assert (await store.record("d", POLICY, [fail, fail])).state is CircuitState.DISABLED
        assert await client.ttl(redis_prefix + "d") == -1
        await store.reset("d")
        assert 990 <= await client.ttl(redis_prefix + "d") <= 1000
    await client.aclose()


async def test_an_absurd_retry_after_is_stored_not_refused(
    redis_url: str, redis_prefix: str
) -> None:
    # a 429 whose Retry-After is 30 million years: Redis must not refuse the expiry
    # (PEXPIRE takes an integer of ms), and the key lives for ages
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    async with RedisCircuitStateStore(redis_url, prefix=redis_prefix) as store:
        admission = await store.admit("r", POLICY)
        assert admission.ticket is not None
        limited = OutcomeReport(
            ticket=admission.ticket, outcome=Outcome.RATE_LIMITED, retry_after=1e15
        )
        state = await store.record("r", POLICY, [limited])
        assert state.state is CircuitState.OPEN
        assert state.open_until_ts is not None and state.open_until_ts > 1e15
        assert await client.ttl(redis_prefix + "r") > 10**12
    await client.aclose()


async def test_a_late_429_holds_the_open_circuit_for_its_retry_after(
    redis_store_url: str,
) -> None:
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=60.0)
    async with RedisCircuitStateStore(redis_store_url) as store:
        first = await store.admit("late429", policy)
        second = await store.admit("late429", policy)
        assert first.ticket is not None and second.ticket is not None
        tripped = await store.record(
            "late429", policy, [OutcomeReport(ticket=first.ticket, outcome=Outcome.FAILURE)]
        )
        assert tripped.state is CircuitState.OPEN
        held = await store.record(
            "late429",
            policy,
            [OutcomeReport(ticket=second.ticket, outcome=Outcome.RATE_LIMITED, retry_after=600.0)],
        )
        assert held.state is CircuitState.OPEN
        assert held.generation == tripped.generation
        assert held.updated_at_ts is not None and held.open_until_ts is not None
        assert held.open_until_ts - held.updated_at_ts == pytest.approx(600.0, abs=1e-3)
        shorter = await store.record(
            "late429",
            policy,
            [OutcomeReport(ticket=second.ticket, outcome=Outcome.RATE_LIMITED, retry_after=1.0)],
        )
        assert shorter.open_until_ts == held.open_until_ts


async def _admit(store: Any, i: int) -> object:
    return await store.admit(f"k{i % 3}", POLICY)


async def _snapshot(store: Any, i: int) -> object:
    return await store.snapshot(f"k{i % 3}")


async def _acquire(store: Any, i: int) -> object:
    return await store.acquire(f"r{i % 3}", cost=1.0, interval=0.001, burst=1e6, max_wait=0.0)


async def _get(store: Any, i: int) -> object:
    return await store.get(f"c{i}")


@pytest.mark.parametrize(
    ("build", "call"),
    [
        (RedisCircuitStateStore, _admit),
        (RedisCircuitStateStore, _snapshot),
        (RedisQuotaStore, _acquire),
        (RedisResponseCache, _get),
    ],
)
async def test_closing_while_calls_run_leaves_no_connection_open(
    redis_url: str,
    redis_prefix: str,
    build: Callable[..., Any],
    call: Callable[[Any, int], Awaitable[object]],
) -> None:
    # calls still running at aclose() gave their connections back to the closed pool,
    # or connected new ones, and those stayed open (as many as max_connections)
    name = f"empathy-test-close-{uuid.uuid4().hex[:12]}"
    store = build(redis_url, prefix=redis_prefix, client_name=name, max_connections=4)
    admin = aioredis.Redis.from_url(redis_url)

    async def open_connections() -> int:
        return sum(1 for c in await admin.client_list() if c.get("name") == name)

    try:
        await call(store, 0)
        assert await open_connections() >= 1  # the name finds the store's connections
        calls = [asyncio.ensure_future(call(store, i)) for i in range(40)]
        await asyncio.sleep(0)  # they start and wait for the pool's four connections
        await store.aclose()
        ended = await asyncio.gather(*calls, return_exceptions=True)
        # each call ended with its answer or a store error, never redis-py's own
        assert all(
            not isinstance(end, BaseException) or isinstance(end, StateStoreError) for end in ended
        ), ended
        for _ in range(500):  # the server notices a closed socket soon after
            if not await open_connections():
                break
            await asyncio.sleep(0.01)
        assert await open_connections() == 0
    finally:
        await store.aclose()
        await admin.aclose()
