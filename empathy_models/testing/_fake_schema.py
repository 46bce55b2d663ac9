"""
Values generated from a JSON Schema for `FakeLLMServer`: the arguments of a forced tool
call and the answer to a request for JSON.

`example_for` builds a small value the schema accepts, following ``type``,
``properties`` / ``required`` / ``additionalProperties`` / ``patternProperties`` /
``minProperties`` / ``maxProperties``, ``items`` / ``prefixItems`` / ``minItems`` /
``maxItems`` / ``uniqueItems``, ``minLength`` / ``maxLength`` / ``pattern``,
``minimum`` / ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum`` /
``multipleOf``, ``enum``, ``const``, ``anyOf`` / ``oneOf`` / ``allOf`` and ``$ref``,
and writing strings in the usual formats (``format``: ``date-time``, ``date``,
``time``, ``duration``, ``uuid``, ``email``, ``uri``, ``hostname``, ``ipv4``, ``ipv6``
and pydantic's own; a format whose example does not match the ``pattern`` gives way to
the pattern).  Keywords the ``anthropic`` SDK moves into a description (``"...
{minimum: 1}"``, the ones its API does not take) are followed too, as the model would
read them; other keywords (``not``, ``if``, ``contains``, ...) are not.  Each choice
made (an ``anyOf`` / ``oneOf`` option, the parts of ``allOf``), and the whole value when
it is under 100,000 characters, is checked against the schema as
`empathy_models._jsonschema` checks structured output.

It is the smallest value that is still a useful example: every property, one item in
an array that needs none, seven characters in a string that needs none; past a few
levels of nesting only what the schema requires, so a recursive schema ends.  A schema
no value satisfies (``minimum`` above ``maximum``, a required property whose schema is
``false``), whose smallest value is over `MAX_EXAMPLE_CHARS` characters of JSON, or
that takes too much search is refused with `SchemaRefused` instead.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any, Final

from .._jsonschema import resolve_ref, schema_problem, value_problem
from .._regex_cost import length_limit, pattern_cost
from .._validators import shown

__all__ = ["MAX_EXAMPLE_CHARS", "SchemaRefused", "example_for"]

MAX_EXAMPLE_CHARS: Final = 1_000_000
"""The largest value `example_for` makes, in characters of JSON (about 1 MB)."""

_FULL_DEPTH: Final = 6
"""Values nested deeper than this get only what their schema requires."""
_MAX_DEPTH: Final = 64
_MAX_STEPS: Final = 60_000
"""Schemas visited for one value: a schema that needs more is refused as too complex."""
_CHECKED: Final = 100_000
"""Values up to this many characters are checked against the whole schema once made."""
_PLAIN_CHARS: Final = 7
_MAX_DISTINCT: Final = 10_000
"""The most items the fake makes distinct for ``uniqueItems``."""
_ANNOTATIONS: Final = frozenset(
    {
        "$comment",
        "$defs",
        "$id",
        "$schema",
        "default",
        "definitions",
        "deprecated",
        "description",
        "examples",
        "readOnly",
        "title",
        "writeOnly",
    }
)


class SchemaRefused(Exception):
    """
    No value was generated for a schema.

    Args:
        reason: Why: where in the schema and what (no value satisfies it, the smallest
            one is too large, or it is too complex).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NoValue(Exception):
    """This schema (or this choice in it) has no value the generator can make."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")


class _TooComplex(Exception):
    """The whole generation gives up: too many schemas visited."""


# --------------------------------------------------------------------------- formats


def _moment(variant: int) -> datetime:
    return datetime(2024, 1, 1, 12, tzinfo=UTC) + timedelta(days=variant)


def _uuid(version: int) -> Callable[[int], str]:
    return lambda variant: f"00000000-0000-{version}000-8000-{variant:012x}"


_FORMATS: Final[dict[str, Callable[[int], str]]] = {
    "date-time": lambda i: _moment(i).isoformat().replace("+00:00", "Z"),
    "date": lambda i: _moment(i).date().isoformat(),
    "time": lambda i: f"12:{i // 60 % 60:02d}:{i % 60:02d}Z",
    "duration": lambda i: f"P{i + 1}D",
    "uuid": _uuid(4),
    "uuid1": _uuid(1),
    "uuid3": _uuid(3),
    "uuid4": _uuid(4),
    "uuid5": _uuid(5),
    "uuid6": _uuid(6),
    "uuid7": _uuid(7),
    "uuid8": _uuid(8),
    "email": lambda i: f"user{i or ''}@example.com",
    "idn-email": lambda i: f"user{i or ''}@example.com",
    "uri": lambda i: f"https://example.com/{i or ''}",
    "iri": lambda i: f"https://example.com/{i or ''}",
    "uri-reference": lambda i: f"https://example.com/{i or ''}",
    "iri-reference": lambda i: f"https://example.com/{i or ''}",
    "hostname": lambda i: f"host{i}.example.com",
    "idn-hostname": lambda i: f"host{i}.example.com",
    "ipv4": lambda i: f"192.0.{i // 254 % 256}.{i % 254 + 1}",
    "ipv6": lambda i: f"2001:db8::{i + 1:x}",
    "ipvanyaddress": lambda i: f"192.0.{i // 254 % 256}.{i % 254 + 1}",
    "ipv4interface": lambda i: f"192.0.{i // 254 % 256}.{i % 254 + 1}/24",
    "ipvanyinterface": lambda i: f"192.0.{i // 254 % 256}.{i % 254 + 1}/24",
    "ipv6interface": lambda i: f"2001:db8::{i + 1:x}/64",
    "ipv4network": lambda i: f"10.{i // 256 % 256}.{i % 256}.0/24",
    "ipvanynetwork": lambda i: f"10.{i // 256 % 256}.{i % 256}.0/24",
    "ipv6network": lambda i: f"2001:db8:{i:x}::/48",
    "base64": lambda i: base64.b64encode(f"example{i}".encode()).decode(),
    "byte": lambda i: base64.b64encode(f"example{i}".encode()).decode(),
    "base64url": lambda i: base64.urlsafe_b64encode(f"example{i}".encode()).decode(),
}

# --------------------------------------------------------------------------- patterns

try:
    _RE_PARSER: Any = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - a Python without it: patterns are not generated
    _RE_PARSER = None

_CATEGORY_CHARS: Final = {
    "CATEGORY_DIGIT": "0123456789",
    "CATEGORY_NOT_DIGIT": "xyzab_",
    "CATEGORY_WORD": "xyzab_019",
    "CATEGORY_NOT_WORD": " -.,",
    "CATEGORY_SPACE": " ",
    "CATEGORY_NOT_SPACE": "xyzab019",
}
_ANY_CHARS: Final = "xyzabcXYZ0123456789_-. "


class _Emit:
    """One string for a parsed regular expression: repeats ``extra`` over their minimum."""

    def __init__(self, extra: int, pick: int, limit: int) -> None:
        self.extra = extra
        self.pick = pick
        self.limit = limit
        self.out: list[str] = []
        self.length = 0
        self.groups: dict[int, str] = {}

    def put(self, text: str) -> None:
        self.out.append(text)
        self.length += len(text)
        if self.length > self.limit:
            raise ValueError("too long")

    def chars(self, items: Any) -> str:
        pool: list[str] = []
        negate = False
        for op, arg in items:
            name = str(op)
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                pool.append(chr(arg))
            elif name == "RANGE":
                pool.extend(chr(c) for c in range(arg[0], min(arg[1], arg[0] + 36) + 1))
            elif name == "CATEGORY":
                pool.extend(_CATEGORY_CHARS.get(str(arg), ""))
            else:
                raise ValueError(name)
        if negate:
            pool = [c for c in _ANY_CHARS if c not in pool]
        if not pool:
            raise ValueError("empty character set")
        return pool[self.pick % len(pool)]

    def emit(self, parsed: Any) -> None:
        for op, arg in parsed:
            name = str(op)
            if name == "LITERAL":
                self.put(chr(arg))
            elif name == "NOT_LITERAL":
                self.put("x" if arg != ord("x") else "y")
            elif name == "ANY":
                self.put(_ANY_CHARS[self.pick % len(_ANY_CHARS)])
            elif name == "IN":
                self.put(self.chars(arg))
            elif name == "BRANCH":
                branches = arg[1]
                self.emit(branches[self.pick % len(branches)])
            elif name == "SUBPATTERN":
                start = len(self.out)
                self.emit(arg[3])
                if arg[0] is not None:
                    self.groups[arg[0]] = "".join(self.out[start:])
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = arg
                for _ in range(min(low + self.extra, high)):
                    self.emit(sub)
            elif name == "ATOMIC_GROUP":
                self.emit(arg)
            elif name == "GROUPREF":
                self.put(self.groups.get(arg, ""))
            elif name not in ("AT", "ASSERT", "ASSERT_NOT"):
                raise ValueError(name)


def _pattern_examples(pattern: str, low: int, high: int | None) -> list[str]:
    """Distinct strings ``pattern`` finds a match in, their lengths in [low, high]."""
    if _RE_PARSER is None:
        return []
    exponent = pattern_cost(pattern)[0]
    if exponent >= 2:  # a longer string is not searched with it (see _regex_cost)
        high = length_limit(exponent) if high is None else min(high, length_limit(exponent))
    try:
        parsed = _RE_PARSER.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, ValueError, TypeError, OverflowError, RecursionError):
        return []
    limit = max(low, 64) + 64 if high is None else high + 1
    found: list[str] = []
    for extra in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, low):
        for pick in range(4):
            emitter = _Emit(extra, pick, limit)
            try:
                emitter.emit(parsed.data)
            except (ValueError, TypeError, IndexError, KeyError, RecursionError):
                continue
            text = "".join(emitter.out)
            fits = low <= len(text) and (high is None or len(text) <= high)
            if fits and text not in found and compiled.search(text):
                found.append(text)
    return found


# --------------------------------------------------------------------------- numbers


def _exact(number: Any) -> Fraction:
    return Fraction(number) if isinstance(number, int) else Fraction(repr(number))


def _bounds(schema: Mapping[str, Any]) -> tuple[Fraction | None, bool, Fraction | None, bool]:
    """(lower, lower is exclusive, upper, upper is exclusive): the tightest of each."""
    lower: Fraction | None = None
    upper: Fraction | None = None
    lower_ex = upper_ex = False
    if "minimum" in schema:
        lower = _exact(schema["minimum"])
    if "exclusiveMinimum" in schema:
        bound = _exact(schema["exclusiveMinimum"])
        if lower is None or bound >= lower:
            lower, lower_ex = bound, True
    if "maximum" in schema:
        upper = _exact(schema["maximum"])
    if "exclusiveMaximum" in schema:
        bound = _exact(schema["exclusiveMaximum"])
        if upper is None or bound <= upper:
            upper, upper_ex = bound, True
    return lower, lower_ex, upper, upper_ex


def _number_value(schema: Mapping[str, Any], integer: bool, variant: int) -> Fraction | None:
    """The ``variant``-th number (distinct for each) within the bounds, or None."""
    lower, lower_ex, upper, upper_ex = _bounds(schema)

    def fits(x: Fraction) -> bool:
        above = lower is None or (x > lower if lower_ex else x >= lower)
        below = upper is None or (x < upper if upper_ex else x <= upper)
        return above and below

    step: Fraction | None = None
    if "multipleOf" in schema:
        step = _exact(schema["multipleOf"])
        if integer:  # the integer multiples of p/q are the multiples of p
            step = Fraction(step.numerator)
    elif integer:
        step = Fraction(1)
    if step is None:  # a number: whole numbers when the range holds one, else a fraction
        wholes = [0]
        if lower is not None:
            wholes += [math.ceil(lower), math.floor(lower) + 1]
        if upper is not None:
            wholes += [math.floor(upper), math.ceil(upper) - 1]
        step = Fraction(1) if any(fits(Fraction(w)) for w in wholes) else None
    if step is None:
        assert lower is not None and upper is not None
        value = lower + (upper - lower) / (variant + 2)
        return value if fits(value) else None
    if fits(Fraction(0)):
        top = None if upper is None else math.floor(upper / step)  # the multiples up to it
        if top is not None and upper_ex and top * step == upper:
            top -= 1
        value = variant * step if top is None or variant <= top else -(variant - top) * step
    elif lower is not None and (upper is None or lower > 0):
        first = math.ceil(lower / step) * step
        value = (first + step if lower_ex and first == lower else first) + variant * step
    else:
        assert upper is not None
        last = math.floor(upper / step) * step
        value = (last - step if upper_ex and last == upper else last) - variant * step
    return value if fits(value) else None


# --------------------------------------------------------------------------- schemas


def _combine(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of two schemas one value must both match (the value is checked after)."""
    out = dict(first)
    for key, value in second.items():
        if key not in out:
            out[key] = value
        elif key == "properties":
            merged = dict(out[key])
            for name, sub in value.items():
                merged[name] = {"allOf": [merged[name], sub]} if name in merged else sub
            out[key] = merged
        elif key == "required":
            out[key] = list(dict.fromkeys([*out[key], *value]))
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
            out[key] = max(out[key], value)
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
            out[key] = min(out[key], value)
        elif key == "type":
            mine = out[key] if isinstance(out[key], list) else [out[key]]
            theirs = value if isinstance(value, list) else [value]
            both = [k for k in mine if k in theirs or (k == "integer" and "number" in theirs)]
            both += [k for k in theirs if k == "integer" and "number" in mine and k not in both]
            out[key] = both
    return out


