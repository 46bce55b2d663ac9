"""
Check a JSON body against the request ``TypedDict`` an official SDK declares for it:
every key must be one the SDK documents (``total=False`` keys optional, ``Required``
ones present), every value of a documented type, recursively through unions,
literals, lists and nested ``TypedDict``s.  Pydantic ignores unknown keys in a
``TypedDict``; this does not, so a misspelt or misplaced field fails.
"""

from __future__ import annotations

import collections.abc
import typing
from typing import Any

import typing_extensions


def _is_typeddict(kind: Any) -> bool:
    return typing_extensions.is_typeddict(kind)


def _strip(kind: Any) -> Any:
    while typing_extensions.get_origin(kind) in (
        typing_extensions.Required,
        typing_extensions.NotRequired,
        typing_extensions.Annotated,
        typing.Required,
        typing.NotRequired,
        typing.Annotated,
    ):
        kind = typing_extensions.get_args(kind)[0]
    return kind


def problems(value: Any, kind: Any, path: str = "$") -> list[str]:
    """Every way ``value`` breaks ``kind`` (empty when it conforms)."""
    kind = _strip(kind)
    if kind is Any or kind is object:
        return []
    if _is_typeddict(kind):
        if not isinstance(value, dict):
            return [f"{path}: expected an object for {kind.__name__}"]
        hints = typing_extensions.get_type_hints(kind, include_extras=True)
        found = [
            f"{path}.{key}: not a field of {kind.__name__}" for key in value if key not in hints
        ]
        found += [
            f"{path}.{key}: required by {kind.__name__}"
            for key in kind.__required_keys__
            if key not in value
        ]
        for key, item in value.items():
            if key in hints:
                found += problems(item, hints[key], f"{path}.{key}")
        return found
    origin = typing_extensions.get_origin(kind)
    args = typing_extensions.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        branches = [problems(value, arm, path) for arm in args]
        if any(not branch for branch in branches):
            return []
        return min(branches, key=len)
    if origin in (typing.Literal, typing_extensions.Literal):
        return [] if value in args else [f"{path}: {value!r} not in {args!r}"]
    if kind is type(None):
        return [] if value is None else [f"{path}: expected null"]
    if (
        origin
        in (
            list,
            collections.abc.Iterable,
            collections.abc.Sequence,
        )
        or getattr(kind, "__name__", "") == "SequenceNotStr"
    ):
        if not isinstance(value, list):
            return [f"{path}: expected an array"]
        item_kind = args[0] if args else Any
        return [
            p for i, item in enumerate(value) for p in problems(item, item_kind, f"{path}[{i}]")
        ]
    if origin in (dict, collections.abc.Mapping):
        return [] if isinstance(value, dict) else [f"{path}: expected an object"]
    if kind is str:
        return [] if isinstance(value, str) else [f"{path}: expected a string"]
    if kind is bool:
        return [] if isinstance(value, bool) else [f"{path}: expected a boolean"]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected an integer"]
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected a number"]
    if isinstance(kind, typing.TypeAliasType if hasattr(typing, "TypeAliasType") else ()):
        return problems(value, kind.__value__, path)
    if isinstance(kind, type):
        # a response model the SDK also accepts as a param: a JSON dict is not one
        return [] if isinstance(value, kind) else [f"{path}: not a {kind.__name__}"]
    return []  # a TypeVar or the like: not checked
