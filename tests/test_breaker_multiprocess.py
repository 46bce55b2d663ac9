"""
Three OS processes guard one key through `CircuitBreaker` on one shared store.

Failures from all of them trip it at exactly the threshold; every process then rejects
within the staleness bound (``local_view_ttl``); after the recovery time exactly one
probe is admitted across the three, and its success closes the circuit for everyone.

With SQLite the children's clock (breaker and store) is set by each command, so nothing
waits for time to pass.  Stores that keep time on their server (Redis, PostgreSQL) run
the same script on the real clock with short durations, when their URL is set in
``EMPATHY_TEST_REDIS_URL`` / ``EMPATHY_TEST_POSTGRES_DSN``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from empathy_models import CircuitState, state_store_from_url
from empathy_models.records import CircuitBreakerState
from tests._namespaces import drop_namespace, private_url
from tests._workers import Child

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).parent / "_workers" / "breaker_worker.py"
T0 = 1_800_000_000.0
THRESHOLD = 5


@contextmanager
def workers(count: int, config: dict[str, Any]) -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        for _ in range(count):
            started.append(Child(WORKER, json.dumps(config)))  # noqa: PERF401 - one by one, so a failed start still closes the rest
        for worker in started:
            assert worker.read() == {"ready": True}
        yield started
    finally:
        for worker in started:
            worker.close()


class Clock:
    """Fake time sent with every command, or the real clock for server-time stores."""

    def __init__(self, fake: bool) -> None:
        self.fake = fake
        self.now = T0

    def advance(self, seconds: float) -> None:
        if self.fake:
            self.now += seconds
        else:
            time.sleep(seconds)  # the store's server keeps the time: it must really pass


def snapshot(url: str, key: str, clock: Clock) -> CircuitBreakerState:
    async def read() -> CircuitBreakerState:
        options: dict[str, Any] = {"clock": lambda: clock.now} if clock.fake else {}
        async with state_store_from_url(url, **options) as store:
            return await store.snapshot(key)

    return anyio.run(read)


def _stores() -> list[Any]:
    redis = os.environ.get("EMPATHY_TEST_REDIS_URL")
    postgres = os.environ.get("EMPATHY_TEST_POSTGRES_DSN")
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            redis,
            id="redis",
            marks=pytest.mark.skipif(not redis, reason="EMPATHY_TEST_REDIS_URL is not set"),
        ),
        pytest.param(
            postgres,
            id="postgres",
            marks=pytest.mark.skipif(not postgres, reason="EMPATHY_TEST_POSTGRES_DSN is not set"),
        ),
    ]


@pytest.mark.parametrize("url", _stores())
@pytest.mark.slow
def test_three_processes_share_one_breaker(url: str, tmp_path: Path) -> None:
    fake = url == "sqlite"
    if fake:
        url = f"sqlite:///{tmp_path / 'state.db'}"
        _check_three_processes(url, fake)
        return
    url = private_url(url)
    try:
        _check_three_processes(url, fake)
    finally:
        drop_namespace(url)


def _check_three_processes(url: str, fake: bool) -> None:
    # fake time: any durations; real time: short ones, so the test stays a few seconds
    ttl, recovery = (1.0, 10.0) if fake else (0.2, 1.0)
    key = f"provider-{uuid.uuid4().hex[:8]}"
    clock = Clock(fake)
    config = {
        "url": url,
        "ttl": ttl,
        "fake_time": fake,
        "policy": {
            "consecutive_failures": THRESHOLD,
            "minimum_calls": 1000,
            "recovery_seconds": recovery,
            "max_recovery_seconds": recovery * 10,
            "half_open_probes": 1,
            "probe_lease_seconds": 60.0,
        },
    }
    with workers(3, config) as procs:
        # failures from all three processes, in turn, trip the key at exactly the threshold
        for i in range(THRESHOLD):
            answer = procs[i % 3].ask({"op": "fail", "key": key, "now": clock.now})
            assert answer == {"admitted": True, "state": None}
            state = snapshot(url, key, clock)
            if i + 1 < THRESHOLD:
                assert state.state is CircuitState.CLOSED, state
                assert state.consecutive_failures == i + 1
            else:
                assert state.state is CircuitState.OPEN, state
                assert state.consecutive_failures == THRESHOLD
                assert state.generation == 1

        # within the staleness bound every process has seen the trip
        clock.advance(ttl)
        for proc in procs:
            answer = proc.ask({"op": "try", "key": key, "now": clock.now})
            assert answer == {"admitted": False, "state": "open"}

        # after the recovery time, all three race for the probe: exactly one gets it
        clock.advance(recovery)
        for proc in procs:
            proc.send({"op": "hold", "key": key, "now": clock.now})
        answers = [proc.read() for proc in procs]
        holders = [i for i, answer in enumerate(answers) if answer["admitted"]]
        assert len(holders) == 1, answers
        assert answers[holders[0]]["lease"]
        others = [proc for i, proc in enumerate(procs) if i not in holders]
        for answer in (answers[i] for i in range(3) if i not in holders):
            assert answer["state"] == "half_open"
        for proc in others:  # while the probe is out, nobody else gets through
            answer = proc.ask({"op": "try", "key": key, "now": clock.now})
            assert answer == {"admitted": False, "state": "half_open"}
        assert snapshot(url, key, clock).probes_in_flight == 1

        # the probe's success closes the circuit for every process
        assert procs[holders[0]].ask({"op": "release", "outcome": "success", "now": clock.now})
        assert snapshot(url, key, clock).state is CircuitState.CLOSED
        for proc in procs:
            answer = proc.ask({"op": "try", "key": key, "now": clock.now})
            assert answer == {"admitted": True, "state": None}
        for proc in procs:
            proc.finish({"op": "quit"})
    final = snapshot(url, key, clock)
    assert final.state is CircuitState.CLOSED
    assert final.window_calls == 3  # the three closing successes, flushed on exit


async def test_the_shipped_fleet_check_passes_on_a_shared_sqlite_file(tmp_path: Path) -> None:
    # the check plugins run on their stores (empathy_models.testing.fleet), here on the
    # core's own shared store
    from empathy_models.testing.fleet import breaker_fleet_check

    await breaker_fleet_check(f"sqlite:///{tmp_path / 'state.db'}")


# A store published under a scheme of its own whose URL holds a password; building it in
# a process whose command line shows that password fails (as `ps` would show it).
_SECRET_PLUGIN = """
import sys
from urllib.parse import urlsplit

