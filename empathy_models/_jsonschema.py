"""
A small JSON Schema checker for structured output, without a dependency.

It covers what OpenAI's and Anthropic's structured outputs accept: ``type`` (one or a
list), ``properties``, ``required``, ``additionalProperties`` (a bool or a schema),
``items``, ``prefixItems``, ``enum``, ``const``, ``anyOf``, ``oneOf``, ``allOf``,
``$ref`` into ``$defs`` / ``definitions``, ``minItems`` / ``maxItems``,
``minLength`` / ``maxLength``, ``pattern``, ``minimum`` / ``maximum`` /
``exclusiveMinimum`` / ``exclusiveMaximum`` and ``multipleOf``.  Other keywords
(``format``, ``description``, ...) are accepted and not checked.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from ._validators import shown

__all__ = ["parse_structured", "schema_errors"]

_TYPES: dict[str, Any] = {
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


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) else None


def _check(value: Any, schema: Any, root: Mapping[str, Any], path: str, depth: int) -> str | None:
    if depth > 64:
        return f"{path}: the schema nests too deeply to check"
    if schema is True or schema is None:
        return None
    if schema is False:
        return f"{path}: no value is allowed here"
    if not isinstance(schema, Mapping):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(ref, root)
        if target is None:
            return f"{path}: cannot resolve $ref {ref!r}"
        problem = _check(value, target, root, path, depth + 1)
        if problem:
            return problem
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return f"{path}: expected {' or '.join(map(str, kinds))}, got {_name(value)}"
    if "const" in schema and value != schema["const"]:
        return f"{path}: must be {shown(schema['const'])}"
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        return f"{path}: must be one of {shown(enum)}"
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            matches = sum(_check(value, o, root, path, depth + 1) is None for o in options)
            if matches == 0 or (key == "oneOf" and matches > 1):
                return f"{path}: matches {matches} of the {key} options"
    for option in schema.get("allOf") or ():
        problem = _check(value, option, root, path, depth + 1)
        if problem:
            return problem
    if isinstance(value, dict):
        return _check_object(value, schema, root, path, depth)
    if isinstance(value, list):
        return _check_array(value, schema, root, path, depth)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return f"{path}: shorter than {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{path}: longer than {schema['maxLength']} characters"
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            try:
                if re.search(pattern, value) is None:
                    return f"{path}: does not match {pattern!r}"
            except re.error:
                return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _check_number(value, schema, path)
    return None


def _check_object(
    value: dict[str, Any], schema: Mapping[str, Any], root: Mapping[str, Any], path: str, depth: int
) -> str | None:
    for name in schema.get("required") or ():
        if name not in value:
            return f"{path}: missing required property {name!r}"
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        where = f"{path}.{name}"
        if name in properties:
            problem = _check(item, properties[name], root, where, depth + 1)
        elif extra is False:
            problem = f"{path}: unexpected property {name!r}"
        else:
            problem = _check(item, extra, root, where, depth + 1)
        if problem:
            return problem
    return None


def _check_array(
    value: list[Any], schema: Mapping[str, Any], root: Mapping[str, Any], path: str, depth: int
) -> str | None:
    if len(value) < schema.get("minItems", 0):
        return f"{path}: fewer than {schema['minItems']} items"
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        return f"{path}: more than {schema['maxItems']} items"
    prefix = schema.get("prefixItems") or []
    for index, item in enumerate(value):
        sub = prefix[index] if index < len(prefix) else schema.get("items", True)
        problem = _check(item, sub, root, f"{path}[{index}]", depth + 1)
        if problem:
            return problem
    return None


def _check_number(value: float, schema: Mapping[str, Any], path: str) -> str | None:
    if "minimum" in schema and value < schema["minimum"]:
        return f"{path}: less than {schema['minimum']}"
    if "maximum" in schema and value > schema["maximum"]:
        return f"{path}: more than {schema['maximum']}"
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        return f"{path}: not more than {schema['exclusiveMinimum']}"
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        return f"{path}: not less than {schema['exclusiveMaximum']}"
    step = schema.get("multipleOf")
    if (
        isinstance(step, int | float)
        and step > 0
        and not math.isclose(value / step, round(value / step), abs_tol=1e-9)
    ):
        return f"{path}: not a multiple of {step}"
    return None


def _name(value: Any) -> str:
    for name, test in _TYPES.items():
        if name != "integer" and test(value):
            return name
    return type(value).__name__


def schema_errors(value: Any, schema: Mapping[str, Any]) -> str | None:
    """The first way ``value`` breaks ``schema`` (a path and a reason), or None."""
    return _check(value, schema, schema, "$", 0)


def parse_structured(text: str, schema: Mapping[str, Any]) -> tuple[Any, str | None]:
    """``(value, None)`` when ``text`` is JSON matching ``schema``, else ``(None, why)``."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        return None, f"the answer is not JSON ({why})"
    problem = schema_errors(value, schema)
    if problem is not None:
        return None, f"the answer does not match the schema: {problem}"
    return value, None
