"""
One SQLite file shared by processes: the aiosqlite connection, transactions with retries
on a busy lock, cancellation, migrations, 0600 files; shared with the quota store and
the response cache (`_store_database`: the circuit-state and quota stores' database).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import secrets
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final, TypeVar

import aiosqlite
import anyio
import anyio.to_thread

from ..._paths import quoted_path
from ..._validators import check, failure, number, shown
from ...evidence import (
    log_ms,
)
from ...exceptions import (
    BackendError,
    ConfigurationError,
    SchemaVersionError,
    StateStoreError,
)
from .._storable import known_outcomes
from ._conn import _Busy, _fetchone, _is_busy, _rollback
from ._schema import (
    _CALL_COLUMNS,
    _LOG_MS,
    _MAX_ID,
    _MIGRATIONS,
    _SELECT_CALLS,
    SCHEMA_VERSION,
    _add_evidence,
    _evidence_rows,
    _from_row,
    _outcome_of,
)

logger = logging.getLogger("empathy_models.backends.sqlite")

T = TypeVar("T")

MEMORY: Final = ":memory:"

# --------------------------------------------------------------------------- the connection


class _Connector:
    """
    Makes the `sqlite3` connection on aiosqlite's thread and keeps hold of it until
    the open that asked for it is settled.

    aiosqlite drops the connection its thread made when the awaiting open is
    cancelled, leaving it to the garbage collector unclosed (a file descriptor held
    until then, and a ``ResourceWarning`` from Python 3.13).  `abandon` closes that
    connection, or makes the thread close it if it is still connecting.  The
    connection is made with ``check_same_thread=False`` so that `abandon` may close it
    from the event loop's thread; aiosqlite itself uses it on its own thread only.
    """

    def __init__(self, path: str, timeout: float, *, uri: bool = False) -> None:
        self._path = path
        self._timeout = timeout
        self._uri = uri
        self._lock = threading.Lock()
        self._made: sqlite3.Connection | None = None
        self._abandoned = False

    def __call__(self) -> sqlite3.Connection:
        made = sqlite3.connect(
            self._path,
            timeout=self._timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=self._uri,
        )
        with self._lock:
            if self._abandoned:
                made.close()
                raise sqlite3.OperationalError("the open was cancelled")
            self._made = made
        return made

    def adopted(self) -> None:
        """The open succeeded: the aiosqlite connection owns and closes the connection."""
        with self._lock:
            self._made = None

    def abandon(self) -> None:
        """The open failed before `adopted`: close the connection, made or still to be."""
        with self._lock:
            self._abandoned = True
            made, self._made = self._made, None
        if made is not None:
            made.close()


class _Database:
    """
    One aiosqlite connection, opened on first use, and the rules for using it.

    `run` holds an `asyncio.Lock` from an operation's first statement to its last, so
    the operations of one backend never interleave on the connection.  The connection
    is opened (file created 0600, PRAGMAs, migrations) by the first operation; no
    thread exists before that.  Native errors are mapped to ``error`` (a
    `BackendError` subclass) naming the path; other exceptions pass through.

    Cancellation: see `_attempt`.  A transaction is never left open on the connection.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        error: type[BackendError],
        busy_timeout: float,
        lock_timeout: float,
        read_only: bool = False,
        allow_foreign: bool = False,
    ) -> None:
        path = _normalize_path(path)
        busy_timeout = _check_seconds("busy_timeout", busy_timeout)
        lock_timeout = _check_seconds("lock_timeout", lock_timeout)
        if not isinstance(read_only, bool) or not isinstance(allow_foreign, bool):
            raise ConfigurationError(
                f"read_only and allow_foreign must be True or False, got {shown(read_only)}, "
                f"{shown(allow_foreign)}"
            )
        if read_only and path == MEMORY:
            raise ConfigurationError("read_only needs a database file, not ':memory:'")
        self.read_only = read_only
        self.allow_foreign = allow_foreign
        self.path = path  # absolute, or ":memory:"
        self.error = error
        self.busy_timeout = busy_timeout
        self.lock_timeout = lock_timeout
        self.busy_retries = 0
        self.recreated = 0  # times the file was found deleted or replaced and recreated
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._stopped = False  # close() was called: no new operations
        self._finished = False  # close() is done (or gave up): no connection again

    # ------------------------------------------------------------------ errors

    def _fail(self, message: str, exc: BaseException | None = None) -> BackendError:
        err = self.error(f"SQLite database {self.path}: {message}", target=self.path)
        if exc is not None:
            err.__cause__ = exc
        return err

    def _map(self, exc: BaseException) -> BaseException:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, _Busy):
            return self._fail(
                f"stayed locked by other writers for more than {self.lock_timeout:g} s "
                "(raise lock_timeout or busy_timeout)",
                exc.__cause__,
            )
        if isinstance(exc, sqlite3.Error):
            text = str(exc)
            low = text.lower()
            if "not a database" in low or "malformed" in low or "corrupt" in low:
                return self._fail(f"the file is not a SQLite database or is corrupt ({text})", exc)
            if "readonly" in low or "read-only" in low:
                return self._fail(f"the database is read-only ({text})", exc)
            if "unable to open" in low:
                return self._fail(f"cannot open the file ({text})", exc)
            return self._fail(f"{type(exc).__name__}: {text}", exc)
        if isinstance(exc, OverflowError):
            return self._fail(f"a value does not fit in SQLite ({exc})", exc)
        if isinstance(exc, OSError):
            return self._fail(f"{exc.strerror or exc}", exc)
        if isinstance(exc, ValueError) and self._stopped:
            # aiosqlite's "Connection closed": aclose() stopped the connection meanwhile
            return self._fail("the connection is closed", exc)
        return exc

    # ------------------------------------------------------------------ building blocks

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Await ``attempt()``, retrying with jittered backoff while the file is busy."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while True:
            try:
                return await attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise _Busy() from exc
                self.busy_retries += 1
                # outside any shield: a caller may be cancelled between attempts
                await anyio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2.0, 0.25)

    async def transaction(
        self,
        conn: aiosqlite.Connection,
        body: Callable[[aiosqlite.Connection], Awaitable[T]],
    ) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction, retrying while busy."""
        return await self.retrying(partial(self._attempt, conn, body))

    @staticmethod
    async def _attempt(
        conn: aiosqlite.Connection,
        body: Callable[[aiosqlite.Connection], Awaitable[T]],
    ) -> T:
        """
        ``BEGIN IMMEDIATE``; ``body``; ``COMMIT``, or a rollback on any exception.

        Shielded from anyio cancellation (cancel scopes, ``fail_after``, task groups):
        a cancelled caller waits for the attempt to end (at most ``busy_timeout``
        waiting for the write lock, plus a few statements) and is cancelled after.
        asyncio-native cancellation (``Task.cancel``, ``asyncio.timeout``) goes through
        anyio shields; it then lands in the ``except`` below with the interrupted
        statement still queued on the connection's thread.  `_rollback` is queued
        behind it, before the lock is released, so the transaction ends (committed if
        COMMIT had been sent, else rolled back) before the next operation's first
        statement runs.
        """
        with anyio.CancelScope(shield=True):
            try:
                await conn.execute("BEGIN IMMEDIATE")
                result = await body(conn)
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise
        return result

    # ------------------------------------------------------------------ opening

    def _prepare_file(self) -> None:
        """
        Create the file (0600) if it is missing; check that it is a writable regular file.
        Its mode is left as it is here: `_setup` narrows it once the file is known to be
        ours (a refused file keeps its mode, like everything else in it).

        The file is never opened here, only looked at: this process may hold SQLite
        connections to it already (another backend on the same file), and closing any
        descriptor of a file releases every POSIX lock the process holds on it,
        SQLite's included (https://www.sqlite.org/howtocorrupt.html, 2.2).  Another
        process closing the file would then take itself for its last user, checkpoint
        and delete the WAL this process's connections still commit into.
        """
        path = self.path
        try:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                _create_private(path)
                st = os.stat(path)
        except FileNotFoundError as exc:
            raise self._fail(
                f"the directory {os.path.dirname(path) or '.'} does not exist", exc
            ) from exc
        except PermissionError as exc:
            raise self._fail(
                "permission denied: the file or its directory is read-only for this user", exc
            ) from exc
        except OSError as exc:
            raise self._fail(f"cannot create or open the file ({exc.strerror})", exc) from exc
        if stat.S_ISDIR(st.st_mode):
            raise self._fail("the path is a directory, not a database file")
        if not stat.S_ISREG(st.st_mode):
            raise self._fail("the path is not a regular file")
        if st.st_mode & 0o222 == 0:
            # root can write anyway; honour the file's read-only mode all the same
            raise self._fail(f"the file is read-only (mode {stat.S_IMODE(st.st_mode):04o})")
        if not os.access(path, os.R_OK | os.W_OK):
            raise self._fail("permission denied: the file is read-only for this user")

    def _check_readable(self) -> None:
        if not os.path.isfile(self.path):
            raise self._fail("no such database file (opened read-only: nothing is created)")

    async def _open(self) -> aiosqlite.Connection:
        if self.read_only:
            await anyio.to_thread.run_sync(self._check_readable)
            target = "file:" + quoted_path(self.path) + "?mode=ro"
            connector = _Connector(target, self.busy_timeout, uri=True)
        else:
            if self.path != MEMORY:
                # on a worker thread: the event loop never waits on the file system
                await anyio.to_thread.run_sync(self._prepare_file)
            connector = _Connector(self.path, self.busy_timeout)
        conn = aiosqlite.Connection(connector, iter_chunk_size=64)
        thread = getattr(conn, "_thread", None)
        if isinstance(thread, threading.Thread) and not thread.is_alive():
            # a backend never closed must not keep the interpreter from exiting
            thread.daemon = True
        try:
            # Not shielded: a cancelled open is simply discarded.  The migration is a
            # shielded transaction of its own; PRAGMAs are idempotent.
            try:
                await conn  # starts the connection's thread (stopped again if this fails)
            except BaseException:
                connector.abandon()
                raise
            connector.adopted()
            await self.retrying(partial(self._setup, conn))
            if self._finished:  # close() gave up waiting for this open
                raise self._fail("the connection is closed")
            if self.path != MEMORY:
                self._ident = await anyio.to_thread.run_sync(self._identity)
        except BaseException:
            await self._discard(conn)
            raise
        self._conn = conn
        return conn

    def _identity(self) -> tuple[int, int] | None:
        """(device, inode) of the file at ``path`` now, or None when there is none."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _remove_orphans(self) -> None:
        """Delete a ``-wal`` / ``-shm`` left by a deleted database (never pair them anew)."""
        if not os.path.exists(self.path):
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)

    async def _reopen_if_replaced(self, conn: aiosqlite.Connection) -> aiosqlite.Connection:
        """
        The connection to use for a write: ``conn``, or a new one when the file at
        ``path`` was deleted or replaced since it was opened.

        What the old file held is still readable through ``conn``, its only copy once
        the file is deleted: ``conn`` is kept until the file is recreated (or the
        replacing file opened).  While that fails (the path cannot be used for now)
        this raises and ``conn`` stays, to try again on the next write.  Then the old
        file is copied out (``VACUUM INTO`` a 0600 file next to it, or in the temporary
        directory) and the copy's calls and circuit states merged in (rows already
        there win), so nothing is lost; ``conn`` is closed after.
        """
        if self.path == MEMORY or self._ident is None:
            return conn
        now = await anyio.to_thread.run_sync(self._identity)
        if now == self._ident:
            return conn
        await anyio.to_thread.run_sync(self._remove_orphans)
        new = await self._open()  # raises, keeping conn, while the path cannot be used
        self.recreated += 1
        try:
            with anyio.CancelScope(shield=True):
                rescue = await self._rescue(conn)
                merged = 0 if rescue is None else await self._merge(new, rescue)
        finally:
            await self._discard(conn)
        logger.warning(
            "SQLite database %s was %s while open; %s it with the %d calls the old file held%s",
            self.path,
            "deleted" if now is None else "replaced by another file",
            "recreated" if now is None else "switched to",
            merged,
            "" if rescue is not None else " (the old file could not be copied: they are lost)",
        )
        return new

    async def _rescue(self, conn: aiosqlite.Connection) -> str | None:
        """Copy the (deleted) database ``conn`` still holds open; the copy's path or None."""
        name = f"{os.path.basename(self.path)}.rescued-{os.getpid()}-{secrets.token_hex(4)}"
        for directory in (os.path.dirname(self.path), tempfile.gettempdir()):
            rescue = os.path.join(directory, name)
            try:
                # VACUUM INTO fills an empty file and keeps its mode: create it 0600 first
                os.close(os.open(rescue, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o600))
                await conn.execute("VACUUM INTO ?", (rescue,))
            except (OSError, sqlite3.Error):
                logger.warning(
                    "copying the deleted SQLite database %s to %s failed",
                    self.path,
                    directory,
                    exc_info=True,
                )
                with contextlib.suppress(OSError):
                    os.unlink(rescue)
                continue
            return rescue
        return None

    async def _merge(self, conn: aiosqlite.Connection, rescue: str) -> int:
        """Merge the rescued copy into the file ``conn`` has open; the calls added."""
        columns = ", ".join(_CALL_COLUMNS)

        async def body(c: aiosqlite.Connection) -> int:
            (before,) = await _fetchone(c, _MAX_ID) or (0,)
            cursor = await c.execute(
                f"INSERT INTO llm_calls ({columns}) SELECT {columns} FROM rescued.llm_calls "
                "WHERE true ON CONFLICT (call_id) DO NOTHING"
            )
            added = cursor.rowcount
            # the merged calls count in the rollups like any call written here
            merged = await c.execute_fetchall(f"{_SELECT_CALLS} WHERE id > ?", (before,))
            known = known_outcomes(list(merged), _outcome_of, f"SQLite database {self.path}")
            await _add_evidence(c, _evidence_rows(_from_row(row) for row in known))
            await c.execute(
                "INSERT OR IGNORE INTO circuit_state SELECT * FROM rescued.circuit_state"
            )
            return added

        try:
            await conn.execute("ATTACH DATABASE ? AS rescued", (rescue,))
            try:
                added = await self.transaction(conn, body)
            finally:
                await conn.execute("DETACH DATABASE rescued")
        except sqlite3.Error:
            logger.warning(
                "merging the copy of the deleted SQLite database %s failed; the copy is kept at %s",
                self.path,
                rescue,
                exc_info=True,
            )
            return 0
        with contextlib.suppress(OSError):
            os.unlink(rescue)
        return added

    async def _setup(self, conn: aiosqlite.Connection) -> None:
        # every check comes before the first change (journal mode, tables): a refused
        # file is left exactly as it was
        # one read transaction: the version and the tables from the same snapshot (another
        # process may be creating this file's tables right now)
        await conn.execute("BEGIN")
        try:
            row = await _fetchone(conn, "PRAGMA user_version")
            tables = {
                str(r[0])
                for r in await conn.execute_fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
                )
            }
        finally:
            await _rollback(conn)
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SQLite database {self.path} has schema version {version}, newer than the "
                f"{SCHEMA_VERSION} this version of empathy-models understands; upgrade "
                "empathy-models (the file was left untouched)",
                target=self.path,
            )
        ours = version >= 1 and {"llm_calls", "circuit_state"} <= tables
        if tables and not ours and not self.allow_foreign:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise self._fail(
                f"the file belongs to another application (user_version {version}, tables "
                f"{shown}); it was left untouched.  Point empathy-models at its own file, "
                "or pass allow_foreign=True (URL: ?allow_foreign=true) to add its tables "
                "to this one"
            )
        if self.read_only:
            if not ours:
                raise self._fail(
                    "not an empathy-models database (opened read-only: nothing is created)"
                )
            return
        if self.path != MEMORY:
            # ours (or adopted): narrowed only now, after the checks, before the first
            # change (its WAL files too; those SQLite creates later copy the new mode)
            await anyio.to_thread.run_sync(_make_private, self.path)
            row = await _fetchone(conn, "PRAGMA journal_mode")
            if row is None or str(row[0]).lower() != "wal":
                await conn.execute_fetchall("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            # the migration to version 2 builds the evidence rollups in SQL with log_ms
            await conn.create_function(_LOG_MS, 1, log_ms, deterministic=True)
            await self.transaction(conn, self._migrate)

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        # re-read under the write lock: another process may have migrated meanwhile
        row = await _fetchone(conn, "PRAGMA user_version")
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SQLite database {self.path} has schema version {version}, newer than "
                f"{SCHEMA_VERSION}",
                target=self.path,
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target - 1]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {target:d}")

    @staticmethod
    async def _discard(conn: aiosqlite.Connection) -> None:
        """Close ``conn`` and stop its thread, even when the caller is being cancelled."""
        with anyio.CancelScope(shield=True):
            try:
                await conn.close()  # a no-op if it never opened (it stopped itself)
            except sqlite3.Error:
                logger.warning("closing a SQLite connection failed", exc_info=True)

    # ------------------------------------------------------------------ public

    async def run(
        self, op: Callable[[aiosqlite.Connection], Awaitable[T]], *, check_file: bool = False
    ) -> T:
        """
        Await ``op(conn)`` holding the connection's lock (opening it first if needed).

        Operations wait for one another in arrival order; an operation begun before
        `close` still runs, one begun after raises ``error`` ("the connection is
        closed").  Native errors are mapped to ``error``.  With ``check_file``, a file
        deleted or replaced since it was opened is detected (by inode), logged, and
        recreated (or the new file used) before ``op`` runs.  A connection that found
        the file "not a database" is closed, and the next operation opens the file anew.
        """
        if self._stopped:
            raise self._fail("the connection is closed")
        try:
            async with self._lock:
                conn = self._conn
                if conn is None:
                    if self._finished:
                        raise self._fail("the connection is closed")
                    conn = await self._open()
                elif check_file:
                    conn = await self._reopen_if_replaced(conn)
                try:
                    return await op(conn)
                except sqlite3.DatabaseError as exc:
                    if (
                        getattr(exc, "sqlite_errorcode", None) == _SQLITE_NOTADB
                        and self._conn is conn
                    ):
                        # that connection stays "not a database" after the file is
                        # repaired: the next operation opens a new one
                        self._conn = None
                        await self._discard(conn)
                    raise
        except Exception as exc:
            mapped = self._map(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def close(self) -> None:
        """Let the operation in progress finish, close the connection, stop its thread."""
        if self._stopped:
            return
        self._stopped = True
        try:
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    self._finished = True
                    conn, self._conn = self._conn, None
                    if conn is not None:
                        await self._discard(conn)
        finally:
            # cancelled (asyncio-natively) while waiting for the lock: stop the thread
            # anyway.  stop() queues the close behind the statements already sent;
            # SQLite rolls back a transaction still open, later statements fail as
            # "the connection is closed".
            self._finished = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.stop()


def _store_database(
    path: str | os.PathLike[str],
    clock: object,
    *,
    busy_timeout: float,
    lock_timeout: float,
    read_only: bool,
    allow_foreign: bool,
) -> _Database:
    """
    The database of a store whose operations read ``clock`` (the circuit-state and the
    quota store): ``clock`` checked first, then the file's options; its errors are
    `StateStoreError`.
    """
    if not callable(clock):
        raise ConfigurationError(f"clock must be callable, got {shown(clock)}")
    return _Database(
        path,
        error=StateStoreError,
        busy_timeout=busy_timeout,
        lock_timeout=lock_timeout,
        read_only=read_only,
        allow_foreign=allow_foreign,
    )


def _create_private(path: str) -> None:
    """
    Create ``path`` as an empty 0600 file unless a file is there by now, without ever
    opening ``path`` (see `_Database._prepare_file`): the file is made under a name of
    its own and hard-linked to ``path``; a link, unlike a rename, never replaces a file
    another backend or process created meanwhile.
    """
    # a short name of its own (``path``'s name may be as long as names can be)
    spare = os.path.join(os.path.dirname(path), f".empathy-new-{secrets.token_hex(8)}")
    # a file of our own that nothing else has open: closing it releases nobody's lock
    os.close(os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o600))
    try:
        os.link(spare, path)
    except FileExistsError:
        pass  # created meanwhile: used as it is
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # a file system without hard links: create it in place.  Nothing in this
        # process can have a file opened that did not exist an instant ago, bar an
        # open made in between by another backend's thread.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o600))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(spare)


