"""
`empathy_models._regex_cost`, which tells how the time ``re`` takes to search a string with
a pattern can grow (the public behaviour is in ``test_schema_patterns.py``): the exponents
of common patterns, the parser it reads them with, and what it does without one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from empathy_models import _regex_cost as regex_cost
from empathy_models._jsonschema import parse_structured
from empathy_models.content import ResponseFormat

EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
DATE = r"^\d{4}-\d{2}-\d{2}$"


def test_the_cost_of_common_patterns() -> None:
    """Linear patterns are searched in strings of any length; the others have a bound."""
    costs = {
        r"^[a-z]+$": 1,
        r"\d{3}-\d{4}": 1,
        DATE: 1,
        r"^(foo|bar)+$": 1,
        r"^(\+\d{1,3})?\d+$": 1,
        EMAIL: 2,  # '[^@\s]+\.[^@\s]+' can split at any dot
        r"\w+@": 2,
        r"\d+$": 2,
        r"^\s*(.*?)\s*$": 3,
        r".*.*=": 3,
    }
    assert {p: regex_cost.pattern_cost(p) for p in costs} == {
        p: (exponent, None) for p, exponent in costs.items()
    }
    assert [regex_cost.length_limit(e) for e in (1, 2, 3)] == [2**63, 3162, 215]


@pytest.fixture
def no_parser(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A Python whose ``re`` has no parser this module can read."""
    monkeypatch.setattr(regex_cost, "_PARSER", None)
    regex_cost.pattern_cost.cache_clear()
    yield
    regex_cost.pattern_cost.cache_clear()


def test_python_s_parser_is_found() -> None:
    assert regex_cost._PARSER is not None and regex_cost._PARSER.__name__ == "re._parser"


@pytest.mark.usefixtures("no_parser")
def test_without_a_parser_patterns_are_accepted_and_searched_in_short_strings() -> None:
    ResponseFormat(schema={"type": "string", "pattern": r"^(a+)+$"})  # not read: not refused
    fmt = ResponseFormat(schema={"type": "string", "pattern": r"^[a-z]+$"})
    assert regex_cost.pattern_cost(r"^[a-z]+$") == (regex_cost.UNKNOWN_EXPONENT, None)
    assert parse_structured(json.dumps("a" * 215), fmt.schema) == ("a" * 215, None)
    assert "216 characters, over the 215" in (
        parse_structured('"' + "a" * 216 + '"', fmt.schema)[1] or ""
    )
