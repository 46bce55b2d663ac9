"""
One child process speaking JSON lines over its pipes, with a deadline on every read:
the harness of the multiprocess checks (`empathy_models.testing.fleet`) and of the
project's own multiprocess tests.  A child that dies or stays silent fails the check
with its stderr (`AssertionError`).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["JsonLinesChild"]


class JsonLinesChild:
    """One worker process (``command``) and its JSON-lines conversation."""

    def __init__(self, command: Sequence[str], *, name: str | None = None) -> None:
        self.name = (name or " ".join(command))[:120]
        self.proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self._buffer = b""

    def send(self, payload: dict[str, Any] | str) -> None:
        assert self.proc.stdin is not None
        line = payload if isinstance(payload, str) else json.dumps(payload)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next JSON line; fails with the child's stderr if it dies or stays silent."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.fail(f"no answer within {timeout} s")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self.fail("exited early")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.send(payload)
        return self.read()

    def stderr(self) -> str:
        """The child's stderr, once it has exited (it is killed if it has not)."""
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        return self.proc.stderr.read().decode(errors="replace")

    def fail(self, why: str) -> NoReturn:
        raise AssertionError(f"worker {self.name}: {why}\n{self.stderr()}")

    def finish(self, goodbye: dict[str, Any] | None = None) -> str:
        """
        Ask the child to exit (``goodbye``, or end of input) and wait for a clean exit;
        return its stderr, failing on a non-zero exit or a hang.
        """
        assert self.proc.stdin is not None
        if goodbye is not None:
            self.send(goodbye)
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.fail("did not exit")
        err = self.stderr()
        if self.proc.returncode != 0:
            raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{err}")
        return err

    def close(self) -> None:
        """Kill the child if it still runs, then close the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
