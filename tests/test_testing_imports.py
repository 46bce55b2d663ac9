"""The import paths of the shipped test helpers stay where users import them from."""

from __future__ import annotations

import importlib

import pytest


def test_contracts_exports_exactly_its_public_names() -> None:
    contracts = importlib.import_module("empathy_models.testing.contracts")
    assert contracts.__all__ == [
        "AdvanceClock",
        "ChangeFeedContract",
        "CircuitStateStoreContract",
        "CutChangeFeed",
        "ExpireStateKeys",
        "QuotaStoreContract",
        "ResponseCacheContract",
        "StepQuotaClock",
        "StepStateClock",
        "TelemetryBackendContract",
        "assert_same_buckets",
        "stepping",
        "written_ahead",
    ]
    for name in contracts.__all__:
        assert hasattr(contracts, name), name


@pytest.mark.parametrize(
    ("module_name", "name"),
    [
        ("empathy_models.testing.quota_contracts", "QuotaStoreContract"),
        ("empathy_models.testing.cache_contracts", "ResponseCacheContract"),
    ],
)
def test_the_suites_old_modules_still_export_them(module_name: str, name: str) -> None:
    contracts = importlib.import_module("empathy_models.testing.contracts")
    module = importlib.import_module(module_name)
    assert getattr(module, name) is getattr(contracts, name)
    assert module.__all__ == [name]


def test_fake_server_exports_its_public_names() -> None:
    fake_server = importlib.import_module("empathy_models.testing.fake_server")
    assert sorted(fake_server.__all__, key=str.lower) == sorted(
        [
            "Action",
            "FAULT_ACTIONS",
            "FakeLLMServer",
            "Latency",
            "ModelBehavior",
            "RecordedRequest",
            "StreamBehavior",
            "estimate_tokens",
        ],
        key=str.lower,
    )
    for name in fake_server.__all__:
        assert hasattr(fake_server, name), name
