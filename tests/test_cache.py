"""
The response cache through the executor: hits, what is keyed, sampled output, records,
and that a cached answer never counts as a model's success for the router.
"""

from __future__ import annotations

import gc
import logging
import math
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from empathy_models import (
    AdaptiveModelRouter,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    Message,
    Outcome,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.cache import (
    MAX_TTL,
    MemoryResponseCache,
    SQLiteResponseCache,
    cache_from_url,
)
from empathy_models.content import ToolCall
from empathy_models.exceptions import ConfigurationWarning, StateStoreError
from empathy_models.testing import FakeLLMServer, FakeReply, ModelBehavior

from ._fakes import KEY, WEATHER, http_executor, priced_registry

REGISTRY = priced_registry([("gpt-a", 1.0), ("gpt-b", 1.0)], "cache-test-1")
CTX = ExecutionContext(workflow="faq", stage="answer", temperature=0, cache_ttl=600)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    behavior = ModelBehavior(content="The answer.")
    async with FakeLLMServer({"gpt-a": behavior, "gpt-b": behavior}, api_key=KEY) as fake:
        yield fake


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    options.setdefault("cache", "memory://")
    return http_executor(server, REGISTRY, **options)


@pytest.mark.parametrize("how", ["run", "stream"])
async def test_an_answer_cut_by_a_content_filter_is_not_cached(
    server: FakeLLMServer, how: str
) -> None:
    # the provider's filter stopped the answer (OpenAI's "content_filter"): the next
    # identical request asks the model again instead of replaying what was cut
    server.script("gpt-a", [FakeReply(content="The ans", stop_reason="content_filter")])
    async with make(server) as executor:
        if how == "run":
            cut = await executor.run("What is GCRA?", CTX)
        else:
            async with executor.stream("What is GCRA?", CTX) as stream:
                cut = await stream.get_final_response()
        again = await executor.run("What is GCRA?", CTX)
        then = await executor.run("What is GCRA?", CTX)
    assert cut.stop_reason == "content_filter" and not cut.cached
    assert not again.cached and again.content == "The answer."
    assert then.cached and server.requests() == 2


@pytest.mark.parametrize("how", ["run", "stream"])
async def test_an_answer_its_response_format_could_not_parse_is_not_cached(
    server: FakeLLMServer, how: str
) -> None:
    # the answer is not the JSON the schema asks for (`parse_error`): a caller that asks
    # again gets a new answer from the model, not the same unparsable one for cache_ttl
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    server.script("gpt-a", [FakeReply(content="Sure! Here it is: {answer")])
    ctx = attrs.evolve(CTX, model="gpt-a")
    async with make(server) as executor:
        if how == "run":
            bad = await executor.run("answer", ctx, response_format=schema)
        else:
            async with executor.stream("answer", ctx, response_format=schema) as stream:
                bad = await stream.get_final_response()
        again = await executor.run("answer", ctx, response_format=schema)
        then = await executor.run("answer", ctx, response_format=schema)
    assert bad.parse_error is not None and bad.parsed is None and not bad.cached
    assert not again.cached and again.parse_error is None and again.parsed is not None
    assert then.cached and then.parsed == again.parsed and server.requests() == 2
    if how == "run":  # a tool called instead of answering is an answer, and cached
        async with make(server) as executor:
            options: dict[str, Any] = {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": schema,
            }
            called = await executor.run("weather?", ctx, **options)
            assert called.tool_calls and called.parse_error is not None
            assert (await executor.run("weather?", ctx, **options)).cached


async def test_a_repeated_request_is_answered_from_the_cache(server: FakeLLMServer) -> None:
    telemetry = MemoryTelemetryBackend()
    async with make(server, telemetry_store=telemetry) as executor:
        first = await executor.run("What is GCRA?", CTX)
        again = await executor.run("What is GCRA?", CTX)
        other = await executor.run("What is a token bucket?", CTX)
    assert server.requests() == 2
    assert not first.cached and first.cost_usd > 0
    assert again.cached and again.cost_usd == 0.0 and again.attempts == ()
    assert (again.content, again.model, again.input_tokens) == (
        first.content,
        first.model,
        first.input_tokens,
    )
    assert again.request_id != first.request_id
    assert not other.cached
    records = await telemetry.recent(limit=10)
    hits = [r for r in records if r.outcome is Outcome.CACHE_HIT]
    assert len(hits) == 1 and len(records) == 3
    assert hits[0].cost_usd == 0.0
    assert hits[0].metadata["cache_cost_saved_usd"] == pytest.approx(first.cost_usd)
    assert hits[0].prompt_text is None  # no record_text: no text kept


async def test_what_the_key_covers(server: FakeLLMServer) -> None:
    async with make(server) as executor:
        await executor.run("hello", CTX)
        await executor.run("hello", CTX)  # hit
        for changed in (
            ExecutionContext(workflow="faq", stage="other", temperature=0, cache_ttl=600),
            ExecutionContext(
                workflow="faq", stage="answer", temperature=0, cache_ttl=600, max_tokens=99
            ),
            ExecutionContext(
                workflow="faq", stage="answer", temperature=0, cache_ttl=600, model="gpt-b"
            ),
            ExecutionContext(
                workflow="faq", stage="answer", temperature=0, cache_ttl=600, system="be brief"
            ),
        ):
            assert not (await executor.run("hello", changed)).cached
        # a system message and system= are the same request
        as_message = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ]
        same = ExecutionContext(workflow="faq", stage="answer", temperature=0, cache_ttl=600)
        assert (await executor.run(as_message, same)).cached
    assert server.requests() == 5


