"""
`FakeLLMServer` in an OS process of its own, so a benchmark's client process measures
only the client's CPU.

Run it as ``python -m benchmarks._fake_server_proc [SPEC]`` from the repository root (so
it serves this tree's code).  It starts ``FakeLLMServer()`` with its defaults (every model
a plain, immediate success), or as ``SPEC`` says: a JSON object with ``"api_key"`` (the
key the server requires) and ``"models"`` (model id -> `ModelBehavior` fields given as
JSON values: ``content``, ``output_tokens``, ...).  It prints the server's URL
(``http://127.0.0.1:<port>``; the OpenAI base URL is that plus ``/v1``) as its first line
on stdout, then reads commands, one a line, on stdin:

- ``cpu``: prints this process's CPU time so far (``time.process_time()``, seconds),
  so the client can take the server's CPU over a batch of calls;
- ``quit``, or the end of stdin (the client closed the pipe or died): stops the server
  and exits.

`ServerProcess` is the client's side: it starts the child, reads the URL and asks for
the CPU figure.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from empathy_models.testing import ModelBehavior
from empathy_models.testing.fake_server import FakeLLMServer

_ROOT = Path(__file__).resolve().parent.parent


async def _serve(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    behaviors = {m: ModelBehavior(**fields) for m, fields in spec.get("models", {}).items()}
    async with FakeLLMServer(behaviors, api_key=spec.get("api_key")) as server:
        print(server.url, flush=True)
        while True:
            # a blocking read in a worker thread: it takes no CPU while it waits, and
            # the loop stays free to serve requests
            line = await loop.run_in_executor(None, sys.stdin.readline)
            command = line.strip()
            if not line or command == "quit":
                break
            if command == "cpu":
                print(repr(time.process_time()), flush=True)
            else:
                print(f"error: unknown command {command!r}", flush=True)


class ServerProcess:
    """
    The client's handle on a `FakeLLMServer` child process (see the module doc).

    ``with ServerProcess() as server:`` starts it and waits for its URL; leaving the
    block asks it to quit and kills it if it has not exited within 5 seconds.
    ``models`` (model id -> `ModelBehavior` fields as JSON values) and ``api_key``
    configure the server as in the module doc.
    """

    def __init__(
        self, models: dict[str, dict[str, Any]] | None = None, api_key: str | None = None
    ) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._spec = json.dumps({"models": models or {}, "api_key": api_key})
        self.url = ""

    def __enter__(self) -> Self:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._fake_server_proc", self._spec],
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._proc = proc
        try:
            url = self._stdout().readline().strip()
            if not url.startswith("http://"):
                raise RuntimeError(f"the fake server process did not start (printed {url!r})")
        except BaseException:
            self._stop()
            raise
        self.url = url
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    @property
    def openai_base_url(self) -> str:
        """The ``base_url`` for `OpenAIProvider` (as `FakeLLMServer.openai_base_url`)."""
        return self.url + "/v1"

    def cpu(self) -> float:
        """The server process's CPU time so far, in seconds (a round trip over its pipes)."""
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise RuntimeError("the fake server process is not running")
        proc.stdin.write("cpu\n")
        proc.stdin.flush()
        return float(self._stdout().readline())

    def _stdout(self) -> IO[str]:
        assert self._proc is not None and self._proc.stdout is not None
        return self._proc.stdout

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.close()
        except OSError:  # it has exited already
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    asyncio.run(_serve(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
