"""
The one place records become dicts and back.

`to_dict` returns a JSON-ready dict with a schema version under ``"v"``: datetimes as
ISO-8601 strings in UTC, enums as their values, tuples as lists.  `from_dict` accepts
what `to_dict` produced by this or an older version, ignores keys it does not know (so
records written by a newer version still load), and reports a bad value as a
`RecordValidationError` whose ``path`` names the field.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, TypeAlias, TypeVar, cast

import cattrs
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

from ._validators import plain_number, shown
from .exceptions import RecordValidationError

__all__ = [
    "SCHEMA_VERSION",
    "JSONScalar",
    "converter",
    "from_dict",
    "parse_datetime",
    "register_enums",
    "register_records",
    "to_dict",
]

JSONScalar: TypeAlias = str | int | float | bool | None
"""A metadata value: what JSON holds without nesting."""

SCHEMA_VERSION: Final = 1
"""Version written under ``"v"`` by `to_dict`."""

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=False, detailed_validation=True)
"""The package's cattrs converter; plugins may use it for their own records."""


def parse_datetime(value: object) -> datetime:
    """
    Parse an ISO-8601 string (a trailing ``Z`` means UTC) or pass a datetime through.

    The result keeps its offset; records reject naive values, so a string without an
    offset fails there with a message naming the field.
    """
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) and (seconds := plain_number(value)) is not None:
        return datetime.fromtimestamp(seconds, UTC)  # numpy's numbers too
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO-8601 string, got {shown(value)}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


def _unstructure_datetime(value: datetime) -> str:
    return value.astimezone(UTC).isoformat() if value.tzinfo else value.isoformat()


converter.register_structure_hook(datetime, lambda v, _: parse_datetime(v))
converter.register_unstructure_hook(datetime, _unstructure_datetime)
converter.register_unstructure_hook(MappingProxyType, lambda v: dict(v))


def _unstructure_enum(value: enum.Enum) -> Any:
    return value.value


def _structure_enum(value: object, cl: type[enum.Enum]) -> enum.Enum:
    if isinstance(value, cl):
        return value
    if isinstance(value, str):
        try:
            return cl(value.strip().lower().replace("-", "_"))
        except ValueError:
            pass
    allowed = ", ".join(str(m.value) for m in cl)
    raise ValueError(f"{shown(value)} is not a valid {cl.__name__} (expected one of: {allowed})")


def register_enums(*enums: type[enum.Enum]) -> None:
    """
    (Un)structure ``enums`` by value; a string is matched case-insensitively and an
    unknown value names the allowed ones.  Registered per class: a StrEnum would
    otherwise match the ``str`` hooks, and an unknown value would pass through as a
    plain string.
    """
    for cls in enums:
        converter.register_unstructure_hook(cls, _unstructure_enum)
        converter.register_structure_hook(cls, _structure_enum)


def _is_tuple_type(t: object) -> bool:
    return t is tuple or getattr(t, "__origin__", None) is tuple


converter.register_unstructure_hook_func(
    _is_tuple_type, lambda v: [converter.unstructure(x) for x in v]
)


def _is_homogeneous_tuple(t: object) -> bool:
    args: tuple[object, ...] = tuple(getattr(t, "__args__", ()))
    return _is_tuple_type(t) and len(args) == 2 and args[-1] is Ellipsis


def _homogeneous_tuple_hook(t: Any) -> Callable[[object, object], tuple[Any, ...]]:
    # cattrs would turn the string "ab" into ("a", "b"): a list field given a string (or
    # a mapping) is a corrupt dict, and must be reported rather than split.
    inner = homogenous_tuple_structure_factory(t, converter)

    def structure(value: object, cl: object) -> tuple[Any, ...]:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise ValueError(f"expected a list, got {shown(value)}")
        return tuple(inner(value, cl))

    return structure


converter.register_structure_hook_factory(_is_homogeneous_tuple, _homogeneous_tuple_hook)


def _structure_int(value: object, _: object) -> int:
    # a number of another type (numpy's, a Decimal) as the plain one; a whole float too
    number = value if value.__class__ is int else plain_number(value)
    if isinstance(number, float) and number.is_integer():
        return int(number)
    if not isinstance(number, int):
        raise ValueError(f"expected an integer, got {shown(value)}")
    return number


def _structure_float(value: object, _: object) -> float:
    if value.__class__ is float:
        return value
    number = plain_number(value)  # numpy's numbers, a Decimal: the plain one
    if number is None:
        raise ValueError(f"expected a number, got {shown(value)}")
    return float(number)


def _structure_str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {shown(value)}")
    return value


