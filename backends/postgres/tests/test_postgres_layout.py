"""
The plugin's modules reach the server only through `Database` (``_common.py``): its
``connection`` / ``run`` / ``statement`` give every connection back in a task of its own
that a cancelled caller cannot abandon (asyncpg's own ``pool.fetch`` / ``execute`` /
``acquire`` give it back in the caller's task, and a release that then fails is an
exception nobody retrieves).  This checks the source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import empathy_models_postgres

PACKAGE = Path(empathy_models_postgres.__file__).parent
POOL_METHODS = {
    "acquire",
    "copy_records_to_table",
    "execute",
    "executemany",
    "fetch",
    "fetchrow",
    "fetchval",
    "release",
}


def _pool_calls(path: Path) -> list[str]:
    """Calls of a pool's own methods on a name or attribute called ``pool`` / ``_pool``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        name = (
            target.id
            if isinstance(target, ast.Name)
            else target.attr
            if isinstance(target, ast.Attribute)
            else None
        )
        if name in ("pool", "_pool") and node.func.attr in POOL_METHODS:
            found.append(f"{path.name}:{node.lineno} {name}.{node.func.attr}()")
    return found


def test_only_the_database_helper_uses_the_pool_directly() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert any(p.name == "_telemetry.py" for p in modules)
    outside = [call for p in modules if p.name != "_common.py" for call in _pool_calls(p)]
    assert outside == [], "use Database.connection / run / statement instead: " + ", ".join(outside)
    # the check sees the calls it is about: the helper itself makes them
    assert _pool_calls(PACKAGE / "_common.py")
