"""
A small JSON Schema checker for structured output, without a dependency.

It covers what OpenAI's and Anthropic's structured outputs accept: ``type`` (one or a
list), ``properties``, ``patternProperties``, ``required``, ``additionalProperties`` (a
bool or a schema), ``items``, ``prefixItems``, ``enum``, ``const``, ``anyOf``,
``oneOf``, ``allOf``, ``$ref`` (a JSON pointer into the schema itself: ``#``,
``#/$defs/...`` or ``#/definitions/...``, percent-encoded and ``~0`` / ``~1`` escaped as
JSON Schema 2020-12 has it),
``minItems`` / ``maxItems``, ``minLength`` / ``maxLength``, ``pattern`` (Python's
``re.search``), ``minimum`` / ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum``
and ``multipleOf``.  Other keywords (``format``, ``description``, ...) are accepted and
not checked.

The strings a pattern is searched in (values and property names) come from the model,
and ``re`` has no timeout, so `empathy_models._regex_cost` reads each pattern first.
`schema_problem` refuses one whose search time can grow exponentially with the string
(``(a+)+$``), or faster than its cube, and a ``minLength`` over what a pattern is
searched in.  A pattern whose time grows as a power of the length (the email pattern
``^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$``: the square) is searched only in strings up to a
length (`length_limit`: 3,162 characters for the square, 215 for the cube), and the
strings of one answer share a budget (`MATCH_BUDGET`: *length* ** *power* summed); a
string not searched makes the answer a mismatch, unless ``anyOf`` / ``oneOf`` settle
without it.  A linear pattern is searched in any string.

`schema_problem` finds a keyword above whose value JSON Schema does not allow (a
``minimum`` that is a string, a ``pattern`` that does not compile, a ``$ref`` that points
nowhere, ``$ref`` / ``allOf`` / ``anyOf`` / ``oneOf`` leading back to the same schema,
which no check would end): `ResponseFormat` refuses such a schema when it is built, and
the check does not run on one (its reason is the parse error).

The check compares as JSON does: ``true`` is not ``1`` in ``enum`` and ``const``;
``multipleOf`` is exact on the numbers' decimal values (``0.3`` is a multiple of ``0.1``,
``1000000000.5`` is not a multiple of ``1``).  An answer holding ``NaN``, ``Infinity`` or
a number too large for a float is not JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any, Final
from urllib.parse import unquote

from ._regex_cost import MATCH_BUDGET, length_limit, pattern_cost
from ._validators import shown

__all__ = ["parse_structured", "resolve_ref", "schema_errors", "schema_problem", "value_problem"]

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (
        not isinstance(v, bool)
        and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}

_MAX_DEPTH: Final = 150
"""How many values and ``$ref`` steps deep the check goes (a deep answer stops there)."""

_MISSING: Final = object()
_INDEX: Final = re.compile(r"0|[1-9][0-9]{0,8}")


# --------------------------------------------------------------------------- the schema


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError):
        return False
    return True


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    if isinstance(value, float):
        return value.is_integer() and value >= 0
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _type_ok(value: object) -> bool:
    if isinstance(value, str):
        return value in _TYPES
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(name, str) and name in _TYPES for name in value)
        and len(set(value)) == len(value)
    )


_NUMBER: Final = (_is_number, "must be a number")
_COUNT: Final = (_is_count, "must be a non-negative integer")
_SCHEMAS: Final = (
    lambda v: isinstance(v, list) and bool(v),
    "must be a non-empty list of schemas",
)
_SCHEMA_MAP: Final = (lambda v: isinstance(v, Mapping), "must be an object of schemas")
_KEYWORDS: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    "type": (_type_ok, f"must be one of {', '.join(_TYPES)}, or a non-empty list of them"),
    "enum": (lambda v: isinstance(v, list), "must be a list"),
    "required": (
        lambda v: isinstance(v, list) and all(isinstance(name, str) for name in v),
        "must be a list of strings",
    ),
    "pattern": (lambda v: isinstance(v, str) and _compiles(v), "must be a regular expression"),
    "$ref": (lambda v: isinstance(v, str), "must be a string"),
    "minimum": _NUMBER,
    "maximum": _NUMBER,
    "exclusiveMinimum": _NUMBER,
    "exclusiveMaximum": _NUMBER,
    "multipleOf": (lambda v: _is_number(v) and v > 0, "must be a number greater than 0"),
    "minItems": _COUNT,
    "maxItems": _COUNT,
    "minLength": _COUNT,
    "maxLength": _COUNT,
    "prefixItems": _SCHEMAS,
    "anyOf": _SCHEMAS,
    "oneOf": _SCHEMAS,
    "allOf": _SCHEMAS,
    "properties": _SCHEMA_MAP,
    "patternProperties": _SCHEMA_MAP,
    "$defs": _SCHEMA_MAP,
    "definitions": _SCHEMA_MAP,
}


def _resolve(ref: str, root: Mapping[str, Any]) -> Any:
    """What ``ref`` (``#`` and a JSON pointer) points to in ``root``, else `_MISSING`."""
    if not ref.startswith("#"):
        return _MISSING
    pointer = unquote(ref[1:])
    if not pointer:
        return root
    if not pointer.startswith("/"):
        return _MISSING  # an anchor name: not supported
    node: Any = root
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and _INDEX.fullmatch(part) and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _children(schema: Mapping[str, Any], where: str) -> list[tuple[Any, str]]:
    """The subschemas of ``schema`` the check reads, with their paths."""
    out: list[tuple[Any, str]] = []
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        out.extend((sub, f"{where}.{key}.{name}") for name, sub in schema.get(key, {}).items())
    for key in ("prefixItems", "anyOf", "oneOf", "allOf"):
        out.extend((sub, f"{where}.{key}[{i}]") for i, sub in enumerate(schema.get(key, ())))
    out.extend(
        (schema[key], f"{where}.{key}")
        for key in ("additionalProperties", "items")
        if key in schema
    )
    return out


def _node_problem(schema: Mapping[str, Any], where: str) -> tuple[str, str] | None:
    for key, (valid, why) in _KEYWORDS.items():
        if key in schema and not valid(schema[key]):
            return f"{where}.{key}", f"{why}, got {_shown(schema[key])}"
    for name in schema.get("patternProperties", {}):
        if not _compiles(name):
            return f"{where}.patternProperties", f"{shown(name)} is not a regular expression"
    if "pattern" in schema and (problem := _pattern_problem(schema, where)) is not None:
        return problem
    for name in schema.get("patternProperties", {}):
        refused = pattern_cost(name)[1]
        if refused is not None:
            return f"{where}.patternProperties", f"{shown(name)} {refused}"
    return None


def _pattern_problem(schema: Mapping[str, Any], where: str) -> tuple[str, str] | None:
    """Why ``schema``'s ``pattern`` (which compiles) is refused: see `pattern_cost`."""
    pattern = schema["pattern"]
    exponent, refused = pattern_cost(pattern)
    if refused is not None:
        return f"{where}.pattern", f"{shown(pattern)} {refused}"
    low = schema.get("minLength", 0)
    if low > length_limit(exponent):  # no string would be searched with it
        return f"{where}.minLength", (
            f"{shown(low)} is over the {length_limit(exponent):,} characters a string is "
            f"searched with {shown(pattern)} in (its search time can grow as the length to "
            f"the power {exponent})"
        )
    return None


def schema_problem(schema: Mapping[str, Any]) -> tuple[str, str] | None:
    """
    ``(where, why)`` for the first keyword of ``schema`` the check reads whose value JSON
    Schema does not allow, a ``$ref`` that points to no schema in it, or a loop of
    ``$ref`` / ``allOf`` / ``anyOf`` / ``oneOf`` (``where`` a path such as
    ``.properties.age.minimum``, ``""`` for the root); None when it can be checked.
    """
    todo: list[tuple[Any, str]] = [(schema, "")]
    paths: dict[int, str] = {}
    nodes: list[Mapping[str, Any]] = []
    while todo:
        node, where = todo.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, Mapping):
            hint = " (a list of item schemas is prefixItems)" if where.endswith(".items") else ""
            return where, f"must be a schema (an object or a boolean){hint}, got {_shown(node)}"
        if id(node) in paths:
            continue
        paths[id(node)] = where
        nodes.append(node)
        problem = _node_problem(node, where)
        if problem is not None:
            return problem
        todo.extend(reversed(_children(node, where)))
        ref = node.get("$ref")
        if ref is not None:
            target = _resolve(ref, schema)
            if not (ref == "#" or (ref.startswith("#") and unquote(ref[1:]).startswith("/"))):
                return f"{where}.$ref", f"{shown(ref)}: only '#' and '#/...' are supported"
            if target is _MISSING or not isinstance(target, Mapping | bool):
                return f"{where}.$ref", f"{shown(ref)} points to no schema in this one"
            todo.append((target, f"{where}.$ref"))
    looping = _loop(nodes, schema)
    if looping is None:
        return None
    why = "leads back to itself by $ref, allOf, anyOf or oneOf without going into the value"
    return paths[id(looping)], why


