"""
`SyncExecutor.stream`: a streamed answer for synchronous code, read on the
`SyncExecutor`'s event loop (see `empathy_models.sync`).

::

    with llm.stream("Tell me a story", ExecutionContext(workflow="chat")) as stream:
        for delta in stream:
            print(delta, end="", flush=True)
        response = stream.get_final_response()

Each wait of the caller's thread is one call on the loop (`_LoopThread.call`): entering
the block (routing, up to the first delta), then each read, which hands over the piece
it waited for and, in the same call, every piece the provider's stream had already
decoded (`streaming._ready_pieces`, up to `_BATCH`), so a fast stream costs one thread
hand-over per network read, not per piece.  Everything else is the async stream's
(`empathy_models.streaming`), which these calls drive.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Final

from .content import ToolCallDelta
from .exceptions import NotOpenError

if TYPE_CHECKING:
    from ._values import AttemptSummary, LLMResponse
    from .streaming import LLMStream, StreamManager
    from .sync import SyncExecutor, _LoopThread

__all__ = ["SyncStream", "SyncStreamManager"]

_BATCH: Final = 256
"""The most pieces one read hands over to the caller's thread."""


class SyncStreamManager:
    """
    What `SyncExecutor.stream` returns: ``with`` it to get the `SyncStream`.

    Entering routes and opens the stream up to its first delta (raising what
    `SyncExecutor.run` would raise when no route answers); leaving closes it (recording
    a ``cancelled`` attempt when it had not finished), however the block is left.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: SyncStream) -> None:
        self._stream = stream

    def __enter__(self) -> SyncStream:
        self._stream._enter()
        return self._stream

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stream.close()

    if not TYPE_CHECKING:  # at run time only: a type checker reports the misuse itself

        def __iter__(self):
            raise TypeError(
                "llm.stream() is read inside `with`: `with llm.stream(...) as stream:`, "
                "then `for delta in stream` (or `stream.get_final_response()`)"
            )


class SyncStream:
    """
    A streamed answer read from synchronous code: ``for delta in stream`` yields the
    text deltas (`str`); `events` yields them and the tool calls' pieces
    (`ToolCallDelta`); `get_final_response` returns the `LLMResponse` (reading what is
    left first); `close` stops reading.  ``text``, ``model``, ``provider``,
    ``attempts``, ``request_id`` and ``response`` are the async `LLMStream`'s.

    Each wait for the next piece is bounded by the ``timeout`` given to
    `SyncExecutor.stream`: on expiry (or Ctrl-C) the read is cancelled on the loop, the
    stream closed and its attempt recorded as ``cancelled``, and `TimeoutError` (or
    `KeyboardInterrupt`) raised.  Any thread may read it, one at a time: a read while
    another thread's read waits raises `RuntimeError`, and the stream goes on.  Use it
    inside the ``with`` block that produced it.
    """

    __slots__ = (
        "__weakref__",
        "_dropped",
        "_limit",
        "_lock",
        "_loop",
        "_manager",
        "_opening",
        "_owner",
        "_reading",
        "_ready",
        "_stream",
    )

    def __init__(self, owner: SyncExecutor, manager: StreamManager, limit: float | None) -> None:
        self._owner = owner  # kept open while its stream is read (its GC would close it)
        self._loop: _LoopThread = owner._worker
        self._manager = manager
        self._stream: LLMStream = manager._stream
        self._limit = limit  # seconds per wait; None: no limit
        self._ready: deque[str | ToolCallDelta] = deque()  # handed over, not yet yielded
        self._dropped = 0  # characters of text handed over, dropped by `close` unyielded
        self._lock = threading.Lock()  # held by the thread whose read waits
        # on the loop: the task entering, and the one reading (while it reads)
        self._opening: asyncio.Task[object] | None = None
        self._reading: asyncio.Task[object] | None = None

    def __repr__(self) -> str:
        return f"Sync{self._stream!r}"

    # ------------------------------------------------------------------ public

    @property
    def text(self) -> str:
        """The text yielded to the caller so far."""
        text = self._stream.text  # the pieces handed over included
        waiting = sum(len(piece) for piece in tuple(self._ready) if type(piece) is str)
        return text[: len(text) - waiting - self._dropped]

    @property
    def model(self) -> str | None:
        """The registry id of the model answering (None before entering)."""
        return self._stream.model

    @property
    def provider(self) -> str | None:
        """The provider of the model answering (None before entering)."""
        return self._stream.provider

    @property
    def attempts(self) -> tuple[AttemptSummary, ...]:
        """Every attempt so far, the streaming one included once it has ended."""
        return self._stream.attempts

    @property
    def request_id(self) -> str:
        """The run's id, shared by all its records."""
        return self._stream.request_id

    @property
    def response(self) -> LLMResponse | None:
        """The `LLMResponse` once the stream has finished; None before."""
        return self._stream.response

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> str:
        ready = self._ready
        while True:
            try:
                piece = ready.popleft()
            except IndexError:  # (or cleared meanwhile by a `close` in another thread)
                if not self._read():
                    raise StopIteration from None
                continue
            if type(piece) is str:
                return piece

    def events(self) -> Iterator[str | ToolCallDelta]:
        """
        Every piece of the answer in order: the text deltas (`str`) and the pieces of
        its tool calls (`ToolCallDelta`), as `LLMStream.events`.  It reads the same
        stream as ``for delta in stream`` (which yields the text only): use one or the
        other.
        """
        ready = self._ready
        while True:
            try:
                piece = ready.popleft()
            except IndexError:  # (or cleared meanwhile by a `close` in another thread)
                if not self._read():
                    return
                continue
            yield piece

    def get_final_response(self) -> LLMResponse:
        """
        The `LLMResponse` (content, usage, cost, ``ttft_ms``, routing decision), after
        reading what is left of the stream (each wait bounded by the ``timeout``).

        Raises:
            StreamInterruptedError: the stream failed.
            RuntimeError: it was closed before it finished.
        """
        self._ready.clear()
        while self._read():
            self._ready.clear()
        return self._loop.call(self._stream.get_final_response, self._limit)

    def close(self) -> None:
        """
        Stop reading: close the connection and record the attempt as cancelled (on the
        loop, once a read given up on has ended there).  Later reads end the iteration.
        Idempotent; nothing to do once the `SyncExecutor` is closed (which closed it).
        """
        self._drop_ready()
        if self._loop.closed:
            return
        try:
            self._loop.call(self._close_on_loop)
        except NotOpenError:
            if not self._loop.closed:
                raise

    def _drop_ready(self) -> None:
        """Drop the pieces handed over and not yielded: `text` leaves them out."""
        ready = self._ready
        while ready:
            try:
                piece = ready.popleft()
            except IndexError:  # (emptied meanwhile by the reading thread)
                break
            if type(piece) is str:
                self._dropped += len(piece)

    # ------------------------------------------------------------------ on the loop

    def _enter(self) -> None:
        try:
            self._loop.call(self._open, self._limit)
        except (TimeoutError, KeyboardInterrupt):
            # given up on as it opened, the stream may be open: closed, not left so
            self.close()
            raise

    def _read(self) -> bool:
        """Wait for the next pieces (into ``_ready``); False at the stream's end."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("another thread is reading this stream; read it from one")
        try:
            pieces = self._loop.call(self._take, self._limit)
        except (TimeoutError, KeyboardInterrupt):
            # the cancelled read closed the stream, unless it had taken its pieces as it
            # was given up on (or Ctrl-C came as its answer did): closed here then, its
            # next read ends instead of skipping them
            self.close()
            raise
        finally:
            self._lock.release()
        if pieces is None:
            return False
        self._ready.extend(pieces)
        return True

    async def _open(self) -> None:
        self._opening = asyncio.current_task()
        await self._manager.__aenter__()

    async def _take(self) -> list[str | ToolCallDelta] | None:
        """The next piece and those ready behind it; None at the stream's end."""
        from .streaming import _ready_pieces

        stream = self._stream
        self._reading = task = asyncio.current_task()
        try:
            first = await stream.events().__anext__()
        except StopAsyncIteration:
            return None
        finally:
            if self._reading is task:
                self._reading = None
        return [first, *_ready_pieces(stream, _BATCH - 1)]

    async def _close_on_loop(self) -> None:
        # an opening given up on (cancelled) may still adopt a stream as it ends
        opening = self._opening
        if opening is not None and not opening.done():
            await asyncio.wait({opening})
        await self._stream.aclose()
        # a read under way ends as a read after `aclose` does (`LLMStream`); one given
        # up on (cancelled) may be closing the stream and recording the attempt itself,
        # `aclose` then doing nothing: left once that is done, as `aclose` is
        reading = self._reading
        if reading is not None and not reading.done():
            await asyncio.wait({reading})
