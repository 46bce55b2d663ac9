"""
The shape of the package: no module imports another that imports it back (not even
from inside a function, the usual way to hide a circle), and the version is stated
once for the package and once for its build.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import empathy_models

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "empathy_models"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """
    Every package module ``name`` imports at runtime, at any depth of its code: by an
    import statement, and for the package root also by its dotted name in a string
    (the root imports its top-level names lazily, from tables of module names).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def target(module: str, alias: str) -> str:
        full = f"{module}.{alias}" if module else alias
        return full if full in modules else module

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for branch in node.orelse:
                visit(branch)
            return
        if name == "empathy_models" and isinstance(node, ast.Constant):
            found.add(str(node.value))
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.update(target(module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_module_imports_one_that_imports_it_back() -> None:
    modules = _modules()
    assert len(modules) > 50
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        graph[name] = _imports(name, path, modules)
    # a module deep in the package imports the package root only for what the root
    # defines itself; the root importing its submodules is not a circle by that alone
    assert "empathy_models._executor" in graph["empathy_models"]
    assert _circles(graph) == []


def test_the_checker_sees_a_circle_hidden_in_a_function() -> None:
    graph: dict[str, set[str]] = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]


def test_one_version_for_the_package_and_its_build() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert empathy_models.__version__ == project["project"]["version"]


def test_importing_the_package_loads_no_http_client() -> None:
    # aiohttp (with its SSL context) is loaded by the first provider or executor that
    # needs it: a CLI command reading the SQLite database never pays for it
    code = (
        "import sys, empathy_models\n"
        "assert 'aiohttp' not in sys.modules, 'aiohttp imported'\n"
        "empathy_models.OpenAIProvider(api_key='sk-test')\n"
        "assert 'aiohttp' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _sources() -> list[Path]:
    plugins = [
        p
        for d in ("redis", "postgres")
        for p in (ROOT / "backends" / d).rglob("empathy_models_*/**/*.py")
    ]
    return sorted([*PACKAGE.rglob("*.py"), *plugins])


def test_no_class_over_500_lines_and_no_function_over_80() -> None:
    # A class is one concern a reader can hold; a function one step they can follow.
    # Lines from the ``def`` / ``class`` line to the last line of the body, docstring
    # included; a nested function counts on its own and inside its parent.
    too_long = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                limit = 500
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = 80
            else:
                continue
            assert node.end_lineno is not None
            size = node.end_lineno - node.lineno + 1
            if size > limit:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {size}")
    assert not too_long, too_long
