"""
Identical requests in flight at the same time in one executor: the first that misses the
cache asks a model, the others wait for it and are answered from the cache, each
recorded as a hit; what the first leaves out of the cache (a failure, an answer the
cache does not keep, a cancellation) sends the others to a model themselves.  Real HTTP
against FakeLLMServer; memory and SQLite caches (the latter written behind), and a Redis
cache whose server is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest

from empathy_models import ExecutionContext, Outcome
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import InvalidRequestError
from empathy_models.testing import FakeLLMServer, FakeReply, ModelBehavior

from ._fakes import KEY, http_executor, priced_registry

REGISTRY = priced_registry([("gpt-a", 1.0)], "coalescing-1")
CTX = ExecutionContext(workflow="faq", stage="answer", model="gpt-a", temperature=0, cache_ttl=600)
COPIES = 20


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    # slow enough that every copy starts before the first answer comes
    behavior = ModelBehavior(content="The answer.", latency=300.0)
    async with FakeLLMServer({"gpt-a": behavior}, api_key=KEY) as fake:
        yield fake


@pytest.mark.parametrize("cache", ["memory", "sqlite"])
async def test_a_burst_of_one_new_request_makes_one_call(
    server: FakeLLMServer, tmp_path: Path, cache: str
) -> None:
    url = "memory://" if cache == "memory" else f"sqlite:///{tmp_path / 'cache.db'}"
    telemetry = MemoryTelemetryBackend()
    async with http_executor(server, REGISTRY, cache=url, telemetry_store=telemetry) as executor:
        answers = await asyncio.gather(*(executor.run("What is GCRA?", CTX) for _ in range(COPIES)))
        other = await executor.run("What is a token bucket?", CTX)
    assert server.requests() == 2  # one for the burst, one for the other question
    assert {a.content for a in answers} == {"The answer."}
    assert sorted(a.cached for a in answers) == [False] + [True] * (COPIES - 1)
    assert not other.cached
    records = await telemetry.recent(limit=100)
    outcomes = sorted(r.outcome.value for r in records)
    assert outcomes.count(Outcome.CACHE_HIT.value) == COPIES - 1
    assert outcomes.count(Outcome.SUCCESS.value) == 2
    # a hit waited for the answer: its latency counts the wait
    assert min(a.latency_ms for a in answers if a.cached) >= 250.0


async def test_a_failed_first_call_sends_the_others_to_the_model(server: FakeLLMServer) -> None:
    # the first copy's call fails (a 400: no retry, no fallback); the copies that waited
    # for it ask the model themselves, side by side, and are answered
    server.script("gpt-a", [400])
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        results = await asyncio.gather(
            *(executor.run("What is GCRA?", CTX) for _ in range(5)), return_exceptions=True
        )
    failed = [r for r in results if isinstance(r, BaseException)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert len(failed) == 1 and len(answered) == 4
    assert isinstance(failed[0], InvalidRequestError)
    assert not any(a.cached for a in answered)
    assert server.requests() == 5  # the failed one, then each of the four


async def test_an_answer_the_cache_does_not_keep_is_not_shared(server: FakeLLMServer) -> None:
    server.script("gpt-a", [FakeReply(content="The ans", stop_reason="content_filter")])
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        answers = await asyncio.gather(*(executor.run("What is GCRA?", CTX) for _ in range(4)))
    assert [a.stop_reason for a in answers].count("content_filter") == 1
    assert not any(a.cached for a in answers)
    assert server.requests() == 4


async def test_a_cancelled_first_run_leaves_the_others_to_the_model(server: FakeLLMServer) -> None:
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        first = asyncio.create_task(executor.run("What is GCRA?", CTX))
        await asyncio.sleep(0.05)
        others = [asyncio.create_task(executor.run("What is GCRA?", CTX)) for _ in range(3)]
        await asyncio.sleep(0.05)
        first.cancel()
        answers = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError):
            await first
    assert [a.content for a in answers] == ["The answer."] * 3
    assert server.requests() == 4


async def test_a_run_with_an_earlier_deadline_does_not_wait_for_a_later_one(
    server: FakeLLMServer,
) -> None:
    # the first copy may take 60 s; a copy that must end within 5 s asks the model itself,
    # while one with a later deadline (or none) waits for the first
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        first = asyncio.create_task(executor.run("q", attrs.evolve(CTX, deadline=60.0)))
        await asyncio.sleep(0.05)
        hasty, patient, unbounded = await asyncio.gather(
            executor.run("q", attrs.evolve(CTX, deadline=5.0)),
            executor.run("q", attrs.evolve(CTX, deadline=120.0)),
            executor.run("q", CTX),
        )
        await first
    assert not hasty.cached and patient.cached and unbounded.cached
    assert server.requests() == 2


async def test_a_burst_makes_one_call_while_the_cache_store_is_down(
    server: FakeLLMServer,
) -> None:
    # nothing listens where the Redis cache is: every read fails, the store is skipped
    # and nothing is written; the copies are answered with the first one's answer all the
    # same (before, each made a call of its own once it had waited for the first)
    pytest.importorskip("empathy_models_redis")
    async with http_executor(server, REGISTRY, cache="redis://127.0.0.1:1/0") as executor:
        answers = await asyncio.gather(*(executor.run("What is GCRA?", CTX) for _ in range(5)))
        assert executor.cache_errors >= 1
    assert server.requests() == 1
    assert sorted(a.cached for a in answers) == [False] + [True] * 4
    assert {a.content for a in answers} == {"The answer."}


# --------------------------------------------------------------------------- streams


async def test_a_stream_does_not_wait_for_an_identical_run_in_flight(
    server: FakeLLMServer,
) -> None:
    # its first delta is what a stream is for: it asks a model alongside the run
    # instead of waiting for the run's whole answer
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        first = asyncio.create_task(executor.run("What is GCRA?", CTX))
        await asyncio.sleep(0.05)
        async with executor.stream("What is GCRA?", CTX) as stream:
            text = "".join([delta async for delta in stream])
            response = await stream.get_final_response()
        answer = await first
    assert text == answer.content == "The answer."
    assert not response.cached and not answer.cached
    assert server.requests() == 2


async def test_a_run_does_not_wait_for_an_identical_stream_its_reader_holds_open(
    server: FakeLLMServer,
) -> None:
    # a stream ends when its caller has read it: a run waiting for it would wait on that
    # caller's pace, so it asks a model itself; the stream, read later, stores its answer
    async with http_executor(server, REGISTRY, cache="memory://") as executor:
        async with executor.stream("What is GCRA?", CTX) as stream:
            answer = await executor.run("What is GCRA?", CTX)  # the stream is left unread
            assert "".join([delta async for delta in stream]) == "The answer."
        again = await executor.run("What is GCRA?", CTX)
    assert not answer.cached and again.cached
    assert server.requests() == 2
