"""
SQLite backends: telemetry and shared circuit state in one file, safe across processes.

``sqlite:///relative.db``, ``sqlite:////abs/path.db`` and ``sqlite://:memory:`` (also
``sqlite:///:memory:``) resolve to `SQLiteTelemetryBackend` and `SQLiteStateStore`.
Both may use the same file (separate tables), and every worker process on a host may
open it at once.  Options may be given as keyword arguments or in the query string:
``sqlite:///calls.db?busy_timeout=10&batch=false``.

How it is built:

* One `aiosqlite` connection per backend, opened by the first operation (no thread
  exists before that) and closed by ``aclose()``.  Its worker thread is a daemon, so a
  backend never closed does not keep the interpreter from exiting (its queued records
  are written by the exit hook of `empathy_models.backends.batching`); close every
  backend you use all the same (``async with`` does).  aiosqlite runs each statement
  as one job, in order, on that thread; an `asyncio.Lock` is held from an operation's
  first statement to its last, so the operations of one backend never interleave on
  the connection.  `SQLiteStateStore` also keeps a plain `sqlite3` connection used in
  the event loop's thread for the single statements that cannot block (see below).
* Transactions and cancellation: each attempt of a transaction (``BEGIN IMMEDIATE``,
  its statements, ``COMMIT``) runs inside ``anyio.CancelScope(shield=True)``, so anyio
  cancellation (cancel scopes, ``fail_after``, task groups) waits for it to end, which
  takes at most ``busy_timeout`` waiting for the write lock plus a few statements, and
  is delivered after.  asyncio-native cancellation (``Task.cancel``,
  ``asyncio.timeout``) is not stopped by anyio shields: it interrupts the ``await`` of
  a statement that still runs on the thread, and a rollback is queued right behind it
  before the lock is released.  Either way the transaction ends, committed whole or not
  at all, before the next operation's first statement, and the connection is never
  left inside an open transaction.  A cancelled read leaves nothing behind.  Waiting
  for the lock and the backoff between busy retries are cancellable at once.
* The file is created with mode 0600 before SQLite opens it (SQLite gives the ``-wal``
  and ``-shm`` files the same mode).  WAL journal, ``synchronous=NORMAL`` (a committed
  transaction survives a crash of the process, not necessarily a power cut), a busy
  timeout, and the schema created on first use and migrated by ``PRAGMA
  user_version``; a file written by a newer schema raises `SchemaVersionError` and is
  left untouched.
* Every write is one ``BEGIN IMMEDIATE`` transaction, or (the state store's
  conditional writes) one statement in a transaction of its own.  "database is
  locked" never reaches the caller: SQLite waits ``busy_timeout`` seconds, then the
  operation is retried with jittered backoff until ``lock_timeout`` seconds have
  passed, after which a `TelemetryError` / `StateStoreError` says the file stayed
  locked.
* A path in a missing directory, a directory, a file that is not a database, or a
  read-only file raises a `TelemetryError` / `StateStoreError` naming the path.
* Another application's file (tables that are not ours) is refused before anything is
  changed, unless ``allow_foreign=True`` (``?allow_foreign=true``) asks to add our
  tables to it.  ``read_only=True`` (``?read_only=true``) opens an existing
  empathy-models database read-only: nothing is created, migrated or switched to WAL
  (the CLI's ``telemetry summary``, ``breaker status`` and ``routing stats`` do this).

Telemetry is batched by default: `SQLiteTelemetryBackend` queues records and writes
them with ``executemany`` in one transaction per batch (see
`empathy_models.backends.batching` for the policy); ``batch=False`` writes each
``record_many`` call as one transaction before returning.

Evidence rollups (see `empathy_models.evidence`): the transaction that inserts a batch
also adds the batch's `rollup` to ``evidence_buckets`` (one row per workflow, stage,
model and minute; ``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x``) and
stamps the rows it changes with the next value of the one-row ``evidence_version``
counter.  SQLite runs one writer at a time across every process, so versions follow
commit order, and `SQLiteTelemetryBackend.evidence` reads the counter and the buckets in
one statement (one snapshot): passing its version back returns each later change once.
The migration to schema version 2 builds the tables from the calls already stored;
version 3 makes ``call_id`` unique: a record already stored is skipped, and only the
records a transaction actually inserts are rolled up, so a replay counts nothing twice.

Circuit state: `SQLiteStateStore` reads the key's row without a lock, applies the pure
machine of `empathy_models.circuit` with the UTC wall clock read after the row, and, if
the state changed, writes it back with one statement that matches only while the row
still holds what was read; otherwise the operation runs again as one ``BEGIN
IMMEDIATE`` transaction, the clock read *after* the lock is taken.  The read and the
conditional write run on a second connection in the event loop's thread (WAL, a zero
busy timeout, no fsync at commit, no checkpoint at commit): a locked file or any error
sends the statement to the aiosqlite thread instead, where the rules above apply.
Several processes sharing one file see one breaker.
"""

from __future__ import annotations

from ._database import MEMORY
from ._schema import SCHEMA_VERSION
from ._state import SQLiteCircuitStateStore, SQLiteStateStore
from ._telemetry import SQLiteTelemetryBackend
from ._url import PLUGIN, parse_sqlite_url

__all__ = [
    "MEMORY",
    "PLUGIN",
    "SCHEMA_VERSION",
    "SQLiteCircuitStateStore",
    "SQLiteStateStore",
    "SQLiteTelemetryBackend",
    "parse_sqlite_url",
]