def _structure_bool(value: object, _: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {shown(value)}")
    return value


converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(float, _structure_float)
converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook(bool, _structure_bool)


def _structure_json_mapping(value: object, _: object) -> Mapping[str, JSONScalar]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping, got {shown(value)}")
    out: dict[str, JSONScalar] = {}
    for k, v in value.items():
        if v is not None and v.__class__ not in _SCALARS and not isinstance(v, str):
            # a number of another type (numpy's, a Decimal) as the plain one
            if (number := plain_number(v)) is None:
                raise ValueError(f"metadata[{shown(k)}] must be a JSON scalar, got {shown(v)}")
            v = number
        out[str(k)] = v
    return out


_SCALARS: Final = frozenset({str, int, float, bool})


_JSON_MAPPING = Mapping[str, JSONScalar]
converter.register_structure_hook_func(lambda t: t == _JSON_MAPPING, _structure_json_mapping)


_UNSTRUCTURE: dict[type, Callable[[Any], Any]] = {}
_STRUCTURE: dict[type, Callable[[Any, Any], Any]] = {}


def register_records(*classes: type) -> None:
    """
    Generate and register the (un)structure functions of the attrs ``classes`` now.

    cattrs generates a class's (un)structure function on first use and refuses to
    re-enter that generation on the same thread (RecursionError).  The exit hooks
    serialize records from a SIGTERM handler, which can interrupt the main thread in the
    middle of such a generation, so every record type's functions are generated when the
    type is registered (at import) and registered as the type's hooks: a generated
    function is only cached, and cattrs empties that cache whenever it generates a
    function for a new mapping type (a plugin's field, say), which would leave a record
    type (or one nested in another) to be generated again at an arbitrary later moment.
    """
    for cls in classes:
        _UNSTRUCTURE[cls] = converter.get_unstructure_hook(cls)
        _STRUCTURE[cls] = converter.get_structure_hook(cls)
    for cls in classes:
        converter.register_unstructure_hook(cls, _UNSTRUCTURE[cls])
        converter.register_structure_hook(cls, _STRUCTURE[cls])


def to_dict(record: object) -> dict[str, Any]:
    """Return ``record`` as a JSON-ready dict with ``"v": SCHEMA_VERSION`` first."""
    hook = _UNSTRUCTURE.get(type(record))
    body = converter.unstructure(record) if hook is None else hook(record)
    if not isinstance(body, dict):
        raise TypeError(f"{type(record).__name__} is not a record")
    return {"v": SCHEMA_VERSION, **body}


def _first_path(exc: BaseException, prefix: str = "") -> tuple[str, str]:
    """Walk a cattrs validation group to the first leaf error; return (path, message)."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        # cattrs' structured notes name the attribute (or index) each error is about
        with_notes, others = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(note, AttributeValidationNote):
                name = note.name
                joined = f"{prefix}.{name}" if prefix else name
            else:
                joined = f"{prefix}[{note.index}]"
            return _first_path(sub, joined)
        for sub in others:
            return _first_path(sub, prefix)
    if isinstance(exc, RecordValidationError):
        inner = exc.path or ""
        path = f"{prefix}.{inner}" if prefix and inner else (prefix or inner)
        return path, str(exc)
    if isinstance(exc, KeyError):
        return prefix, f"missing required field {prefix!r}"
    return prefix, f"{type(exc).__name__}: {exc}"


def from_dict(data: Mapping[str, Any], cls: type[T]) -> T:
    """
    Build a ``cls`` record from a dict produced by `to_dict`.

    Unknown keys are ignored.  A missing required field, a value of the wrong type or
    one that breaks an invariant raises `RecordValidationError` naming the field path.
    A ``"v"`` newer than `SCHEMA_VERSION` is accepted when its fields still parse.
    """
    if not isinstance(data, Mapping):
        raise RecordValidationError(
            f"cannot build {cls.__name__} from {type(data).__name__}: expected a mapping"
        )
    version = data.get("v", SCHEMA_VERSION)
    number = version if version.__class__ is int else plain_number(version, reals=False)
    if not isinstance(number, int) or number < 1:  # (numpy's int64 is an integer too)
        raise RecordValidationError(
            f"{cls.__name__}: schema version 'v' must be a positive integer, got {shown(version)}",
            path="v",
        )
    body = {k: v for k, v in data.items() if k != "v"}
    try:
        hook = _STRUCTURE.get(cls)
        return converter.structure(body, cls) if hook is None else cast(T, hook(body, cls))
    except RecordValidationError as exc:
        raise RecordValidationError(f"{cls.__name__}: {exc}", path=exc.path) from exc
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as exc:
        path, message = _first_path(exc)
        raise RecordValidationError(
            f"{cls.__name__}: invalid field {path!r}: {message}", path=path or None
        ) from exc
    except (TypeError, ValueError) as exc:
        raise RecordValidationError(f"{cls.__name__}: {exc}") from exc
