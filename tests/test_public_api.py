"""
Guards the public surface: the top level (``empathy_models.__all__``) is the short list
ARCHITECTURE.md documents, imported lazily; every public module (no ``_``-prefixed part
in its dotted path) has an ``__all__`` whose names resolve; the names that left the top
level still import from there, with a DeprecationWarning naming their home.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

import empathy_models

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "empathy_models"


def _public_module_names() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__" or any(part.startswith("_") for part in parts):
            continue
        out.append(".".join(parts))
    return out


def _public_modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in _public_module_names()]


def _documented_top_level() -> set[str]:
    # the "Top level" table of ARCHITECTURE.md's "Public API" section
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Public API", 1)[1].split("**Public modules**", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # no header
    return {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[2])}


def _documented_modules() -> list[ModuleType]:
    # the modules the "Public modules" table of ARCHITECTURE.md names
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("**Public modules**", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    names = {name for row in rows for name in re.findall(r"`(empathy_models[\w.]*)`", row)}
    return [importlib.import_module(name) for name in sorted(names)]


def test_all_is_sorted_and_unique() -> None:
    assert list(empathy_models.__all__) == sorted(set(empathy_models.__all__))


def test_every_name_in_all_exists_and_is_public() -> None:
    for name in empathy_models.__all__:
        assert not name.startswith("_"), name
        assert hasattr(empathy_models, name), name


def test_the_top_level_is_the_documented_short_list() -> None:
    documented = _documented_top_level()
    assert set(empathy_models.__all__) == documented
    assert 35 <= len(documented) <= 45
    public_in_dir = {
        name
        for name in dir(empathy_models)
        if not name.startswith("_") and not isinstance(getattr(empathy_models, name), ModuleType)
    }
    assert public_in_dir == documented


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


def test_every_public_module_has_an_all_whose_names_resolve() -> None:
    names = _public_module_names()
    assert len(names) > 40
    for module in _public_modules():
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{module.__name__} has no __all__"
        assert len(exported) == len(set(exported)), module.__name__
        for name in exported:
            assert not name.startswith("_"), f"{module.__name__}.{name}"
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_names_that_left_the_top_level_resolve_with_a_deprecation_warning() -> None:
    moved: dict[str, str] = empathy_models._MOVED
    assert len(moved) > 70
    assert not set(moved) & set(empathy_models.__all__)
    for name, home in moved.items():
        module = importlib.import_module(home)
        assert name in module.__all__, f"{home}.{name}"
        with pytest.warns(DeprecationWarning, match=re.escape(f"from {home} import {name}")):
            obj = getattr(empathy_models, name)
        assert obj is getattr(module, name)
        assert name not in dir(empathy_models)
    # still importable with ``from empathy_models import ...``, every time
    for _ in range(2):
        with pytest.warns(DeprecationWarning, match="empathy_models.records"):
            from empathy_models import Admission  # type: ignore[attr-defined]
    assert Admission is importlib.import_module("empathy_models.records").Admission


def test_an_unknown_name_is_an_attribute_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no_such_name"):
            _ = empathy_models.no_such_name  # type: ignore[attr-defined]


def _may_import(text: str, moved: set[str]) -> bool:
    """
    Whether ``text`` spells an import of one of ``moved`` from the top level: a ``from
    empathy_models import`` naming one, or ``empathy_models.NAME`` (or an alias's).  A
    superset of what its syntax tree holds (strings and comments count here), read
    without parsing.
    """
    for statement in re.finditer(
        r"^[ \t]*from[ \t]+empathy_models[ \t]+import[ \t]*(\([^)]*\)|.*)$", text, re.M
    ):
        if set(re.findall(r"\w+", statement.group(1))) & moved:
            return True
    aliases = {
        "empathy_models",
        *re.findall(r"\bimport[ \t]+empathy_models[ \t]+as[ \t]+(\w+)", text),
    }
    return any(
        owner in aliases and name in moved for owner, name in re.findall(r"\b(\w+)\.(\w+)", text)
    )


@pytest.mark.slow
def test_nothing_in_the_repository_imports_a_moved_name_from_the_top_level() -> None:
    moved = set(empathy_models._MOVED)
    sources = [
        path
        for folder in ("empathy_models", "tests", "benchmarks", "backends")
        for path in (ROOT / folder).rglob("*.py")
        # not hidden folders: environments such as benchmarks/.peers/ (LiteLLM's venv)
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    ]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M)
    texts = [(str(path), path.read_text(encoding="utf-8")) for path in sources]
    texts += [(f"README.md block {i}", code) for i, code in enumerate(blocks)]
    found = []
    for where, text in texts:
        if not _may_import(text, moved):
            continue  # parsed only where the text spells such an import (parsing is slow)
        aliases = {"empathy_models"}
        nodes = list(ast.walk(ast.parse(text)))
        for node in nodes:
            if isinstance(node, ast.Import):
                aliases.update(
                    a.asname for a in node.names if a.name == "empathy_models" and a.asname
                )
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module == "empathy_models":
                found += [f"{where}: {a.name}" for a in node.names if a.name in moved]
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr in moved
            ):
                found.append(f"{where}: {node.value.id}.{node.attr}")
    # the deprecation test above reaches them on purpose
    found = [entry for entry in found if not entry.startswith(str(Path(__file__)))]
    assert found == []


def test_import_from_a_fresh_interpreter_shows_the_api() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import empathy_models, empathy_models.abc;"
            " print(empathy_models.__all__, empathy_models.abc.__all__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("LLMCallRecord", "TelemetryBackend", "CircuitStateStore", "EmpathyModelsError"):
        assert name in out


def test_importing_the_package_imports_none_of_its_modules() -> None:
    # the top-level names are imported when first used
    code = (
        "import sys, empathy_models\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('empathy_models.'))\n"
        "assert loaded == ['empathy_models._version'], loaded\n"
        "empathy_models.ExecutionContext\n"
        "assert 'empathy_models._values' in sys.modules\n"
        "assert 'empathy_models.router' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_type_hints_resolve_on_every_public_class() -> None:
    # users' tools (cattrs, pydantic, doc generators) call get_type_hints on our classes,
    # which reads annotations in the class's __module__ (rewritten to "empathy_models"
    # for the top level)
    import typing

    from empathy_models import ExecutionContext, LLMCallRecord

    failures: dict[str, str] = {}
    seen: set[int] = set()
    for module in [empathy_models, *_documented_modules()]:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and id(obj) not in seen:
                seen.add(id(obj))
                try:
                    typing.get_type_hints(obj)
                except Exception as exc:  # the test reports every class that fails
                    failures[f"{module.__name__}.{name}"] = f"{type(exc).__name__}: {exc}"
    assert failures == {}
    assert len(seen) > 50
    from datetime import datetime

    assert typing.get_type_hints(LLMCallRecord)["timestamp"] is datetime
    assert "metadata" in typing.get_type_hints(ExecutionContext)