def _in_place(schema: Mapping[str, Any], root: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The schemas the check applies to the same value as ``schema`` (valid ones)."""
    out = [o for key in ("allOf", "anyOf", "oneOf") for o in schema.get(key, ())]
    if "$ref" in schema:
        out.append(_resolve(schema["$ref"], root))
    return [sub for sub in out if isinstance(sub, Mapping)]


def _loop(nodes: list[Mapping[str, Any]], root: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A schema in ``nodes`` the check would reach again on the same value, or None."""
    done: set[int] = set()
    for start in nodes:
        if id(start) in done:
            continue
        on_path = {id(start)}
        stack = [(start, iter(_in_place(start, root)))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(id(node))
                done.add(id(node))
            elif id(child) in on_path:
                return child
            elif id(child) not in done:
                on_path.add(id(child))
                stack.append((child, iter(_in_place(child, root))))
    return None


def _shown(value: object) -> str:
    """``value`` for a message: its repr, cut short (a type name for a container)."""
    if isinstance(value, Mapping | list):
        return type(value).__name__
    return shown(value)


# --------------------------------------------------------------------------- the check


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON has it: ``true`` is not ``1``; ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[key], b[key]) for key in a)
    return type(a) is type(b) and a == b  # strings and null


def _check(
    value: Any, schema: Any, root: Mapping[str, Any], path: str, depth: int, budget: _Budget
) -> str | None:
    if schema is True:
        return None
    if schema is False:
        return f"{path}: no value is allowed here"
    if depth > _MAX_DEPTH:
        return f"{path}: nested too deeply to check (over {_MAX_DEPTH} values and $refs)"
    ref = schema.get("$ref")
    if ref is not None:
        target = _resolve(ref, root)
        if target is _MISSING:
            return f"{path}: cannot resolve $ref {ref!r}"
        problem = _check(value, target, root, path, depth + 1, budget)
        if problem:
            return problem
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES[k](value) for k in kinds):
            return f"{path}: expected {' or '.join(kinds)}, got {_name(value)}"
    if "const" in schema and not _json_equal(value, schema["const"]):
        return f"{path}: must be {shown(schema['const'])}"
    enum = schema.get("enum")
    if enum is not None and not any(_json_equal(value, option) for option in enum):
        return f"{path}: must be one of {shown(enum)}"
    problem = _check_combined(value, schema, root, path, depth, budget)
    if problem:
        return problem
    if isinstance(value, dict):
        return _check_object(value, schema, root, path, depth, budget)
    if isinstance(value, list):
        return _check_array(value, schema, root, path, depth, budget)
    if isinstance(value, str):
        return _check_string(value, schema, path, budget)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _check_number(value, schema, path)
    return None


