"""A bare aiohttp server on 127.0.0.1 for tests that need a server's own wire shapes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serving(path: str, handler: Handler) -> AsyncIterator[str]:
    """A server answering POSTs to ``path`` with ``handler``; its base URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def cutting_short(head: bytes, body: bytes, sent: int) -> AsyncIterator[str]:
    """
    A raw HTTP server on 127.0.0.1 that reads each request whole, answers with ``head``
    (the status line and headers, each ending in CRLF; the Content-Length of ``body``
    is added) and the first ``sent`` bytes of ``body``, then drops the connection; its
    base URL.
    """

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in request_head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        writer.write(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:sent]))
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def anthropic_answering(usage: Mapping[str, Any]) -> Handler:
    """A Messages API handler: every request answered "ok" by the model it names, with ``usage``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response(
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "end_turn",
                "usage": dict(usage),
            }
        )

    return handler


def anthropic_streaming(whole: Mapping[str, Any], events: list[bytes]) -> Handler:
    """A Messages API handler: ``whole`` unstreamed, else ``events`` (SSE bytes) in one write."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response(dict(whole))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"".join(events))
        await response.write_eof()
        return response

    return handler
