"""
Make one `LLMCallRecord` storable by every telemetry store, flagging what changed.

Stores refuse a few values a record can hold: text with a lone surrogate (not
encodable as UTF-8), a NUL character (PostgreSQL text and jsonb), an integer past
64 bits (SQLite INTEGER, PostgreSQL bigint) and a NaN or infinite float in the
metadata (JSON has no such numbers).  `storable` returns a copy with those values
made safe (text escaped with backslashes, integers clamped, non-finite metadata
floats replaced by ``None``) and the names of the fields it changed, which it also
writes into the copy's metadata under `SANITIZED_KEY`.  The write path calls it only
for a record a store has refused, so ordinary records are stored exactly as given.
`stored_forms` gives the texts a query for a value must match to find the records
written with it, made safe or not.  `stored_tier` reads a stored tier back, a value
this version does not know (a newer version's tier, a hand edit) as unknown, and
`stored_circuit_state` a record's circuit state the same way, `stored_record` a record's
dict with both read so; `known_outcomes` keeps the rows whose outcome this version
knows, with one warning for the rows it leaves out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

import attrs

from .._validators import escaped as safe_text  # lone surrogates and NUL escaped
from ..exceptions import EmpathyModelsError, TelemetryError, TelemetryRejectedError
from ..records import CircuitState, LLMCallRecord, ModelTier, Outcome
from ..serialization import from_dict

__all__ = [
    "INT64_MAX",
    "SANITIZED_KEY",
    "known_outcomes",
    "refusals",
    "storable",
    "stored_circuit_state",
    "stored_forms",
    "stored_record",
    "stored_tier",
]

logger = logging.getLogger("empathy_models.telemetry")

R = TypeVar("R")

INT64_MAX: Final = 2**63 - 1
"""The largest integer SQLite and PostgreSQL (bigint) store."""

SANITIZED_KEY: Final = "empathy_models.sanitized"
"""Metadata key naming the fields `storable` changed (comma-separated)."""

_TEXT_FIELDS: Final = (
    "provider",
    "model",
    "call_id",
    "request_id",
    "workflow",
    "stage",
    "task_type",
    "price_version",
    "error_type",
    "error_message",
    "original_provider",
    "original_model",
    "user_id",
    "session_id",
    "prompt_text",
    "response_text",
)
_INT_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "status_code",
    "attempt",
    "breaker_generation",
)
_FLOAT_FIELDS: Final = ("cost_usd", "actual_cost_usd", "latency_ms", "ttft_ms")


def stored_forms(value: str) -> tuple[str, ...]:
    """
    The texts a record's field equal to ``value`` may be stored as, for a query to match.

    ``value`` itself when UTF-8 can encode it (a record stored as given), and
    `safe_text` of it when that differs (a record a store refused and `storable` made
    safe).  A text with a lone surrogate is stored only in its escaped form, so a query
    for it finds the records written with it, as the in-memory backend does.
    """
    safe = safe_text(value)
    if safe == value:
        return (value,)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return (safe,)
    return (value, safe)


def _safe_scalar(value: Any) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-INT64_MAX - 1, min(INT64_MAX, value))
    return value


def storable(record: LLMCallRecord) -> tuple[LLMCallRecord, tuple[str, ...]]:
    """
    ``record`` with every value a store would refuse made safe, and the fields changed.

    Returns ``(record, ())`` unchanged when nothing needed fixing.  Raises
    `RecordValidationError` when the record breaks an invariant that no escaping or
    clamping can repair.
    """
    changes: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        if isinstance(value, str):
            fixed = safe_text(value)
            if fixed != value:
                changes[name] = fixed
    for name in _INT_FIELDS:
        value = getattr(record, name)
        if isinstance(value, int) and value > INT64_MAX:
            changes[name] = INT64_MAX
    for name in _FLOAT_FIELDS:
        value = getattr(record, name)
        if isinstance(value, float) and not math.isfinite(value):
            changes[name] = None if name in ("actual_cost_usd", "ttft_ms") else sys.float_info.max
    chain = tuple(safe_text(item) for item in record.fallback_chain)
    if chain != record.fallback_chain:
        changes["fallback_chain"] = chain
    metadata = {safe_text(k): _safe_scalar(v) for k, v in record.metadata.items()}
    if metadata != dict(record.metadata):
        changes["metadata"] = metadata
    if not changes:
        return record, ()
    fields = tuple(sorted(changes))
    metadata = dict(changes.get("metadata", record.metadata))
    metadata[SANITIZED_KEY] = ",".join(fields)
    changes["metadata"] = metadata
    return attrs.evolve(record, **changes), fields


@contextlib.contextmanager
def refusals(kinds: tuple[type[BaseException], ...], target: str, where: str) -> Iterator[None]:
    """
    Raise `TelemetryRejectedError` for an exception of ``kinds`` (or a `TelemetryError`
    caused by one) leaving the block: the store refused the records for a value they
    hold, it did not fail.  ``where`` starts the message (``"SQLite database x.db"``).
    """
    try:
        yield
    except TelemetryError as exc:
        cause = exc.__cause__
        if isinstance(exc, TelemetryRejectedError) or not isinstance(cause, kinds):
            raise
        raise _rejected(cause, target, where) from cause
    except kinds as exc:
        if isinstance(exc, EmpathyModelsError):
            raise
        raise _rejected(exc, target, where) from exc


def _rejected(exc: BaseException, target: str, where: str) -> TelemetryRejectedError:
    return TelemetryRejectedError(
        f"{where}: a record holds a value that cannot be stored ({type(exc).__name__}: {exc})",
        target=target,
    )


def stored_tier(value: object) -> ModelTier | None:
    """
    The `ModelTier` a store's row holds, or ``None`` (unknown) for ``None`` and for a
    value this version does not know: a tier a newer version wrote, or a hand edit.
    A telemetry store reads its rows through it, so one such row neither fails a read
    nor stops the rows after it.
    """
    if isinstance(value, ModelTier) or value is None:
        return value
    try:
        return ModelTier(str(value).strip().lower())
    except ValueError:
        return None


def stored_circuit_state(value: object) -> CircuitState | None:
    """
    The `CircuitState` a store's telemetry row holds, or ``None`` (unknown) for
    ``None`` and for a value this version does not know (a newer version's state, a
    hand edit), so such a row does not fail a read.
    """
    if isinstance(value, CircuitState) or value is None:
        return value
    try:
        return CircuitState(str(value).strip().lower().replace("-", "_"))
    except ValueError:
        return None


def _known_outcome(value: object) -> bool:
    if isinstance(value, Outcome):
        return True
    try:
        Outcome(str(value).strip().lower().replace("-", "_"))
    except ValueError:
        return False
    return True


def known_outcomes(rows: Sequence[R], outcome: Callable[[R], object], where: str) -> list[R]:
    """
    The ``rows`` whose outcome (``outcome(row)``) this version knows, in order.  A row
    with another outcome (a newer version's, a hand edit) has no record this version
    can build: it is left out, and one warning naming the store (``where``) counts
    such rows, so one row neither fails a read nor stops the rows after it.  The rows
    stay in the store.
    """
    known = [row for row in rows if _known_outcome(outcome(row))]
    if len(known) < len(rows):
        logger.warning(
            "%s: %d telemetry row(s) hold an outcome this version does not know "
            "(written by a newer version?); left out of this read",
            where,
            len(rows) - len(known),
        )
    return known


def stored_record(data: Any) -> LLMCallRecord:
    """
    The record a stored dict (a record's `to_dict` form) holds, a tier or circuit state
    this version does not know read as unknown; anything else wrong raises as
    `from_dict` does.
    """
    if isinstance(data, dict):
        if data.get("tier") is not None:
            data["tier"] = stored_tier(data["tier"])
        if data.get("circuit_state") is not None:
            data["circuit_state"] = stored_circuit_state(data["circuit_state"])
    return from_dict(data, LLMCallRecord)