def _check_combined(
    value: Any,
    schema: Mapping[str, Any],
    root: Mapping[str, Any],
    path: str,
    depth: int,
    budget: _Budget,
) -> str | None:
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if options:
            matches = 0
            unchecked: _Unchecked | None = None  # an option that could not be checked
            for option in options:
                try:
                    matches += _check(value, option, root, path, depth + 1, budget) is None
                except _Unchecked as exc:
                    unchecked = unchecked or exc
            if unchecked is not None and (matches == 0 or (key == "oneOf" and matches == 1)):
                raise unchecked  # it could change the outcome
            if matches == 0 or (key == "oneOf" and matches > 1):
                return f"{path}: matches {matches} of the {key} options"
    for option in schema.get("allOf", ()):
        problem = _check(value, option, root, path, depth + 1, budget)
        if problem:
            return problem
    return None


def _check_object(
    value: dict[str, Any],
    schema: Mapping[str, Any],
    root: Mapping[str, Any],
    path: str,
    depth: int,
    budget: _Budget,
) -> str | None:
    for name in schema.get("required", ()):
        if name not in value:
            return f"{path}: missing required property {name!r}"
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        where = f"{path}.{name}"
        subschemas = [properties[name]] if name in properties else []
        for pattern, sub in patterns.items():
            unchecked = _unchecked(pattern, name, budget)
            if unchecked is not None:
                raise _Unchecked(f"{path}: the property name {shown(name)} is {unchecked}")
            if re.search(pattern, name):
                subschemas.append(sub)
        if not subschemas:
            if extra is False:
                return f"{path}: unexpected property {name!r}"
            subschemas = [extra]
        for sub in subschemas:
            problem = _check(item, sub, root, where, depth + 1, budget)
            if problem:
                return problem
    return None


