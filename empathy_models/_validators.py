"""
The attrs validators of the package's values, built by a few factories.

Each value module says once how its errors read (`failure`: the error class, the
owner's name before the field, how the value is shown) and then builds its validators
from it::

    _fail = failure(ConfigurationError, owner="BreakerPolicy")
    _positive_int = integer(_fail, low=1, why="must be an integer >= 1")

which raises ``ConfigurationError("BreakerPolicy.minimum_calls must be an integer >= 1,
got 0")``.  A validator keeps attrs' ``(instance, attribute, value)`` signature; a
`RecordValidationError` names the field in its ``path``.  `check` runs a validator on a
plain argument (a constructor's keyword, say) under the name it is given.

Numbers: exact ``int`` and ``float`` values inside the bounds pass on one comparison;
anything else is explained in a fixed order: not a number (``bool`` is not one), not
finite or below ``low`` (NaN included), above ``high``; an infinity given a message of
its own (``finite_why``) is told apart after the range check (so NaN is out of range).
A number of another type is taken as the plain ``int`` or ``float`` it stands for
(`plain_number`: an integer of any kind, numpy's included, as an ``int``; any other
real number, ``Decimal`` included, as a ``float``), checked as that, and stored so: the
validator sets the field to it (and returns it, which `check` passes on).

A leaf: imports only the error tree and `_urls` (for `masked_keys`; stdlib only).
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import warnings
from collections.abc import Callable, Collection
from contextvars import ContextVar
from decimal import Decimal
from typing import Any, Final, Literal, Protocol, TypeVar

from ._urls import masked_keys
from .exceptions import ConfigurationWarning, RecordValidationError

__all__ = [
    "MAX_SIZE",
    "Failure",
    "Named",
    "SHOWN_MAX",
    "Validator",
    "check",
    "escaped",
    "failure",
    "instance_of",
    "integer",
    "number",
    "one_of",
    "optional_str",
    "plain_number",
    "shown",
    "text",
    "text_flaw",
    "warn_caller",
]

_MAX_FLOAT: Final = sys.float_info.max

MAX_SIZE: Final = 2**63 - 1
"""The largest size, count or concurrency an argument may name: what a 64-bit signed
integer (SQLite's INTEGER, PostgreSQL's bigint) holds; a larger one means nothing more."""

T = TypeVar("T")


class Named(Protocol):
    """What a validator reads of its attrs ``Attribute``: the field's name."""

    @property
    def name(self) -> str: ...


Validator = Callable[[object, Named, Any], Any]
"""An attrs validator: ``(instance, attribute, value)``, raising when ``value`` is bad
(`number` and `integer` return the plain number a value of another type stands for)."""

Failure = Callable[[str, object, str], Exception]
"""``(field name, value, why)`` -> the error to raise."""


SHOWN_MAX: Final = 200
"""The most characters `shown` gives a value in an error message."""


def shown(value: object) -> str:
    """
    ``value``'s repr for an error message about it, never failing and never long.

    An absurdly large ``int`` is shown by its size (its digits could run to thousands,
    and past 4,300 ``repr`` refuses it); a value whose ``repr`` fails (a list holding
    such an int, a cycle too deep, an object whose ``__repr__`` raises) by its type; a
    repr over `SHOWN_MAX` characters is cut, ending ``...`` (and, for a string, its
    length).  An API key in it is shown as ``sk-***`` (`masked_keys`).
    """
    if isinstance(value, int) and not isinstance(value, bool) and not -(10**30) < value < 10**30:
        return f"an integer of {value.bit_length()} bits"
    try:
        # an API key given in the wrong place is not quoted (`masked_keys`): the message
        # may be logged
        text = masked_keys(repr(value))
    except Exception:  # whatever it raises, the message must still be made
        return f"a {type(value).__name__} that cannot be shown"
    if len(text) <= SHOWN_MAX:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return f"{text[: SHOWN_MAX - 3]}...{size}"


def text_flaw(value: str) -> str | None:
    """
    Why ``value`` cannot be stored as given by every store (a NUL, which PostgreSQL
    refuses; a lone surrogate, which UTF-8 cannot encode), as the end of an error
    message, or None.
    """
    if "\x00" in value:
        return "must not contain a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid text (it holds a lone surrogate)"
    return None


