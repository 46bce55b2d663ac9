"""
empathy-models: async LLM calls that stay dependable and cheap in production.

One executor (``await executor.run(prompt, context)``) picks a model per workflow stage
from recorded telemetry, guards every provider with a circuit breaker that can be shared
by every worker, retries and falls back with intent, and records every call with its
tokens and cost.  Every name exported here is public and stable; anything else is
private.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import typing

import attrs

from ._version import __version__ as __version__
from .abc import (
    AsyncResource as AsyncResource,
    CircuitStateStore as CircuitStateStore,
    Completion as Completion,
    CompletionRequest as CompletionRequest,
    CompletionStream as CompletionStream,
    Message as Message,
    Provider as Provider,
    QuotaStore as QuotaStore,
    ResponseCache as ResponseCache,
    TelemetryBackend as TelemetryBackend,
    TransactionalStateStore as TransactionalStateStore,
)
from .auth import (
    AUTH_STRATEGY_FILE as AUTH_STRATEGY_FILE,
    AuthCostEstimate as AuthCostEstimate,
    AuthFileError as AuthFileError,
    AuthMode as AuthMode,
    AuthStrategy as AuthStrategy,
    LinesOfCodeReport as LinesOfCodeReport,
    SourceFileError as SourceFileError,
    SubscriptionTier as SubscriptionTier,
    acount_lines_of_code as acount_lines_of_code,
    auth_strategy_file as auth_strategy_file,
    count_lines_of_code as count_lines_of_code,
    empathy_home as empathy_home,
    get_module_size_category as get_module_size_category,
    list_auth_strategy_backups as list_auth_strategy_backups,
    reset_auth_strategy as reset_auth_strategy,
    restore_auth_strategy as restore_auth_strategy,
)
from .backends import (
    MemoryStateStore as MemoryStateStore,
    MemoryTelemetryBackend as MemoryTelemetryBackend,
    NullStateStore as NullStateStore,
    NullTelemetryBackend as NullTelemetryBackend,
    state_store_from_url as state_store_from_url,
    telemetry_from_url as telemetry_from_url,
)
from .backends.batching import BatchingTelemetryBackend as BatchingTelemetryBackend
from .backends.sqlite import (
    SQLiteStateStore as SQLiteStateStore,
    SQLiteTelemetryBackend as SQLiteTelemetryBackend,
)
from .breaker import (
    BreakerEvent as BreakerEvent,
    BreakerEventKind as BreakerEventKind,
    CircuitBreaker as CircuitBreaker,
)
from .cache import cache_from_url as cache_from_url
from .circuit import BreakerPolicy as BreakerPolicy
from .content import (
    ContentBlock as ContentBlock,
    ImageBlock as ImageBlock,
    ResponseFormat as ResponseFormat,
    TextBlock as TextBlock,
    Tool as Tool,
    ToolCall as ToolCall,
    ToolCallDelta as ToolCallDelta,
    ToolResult as ToolResult,
)
from .exceptions import (
    AllRoutesFailedError as AllRoutesFailedError,
    AuthenticationError as AuthenticationError,
    BackendClosedError as BackendClosedError,
    BackendError as BackendError,
    BudgetExceededError as BudgetExceededError,
    CircuitOpenError as CircuitOpenError,
    ConfigurationError as ConfigurationError,
    ContentPolicyError as ContentPolicyError,
    ContextWindowExceededError as ContextWindowExceededError,
    EmpathyModelsError as EmpathyModelsError,
    InvalidRequestError as InvalidRequestError,
    InvalidResponseError as InvalidResponseError,
    MissingAPIKeyError as MissingAPIKeyError,
    ModelNotFoundError as ModelNotFoundError,
    NoModelMeetsConstraintsError as NoModelMeetsConstraintsError,
    NotOpenError as NotOpenError,
    OverloadedError as OverloadedError,
    ProviderConnectionError as ProviderConnectionError,
    ProviderError as ProviderError,
    ProviderTimeoutError as ProviderTimeoutError,
    RateLimitedError as RateLimitedError,
    RecordValidationError as RecordValidationError,
    SchemaVersionError as SchemaVersionError,
    ServerError as ServerError,
    StateStoreError as StateStoreError,
    StreamInterruptedError as StreamInterruptedError,
    TelemetryError as TelemetryError,
    TelemetryRejectedError as TelemetryRejectedError,
)
from .executor import (
    AttemptSummary as AttemptSummary,
    EmpathyLLMExecutor as EmpathyLLMExecutor,
    ExecutionContext as ExecutionContext,
    FallbackPolicy as FallbackPolicy,
    LLMResponse as LLMResponse,
    MissingAPIKeyWarning as MissingAPIKeyWarning,
    TelemetryDisabledWarning as TelemetryDisabledWarning,
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
    Admission as Admission,
    CandidateEvaluation as CandidateEvaluation,
    CircuitBreakerState as CircuitBreakerState,
    CircuitState as CircuitState,
    ConstraintStatus as ConstraintStatus,
    LLMCallRecord as LLMCallRecord,
    ModelPerformance as ModelPerformance,
    ModelTier as ModelTier,
    Outcome as Outcome,
    OutcomeReport as OutcomeReport,
    RoutingDecision as RoutingDecision,
    Ticket as Ticket,
    wilson_interval as wilson_interval,
)
from .registry import ModelInfo as ModelInfo, ModelRegistry as ModelRegistry
from .retry import RetryPolicy as RetryPolicy
from .router import (
    AdaptiveModelRouter as AdaptiveModelRouter,
    RoutingPolicy as RoutingPolicy,
    RoutingStats as RoutingStats,
    TierRecommendation as TierRecommendation,
)
from .routing.reports import ModelStats as ModelStats
from .streaming import LLMStream as LLMStream
from .tasks import (
    TaskType as TaskType,
    get_tier_for_task as get_tier_for_task,
    is_known_task as is_known_task,
    normalize_task_type as normalize_task_type,
)

__all__ = [
    "AUTH_STRATEGY_FILE",
    "AdaptiveModelRouter",
    "Admission",
    "AllRoutesFailedError",
    "AnthropicProvider",
    "AsyncResource",
    "AttemptSummary",
    "AuthCostEstimate",
    "AuthFileError",
    "AuthMode",
    "AuthStrategy",
    "AuthenticationError",
    "BackendClosedError",
    "BackendError",
    "BatchingTelemetryBackend",
    "BreakerEvent",
    "BreakerEventKind",
    "BreakerPolicy",
    "Budget",
    "BudgetExceededError",
    "CandidateEvaluation",
    "CircuitBreaker",
    "CircuitBreakerState",
    "CircuitOpenError",
    "CircuitState",
    "CircuitStateStore",
    "Completion",
    "CompletionRequest",
    "CompletionStream",
    "ConfigurationError",
    "ConstraintStatus",
    "ContentBlock",
    "ContentPolicyError",
    "ContextWindowExceededError",
    "EmpathyLLMExecutor",
    "EmpathyModelsError",
    "ExecutionContext",
    "FallbackPolicy",
    "ImageBlock",
    "InvalidRequestError",
    "InvalidResponseError",
    "LLMCallRecord",
    "LLMResponse",
    "LLMStream",
    "LinesOfCodeReport",
    "MemoryStateStore",
    "MemoryTelemetryBackend",
    "Message",
    "MissingAPIKeyError",
    "MissingAPIKeyWarning",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelPerformance",
    "ModelRegistry",
    "ModelStats",
    "ModelTier",
    "NoModelMeetsConstraintsError",
    "NotOpenError",
    "NullStateStore",
    "NullTelemetryBackend",
    "OpenAIProvider",
    "Outcome",
    "OutcomeReport",
    "OverloadedError",
    "Provider",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderTimeoutError",
    "QuotaStore",
    "RateLimit",
    "RateLimitedError",
    "RecordValidationError",
    "ResponseCache",
    "ResponseFormat",
    "RetryPolicy",
    "RoutingDecision",
    "RoutingPolicy",
    "RoutingStats",
    "SQLiteStateStore",
    "SQLiteTelemetryBackend",
    "SchemaVersionError",
    "ServerError",
    "SourceFileError",
    "StateStoreError",
    "StreamInterruptedError",
    "SubscriptionTier",
    "TaskType",
    "TelemetryBackend",
    "TelemetryDisabledWarning",
    "TelemetryError",
    "TelemetryRejectedError",
    "TextBlock",
    "Ticket",
    "TierRecommendation",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolResult",
    "TransactionalStateStore",
    "acount_lines_of_code",
    "auth_strategy_file",
    "cache_from_url",
    "count_lines_of_code",
    "empathy_home",
    "get_module_size_category",
    "get_tier_for_task",
    "is_known_task",
    "list_auth_strategy_backups",
    "normalize_task_type",
    "quota_store_from_url",
    "reset_auth_strategy",
    "restore_auth_strategy",
    "state_store_from_url",
    "telemetry_from_url",
    "wilson_interval",
]


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
    own = inspect.get_annotations(cls)
    if not any(isinstance(value, str) for value in own.values()):
        return
    resolved = typing.get_type_hints(cls, include_extras=True)
    cls.__annotations__ = {name: resolved[name] for name in own}


def _publish() -> None:
    # Present public objects as ``empathy_models.X`` in reprs, tracebacks and docs.
    namespace = globals()
    public = [
        namespace[name]
        for name in __all__
        if getattr(namespace[name], "__module__", "").startswith("empathy_models.")
    ]
    # first resolve every annotation while each class's defining module is still known
    # (bases included: get_type_hints reads each base's annotations in its __module__)
    for obj in public:
        if isinstance(obj, type):
            for cls in obj.__mro__:
                if cls.__module__.startswith("empathy_models"):
                    _resolve_annotations(cls)
        if attrs.has(obj):
            attrs.resolve_types(obj)
    for obj in public:
        with contextlib.suppress(AttributeError, TypeError):
            obj.__module__ = __name__


_publish()
