"""
Where the client's CPU goes in ``executor.run()`` over HTTP: the same calls as
`bench_executor`'s HTTP part (FakeLLMServer in its own process), peeled layer by layer,
client CPU per call (`time.process_time`) for each:

- ``bare``: `bench_executor`'s bare aiohttp POST (``json=`` body, ``resp.json()``);
- ``floor``: the same POST through `_MinimalClient`, a keep-alive HTTP/1.1 client of a
  few lines on `asyncio.Protocol` (Content-Length answers only, no TLS, proxies,
  redirects, timeouts or errors): what the transport alone could cost the client, for
  weighing a transport of the project's own against aiohttp's;
- ``transport``: the POST as `HTTPProvider` makes it, without the provider's own code
  (a body encoded once, ``read()``, ``json.loads``, a session like the executor's);
- ``provider``: ``OpenAIProvider.complete()`` on a bound session (encoding the body,
  reading the answer into a `Completion`);
- ``run: core``: ``executor.run()`` with no router, breaker or telemetry (the
  executor's own work: plan, attempt, record, response);
- ``run: +router`` / ``+breaker`` / ``+telemetry``: the core with one of them (an
  `AdaptiveModelRouter`, a memory `CircuitBreaker`, ``memory://`` telemetry);
- ``run: full``: all three, as `bench_executor` measures it.

Each repeat runs every layer once, in a rotated order (reversed every other repeat);
figures are medians over the repeats, with each layer's difference to the one it adds
to.  Not part of ``python -m benchmarks``: run it by hand, e.g. under py-spy.

Run: ``python -m benchmarks.profile_executor_http [--concurrency 64] [--calls 2000]
[--repeats 7]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

import aiohttp

from benchmarks._fake_server_proc import ServerProcess
from benchmarks.bench_executor import CTX, _batch
from empathy_models import (
    AdaptiveModelRouter,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ModelRegistry,
    OpenAIProvider,
    TelemetryDisabledWarning,
)
from empathy_models.abc import CompletionRequest

PROMPT = "Summarize the release notes."
# layer -> the layer its difference is taken against
BASES = {
    "bare": None,
    "floor": "bare",
    "transport": "bare",
    "provider": "transport",
    "run: core": "provider",
    "run: +router": "run: core",
    "run: +breaker": "run: core",
    "run: +telemetry": "run: core",
    "run: full": "provider",
}


class _Connection(asyncio.Protocol):
    """One keep-alive connection of `_MinimalClient`: one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.head = -1  # the length of the answer's head, once read
        self.end = -1  # where the answer's body ends in the buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.head < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            at = head.index(b"\r\ncontent-length:") + 17
            stop = head.find(b"\r\n", at)
            self.head = end + 4
            self.end = self.head + int(head[at : stop if stop > 0 else None])
        if len(buffer) >= self.end and self.waiter is not None:
            status, body = int(buffer[9:12]), bytes(buffer[self.head : self.end])
            del buffer[: self.end]
            self.head = self.end = -1
            waiter, self.waiter = self.waiter, None
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))


class _MinimalClient:
    """A keep-alive HTTP/1.1 POST over `_Connection`s (the ``floor`` layer)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []

    async def post(self, path: str, body: bytes, headers: str) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        conn.waiter = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(head.encode() + body)
        answer = await conn.waiter
        self.idle.append(conn)
        return answer

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


_EXECUTOR_PARTS: dict[str, tuple[bool, bool, bool]] = {
    "run: core": (False, False, False),
    "run: +router": (True, False, False),
    "run: +breaker": (False, True, False),
    "run: +telemetry": (False, False, True),
    "run: full": (True, True, True),
}
"""An executor layer's parts: (router, breaker, telemetry)."""


async def layer(
    name: str, stack: AsyncExitStack, server: ServerProcess
) -> Callable[[], Awaitable[None]]:
    """
    One call of the layer ``name`` (a key of `BASES`) to ``server``, what it holds open
    entered in ``stack``.
    """
    url = server.openai_base_url + "/chat/completions"
    body = {
        "model": "gpt-4.1-nano",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 64,
    }
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    if name == "bare":
        plain = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        )

        async def bare() -> None:
            async with plain.post(url, json=body, headers=headers) as resp:
                await resp.json()

        return bare
    if name == "floor":
        split = urlsplit(url)
        minimal = _MinimalClient(split.hostname or "127.0.0.1", split.port or 80)
        stack.callback(minimal.close)
        minimal_headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

        async def floor() -> None:
            status, raw = await minimal.post(split.path, json.dumps(body).encode(), minimal_headers)
            assert status == 200, status
            json.loads(raw)

        return floor
    provider = OpenAIProvider(api_key="sk-bench", base_url=server.openai_base_url)
    if name in ("transport", "provider"):
        # the executor's session: its connector limit is the provider's 64 slots
        like_executor = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        )
        if name == "transport":
            payload, wire_headers = json.dumps(body).encode(), provider._request_headers()

            async def transport() -> None:
                async with like_executor.post(
                    url, data=payload, headers=wire_headers, allow_redirects=False
                ) as resp:
                    raw = await resp.read()
                json.loads(raw)

            return transport
        await provider.bind(like_executor)
        request = CompletionRequest(model="gpt-4.1-nano", messages=PROMPT, max_tokens=64)

        async def complete() -> None:
            await provider.complete(request)

        return complete
    router, breaker, telemetry = _EXECUTOR_PARTS[name]
    registry = ModelRegistry.default()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryDisabledWarning)
        ex = await stack.enter_async_context(
            EmpathyLLMExecutor(
                [provider],
                registry=registry,
                telemetry_store="memory://" if telemetry else None,
                router=AdaptiveModelRouter(registry, seed=1, refresh_interval=None)
                if router
                else None,
                breaker=await stack.enter_async_context(CircuitBreaker()) if breaker else None,
            )
        )

    async def run() -> None:
        await ex.run(PROMPT, CTX)

    return run


async def measure(concurrency: int, calls: int, repeats: int) -> dict[str, list[float]]:
    """Client CPU per call (µs) of every layer, one sample per repeat."""
    with ServerProcess() as server:
        async with AsyncExitStack() as stack:
            layers = {name: await layer(name, stack, server) for name in BASES}
            names = list(layers)
            for fn in layers.values():
                await _batch(fn, 200, concurrency)
            cpu: dict[str, list[float]] = {name: [] for name in names}
            for repeat in range(repeats):
                shift = repeat % len(names)
                order = names[shift:] + names[:shift]
                for name in order if repeat % 2 == 0 else order[::-1]:
                    _, seconds = await _batch(layers[name], calls, concurrency)
                    cpu[name].append(seconds / calls * 1e6)
    return cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    cpu = asyncio.run(measure(args.concurrency, args.calls, args.repeats))
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    print(
        f"client CPU per call, concurrency {args.concurrency}, medians of {args.repeats} "
        f"interleaved repeats of {args.calls} calls"
    )
    bare = medians["bare"]
    for name, value in medians.items():
        base = BASES[name]
        added = "" if base is None else f"  {value - medians[base]:+7.1f} µs over {base}"
        print(f"  {name:16} {value:7.1f} µs  {value / bare:5.2f}x bare{added}")


if __name__ == "__main__":
    main()
