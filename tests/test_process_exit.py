"""
Process life cycles in real child processes: interpreter exit under ``-W error``, SIGTERM
after a backend was started off the main thread or by a `SyncExecutor`, and `os.fork` of
a process holding a `SyncExecutor` (the ``gunicorn --preload`` pattern).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a child script's prelude: the fake server on a daemon thread (left running at exit),
# two providers on it, and the records of the fault tests
PRELUDE = f"""
import asyncio, atexit, gc, json, os, sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
from tests._threaded_server import threaded_fake_server
from tests.faults._load import record
from empathy_models import AnthropicProvider, ExecutionContext, EmpathyLLMExecutor
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.sync import SyncExecutor

CTX = ExecutionContext(workflow="w", stage="s", tier="cheap")

SERVERS = []

def serve():
    manager = threaded_fake_server(api_key="k", seed=1)
    server = manager.__enter__()
    SERVERS.append(manager)
    atexit.register(manager.__exit__, None, None, None)  # the last exit hook to run
    return [AnthropicProvider(api_key="k", base_url=server.anthropic_base_url)]
"""


def stored(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0])
    finally:
        conn.close()


def run_child(
    body: str, *args: str, flags: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, *flags, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- exit under -W error

UNCLOSED_BACKEND = """
async def main():
    telemetry = SQLiteTelemetryBackend(sys.argv[1], flush_interval=60, max_batch=1000)
    await telemetry.recent()
    for i in range(50):
        await telemetry.record(record("exit", i))
    if sys.argv[2] == "gc":
        del telemetry
        gc.collect()
asyncio.run(main())
print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["exit", "gc"])
@pytest.mark.parametrize("flag", ["error::ResourceWarning", "error"])
def test_an_unclosed_backend_is_flushed_whatever_the_warning_filters(
    tmp_path: Path, how: str, flag: str
) -> None:
    """``-W error`` turns the ResourceWarning into an error, but never loses the records."""
    db = tmp_path / "calls.db"
    done = run_child(UNCLOSED_BACKEND, str(db), how, flags=("-W", flag))
    assert "done" in done.stdout, done.stderr
    assert stored(db) == 50, done.stderr
    assert "ResourceWarning" in done.stderr  # still said, as an error


def test_an_executor_left_open_stores_every_call_under_w_error(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    body = """
    providers = serve()
    async def main():
        ex = EmpathyLLMExecutor(providers, telemetry_store="sqlite:///" + sys.argv[1])
        await ex.__aenter__()
        for i in range(50):
            await ex.run("q", CTX)
        print("answered", flush=True)
    asyncio.run(main())
    """
    done = run_child(body, str(db), flags=("-W", "error::ResourceWarning"))
    assert "answered" in done.stdout, done.stderr
    assert stored(db) == 50, done.stderr
