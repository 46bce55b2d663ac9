"""
`ResponseCacheContract`: the behaviour every `ResponseCache` owes.

Exported from `empathy_models.testing.contracts`; subclass it and override the
``cache_url`` fixture (an empty cache per test).  The expiry test waits 1.2 s of real
time (stores expire by their own clock).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import pytest_asyncio

from ...abc import ResponseCache
from ...cache import MAX_TTL, cache_from_url
from ...exceptions import BackendClosedError, BackendError

__all__ = ["ResponseCacheContract"]


def _key() -> str:
    return os.urandom(32).hex()


@pytest.mark.asyncio
class ResponseCacheContract:
    """
    The contract of `ResponseCache`.  Override the ``cache_url`` fixture.

    Covers: get after set; a miss reads None; replacing a value; expiry; any finite TTL
    above 0 stored (kept `empathy_models.cache.MAX_TTL` at most); values over
    ``max_value_bytes`` not stored; a refused set leaving no earlier value; delete and
    clear (counting the unexpired entries it removed, each once between concurrent
    clears); any string a key, kept apart from every other; concurrent writers; a
    shared cache showing one instance's entries to another; close and use after close;
    for a backend with ``leases``: a lease held by one holder (of concurrent takers,
    in every instance, whether they take it alone or with the entry) until released or
    expired, renewed by its holder's take for the ttl that take gives, apart from the
    entries and clear, `ResponseCache.set_and_release` storing, then letting go of the
    holder's lease, and `ResponseCache.acquire_lease_and_get` reading the entry with
    the lease (one stored, then let go, in another instance too: never missed by the
    take that lease's release let through).
    """

    @pytest.fixture
    def cache_url(self) -> str:
        raise pytest.fail(f"{type(self).__name__} must override the 'cache_url' fixture")

    @pytest.fixture
    def cache_options(self) -> dict[str, Any]:
        return {}

    @pytest_asyncio.fixture(loop_scope="function")
    async def cache(
        self, cache_url: str, cache_options: dict[str, Any]
    ) -> AsyncIterator[ResponseCache]:
        backend = cache_from_url(cache_url, **cache_options)
        async with backend:
            yield backend

    async def test_get_returns_what_set_stored(self, cache: ResponseCache) -> None:
        key = _key()
        assert await cache.get(key) is None
        value = "réponse \u2603".encode() + bytes(range(256))
        await cache.set(key, value, 60)
        assert await cache.get(key) == value
        await cache.set(key, b"second", 60)
        assert await cache.get(key) == b"second"
        assert await cache.get(_key()) is None

    async def test_entries_expire(self, cache: ResponseCache) -> None:
        short, long, unread, leased = _key(), _key(), _key(), _key()
        renewed, shortened = _key(), _key()
        await cache.set(short, b"short", 0.5)
        await cache.set(long, b"long", 60)
        await cache.set(unread, b"unread", 0.5)
        if cache.leases:  # a lease expires too (one sleep for both)
            assert await cache.acquire_lease(leased, "crashed", 0.5) is None
            assert await cache.acquire_lease(long, "long", 60) is None
            # its holder's take renews a lease for the new ttl, longer or shorter (how
            # a run whose call outlasts its lease keeps it)
            assert await cache.acquire_lease(renewed, "holder", 0.5) is None
            assert await cache.acquire_lease(renewed, "holder", 60) is None
            assert await cache.acquire_lease(shortened, "holder", 60) is None
            assert await cache.acquire_lease(shortened, "holder", 0.5) is None
        await anyio.sleep(1.2)
        assert await cache.get(short) is None
        assert await cache.get(long) == b"long"
        if cache.leases:
            # its holder's release finds no lease: an expired lease is no one's
            assert await cache.release_lease(leased, "crashed") is False
            assert await cache.acquire_lease(leased, "next", 60) is None
            held = await cache.acquire_lease(long, "next", 60)
            assert held is not None and held[0] == "long"
            held = await cache.acquire_lease(renewed, "next", 60)
            assert held is not None and held[0] == "holder" and held[1] > 30, held
            assert await cache.acquire_lease(shortened, "next", 60) is None
            # nor read with a lease
            assert await cache.acquire_lease_and_get(short, "next", 60) == (None, None)
        # an expired entry the backend has not dropped yet is not counted by clear
        assert await cache.clear() == 1

    async def test_any_finite_ttl_is_stored_kept_max_ttl_at_most(
        self, cache: ResponseCache
    ) -> None:
        # "keep it for good": stored alike by every backend (kept `MAX_TTL` at most),
        # never an error
        for ttl in (MAX_TTL, MAX_TTL * 2, 1e13, 1e17, 1e300, sys.float_info.max):
            key = _key()
            await cache.set(key, b"for good", ttl)
            assert await cache.get(key) == b"for good", ttl

    async def test_values_over_the_bound_are_not_stored(self, cache: ResponseCache) -> None:
        limit = getattr(cache, "max_value_bytes", None)
        if limit is None:
            pytest.skip("the cache has no value bound")
        key = _key()
        await cache.set(key, b"x" * (limit + 1), 60)
        assert await cache.get(key) is None
        await cache.set(key, b"x" * limit, 60)
        assert await cache.get(key) == b"x" * limit

    @pytest.mark.parametrize(
        ("size", "ttl"),
        [(1, 0), (1, -1), (1, float("nan")), (1, float("inf")), (None, 60)],
        ids=["ttl 0", "ttl -1", "ttl nan", "ttl inf", "too large"],
    )
    async def test_a_refused_set_leaves_no_earlier_value(
        self, cache: ResponseCache, size: int | None, ttl: float
    ) -> None:
        # set replaces any value: one it refuses (too large, a TTL that is no time to
        # keep it) must not leave the earlier value to be served as its answer
        if size is None:
            limit = getattr(cache, "max_value_bytes", None)
            if limit is None:
                pytest.skip("the cache has no value bound")
            size = limit + 1
        key, other = _key(), _key()
        await cache.set(key, b"earlier", 60)
        await cache.set(other, b"kept", 60)
        await cache.set(key, b"x" * size, ttl)
        assert await cache.get(key) is None
        assert await cache.get(other) == b"kept"

    async def test_clear_counts_each_entry_it_removed_once(
        self, cache: ResponseCache, cache_url: str, cache_options: dict[str, Any]
    ) -> None:
        # two clears at once (two processes sharing the cache) remove each entry once
        # between them, and count it once
        keys = [_key() for _ in range(40)]
        for k in keys:
            await cache.set(k, b"v", 60)
        other = cache_from_url(cache_url, **cache_options) if cache.shared else cache
        async with contextlib.AsyncExitStack() as stack:
            if other is not cache:
                await stack.enter_async_context(other)
                assert await other.get(keys[0]) == b"v"  # connected, as a process in use
            counts: list[int] = []

            async def clear(which: ResponseCache) -> None:
                counts.append(await which.clear())

            async with anyio.create_task_group() as tg:
                tg.start_soon(clear, cache)
                tg.start_soon(clear, other)
        assert sum(counts) == len(keys), counts
        assert [await cache.get(k) for k in keys] == [None] * len(keys)
        assert await cache.clear() == 0

    async def test_delete_and_clear(self, cache: ResponseCache) -> None:
        keys = [_key() for _ in range(3)]
        for k in keys:
            await cache.set(k, b"v", 60)
        assert await cache.delete(keys[0]) is True
        assert await cache.delete(keys[0]) is False
        assert await cache.get(keys[0]) is None
        assert await cache.clear() == 2
        assert [await cache.get(k) for k in keys] == [None, None, None]

    async def test_any_string_is_a_key_kept_apart(self, cache: ResponseCache) -> None:
        # a caller's own key (no request_key digest) may hold what UTF-8 cannot encode
        # (lone surrogates; a pair of them is not the character they would encode
        # together), a NUL, or be long; and it may be spelled like another key's bytes
        base = _key()
        odd = base + "\ud800"
        long = os.urandom(2048).hex()
        keys = [
            *(base, odd, base + "\udc80", base + "\ud800\udc00", base + "\U00010000"),
            *(base + "\x00", "\x00", "\udfff", "", "\x01" + base, "\\" + base),
            *(
                odd.encode("utf-8", "surrogatepass").hex(),
                "\x01" + odd.encode("utf-8", "surrogatepass").hex(),
            ),
            *(long, long + "\ud800", long[:-1]),
        ]
        assert len(set(keys)) == len(keys)
        for i, key in enumerate(keys):
            await cache.set(key, f"answer {i}".encode(), 600)
        assert [await cache.get(key) for key in keys] == [
            f"answer {i}".encode() for i in range(len(keys))
        ]
        assert await cache.delete(odd) is True
        assert await cache.delete(odd) is False
        assert await cache.get(odd) is None and await cache.get(base) == b"answer 0"
        await cache.set(long + "\ud800", b"replaced", 600)
        assert await cache.get(long + "\ud800") == b"replaced"
        assert await cache.get(long) == f"answer {keys.index(long)}".encode()
        assert await cache.clear() == len(keys) - 1
        assert [await cache.get(key) for key in keys] == [None] * len(keys)

    async def test_concurrent_writers_leave_every_entry(self, cache: ResponseCache) -> None:
        keys = [_key() for _ in range(50)]

        async def put(i: int) -> None:
            await cache.set(keys[i], str(i).encode(), 60)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(put, i)
        assert [await cache.get(k) for k in keys] == [str(i).encode() for i in range(50)]

    async def test_a_shared_cache_shows_one_instance_to_another(
        self, cache: ResponseCache, cache_url: str, cache_options: dict[str, Any]
    ) -> None:
        if not cache.shared:
            pytest.skip(f"{type(cache).__name__} is not shared between instances")
        async with cache_from_url(cache_url, **cache_options) as other:
            key = _key()
            await cache.set(key, b"from one", 60)
            assert await other.get(key) == b"from one"

    async def test_a_lease_is_one_holders_until_released(
        self, cache: ResponseCache, cache_url: str, cache_options: dict[str, Any]
    ) -> None:
        if not cache.leases:
            pytest.skip(f"{type(cache).__name__} keeps no leases")
        key, odd = _key(), _key() + "\ud800"
        assert await cache.acquire_lease(key, "first", 30) is None
        held = await cache.acquire_lease(key, "second", 30)
        assert held is not None and held[0] == "first" and 0 < held[1] <= 30, held
        assert await cache.acquire_lease(key, "first", 30) is None  # renewed by its holder
        # apart from the entries: no entry, not counted nor removed by clear
        assert await cache.get(key) is None
        await cache.set(key, b"answer", 60)
        assert await cache.clear() == 1
        assert (await cache.acquire_lease(key, "second", 30) or ("",))[0] == "first"
        # apart from every other key's lease
        assert await cache.acquire_lease(odd, "second", 30) is None
        assert await cache.acquire_lease(odd[:-1] + "x", "second", 30) is None
        assert await cache.release_lease(key, "second") is False  # another's stays
        assert (await cache.acquire_lease(key, "second", 30) or ("",))[0] == "first"
        if cache.shared:
            async with cache_from_url(cache_url, **cache_options) as other:
                assert (await other.acquire_lease(key, "third", 30) or ("",))[0] == "first"
                assert await other.release_lease(key, "first") is True
                assert await cache.acquire_lease(key, "third", 30) is None
        else:
            assert await cache.release_lease(key, "first") is True
            assert await cache.acquire_lease(key, "third", 30) is None
        assert await cache.release_lease(key, "third") is True
        assert await cache.release_lease(key, "third") is False
        for ttl in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="ttl"):
                await cache.acquire_lease(key, "fourth", ttl)
        with pytest.raises(TypeError, match="ttl"):
            await cache.acquire_lease(key, "fourth", "30")  # type: ignore[arg-type]

    async def test_set_and_release_stores_then_lets_go_of_the_holders_lease(
        self, cache: ResponseCache
    ) -> None:
        if not cache.leases:
            pytest.skip(f"{type(cache).__name__} keeps no leases")
        key, other, refused = _key(), _key(), _key()
        for k in (key, other, refused):
            assert await cache.acquire_lease(k, "holder", 30) is None
        await cache.set_and_release(key, b"answer", 60, "holder")
        assert await cache.get(key) == b"answer"
        assert await cache.acquire_lease(key, "next", 30) is None
        await cache.set_and_release(other, b"answer", 60, "not the holder")  # another's stays
        assert await cache.get(other) == b"answer"
        assert (await cache.acquire_lease(other, "next", 30) or ("",))[0] == "holder"
        # a value it refuses: no entry (nor an earlier one), and the lease let go all the same
        await cache.set(refused, b"earlier", 60)
        await cache.set_and_release(refused, b"x", float("nan"), "holder")
        assert await cache.get(refused) is None
        assert await cache.acquire_lease(refused, "next", 30) is None

    async def test_a_take_reads_the_entry_with_the_lease(
        self, cache: ResponseCache, cache_url: str, cache_options: dict[str, Any]
    ) -> None:
        if not cache.leases:
            pytest.skip(f"{type(cache).__name__} keeps no leases")
        key, raced = _key(), _key()
        assert await cache.acquire_lease_and_get(key, "first", 30) == (None, None)
        held, value = await cache.acquire_lease_and_get(key, "second", 30)
        assert held is not None and held[0] == "first" and 0 < held[1] <= 30, held
        assert value is None
        # an entry stored under another's lease: read, the lease still the holder's
        await cache.set(key, b"answer", 60)
        held, value = await cache.acquire_lease_and_get(key, "second", 30)
        assert held is not None and held[0] == "first" and value == b"answer", (held, value)
        # renewed by its holder, the entry read alike
        assert await cache.acquire_lease_and_get(key, "first", 30) == (None, b"answer")
        # let go: the next take is granted, and reads the entry; taken all the same
        assert await cache.release_lease(key, "first") is True
        assert await cache.acquire_lease_and_get(key, "second", 30) == (None, b"answer")
        assert (await cache.acquire_lease(key, "third", 30) or ("",))[0] == "second"
        # the race between processes: one's read missed; another takes the lease,
        # stores its answer and lets go; the first's take, granted, reads that answer
        other = cache_from_url(cache_url, **cache_options) if cache.shared else cache
        async with contextlib.AsyncExitStack() as stack:
            if other is not cache:
                await stack.enter_async_context(other)
            assert await cache.get(raced) is None
            assert await other.acquire_lease_and_get(raced, "other", 30) == (None, None)
            await other.set_and_release(raced, b"stored meanwhile", 60, "other")
            assert await cache.acquire_lease_and_get(raced, "first", 30) == (
                None,
                b"stored meanwhile",
            )
        for ttl in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="ttl"):
                await cache.acquire_lease_and_get(key, "fourth", ttl)
        with pytest.raises(TypeError, match="ttl"):
            await cache.acquire_lease_and_get(key, "fourth", "30")  # type: ignore[arg-type]

    async def test_a_lease_goes_to_one_of_concurrent_takers(
        self, cache: ResponseCache, cache_url: str, cache_options: dict[str, Any]
    ) -> None:
        if not cache.leases:
            pytest.skip(f"{type(cache).__name__} keeps no leases")
        key = _key()
        other = cache_from_url(cache_url, **cache_options) if cache.shared else cache
        async with contextlib.AsyncExitStack() as stack:
            if other is not cache:
                await stack.enter_async_context(other)
            taken: list[str] = []

            async def take(which: ResponseCache, holder: str, with_entry: bool) -> None:
                if with_entry:
                    held, _ = await which.acquire_lease_and_get(key, holder, 30)
                else:
                    held = await which.acquire_lease(key, holder, 30)
                if held is None:
                    taken.append(holder)

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(take, cache if i % 2 else other, f"holder {i}", i % 4 < 2)
        assert len(taken) == 1, taken

    async def test_use_after_close_raises(self, cache: ResponseCache) -> None:
        await cache.aclose()
        await cache.aclose()
        with pytest.raises(BackendClosedError) as info:
            await cache.get(_key())
        assert isinstance(info.value, BackendError)
        with pytest.raises(BackendClosedError):
            await cache.set(_key(), b"v", 1)
