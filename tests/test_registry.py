"""The model registry: prices to costs, lookups, tiers, and files that override the default."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

import empathy_models
from empathy_models import ConfigurationError, ModelInfo, ModelRegistry, ModelTier
from empathy_models.exceptions import ModelNotFoundError, RecordValidationError


def _model(model_id: str = "m", **changes: object) -> ModelInfo:
    values: dict[str, object] = {
        "id": model_id,
        "provider": "openai",
        "tier": "cheap",
        "input_price_per_mtok": 1.0,
        "output_price_per_mtok": 2.0,
        "context_window": 1000,
        "max_output_tokens": 100,
    }
    values.update(changes)
    return ModelInfo(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ModelInfo


def test_cost_is_tokens_times_price_per_million() -> None:
    model = _model(input_price_per_mtok=3.0, output_price_per_mtok=15.0)
    assert model.cost(1_000_000, 0) == pytest.approx(3.0)
    assert model.cost(0, 1_000_000) == pytest.approx(15.0)
    assert model.cost(1_200, 300) == pytest.approx((1_200 * 3.0 + 300 * 15.0) / 1e6)
    assert model.cost(0, 0) == 0.0


def test_integer_prices_are_stored_as_floats() -> None:
    model = _model(input_price_per_mtok=2, output_price_per_mtok=0)
    assert isinstance(model.input_price_per_mtok, float)
    assert model.output_price_per_mtok == 0.0


@pytest.mark.parametrize("tokens", [-1, 1.5, True, "10"])
def test_cost_rejects_bad_token_counts(tokens: object) -> None:
    with pytest.raises(ValueError, match="input_tokens"):
        _model().cost(tokens, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_price_per_mtok", -0.01),
        ("output_price_per_mtok", math.inf),
        ("output_price_per_mtok", math.nan),
        ("input_price_per_mtok", "1.0"),
        ("context_window", 0),
        ("max_output_tokens", -5),
        ("context_window", 10.5),
        ("context_window", 2**63),
        ("max_output_tokens", 2**64),
        ("id", ""),
        ("provider", "  "),
        # ids and providers every store keeps as given (telemetry, breaker keys)
        ("id", "gpt\udce9"),
        ("id", "gpt\x00mini"),
        ("provider", "open\ud800ai"),
        ("tier", "gold"),
    ],
)
def test_model_info_validation_names_field_and_value(field: str, value: object) -> None:
    with pytest.raises(RecordValidationError) as info:
        _model(**{field: value})  # type: ignore[arg-type]
    assert info.value.path == field
    assert field in str(info.value)
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_tier_accepts_any_case() -> None:
    assert _model(tier="PREMIUM").tier is ModelTier.PREMIUM


# ---------------------------------------------------------------- ModelRegistry


def test_default_registry_holds_both_providers_with_a_price_version() -> None:
    registry = ModelRegistry.default()
    assert registry.price_version
    assert registry.providers() == ["anthropic", "openai"]
    for model_id, provider in [
        ("claude-haiku-4-5", "anthropic"),
        ("claude-sonnet-4-5", "anthropic"),
        ("claude-opus-4-1", "anthropic"),
        ("gpt-4o-mini", "openai"),
        ("gpt-4.1", "openai"),
        ("o3", "openai"),
    ]:
        assert registry.get(model_id).provider == provider
    for tier in ModelTier:
        for provider in ("anthropic", "openai"):
            assert registry.for_tier(tier, provider=provider), (tier, provider)
    assert ModelRegistry.default() is registry


def test_default_prices_of_well_known_models() -> None:
    registry = ModelRegistry.default()
    haiku = registry.get("claude-haiku-4-5")
    assert (haiku.input_price_per_mtok, haiku.output_price_per_mtok) == (1.0, 5.0)
    mini = registry.get("gpt-4o-mini")
    assert (mini.input_price_per_mtok, mini.output_price_per_mtok) == (0.15, 0.6)
    # 1,000 input + 500 output tokens on claude-sonnet-4-5 ($3 / $15)
    assert registry.cost("claude-sonnet-4-5", 1_000, 500) == pytest.approx(0.0105)


def test_get_is_case_insensitive_and_unknown_raises_model_not_found() -> None:
    registry = ModelRegistry(models=[_model("Alpha")], price_version="v1")
    assert registry.get("ALPHA").id == "Alpha"
    assert "alpha" in registry
    assert "beta" not in registry
    assert 42 not in registry
    with pytest.raises(ModelNotFoundError) as info:
        registry.get("beta")
    assert info.value.model == "beta"
    assert isinstance(info.value, LookupError)
    assert "Alpha" in str(info.value)


def test_for_tier_sorts_by_total_price_then_id_and_filters_provider() -> None:
    registry = ModelRegistry(
        models=[
            _model("c", input_price_per_mtok=1.0, output_price_per_mtok=1.0),
            _model("b", input_price_per_mtok=0.5, output_price_per_mtok=1.5),
            _model("a", input_price_per_mtok=3.0, output_price_per_mtok=0.0),
            _model("z", input_price_per_mtok=0.1, output_price_per_mtok=0.1, provider="anthropic"),
            _model("p", tier="premium"),
        ],
        price_version="v1",
    )
    assert [m.id for m in registry.for_tier(ModelTier.CHEAP)] == ["z", "b", "c", "a"]
    assert [m.id for m in registry.for_tier("Cheap", provider="openai")] == ["b", "c", "a"]
    assert [m.id for m in registry.for_tier("premium")] == ["p"]
    assert registry.for_tier("capable") == []
    with pytest.raises(ConfigurationError, match="gold"):
        registry.for_tier("gold")
    # a returned list is the caller's own
    registry.for_tier("cheap").clear()
    assert len(registry.for_tier("cheap")) == 4


def test_duplicate_ids_are_rejected_case_insensitively() -> None:
    with pytest.raises(
        ConfigurationError, match=r"duplicate model id 'M' \(models\[0\] and models\[1\]\)"
    ):
        ModelRegistry(models=[_model("m"), _model("M")], price_version="v1")


@pytest.mark.parametrize("ids", [("x", "X"), ("gpt-4o", "GPT-4o"), ("new-one", "new-one")])
def test_a_file_extending_the_default_that_lists_an_id_twice_is_refused(
    ids: tuple[str, str],
) -> None:
    # overriding a default model twice, or adding one twice: refused, naming the file's
    # own indexes (not the merged table's), as without ``extends``
    document = {
        "price_version": "v",
        "extends": "default",
        "models": [_entry(id=ids[0]), _entry(id=ids[1], input_price_per_mtok=0.01)],
    }
    with pytest.raises(
        ConfigurationError,
        match=rf"^<dict>: duplicate model id '{ids[1]}' \(models\[0\] and models\[1\]\)$",
    ):
        ModelRegistry.from_dict(document)


def test_non_model_entries_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"models\[0\] must be a ModelInfo"):
        ModelRegistry(models=[{"id": "x"}], price_version="v1")  # type: ignore[list-item]


def test_with_models_replaces_in_place_and_appends_new() -> None:
    base = ModelRegistry(models=[_model("a"), _model("b")], price_version="v1")
    changed = base.with_models(
        _model("B", input_price_per_mtok=9.0), _model("c"), price_version="v2"
    )
    assert [m.id for m in changed.models] == ["a", "B", "c"]
    assert changed.get("b").input_price_per_mtok == 9.0
    assert changed.price_version == "v2"
    # the original is untouched
    assert base.get("b").input_price_per_mtok == 1.0
    assert base.price_version == "v1"
    assert [m.id for m in changed.without_models("A").models] == ["B", "c"]
    with pytest.raises(ModelNotFoundError):
        changed.without_models("nope")
    assert base.replace(price_version="v3").price_version == "v3"


def test_registry_cost_uses_the_models_price() -> None:
    registry = ModelRegistry(
        models=[_model("x", input_price_per_mtok=2.0, output_price_per_mtok=8.0)],
        price_version="v1",
    )
    assert registry.cost("X", 250_000, 125_000) == pytest.approx(0.5 + 1.0)
    with pytest.raises(ModelNotFoundError):
        registry.cost("y", 1, 1)


def test_to_dict_round_trips_through_from_dict() -> None:
    registry = ModelRegistry.default()
    again = ModelRegistry.from_dict(json.loads(json.dumps(registry.to_dict())))
    assert again == registry


# ---------------------------------------------------------------- files

_TOML = """
price_version = "2026-06-internal"

