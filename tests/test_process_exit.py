"""
Process life cycles in real child processes: interpreter exit under ``-W error``, SIGTERM
after a backend was started off the main thread or by a `SyncExecutor`, and `os.fork` of
a process holding a `SyncExecutor` (the ``gunicorn --preload`` pattern).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from empathy_models.backends.sqlite import SQLiteTelemetryBackend

ROOT = Path(__file__).resolve().parent.parent

# a child script's prelude: the fake server on a daemon thread, a provider on it, and
# the records of the fault tests
PRELUDE = f"""
import asyncio, atexit, faulthandler, gc, json, os, signal, sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
faulthandler.register(signal.SIGUSR1)  # a child that hangs: its threads' stacks on stderr
from empathy_models.testing import FakeLLMServer
from tests.faults._load import record
from empathy_models import AnthropicProvider, ExecutionContext, EmpathyLLMExecutor
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.sync import SyncExecutor

CTX = ExecutionContext(workflow="w", stage="s", tier="cheap")

def serve():  # a FakeLLMServer on a daemon thread's loop, stopped at exit (not in a fork)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = FakeLLMServer(api_key="k", seed=1)
    asyncio.run_coroutine_threadsafe(server.__aenter__(), loop).result(30)
    parent = os.getpid()

    def stop():  # the last exit hook to run (registered first)
        if os.getpid() == parent:
            asyncio.run_coroutine_threadsafe(server.__aexit__(None, None, None), loop).result(30)

    atexit.register(stop)
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


def stored_after_replay(db: Path) -> int:
    """`stored`, once the next open replayed what an exit path spooled (lock not had)."""

    async def replay() -> None:
        async with SQLiteTelemetryBackend(db) as again:
            with anyio.fail_after(30):
                await again.flush()

    anyio.run(replay)
    return stored(db)


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


# ---------------------------------------------------------------- SyncExecutor at exit


def test_a_sync_executor_left_open_closes_itself_before_the_backends_exit_flush(
    tmp_path: Path,
) -> None:
    """No "never closed" warning for the backend it owns: it is closed first, in order."""
    db = tmp_path / "calls.db"
    body = """
    llm = SyncExecutor(serve(), telemetry_store="sqlite:///" + sys.argv[1])
    for i in range(30):
        llm.run("q", CTX)
    print("runs done", flush=True)
    """
    done = run_child(body, str(db), flags=("-X", "dev", "-W", "error::ResourceWarning"))
    assert done.returncode == 0, done.stderr
    assert "never closed" not in done.stderr, done.stderr
    assert stored(db) == 30, done.stderr


# ---------------------------------------------------------------- SIGTERM

SIGTERM_SYNC = """
telemetry = SQLiteTelemetryBackend(sys.argv[1], flush_interval=60, max_batch=1000)
llm = SyncExecutor(serve(), telemetry_store=telemetry)
llm.call(telemetry.recent)  # the file created: exit paths write into an existing one
for i in range(20):
    llm.run("q", CTX)
print(json.dumps({"ready": 20}), flush=True)
time.sleep(60)
"""

SIGTERM_ASYNC_AFTER_THREAD = """
def elsewhere():
    async def touch():
        async with SQLiteTelemetryBackend(sys.argv[1] + ".other") as other:
            await other.record(record("other", 0))
    asyncio.run(touch())
thread = threading.Thread(target=elsewhere)
thread.start()
thread.join()
providers = serve()
async def main():
    telemetry = SQLiteTelemetryBackend(sys.argv[1], flush_interval=60, max_batch=1000)
    async with EmpathyLLMExecutor(providers, telemetry_store=telemetry) as ex:
        await telemetry.recent()  # the file created: exit paths write into an existing one
        for i in range(20):
            await ex.run("q", CTX)
        print(json.dumps({"ready": 20}), flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    "body", [SIGTERM_SYNC, SIGTERM_ASYNC_AFTER_THREAD], ids=["sync", "async-after-thread"]
)
def test_sigterm_writes_the_queued_records_when_a_backend_started_off_the_main_thread(
    tmp_path: Path, body: str
) -> None:
    db = tmp_path / "calls.db"
    script = PRELUDE + textwrap.dedent(body)
    with subprocess.Popen(
        [sys.executable, "-c", script, str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            assert json.loads(line) == {"ready": 20}, proc.stderr.read()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)  # where it hangs, for the failure below
                time.sleep(1)
                proc.kill()
                pytest.fail(f"no exit 30 s after SIGTERM; stderr:\n{proc.communicate()[1]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert stored_after_replay(db) == 20


SIGTERM_DURING_EXIT_FLUSH = """
import signal

def on_exit():  # runs first (registered last): SIGTERM lands in the exit flush's write
    def hook(event, args):
        if event == "sqlite3.connect" and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
    fired = []
    sys.addaudithook(hook)

async def main():
    telemetry = SQLiteTelemetryBackend(sys.argv[1], flush_interval=60, max_batch=1000)
    await telemetry.recent()  # open: the file exists when the exit flush writes it
    for i in range(50):
        await telemetry.record(record("exit", i))
    atexit.register(on_exit)
asyncio.run(main())  # never closed: written at interpreter exit
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_the_exit_flush_loses_none_of_its_records(tmp_path: Path) -> None:
    # the exit flush had taken the records out of the queue: the SIGTERM handler found
    # it empty and ended the process, the records in no queue, file or spool
    db = tmp_path / "calls.db"
    done = run_child(SIGTERM_DURING_EXIT_FLUSH, str(db), flags=("-W", "ignore::ResourceWarning"))
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert stored_after_replay(db) == 50, done.stderr


# ---------------------------------------------------------------- fork

FORK = """
llm = SyncExecutor(serve(), telemetry_store="sqlite:///" + sys.argv[1])
llm.run("q", CTX)
pid = os.fork()
if pid == 0:
    if sys.argv[2] == "use":
        try:
            llm.run("q", CTX, timeout=20)
            print("child: ran", flush=True)
        except Exception as exc:
            print("child:", type(exc).__module__, type(exc).__name__, exc, flush=True)
    sys.exit(0)  # a normal exit: atexit hooks and finalizers run
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("parent: child exited with", os.waitstatus_to_exitcode(status), flush=True)
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("parent: child hung", flush=True)
llm.run("q", CTX)
llm.close()
print("parent: closed", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
@pytest.mark.parametrize("mode", ["idle", "use"])
def test_a_forked_child_never_hangs_on_the_parents_sync_executor(tmp_path: Path, mode: str) -> None:
    db = tmp_path / "calls.db"
    done = run_child(FORK, str(db), mode, flags=("-W", "ignore::DeprecationWarning"))
    assert "parent: child exited with 0" in done.stdout, done.stdout + done.stderr
    assert "parent: closed" in done.stdout, done.stderr
    if mode == "use":
        said = [line for line in done.stdout.splitlines() if line.startswith("child:")]
        assert len(said) == 1, done.stdout
        assert "empathy_models.exceptions NotOpenError" in said[0]
        assert "created in process" in said[0] and "make a new one" in said[0]
    assert stored(db) == 2  # the parent's two calls, each stored once
