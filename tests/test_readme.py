"""The README's quick start runs as written, against FakeLLMServer instead of the real APIs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from empathy_models.testing import FakeLLMServer

README = Path(__file__).resolve().parent.parent / "README.md"


def _quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the README lost its quick start block"
    return match.group(1)


def test_the_readme_starts_with_the_two_commands() -> None:
    head = README.read_text(encoding="utf-8")[:1500]
    assert "empathy-models demo" in head
    assert "python -m pytest" in head


async def test_quick_start_runs_against_fake_llm_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _quick_start()
    assert "asyncio.run(main())" in code
    db = tmp_path / "calls.db"
    async with FakeLLMServer() as server:
        code = (
            code.replace("asyncio.run(main())", "")
            .replace(
                "AnthropicProvider()",
                f'AnthropicProvider(api_key="sk-test", base_url="{server.anthropic_base_url}")',
            )
            .replace(
                "OpenAIProvider()",
                f'OpenAIProvider(api_key="sk-test", base_url="{server.openai_base_url}")',
            )
            .replace("sqlite:///calls.db", f"sqlite:///{db}")
        )
        namespace: dict[str, Any] = {}
        exec(compile(code, str(README), "exec"), namespace)
        await namespace["main"]()
        assert server.requests() >= 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) >= 2
    assert "$" in out[-1]
    assert db.exists()
