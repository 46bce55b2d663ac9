"""The telemetry spool: what goes through it is replayed into its store, as written."""

from __future__ import annotations

import builtins
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from empathy_models import LLMCallRecord
from empathy_models.abc import TelemetryBackend
from empathy_models.backends._spool import Spool
from empathy_models.backends.batching import BatchingTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.evidence import EvidenceBatch
from empathy_models.exceptions import TelemetryError
from empathy_models.records import ModelPerformance
from tests.test_batching import ChokingSQLite, _records

ROOT = str(Path(__file__).resolve().parent.parent)


class ThirdPartyStore(TelemetryBackend):
    """
    A persistent backend as a third party writes one: neither a ``spool_target`` nor a
    ``__repr__`` of its own (the store is an unbatched SQLite file underneath).
    """

    def __init__(self, path: Path, *, down: bool = False) -> None:
        self._db = SQLiteTelemetryBackend(path, batch=False)
        self.down = down

    @property
    def persistent(self) -> bool:
        return True

    async def _aopen(self) -> None:
        await self._db.__aenter__()

    async def _aclose(self) -> None:
        await self._db.aclose()

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        if self.down:
            raise TelemetryError("the store is down", target="third-party")
        await self._db.record_many(records)

    async def _recent(self, **query: object) -> list[LLMCallRecord]:
        return await self._db.recent(**query)  # type: ignore[arg-type]

    async def _aggregate(self, **query: object) -> list[ModelPerformance]:
        return await self._db.aggregate(**query)  # type: ignore[arg-type]

    async def _spend(self, **query: object) -> dict[tuple[str | None, str | None, str], float]:
        return await self._db.spend(**query)  # type: ignore[arg-type]

    async def _evidence(self, **query: object) -> EvidenceBatch:
        return await self._db.evidence(**query)  # type: ignore[arg-type]

    async def _purge(self, **query: object) -> int:
        return await self._db.purge(**query)  # type: ignore[arg-type]


async def test_a_third_party_store_replays_the_spool_another_instance_left(
    tmp_path: Path,
) -> None:
    # its default repr names the object ("<... object at 0x7f...>"), not the store: a
    # spool named after it was one per instance, which no later process ever replayed
    db = tmp_path / "calls.db"
    records = _records(5)
    first = BatchingTelemetryBackend(ThirdPartyStore(db, down=True), close_timeout=0.1)
    async with first:
        await first.record_many(records)
    assert first.spooled == 5  # not written within close_timeout: spooled
    async with BatchingTelemetryBackend(ThirdPartyStore(db)) as again:  # the next process
        stored = await again.recent(limit=100)
    assert sorted(r.call_id for r in stored) == sorted(r.call_id for r in records)


# ------------------------------------------- what a store takes is stored as given

NUL = "a\x00b"  # SQLite stores a NUL as given (PostgreSQL refuses it: made safe there)


def _as_given(stored: list[LLMCallRecord], written: list[LLMCallRecord]) -> None:
    assert sorted(stored, key=lambda r: r.call_id) == sorted(written, key=lambda r: r.call_id)


async def test_records_the_store_takes_go_through_the_spool_as_given(tmp_path: Path) -> None:
    # a burst past max_queue goes through the spool; it escaped a NUL (as for a store
    # that refuses it) and flagged the record made safe, though SQLite takes it: the
    # same call was stored two ways, and its evidence split over two workflows
    written = _records(6, workflow=NUL, metadata={"note": "v\x00"})
    async with SQLiteTelemetryBackend(tmp_path / "calls.db", max_queue=2) as telemetry:
        await telemetry.record_many(written)
        await telemetry.flush()
        assert telemetry.spooled > 0
        _as_given(await telemetry.recent(limit=100), written)
        buckets = (await telemetry.evidence()).buckets
    assert [(b.workflow, b.samples) for b in buckets] == [(NUL, 6)]


