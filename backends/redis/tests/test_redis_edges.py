"""Redis URLs with a typo or a bad database fail at construction, naming what is wrong."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from empathy_models_redis import (
    DEFAULT_KEY_TTL,
    DEFAULT_PREFIX,
    RedisCircuitStateStore,
    RedisQuotaStore,
    RedisResponseCache,
)
from redis.asyncio.cluster import RedisCluster

from empathy_models import BreakerPolicy, CircuitBreaker, ConfigurationError, state_store_from_url
from empathy_models.limits import BudgetUsage
from empathy_models.records import CircuitState
from tests._cancel_trials import cancel_during_admission


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("socket_timout=1", "'socket_timout' .*did you mean 'socket_timeout'"),
        ("key_tll=60", "'key_tll' .*did you mean 'key_ttl'"),
        ("colour=blue", "'colour'"),
    ],
)
def test_an_unknown_url_option_is_refused_at_construction(
    redis_url: str, query: str, named: str
) -> None:
    url = f"{redis_url}?{query}"
    with pytest.raises(ConfigurationError, match=named) as info:
        state_store_from_url(url)
    assert "known options:" in str(info.value) and "socket_timeout" in str(info.value)
    with pytest.raises(ConfigurationError, match=named):
        CircuitBreaker(store=url)


@pytest.mark.parametrize(
    "name",
    [
        "connection_class",
        "parser_class",
        "retry",
        "redis_connect_func",
        "credential_provider",
        "socket_keepalive_options",
    ],
)
def test_an_option_no_url_can_hold_is_refused_in_the_query_saying_why(
    redis_url: str, name: str
) -> None:
    # a client option that takes a Python object (a class, a callable, a policy) was
    # taken from the URL's text: a bare AttributeError at construction, or a TypeError
    # at every later call
    with pytest.raises(ConfigurationError, match=f"{name} takes a Python object"):
        state_store_from_url(f"{redis_url}?{name}=x")


def test_an_unknown_client_option_is_refused_at_construction(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="client option 'socket_timout'"):
        RedisCircuitStateStore(redis_url, socket_timout=1)


@pytest.mark.parametrize("path", ["/abc", "/1x", "/0/extra", "/-1"])
def test_a_database_that_is_not_a_number_is_refused(path: str) -> None:
    with pytest.raises(ConfigurationError, match="must be a database number"):
        state_store_from_url(f"redis://127.0.0.1:6379{path}")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/13?db=3", "redis://127.0.0.1/0?db=0"])
def test_a_database_given_in_the_path_and_the_query_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="database is given twice"):
        state_store_from_url(url)
    with pytest.raises(ConfigurationError, match="database is given twice"):
        RedisQuotaStore(url)
    with pytest.raises(ConfigurationError, match="database is given twice"):
        RedisResponseCache(url)


def test_a_database_given_in_the_path_and_as_an_option_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="database is given twice"):
        RedisCircuitStateStore("redis://127.0.0.1:6379/13", db=3)


@pytest.mark.parametrize(
    ("url", "options", "shown_as"),
    [
        ("redis://:pw-secret@127.0.0.1:6379/?db=-1", {}, "-1"),
        ("redis://:pw-secret@127.0.0.1:6379", {"db": -2}, "-2"),
        ("redis://:pw-secret@127.0.0.1:6379", {"db": "x"}, "'x'"),
    ],
)
def test_a_database_that_is_no_number_from_0_is_refused_in_the_query_or_options(
    url: str, options: dict[str, Any], shown_as: str
) -> None:
    # /-1 in the path was refused, but ?db=-1 and db=-2 were taken and every call then
    # failed ("DB index is out of range"), and db="x" raised a bare ValueError
    for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
        with pytest.raises(
            ConfigurationError, match=f"the database must be a number >= 0, got {shown_as}$"
        ) as info:
            build(url, **options)
        assert "pw-secret" not in str(info.value)


async def test_a_database_given_once_is_used() -> None:
    # in the path, in the query of a URL without one, or as an option
    for store, database in (
        (RedisCircuitStateStore("redis://127.0.0.1:6379/13"), 13),
        (RedisCircuitStateStore("redis://127.0.0.1:6379?db=3"), 3),
        (RedisCircuitStateStore("redis://127.0.0.1:6379/?db=4"), 4),
        (RedisCircuitStateStore("redis://127.0.0.1:6379", db=5), 5),
    ):
        async with store:
            assert store.channel == f"empathy:cb:@db{database}"


@pytest.mark.parametrize(
    ("url", "options", "named"),
    [
        (
            "redis://:pw-userinfo@127.0.0.1:6379/15?password=pw-query",
            {},
            "password is given twice, in the URL's userinfo and in the URL's query",
        ),
        (
            "redis://:pw-userinfo@127.0.0.1:6379/15",
            {"password": "pw-option"},
            "password is given twice, in the URL's userinfo and as a client option",
        ),
        (
            "redis://127.0.0.1:6379/15?password=pw-query",
            {"password": "pw-option"},
            "password is given twice, in the URL's query and as a client option",
        ),
        (
            "redis://127.0.0.1:6379/15?password=pw-query&password=pw-again",
            {},
            "password is given twice, in the URL's query and again in the URL's query",
        ),
        (
            "redis://alice:pw-userinfo@127.0.0.1:6379/15?username=bob",
            {},
            "username is given twice, in the URL's userinfo and in the URL's query",
        ),
        (
            "redis://127.0.0.1:6379/15?socket_timeout=1",
            {"socket_timeout": 3},
            "socket_timeout is given twice, in the URL's query and as a client option",
        ),
        # the host and port of the URL's address won over the query's and the options'
        (
            "redis://127.0.0.1:6379/15?host=elsewhere",
            {},
            "host is given twice, in the URL's address and in the URL's query",
        ),
        (
            "redis://127.0.0.1:6379/15",
            {"port": 6380},
            "port is given twice, in the URL's address and as a client option",
        ),
    ],
)
def test_a_setting_given_twice_is_refused_without_showing_a_password(
    url: str, options: dict[str, Any], named: str
) -> None:
    # redis-py let one silently win (the userinfo over the query, the query over the
    # options, the first of a repeated option): a password that was not the one meant
    for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
        with pytest.raises(ConfigurationError, match=named) as info:
            build(url, **options)
        assert "pw-" not in str(info.value)
    if not options:
        with pytest.raises(ConfigurationError, match=r"given (twice|more than once)") as info:
            state_store_from_url(url)
        assert "pw-" not in str(info.value)


@pytest.mark.parametrize(
    ("query", "options", "named"),
    [
        ("prefix=app-url:", {"prefix": "app-keyword:"}, "prefix"),
        ("key_ttl=60", {"key_ttl": 120}, "key_ttl"),
    ],
)
def test_a_store_option_in_the_query_and_as_a_keyword_is_refused(
    query: str, options: dict[str, Any], named: str
) -> None:
    # the URL's value silently won: a prefix= keyword was ignored, and the store wrote
    # its keys where another application's might be
    url = f"redis://:pw-secret@127.0.0.1:6379/15?{query}"
    message = f"{named} is given twice, in the URL's query and as a keyword"
    for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
        with pytest.raises(ConfigurationError, match=message) as info:
            build(url, **options)
        assert "pw-secret" not in str(info.value)
    with pytest.raises(ConfigurationError, match=message):
        state_store_from_url(url, **options)


@pytest.mark.parametrize("query", ["prefix=", "prefix", "socket_timeout=1&prefix="])
def test_an_empty_prefix_in_the_url_is_refused(query: str) -> None:
    # an empty ?prefix= (a variable that was not set) put every store's keys at the
    # top of the database, "cb:", "quota:", "cache:", shared with any other program
    # whose root was left empty too; the prefix= keyword refuses "" already
    url = f"redis://:pw-secret@127.0.0.1:6379/15?{query}"
    for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
        with pytest.raises(ConfigurationError, match="prefix in the Redis URL is empty") as info:
            build(url)
        assert "pw-secret" not in str(info.value)
    with pytest.raises(ConfigurationError, match="prefix in the Redis URL is empty"):
        CircuitBreaker(store=url)


async def test_a_keyword_equal_to_the_default_is_given_all_the_same(redis_url: str) -> None:
    # "given" is whether the keyword was passed, not whether its value is the default's
    url = f"{redis_url}?prefix=app:&key_ttl=60"
    with pytest.raises(ConfigurationError, match="prefix is given twice"):
        RedisCircuitStateStore(url, prefix=DEFAULT_PREFIX)
    with pytest.raises(ConfigurationError, match="key_ttl is given twice"):
        RedisCircuitStateStore(url, key_ttl=DEFAULT_KEY_TTL)
    async with RedisCircuitStateStore(url) as store:
        assert (store.prefix, store.key_ttl) == ("app:cb:", 60.0)
    async with RedisCircuitStateStore(redis_url, prefix=DEFAULT_PREFIX) as store:
        assert (store.prefix, store.key_ttl) == (DEFAULT_PREFIX, DEFAULT_KEY_TTL)
        assert type(store.prefix) is str and type(store.key_ttl) is float


@pytest.mark.parametrize(
    "url",
    [
        "redis://alice@127.0.0.1:6379/15?password=pw-query",
        "redis://:pw-userinfo@127.0.0.1:6379/15?username=alice",
        "redis://:@127.0.0.1:6379/15?password=pw-query",
    ],
)
async def test_a_user_name_and_a_password_given_once_each_are_accepted(url: str) -> None:
    # the user name in one place and the password in the other is no conflict, nor is
    # an empty password in the userinfo (redis-py ignores it)
    async with RedisCircuitStateStore(url) as store:
        assert "pw-" not in repr(store)


@pytest.mark.parametrize(
    ("query", "options", "named"),
    [
        ("ssl_cert_reqs=none", {}, r"\['ssl_cert_reqs'\] do not apply .* rediss:// URLs only"),
        ("ssl_check_hostname=false", {}, r"\['ssl_check_hostname'\] do not apply"),
        ("", {"ssl_ca_certs": "/etc/ca.pem"}, r"\['ssl_ca_certs'\] do not apply"),
        ("path=/tmp/redis.sock", {}, r"\['path'\] do not apply to a redis:// connection"),
    ],
)
def test_an_option_the_connection_does_not_take_is_refused_at_construction(
    query: str, options: dict[str, Any], named: str
) -> None:
    # a TLS option with redis:// passed the name check (rediss:// takes it), then every
    # call failed with redis-py's TypeError (AbstractConnection.__init__() got an
    # unexpected keyword argument 'ssl_cert_reqs'), not a StateStoreError
    url = f"redis://:pw-secret@127.0.0.1:6379/15?{query}"
    for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
        with pytest.raises(ConfigurationError, match=named) as info:
            build(url, **options)
        assert "pw-secret" not in str(info.value)


@pytest.mark.parametrize("connection", [lambda: RedisCluster(host="127.0.0.1", port=1), dict])
def test_a_connection_that_is_no_url_nor_a_single_server_client_is_refused_saying_why(
    connection: Callable[[], Any],
) -> None:
    # a RedisCluster client was refused as "RedisCircuitStateStore needs a redis:// URL
    # or a redis.asyncio.Redis", the quota store and the cache too (naming a class the
    # caller never used), while the README said every operation worked on Redis Cluster
    given = connection()
    cluster = isinstance(given, RedisCluster)
    for build in (RedisCircuitStateStore, RedisQuotaStore, RedisResponseCache):
        message = f"^{build.__name__} needs a redis:// URL or a redis.asyncio.Redis, got "
        message += "a RedisCluster: Redis Cluster is not supported" if cluster else "dict$"
        with pytest.raises(ConfigurationError, match=message):
            build(given)


def test_tls_options_are_taken_with_rediss() -> None:
    RedisCircuitStateStore("rediss://127.0.0.1:6379/15?ssl_cert_reqs=none")
    RedisCircuitStateStore("rediss://127.0.0.1:6379/15", ssl_ca_certs="/etc/ca.pem")


def test_a_port_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="not a valid Redis URL"):
        state_store_from_url("redis://127.0.0.1:notaport/0")


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("socket_timeout=nan", "socket_timeout must be a finite number of seconds > 0, got nan"),
        ("socket_timeout=inf", "socket_timeout must be .* got inf"),
        ("socket_timeout=0", "socket_timeout must be .* got 0.0"),
        ("socket_timeout=-1", "socket_timeout must be .* got -1.0"),
        ("socket_connect_timeout=nan", "socket_connect_timeout must be .* got nan"),
        ("timeout=nan", "timeout must be .* got nan"),
        ("health_check_interval=-1", "health_check_interval must be .* >= 0, got -1"),
    ],
)
def test_a_wait_that_is_no_number_of_seconds_is_refused(query: str, named: str) -> None:
    # redis-py takes any float: nan or inf stalled every call on a server that does not
    # answer for good (past any deadline), 0 or less failed every call at once
    url = f"redis://:s3cret@127.0.0.1:6379/15?{query}"
    for build in (state_store_from_url, RedisQuotaStore, RedisResponseCache):
        with pytest.raises(ConfigurationError, match=named) as info:
            build(url)
        assert "s3cret" not in str(info.value)
    name, _, value = query.partition("=")
    options: dict[str, Any] = {name: float(value)}
    with pytest.raises(ConfigurationError, match=named):
        RedisCircuitStateStore("redis://127.0.0.1:6379/15", **options)


def test_no_limit_on_a_wait_may_still_be_asked_for() -> None:
    store = RedisCircuitStateStore(
        "redis://127.0.0.1:6379/15", socket_timeout=None, socket_connect_timeout=None, timeout=None
    )
    assert store.shared


async def test_valid_options_still_work_end_to_end(redis_store_url: str) -> None:
    url = redis_store_url + "&socket_timeout=1.5&health_check_interval=10"
    async with CircuitBreaker(store=url) as breaker:
        async with breaker.guard("k"):
            pass
        assert not breaker.degraded
        assert (await breaker.get_status("k")).state.value == "closed"


async def test_a_cancel_during_a_half_open_admission_neither_leaks_nor_is_swallowed(
    redis_store_url: str,
) -> None:
    # items 6 and 13: the lease comes back, and a cancellation redis-py swallowed still
    # stops the guarded call (Task.cancelling() is checked after the admission)
    async with CircuitBreaker(store=redis_store_url, local_view_ttl=0) as breaker:
        result = await cancel_during_admission(breaker, "anthropic", trials=200)
    assert result.cancelled_before_the_body >= 10
    assert result.leaked == 0
    assert result.ran_after_cancel == 0


async def test_keys_and_texts_with_the_replys_separator_characters_round_trip(
    redis_store_url: str,
) -> None:
    # the script's reply is one string whose values are separated by \x1f, with \x1b
    # escaping: a key or a reason holding either (or the escape sequences themselves)
    # comes back exactly
    key = "provider\x1fmodel\x1b|odd\x1b\x1b"
    reason = "maintenance\x1f window \x1b| per \x1b\x1b ticket \x1bx"
    async with CircuitBreaker(store=redis_store_url) as breaker:
        async with breaker.guard(key):
            pass
        await breaker.force_open(key, reason=reason)
        status = await breaker.get_status(key)
        assert status.key == key
        assert status.reason == reason
        assert status.state.value == "forced_open"
        await breaker.reset(key)
        assert (await breaker.get_status(key)).state.value == "closed"


@pytest.mark.parametrize(
    "make",
    [RedisCircuitStateStore, RedisResponseCache, RedisQuotaStore],
    ids=["state", "cache", "quota"],
)
def test_a_prefix_redis_cannot_be_written_is_refused_at_construction(
    redis_url: str, make: Callable[..., object]
) -> None:
    with pytest.raises(ConfigurationError, match="prefix must be text"):
        make(redis_url, prefix="empathy\ud800:")


@pytest.mark.parametrize("decode_responses", [False, True], ids=["bytes", "decoding"])
async def test_the_cache_reads_bytes_from_any_client(
    redis_url: str, redis_prefix: str, decode_responses: bool
) -> None:
    # keys UTF-8 cannot encode are written as their surrogatepass bytes and values are
    # any bytes: a client that decodes responses must not try to decode either
    client = aioredis.Redis.from_url(redis_url, decode_responses=decode_responses)
    try:
        async with RedisResponseCache(client, prefix=redis_prefix) as cache:
            await cache.set("k\udc80", bytes(range(256)), 60)
            await cache.set("k", "réponse".encode(), 60)
            assert await cache.get("k\udc80") == bytes(range(256))
            assert await cache.get("k") == "réponse".encode()
            # and a take of a lease, which reads the entry with it
            taken = await cache.acquire_lease_and_get("k\udc80", "holder", 30)
            assert taken == (None, bytes(range(256)))
            assert await client.exists(redis_prefix.encode() + b"k\xed\xb2\x80")
            assert await cache.clear() == 2
            assert await cache.get("k") is None
    finally:
        await client.aclose()


@pytest.mark.parametrize("decode_responses", [False, True], ids=["bytes", "decoding"])
async def test_budget_usage_is_read_through_any_client(
    redis_url: str, redis_prefix: str, decode_responses: bool
) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=decode_responses)
    start = time.time() - 60.0
    end = start + 3_600.0
    try:
        async with RedisQuotaStore(client, prefix=redis_prefix) as quota:
            for key, amount in (("daily", 5), ("team\nb", 7)):
                grant = await quota.reserve(
                    key, window_start=start, window_end=end, amount=amount, limit=100
                )
                assert grant.granted
            usage = await quota.usage("daily", window_start=start, window_end=end)
            listed = await quota.usages()
            assert await quota.usage("none", window_start=start, window_end=end) == BudgetUsage(
                key="none", window_start=start, window_end=end
            )
    finally:
        await client.aclose()
    assert (usage.key, usage.held, usage.reserved) == ("daily", 5, 5)
    assert [(u.key, u.held, u.window_start) for u in listed] == [
        ("daily", 5, start),
        ("team\nb", 7, start),
    ]


@pytest.mark.parametrize("decode_responses", [False, True], ids=["bytes", "decoding"])
async def test_keys_are_read_back_in_the_clients_encoding(
    redis_url: str, redis_prefix: str, decode_responses: bool
) -> None:
    # the scripts got keys in the client's encoding (encoding="latin-1"), but snapshot(),
    # snapshot_all(), usages() and limit_overrides() read replies as UTF-8: a bare
    # UnicodeDecodeError for a key such as "café", from `breaker status` too
    options: dict[str, Any] = {"encoding": "latin-1", "decode_responses": decode_responses}
    start = time.time() - 60.0
    async with (
        RedisCircuitStateStore(redis_url, prefix=redis_prefix + "cb:", **options) as store,
        CircuitBreaker(store) as breaker,
        RedisQuotaStore(redis_url, prefix=redis_prefix + "quota:", **options) as quota,
    ):
        await breaker.force_open("café", reason="à l'arrêt")
        status = await breaker.get_status("café")
        listed = [s.key for s in await store.snapshot_all()]
        grant = await quota.reserve(
            "équipe", window_start=start, window_end=start + 3_600.0, amount=5, limit=9
        )
        await quota.set_limit("équipe", 9)
        usages = [(u.key, u.held) for u in await quota.usages()]
        overrides = await quota.limit_overrides()
    assert (status.state.value, status.reason, listed) == ("forced_open", "à l'arrêt", ["café"])
    assert grant.granted and usages == [("équipe", 5)] and overrides == {"équipe": 9}


@pytest.mark.parametrize(
    ("encoding", "said"),
    [("utf-16", "writes ASCII as ASCII"), ("no-such-codec", "unknown encoding")],
    ids=["utf-16", "unknown"],
)
@pytest.mark.parametrize(
    "make",
    [RedisCircuitStateStore, RedisResponseCache, RedisQuotaStore],
    ids=["state", "cache", "quota"],
)
def test_an_encoding_the_scripts_cannot_read_is_refused_at_construction(
    redis_url: str, make: Callable[..., object], encoding: str, said: str
) -> None:
    # the scripts' operations, numbers and field names are ASCII: UTF-16 sent them as
    # something no script reads, an unknown codec failed at the first command
    with pytest.raises(ConfigurationError, match=f"encoding {encoding!r}.*{said}"):
        make(redis_url, encoding=encoding)


async def test_names_the_clients_encoding_cannot_write_are_refused_saying_which(
    redis_url: str, redis_prefix: str
) -> None:
    # with encoding="latin-1", a key outside Latin-1 ended every operation in a bare
    # UnicodeEncodeError from deep inside the store
    options: dict[str, Any] = {"encoding": "latin-1"}
    start = time.time() - 60.0
    window: dict[str, Any] = {"window_start": start, "window_end": start + 3_600.0}
    async with (
        RedisCircuitStateStore(redis_url, prefix=redis_prefix + "cb:", **options) as store,
        CircuitBreaker(store) as breaker,
        RedisQuotaStore(redis_url, prefix=redis_prefix + "quota:", **options) as quota,
    ):
        said = r"must be text the client's encoding \(latin-1\) can write, got '模型'"
        with pytest.raises(ConfigurationError, match="a breaker key " + said):
            await breaker.force_open("模型")
        with pytest.raises(ConfigurationError, match="a breaker key " + said):
            await store.snapshot("模型")
        with pytest.raises(ConfigurationError, match="a budget key " + said):
            await quota.reserve("模型", **window, amount=1, limit=9)
        with pytest.raises(ConfigurationError, match="a budget key " + said):
            await quota.usage("模型", **window)
        with pytest.raises(ConfigurationError, match="a budget key " + said):
            await quota.reset_budget("模型")
        with pytest.raises(ConfigurationError, match="a budget key " + said):
            await quota.set_limit("模型", 5)
        with pytest.raises(ConfigurationError, match="a rate-limit key " + said):
            await quota.acquire("模型", cost=1.0, interval=1.0, burst=1.0, max_wait=0.0)
        # a Latin-1 name is written as before
        assert (await quota.reserve("équipe", **window, amount=1, limit=9)).granted


async def test_error_texts_the_clients_encoding_cannot_write_are_kept_escaped(
    redis_url: str, redis_prefix: str
) -> None:
    # a provider's error text outside Latin-1 (encoding="latin-1") replaced the call's
    # own error with a UnicodeEncodeError, and no failure was ever counted: the circuit
    # never opened
    policy = BreakerPolicy(consecutive_failures=1)
    async with (
        RedisCircuitStateStore(redis_url, prefix=redis_prefix, encoding="latin-1") as store,
        CircuitBreaker(store, policy=policy) as breaker,
    ):

        async def overloaded() -> None:
            raise RuntimeError("服务器过载: overloaded")

        with pytest.raises(RuntimeError, match="服务器过载"):
            await breaker.call("openai:gpt", overloaded)
        opened = await store.snapshot("openai:gpt")
        forced = await breaker.force_open("other", reason="维护 à 10h")
    assert opened.state.value == "open"
    assert opened.last_error is not None
    assert "\\u670d\\u52a1\\u5668\\u8fc7\\u8f7d: overloaded" in opened.last_error
    assert forced.reason == "\\u7ef4\\u62a4 à 10h"


@pytest.mark.parametrize(
    "bound", [0, 2**63, 10**400, 10**5000], ids=["0", "2**63", "10**400", "giant"]
)
def test_a_cache_value_bound_past_the_largest_is_refused(bound: int) -> None:
    with pytest.raises(ConfigurationError, match=r"max_value_bytes must be >= 1 and < 2\*\*63"):
        RedisResponseCache("redis://127.0.0.1:6379/15", max_value_bytes=bound)


@pytest.mark.parametrize(
    "key_ttl",
    ["60", None, True, 0, 0.5, float("nan"), float("inf"), 10**400],
    ids=["text", "None", "bool", "0", "0.5", "nan", "inf", "10**400"],
)
def test_a_key_ttl_that_is_no_number_of_seconds_is_refused(key_ttl: object) -> None:
    options: dict[str, Any] = {"key_ttl": key_ttl}
    with pytest.raises(ConfigurationError, match="key_ttl must be a number of seconds >= 1"):
        RedisCircuitStateStore("redis://127.0.0.1:6379/15", **options)


async def test_one_prefixed_url_holds_breakers_budgets_and_the_cache_apart(
    redis_store_url: str, redis_prefix: str
) -> None:
    from empathy_models import Budget, EmpathyLLMExecutor, ExecutionContext, OpenAIProvider
    from empathy_models.limits import quota_store_from_url
    from empathy_models.testing import FakeLLMServer

    async with (
        FakeLLMServer() as server,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key="k", base_url=server.openai_base_url)],
            telemetry_store="null://",
            breaker=redis_store_url,
            quota_store=redis_store_url,
            cache=redis_store_url,
            budgets=[Budget(limit_usd=1.0, window="day", name="daily")],
        ) as executor,
    ):
        for i in range(2):
            ctx = ExecutionContext(model="gpt-4o", temperature=0, cache_ttl=60)
            await executor.run(f"q{i}", ctx)
    async with CircuitBreaker(store=redis_store_url) as breaker:
        keys = [s.key for s in await breaker.snapshot()]
        await breaker.reset()  # every breaker key, and nothing else
    assert keys and all(not k.startswith(("b|", "l|", "r|")) for k in keys), keys
    async with quota_store_from_url(redis_store_url) as quota:
        (usage,) = await quota.usages()
    assert usage.key == "daily" and usage.calls == 2 and usage.spent > 0
    client = aioredis.Redis.from_url(redis_store_url.split("?")[0])
    try:
        found = [k.decode() async for k in client.scan_iter(match=redis_prefix + "*")]
    finally:
        await client.aclose()
    kinds = {k[len(redis_prefix) :].split(":", 1)[0] for k in found}
    assert kinds == {"cb", "quota", "cache"}, found


async def test_keys_under_the_prefix_whose_names_the_encoding_cannot_read_are_passed_over(
    redis_url: str, redis_prefix: str
) -> None:
    # a key named in bytes the client's encoding cannot read (another program's, or a
    # budget a Latin-1 client wrote, listed by a UTF-8 one) failed `budget status` and
    # `breaker status` (and `breaker reset` of every key) with a bare UnicodeDecodeError
    client = aioredis.Redis.from_url(redis_url)
    prefix = redis_prefix.encode()
    await client.hset(prefix + b"cb:caf\xe9", mapping={"generation": "1", "state": "closed"})
    await client.hset(prefix + b"quota:b|caf\xe9@1.0", mapping={"spent": "1"})
    await client.set(prefix + b"quota:l|caf\xe9", "5")
    start = time.time() - 60.0
    try:
        async with (
            RedisCircuitStateStore(redis_url, prefix=redis_prefix + "cb:") as store,
            RedisQuotaStore(redis_url, prefix=redis_prefix + "quota:") as quota,
        ):
            await store.force("ok", CircuitState.DISABLED)
            await quota.reserve(
                "team", window_start=start, window_end=start + 60, amount=3, limit=9
            )
            await quota.set_limit("team", 9)
            states = [s.key for s in await store.snapshot_all()]
            await store.reset()
            usages = [u.key for u in await quota.usages()]
            limits = await quota.limit_overrides()
            after = (await store.snapshot("ok")).state
    finally:
        await client.aclose()
    assert (states, usages, limits) == (["ok"], ["team"], {"team": 9})
    assert after == CircuitState.CLOSED
