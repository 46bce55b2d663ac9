"""
A model id too long for a breaker key: ``provider:id`` must fit
`empathy_models.circuit.MAX_KEY_LENGTH` (500 characters, what every circuit-state store
holds), so `ModelInfo` refuses a longer one where it is written (a registry file, and
so ``empathy.toml``'s, says which entry), rather than every run of its tier failing
once a breaker is used.  The longest id allowed runs under a breaker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from empathy_models import (
    CircuitBreaker,
    ConfigurationError,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.circuit import MAX_KEY_LENGTH
from empathy_models.exceptions import RecordValidationError
from empathy_models.testing import FakeProvider


def info(model_id: str, provider: str = "fake", price: float = 1.0) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        provider=provider,
        tier="cheap",
        input_price_per_mtok=price,
        output_price_per_mtok=price,
        context_window=100_000,
        max_output_tokens=4096,
    )


LONGEST = "org/" + "m" * (MAX_KEY_LENGTH - len("fake:") - 4)
"""The longest id provider "fake" can serve: its breaker key is `MAX_KEY_LENGTH` long."""


def test_a_model_whose_breaker_key_no_store_holds_is_refused_where_it_is_written() -> None:
    with pytest.raises(RecordValidationError, match=r"^id must be at most 495 characters") as e:
        info(LONGEST + "m")
    assert e.value.path == "id"
    assert "breaker key, provider:id, would be 501 characters" in str(e.value)
    with pytest.raises(RecordValidationError, match="at most 95 characters with provider"):
        info("m" * 96, provider="p" * 404)
    with pytest.raises(RecordValidationError, match=r"^provider must be at most 498 characters"):
        info("m", provider="p" * 499)


def test_a_registry_dict_says_which_entry_is_too_long() -> None:
    data = {
        "price_version": "t",
        "models": [info("short").to_dict(), {**info("short").to_dict(), "id": "x" * 600}],
    }
    with pytest.raises(ConfigurationError, match=r"^<dict>: models\[1\]\.id: id must be at most"):
        ModelRegistry.from_dict(data)


def test_an_empathy_toml_registry_with_such_an_id_is_refused_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EMPATHY_CONFIG", raising=False)
    (tmp_path / "models.toml").write_text(
        f"""
price_version = "long-ids"

[[models]]
id = "{"m" * 600}"
provider = "house"
tier = "cheap"
input_price_per_mtok = 0.5
output_price_per_mtok = 1.0
context_window = 32768
max_output_tokens = 4096
"""
    )
    (tmp_path / "empathy.toml").write_text(
        'registry = "models.toml"\n[providers.house]\ntype = "openai"\napi_key = "k"\n'
        'base_url = "http://127.0.0.1:9/v1"\n'
    )
    with pytest.raises(
        ConfigurationError, match=r"models\.toml: models\[0\]\.id: id must be at most 494 char"
    ):
        EmpathyLLMExecutor.from_config(router=False)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_the_longest_id_allowed_runs_under_a_breaker(tmp_path: Path, store: str) -> None:
    registry = ModelRegistry(models=[info("short", price=2.0), info(LONGEST)], price_version="t")
    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path / 'state.db'}"
    telemetry = MemoryTelemetryBackend()
    breaker = CircuitBreaker(store=url)
    async with (
        telemetry,
        breaker,
        EmpathyLLMExecutor(
            [FakeProvider(name="fake")],
            registry=registry,
            telemetry_store=telemetry,
            breaker=breaker,
        ) as executor,
    ):
        unpinned = await executor.run("hi", ExecutionContext(tier="cheap"))  # the cheapest
        pinned = await executor.run("hi", ExecutionContext(model=LONGEST))
        key = breaker.key_for("fake", LONGEST)
        status = await breaker.get_status(key)
        records = await telemetry.recent(limit=10)
    assert unpinned.model == pinned.model == LONGEST
    assert len(key) == MAX_KEY_LENGTH and status.key == key
    assert [r.model for r in records] == [LONGEST, LONGEST]
