"""Task types: normalization, the tier of each task, and the visible default for unknown ones."""

from __future__ import annotations

import pytest

from empathy_models import ModelTier
from empathy_models.tasks import (
    DEFAULT_TIER,
    TASK_TIER_MAP,
    TaskType,
    get_tasks_for_tier,
    get_tier_for_task,
    is_known_task,
    normalize_task_type,
)


@pytest.mark.parametrize(
    "spelling", ["fix_bug", "FIX_BUG", "fix-bug", "fix bug", "  Fix  Bug ", "fix__bug", "-fix-bug-"]
)
def test_normalization(spelling: str) -> None:
    assert normalize_task_type(spelling) == "fix_bug"
    assert get_tier_for_task(spelling) is ModelTier.CAPABLE
    assert is_known_task(spelling)


def test_task_type_enum_normalizes_to_its_value() -> None:
    assert normalize_task_type(TaskType.MULTI_STEP_PLANNING) == "multi_step_planning"
    assert get_tier_for_task(TaskType.SUMMARIZE) is ModelTier.CHEAP


def test_vocabulary_matches_the_original() -> None:
    assert len(TaskType) == 27
    assert len(get_tasks_for_tier(ModelTier.CHEAP)) == 9
    assert len(get_tasks_for_tier(ModelTier.CAPABLE)) == 10
    assert len(get_tasks_for_tier(ModelTier.PREMIUM)) == 8
    assert set(TASK_TIER_MAP) == {t.value for t in TaskType}


@pytest.mark.parametrize(
    ("task", "tier"),
    [
        ("summarize", ModelTier.CHEAP),
        ("Simple QA", ModelTier.CHEAP),
        ("review-security", ModelTier.CAPABLE),
        ("WRITE_TESTS", ModelTier.CAPABLE),
        ("architectural decision", ModelTier.PREMIUM),
        ("critical_decision", ModelTier.PREMIUM),
    ],
)
def test_tiers(task: str, tier: ModelTier) -> None:
    assert get_tier_for_task(task) is tier


def test_unknown_task_defaults_to_capable_but_is_detectable() -> None:
    assert DEFAULT_TIER is ModelTier.CAPABLE
    assert get_tier_for_task("write a sonnet") is ModelTier.CAPABLE
    assert not is_known_task("write a sonnet")
    assert not is_known_task("")


def test_tasks_for_tier_accepts_strings_and_rejects_unknown_tiers() -> None:
    assert get_tasks_for_tier("Premium") == sorted(
        t for t, tier in TASK_TIER_MAP.items() if tier is ModelTier.PREMIUM
    )
    with pytest.raises(ValueError, match="gold"):
        get_tasks_for_tier("gold")


def test_map_is_read_only() -> None:
    with pytest.raises(TypeError):
        TASK_TIER_MAP["new"] = ModelTier.CHEAP  # type: ignore[index]


def test_non_strings_are_rejected() -> None:
    with pytest.raises(TypeError):
        normalize_task_type(3)  # type: ignore[arg-type]
