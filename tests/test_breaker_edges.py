"""
The breaker at its edges with a real SQLite file;
the Redis and PostgreSQL variants live with their plugins' tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shlex
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio.to_thread
import pytest

from empathy_models import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    ConfigurationWarning,
    state_store_from_url,
)
from empathy_models.abc import ChangeFeed
from empathy_models.backends import MemoryStateStore
from empathy_models.breaker import BreakerEvent, BreakerEventKind
from empathy_models.cli import main as cli_main
from empathy_models.exceptions import BackendClosedError, ServerError, StateStoreError
from empathy_models.records import Admission
from empathy_models.testing.clock import FakeClock
from tests._cancel_trials import cancel_during_admission


async def test_a_cancel_during_a_half_open_admission_never_leaks_the_probe_lease(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'state.db'}"
    async with CircuitBreaker(store=store, local_view_ttl=0, policy=BreakerPolicy()) as breaker:
        result = await cancel_during_admission(breaker, "anthropic", trials=100)
    assert result.trials >= 100
    assert result.cancelled_before_the_body >= 10  # the window under test was hit
    assert result.leaked == 0
    assert result.ran_after_cancel == 0


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_cancel_in_an_async_listener_after_a_probe_admission_gives_the_lease_back(
    tmp_path: Path, store: str
) -> None:
    # listeners run in the caller's task after the store's answer: a cancel landing in
    # one must not keep the probe lease that answer granted
    fired = False

    async def cancel_at_half_open(event: BreakerEvent) -> None:
        nonlocal fired
        if event.new_state is CircuitState.HALF_OPEN and not fired:
            fired = True
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)  # the cancel lands here, in the listener

    async def call(breaker: CircuitBreaker) -> None:
        async with breaker.guard("k"):
            raise AssertionError("the guarded call ran although it was cancelled")

    url = None if store == "memory" else f"sqlite:///{tmp_path / 'state.db'}"
    policy = BreakerPolicy(probe_lease_seconds=120)
    async with CircuitBreaker(
        store=url, policy=policy, local_view_ttl=0, listeners=[cancel_at_half_open]
    ) as breaker:
        await breaker.force_open("k", until=datetime.now(UTC) - timedelta(seconds=1))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.ensure_future(call(breaker))
        assert fired
        state = await breaker.get_status("k")
        assert [lease for lease in state.leases if lease[1] > time.time()] == []
        assert await breaker.is_available("k")


# --------------------------------------------------------------------------- item 8


def _corrupt(db: Path, key: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        changed = conn.execute(
            "UPDATE circuit_state SET data = '{not json' WHERE key = ?", (key,)
        ).rowcount
    assert changed == 1


async def test_a_corrupt_circuit_state_row_degrades_that_key_only_and_reset_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"
    clock = FakeClock()
    events: list[BreakerEvent] = []
    async with CircuitBreaker(store=url, local_view_ttl=0) as setup:
        await setup.force_open("anthropic", reason="seed a row")
        await setup.reset("anthropic")
    _corrupt(db, "anthropic")

    # the store names the key
    async with state_store_from_url(url) as store:
        with pytest.raises(
            StateStoreError, match="circuit state of 'anthropic' is unreadable"
        ) as info:
            await store.snapshot("anthropic")
        assert info.value.key == "anthropic"

    policy = BreakerPolicy(consecutive_failures=2)
    async with CircuitBreaker(
        store=url, policy=policy, clock=clock, local_view_ttl=0, listeners=[events.append]
    ) as breaker:
        for _ in range(50):  # every call goes ahead, on the key's per-process fallback
            async with breaker.guard("anthropic"):
                pass
        # the key still trips (locally) and other keys still use the shared store
        for key in ("anthropic", "openai"):
            for _ in range(2):
                with pytest.raises(ServerError):
                    async with breaker.guard(key):
                        raise ServerError("boom", status=503)
        with pytest.raises(CircuitOpenError):
            async with breaker.guard("anthropic"):
                pass
        async with state_store_from_url(url) as other:
            assert (await other.snapshot("openai")).state is CircuitState.OPEN
        degraded = [e for e in events if e.kind is BreakerEventKind.STORE_DEGRADED]
        assert [e.key for e in degraded] == ["anthropic"]
        assert not breaker.degraded  # the store as a whole is fine

        # the CLI: one line naming the key, then `breaker reset KEY` repairs the row
        args = ["breaker", "status", "--db", str(db)]
        assert await anyio.to_thread.run_sync(cli_main, args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'anthropic'" in err and "Traceback" not in err
        args = ["breaker", "reset", "anthropic", "--db", str(db)]
        assert await anyio.to_thread.run_sync(cli_main, args) == 0
        capsys.readouterr()
        assert await anyio.to_thread.run_sync(cli_main, ["breaker", "status", "--db", str(db)]) == 0

        # after store_retry_interval the key goes back to the shared store
        clock.advance(5.0)  # the default store_retry_interval
        async with breaker.guard("anthropic"):
            pass
        assert any(e.kind is BreakerEventKind.STORE_RECOVERED for e in events)


async def test_the_repair_command_an_unreadable_row_names_repairs_it_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the message said `empathy-models breaker reset KEY`: without --db the CLI resets
    # the default store (empathy.toml's, or $EMPATHY_HOME's), not this one, and a key
    # with a space was two arguments
    db = tmp_path / "my state.db"
    key = "team a/gpt-4o"
    async with state_store_from_url(f"sqlite:///{db}") as store:
        await store.force(key, CircuitState.FORCED_OPEN, reason="seed a row")
    _corrupt(db, key)
    async with state_store_from_url(f"sqlite:///{db}") as store:
        with pytest.raises(StateStoreError) as info:
            await store.snapshot(key)
    command = shlex.split(str(info.value).split("`")[1])
    assert command[:3] == ["empathy-models", "breaker", "reset"], command
    assert await anyio.to_thread.run_sync(cli_main, command[1:]) == 0, capsys.readouterr()
    async with state_store_from_url(f"sqlite:///{db}") as store:
        assert (await store.snapshot(key)).state is CircuitState.CLOSED


@contextlib.asynccontextmanager
async def _with_a_corrupt_row(
    tmp_path: Path, events: list[BreakerEvent]
) -> AsyncIterator[CircuitBreaker]:
    """A breaker on ``tmp_path``'s state.db (no local view) whose "anthropic" row is unreadable."""
    db = tmp_path / "state.db"
    async with CircuitBreaker(
        store=f"sqlite:///{db}", local_view_ttl=0, listeners=[events.append]
    ) as breaker:
        await breaker.force_open("anthropic", reason="seed a row")
        await breaker.reset("anthropic")
        _corrupt(db, "anthropic")
        yield breaker