EXIT_CHILD = """
import asyncio, sys
from datetime import UTC, datetime
from empathy_models import LLMCallRecord
from empathy_models.backends.sqlite import SQLiteTelemetryBackend

async def main():
    telemetry = SQLiteTelemetryBackend(sys.argv[1], flush_interval=60, max_batch=1000)
    await telemetry.recent()  # open: the file exists when the exit flush writes it
    for i in range(3):
        await telemetry.record(LLMCallRecord(
            provider="p", model="m", outcome="success", call_id=f"r{i}",
            workflow="a" + chr(0) + "b", timestamp=datetime(2026, 2, 1, 0, 0, i, tzinfo=UTC),
            latency_ms=float(i), metadata={"note": "v" + chr(0)},
        ))
    if sys.argv[2] == "refused":  # a lone surrogate: SQLite refuses the record as given
        await telemetry.record(LLMCallRecord(
            provider="p", model="m", outcome="success", call_id="odd", response_text="x\\udcff",
        ))

asyncio.run(main())  # never closed: written at interpreter exit
"""


async def _exit_child(db: Path, mode: str) -> list[LLMCallRecord]:
    child = await anyio.run_process(
        [sys.executable, "-W", "ignore::ResourceWarning", "-c", EXIT_CHILD, str(db), mode],
        check=False,
    )
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    async with SQLiteTelemetryBackend(db) as telemetry:
        return await telemetry.recent(limit=100)


async def test_records_the_store_takes_are_written_as_given_at_exit(tmp_path: Path) -> None:
    stored = await _exit_child(tmp_path / "calls.db", "taken")
    _as_given(stored, _records(3, workflow=NUL, metadata={"note": "v\x00"}))


async def test_a_record_the_store_refuses_at_exit_is_written_made_safe_with_the_others(
    tmp_path: Path,
) -> None:
    stored = {r.call_id: r for r in await _exit_child(tmp_path / "calls.db", "refused")}
    assert sorted(stored) == ["odd", "r0", "r1", "r2"]
    assert stored["odd"].response_text == "x\\udcff"
    assert stored["odd"].metadata["empathy_models.sanitized"] == "response_text"


# ------------------------------------------- a replay cut short by aclose


class StalledStore(ThirdPartyStore):
    """`ThirdPartyStore` whose writes hang while ``stalled`` (a store that stopped answering)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.stalled = True
        self.entered = anyio.Event()

    @property
    def spool_target(self) -> str:
        return f"stalled:{self._db.path}"

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        self.entered.set()
        if self.stalled:
            await anyio.sleep_forever()
        await super().record_many(records)


REPLAY_CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from tests.test_spool import StalledStore
from empathy_models.backends.batching import BatchingTelemetryBackend

async def main():
    inner = StalledStore(sys.argv[1])
    inner.stalled = False
    async with BatchingTelemetryBackend(inner) as telemetry:
        print(len(await telemetry.recent(limit=100)))

asyncio.run(main())
"""


async def test_a_replay_cut_short_by_aclose_leaves_the_spool_to_other_processes(
    tmp_path: Path,
) -> None:
    # the claim of a replay that aclose cancelled stayed on the file under this
    # process's id: while this process lived, no other process replayed those records
    db = tmp_path / "calls.db"
    inner = StalledStore(db)
    Spool(inner.spool_target).write(_records(5))  # as a process that met an outage left it
    telemetry = BatchingTelemetryBackend(inner, close_timeout=0.1)
    async with telemetry:
        await inner.entered.wait()  # replaying the spool; the store does not answer
    child = await anyio.run_process(
        [sys.executable, "-c", REPLAY_CHILD, str(db), ROOT], check=False
    )
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    assert child.stdout.decode().split() == ["5"]


def test_files_of_held_records_are_replayed_after_the_others() -> None:
    spool = Spool("held-order")
    spool.write(_records(1, "held"), held=True)
    spool.write(_records(2, "later"))
    files = spool.files()
    assert [Spool.is_held(path) for path in files] == [False, True]
    assert [r.call_id for path in files for r in spool.read(path)[0]] == [
        "later0",
        "later1",
        "held0",
    ]


# ------------------------------------------- a spill killed before its rename

KILLED_SPILL_CHILD = """
import asyncio, os, signal, sys
from datetime import UTC, datetime
from empathy_models import LLMCallRecord
from empathy_models.backends.sqlite import SQLiteTelemetryBackend

def hook(event, args):  # killed with its spool file written, before the rename
    if event == "os.rename" and str(args[0]).endswith(".tmp"):
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    telemetry = SQLiteTelemetryBackend(sys.argv[1], max_queue=2, flush_interval=60)
    await telemetry.recent()  # open
    sys.addaudithook(hook)
    await telemetry.record_many([
        LLMCallRecord(provider="p", model="m", outcome="success", call_id=f"r{i}",
                      timestamp=datetime(2026, 2, 1, tzinfo=UTC))
        for i in range(4)
    ])  # r0 and r1 spill; r2 and r3 are queued (written, or lost with the process)
    await asyncio.sleep(100)

asyncio.run(main())
"""


