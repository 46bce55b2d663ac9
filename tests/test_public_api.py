"""Guards the public surface: ``empathy_models.__all__`` is sorted, complete and public."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import empathy_models


def test_all_is_sorted_and_unique() -> None:
    assert list(empathy_models.__all__) == sorted(set(empathy_models.__all__))


def test_every_name_in_all_exists_and_is_public() -> None:
    for name in empathy_models.__all__:
        assert not name.startswith("_"), name
        assert hasattr(empathy_models, name), name


def test_every_public_class_or_function_is_exported() -> None:
    exported = set(empathy_models.__all__)
    missing = [
        name
        for name, obj in vars(empathy_models).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", "").startswith("empathy_models")
        and name not in exported
    ]
    assert missing == []


def test_public_names_present_as_package_members() -> None:
    for name in empathy_models.__all__:
        obj = getattr(empathy_models, name)
        if inspect.isclass(obj):
            assert obj.__module__ == "empathy_models", name


def test_submodule_all_lists_only_defined_names() -> None:
    for module_name in (
        "empathy_models.exceptions",
        "empathy_models.records",
        "empathy_models.abc",
        "empathy_models.circuit",
        "empathy_models.serialization",
        "empathy_models.backends",
    ):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert hasattr(module, name), f"{module_name}.{name}"


def test_import_from_a_fresh_interpreter_shows_the_api() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import empathy_models; print(empathy_models.__all__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("LLMCallRecord", "TelemetryBackend", "CircuitStateStore", "EmpathyModelsError"):
        assert name in out


def test_type_hints_resolve_on_every_public_class() -> None:
    # users' tools (cattrs, pydantic, doc generators) call get_type_hints on our classes,
    # which reads annotations in the class's __module__ (rewritten to "empathy_models")
    import typing

    from empathy_models import ExecutionContext, LLMCallRecord

    failures: dict[str, str] = {}
    checked = 0
    for name in empathy_models.__all__:
        obj = getattr(empathy_models, name)
        if inspect.isclass(obj):
            checked += 1
            try:
                typing.get_type_hints(obj)
            except Exception as exc:  # the test reports every class that fails
                failures[name] = f"{type(exc).__name__}: {exc}"
    assert failures == {}
    assert checked > 50
    from datetime import datetime

    assert typing.get_type_hints(LLMCallRecord)["timestamp"] is datetime
    assert "metadata" in typing.get_type_hints(ExecutionContext)