async def test_empty_request_options_are_the_request_without_them(server: FakeLLMServer) -> None:
    # no tools, no stop sequences, no extra body: what is sent is the same, so is the key
    empty: list[dict[str, Any]] = [
        {"tools": []},
        {"stop": []},
        {"extra_body": {}},
        {"tools": (), "stop": (), "extra_body": {}, "top_p": None, "seed": None},
    ]
    history = [
        Message(role="user", content="weather?"),
        Message(
            role="assistant",
            content="",
            tool_calls=(ToolCall(id="c1", name="get_weather", arguments={}),),
        ),
        Message(role="tool", tool_call_id="c1", content="sunny"),
    ]
    async with make(server) as executor:
        await executor.run("hello", CTX, tools=[])  # stored with empty options
        assert (await executor.run("hello", CTX)).cached
        for options in empty:
            assert (await executor.run("hello", CTX, **options)).cached, options
        await executor.run(history, CTX)  # more than text: the other encoding of the key
        for options in empty:
            assert (await executor.run(history, CTX, **options)).cached, options
        # options that are sent keep keys of their own
        sent: list[dict[str, Any]] = [
            {"stop": ["x"]},
            {"tools": [WEATHER]},
            {"tool_choice": "none"},  # sent to Anthropic even without tools
            {"seed": 0},
            {"top_p": 1.0},
            {"extra_body": {"user": "u"}},
        ]
        for options in sent:
            assert not (await executor.run("hello", CTX, **options)).cached, options
    assert server.requests() == 2 + 6


async def test_tool_calls_and_structured_answers_are_cached_whole(server: FakeLLMServer) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    async with make(server) as executor:
        called = await executor.run("weather?", CTX, tools=[WEATHER], tool_choice="required")
        again = await executor.run("weather?", CTX, tools=[WEATHER], tool_choice="required")
        # the tool's result sent back: a different conversation, a different key
        history = [
            Message(role="user", content="weather?"),
            Message(role="assistant", content=called.content, tool_calls=called.tool_calls),
            Message(role="tool", tool_call_id=called.tool_calls[0].id, content="sunny"),
        ]
        follow = await executor.run(history, CTX, tools=[WEATHER])
        follow_again = await executor.run(history, CTX, tools=[WEATHER])
        other_tool = attrs.evolve(WEATHER, description="Weather, in Celsius")
        not_same = await executor.run("weather?", CTX, tools=[other_tool], tool_choice="required")
        structured = await executor.run("answer", CTX, response_format=schema)
        structured_again = await executor.run("answer", CTX, response_format=schema)
        plain = await executor.run("answer", CTX)  # no response format: another request
    assert not called.cached and again.cached
    assert again.tool_calls == called.tool_calls and again.tool_calls
    assert [dict(c.arguments) for c in again.tool_calls] == [
        dict(c.arguments) for c in called.tool_calls
    ]
    assert again.stop_reason == called.stop_reason
    assert not follow.cached and follow_again.cached and follow_again.content == follow.content
    assert not not_same.cached
    assert not structured.cached and structured_again.cached
    assert structured_again.parsed == structured.parsed and structured.parsed is not None
    assert not plain.cached and plain.parsed is None
    assert server.requests() == 5


