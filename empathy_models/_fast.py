"""
Fast construction of frozen, slotted attrs classes for values the library built and
checked itself: no ``__init__``, converter, validator or default runs, each slot is set
as given (~0.1 µs a field instead of attrs' ~0.25 µs).  The call path builds its
records, responses, requests and verdicts this way (a routing explanation's rows, not
slotted, copy a shared ``__dict__`` instead: `routing._rows`); tests compare every
such builder with the validated constructor field by field.

Only for values already exactly as the public constructor would store them (UTC-aware
datetimes, enum members, tuples, read-only mappings, bounds checked).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar, cast

import attrs

__all__ = ["gc_paused", "trusted_constructor", "trusted_evolver"]

T = TypeVar("T")

_KEEP: Final = object()


def _generate(cls: type, what: str, signature: str, values: dict[str, str]) -> Any:
    """
    ``def {what}({signature})`` setting ``values``, its helpers (the slots' setters,
    ``object.__new__``, ``cls``, ``_KEEP``) bound as closure cells: not as parameters
    with defaults, which every keyword argument of a call would be matched against
    (about a quarter of the cost of a 34-field call, measured with `LLMCallRecord`).
    """
    setters = ", ".join(f"_s_{n}" for n in values)
    lines = [f"def _bind(_new, _cls, _K, {setters}):", f"    def {what}({signature}):"]
    lines.append("        self = _new(_cls)")
    lines.extend(f"        _s_{n}(self, {value})" for n, value in values.items())
    lines.append("        return self")
    lines.append(f"    return {what}")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), f"<{what} of {cls.__name__}>", "exec"), namespace)
    slots = [cls.__dict__[n].__set__ for n in values]
    return namespace["_bind"](object.__new__, cls, _KEEP, *slots)


def trusted_constructor(
    cls: type[T], *, skip: tuple[str, ...] = (), positional: bool = False
) -> Callable[..., T]:
    """
    A builder of ``cls`` taking every field but those in ``skip`` (left unset), all
    required: by keyword, or positionally in declaration order with
    ``positional=True``.  A field added to ``cls`` and not passed is a `TypeError`,
    never a silent default.
    """
    names = [a.name for a in attrs.fields(cast(Any, cls)) if a.name not in skip]
    params = ", ".join(names)
    signature = params if positional else f"*, {params}"
    built: Callable[..., T] = _generate(cls, "construct", signature, {n: n for n in names})
    return built


def trusted_evolver(cls: type[T]) -> Callable[..., T]:
    """
    ``attrs.evolve`` for ``cls`` without converters or validators: a copy of the
    instance (first argument) with the fields given by keyword replaced.
    """
    names = [a.name for a in attrs.fields(cast(Any, cls))]
    params = ", ".join(f"{n}=_K" for n in names)  # _K: `_KEEP` in the generated code
    values = {n: f"_old.{n} if {n} is _K else {n}" for n in names}
    evolve: Callable[..., T] = _generate(cls, "evolve", f"_old, *, {params}", values)
    return evolve


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """
    The cyclic garbage collector held off for a short block that builds many long-lived
    containers at once (a router's start: a row, then a bucket, then a list per evidence
    bucket, tens of thousands).  Otherwise a collection starts every 700 allocations,
    and every tenth of every tenth walks all the objects built so far: a third of the
    read of a week's evidence, 15-30% of a start over 1M stored calls.  What the block
    built is collected as usual after it; a collector already disabled stays so.  The
    whole process (other tasks, other threads) runs without automatic collections
    meanwhile: keep the block to the bulk work (one read, one conversion).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
