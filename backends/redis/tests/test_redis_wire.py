"""
RedisCircuitStateStore on the wire: header-only replies for unchanged states, NOSCRIPT,
cancellation on a pooled connection, and clients given by the caller.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis.asyncio as aioredis
from empathy_models_redis import RedisCircuitStateStore
from redis.typing import EncodableT

from empathy_models.circuit import BreakerPolicy
from empathy_models.exceptions import StateStoreError
from empathy_models.records import CircuitState, Outcome, OutcomeReport

POLICY = BreakerPolicy(
    consecutive_failures=2, recovery_seconds=0.05, half_open_probes=2, probe_lease_seconds=0.2
)


async def test_an_unchanged_state_is_the_one_read_before_and_equals_a_fresh_read(
    redis_store_url: str,
) -> None:
    async with (
        RedisCircuitStateStore(redis_store_url) as store,
        RedisCircuitStateStore(redis_store_url) as other,
    ):
        first = await store.admit("k", POLICY)
        second = await store.admit("k", POLICY)
        # the second reply was the header only: the state parsed for the first is reused
        assert second.state is first.state
        assert second.ticket is not None and second.ticket.generation == 0
        fresh = await other.admit("k", POLICY)
        assert fresh.state == second.state
        assert second.state == await store.snapshot("k")


async def test_a_write_by_another_store_is_seen_at_once(redis_store_url: str) -> None:
    async with (
        RedisCircuitStateStore(redis_store_url) as store,
        RedisCircuitStateStore(redis_store_url) as other,
    ):
        admission = await store.admit("k", POLICY)
        await store.admit("k", POLICY)
        assert admission.ticket is not None
        failure = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE, error="boom")
        await other.record("k", POLICY, [failure])
        seen = await store.admit("k", POLICY)
        assert seen.state.consecutive_failures == 1
        assert seen.state.last_error == "boom"
        await other.record("k", POLICY, [failure])
        rejected = await store.admit("k", POLICY)
        assert not rejected.admitted
        assert rejected.state.state is CircuitState.OPEN
        again = await store.admit("k", POLICY)  # OPEN, nothing written: the header only
        assert again.state is rejected.state
        assert again.retry_after is not None and rejected.retry_after is not None
        assert again.retry_after <= rejected.retry_after


async def test_a_key_deleted_and_written_again_is_read_in_full(
    redis_url: str, redis_prefix: str, redis_store_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisCircuitStateStore(redis_store_url) as store:
            admission = await store.admit("k", POLICY)
            assert admission.ticket is not None
            await store.record(
                "k", POLICY, [OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)]
            )
            known = (await store.admit("k", POLICY)).state
            assert known.consecutive_failures == 1
            await client.delete(redis_prefix + "cb:k")
            after = await store.admit("k", POLICY)
            assert after.state.consecutive_failures == 0
            assert after.state == await store.snapshot("k")
    finally:
        await client.aclose()


async def test_every_reply_equals_the_stored_state(redis_store_url: str) -> None:
    # random operations on two stores sharing keys: whether a reply is the header only
    # or in full, the state returned is the state Redis holds right after
    rng = random.Random(19)
    outcomes = [Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED]
    async with (
        RedisCircuitStateStore(redis_store_url) as one,
        RedisCircuitStateStore(redis_store_url) as two,
    ):
        tickets: dict[str, list[OutcomeReport]] = {"a": [], "b": []}
        for _ in range(300):
            store = rng.choice((one, two))
            key = rng.choice(("a", "b"))
            choice = rng.random()
            if choice < 0.55:
                admission = await store.admit(key, POLICY)
                state = admission.state
                if admission.ticket is not None:
                    tickets[key].append(
                        OutcomeReport(ticket=admission.ticket, outcome=rng.choice(outcomes))
                    )
            elif choice < 0.9 and tickets[key]:
                report = tickets[key].pop(rng.randrange(len(tickets[key])))
                state = await store.record(key, POLICY, [report])
            elif choice < 0.95:
                state = await store.force(key, CircuitState.CLOSED, reason="test")
            else:
                await asyncio.sleep(0.03)
                continue
            assert state == await store.snapshot(key)


async def test_a_flushed_script_is_loaded_again(
    redis_url: str, redis_store_url: str, redis_server_disturbed: None
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisCircuitStateStore(redis_store_url) as store:
            await store.admit("k", POLICY)
            await client.script_flush()
            admission = await store.admit("k", POLICY)
            assert admission.admitted
            assert admission.state.key == "k"
    finally:
        await client.aclose()


class _FlushAfterLoad(aioredis.Redis):
    """A client whose first ``SCRIPT LOAD`` is followed by a ``SCRIPT FLUSH`` (as another
    process's may land between a load and the command it was for)."""

    flushes = 1

    async def script_load(self, script: Any) -> Any:
        sha = await super().script_load(script)
        if self.flushes:
            self.flushes -= 1
            await self.script_flush()
        return sha


async def test_a_script_flushed_again_after_its_load_is_loaded_once_more(
    redis_url: str, redis_prefix: str, redis_server_disturbed: None
) -> None:
    # one load per command: a flush between the load and the command it was for failed
    # the command (NoScriptError), seen when tests flushed scripts beside a busy suite
    client = _FlushAfterLoad.from_url(redis_url)
    assert isinstance(client, _FlushAfterLoad)
    try:
        store = RedisCircuitStateStore(client, prefix=redis_prefix)
        for _ in range(20):  # until a run found its script flushed (others load it too)
            await client.script_flush()
            admission = await store.admit("k", POLICY)
            assert admission.admitted and admission.state.key == "k"
            if client.flushes == 0:
                break
        assert client.flushes == 0
        await store.aclose()
    finally:
        await client.aclose()


async def test_a_cancelled_call_leaves_its_connection_clean(redis_store_url: str) -> None:
    # one connection in the pool: a reply left unread would be read by the next call
    async with RedisCircuitStateStore(redis_store_url, max_connections=1) as store:
        cancelled = 0
        for i in range(60):
            task = asyncio.ensure_future(store.admit(f"gone{i % 3}", POLICY))
            for _ in range(i % 6):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
            admission = await store.admit("kept", POLICY)
            assert admission.state.key == "kept"
            assert (await store.snapshot("kept")).key == "kept"
        assert cancelled >= 10


@pytest.mark.parametrize(
    "options",
    [{}, {"decode_responses": True}, {"single_connection_client": True}],
    ids=["pooled", "decoding", "single-connection"],
)
async def test_a_client_given_by_the_caller_is_used(
    redis_url: str, redis_prefix: str, options: dict[str, bool], redis_server_disturbed: None
) -> None:
    client = aioredis.Redis.from_url(redis_url, **options)
    try:
        store = RedisCircuitStateStore(client, prefix=redis_prefix)
        admission = await store.admit("k", POLICY)
        assert admission.ticket is not None
        assert (await store.admit("k", POLICY)).state == admission.state
        state = await store.record(
            "k", POLICY, [OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)]
        )
        assert state.consecutive_failures == 1
        await client.script_flush()
        assert (await store.admit("k", POLICY)).state == state
        await store.aclose()
        assert await client.exists(redis_prefix + "k")  # the store did not close the client
    finally:
        await client.aclose()