@pytest.mark.parametrize("every_key", [False, True])
async def test_a_breaker_reset_repairs_a_corrupt_row_at_once(
    tmp_path: Path, every_key: bool
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    events: list[BreakerEvent] = []
    async with _with_a_corrupt_row(tmp_path, events) as breaker:
        async with breaker.guard("anthropic"):
            pass  # the key runs on a per-process fallback of its own
        await breaker.reset(None if every_key else "anthropic")
        async with state_store_from_url(url) as store:
            assert (await store.snapshot("anthropic")).state is CircuitState.CLOSED
        # the key is back on the shared store: another worker's force is seen at once
        async with CircuitBreaker(store=url) as other:
            await other.force_open("anthropic", reason="maintenance")
        with pytest.raises(CircuitOpenError, match="maintenance"):
            async with breaker.guard("anthropic"):
                pass
    kinds = [e.kind for e in events if e.key == "anthropic"]
    assert BreakerEventKind.STORE_RECOVERED in kinds


async def test_a_corrupt_row_makes_a_snapshot_of_every_key_fail_naming_it_not_the_whole_store(
    tmp_path: Path,
) -> None:
    # one unreadable row is not an outage of the store: the other keys stay shared
    url = f"sqlite:///{tmp_path / 'state.db'}"
    events: list[BreakerEvent] = []
    async with _with_a_corrupt_row(tmp_path, events) as breaker:
        with pytest.raises(StateStoreError, match="'anthropic' is unreadable") as info:
            await breaker.snapshot()
        assert info.value.key == "anthropic"
        assert not breaker.degraded
        assert not [e for e in events if e.kind is BreakerEventKind.STORE_DEGRADED]
        # another worker's force is seen at once: this one still reads the shared store
        async with CircuitBreaker(store=url) as other:
            await other.force_open("openai", reason="maintenance")
        with pytest.raises(CircuitOpenError, match="maintenance"):
            async with breaker.guard("openai"):
                pass


# --------------------------------------------------------------------------- item 11


async def test_except_star_inside_a_shared_breaker_leaks_no_cancellation_and_flushes(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"

    async def child_fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("child failed")

    caught = []
    # flush_interval long: the successes below are still pending at exit
    async with CircuitBreaker(store=url, flush_interval=3600) as breaker:
        async with breaker.guard("anthropic"):
            pass  # the first call fetches a CLOSED view from the store
        for _ in range(7):
            async with breaker.guard("anthropic"):
                pass
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(child_fails())
                group.create_task(asyncio.sleep(3600))
        except* ValueError as eg:
            caught.append(eg)
        await asyncio.sleep(0)
    assert len(caught) == 1  # and no CancelledError left the `async with` above
    async with state_store_from_url(url) as store:
        state = await store.snapshot("anthropic")
    assert state.window_calls == 8  # the final flush was not skipped


class _ClosingStore(MemoryStateStore):
    """A store whose admissions fail after a wait, as a store closed under the breaker."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        await asyncio.sleep(self.delay)
        raise BackendClosedError("closed meanwhile")


async def test_a_store_error_reaches_the_caller_once_and_is_not_logged_as_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the store operation runs in a task of its own (a cancelled caller cannot cut it
    # short); when it fails, the caller gets the error and asyncio logs nothing lost
    async with CircuitBreaker(store=_ClosingStore(0.0), local_view_ttl=0) as breaker:
        with pytest.raises(BackendClosedError):
            await breaker.admit("k")
        await asyncio.sleep(0)
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_an_operation_its_cancelled_caller_stopped_waiting_for_fails_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a cancelled caller waits for its store operation at most SHIELD_SECONDS; one that
    # ends later, in failure, is not reported by asyncio as an exception nobody read
    import empathy_models._settled as settled

    monkeypatch.setattr(settled, "SHIELD_SECONDS", 0.05)
    async with CircuitBreaker(store=_ClosingStore(0.3), local_view_ttl=0) as breaker:
        task = asyncio.ensure_future(breaker.admit("k"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the operation ends, in failure
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


# --------------------------------------------------------------------------- stopping a feed

Watch = Callable[[ChangeFeed], Awaitable[None]]


class _AnnouncingStore(MemoryStateStore):
    """A shared store with a change feed run by ``watch`` (a store's client may swallow
    the cancellation that stops it: redis-py while it connects, ``asyncio.wait_for``
    on Python 3.11 when the connection attempt has just failed)."""

    shared = True

    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self._feed = ChangeFeed(watch, "the test's store")

    def change_feed(self) -> ChangeFeed:
        return self._feed

    async def _aclose(self) -> None:
        await self._feed.aclose()
        await super()._aclose()


def _swallowing(then: str, running: anyio.Event) -> Watch:
    """A watcher that swallows the first cancellation it gets, then returns or raises
    (``then``); it takes every later one as it comes."""
    swallowed: list[bool] = []

    async def watch(feed: ChangeFeed) -> None:
        running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)
            if then == "raises":
                raise ConnectionError("connection refused") from None
        # "returns"

    return watch


@pytest.mark.parametrize("then", ["returns", "raises"])
async def test_leaving_the_breaker_ends_a_watcher_that_swallowed_its_cancellation(
    then: str,
) -> None:
    running = anyio.Event()
    store = _AnnouncingStore(_swallowing(then, running))
    with anyio.fail_after(10):  # a hang guard: leaving returns at once
        async with store, CircuitBreaker(store) as breaker:
            await running.wait()
            async with breaker.guard("k"):
                pass
        assert not store.change_feed().listening


async def test_a_watcher_that_swallows_one_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("empathy_models._change_feed.RECANCEL_INTERVAL", 0.1)  # 1 s
    running = anyio.Event()
    cancellations: list[int] = []

    async def watch(feed: ChangeFeed) -> None:
        running.set()
        while True:  # a subscription carrying on after its client swallowed one
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancellations.append(1)
                if len(cancellations) > 1:
                    raise

    store = _AnnouncingStore(watch)
    with anyio.fail_after(10):  # a hang guard: cancelled again after RECANCEL_INTERVAL
        async with store, CircuitBreaker(store):
            await running.wait()
    assert len(cancellations) == 2


async def test_a_watcher_that_never_ends_is_left_running_and_leaving_returns(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # leaving waits STOP_TIMEOUT (5 s) for the watcher, cancelling it again every
    # RECANCEL_INTERVAL (1 s): a tenth of each shows the same
    monkeypatch.setattr("empathy_models._change_feed.STOP_TIMEOUT", 0.5)
    monkeypatch.setattr("empathy_models._change_feed.RECANCEL_INTERVAL", 0.1)
    running = anyio.Event()
    released = asyncio.Event()
    watchers: list[asyncio.Task[object]] = []

    async def watch(feed: ChangeFeed) -> None:
        task = asyncio.current_task()
        assert task is not None
        watchers.append(task)
        running.set()
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    store = _AnnouncingStore(watch)
    try:
        # a hang guard: leaving returns after STOP_TIMEOUT
        with anyio.fail_after(20), caplog.at_level(logging.WARNING, "empathy_models.breaker"):
            async with store, CircuitBreaker(store):
                await running.wait()
        assert any("left to end on its own" in r.getMessage() for r in caplog.records)
    finally:
        released.set()
    with anyio.fail_after(10):
        await asyncio.wait(watchers)  # released, it ends: the feed subscribes no more
    assert watchers[0].done() and len(watchers) == 1


async def test_a_breaker_on_a_shared_store_used_unentered_warns_once_at_the_callers_line(
    tmp_path: Path,
) -> None:
    # without `async with breaker:` no task sends the successes it writes behind (they
    # wait for their key's next call, and are lost at exit) and an owned store is never
    # closed: said once, a ConfigurationWarning at the caller's line, as the router does
    url = f"sqlite:///{tmp_path / 'state.db'}"
    unentered = CircuitBreaker(url)

    async def ask() -> str:
        return "answer"

    with pytest.warns(ConfigurationWarning, match="use `async with breaker:`") as given:
        async with unentered.guard("openai"):
            pass
        await unentered.call("anthropic", ask)
        await unentered.admit("openai:gpt")
    assert len(given) == 1 and given[0].filename == __file__
    assert "SQLiteStateStore" in str(given[0].message)
    await unentered.aclose()
    # entered, or on the in-process store (nothing written behind, nothing to close):
    # no warning (the suite's filterwarnings=error would raise it)
    async with CircuitBreaker(url) as entered, entered.guard("openai"):
        pass
    memory = CircuitBreaker(MemoryStateStore())
    async with memory.guard("openai"):
        pass
    await memory.call("anthropic", ask)
