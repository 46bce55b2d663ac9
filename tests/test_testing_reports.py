"""
What the shipped checks tell a third party whose own backend fails them: the case and
the values compared, not a bare ``AssertionError``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import empathy_models

pytestmark = pytest.mark.multiprocess

# A response cache written as the docs say, with one mistake: `delete` says it removed
# an entry whether or not one was there.  It is published the way a plugin is, through
# an entry point of an installed distribution (a dist-info directory on the path).
_PLUGIN = """
    from empathy_models.abc import ResponseCache
    from empathy_models.backends import BackendPlugin


    class LyingCache(ResponseCache):
        def __init__(self):
            self._entries = {}

        async def get(self, key):
            self._check_open()
            return self._entries.get(key)

        async def set(self, key, value, ttl):
            self._check_open()
            self._entries[key] = value

        async def delete(self, key):
            self._check_open()
            self._entries.pop(key, None)
            return True

        async def clear(self):
            self._check_open()
            count = len(self._entries)
            self._entries.clear()
            return count


    PLUGIN = BackendPlugin(
        schemes=("lying",), package="lying-cache", cache=lambda url, **options: LyingCache()
    )
"""

_SUITE = """
    import pytest

    from empathy_models.testing.contracts import ResponseCacheContract


    class TestLyingCache(ResponseCacheContract):
        @pytest.fixture
        def cache_url(self):
            return "lying://"
"""


def test_a_failed_contract_case_shows_the_values_it_compared(tmp_path: Path) -> None:
    (tmp_path / "lying_cache.py").write_text(textwrap.dedent(_PLUGIN))
    dist = tmp_path / "lying_cache-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lying-cache\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[empathy_models.backends]\nlying = lying_cache:PLUGIN\n"
    )
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "test_lying_cache.py").write_text(textwrap.dedent(_SUITE))
    package_root = str(Path(empathy_models.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), package_root])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "test_delete_and_clear"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "FAILED test_lying_cache.py::TestLyingCache::test_delete_and_clear" in out, out
    # the line of the contract that failed, with what the cache answered
    assert "assert await cache.delete(keys[0]) is False" in out, out
    assert "assert True is False" in out, out


async def test_the_fleet_check_refuses_a_store_no_other_process_sees() -> None:
    from empathy_models.testing.fleet import breaker_fleet_check

    with pytest.raises(AssertionError, match="MemoryStateStore is not"):
        await breaker_fleet_check("memory://")