async def test_a_full_pool_is_shared_between_script_runs_and_snapshots(
    redis_store_url: str,
) -> None:
    # connections kept between runs go back to the pool when anyone waits for one
    async with RedisCircuitStateStore(redis_store_url, max_connections=2, timeout=2.0) as store:
        calls = [store.admit(f"k{i % 7}", POLICY) for i in range(60)]
        results = await asyncio.gather(*calls, store.snapshot("k1"), store.snapshot_all())
        assert len(results) == 62
        assert (await store.snapshot("k1")).key == "k1"
        assert (await store.admit("k1", POLICY)).admitted


async def test_a_kept_connection_closed_by_the_server_is_replaced(
    redis_url: str, redis_store_url: str
) -> None:
    name = f"empathy-wire-{random.getrandbits(48):x}"
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with RedisCircuitStateStore(redis_store_url, client_name=name) as store:
            await store.admit("k", POLICY)
            ids = [c["id"] for c in await client.client_list() if c.get("name") == name]
            assert ids
            for client_id in ids:
                await client.client_kill_filter(_id=client_id)
            admission = await store.admit("k", POLICY)
            assert admission.admitted and admission.state.key == "k"
    finally:
        await client.aclose()


async def test_a_hash_written_without_a_revision_is_read_in_full(
    redis_url: str, redis_prefix: str, redis_store_url: str
) -> None:
    # an earlier version of the script rewrites the hash without "rev"
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with RedisCircuitStateStore(redis_store_url) as store:
            admission = await store.admit("k", POLICY)
            assert admission.ticket is not None
            await store.admit("k", POLICY)
            stored_before = await client.hgetall(redis_prefix + "cb:k")
            fields: dict[EncodableT, EncodableT] = {
                str(k): str(v) for k, v in stored_before.items()
            }
            assert "rev" in fields
            del fields["rev"]
            fields["consecutive_failures"] = "1"
            fields["last_error"] = "=from before"
            await client.delete(redis_prefix + "cb:k")
            await client.hset(redis_prefix + "cb:k", mapping=fields)
            seen = await store.admit("k", POLICY)
            assert seen.state.consecutive_failures == 1
            assert seen.state.last_error == "from before"
            state = await store.record(
                "k", POLICY, [OutcomeReport(ticket=admission.ticket, outcome=Outcome.SUCCESS)]
            )
            assert state.consecutive_failures == 0
            assert state == await store.snapshot("k")
            stored = await client.hgetall(redis_prefix + "cb:k")
            assert "rev" in stored and stored["last_error"] == "=from before"
    finally:
        await client.aclose()


async def test_an_error_reply_fails_the_run_and_the_connection_goes_on(
    redis_url: str, redis_prefix: str, redis_store_url: str
) -> None:
    # a key of another type makes the script fail: an error line, read whole, so the
    # one connection answers the next run with that run's reply
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(redis_prefix + "cb:wrong", "a string, not a hash")
        async with RedisCircuitStateStore(redis_store_url, max_connections=1) as store:
            await store.admit("k", POLICY)
            with pytest.raises(StateStoreError, match="WRONGTYPE"):
                await store.admit("wrong", POLICY)
            admission = await store.admit("other", POLICY)
            assert admission.admitted and admission.state.key == "other"
            assert (await store.admit("k", POLICY)).state.key == "k"
    finally:
        await client.aclose()


async def test_a_run_that_times_out_leaves_no_reply_behind(
    redis_url: str, redis_store_url: str, redis_server_disturbed: None
) -> None:
    # Redis answers nothing while paused: the run times out (socket_timeout), and the
    # reply that arrives after it must not be read as the next run's
    pauser = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisCircuitStateStore(
            redis_store_url, max_connections=1, socket_timeout=0.1
        ) as store:
            await store.admit("k", POLICY)
            await pauser.client_pause(700, all=True)
            with pytest.raises(StateStoreError, match=r"[Tt]imeout"):
                await store.admit("k", POLICY)
            await asyncio.sleep(0.8)
            for key in ("other", "k"):
                admission = await store.admit(key, POLICY)
                assert admission.admitted and admission.state.key == key
    finally:
        await pauser.client_unpause()
        await pauser.aclose()
