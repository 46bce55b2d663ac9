"""
The trace-context headers of the attempt in flight (a leaf: stdlib only).

The executor's OpenTelemetry instrumentation (`empathy_models.observability`) sets
`outgoing_headers` to the ``traceparent`` (and ``tracestate``, baggage, whatever the
configured propagator writes) of the attempt span around each provider call; the HTTP
providers add them to that request.  ``None`` (the default, and always when tracing is
off) adds nothing: one context-variable read per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar

__all__ = ["outgoing_headers"]

outgoing_headers: ContextVar[Mapping[str, str] | None] = ContextVar(
    "empathy_models_outgoing_headers", default=None
)
