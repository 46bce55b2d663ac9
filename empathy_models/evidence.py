"""
Evidence rollups: what telemetry backends maintain as they write, and the router reads.

A rollup is one `EvidenceBucket` per (workflow, stage, model, minute): additive sums of
the sample outcomes (see `Outcome.is_sample`) whose timestamp falls in that minute.
Every field is a count or a sum, so partial buckets from different writers, processes
or batches merge by addition, and the same records always give the same buckets,
whatever order they arrived in.  The router rebuilds its evidence from buckets, so the
same evidence gives the same verdict live, after a refresh or after a restart.

Backends keep the rollups in the same transaction as the records they summarize, and
stamp every bucket they change with a new ``version`` (a number that only grows within
one store).  ``TelemetryBackend.evidence(since=..., after_version=v)`` returns every
bucket changed after ``v``, so a reader that passes back the batch's ``version`` sees
each change once, and the cost of a refresh depends on what is new, not on the history.

Latency and time to first token are kept as sums of natural logs of milliseconds
(floored at 1 microsecond) and of their squares: a log-normal sketch that is additive.
Tokens are summed over successful calls; cost over every sample, each counting for at
most `empathy_models._stats.AVERAGE_CAP` (1e300, as in `TelemetryBackend.aggregate`'s
averages), so that no valid cost can overflow a bucket's sum, in memory or in a store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

from attrs import frozen

from ._fast import trusted_constructor
from ._stats import AVERAGE_CAP
from ._validators import check, failure, integer
from .exceptions import ConfigurationError
from .records import LLMCallRecord

__all__ = [
    "BUCKET_SECONDS",
    "SUM_FIELDS",
    "ROW_FIELDS",
    "EvidenceBatch",
    "EvidenceBucket",
    "bucket_from_fields",
    "bucket_start_of",
    "check_after_version",
    "log_ms",
    "merge_buckets",
    "rollup",
    "sorted_buckets",
]

BUCKET_SECONDS: Final = 60
"""Width of one evidence bucket, in seconds (buckets start at multiples of it since the epoch)."""

SUM_FIELDS: Final = (
    "samples",
    "successes",
    "latency_n",
    "latency_log_sum",
    "latency_log_sq_sum",
    "ttft_n",
    "ttft_log_sum",
    "ttft_log_sq_sum",
    "input_tokens",
    "output_tokens",
    "cost_usd",
)
"""The additive fields of `EvidenceBucket`, in declaration order (what stores sum up)."""

_MIN_MS: Final = 1e-3


def log_ms(value: float) -> float:
    """``ln`` of a duration in milliseconds, floored at one microsecond."""
    return math.log(max(value, _MIN_MS))


_after_version = integer(
    failure(ConfigurationError),
    low=0,
    why="must be an integer >= 0 (0, or the version of an earlier EvidenceBatch)",
)


def check_after_version(after_version: object) -> int:
    """
    ``after_version`` if it is an integer >= 0 (what `TelemetryBackend.evidence` takes);
    otherwise raise `ConfigurationError` naming it.
    """
    return check(_after_version, "after_version", cast(int, after_version))


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_s(ts: datetime) -> int:
    """
    ``ts`` (aware) in whole seconds since the epoch, rounded down.

    Integer arithmetic on the datetime itself: a float timestamp far from 1970 rounds
    the last microseconds of a minute up into the next one (and 9999-12-31 23:59:59.999999
    into year 10000), so a bucket would start after its own records.
    """
    delta = ts - _EPOCH
    return delta.days * 86_400 + delta.seconds  # its microseconds are >= 0: rounded down


def _start_s(ts: datetime) -> int:
    """The start of the bucket holding ``ts`` (aware), in whole seconds since the epoch."""
    seconds = _epoch_s(ts)
    return seconds - seconds % BUCKET_SECONDS


def _at(start_s: int) -> datetime:
    """The aware UTC datetime ``start_s`` whole seconds after the epoch (any year 1-9999)."""
    return _EPOCH + timedelta(seconds=start_s)


def bucket_start_of(ts: datetime) -> datetime:
    """
    Start of the bucket holding ``ts`` (an aware datetime), as an aware UTC datetime:
    never after ``ts``, and representable for every datetime.
    """
    return _at(_start_s(ts))


@frozen(kw_only=True, slots=True)
class EvidenceBucket:
    """
    Additive summary of one arm's sample outcomes in one minute.

    ``workflow`` / ``stage`` ``None`` are their own arms, as in `ModelPerformance`.
    ``version`` is the store's stamp of the last change to this bucket (0 for a partial
    bucket computed from records in memory, not yet stored).
    """

    workflow: str | None
    stage: str | None
    model: str
    bucket_start: datetime
    samples: int = 0
    successes: int = 0
    latency_n: int = 0
    latency_log_sum: float = 0.0
    latency_log_sq_sum: float = 0.0
    ttft_n: int = 0
    ttft_log_sum: float = 0.0
    ttft_log_sq_sum: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    version: int = 0

    @property
    def key(self) -> tuple[str | None, str | None, str, datetime]:
        """(workflow, stage, model, bucket_start): what identifies the bucket."""
        return (self.workflow, self.stage, self.model, self.bucket_start)

    @property
    def failures(self) -> int:
        return self.samples - self.successes


bucket_from_fields: Final = trusted_constructor(EvidenceBucket, positional=True)
"""
``bucket_from_fields(workflow, stage, model, bucket_start, samples, successes, latency_n,
latency_log_sum, latency_log_sq_sum, ttft_n, ttft_log_sum, ttft_log_sq_sum,
input_tokens, output_tokens, cost_usd, version)``: an `EvidenceBucket` from every field,
in declaration order, each stored as given.  `EvidenceBucket` converts and checks
nothing, so this is the value its constructor builds, at 40% of its cost: for backends
that read tens of thousands of buckets from their own rows (a router's start).
"""


ROW_FIELDS: Final = ("bucket_s", "workflow", "stage", "model", *SUM_FIELDS, "version")
"""
The layout of a row of `EvidenceBatch.rows` (and of `EvidenceBatch.from_rows`): the
bucket's start in whole seconds since the epoch, its arm (``None`` for no workflow or
stage), its sums in `SUM_FIELDS` order (token sums may be floats), its version.
"""


def _bucket_of_row(row: Sequence[Any], starts: dict[int, datetime]) -> EvidenceBucket:
    start = row[0]
    when = starts.get(start)
    if when is None:
        when = starts[start] = _at(start)
    return bucket_from_fields(
        row[1],  # workflow
        row[2],  # stage
        row[3],  # model
        when,
        row[4],  # samples
        row[5],  # successes
        row[6],  # latency_n
        row[7],  # latency_log_sum
        row[8],  # latency_log_sq_sum
        row[9],  # ttft_n
        row[10],  # ttft_log_sum
        row[11],  # ttft_log_sq_sum
        # token sums may come back as floats (SQLite stores sums past 2**63 - 1 as REAL)
        int(row[12]),  # input_tokens
        int(row[13]),  # output_tokens
        row[14],  # cost_usd
        row[15],  # version
    )


def _row_of_bucket(b: EvidenceBucket) -> tuple[Any, ...]:
    return (
        _epoch_s(b.bucket_start),
        b.workflow,
        b.stage,
        b.model,
        b.samples,
        b.successes,
        b.latency_n,
        b.latency_log_sum,
        b.latency_log_sq_sum,
        b.ttft_n,
        b.ttft_log_sum,
        b.ttft_log_sq_sum,
        b.input_tokens,
        b.output_tokens,
        b.cost_usd,
        b.version,
    )


class EvidenceBatch:
    """
    Buckets changed after the reader's last version, and the version to pass next time.

    ``buckets`` are sorted by (bucket_start, workflow, stage, model) with ``None`` first.
    The same buckets are readable as plain tuples, ``rows`` (layout `ROW_FIELDS`, in no
    particular order): what the router reads.  A backend that reads its buckets from
    its own rows builds the batch with `from_rows` and skips building (and sorting) an
    `EvidenceBucket` per row, which a router's start over a week of minute buckets for
    many arms would otherwise spend a second or more on: ``buckets`` is then built on
    first read.  Immutable (and hashable); equal when the buckets and the version are.
    """

    __slots__ = ("_buckets", "_rows", "version")
    _buckets: tuple[EvidenceBucket, ...] | None
    _rows: tuple[Sequence[Any], ...] | None
    version: int

    def __init__(self, *, buckets: Iterable[EvidenceBucket], version: int) -> None:
        object.__setattr__(self, "_buckets", tuple(buckets))
        object.__setattr__(self, "_rows", None)
        object.__setattr__(self, "version", version)

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]], version: int) -> EvidenceBatch:
        """
        A batch of ``rows``, each in the layout of `ROW_FIELDS` (a tuple, or any
        sequence indexed by position such as a database driver's record), in any order.
        Nothing is checked or converted: for backends reading their own rows, as
        `bucket_from_fields`.
        """
        batch = cls.__new__(cls)
        object.__setattr__(batch, "_buckets", None)
        object.__setattr__(batch, "_rows", tuple(rows))
        object.__setattr__(batch, "version", version)
        return batch

    @property
    def buckets(self) -> tuple[EvidenceBucket, ...]:
        """The buckets, sorted by (bucket_start, workflow, stage, model), ``None`` first."""
        buckets = self._buckets
        if buckets is None:
            starts: dict[int, datetime] = {}  # one minute's buckets share its start
            buckets = tuple(sorted_buckets(_bucket_of_row(row, starts) for row in self._rows or ()))
            object.__setattr__(self, "_buckets", buckets)
        return buckets

    @property
    def rows(self) -> tuple[Sequence[Any], ...]:
        """The buckets as rows in the layout of `ROW_FIELDS`, in no particular order."""
        rows = self._rows
        if rows is None:
            rows = tuple(_row_of_bucket(b) for b in self._buckets or ())
            object.__setattr__(self, "_rows", rows)
        return rows

    def __len__(self) -> int:
        """How many buckets the batch holds."""
        rows = self._rows
        return len(rows) if rows is not None else len(self._buckets or ())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EvidenceBatch):
            return NotImplemented
        return self.version == other.version and self.buckets == other.buckets

    def __hash__(self) -> int:
        return hash((self.version, self.buckets))

    def __repr__(self) -> str:
        return f"EvidenceBatch(version={self.version}, buckets=<{len(self)} buckets>)"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"EvidenceBatch is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"EvidenceBatch is immutable (cannot delete {name!r})")


def _sort_key(b: EvidenceBucket) -> tuple[datetime, bool, str, bool, str, str]:
    return (
        b.bucket_start,
        b.workflow is not None,
        b.workflow or "",
        b.stage is not None,
        b.stage or "",
        b.model,
    )


def sorted_buckets(buckets: Iterable[EvidenceBucket]) -> list[EvidenceBucket]:
    """``buckets`` in the order of `EvidenceBatch.buckets`."""
    return sorted(buckets, key=_sort_key)


def rollup(records: Iterable[LLMCallRecord]) -> list[EvidenceBucket]:
    """
    Partial buckets (``version`` 0) for ``records``; records that are not samples are skipped
    (a cost counts for at most ``AVERAGE_CAP``: see the module).

    Sorted like `EvidenceBatch.buckets`.  Backends add these to their stored buckets in
    the transaction that stores the records.
    """
    acc: dict[tuple[str | None, str | None, str, int], list[float]] = {}
    for r in records:
        if not r.outcome.is_sample:
            continue
        k = (r.workflow, r.stage, r.model, _start_s(r.timestamp))
        a = acc.get(k)
        if a is None:
            a = acc[k] = [0.0] * 11
        a[0] += 1
        a[10] += min(r.cost_usd, AVERAGE_CAP)
        if r.outcome.is_failure:
            continue
        a[1] += 1
        lat = log_ms(r.latency_ms)
        a[2] += 1
        a[3] += lat
        a[4] += lat * lat
        if r.ttft_ms is not None:
            t = log_ms(r.ttft_ms)
            a[5] += 1
            a[6] += t
            a[7] += t * t
        a[8] += r.input_tokens
        a[9] += r.output_tokens
    out = [
        EvidenceBucket(
            workflow=wf,
            stage=st,
            model=model,
            bucket_start=_at(start),
            samples=int(a[0]),
            successes=int(a[1]),
            latency_n=int(a[2]),
            latency_log_sum=a[3],
            latency_log_sq_sum=a[4],
            ttft_n=int(a[5]),
            ttft_log_sum=a[6],
            ttft_log_sq_sum=a[7],
            input_tokens=int(a[8]),
            output_tokens=int(a[9]),
            cost_usd=a[10],
        )
        for (wf, st, model, start), a in acc.items()
    ]
    return sorted_buckets(out)


def merge_buckets(a: EvidenceBucket, b: EvidenceBucket, *, version: int = 0) -> EvidenceBucket:
    """The sum of two buckets of the same key, stamped ``version``."""
    if a.key != b.key:
        raise ValueError(f"cannot merge buckets of different keys: {a.key} and {b.key}")
    return EvidenceBucket(
        workflow=a.workflow,
        stage=a.stage,
        model=a.model,
        bucket_start=a.bucket_start,
        samples=a.samples + b.samples,
        successes=a.successes + b.successes,
        latency_n=a.latency_n + b.latency_n,
        latency_log_sum=a.latency_log_sum + b.latency_log_sum,
        latency_log_sq_sum=a.latency_log_sq_sum + b.latency_log_sq_sum,
        ttft_n=a.ttft_n + b.ttft_n,
        ttft_log_sum=a.ttft_log_sum + b.ttft_log_sum,
        ttft_log_sq_sum=a.ttft_log_sq_sum + b.ttft_log_sq_sum,
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cost_usd=a.cost_usd + b.cost_usd,
        version=version,
    )