def _check_array(
    value: list[Any],
    schema: Mapping[str, Any],
    root: Mapping[str, Any],
    path: str,
    depth: int,
    budget: _Budget,
) -> str | None:
    if len(value) < schema.get("minItems", 0):
        return f"{path}: fewer than {shown(schema['minItems'])} items"
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        return f"{path}: more than {shown(schema['maxItems'])} items"
    prefix = schema.get("prefixItems", ())
    for index, item in enumerate(value):
        sub = prefix[index] if index < len(prefix) else schema.get("items", True)
        problem = _check(item, sub, root, f"{path}[{index}]", depth + 1, budget)
        if problem:
            return problem
    return None


def _check_string(value: str, schema: Mapping[str, Any], path: str, budget: _Budget) -> str | None:
    if len(value) < schema.get("minLength", 0):
        return f"{path}: shorter than {shown(schema['minLength'])} characters"
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return f"{path}: longer than {shown(schema['maxLength'])} characters"
    pattern = schema.get("pattern")
    if pattern is None:
        return None
    unchecked = _unchecked(pattern, value, budget)
    if unchecked is not None:
        raise _Unchecked(f"{path}: {unchecked}")
    if re.search(pattern, value) is None:
        return f"{path}: does not match {pattern!r}"
    return None


class _Unchecked(Exception):
    """
    A string not searched with a pattern (see `_unchecked`): the check ends there, as
    the answer is neither shown to match nor not to (``anyOf`` / ``oneOf`` go on when
    their other options settle it).
    """


