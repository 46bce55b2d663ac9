"""
empathy-models: async LLM calls that stay dependable and cheap in production.

One executor (``await executor.run(prompt, context)``) picks a model per workflow stage
from recorded telemetry, guards every provider with a circuit breaker that can be shared
by every worker, retries and falls back with intent, and records every call with its
tokens and cost.  The names exported here are what a user needs; implementers' types
live in `empathy_models.abc`, the whole error tree in `empathy_models.exceptions`, and
each other concern in its public module (ARCHITECTURE.md, "Public API").  A module or
name with a ``_``-prefixed part is private.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import typing
import warnings

from ._version import __version__ as __version__

if typing.TYPE_CHECKING:
    from ._executor import (
        AttemptSummary as AttemptSummary,
        EmpathyLLMExecutor as EmpathyLLMExecutor,
        ExecutionContext as ExecutionContext,
        FallbackPolicy as FallbackPolicy,
        LLMResponse as LLMResponse,
        MissingAPIKeyWarning as MissingAPIKeyWarning,
        Prompt as Prompt,
        TelemetryDisabledWarning as TelemetryDisabledWarning,
    )
    from ._router import (
        AdaptiveModelRouter as AdaptiveModelRouter,
        RoutingPolicy as RoutingPolicy,
    )
    from .abc import (
        Message as Message,
    )
    from .backends import (
        state_store_from_url as state_store_from_url,
        telemetry_from_url as telemetry_from_url,
    )
    from .breaker import (
        CircuitBreaker as CircuitBreaker,
    )
    from .cache import (
        cache_from_url as cache_from_url,
    )
    from .circuit import (
        BreakerPolicy as BreakerPolicy,
    )
    from .content import (
        Tool as Tool,
    )
    from .exceptions import (
        AllRoutesFailedError as AllRoutesFailedError,
        BackendError as BackendError,
        BudgetExceededError as BudgetExceededError,
        CircuitOpenError as CircuitOpenError,
        ConfigurationError as ConfigurationError,
        ConfigurationWarning as ConfigurationWarning,
        EmpathyModelsError as EmpathyModelsError,
        NoModelMeetsConstraintsError as NoModelMeetsConstraintsError,
        NotOpenError as NotOpenError,
        ProviderError as ProviderError,
        RateLimitedError as RateLimitedError,
        StreamInterruptedError as StreamInterruptedError,
    )
    from .limits import (
        Budget as Budget,
        RateLimit as RateLimit,
        quota_store_from_url as quota_store_from_url,
    )
    from .providers import (
        AnthropicProvider as AnthropicProvider,
        OpenAIProvider as OpenAIProvider,
    )
    from .records import (
        CircuitState as CircuitState,
        LLMCallRecord as LLMCallRecord,
        ModelTier as ModelTier,
        Outcome as Outcome,
        RoutingDecision as RoutingDecision,
    )
    from .registry import (
        ModelInfo as ModelInfo,
        ModelRegistry as ModelRegistry,
    )
    from .retry import (
        RetryPolicy as RetryPolicy,
    )
    from .streaming import (
        LLMStream as LLMStream,
    )
    from .sync import (
        SyncExecutor as SyncExecutor,
    )

__all__ = [
    "AdaptiveModelRouter",
    "AllRoutesFailedError",
    "AnthropicProvider",
    "AttemptSummary",
    "BackendError",
    "BreakerPolicy",
    "Budget",
    "BudgetExceededError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "ConfigurationError",
    "ConfigurationWarning",
    "EmpathyLLMExecutor",
    "EmpathyModelsError",
    "ExecutionContext",
    "FallbackPolicy",
    "LLMCallRecord",
    "LLMResponse",
    "LLMStream",
    "Message",
    "MissingAPIKeyWarning",
    "ModelInfo",
    "ModelRegistry",
    "ModelTier",
    "NoModelMeetsConstraintsError",
    "NotOpenError",
    "OpenAIProvider",
    "Outcome",
    "Prompt",
    "ProviderError",
    "RateLimit",
    "RateLimitedError",
    "RetryPolicy",
    "RoutingDecision",
    "RoutingPolicy",
    "StreamInterruptedError",
    "SyncExecutor",
    "TelemetryDisabledWarning",
    "Tool",
    "cache_from_url",
    "quota_store_from_url",
    "state_store_from_url",
    "telemetry_from_url",
]

# Where each top-level name is defined: imported on first use (``import empathy_models``
# loads none of them), then kept in this module's namespace.
_TOP: dict[str, str] = {
    "AdaptiveModelRouter": "empathy_models._router",
    "AllRoutesFailedError": "empathy_models.exceptions",
    "AnthropicProvider": "empathy_models.providers",
    "AttemptSummary": "empathy_models._executor",
    "BackendError": "empathy_models.exceptions",
    "BreakerPolicy": "empathy_models.circuit",
    "Budget": "empathy_models.limits",
    "BudgetExceededError": "empathy_models.exceptions",
    "CircuitBreaker": "empathy_models.breaker",
    "CircuitOpenError": "empathy_models.exceptions",
    "CircuitState": "empathy_models.records",
    "ConfigurationError": "empathy_models.exceptions",
    "ConfigurationWarning": "empathy_models.exceptions",
    "EmpathyLLMExecutor": "empathy_models._executor",
    "EmpathyModelsError": "empathy_models.exceptions",
    "ExecutionContext": "empathy_models._executor",
    "FallbackPolicy": "empathy_models._executor",
    "LLMCallRecord": "empathy_models.records",
    "LLMResponse": "empathy_models._executor",
    "LLMStream": "empathy_models.streaming",
    "Message": "empathy_models.abc",
    "MissingAPIKeyWarning": "empathy_models._executor",
    "ModelInfo": "empathy_models.registry",
    "ModelRegistry": "empathy_models.registry",
    "ModelTier": "empathy_models.records",
    "NoModelMeetsConstraintsError": "empathy_models.exceptions",
    "NotOpenError": "empathy_models.exceptions",
    "OpenAIProvider": "empathy_models.providers",
    "Outcome": "empathy_models.records",
    "Prompt": "empathy_models._executor",
    "ProviderError": "empathy_models.exceptions",
    "RateLimit": "empathy_models.limits",
    "RateLimitedError": "empathy_models.exceptions",
    "RetryPolicy": "empathy_models.retry",
    "RoutingDecision": "empathy_models.records",
    "RoutingPolicy": "empathy_models._router",
    "StreamInterruptedError": "empathy_models.exceptions",
    "SyncExecutor": "empathy_models.sync",
    "TelemetryDisabledWarning": "empathy_models._executor",
    "Tool": "empathy_models.content",
    "cache_from_url": "empathy_models.cache",
    "quota_store_from_url": "empathy_models.limits",
    "state_store_from_url": "empathy_models.backends",
    "telemetry_from_url": "empathy_models.backends",
}

# Names the top level no longer exports, and their public home.  They still import from
# here, with a DeprecationWarning naming that home.
_MOVED: dict[str, str] = {
    "AUTH_STRATEGY_FILE": "empathy_models.auth",
    "Admission": "empathy_models.records",
    "AsyncResource": "empathy_models.abc",
    "AuthCostEstimate": "empathy_models.auth",
    "AuthFileError": "empathy_models.exceptions",
    "AuthMode": "empathy_models.auth",
    "AuthStrategy": "empathy_models.auth",
    "AuthenticationError": "empathy_models.exceptions",
    "BackendClosedError": "empathy_models.exceptions",
    "BatchingTelemetryBackend": "empathy_models.backends.batching",
    "BreakerEvent": "empathy_models.breaker",
    "BreakerEventKind": "empathy_models.breaker",
    "CandidateEvaluation": "empathy_models.records",
    "CircuitBreakerState": "empathy_models.records",
    "CircuitStateStore": "empathy_models.abc",
    "Completion": "empathy_models.abc",
    "CompletionRequest": "empathy_models.abc",
    "CompletionStream": "empathy_models.abc",
    "ConstraintStatus": "empathy_models.records",
    "ContentBlock": "empathy_models.content",
    "ContentPolicyError": "empathy_models.exceptions",
    "ContextWindowExceededError": "empathy_models.exceptions",
    "ImageBlock": "empathy_models.content",
    "InvalidRequestError": "empathy_models.exceptions",
    "InvalidResponseError": "empathy_models.exceptions",
    "LinesOfCodeReport": "empathy_models.auth",
    "MemoryStateStore": "empathy_models.backends",
    "MemoryTelemetryBackend": "empathy_models.backends",
    "MissingAPIKeyError": "empathy_models.exceptions",
    "ModelNotFoundError": "empathy_models.exceptions",
    "ModelPerformance": "empathy_models.records",
    "ModelStats": "empathy_models.routing",
    "NullStateStore": "empathy_models.backends",
    "NullTelemetryBackend": "empathy_models.backends",
    "OutcomeReport": "empathy_models.records",
    "OverloadedError": "empathy_models.exceptions",
    "Provider": "empathy_models.abc",
    "ProviderConnectionError": "empathy_models.exceptions",
    "ProviderTimeoutError": "empathy_models.exceptions",
    "QuotaStore": "empathy_models.abc",
    "RecordValidationError": "empathy_models.exceptions",
    "ResponseCache": "empathy_models.abc",
    "ResponseFormat": "empathy_models.content",
    "RoutingStats": "empathy_models.routing",
    "SQLiteStateStore": "empathy_models.backends.sqlite",
    "SQLiteTelemetryBackend": "empathy_models.backends.sqlite",
    "SchemaVersionError": "empathy_models.exceptions",
    "ServerError": "empathy_models.exceptions",
    "SourceFileError": "empathy_models.exceptions",
    "StateStoreError": "empathy_models.exceptions",
    "SubscriptionTier": "empathy_models.auth",
    "TaskType": "empathy_models.tasks",
    "TelemetryBackend": "empathy_models.abc",
    "TelemetryError": "empathy_models.exceptions",
    "TelemetryRejectedError": "empathy_models.exceptions",
    "TextBlock": "empathy_models.content",
    "Ticket": "empathy_models.records",
    "TierRecommendation": "empathy_models.routing",
    "ToolCall": "empathy_models.content",
    "ToolCallDelta": "empathy_models.content",
    "ToolResult": "empathy_models.content",
    "TransactionalStateStore": "empathy_models.abc",
    "acount_lines_of_code": "empathy_models.auth",
    "auth_strategy_file": "empathy_models.auth",
    "count_lines_of_code": "empathy_models.auth",
    "empathy_home": "empathy_models.auth",
    "get_module_size_category": "empathy_models.auth",
    "get_tier_for_task": "empathy_models.tasks",
    "is_known_task": "empathy_models.tasks",
    "list_auth_strategy_backups": "empathy_models.auth",
    "normalize_task_type": "empathy_models.tasks",
    "reset_auth_strategy": "empathy_models.auth",
    "restore_auth_strategy": "empathy_models.auth",
    "wilson_interval": "empathy_models.records",
}


# A library leaves logging to the application: without a handler of its own, records
# of the ``empathy_models.*`` loggers reach only what the application configured (the
# CLI's ``-v`` / ``--log-level``, ``logging.basicConfig``, ...).
logging.getLogger(__name__).addHandler(logging.NullHandler())


def _resolve_annotations(cls: type) -> None:
    """
    Replace ``cls``'s own string annotations by the objects they name, evaluated in the
    module that defines it, so `typing.get_type_hints` (cattrs, pydantic, doc tools)
    works once ``__module__`` no longer points there.
    """
    import inspect  # only when a top-level name is first used

    own = inspect.get_annotations(cls)
    if not any(isinstance(value, str) for value in own.values()):
        return
    resolved = typing.get_type_hints(cls, include_extras=True)
    cls.__annotations__ = {name: resolved[name] for name in own}


def _publish(obj: object) -> None:
    """Present a top-level object as ``empathy_models.X`` in reprs, tracebacks and docs."""
    if not getattr(obj, "__module__", "").startswith("empathy_models."):
        return
    # first resolve every annotation while the class's defining module is still known
    # (bases included: get_type_hints reads each base's annotations in its __module__)
    if isinstance(obj, type):
        import attrs  # only when a top-level name is first used

        for cls in obj.__mro__:
            if cls.__module__.startswith("empathy_models"):
                _resolve_annotations(cls)
        if attrs.has(obj):
            attrs.resolve_types(obj)
    with contextlib.suppress(AttributeError, TypeError):
        obj.__module__ = __name__


def _load(name: str) -> object:
    """Import the top-level name ``name`` from where it is defined, once."""
    obj = getattr(importlib.import_module(_TOP[name]), name)
    _publish(obj)
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


if not typing.TYPE_CHECKING:
    # hidden from type checkers, so that a name missing from the top level is an error
    # there rather than an ``object``

    def __getattr__(name: str) -> object:
        if name in _TOP:
            return _load(name)
        home = _MOVED.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        warnings.warn(
            f"empathy_models.{name} has moved: import it from {home} "
            f"(from {home} import {name}); the top-level name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), name)
