"""
The official ``openai`` and ``anthropic`` SDKs, imported when a test first reads one
of their attributes: importing them builds a few thousand pydantic models (about 3 s
of CPU), which every pytest-xdist worker would pay while collecting, whether or not it
runs a test that uses them.  Modules that use them import the real SDKs for the type
checker only::

    if TYPE_CHECKING:
        import anthropic
        import openai
    else:
        from ._sdks import anthropic, openai
"""

from __future__ import annotations

import importlib
from typing import Any


class _Lazy:
    """
    Stands for the module ``name``: a public attribute read imports it.  Private names
    (pytest looks for markers such as ``_fixture_function_marker`` on every name of a
    test module while it collects) are not there, so collecting imports nothing.
    """

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<the {self._name} SDK, imported when first used>"


openai = _Lazy("openai")
anthropic = _Lazy("anthropic")