def escaped(value: str) -> str:
    """
    ``value`` as every store can hold it: a lone surrogate and a NUL written as
    backslash escapes (``\\udce9``, ``\\x00``); ``value`` itself when it holds neither.
    """
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    return value


def _type_name(value: object) -> str:
    return type(value).__name__


_SHOWN: Final[dict[str, Callable[[object], str]]] = {"repr": shown, "type": _type_name}


def failure(
    error: type[Exception],
    *,
    owner: str = "",
    shown: Literal["repr", "type"] | None = "repr",
) -> Failure:
    """
    How one module's validation errors read: ``"{owner}.{field} {why}, got {value}"``.

    Args:
        error: the class raised: `ConfigurationError`, `RecordValidationError` (which
            gets the field's name as its ``path``), or any other taking one message.
        owner: the class named before the field (``"BreakerPolicy"``); empty for none.
        shown: ``"repr"`` shows the value, ``"type"`` its type's name, ``None`` leaves
            the ``", got ..."`` out.

    Returns:
        The function the factories call to build an error.
    """
    prefix = f"{owner}." if owner else ""
    show = None if shown is None else _SHOWN[shown]

    def fail(name: str, value: object, why: str) -> Exception:
        message = (
            f"{prefix}{name} {why}" if show is None else f"{prefix}{name} {why}, got {show(value)}"
        )
        if error is RecordValidationError:
            return RecordValidationError(message, path=name)
        return error(message)

    return fail


def check(validator: Validator, name: str, value: T) -> T:
    """
    Run ``validator`` on a plain argument called ``name``.

    Returns:
        ``value``, or the plain ``int`` or ``float`` it stands for (`plain_number`)
        when it is a number of another type (a `number` or `integer` validator).

    Raises:
        Whatever the validator raises for a bad value.
    """
    plain = validator(None, _Name(name), value)
    return value if plain is None else plain


class _Name:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def plain_number(value: object, *, reals: bool = True) -> int | float | None:
    """
    The plain ``int`` or ``float`` ``value`` stands for, or None when it is no number.

    An integer of any kind (an ``int`` subclass, an ``IntEnum`` member, numpy's
    ``int64``: whatever has ``__index__``) is the ``int`` of the same value; with
    ``reals``, any other real number (a ``float`` subclass, numpy's ``float32``,
    ``Fraction``, ``Decimal``) is the nearest ``float`` (an infinity past the largest,
    NaN for a signalling NaN).  A ``bool`` (numpy's too) is no number.
    """
    cls = value.__class__
    if cls is int:
        return value  # type: ignore[return-value]
    if cls is float:
        return value if reals else None  # type: ignore[return-value]
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]  # an exact int (3.10+)
    except Exception:  # whatever a broken __index__ raises: no integer
        pass
    if not reals or not isinstance(value, numbers.Real | Decimal):
        return None
    real: Any = value
    try:
        return float(real)
    except OverflowError:  # a Fraction past the largest float
        return math.inf if real > 0 else -math.inf
    except ValueError:  # Decimal's signalling NaN
        return math.nan


def _fits_float(value: int) -> bool:
    """Whether a float holds the ``int`` ``value`` (``10**400`` is beyond the largest)."""
    return -_MAX_FLOAT <= value <= _MAX_FLOAT


def _explainer(
    fail: Failure,
    kinds: type | tuple[type, ...],
    low: float | None,
    low_open: bool,
    finite: bool,
    high: float | None,
    messages: tuple[str, str, str, str],
) -> Callable[[object, str, object], int | float]:
    """
    The slow path of `number` and `integer`: raise the first rule ``value`` breaks;
    else the plain number it stands for, set on ``instance`` (when given) in its place.
    """
    type_why, why, finite_why, high_why = messages
    # an infinity with a message of its own is told apart only once it is in range
    finite_first = finite and finite_why == why
    floats = isinstance(kinds, tuple) and float in kinds  # a number, used as a float

    def explain(instance: object, name: str, value: object) -> int | float:
        plain = plain_number(value, reals=floats)
        if plain is None:
            raise fail(name, value, type_why)
        if floats and isinstance(plain, int) and not _fits_float(plain):  # no float holds it
            raise fail(name, value, finite_why if finite else why)
        if finite_first and not math.isfinite(plain):
            raise fail(name, value, why)
        if low is not None and not (plain > low if low_open else plain >= low):
            raise fail(name, value, why)
        if finite and not math.isfinite(plain):
            raise fail(name, value, finite_why)
        if high is not None and plain > high:
            raise fail(name, value, high_why)
        if instance is not None and plain is not value:
            # a frozen attrs value keeps the plain number (what its converter would do,
            # without a converter's call on every exact value)
            object.__setattr__(instance, name, plain)
        return plain

    return explain