async def test_a_spill_killed_before_its_rename_is_replayed_by_the_next_open(
    tmp_path: Path, empathy_home: Path
) -> None:
    # the spill's file was complete on disk under its temporary name, which no replay
    # read: its records were lost, and the file (calls' prompts and answers) was kept
    # for ever in the spool directory
    db = tmp_path / "calls.db"
    child = await anyio.run_process(
        [sys.executable, "-c", KILLED_SPILL_CHILD, str(db)], check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode(errors="replace")
    async with SQLiteTelemetryBackend(db) as telemetry:
        stored = await telemetry.recent(limit=100)
    assert {"r0", "r1"} <= {r.call_id for r in stored}
    assert [p.name for p in (empathy_home / "spool").rglob("*") if p.is_file()] == []


class FailingAfterOneWrite(ThirdPartyStore):
    """`ThirdPartyStore` that goes down once it has taken one write."""

    @property
    def spool_target(self) -> str:
        return f"failing-after-one:{self._db.path}"

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        await super().record_many(records)
        self.down = True


KILLED_REPLAY_CHILD = """
import asyncio, os, signal, sys
sys.path.insert(0, sys.argv[2])
from tests.test_spool import FailingAfterOneWrite
from empathy_models.backends.batching import BatchingTelemetryBackend

def hook(event, args):  # killed giving the spool file back, before the rename
    if event == "os.rename" and str(args[0]).endswith(".tmp"):
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    sys.addaudithook(hook)
    async with BatchingTelemetryBackend(FailingAfterOneWrite(sys.argv[1]), max_batch=2):
        await asyncio.sleep(100)  # the replay writes 2 records, then the store fails

asyncio.run(main())
"""


async def test_a_replay_killed_giving_its_file_back_leaves_nothing_behind(
    tmp_path: Path, empathy_home: Path
) -> None:
    # the rewrite of the claimed file (its records not yet written) was left under its
    # temporary name for ever, beside the claimed file it copied
    db = tmp_path / "calls.db"
    Spool(FailingAfterOneWrite(db).spool_target).write(_records(5))
    child = await anyio.run_process(
        [sys.executable, "-c", KILLED_REPLAY_CHILD, str(db), ROOT], check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode(errors="replace")
    async with BatchingTelemetryBackend(FailingAfterOneWrite(db)) as telemetry:
        stored = await telemetry.recent(limit=100)  # the replay: one write
    assert sorted(r.call_id for r in stored) == [f"r{i}" for i in range(5)]
    assert [p.name for p in (empathy_home / "spool").rglob("*") if p.is_file()] == []


async def test_a_spool_that_cannot_be_placed_keeps_no_record_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # the replay at start raised EMPATHY_HOME's ConfigurationError in the flusher, which
    # died: the store was never written, and aclose gave every record up
    monkeypatch.setenv("EMPATHY_HOME", "relative/home")
    db = tmp_path / "calls.db"
    with caplog.at_level(logging.WARNING, logger="empathy_models.telemetry"):
        async with SQLiteTelemetryBackend(db) as telemetry:
            await telemetry.record_many(_records(10))
    assert (telemetry.written, telemetry.failed) == (10, 0)
    async with SQLiteTelemetryBackend(db, spool=False) as again:
        assert len(await again.recent(limit=100)) == 10
    (said,) = [r.getMessage() for r in caplog.records if "spool" in r.getMessage()]
    assert "cannot replay the spool" in said and "EMPATHY_HOME='relative/home'" in said


async def test_a_spool_line_nested_too_deep_is_skipped_as_unreadable(tmp_path: Path) -> None:
    # json.loads raised RecursionError, which no replay caught: the flusher died at
    # every open, and the file's other records were never stored
    db = tmp_path / "calls.db"
    spool = Spool(f"sqlite:{db}")
    spool.write(_records(3, "old"))
    (path,) = spool.files()
    async with await anyio.open_file(path, "a", encoding="utf-8") as f:
        await f.write("[" * 100_000 + "]" * 100_000 + "\n")
    async with SQLiteTelemetryBackend(db) as telemetry:
        await telemetry.record_many(_records(2, "new"))
        await telemetry.flush()
        stored = sorted(r.call_id for r in await telemetry.recent(limit=100))
        assert (stored, telemetry.failed) == (["new0", "new1", "old0", "old1", "old2"], 1)
    assert spool.files() == []


async def test_a_spooled_tier_or_circuit_state_this_version_does_not_know_reads_as_unknown(
    tmp_path: Path,
) -> None:
    # a spool a newer version left (then downgraded): its records are stored, not skipped
    db = tmp_path / "calls.db"
    spool = Spool(f"sqlite:{db}")
    spool.write(_records(3, "old"))
    (path,) = spool.files()
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first.update(tier="ultra", circuit_state="quarantined")
    path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n", encoding="utf-8")
    async with SQLiteTelemetryBackend(db) as telemetry:
        await telemetry.flush()
        stored = {r.call_id: r for r in await telemetry.recent(limit=100)}
        assert (sorted(stored), telemetry.failed) == (["old0", "old1", "old2"], 0)
    assert (stored["old0"].tier, stored["old0"].circuit_state) == (None, None)
    assert spool.files() == []


# ------------------------------------------- the spool's files out of reach for a while


def _deny_spool_renames(
    monkeypatch: pytest.MonkeyPatch, home: Path, only: str = ""
) -> dict[str, bool]:
    """
    Make every rename in the spool (of the files whose names start with ``only``) fail
    with ``PermissionError`` while ``denied["on"]`` (what a directory made read-only,
    or a file taken by another user, does).
    """
    real = os.rename
    denied = {"on": True}

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(src)
        if denied["on"] and path.is_relative_to(home / "spool") and path.name.startswith(only):
            raise PermissionError(13, "Permission denied", str(src))
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    return denied


async def test_a_spool_file_that_cannot_be_claimed_is_replayed_once_it_can(
    tmp_path: Path,
    empathy_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the PermissionError of the claim's rename ended the flusher: new records waited
    # for a flush to restart it, and the spool was never replayed again by this process
    db = tmp_path / "calls.db"
    Spool(f"sqlite:{db}").write(_records(3, "old"))
    denied = _deny_spool_renames(monkeypatch, empathy_home)
    with caplog.at_level(logging.WARNING, logger="empathy_models.telemetry"):
        async with SQLiteTelemetryBackend(db, flush_interval=0.01) as telemetry:
            await telemetry.record_many(_records(2, "new"))
            with anyio.fail_after(5):
                while telemetry.written < 2:  # noqa: ASYNC110 - by the flusher, no flush asked
                    await anyio.sleep(0.01)
            denied["on"] = False
            await telemetry.flush()
            stored = sorted(r.call_id for r in await telemetry.recent(limit=100))
    assert stored == ["new0", "new1", "old0", "old1", "old2"]
    assert Spool(f"sqlite:{db}").files() == []
    said = [r.getMessage() for r in caplog.records if "PermissionError" in r.getMessage()]
    assert len(said) == 1 and "replayed later" in said[0]
    assert not [r for r in caplog.records if "flusher failed" in r.getMessage()]


async def test_a_spool_file_that_cannot_be_claimed_holds_up_no_other(
    tmp_path: Path, empathy_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first file's PermissionError ended the replay: every file after it waited too
    db = tmp_path / "calls.db"
    spool = Spool(f"sqlite:{db}")
    spool.write(_records(2, "stuck"))
    spool.write(_records(2, "free"))
    first = spool.files()[0].name
    _deny_spool_renames(monkeypatch, empathy_home, only=first)
    async with SQLiteTelemetryBackend(db) as telemetry:
        await telemetry.flush()
        stored = sorted(r.call_id for r in await telemetry.recent(limit=100))
    assert stored == ["free0", "free1"]
    assert [path.name for path in spool.files()] == [first]


# ------------------------------------------- a burst past max_queue, then aclose


@pytest.mark.parametrize(
    ("burst", "spilling", "spooled"), [(11, False, 0), (11, True, 10), (35, False, 20)]
)
async def test_a_burst_past_max_queue_closed_at_once_leaves_nothing_in_the_spool(
    tmp_path: Path, burst: int, spilling: bool, spooled: int
) -> None:
    # the spill task wrote its file after the flusher had ended: with the store up at
    # close, the records stayed in the spool (and out of the store) until another
    # process opened it; those still waiting for the spill task at close are written
    # to the store instead of going through the spool
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db, max_queue=10) as telemetry:
        await telemetry.recent()  # open
        await telemetry.record_many(_records(burst))
        if spilling:
            await anyio.lowlevel.checkpoint()  # the spill task starts writing its file
    assert (telemetry.written, telemetry.failed, telemetry.spooled) == (burst, 0, spooled)
    assert Spool(f"sqlite:{db}").files() == []
    async with SQLiteTelemetryBackend(db, spool=False) as again:
        assert len(await again.recent(limit=100)) == burst


async def test_a_spool_file_that_cannot_be_read_is_replayed_once_it_can(
    tmp_path: Path, empathy_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the file was taken for written: left under this process's claim, and not tried
    # again by this process (nor by any other while it lived)
    db = tmp_path / "calls.db"
    Spool(f"sqlite:{db}").write(_records(3, "old"))
    real = builtins.open
    denied = {"on": True}

    def unreadable(file: Any, *args: Any, **kwargs: Any) -> Any:
        if denied["on"] and isinstance(file, Path) and file.is_relative_to(empathy_home):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", unreadable)
    async with SQLiteTelemetryBackend(db) as telemetry:
        await telemetry.flush()
        assert await telemetry.recent(limit=100) == []
        denied["on"] = False
        await telemetry.flush()
        stored = sorted(r.call_id for r in await telemetry.recent(limit=100))
    assert stored == ["old0", "old1", "old2"]
    assert Spool(f"sqlite:{db}").files() == []


class GatedStore(ThirdPartyStore):
    """`ThirdPartyStore` whose writes wait for ``gate``; counts the records it is given."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = anyio.Event()
        self.entered = anyio.Event()
        self.given = 0

    @property
    def spool_target(self) -> str:
        return f"gated:{self._db.path}"

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        self.entered.set()
        await self.gate.wait()
        self.given += len(records)
        await super().record_many(records)


async def test_a_file_one_backend_is_replaying_is_not_replayed_by_another_in_the_process(
    tmp_path: Path,
) -> None:
    # a claim under this process's id was taken for one an interrupted replay left: a
    # second backend of the same store in the process (an executor's and a router's)
    # replayed the file the first was replaying, each record twice
    db = tmp_path / "calls.db"
    first, second = GatedStore(db), GatedStore(db)
    Spool(first.spool_target).write(_records(5))
    second.gate.set()
    async with BatchingTelemetryBackend(first) as one:
        await first.entered.wait()  # replaying the file, the store not answering yet
        async with BatchingTelemetryBackend(second) as two:
            await two.flush()
            assert second.given == 0
            first.gate.set()
            await one.flush()
            assert sorted(r.call_id for r in await one.recent(limit=100)) == [
                f"r{i}" for i in range(5)
            ]
    assert (first.given, second.given) == (5, 0)
    assert Spool(first.spool_target).files() == []


async def test_a_burst_spilled_while_a_held_record_waits_is_replayed_at_close(
    tmp_path: Path,
) -> None:
    # a record the store failed on alone put the replay off for its backoff: a burst
    # spilled meanwhile and closed at once stayed in the spool with it, the store up
    inner = ChokingSQLite(tmp_path / "calls.db")
    async with BatchingTelemetryBackend(inner, max_batch=10, max_queue=10) as telemetry:
        await telemetry.record_many([*_records(1, "poison"), *_records(3, "old")])
        await telemetry.flush()  # the poison record held back, in the spool
        await telemetry.record_many(_records(11, "burst"))
        await anyio.lowlevel.checkpoint()  # the spill task starts writing its file
    files = Spool(inner.spool_target).files()
    assert [r.call_id for path in files for r in Spool(inner.spool_target).read(path)[0]] == [
        "poison0"
    ]
    async with SQLiteTelemetryBackend(inner.path, spool=False) as reader:
        stored = {r.call_id for r in await reader.recent(limit=100)}
    assert stored == {r.call_id for r in [*_records(3, "old"), *_records(11, "burst")]}