async def test_a_hit_is_never_older_than_the_cache_ttl_of_the_run_reading_it(
    server: FakeLLMServer,
) -> None:
    # "answer from the cache when the same request was answered less than cache_ttl
    # seconds ago": the reader's cache_ttl, whatever the writer's kept the entry for
    now = [1_800_000_000.0]
    day, minute = attrs.evolve(CTX, cache_ttl=86_400), attrs.evolve(CTX, cache_ttl=60)
    async with make(server, wall_clock=lambda: now[0]) as executor:
        await executor.run("hello", day)
        now[0] += 30
        assert (await executor.run("hello", minute)).cached  # 30 s old
        now[0] += 60
        assert (await executor.run("hello", day)).cached  # 90 s old
        assert not (await executor.run("hello", minute)).cached  # too old for a minute
        assert (await executor.run("hello", minute)).cached  # the answer just stored
        async with executor.stream("hello", minute) as stream:
            assert (await stream.get_final_response()).cached
        now[0] += 61
        async with executor.stream("hello", minute) as stream:
            assert not (await stream.get_final_response()).cached
    assert server.requests() == 3


async def test_an_answer_stored_ahead_of_a_clock_stepped_back_is_a_miss(
    server: FakeLLMServer,
) -> None:
    # the wall clock stepped back an hour (an NTP correction) after the answer was
    # stored, then two minutes passed: the answer is not served as less than a minute
    # old (for the hour it would look so); a store time less than a second ahead
    # (another worker's clock) is
    now = [1_800_000_000.0]
    day, minute = attrs.evolve(CTX, cache_ttl=86_400), attrs.evolve(CTX, cache_ttl=60)
    async with make(server, wall_clock=lambda: now[0]) as executor:
        await executor.run("hello", day)
        now[0] += -3_600 + 120
        assert not (await executor.run("hello", minute)).cached
        assert (await executor.run("hello", minute)).cached  # the answer just stored
        async with executor.stream("hello", minute) as stream:
            assert (await stream.get_final_response()).cached
        await executor.run("skewed", minute)
        now[0] -= 0.5
        assert (await executor.run("skewed", minute)).cached
        now[0] -= 3_600
        async with executor.stream("skewed", minute) as stream:
            assert not (await stream.get_final_response()).cached
    assert server.requests() == 4


async def test_sampled_output_is_not_cached_unless_asked(server: FakeLLMServer) -> None:
    sampled = ExecutionContext(workflow="faq", cache_ttl=600)  # the provider's temperature
    warm = ExecutionContext(workflow="faq", cache_ttl=600, temperature=0.7)
    asked = ExecutionContext(workflow="faq", cache_ttl=600, temperature=0.7, cache_sampled=True)
    async with make(server) as executor:
        with pytest.warns(ConfigurationWarning, match="on a request that samples") as given:
            for ctx in (sampled, sampled, warm, warm):
                assert not (await executor.run("hello", ctx)).cached
        assert len(given) == 1  # once per executor
        await executor.run("hello", asked)
        assert (await executor.run("hello", asked)).cached
        # extra_body's temperature is the one sent: it samples a temperature=0 context's
        greedy = attrs.evolve(CTX, model="gpt-a")
        for _ in range(2):
            hot = await executor.run("hi", greedy, extra_body={"temperature": 0.7})
            assert not hot.cached
            sent = server.last_request("gpt-a")
            assert sent is not None and sent.body["temperature"] == 0.7
        cold = attrs.evolve(warm, model="gpt-a")
        await executor.run("hi", cold, extra_body={"temperature": 0})
        assert (await executor.run("hi", cold, extra_body={"temperature": 0})).cached
    assert server.requests() == 8