_HINTS: Final = re.compile(r"\{([^{}]*)\}\s*$")
_HINT: Final = re.compile(
    r"(?:^|, )(minimum|maximum|exclusiveMinimum|exclusiveMaximum|multipleOf|minLength|"
    r"maxLength|minItems|maxItems|minProperties|maxProperties|uniqueItems|format): "
    r"([^,]+?)(?=, [A-Za-z$]+: |$)"
)


def _with_hints(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """
    ``schema`` with the keywords the ``anthropic`` SDK moved into its description
    (``"... {minimum: 1, format: uuid4}"``, the ones the API does not take), as the model
    would read them; ``schema`` itself when there are none.
    """
    description = schema.get("description")
    found = _HINTS.search(description) if isinstance(description, str) else None
    if found is None:
        return schema
    out = dict(schema)
    for key, text in _HINT.findall(found.group(1)):
        value: Any = text
        if key == "uniqueItems":
            value = text == "True"
        elif key != "format":
            try:
                value = float(text) if any(c in text for c in ".eEn") else int(text)
            except ValueError:
                continue
        if key not in out:
            out[key] = value
    return out if len(out) > len(schema) and schema_problem(out) is None else schema


def _has_constraints(schema: Mapping[str, Any]) -> bool:
    return any(key != "$ref" and key not in _ANNOTATIONS for key in schema)


class _Generator:
    """One value for a schema, its size counted against `MAX_EXAMPLE_CHARS`."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.size = 0
        self.steps = 0
        self.patterns: dict[tuple[str, int, int | None], list[str]] = {}

    def add(self, chars: int, where: str) -> None:
        self.size += chars
        if self.size > MAX_EXAMPLE_CHARS:
            raise _NoValue(where, f"the value would be over {MAX_EXAMPLE_CHARS:,} characters")

    def resolved(self, schema: Any, where: str) -> tuple[Any, Mapping[str, Any] | None]:
        """
        ``schema`` with each ``$ref`` and ``allOf`` merged in (a boolean as it is), and
        the schema merged, which the value is to be checked against (None: nothing was).
        """
        for _ in range(_MAX_DEPTH):
            if not isinstance(schema, Mapping):
                return schema, None
            ref = schema.get("$ref")
            if ref is None or _has_constraints(schema):
                break
            schema = resolve_ref(ref, self.root)
        else:
            raise _NoValue(where, "too many $refs in a row")
        if "$ref" not in schema and "allOf" not in schema:
            return schema, None
        parts: list[Any] = [resolve_ref(schema["$ref"], self.root)] if "$ref" in schema else []
        parts.extend(schema.get("allOf", ()))
        out = {k: v for k, v in schema.items() if k not in ("$ref", "allOf")}
        for part in parts:
            part, _ = self.resolved(part, where)
            if part is False:
                raise _NoValue(where, "no value matches a false schema")
            if isinstance(part, Mapping):
                out = _combine(out, part)
        return out, schema

    def value(self, schema: Any, where: str, depth: int, variant: int) -> Any:
        self.steps += 1
        if self.steps > _MAX_STEPS:
            raise _TooComplex
        if depth > _MAX_DEPTH:
            raise _NoValue(where, f"nested over {_MAX_DEPTH} levels deep")
        schema, merged_from = self.resolved(schema, where)
        if schema is True or (isinstance(schema, Mapping) and not _has_constraints(schema)):
            self.add(4 if variant == 0 else len(str(variant)), where)
            return None if variant == 0 else variant
        if not isinstance(schema, Mapping):
            raise _NoValue(where, "no value matches a false schema")
        hinted = _with_hints(schema)
        mark = self.size
        try:
            value = self.constrained(hinted, where, depth, variant)
        except _NoValue:
            if hinted is schema:
                raise
            self.size = mark  # the hints cannot be met together: the schema alone
            value = self.constrained(schema, where, depth, variant)
        if merged_from is not None:
            problem = value_problem(value, merged_from, self.root)
            if problem is not None:
                raise _NoValue(where, f"the parts of allOf / $ref disagree ({problem})")
        return value

    def constrained(self, schema: Mapping[str, Any], where: str, depth: int, variant: int) -> Any:
        if "const" in schema:
            if variant:
                raise _NoValue(where, "const allows one value only")
            self.add(len(json.dumps(schema["const"])), where)
            return schema["const"]
        if "enum" in schema:
            options = [o for o in schema["enum"] if value_problem(o, schema, self.root) is None]
            if variant >= len(options):
                raise _NoValue(where, "no value of enum matches the rest of the schema")
            self.add(len(json.dumps(options[variant])), where)
            return options[variant]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.choice(schema, key, where, depth, variant)
        kinds = schema.get("type")
        if kinds is None:
            kinds = [_implied_type(schema)]
        elif not isinstance(kinds, list):
            kinds = [kinds]
        # the first non-null type, or, deep down, null first (a recursive schema ends)
        kinds = sorted(kinds, key=lambda k: (k == "null") != (depth >= _FULL_DEPTH))
        failures: list[_NoValue] = []
        for kind in kinds:
            mark = self.size
            try:
                return self.typed(kind, schema, where, depth, variant)
            except _NoValue as exc:
                self.size = mark
                failures.append(exc)
        if not failures:
            raise _NoValue(where, "the parts of the schema have no type in common")
        if len(failures) == 1:
            raise failures[0]
        raise _NoValue(where, f"no type has a value ({'; '.join(map(str, failures))[:300]})")

    def choice(
        self, schema: Mapping[str, Any], key: str, where: str, depth: int, variant: int
    ) -> Any:
        rest = {k: v for k, v in schema.items() if k != key}
        options = list(schema[key])
        if depth >= _FULL_DEPTH:  # deep down: the options that do not recurse first
            options.sort(key=lambda o: isinstance(o, Mapping) and "$ref" in o)
        problems: list[str] = []
        for option in options:
            mark = self.size
            try:
                option, _ = self.resolved(option, where)
                if option is False:
                    raise _NoValue(where, "no value matches a false schema")
                candidate = _combine(rest, option) if isinstance(option, Mapping) else rest
                value = self.value(candidate, where, depth, variant)
                problem = value_problem(value, schema, self.root)
                if problem is None:
                    return value
                problems.append(problem)
            except _NoValue as exc:
                problems.append(str(exc))
            self.size = mark
        raise _NoValue(where, f"no {key} option has a value ({'; '.join(problems)[:300]})")

    def typed(
        self, kind: str, schema: Mapping[str, Any], where: str, depth: int, variant: int
    ) -> Any:
        if kind == "object":
            return self.object(schema, where, depth, variant)
        if kind == "array":
            return self.array(schema, where, depth, variant)
        if kind == "string":
            return self.string(schema, where, variant)
        if kind in ("integer", "number"):
            number = _number_value(schema, kind == "integer", variant)
            if number is None:
                raise _NoValue(where, f"no {kind} is within the schema's bounds")
            value: int | float = int(number) if kind == "integer" else float(number)
            if kind == "number" and (
                not math.isfinite(value) or value_problem(value, schema, self.root) is not None
            ):
                raise _NoValue(where, "no number within the bounds is exact as a float")
            self.add(len(str(value)), where)
            return value
        if kind == "boolean" and variant < 2:
            self.add(5, where)
            return variant == 0
        if kind == "null" and variant == 0:
            self.add(4, where)
            return None
        raise _NoValue(where, f"no other {kind} value")

    def string(self, schema: Mapping[str, Any], where: str, variant: int) -> str:
        low = schema.get("minLength", 0)
        high = schema.get("maxLength")
        if high is not None and low > high:
            raise _NoValue(where, "minLength is more than maxLength")
        low, high = int(low), None if high is None else int(high)
        self.add(low + 2, where)  # before a string that long is made
        pattern = schema.get("pattern")
        fmt = schema.get("format")
        example = _FORMATS.get(fmt) if isinstance(fmt, str) else None
        if example is not None and pattern is not None and re.search(pattern, example(variant)):
            pattern = None  # the format's example matches the pattern too
        if pattern is not None:
            key = (pattern, low, high)
            found = self.patterns.get(key)
            if found is None:
                found = self.patterns[key] = _pattern_examples(pattern, low, high)
            if variant >= len(found):
                raise _NoValue(where, f"no string the fake can make matches {shown(pattern)}")
            text = found[variant]
        elif example is not None:
            text = example(variant)
            if len(text) < low or (high is not None and len(text) > high):
                raise _NoValue(where, f"no {shown(fmt)} string has the length the schema allows")
        else:
            length = max(low, _PLAIN_CHARS if high is None else min(_PLAIN_CHARS, high))
            tag = str(variant) if variant else ""
            text = "x" * max(0, length - len(tag)) + tag
            if high is not None and len(text) > high:
                raise _NoValue(where, f"no more distinct strings of at most {high} characters")
        self.add(len(text) - low, where)
        return text

    def object(
        self, schema: Mapping[str, Any], where: str, depth: int, variant: int
    ) -> dict[str, Any]:
        properties: Mapping[str, Any] = schema.get("properties", {})
        required: list[str] = list(schema.get("required", ()))
        extra = schema.get("additionalProperties", True)
        names = [n for n in properties if depth < _FULL_DEPTH or n in required]
        names += [n for n in required if n not in properties]
        self.add(2, where)
        out: dict[str, Any] = {}
        for name in names:
            sub = properties[name] if name in properties else self.other(schema, name, extra)
            mark = self.size
            try:
                out[name] = self.value(sub, f"{where}.{name}", depth + 1, variant)
                self.add(len(json.dumps(name)) + 2, where)
                variant = 0  # the first value made distinguishes the object
            except _NoValue:
                self.size = mark
                if name in required:
                    raise
        low = schema.get("minProperties", 0)
        while len(out) < low:
            name = f"property{len(out)}"
            if name in out:
                name += "_"
            sub = self.other(schema, name, extra)
            out[name] = self.value(sub, f"{where}.{name}", depth + 1, variant)
            self.add(len(name) + 4, where)
            variant = 0
        if variant:
            raise _NoValue(where, "no property to make this object distinct")
        if len(out) > schema.get("maxProperties", math.inf):
            for name in [n for n in reversed(out) if n not in required]:
                if len(out) <= schema["maxProperties"]:
                    break
                del out[name]
            if len(out) > schema["maxProperties"]:
                raise _NoValue(where, "more required properties than maxProperties")
        return out

    def other(self, schema: Mapping[str, Any], name: str, extra: Any) -> Any:
        """The schema of a property not in ``properties``."""
        for pattern, sub in schema.get("patternProperties", {}).items():
            if re.search(pattern, name):
                return sub
        return extra

    def array(self, schema: Mapping[str, Any], where: str, depth: int, variant: int) -> list[Any]:
        prefix: list[Any] = list(schema.get("prefixItems", ()))
        items = schema.get("items", True)
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", MAX_EXAMPLE_CHARS))
        if items is False:
            high = min(high, len(prefix))
        if low > high:
            raise _NoValue(where, "minItems is more than the items allowed")
        wanted = max(low, min(len(prefix) or 1, high) if depth < _FULL_DEPTH else 0)
        self.add(wanted + 1, where)
        unique = schema.get("uniqueItems") is True
        if unique and wanted > _MAX_DISTINCT:
            raise _NoValue(where, f"the fake makes at most {_MAX_DISTINCT:,} distinct items")
        out: list[Any] = []
        for index in range(wanted):
            sub = prefix[index] if index < len(prefix) else items
            mark = self.size
            nth = variant * wanted + index if unique else (variant if index == 0 else 0)
            try:
                item = self.value(sub, f"{where}[{index}]", depth + 1, nth)
            except _NoValue:
                self.size = mark
                if index < low:
                    raise
                break
            out.append(item)
            if index >= len(prefix) and not unique and index + 1 < low:
                self.add((self.size - mark) * (low - index - 1), where)
                out.extend([item] * (low - index - 1))  # the same item: made once
                break
        if variant and not out:
            raise _NoValue(where, "no item to make this array distinct")
        if unique and len({json.dumps(i, sort_keys=True) for i in out}) < len(out):
            raise _NoValue(where, "the fake cannot make these items distinct")
        return out


def _implied_type(schema: Mapping[str, Any]) -> str:
    """The type a schema without ``type`` describes, by its keywords."""
    if {"properties", "required", "additionalProperties", "minProperties"} & schema.keys():
        return "object"
    if {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"} & schema.keys():
        return "array"
    if {"minLength", "maxLength", "pattern", "format"} & schema.keys():
        return "string"
    if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"} & schema.keys():
        return "number"
    return "null"


def example_for(schema: Mapping[str, Any]) -> Any:
    """
    A small value ``schema`` accepts (see the module doc).

    Raises:
        SchemaRefused: The schema is not valid JSON Schema, no value satisfies it, its
            smallest value is over `MAX_EXAMPLE_CHARS` characters, or it is too
            complex to generate a value for.
    """
    problem = schema_problem(schema)
    if problem is not None:
        where, why = problem
        raise SchemaRefused(f"{where.removeprefix('.') or '(the root)'} {why}")
    generator = _Generator(schema)
    try:
        value = generator.value(schema, "$", 0, 0)
    except _NoValue as exc:
        reason = str(exc)  # a path of property names: cut short if long
        raise SchemaRefused(reason if len(reason) <= 300 else reason[:297] + "...") from None
    except (_TooComplex, RecursionError):
        raise SchemaRefused("the schema is too complex to generate a value for") from None
    # a last check, on a value small enough to check at once (a large one is mostly an
    # item repeated, made the same way as the small ones)
    problem_text = value_problem(value, schema, schema) if generator.size < _CHECKED else None
    if problem_text is not None:
        raise SchemaRefused(f"the fake cannot make a value for it ({problem_text})")
    return value
