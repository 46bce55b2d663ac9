"""
Task types and the model tier each one needs.

The vocabulary has 27 task types: nine cheap, ten capable and eight premium.  Task
names are normalized before lookup, so ``"FIX_BUG"``, ``"fix-bug"`` and ``"fix bug"``
all mean ``"fix_bug"``.  An unknown task gets the capable tier, and `is_known_task`
lets the caller see that it was a guess (the executor logs it) instead of the guess
being silent.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from types import MappingProxyType

from ._validators import shown
from .exceptions import ConfigurationError
from .records import ModelTier

__all__ = [
    "DEFAULT_TIER",
    "TASK_TIER_MAP",
    "TaskType",
    "get_tasks_for_tier",
    "get_tier_for_task",
    "is_known_task",
    "normalize_task_type",
]


class TaskType(enum.StrEnum):
    """The known task types; each value is its normalized name."""

    # cheap
    SUMMARIZE = "summarize"
    CLASSIFY = "classify"
    TRIAGE = "triage"
    MATCH_PATTERN = "match_pattern"
    EXTRACT_TOPICS = "extract_topics"
    LINT_CHECK = "lint_check"
    FORMAT_CODE = "format_code"
    SIMPLE_QA = "simple_qa"
    CATEGORIZE = "categorize"
    # capable
    GENERATE_CODE = "generate_code"
    FIX_BUG = "fix_bug"
    REVIEW_SECURITY = "review_security"
    ANALYZE_PERFORMANCE = "analyze_performance"
    WRITE_TESTS = "write_tests"
    REFACTOR = "refactor"
    EXPLAIN_CODE = "explain_code"
    DOCUMENT_CODE = "document_code"
    ANALYZE_ERROR = "analyze_error"
    SUGGEST_FIX = "suggest_fix"
    # premium
    COORDINATE = "coordinate"
    SYNTHESIZE_RESULTS = "synthesize_results"
    ARCHITECTURAL_DECISION = "architectural_decision"
    NOVEL_PROBLEM = "novel_problem"
    FINAL_REVIEW = "final_review"
    COMPLEX_REASONING = "complex_reasoning"
    MULTI_STEP_PLANNING = "multi_step_planning"
    CRITICAL_DECISION = "critical_decision"


DEFAULT_TIER = ModelTier.CAPABLE
"""The tier of a task type that is not in `TASK_TIER_MAP`."""

_CHEAP = (
    TaskType.SUMMARIZE,
    TaskType.CLASSIFY,
    TaskType.TRIAGE,
    TaskType.MATCH_PATTERN,
    TaskType.EXTRACT_TOPICS,
    TaskType.LINT_CHECK,
    TaskType.FORMAT_CODE,
    TaskType.SIMPLE_QA,
    TaskType.CATEGORIZE,
)
_CAPABLE = (
    TaskType.GENERATE_CODE,
    TaskType.FIX_BUG,
    TaskType.REVIEW_SECURITY,
    TaskType.ANALYZE_PERFORMANCE,
    TaskType.WRITE_TESTS,
    TaskType.REFACTOR,
    TaskType.EXPLAIN_CODE,
    TaskType.DOCUMENT_CODE,
    TaskType.ANALYZE_ERROR,
    TaskType.SUGGEST_FIX,
)
_PREMIUM = (
    TaskType.COORDINATE,
    TaskType.SYNTHESIZE_RESULTS,
    TaskType.ARCHITECTURAL_DECISION,
    TaskType.NOVEL_PROBLEM,
    TaskType.FINAL_REVIEW,
    TaskType.COMPLEX_REASONING,
    TaskType.MULTI_STEP_PLANNING,
    TaskType.CRITICAL_DECISION,
)

TASK_TIER_MAP: Mapping[str, ModelTier] = MappingProxyType(
    {
        **{task.value: ModelTier.CHEAP for task in _CHEAP},
        **{task.value: ModelTier.CAPABLE for task in _CAPABLE},
        **{task.value: ModelTier.PREMIUM for task in _PREMIUM},
    }
)
"""Read-only map from every known (normalized) task name to its tier."""

_SEPARATORS = re.compile(r"[\s\-_]+")


def normalize_task_type(task: str) -> str:
    """
    The canonical spelling of a task name.

    Lower case, with runs of spaces, hyphens and underscores turned into one underscore
    and none at either end: ``"FIX_BUG"``, ``"fix-bug"`` and ``" Fix  Bug "`` all give
    ``"fix_bug"``.  A `TaskType` gives its value.

    Raises:
        TypeError: for anything but a string.
    """
    if not isinstance(task, str):
        raise TypeError(f"task type must be a string, got {type(task).__name__}")
    if isinstance(task, TaskType):
        return task.value
    return _SEPARATORS.sub("_", task.strip().lower()).strip("_")


def is_known_task(task: str) -> bool:
    """True when ``task``, once normalized, is in `TASK_TIER_MAP`."""
    return normalize_task_type(task) in TASK_TIER_MAP


def get_tier_for_task(task: str) -> ModelTier:
    """
    The tier ``task`` needs; `DEFAULT_TIER` (capable) for a task that is not known.

    Use `is_known_task` to tell a mapped task from the default.
    """
    return TASK_TIER_MAP.get(normalize_task_type(task), DEFAULT_TIER)


def get_tasks_for_tier(tier: ModelTier | str) -> list[str]:
    """
    The known task names of ``tier`` (a `ModelTier` or its value in any case), sorted.

    Raises `ConfigurationError` for an unknown tier.
    """
    try:
        wanted = tier if isinstance(tier, ModelTier) else ModelTier(str(tier).strip().lower())
    except ValueError as exc:
        allowed = ", ".join(t.value for t in ModelTier)
        raise ConfigurationError(f"tier must be one of {allowed}, got {shown(tier)}") from exc
    return sorted(task for task, t in TASK_TIER_MAP.items() if t is wanted)