from empathy_models.backends import BackendPlugin
from empathy_models.backends.sqlite import SQLiteStateStore


def state_store(url, **options):
    parts = urlsplit(url)
    shown = " ".join(sys.argv) + " " + " ".join(sys.orig_argv)
    if parts.password in shown:
        raise RuntimeError("the store's password is on this process's command line")
    return SQLiteStateStore(parts.path, **options)


PLUGIN = BackendPlugin(schemes=("vault",), package="vault-store", state_store=state_store)
"""


@pytest.mark.slow
async def test_the_fleet_check_keeps_the_store_url_off_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from empathy_models.testing.fleet import breaker_fleet_check

    plugin_dir = tmp_path / "site"
    plugin_dir.mkdir()
    (plugin_dir / "vault_store.py").write_text(_SECRET_PLUGIN)
    dist = plugin_dir / "vault_store-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vault-store\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[empathy_models.backends]\nvault = vault_store:PLUGIN\n"
    )
    monkeypatch.syspath_prepend(str(plugin_dir))  # this process; the children by PYTHONPATH
    inherited = os.environ.get("PYTHONPATH")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(plugin_dir), *([inherited] if inherited else [])])
    )
    await breaker_fleet_check(
        f"vault://operator:hunter2-{uuid.uuid4().hex}@localhost{tmp_path}/state.db"
    )