_NOT_NARROWED: set[str] = set()
"""The database files whose mode could not be narrowed, each warned about once."""


def _make_private(path: str) -> None:
    """
    Take group and other permissions off the database file ``path`` and off its
    ``-wal`` and ``-shm`` files, when this user owns them: SQLite gives the WAL files
    it creates the database's mode.  Only ``chmod``, never an open (see
    `_Database._prepare_file`); a file that cannot be changed is used as it is, with
    one warning.  Called only once the file is known to be ours (`_Database._setup`).
    """
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            stats = os.stat(name)
            mode = stat.S_IMODE(stats.st_mode)
            if mode & 0o077 and stats.st_uid == os.geteuid():
                os.chmod(name, mode & ~0o077)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if name not in _NOT_NARROWED:
                _NOT_NARROWED.add(name)
                logger.warning(
                    "SQLite file %s stays readable by others: cannot change its mode (%s)",
                    name,
                    exc.strerror,
                )


_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_SQLITE_NOTADB: Final = 26
"""SQLite's result code for "file is not a database"."""
_NO_LINKS: Final = frozenset(
    code for code in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK) if code
)
"""What `os.link` raises on a file system that has no hard links."""


_seconds = number(failure(ConfigurationError), low=0, why="must be a finite number of seconds >= 0")


def _check_seconds(name: str, value: float) -> float:
    return float(check(_seconds, name, value))


def _normalize_path(path: str | os.PathLike[str]) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ConfigurationError(
            f"path must be a non-empty file path or ':memory:', got {shown(path)}"
        )
    if path == MEMORY:
        return MEMORY
    if "\x00" in path:
        raise ConfigurationError(f"path must not contain a NUL character, got {shown(path)}")
    return os.path.abspath(path)