[[models]]
id = "local-llama"
provider = "openai"
tier = "cheap"
input_price_per_mtok = 0
output_price_per_mtok = 0
context_window = 32768
max_output_tokens = 4096
"""


def test_from_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(_TOML)
    registry = ModelRegistry.from_file(path)
    assert registry.price_version == "2026-06-internal"
    assert [m.id for m in registry.models] == ["local-llama"]
    assert registry.cost("local-llama", 10_000, 10_000) == 0.0


def test_from_json_file_extending_the_default(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    entry = ModelRegistry.default().get("gpt-4o-mini").to_dict() | {"input_price_per_mtok": 0.1}
    path.write_text(json.dumps({"price_version": "mine", "extends": "default", "models": [entry]}))
    registry = ModelRegistry.from_file(str(path))
    assert registry.price_version == "mine"
    assert registry.get("gpt-4o-mini").input_price_per_mtok == 0.1
    assert len(registry) == len(ModelRegistry.default())
    assert "claude-haiku-4-5" in registry


def _entry(**changes: object) -> dict[str, object]:
    return _model("x").to_dict() | changes


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"models": []}, "price_version must be a non-empty string"),
        ({"price_version": "v", "models": {}}, "models must be a list"),
        ({"price_version": "v"}, "models must be a list"),
        ({"price_version": "v", "models": [], "colour": 1}, "unknown top-level key"),
        ({"price_version": "v", "extends": "other", "models": []}, "extends must be"),
        ({"price_version": "v", "models": [7]}, r"models\[0\]: expected a table"),
        (
            {"price_version": "v", "models": [_entry(), _entry(id="y", input_price=1)]},
            r"models\[1\]: unknown field\(s\) 'input_price'",
        ),
        (
            {"price_version": "v", "models": [{"id": "x", "provider": "openai"}]},
            r"models\[0\]: missing field\(s\) 'tier', 'input_price_per_mtok'",
        ),
        (
            {"price_version": "v", "models": [_entry(output_price_per_mtok=-1)]},
            r"models\[0\]\.output_price_per_mtok: output_price_per_mtok must be a finite "
            r"number >= 0, got -1",
        ),
        (
            {"price_version": "v", "models": [_entry(tier="gold")]},
            r"models\[0\]\.tier: tier must be one of cheap, capable, premium, got 'gold'",
        ),
        (
            {"price_version": "v", "models": [_entry(), _entry()]},
            r"duplicate model id 'x'",
        ),
    ],
)
def test_bad_files_raise_configuration_errors_naming_path_and_field(
    tmp_path: Path, document: dict[str, object], expected: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigurationError, match=expected) as info:
        ModelRegistry.from_file(path)
    assert str(info.value).startswith(str(path))


def test_unparseable_missing_and_unsupported_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("price_version = \n")
    with pytest.raises(ConfigurationError, match="not valid TOML") as info:
        ModelRegistry.from_file(broken)
    assert str(broken) in str(info.value)

    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        ModelRegistry.from_file(bad_json)

    with pytest.raises(ConfigurationError, match="cannot read") as info:
        ModelRegistry.from_file(tmp_path / "absent.toml")
    assert "absent.toml" in str(info.value)

    with pytest.raises(ConfigurationError, match=r"\.toml or \.json"):
        ModelRegistry.from_file(tmp_path / "prices.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a capability that is no string (a list is not hashable either)
        (
            json.dumps({"price_version": "v", "models": [_entry(capabilities=[["tools"]])]}),
            r"models\[0\]\.capabilities: .*got \['tools'\] in it",
        ),
        # a price no float holds
        (
            json.dumps({"price_version": "v", "models": [_entry(input_price_per_mtok=10**400)]}),
            r"models\[0\]\.input_price_per_mtok: .*must be a finite number",
        ),
        ('{"price_version": "v", "models": ' + "[" * 100_000 + "]" * 100_000 + "}", "too deeply"),
    ],
)
def test_odd_json_values_raise_configuration_errors(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "odd.json"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=expected) as info:
        ModelRegistry.from_file(path)
    assert str(info.value).startswith(str(path))


def test_deeply_nested_toml_and_a_nul_in_the_path(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text('price_version = "v"\nmodels = ' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigurationError, match=r"not valid TOML: .*nested too deeply") as info:
        ModelRegistry.from_file(deep)
    assert str(deep) in str(info.value)

    with pytest.raises(ConfigurationError, match="not a usable registry file path"):
        ModelRegistry.from_file(tmp_path / "a\x00.toml")


def test_from_dict_rejects_non_mappings() -> None:
    with pytest.raises(ConfigurationError, match="expected a table"):
        ModelRegistry.from_dict([])  # type: ignore[arg-type]


def test_registry_names_are_public() -> None:
    assert empathy_models.ModelRegistry is ModelRegistry
    assert "ModelInfo" in empathy_models.__all__


@pytest.mark.parametrize(
    "module_name",
    [
        "empathy_models.registry",
        "empathy_models.tasks",
        "empathy_models.providers",
        "empathy_models.providers.anthropic",
        "empathy_models.providers.openai",
        "empathy_models.providers._http",
        "empathy_models.testing",
        "empathy_models.testing.fake_server",
        "empathy_models.testing.fakes",
    ],
)
def test_module_all_is_sorted_and_defined(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(set(module.__all__))
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name}"