class _Budget:
    """What one check has left of `MATCH_BUDGET` (see `_unchecked`)."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MATCH_BUDGET


def _unchecked(pattern: str, text: str, budget: _Budget) -> str | None:
    """
    Why ``text`` is not searched with ``pattern`` (a phrase), or None having charged
    ``budget`` with the search's worst cost: *length* ** *exponent* when ``pattern``'s
    search time can grow faster than the length (`pattern_cost`).
    """
    exponent, refused = pattern_cost(pattern)
    if refused is not None:  # a schema `schema_problem` refuses: not searched at all
        return f"not checked: {shown(pattern)} {refused}"
    if exponent < 2:
        return None
    cost = len(text) ** exponent
    if cost <= budget.left:
        budget.left -= cost
        return None
    limit = length_limit(exponent)
    if len(text) > limit:
        return (
            f"{len(text):,} characters, over the {limit:,} searched with {shown(pattern)} "
            f"(its search time can grow as the length to the power {exponent})"
        )
    return (
        f"not searched with {shown(pattern)}: the answer's strings for patterns whose "
        "search time grows faster than their length are too long in all"
    )


def _exact(number: int | float) -> Fraction | int:
    """``number`` exactly: an int as it is, a float as its shortest decimal (its JSON)."""
    return number if isinstance(number, int) else Fraction(repr(number))


def _check_number(value: float, schema: Mapping[str, Any], path: str) -> str | None:
    if "minimum" in schema and value < schema["minimum"]:
        return f"{path}: less than {shown(schema['minimum'])}"
    if "maximum" in schema and value > schema["maximum"]:
        return f"{path}: more than {shown(schema['maximum'])}"
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        return f"{path}: not more than {shown(schema['exclusiveMinimum'])}"
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        return f"{path}: not less than {shown(schema['exclusiveMaximum'])}"
    step = schema.get("multipleOf")
    if step is not None and _exact(value) % _exact(step) != 0:
        return f"{path}: not a multiple of {shown(step)}"
    return None


def _name(value: Any) -> str:
    for name, test in _TYPES.items():
        if name != "integer" and test(value):
            return name
    return type(value).__name__


# --------------------------------------------------------------------------- entry points


def _schemashown(problem: tuple[str, str]) -> str:
    where, why = problem
    return f"the schema cannot be checked: {where or '(the root)'} {why}"


def _errors(value: Any, schema: Mapping[str, Any]) -> str | None:
    return value_problem(value, schema, schema)


def value_problem(value: Any, schema: Any, root: Mapping[str, Any]) -> str | None:
    """
    The first way ``value`` breaks ``schema``, a subschema of ``root`` (one `schema_problem`
    found nothing wrong with), or None.
    """
    try:
        return _check(value, schema, root, "$", 0, _Budget())
    except _Unchecked as exc:
        return str(exc)
    except RecursionError:  # a deep value below the limit, on a small stack
        return "$: nested too deeply to check"


def resolve_ref(ref: str, root: Mapping[str, Any]) -> Any:
    """The schema ``ref`` (``#`` or ``#/`` and a JSON pointer) points to in ``root``, or None."""
    target = _resolve(ref, root)
    return None if target is _MISSING else target


def schema_errors(value: Any, schema: Mapping[str, Any]) -> str | None:
    """
    The first way ``value`` breaks ``schema`` (a path and a reason), or None; the reason
    the schema cannot be checked when `schema_problem` finds one.
    """
    problem = schema_problem(schema)
    return _schemashown(problem) if problem is not None else _errors(value, schema)


class _NotJSON(ValueError):
    """A number JSON does not have, which Python's parser would take."""


def _constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON number")


def _float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise _NotJSON(f"{text[:20]} is out of the range of a number")
    return number


def parse_structured(
    text: str, schema: Mapping[str, Any], *, checked: bool = False
) -> tuple[Any, str | None]:
    """
    ``(value, None)`` when ``text`` is JSON matching ``schema``, else ``(None, why)``
    (never an exception: a schema that cannot be checked is a reason too).  ``checked``:
    the caller knows ``schema`` passed `schema_problem` and has not changed since, so
    it is not checked again.
    """
    problem = None if checked else schema_problem(schema)
    if problem is not None:
        return None, _schemashown(problem)
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            why = exc.msg
        else:
            why = str(exc) if isinstance(exc, _NotJSON) else type(exc).__name__
        return None, f"the answer is not JSON ({why})"
    mismatch = _errors(value, schema)
    if mismatch is not None:
        return None, f"the answer does not match the schema: {mismatch}"
    return value, None
