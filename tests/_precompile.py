"""
Compile the code once before pytest-xdist starts its workers.

The README's test command runs the suite on three workers.  In a fresh checkout each
worker imports every test module and the package while it collects, and each of them
compiles the same files itself: the three start together, find no bytecode cache, and
each rewrites every test module's asserts (pytest's assertion rewriting) and compiles
the package, about 7 s of CPU apiece on a fresh tree.  Done once here, in the controller,
the workers find the caches already written and only load them.

The package and the helper modules are compiled with `compileall` (ordinary ``.pyc``
files).  The test modules' rewritten code is written through pytest's own rewriting
functions, which are internal to pytest: if they are missing or have changed shape,
nothing is written here and the workers rewrite the modules as they always did, so the
run is unchanged but for the time.
"""

from __future__ import annotations

import compileall
import fnmatch
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# the import packages of the core and the two plugins, relative to the rootdir
PACKAGES = (
    "empathy_models",
    "backends/redis/empathy_models_redis",
    "backends/postgres/empathy_models_postgres",
)


def ahead_of_workers(config: pytest.Config) -> None:
    """Compile everything the workers import, when this is a whole-suite xdist run."""
    if not _whole_suite_on_workers(config):
        return
    root = config.rootpath
    for directory in (*PACKAGES, *config.getini("testpaths")):
        if (root / directory).is_dir():
            compileall.compile_dir(root / directory, quiet=1, workers=1)
    _rewrite_test_modules(config, _test_modules(config))


def _whole_suite_on_workers(config: pytest.Config) -> bool:
    """The xdist controller, about to start workers on the configured test paths."""
    return (
        not hasattr(config, "workerinput")
        and config.getoption("dist", "no") != "no"
        and not config.getoption("collectonly")
        and not sys.dont_write_bytecode
        and config.args_source is pytest.Config.ArgsSource.TESTPATHS
    )


def _test_modules(config: pytest.Config) -> Iterator[Path]:
    """The files under the test paths that pytest rewrites: test modules and conftests."""
    patterns = [*config.getini("python_files"), "conftest.py"]
    for directory in config.getini("testpaths"):
        for path in sorted((config.rootpath / directory).rglob("*.py")):
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
                yield path


def _rewrite_test_modules(config: pytest.Config, modules: Iterator[Path]) -> None:
    """Write each module's rewritten code where pytest's import hook looks for it."""
    try:
        from _pytest.assertion.rewrite import (
            PYC_TAIL,
            _rewrite_test,
            _write_pyc,
            assertstate_key,
            get_cache_dir,
        )

        state = config.stash[assertstate_key]
        for path in modules:
            cache = get_cache_dir(path)
            cache.mkdir(exist_ok=True)
            source_hash, code = _rewrite_test(path, config)
            _write_pyc(state, code, source_hash, cache / (path.stem + PYC_TAIL))
    except (ImportError, AttributeError, KeyError, TypeError, ValueError, OSError):
        # another pytest's internals (see the module docstring), or a tree we cannot
        # write to: the workers rewrite the modules themselves
        return
