"""
Odd values given to `CircuitBreaker`'s public API (an error message with a NUL, an
operator's reason no store can hold as given, an end before 1970, a function `protect`
cannot guard), on every store at hand: each store answers alike, and none of them makes
the breaker fall back to its per-process store.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from empathy_models import BreakerPolicy, CircuitBreaker, CircuitOpenError, CircuitState
from empathy_models.backends import MemoryStateStore
from empathy_models.breaker import BreakerEvent, BreakerEventKind
from empathy_models.exceptions import ConfigurationError, RecordValidationError, ServerError
from empathy_models.testing import FakeLLMServer

from ._namespaces import quota_url_of

POLICY = BreakerPolicy(consecutive_failures=2)


@pytest.fixture(params=["memory", "sqlite", "redis", "postgresql"])
def breakers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``breakers(**options)``: a new `CircuitBreaker` on this test's one store."""
    kind = request.param
    if kind == "memory":
        store = MemoryStateStore()
        yield lambda **options: CircuitBreaker(store, POLICY, **options)
        return
    with quota_url_of(kind, tmp_path) as url:  # a file, or a namespace of the test's own
        yield lambda **options: CircuitBreaker(url, POLICY, **options)


async def test_a_failure_whose_message_holds_a_nul_trips_every_worker(
    breakers: Callable[..., CircuitBreaker],
) -> None:
    events: list[BreakerEvent] = []
    async with breakers(listeners=[events.append]) as worker, breakers() as other:
        for _ in range(2):
            with pytest.raises(ServerError):
                async with worker.guard("k"):
                    raise ServerError("bad\x00byte", status=500)
        assert not worker.degraded
        assert [e.kind for e in events] == [BreakerEventKind.STATE_CHANGED]
        with pytest.raises(CircuitOpenError) as info:
            await other.admit("k")
        assert info.value.last_error == "ServerError: bad\\x00byte"


async def test_a_key_in_a_failed_calls_message_reaches_no_other_worker(
    breakers: Callable[..., CircuitBreaker],
) -> None:
    # the guarded code's own HTTP client quotes the URL it called, a key in its query;
    # the error text the breaker stores and every worker shows keeps the key out
    secret, api_key = "AIzaSyD-not-for-others-0123", "sk-proj-Abc123Def456Ghi789"
    async with (
        FakeLLMServer(api_key="test-key") as server,
        aiohttp.ClientSession() as session,
        breakers() as worker,
        breakers(local_view_ttl=0) as other,
    ):
        url = f"{server.url}/v1beta/models/m:generateContent?alt=sse&key={secret}"
        with pytest.raises(aiohttp.ClientResponseError):
            async with worker.guard("k"), session.post(url) as response:
                response.raise_for_status()
        first = await other.get_status("k")
        with pytest.raises(RuntimeError):
            async with worker.guard("k"):
                raise RuntimeError(f"Incorrect API key provided: {api_key}")
        with pytest.raises(CircuitOpenError) as info:
            await other.admit("k")
    assert first.last_error is not None and secret not in first.last_error
    assert first.last_error.endswith("/v1beta/models/m:generateContent?alt=sse&key=***'")
    assert api_key not in str(info.value)
    assert info.value.last_error == "RuntimeError: Incorrect API key provided: sk-***"


@pytest.mark.parametrize("reason", ["maintenance\x00window", "caf\udce9"])
async def test_a_reason_no_store_holds_as_given_is_shown_escaped_to_every_worker(
    breakers: Callable[..., CircuitBreaker], reason: str
) -> None:
    escaped = reason.replace("\x00", "\\x00").replace("\udce9", "\\udce9")
    async with breakers(local_view_ttl=0) as operator, breakers(local_view_ttl=0) as other:
        forced = await operator.force_open("k", reason=reason)
        assert forced.reason == escaped
        disabled = await operator.disable("d", reason=reason)
        assert disabled.reason == escaped
        assert not operator.degraded
        with pytest.raises(CircuitOpenError) as info:
            await other.admit("k")
        assert info.value.reason == escaped
        assert (await other.get_status("d")).reason == escaped


async def test_a_reason_that_is_not_text_is_refused_alike(
    breakers: Callable[..., CircuitBreaker],
) -> None:
    async with breakers() as breaker:
        for control in (breaker.force_open, breaker.disable):
            with pytest.raises(RecordValidationError, match="reason must be a string or None"):
                await control("k", reason=5)  # type: ignore[arg-type]
        assert (await breaker.get_status("k")).state is CircuitState.CLOSED
        assert not breaker.degraded


