"""
The trace context of the call in flight (a leaf: stdlib only).

The executor's OpenTelemetry instrumentation (`empathy_models.observability`) sets
`outgoing_headers` to the ``traceparent`` (and ``tracestate``, baggage, whatever the
configured propagator writes) of the attempt span around each provider call; the HTTP
providers add them to that request.  ``None`` (the default, and always when tracing is
off) adds nothing: one context-variable read per request.

`background` starts a task that may outlive the call that started it (the breaker's
send of successes, the router's window slide and refresh, the batching backend's
flusher and spill, a change feed's watcher) in `untraced` context: the caller's
context variables without its trace context (`outgoing_headers`, and OpenTelemetry's
current context when an application loaded it), so the spans and log records of an
application's instrumentation in it join no run's trace.  The run's own trace state
(`_otel_spans._current`) is kept: it adds breaker events to the run's span only while
the run lasts.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine, Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import Any, TypeVar

__all__ = ["background", "outgoing_headers", "untraced"]

T = TypeVar("T")

outgoing_headers: ContextVar[Mapping[str, str] | None] = ContextVar(
    "empathy_models_outgoing_headers", default=None
)


def untraced() -> contextvars.Context | None:
    """
    A copy of the current context without its trace context: `outgoing_headers` and
    OpenTelemetry's current context (its spans and baggage) empty; ``None`` when both
    are empty already (the current context will do as it is).  Every other variable is
    kept.
    """
    otel = sys.modules.get("opentelemetry.context")  # loaded by whoever traces
    traced = otel is not None and bool(otel.get_current())
    if not traced and outgoing_headers.get() is None:
        return None
    context = contextvars.copy_context()
    context.run(_clear, otel if traced else None)
    return context


def _clear(otel: ModuleType | None) -> None:
    outgoing_headers.set(None)
    if otel is not None:
        otel.attach(otel.Context())  # never detached: this context is the task's alone


def background(coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """``coro`` as a task of the running loop, in `untraced` context."""
    return asyncio.get_running_loop().create_task(coro, name=name, context=untraced())
