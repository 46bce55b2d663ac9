"""
`TcpProxy`: a TCP proxy on 127.0.0.1 in front of a real server, to inject network faults.

``refuse()`` stops listening and resets every open connection (the server looks down:
connections are refused); ``partition()`` keeps every connection open but forwards
nothing in either direction, and new connections are accepted and then hang (packets
dropped, as in a network partition); ``partition_after_reply()`` starts a partition
once the server's next reply has reached the client (a partition that begins between an
operation's answer and what the client sends next); ``restore()`` ends any fault.
``dropped`` counts the bytes a partition dropped, ``clients`` the connections open on
the client's side (accepted, not yet closed by the client nor reset here) and
``closed`` those that ended (`wait_closed` waits for the first).
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``host``:``target_port`` until told otherwise."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.partitioned = False
        self.cut_after_reply = False
        self.dropped = 0
        self.clients = 0
        self.closed = 0
        self._ended = asyncio.Event()  # set when ``closed`` leaves 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        self.clients += 1
        for src, dst, client in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pipe(src, dst, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, client: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if self.partitioned:
                    self.dropped += len(data)
                    continue  # dropped on the floor
                dst.write(data)
                await dst.drain()
                if self.cut_after_reply and not client:  # the server's reply went through
                    self.cut_after_reply = False
                    self.partitioned = True
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()
            if client:  # the client closed its connection (or it was reset here)
                self.clients -= 1
                self.closed += 1
                self._ended.set()

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def refuse(self) -> None:
        """Stop listening and reset every connection: the server looks down."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._reset_all()

    def partition(self) -> None:
        """Forward nothing from now on, in either direction (connections stay open)."""
        self.partitioned = True

    async def wait_closed(self) -> None:
        """Wait until a connection has ended (``closed`` is at least 1)."""
        await self._ended.wait()

    def partition_after_reply(self) -> None:
        """Forward the server's next reply (on any connection), then nothing: `partition`."""
        self.cut_after_reply = True

    async def restore(self) -> None:
        """End a refusal or a partition (connections cut by a partition are reset)."""
        self.cut_after_reply = False
        if self.partitioned:
            self.partitioned = False
            self._reset_all()
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def aclose(self) -> None:
        await self.refuse()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