async def test_an_end_before_1970_is_refused_and_leaves_the_key_readable(
    breakers: Callable[..., CircuitBreaker],
) -> None:
    async with breakers() as breaker:
        for until in (datetime(1969, 12, 31, tzinfo=UTC), datetime.min.replace(tzinfo=UTC)):
            with pytest.raises(RecordValidationError, match="until must be 1970-01-01 or later"):
                await breaker.force_open("k", until=until)
        assert not breaker.degraded
        assert (await breaker.get_status("k")).state is CircuitState.CLOSED
        # the epoch itself is an end long past: the key is forced open and ends at once
        forced = await breaker.force_open("k", until=datetime(1970, 1, 1, tzinfo=UTC))
        assert forced.open_until_ts == 0.0
        async with breaker.guard("k"):  # the probe
            pass


async def _agen() -> AsyncIterator[int]:
    yield 1


def _gen() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize("fn", [_agen, _gen, 42], ids=["async generator", "generator", "int"])
async def test_protect_refuses_what_it_cannot_await_before_any_call_counts(fn: Any) -> None:
    async with CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1)) as breaker:
        with pytest.raises(ConfigurationError, match="protect"):
            breaker.protect("k")(fn)
        assert (await breaker.get_status("k")).consecutive_failures == 0


def _returns_agen() -> AsyncIterator[int]:
    return _agen()


class _Client:
    """Methods, bound as `CircuitBreaker.call` is often given them."""

    async def ask(self, n: int) -> int:
        return n

    async def pieces(self) -> AsyncIterator[int]:
        yield 1

    def pieces_of_a_sync_method(self) -> Iterator[int]:
        yield 1


@pytest.mark.parametrize(
    "fn",
    [_agen, _gen, 42, _returns_agen, _Client().pieces, _Client().pieces_of_a_sync_method],
    ids=[
        "async generator",
        "generator",
        "int",
        "returns an async generator",
        "async generator method",
        "generator method",
    ],
)
async def test_call_refuses_what_it_cannot_await_and_counts_nothing(fn: Any) -> None:
    async with CircuitBreaker(policy=BreakerPolicy(consecutive_failures=1)) as breaker:
        with pytest.raises(ConfigurationError, match=r"CircuitBreaker\.call .*guard"):
            await breaker.call("k", fn)
        status = await breaker.get_status("k")
        assert (status.state, status.consecutive_failures) == (CircuitState.CLOSED, 0)


async def test_call_awaits_a_bound_coroutine_method_and_a_partial_of_one() -> None:
    async with CircuitBreaker() as breaker:
        assert await breaker.call("k", _Client().ask, 3) == 3
        assert await breaker.call("k", functools.partial(_Client().ask, 4)) == 4
        assert (await breaker.get_status("k")).state is CircuitState.CLOSED


async def test_a_protected_function_returning_an_async_generator_is_refused_not_counted(
    tmp_path: Path,
) -> None:
    policy = BreakerPolicy(consecutive_failures=1)
    for store in (MemoryStateStore(), f"sqlite:///{tmp_path / 'state.db'}"):
        async with CircuitBreaker(store, policy) as breaker:
            ask: Callable[[], Any] = breaker.protect("k")(_returns_agen)  # type: ignore[arg-type]
            for _ in range(2):  # the store's admission, then the local view's
                with pytest.raises(ConfigurationError, match=r"CircuitBreaker\.protect .*guard"):
                    await ask()
            status = await breaker.get_status("k")
            assert (status.state, status.consecutive_failures) == (CircuitState.CLOSED, 0)


async def test_a_probe_given_what_call_cannot_await_gets_its_lease_back() -> None:
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=1e-3)
    async with CircuitBreaker(policy=policy) as breaker:
        await breaker.force_open("k", until=datetime(1970, 1, 1, tzinfo=UTC))
        with pytest.raises(ConfigurationError):
            await breaker.call("k", _returns_agen)  # type: ignore[arg-type]
        status = await breaker.get_status("k")
        assert (status.state, status.probes_in_flight) == (CircuitState.HALF_OPEN, 0)
        assert await breaker.call("k", _async_one) == 1  # the probe closes the key
        assert (await breaker.get_status("k")).state is CircuitState.CLOSED


async def _async_one() -> int:
    return 1