async def test_without_cache_ttl_nothing_is_cached(server: FakeLLMServer) -> None:
    plain = ExecutionContext(workflow="faq", temperature=0)
    async with make(server) as executor:
        await executor.run("hello", plain)
        assert not (await executor.run("hello", plain)).cached
    assert server.requests() == 2


async def test_a_cached_answer_never_counts_as_a_model_success(server: FakeLLMServer) -> None:
    telemetry = MemoryTelemetryBackend()
    router = AdaptiveModelRouter(REGISTRY, telemetry, seed=1)
    ctx = ExecutionContext(
        workflow="faq", stage="answer", temperature=0, cache_ttl=600, model="gpt-a"
    )
    async with router, make(server, telemetry_store=telemetry, router=router) as executor:
        await executor.run("hello", ctx)
        for _ in range(20):
            assert (await executor.run("hello", ctx)).cached
        await router.refresh()
        decision = router.get_best_model("faq", "answer", candidates=["gpt-a", "gpt-b"])
        stats = await telemetry.aggregate(workflow="faq")
    evidence = {c.model: c for c in decision.candidates}
    assert evidence["gpt-a"].sample_size == 1  # the one real call, not the 20 hits
    assert [(p.model, p.sample_size, p.successes) for p in stats] == [("gpt-a", 1, 1)]