def number(
    fail: Failure,
    *,
    why: str,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    finite: bool = True,
    optional: bool = False,
    type_why: str | None = None,
    finite_why: str | None = None,
    high_why: str | None = None,
) -> Validator:
    """
    A validator of a real number (``int`` or ``float``, never ``bool``; a number of
    another type is stored as the plain one it stands for, `plain_number`).

    Args:
        fail: how the error reads (`failure`).
        why: the message of a value out of range (and of every rule below without
            its own message).
        low: the least value allowed (``None``: no lower bound); ``low_open``
            excludes it.
        high: the largest value allowed (``None``: no upper bound).
        finite: refuse infinities (NaN is always refused).
        optional: let ``None`` pass.
        type_why, finite_why, high_why: the messages of a value that is not a number,
            not finite, above ``high``.

    Returns:
        The validator.
    """
    explain = _explainer(
        fail,
        (int, float),
        low,
        low_open,
        finite,
        high,
        (type_why or why, why, finite_why or why, high_why or why),
    )
    # the one comparison that lets an exact int or float through: ``lo <= value <= hi``
    # implies every rule (the next float above an open bound is the least one allowed)
    lo = -math.inf if low is None else math.nextafter(low, math.inf) if low_open else low
    hi = high if high is not None else _MAX_FLOAT if finite else math.inf
    hi_int = min(hi, _MAX_FLOAT)  # an int no float holds is refused (`_explainer`)
    if optional:

        def check_optional(instance: object, attribute: Named, value: Any) -> int | float | None:
            if value is None:
                return None
            cls = value.__class__
            if (cls is float and lo <= value <= hi) or (cls is int and lo <= value <= hi_int):
                return None
            return explain(instance, attribute.name, value)

        return check_optional

    def check_number(instance: object, attribute: Named, value: Any) -> int | float | None:
        cls = value.__class__
        if (cls is float and lo <= value <= hi) or (cls is int and lo <= value <= hi_int):
            return None
        return explain(instance, attribute.name, value)

    return check_number


def integer(
    fail: Failure,
    *,
    why: str,
    low: int | None = None,
    high: int | None = None,
    optional: bool = False,
    type_why: str | None = None,
    high_why: str | None = None,
) -> Validator:
    """
    A validator of an ``int`` (never ``bool``) between ``low`` and ``high`` inclusive
    (an integer of another type, numpy's ``int64`` say, stored as the plain ``int``).

    Args:
        fail: how the error reads (`failure`).
        why: the message of a value out of range (and of the rules below without their
            own message).
        low, high: the bounds, inclusive (``None``: unbounded on that side).
        optional: let ``None`` pass.
        type_why, high_why: the messages of a value that is not an integer, above
            ``high``.

    Returns:
        The validator.
    """
    explain = _explainer(
        fail, int, low, False, False, high, (type_why or why, why, why, high_why or why)
    )
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    if optional:

        def check_optional(instance: object, attribute: Named, value: Any) -> int | float | None:
            if value is None:
                return None
            if value.__class__ is int and lo <= value <= hi:
                return None
            return explain(instance, attribute.name, value)

        return check_optional

    def check_integer(instance: object, attribute: Named, value: Any) -> int | float | None:
        if value.__class__ is int and lo <= value <= hi:
            return None
        return explain(instance, attribute.name, value)

    return check_integer


