"""`FakeLLMServer` on an event loop of its own thread, for synchronous tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from empathy_models.testing import FakeLLMServer


@contextmanager
def threaded_fake_server(**options: Any) -> Iterator[FakeLLMServer]:
    """Start a `FakeLLMServer` on a background loop; stop it (and the loop) on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-llm-server", daemon=True)
    thread.start()
    server = FakeLLMServer(**options)
    try:
        asyncio.run_coroutine_threadsafe(server.__aenter__(), loop).result(30)
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.__aexit__(None, None, None), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