async def test_a_failing_cache_never_fails_a_call(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(MemoryResponseCache):
        async def get(self, key: str) -> bytes | None:
            raise StateStoreError("cache down")

        async def set(self, key: str, value: bytes, ttl: float) -> None:
            raise StateStoreError("cache down")

    caplog.set_level(logging.CRITICAL, logger="empathy_models.cache")
    async with make(server, cache=Broken()) as executor:
        first = await executor.run("hello", CTX)
        second = await executor.run("hello", CTX)
        errors, skipped = executor.cache_errors, executor.cache_skipped
    assert not first.cached and not second.cached
    # the first read failed: the cache is degraded for a while, the rest skip it
    assert (errors, skipped) == (1, 3)


async def test_an_sqlite_cache_is_shared_by_executors(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/cache.db"
    async with make(server, cache=url) as one:
        await one.run("hello", CTX)
    async with make(server, cache=url) as two:
        assert (await two.run("hello", CTX)).cached
    assert server.requests() == 1
    assert (tmp_path / "cache.db").stat().st_mode & 0o777 == 0o600


_ENTRY = (
    '{"v":1,"content":"x","model":"gpt-a","provider":"openai","tier":"cheap",'
    '"input_tokens":%s,"output_tokens":1,"cost_usd":%s}'
)


@pytest.mark.parametrize(
    "garbled",
    [
        b"[]",
        b"null",
        b"5",
        b'"x"',
        b"\xff\xfe not JSON",
        b"[" * 100_000 + b"]" * 100_000,
        (_ENTRY % ("Infinity", "0")).encode(),
        (_ENTRY % ("1e400", "0")).encode(),
        (_ENTRY % ("-3", "0")).encode(),
        (_ENTRY % (str(2**63), "0")).encode(),
        (_ENTRY % ("1", "NaN")).encode(),
        (_ENTRY % ("1", '"free"')).encode(),
        (_ENTRY % ("1", "1" + "0" * 400)).encode(),
        (_ENTRY % ("1", '0,"at":"yesterday"')).encode(),
        (_ENTRY % ("1", '0,"at":1e400')).encode(),
        (_ENTRY % ("1", "0")).replace('"tier":"cheap",', "").encode(),
        (_ENTRY % ("1", "0")).replace('"cheap"', '["cheap"]').encode(),
    ],
    ids=[
        "list",
        "null",
        "number",
        "string",
        "bytes",
        "deep",
        "inf",
        "1e400",
        "negative",
        "past a record",
        "nan",
        "text",
        "cost past a float",
        "time as text",
        "time inf",
        "no tier",
        "tier as a list",
    ],
)
async def test_a_garbled_cache_entry_is_a_miss_and_counted(
    server: FakeLLMServer, tmp_path: Path, garbled: bytes
) -> None:
    path = tmp_path / "cache.db"
    await _stored_then_overwritten(server, path, garbled)  # by another writer, or a disk
    async with make(server, cache=f"sqlite:///{path}") as two:
        again = await two.run("hello", CTX)
        errors = two.cache_errors
    assert not again.cached and again.content == "The answer."
    assert errors == 1 and server.requests() == 2


@pytest.mark.parametrize("stored", ["not a blob", 2.5], ids=["text", "real"])
async def test_an_sqlite_value_of_another_type_is_a_miss_not_an_outage(
    server: FakeLLMServer, tmp_path: Path, stored: object
) -> None:
    path = tmp_path / "cache.db"
    await _stored_then_overwritten(server, path, stored)  # by another program, as TEXT or REAL
    async with SQLiteResponseCache(path) as cache:
        assert isinstance(await cache.get(_stored_key(path)), bytes)
    async with make(server, cache=f"sqlite:///{path}") as two:
        again = await two.run("hello", CTX)
        third = await two.run("hello", CTX)  # the answer stored anew is served
        errors, skipped = two.cache_errors, two.cache_skipped
    assert not again.cached and third.cached
    assert (errors, skipped) == (1, 0) and server.requests() == 2


async def _stored_then_overwritten(server: FakeLLMServer, path: Path, value: object) -> None:
    """One answer stored in the SQLite cache at ``path``, then its value set to ``value``."""
    async with make(server, cache=f"sqlite:///{path}") as one:
        await one.run("hello", CTX)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("UPDATE response_cache SET value = ?", (value,)).rowcount == 1
        conn.commit()
    finally:
        conn.close()


def _stored_key(path: Path) -> str:
    """The one key the SQLite cache at ``path`` holds."""
    conn = sqlite3.connect(path)
    try:
        (key,) = conn.execute("SELECT key FROM response_cache").fetchone()
    finally:
        conn.close()
    return str(key)


def test_cache_options_are_checked(server: FakeLLMServer) -> None:
    with pytest.raises(ConfigurationError):
        ExecutionContext(cache_ttl=0)
    with pytest.raises(ConfigurationError):
        ExecutionContext(cache_sampled="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cache_coalesce"):
        ExecutionContext(cache_coalesce=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        make(server, cache="nosuch://x")
    with pytest.raises(ConfigurationError):
        MemoryResponseCache(max_entries=0)


# --------------------------------------------------------------------------- the backends


def _key(i: int) -> str:
    return f"{i:064x}"


async def test_an_sqlite_cache_never_holds_more_than_max_entries(tmp_path: Path) -> None:
    path = tmp_path / "bounded.db"
    # two instances on one file stand for two writing processes
    async with (
        SQLiteResponseCache(path, max_entries=10) as one,
        SQLiteResponseCache(path, max_entries=10) as two,
    ):
        for i in range(60):
            await (one if i % 2 else two).set(_key(i), b"answer", 3600 + i)
            held = [k for k in range(i + 1) if await one.get(_key(k)) is not None]
            assert len(held) == min(i + 1, 10), f"after {i + 1} writes: {len(held)} held"
        # past the bound, the entries closest to expiry went
        assert held == list(range(50, 60))
        await one.set(_key(59), b"again", 7200)  # a replaced entry adds none
        assert [k for k in range(60) if await two.get(_key(k)) is not None] == held
        assert await two.delete(_key(50)) and await one.clear() == 9
        for i in range(12):
            await one.set(_key(i), b"answer", 3600 + i)
        assert [k for k in range(12) if await two.get(_key(k)) is not None] == list(range(2, 12))


async def test_an_sqlite_cache_bounds_a_table_an_earlier_version_filled(tmp_path: Path) -> None:
    path = tmp_path / "earlier.db"
    async with SQLiteResponseCache(path) as cache:
        await cache.set(_key(0), b"first", 3600)
    # as earlier versions left it: the table without what counts its entries
    conn = sqlite3.connect(path)
    try:
        for name in ("response_cache_added", "response_cache_removed"):
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        conn.execute("DROP TABLE IF EXISTS response_cache_size")
        far = time.time() + 3600
        conn.executemany(
            "INSERT INTO response_cache VALUES (?, ?, ?)",
            ((_key(i), b"old", far + i) for i in range(1, 30)),
        )
        conn.commit()
    finally:
        conn.close()
    async with SQLiteResponseCache(path, max_entries=10) as cache:
        await cache.set(_key(30), b"new", 7200)
        held = [k for k in range(31) if await cache.get(_key(k)) is not None]
    assert held == [*range(21, 30), 30]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("ttl", [math.inf, math.nan, 0.0, -1.0])
async def test_no_cache_stores_a_ttl_that_is_not_a_finite_number_above_0(
    kind: str, ttl: float, tmp_path: Path
) -> None:
    cache = cache_from_url("memory://" if kind == "memory" else f"sqlite:///{tmp_path}/t.db")
    async with cache:
        await cache.set(_key(1), b"answer", ttl)
        assert await cache.get(_key(1)) is None
        await cache.set(_key(1), b"answer", 1e9)
        assert await cache.get(_key(1)) == b"answer"


async def test_a_ttl_past_max_ttl_keeps_the_entry_max_ttl() -> None:
    now = [1_800_000_000.0]
    async with MemoryResponseCache(clock=lambda: now[0]) as cache:
        await cache.set(_key(1), b"for good", 1e300)
        now[0] += MAX_TTL - 1
        assert await cache.get(_key(1)) == b"for good"
        now[0] += 2
        assert await cache.get(_key(1)) is None


def _big(tag: str) -> FakeLLMServer:
    """A server of ~300 kB answers, its own per test (no test sees another's answers)."""
    content = f"a long cached answer {tag} " * 12_000
    return FakeLLMServer(default=ModelBehavior(content=content, output_tokens=(1, 100_000)))


BIG_CTX = ExecutionContext(temperature=0, cache_ttl=600, max_tokens=100_000)


async def _big_hits(executor: EmpathyLLMExecutor, n: int) -> None:
    """``n`` distinct ~300 kB answers, each a miss and then a hit."""
    for i in range(n):
        await executor.run(f"prompt {i}", BIG_CTX)
        assert (await executor.run(f"prompt {i}", BIG_CTX)).cached


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


@pytest.mark.usefixtures("traced")
async def test_hits_of_large_answers_hold_a_bounded_amount_of_memory(tmp_path: Path) -> None:
    # 60 answers of ~300 kB read back from SQLite: ~36 MB if every decoded hit were kept
    async with _big("bounded") as big, make(big, cache=f"sqlite:///{tmp_path}/c.db") as ex:
        base = _traced()
        await _big_hits(ex, 60)
        assert _traced() - base < 16_000_000


@pytest.mark.usefixtures("traced")
async def test_no_cached_answer_is_held_once_the_executor_is_closed(tmp_path: Path) -> None:
    async with _big("closed") as big:
        base = _traced()
        async with make(big, cache=f"sqlite:///{tmp_path}/c.db") as ex:
            await _big_hits(ex, 20)
        del ex
        assert _traced() - base < 3_000_000


@pytest.mark.usefixtures("traced")
async def test_clearing_the_cache_lets_go_of_the_answers_it_served(tmp_path: Path) -> None:
    async with (
        _big("cleared") as big,
        SQLiteResponseCache(tmp_path / "c.db") as cache,
        make(big, cache=cache) as ex,
    ):
        base = _traced()
        await _big_hits(ex, 20)
        assert await cache.clear() >= 19  # the last answer's write may still be behind
        assert _traced() - base < 3_000_000