def text(
    fail: Failure, *, why: str = "must be a non-empty string", strip: bool = True
) -> Validator:
    """
    A validator of a non-empty ``str`` (with ``strip``, not only whitespace either).

    Args:
        fail: how the error reads (`failure`).
        why: the message.
        strip: refuse a string of whitespace too.

    Returns:
        The validator.
    """
    if strip:

        def check_text(_: object, attribute: Named, value: Any) -> None:
            if not isinstance(value, str) or not value.strip():
                raise fail(attribute.name, value, why)

        return check_text

    def check_unstripped(_: object, attribute: Named, value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise fail(attribute.name, value, why)

    return check_unstripped


def optional_str(fail: Failure, *, why: str = "must be a string or None") -> Validator:
    """
    A validator of a ``str`` or ``None``.

    Args:
        fail: how the error reads (`failure`).
        why: the message.

    Returns:
        The validator.
    """

    def check_optional_str(_: object, attribute: Named, value: Any) -> None:
        if value is not None and not isinstance(value, str):
            raise fail(attribute.name, value, why)

    return check_optional_str


def instance_of(
    fail: Failure, kind: type, *, why: str | None = None, optional: bool = False
) -> Validator:
    """
    A validator of an instance of ``kind`` (or ``None`` with ``optional``).

    Args:
        fail: how the error reads (`failure`).
        kind: the class (``bool`` for a flag).
        why: the message (default ``"must be a <kind>"``, ``"... or None"`` when
            optional).
        optional: let ``None`` pass.

    Returns:
        The validator.
    """
    if why is None:
        why = f"must be a {kind.__name__}" + (" or None" if optional else "")
    message = why
    if optional:

        def check_optional(_: object, attribute: Named, value: Any) -> None:
            if value is not None and not isinstance(value, kind):
                raise fail(attribute.name, value, message)

        return check_optional

    def check_instance(_: object, attribute: Named, value: Any) -> None:
        if not isinstance(value, kind):
            raise fail(attribute.name, value, message)

    return check_instance


def one_of(fail: Failure, allowed: Collection[object], *, why: str) -> Validator:
    """
    A validator of a value among ``allowed`` (compared with ``in``).

    Args:
        fail: how the error reads (`failure`).
        allowed: the values accepted.
        why: the message.

    Returns:
        The validator.
    """

    def check_one_of(_: object, attribute: Named, value: Any) -> None:
        if value not in allowed:
            raise fail(attribute.name, value, why)

    return check_one_of


_PACKAGE: Final = __name__.partition(".")[0] + "."

MACHINERY: Final = ("asyncio", "concurrent.", "threading", "contextvars")
"""Modules whose frames run the package's code (an event loop, a thread), not a caller's."""

Site = tuple[str, int, dict[str, Any]]
"""A line of the caller's code: its file, its line number and its module's globals."""

caller_site: ContextVar[Site | None] = ContextVar("empathy_models_caller_site", default=None)
"""
The line of the caller's code that the work of the running task was asked for at, set
where that code runs in another thread (`SyncExecutor`'s calls, run on its own event
loop): where `warn_caller` and the executor's construction warnings point when the
package's frames lead back to the event loop rather than to the caller's code.  A
task started meanwhile copies it with the rest of the context (no background task
warns through `warn_caller`).
"""


def call_site() -> Site | None:
    """
    The line of the caller's code running now: the first frame outside this package
    from the function calling this one outwards (``None`` if there is none, or it is
    an event loop's or a thread's).
    """
    frame: Any = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_PACKAGE):
        frame = frame.f_back
    if frame is None or frame.f_globals.get("__name__", "").startswith(MACHINERY):
        return None
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals


def warn_at_site(message: str, category: type[Warning]) -> bool:
    """
    `warnings.warn_explicit` ``message`` at `caller_site`, as `warnings.warn` would
    at that line (its module's filters and once-per-location registry); False, and
    nothing warned, when no site is set.
    """
    site = caller_site.get()
    if site is None:
        return False
    filename, lineno, module_globals = site
    warnings.warn_explicit(
        message,
        category,
        filename,
        lineno,
        module=module_globals.get("__name__"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )
    return True


def warn_caller(message: str, category: type[Warning] = ConfigurationWarning) -> None:
    """
    `warnings.warn` ``message`` at the line of the caller's code that led to it: the
    first frame outside this package (the warning filters' once-per-location then
    count that line, and the message names it), or, when that is an event loop's or a
    thread's frame, `caller_site` if one is set (a `SyncExecutor` call's line).
    """
    frame, level = sys._getframe(), 1  # stacklevel 1: this function's own line
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    name = frame.f_globals.get("__name__", "")
    if name.startswith((_PACKAGE, *MACHINERY)) and warn_at_site(message, category):
        return
    warnings.warn(message, category, stacklevel=level)
