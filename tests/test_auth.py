"""AuthStrategy, its file, and count_lines_of_code, through the public API."""

from __future__ import annotations

import codecs
import json
import operator
import os
import re
import stat
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import empathy_models
from empathy_models import ModelRegistry
from empathy_models.auth import (
    AuthMode,
    AuthStrategy,
    SubscriptionTier,
    auth_strategy_file,
    count_lines_of_code,
    get_module_size_category,
    list_auth_strategy_backups,
    reset_auth_strategy,
    restore_auth_strategy,
)
from empathy_models.exceptions import AuthFileError, RecordValidationError, SourceFileError

ORIGINAL_KEYS = [
    "subscription_tier",
    "default_mode",
    "small_module_threshold",
    "medium_module_threshold",
    "loc_to_tokens_multiplier",
    "setup_completed",
    "prefer_subscription",
    "cost_optimization",
    "metadata",
]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# --------------------------------------------------------------------------- enums and defaults


def test_enum_values_are_the_originals() -> None:
    assert [t.value for t in SubscriptionTier] == ["free", "pro", "max", "enterprise", "api_only"]
    assert [m.value for m in AuthMode] == ["subscription", "api", "auto"]
    # str subclasses: a member equals its value string
    assert operator.eq(SubscriptionTier.PRO, "pro")
    assert operator.eq(AuthMode.AUTO, "auto")


def test_defaults_are_the_originals() -> None:
    s = AuthStrategy()
    assert s.subscription_tier is SubscriptionTier.PRO
    assert s.default_mode is AuthMode.AUTO
    assert (s.small_module_threshold, s.medium_module_threshold) == (500, 2000)
    assert s.loc_to_tokens_multiplier == 4.0
    assert s.setup_completed and s.prefer_subscription and s.cost_optimization
    assert dict(s.metadata) == {}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"small_module_threshold": 0}, "small_module_threshold"),
        ({"small_module_threshold": -5}, "small_module_threshold"),
        ({"medium_module_threshold": "2000"}, "medium_module_threshold"),
        ({"small_module_threshold": True}, "small_module_threshold"),
        ({"small_module_threshold": 2000}, "small_module_threshold"),
        ({"small_module_threshold": 2500}, "small_module_threshold"),
        ({"loc_to_tokens_multiplier": 0}, "loc_to_tokens_multiplier"),
        ({"loc_to_tokens_multiplier": -1.5}, "loc_to_tokens_multiplier"),
        ({"loc_to_tokens_multiplier": float("nan")}, "loc_to_tokens_multiplier"),
        ({"loc_to_tokens_multiplier": "4"}, "loc_to_tokens_multiplier"),
        ({"subscription_tier": "gold"}, "subscription_tier"),
        ({"default_mode": 3}, "default_mode"),
        ({"prefer_subscription": "yes"}, "prefer_subscription"),
        ({"setup_completed": 1}, "setup_completed"),
        ({"metadata": ["a"]}, "metadata"),
        ({"metadata": {"x": object()}}, "metadata"),
    ],
)
def test_invalid_values_raise_naming_the_field(changes: dict[str, object], path: str) -> None:
    with pytest.raises(RecordValidationError) as info:
        AuthStrategy(**changes)  # type: ignore[arg-type]
    assert info.value.path == path
    assert path in str(info.value)


def test_enum_strings_any_case_and_int_multiplier_are_accepted() -> None:
    s = AuthStrategy(subscription_tier="MAX", default_mode="Api", loc_to_tokens_multiplier=3)
    assert s.subscription_tier is SubscriptionTier.MAX
    assert s.default_mode is AuthMode.API
    assert s.loc_to_tokens_multiplier == 3.0


def test_replace_revalidates() -> None:
    s = AuthStrategy()
    assert s.replace(small_module_threshold=100).small_module_threshold == 100
    with pytest.raises(RecordValidationError):
        s.replace(medium_module_threshold=400)


def test_metadata_is_copied_and_immutable() -> None:
    source = {"team": "docs", "nested": {"a": 1}}
    s = AuthStrategy(metadata=source)
    source["team"] = "changed"
    assert s.metadata["team"] == "docs"
    with pytest.raises(TypeError):
        s.metadata["team"] = "x"  # type: ignore[index]


# --------------------------------------------------------------------------- serialization


def test_to_dict_has_the_original_keys_in_order_plus_version() -> None:
    data = AuthStrategy().to_dict()
    assert data["v"] == 1
    assert [k for k in data if k != "v"] == ORIGINAL_KEYS
    assert data["subscription_tier"] == "pro" and type(data["subscription_tier"]) is str
    json.dumps(data)


def test_round_trip_keeps_every_field() -> None:
    s = AuthStrategy(
        subscription_tier=SubscriptionTier.ENTERPRISE,
        default_mode=AuthMode.SUBSCRIPTION,
        small_module_threshold=123,
        medium_module_threshold=4567,
        loc_to_tokens_multiplier=2.5,
        setup_completed=False,
        prefer_subscription=False,
        cost_optimization=False,
        metadata={"owner": "team-a", "limits": [1, 2]},
    )
    assert AuthStrategy.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_from_dict_ignores_unknown_keys_and_defaults_missing_ones() -> None:
    s = AuthStrategy.from_dict({"v": 7, "small_module_threshold": 300, "future_field": [1]})
    assert s.small_module_threshold == 300
    assert s.medium_module_threshold == 2000
    # the original's file has no "v"
    original = {
        "subscription_tier": "max",
        "default_mode": "auto",
        "small_module_threshold": 500,
        "medium_module_threshold": 2000,
        "loc_to_tokens_multiplier": 4.0,
        "setup_completed": True,
        "prefer_subscription": True,
        "cost_optimization": True,
        "metadata": {},
    }
    assert AuthStrategy.from_dict(original).subscription_tier is SubscriptionTier.MAX


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"medium_module_threshold": "big"}, "medium_module_threshold"),
        ({"loc_to_tokens_multiplier": None}, "loc_to_tokens_multiplier"),
        ({"subscription_tier": "platinum"}, "subscription_tier"),
        ({"v": "one"}, "v"),
        ({"v": 0}, "v"),
    ],
)
def test_from_dict_is_strict_on_bad_values(data: dict[str, object], path: str) -> None:
    with pytest.raises(RecordValidationError) as info:
        AuthStrategy.from_dict(data)
    assert info.value.path == path


def test_from_dict_rejects_a_non_mapping() -> None:
    with pytest.raises(RecordValidationError):
        AuthStrategy.from_dict([1, 2])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("tier", "prefer", "lines", "expected"),
    [
        # PRO and API_ONLY: API at every size
        ("pro", True, 10, AuthMode.API),
        ("pro", True, 5000, AuthMode.API),
        ("api_only", True, 10, AuthMode.API),
        # FREE, MAX, ENTERPRISE: by size, strict boundaries
        ("free", True, 499, AuthMode.SUBSCRIPTION),
        ("max", True, 0, AuthMode.SUBSCRIPTION),
        ("max", True, 499, AuthMode.SUBSCRIPTION),
        ("max", True, 500, AuthMode.SUBSCRIPTION),
        ("max", False, 499, AuthMode.SUBSCRIPTION),
        ("max", False, 500, AuthMode.API),
        ("enterprise", True, 1999, AuthMode.SUBSCRIPTION),
        ("enterprise", True, 2000, AuthMode.API),
        ("free", False, 1999, AuthMode.API),
        ("free", True, 2000, AuthMode.API),
    ],
)
def test_decision_table(tier: str, prefer: bool, lines: int, expected: AuthMode) -> None:
    s = AuthStrategy(subscription_tier=tier, prefer_subscription=prefer)
    assert s.get_recommended_mode(lines) is expected
    assert s.explain_recommended_mode(lines)


def test_a_pinned_mode_wins_over_size_and_tier() -> None:
    s = AuthStrategy(subscription_tier="max", default_mode="api")
    assert s.get_recommended_mode(1) is AuthMode.API
    s = AuthStrategy(subscription_tier="pro", default_mode="subscription")
    assert s.get_recommended_mode(100_000) is AuthMode.SUBSCRIPTION
    assert "pinned" in s.explain_recommended_mode(5)


def test_custom_thresholds_move_the_boundaries() -> None:
    s = AuthStrategy(
        subscription_tier="max",
        small_module_threshold=100,
        medium_module_threshold=200,
        prefer_subscription=False,
    )
    assert s.get_recommended_mode(99) is AuthMode.SUBSCRIPTION
    assert s.get_recommended_mode(100) is AuthMode.API
    assert [get_module_size_category(n, s) for n in (99, 100, 199, 200)] == [
        "small",
        "medium",
        "medium",
        "large",
    ]


def test_size_category_defaults_and_agrees_with_the_strategy() -> None:
    assert [get_module_size_category(n) for n in (0, 499, 500, 1999, 2000)] == [
        "small",
        "small",
        "medium",
        "medium",
        "large",
    ]


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_bad_line_counts_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        AuthStrategy().get_recommended_mode(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cost


def test_estimate_tokens_truncates() -> None:
    assert AuthStrategy().estimate_tokens(1000) == 4000
    assert AuthStrategy(loc_to_tokens_multiplier=1.5).estimate_tokens(3) == 4


def test_auto_is_resolved_before_pricing() -> None:
    small_max = AuthStrategy(subscription_tier="max")
    est = small_max.estimate_cost(100, AuthMode.AUTO)
    assert est.mode is AuthMode.SUBSCRIPTION  # AUTO is resolved by size, not priced as API
    assert est.monetary_cost == 0.0
    assert est.quota_cost is not None and "400" in est.quota_cost
    assert small_max.estimate_cost(100, "auto") == est
    assert small_max.estimate_cost(100) == est
    assert small_max.estimate_cost(5000, "auto").mode is AuthMode.API


def test_api_cost_comes_from_the_registry_and_scales_with_size() -> None:
    registry = ModelRegistry.default()
    s = AuthStrategy()
    small = s.estimate_cost(100, AuthMode.API)
    large = s.estimate_cost(1000, AuthMode.API)
    assert small.mode is AuthMode.API and small.quota_cost is None
    assert large.monetary_cost == pytest.approx(10 * small.monetary_cost, rel=0.02)
    # every stage is priced with the registry's ModelInfo.cost for its tokens
    expected = sum(
        registry.get(stage.model).cost(stage.input_tokens, stage.output_tokens)
        for stage in large.stages
    )
    assert large.monetary_cost == pytest.approx(expected)
    assert large.price_version == registry.price_version
    assert {registry.get(stage.model).provider for stage in large.stages} == {"anthropic"}
    assert large.to_dict()["mode"] == "api"
    assert list(large.to_dict())[:5] == [
        "mode",
        "monetary_cost",
        "quota_cost",
        "tokens_used",
        "fits_in_context",
    ]


def test_cost_follows_a_changed_price_table() -> None:
    base = ModelRegistry.default()
    pricier = base.with_models(
        *[
            m.__class__(
                **{
                    **m.to_dict(),
                    "input_price_per_mtok": m.input_price_per_mtok * 2,
                    "output_price_per_mtok": m.output_price_per_mtok * 2,
                }
            )
            for m in base
            if m.provider == "anthropic"
        ],
        price_version="doubled",
    )
    s = AuthStrategy()
    normal = s.estimate_cost(1000, "api", registry=base)
    doubled = s.estimate_cost(1000, "api", registry=pricier)
    assert doubled.monetary_cost == pytest.approx(2 * normal.monetary_cost)
    assert doubled.price_version == "doubled"


def test_fits_in_context_uses_the_mode_window() -> None:
    s = AuthStrategy(default_mode="subscription")
    assert s.estimate_cost(49_999).fits_in_context  # 199,996 tokens
    assert not s.estimate_cost(50_000).fits_in_context
    assert AuthStrategy().estimate_cost(50_000, "api").fits_in_context


def test_unknown_mode_is_a_configuration_error() -> None:
    with pytest.raises(empathy_models.ConfigurationError):
        AuthStrategy().estimate_cost(10, "hybrid")


# --------------------------------------------------------------------------- the file


def test_auth_strategy_file_honours_empathy_home_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "a"))
    assert auth_strategy_file() == tmp_path / "a" / "auth_strategy.json"
    monkeypatch.setenv("EMPATHY_HOME", str(tmp_path / "b"))
    assert auth_strategy_file() == tmp_path / "b" / "auth_strategy.json"
    monkeypatch.delenv("EMPATHY_HOME")
    assert auth_strategy_file() == Path.home() / ".empathy" / "auth_strategy.json"


@pytest.mark.parametrize("relative", ["state", "./state", "sub/dir/.."])
def test_a_relative_empathy_home_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str
) -> None:
    # it would name another directory in every working directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMPATHY_HOME", relative)
    for use in (auth_strategy_file, AuthStrategy.load, AuthStrategy().save):
        with pytest.raises(empathy_models.ConfigurationError) as info:
            use()
        assert str(info.value) == (
            f"EMPATHY_HOME={relative!r} is a relative path: set EMPATHY_HOME to a full path"
        )
    assert list(tmp_path.iterdir()) == []


_NO_SUCH_HOME = "~no_such_user_here/x"  # a ~user that does not exist: no home directory

_USE_THE_PATH = """
import empathy_models.auth as auth
from empathy_models import ConfigurationError
from empathy_models.auth import AuthStrategy

assert AuthStrategy(small_module_threshold=3).small_module_threshold == 3
for use in (auth.auth_strategy_file, AuthStrategy.load, lambda: auth.AUTH_STRATEGY_FILE):
    try:
        use()
    except ConfigurationError as exc:
        print(exc)
"""


def test_an_empathy_home_that_cannot_expand_fails_where_the_path_is_used_not_at_import(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EMPATHY_CONFIG"}
    env["EMPATHY_HOME"] = _NO_SUCH_HOME
    result = subprocess.run(
        [sys.executable, "-c", _USE_THE_PATH],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    message = (
        f"cannot find the home directory for EMPATHY_HOME={_NO_SUCH_HOME!r}: set "
        "EMPATHY_HOME to a full path"
    )
    assert result.stdout == f"{message}\n" * 3
    # the CLI starts: a command given its file works, one that needs the home says why
    cli = [sys.executable, "-m", "empathy_models", "auth", "status"]
    given = subprocess.run(
        [*cli, "--file", str(tmp_path / "s.json")], env=env, capture_output=True, text=True
    )
    assert given.returncode == 0 and "(not created yet)" in given.stdout, given.stderr
    default = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert (default.returncode, default.stderr) == (1, f"empathy-models: error: {message}\n")


def test_save_then_load_through_empathy_home(home: Path) -> None:
    s = AuthStrategy(subscription_tier="max", small_module_threshold=250)
    written = s.save()
    assert written == home / "auth_strategy.json"
    assert AuthStrategy.load() == s
    assert json.loads(written.read_text())["v"] == 1


def test_save_makes_every_missing_directory_private_under_any_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "a" / "b" / "home"  # three directories to make, not one
    monkeypatch.setenv("EMPATHY_HOME", str(home))
    old = os.umask(0)
    try:
        AuthStrategy().save()
    finally:
        os.umask(old)
    for directory in (tmp_path / "a", tmp_path / "a" / "b", home):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_save_is_private_and_leaves_no_temp_files(home: Path) -> None:
    AuthStrategy().save()
    file = home / "auth_strategy.json"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    AuthStrategy(small_module_threshold=1).save()
    assert sorted(p.name for p in home.iterdir()) == ["auth_strategy.json"]


def test_save_replaces_atomically_keeping_other_readers_consistent(home: Path) -> None:
    file = AuthStrategy().save()
    before = os.stat(file).st_ino
    with open(file, "rb") as reader:  # a reader holding the old file keeps a whole old file
        AuthStrategy(small_module_threshold=42).save()
        old = json.loads(reader.read())
    assert old["small_module_threshold"] == 500
    assert os.stat(file).st_ino != before  # replaced, not rewritten in place
    assert AuthStrategy.load().small_module_threshold == 42


def test_load_without_a_file_gives_defaults_and_load_existing_none(home: Path) -> None:
    assert AuthStrategy.load() == AuthStrategy()
    assert AuthStrategy.load_existing() is None


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2]",
        b'{"small_module_threshold": -3}',
        b"\xff\xfe\x00",
        b"null",
        b" null\n",
        b'{"small_module_threshold": ' + b"9" * 5000 + b"}",
    ],
)
def test_a_corrupt_file_is_an_error_naming_the_path(home: Path, content: bytes) -> None:
    home.mkdir(parents=True)
    file = home / "auth_strategy.json"
    file.write_bytes(content)
    with pytest.raises(AuthFileError) as info:
        AuthStrategy.load()
    assert str(file) in str(info.value)
    assert info.value.path == file
    # and a later save does not overwrite it with defaults
    with pytest.raises(AuthFileError):
        AuthStrategy().save()
    assert file.read_bytes() == content


def test_a_file_saved_with_a_utf8_byte_order_mark_loads_and_updates(home: Path) -> None:
    # Windows Notepad saves UTF-8 with a BOM: the hand-edited file read as corrupt
    # ("not valid UTF-8 JSON at line 1 column 1"), and save and update refused it
    home.mkdir(parents=True)
    file = home / "auth_strategy.json"
    edited = {"v": 1, "subscription_tier": "max", "small_module_threshold": 300}
    file.write_bytes(codecs.BOM_UTF8 + json.dumps(edited, indent=2).encode())
    loaded = AuthStrategy.load()
    assert (loaded.subscription_tier, loaded.small_module_threshold) == (
        SubscriptionTier.MAX,
        300,
    )
    updated = AuthStrategy.update(prefer_subscription=False)
    assert updated == loaded.replace(prefer_subscription=False)
    assert AuthStrategy.load() == updated
    assert not file.read_bytes().startswith(codecs.BOM_UTF8)


@pytest.mark.parametrize("name", ["x" * 300 + ".json", "auth\x00strategy.json"])
def test_an_unusable_path_is_an_auth_file_error_naming_it(tmp_path: Path, name: str) -> None:
    file = tmp_path / name
    with pytest.raises(AuthFileError) as info:
        AuthStrategy().save(file)
    assert info.value.path == file
    assert str(file) in str(info.value) or repr(str(file)) in str(info.value)
    with pytest.raises(AuthFileError):
        AuthStrategy.load(file)


def test_the_error_never_quotes_the_file(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "auth_strategy.json").write_text('{"metadata": "sk-secret-123"')
    with pytest.raises(AuthFileError) as info:
        AuthStrategy.load()
    assert "sk-secret" not in str(info.value)


def test_explicit_paths_are_honoured(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "custom.json"
    AuthStrategy(small_module_threshold=7).save(target)
    assert AuthStrategy.load(target).small_module_threshold == 7
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


async def test_async_variants(home: Path) -> None:
    s = AuthStrategy(subscription_tier="free")
    await s.asave()
    assert await AuthStrategy.aload() == s


# --------------------------------------------------------------------------- reset / restore


def test_reset_backs_up_and_restore_brings_back_every_field(home: Path) -> None:
    custom = AuthStrategy(
        subscription_tier="enterprise",
        small_module_threshold=111,
        medium_module_threshold=999,
        loc_to_tokens_multiplier=3.25,
        prefer_subscription=False,
        metadata={"k": "v"},
    )
    file = custom.save()
    backup = reset_auth_strategy()
    assert backup is not None and backup.parent == file.parent
    assert not file.exists()
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert AuthStrategy.load(backup) == custom
    assert list_auth_strategy_backups() == [backup]
    source, previous = restore_auth_strategy()
    assert (source, previous) == (backup, None)
    assert AuthStrategy.load() == custom


def test_reset_without_a_file_does_nothing(home: Path) -> None:
    assert reset_auth_strategy() is None


def test_reset_of_a_symlink_copies_the_content_and_never_touches_the_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "shared_settings.json"
    target.write_text('{"small_module_threshold": 9}')
    os.chmod(target, 0o644)
    link = tmp_path / "auth_strategy.json"
    link.symlink_to(target)
    backup = reset_auth_strategy(link)
    assert backup is not None
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_text() == '{"small_module_threshold": 9}'
    assert not link.exists() and not link.is_symlink()
    assert not backup.is_symlink()
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert AuthStrategy.load(backup).small_module_threshold == 9
    assert list_auth_strategy_backups(link) == [backup]


def test_save_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    # a strategy file kept in a dotfiles repository and linked into place: save()
    # replaced the link with a regular file, leaving the target, the copy the user
    # keeps, with the old settings (and the link gone)
    target = tmp_path / "dotfiles" / "auth_strategy.json"
    target.parent.mkdir()
    AuthStrategy(small_module_threshold=9).save(target)
    link = tmp_path / "home" / "auth_strategy.json"
    link.parent.mkdir()
    link.symlink_to(target)
    AuthStrategy(small_module_threshold=300).save(link)
    AuthStrategy.update(link, prefer_subscription=False)
    assert link.is_symlink() and link.resolve() == target
    saved = AuthStrategy.load(target)
    assert (saved.small_module_threshold, saved.prefer_subscription) == (300, False)
    assert sorted(p.name for p in link.parent.iterdir()) == ["auth_strategy.json"]


def test_reset_of_a_dangling_symlink_is_an_error_leaving_it(tmp_path: Path) -> None:
    link = tmp_path / "auth_strategy.json"
    link.symlink_to(tmp_path / "missing.json")
    with pytest.raises(AuthFileError) as info:
        reset_auth_strategy(link)
    assert info.value.path == link and "missing file" in str(info.value)
    assert link.is_symlink()


def test_restore_picks_the_newest_backup_and_keeps_the_current_file(home: Path) -> None:
    AuthStrategy(small_module_threshold=1).save()
    first = reset_auth_strategy()
    AuthStrategy(small_module_threshold=2).save()
    second = reset_auth_strategy()
    assert list_auth_strategy_backups() == [second, first]
    AuthStrategy(small_module_threshold=3).save()
    source, previous = restore_auth_strategy()
    assert source == second
    assert AuthStrategy.load().small_module_threshold == 2
    assert previous is not None and AuthStrategy.load(previous).small_module_threshold == 3


def test_restores_alone_keep_the_backups_within_the_limit(tmp_path: Path) -> None:
    # each restore backs up the file it replaces; only resets used to prune
    file = tmp_path / "auth_strategy.json"
    AuthStrategy(small_module_threshold=1).save(file)
    oldest = reset_auth_strategy(file)
    assert oldest is not None
    for i in range(25):
        AuthStrategy(small_module_threshold=100 + i).save(file)
        restore_auth_strategy(file, backup=oldest)
    backups = list_auth_strategy_backups(file)
    # the 20 newest (the default keep_backups, as for reset), and the one being
    # restored, never pruned
    assert len(backups) == 21 and backups[-1] == oldest
    assert AuthStrategy.load(backups[0]).small_module_threshold == 124
    assert AuthStrategy.load(file).small_module_threshold == 1


def test_backups_made_after_the_clock_stepped_back_are_still_the_newest(
    tmp_path: Path,
) -> None:
    file = tmp_path / "auth_strategy.json"
    AuthStrategy(small_module_threshold=1).save(file)
    made = reset_auth_strategy(file)
    assert made is not None
    # the name this reset gets with the clock an hour ahead (it is then set back)
    stamp = re.search(r"\d{8}T\d{12}Z", made.name)
    assert stamp is not None
    ahead = datetime.strptime(stamp.group(), "%Y%m%dT%H%M%S%fZ") + timedelta(hours=1)
    first = made.with_name(made.name.replace(stamp.group(), ahead.strftime("%Y%m%dT%H%M%S%fZ")))
    made.rename(first)
    AuthStrategy(small_module_threshold=2).save(file)
    second = reset_auth_strategy(file)
    assert list_auth_strategy_backups(file) == [second, first]
    source, _ = restore_auth_strategy(file)
    assert source == second and AuthStrategy.load(file).small_module_threshold == 2
    # pruning keeps the backup made last
    AuthStrategy(small_module_threshold=3).save(file)
    third = reset_auth_strategy(file, keep_backups=1)
    assert list_auth_strategy_backups(file) == [third]
    assert AuthStrategy.load(third).small_module_threshold == 3


def test_backups_named_by_earlier_versions_are_listed_in_time_order(tmp_path: Path) -> None:
    file = tmp_path / "auth_strategy.json"
    names = [
        "auth_strategy.json.20260101T120000000000Z.bak",
        "auth_strategy.json.20260101T120000000000Z-1.bak",
        "auth_strategy.json.20260102T000000000000Z.bak",
    ]
    for name in names:
        AuthStrategy().save(tmp_path / name)
    assert list_auth_strategy_backups(file) == [tmp_path / name for name in reversed(names)]
    # a backup made now is newer than all of them
    AuthStrategy(small_module_threshold=2).save(file)
    made = reset_auth_strategy(file)
    assert list_auth_strategy_backups(file)[0] == made


def test_restore_without_backup_is_an_error(home: Path) -> None:
    with pytest.raises(AuthFileError, match="no backup"):
        restore_auth_strategy()


def test_a_corrupt_file_can_be_reset_and_is_backed_up_verbatim(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "auth_strategy.json").write_bytes(b"{oops")
    backup = reset_auth_strategy()
    assert backup is not None and backup.read_bytes() == b"{oops"
    with pytest.raises(AuthFileError):
        restore_auth_strategy()  # the newest backup is not a valid strategy
    assert not (home / "auth_strategy.json").exists()


# --------------------------------------------------------------------------- lines of code


def test_counts_code_comments_and_blanks(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("# comment\ncode = 1\n\ndef f():\n    pass\n")
    r = count_lines_of_code(f)
    assert (r.total_lines, r.code_lines, r.comment_lines, r.blank_lines) == (5, 3, 1, 1)
    assert r.effective_lines == 3
    assert not r.looks_generated and not r.looks_like_data and r.warnings == ()
    assert count_lines_of_code(str(f)) == r


def test_empty_file_is_zero(tmp_path: Path) -> None:
    f = tmp_path / "empty.py"
    f.write_text("")
    assert count_lines_of_code(f).code_lines == 0


def test_c_like_comments(tmp_path: Path) -> None:
    f = tmp_path / "m.ts"
    f.write_text("// a\n/* b\n * c\n */\nconst x = 1;\n# not a comment in ts\n")
    r = count_lines_of_code(f)
    assert (r.code_lines, r.comment_lines) == (2, 4)


@pytest.mark.parametrize(
    ("source", "code", "comments"),
    [
        # a block comment opened after code: its lines were counted as code
        ("int x; /* why:\n   one\n   two\n */\nint y;\n", 2, 3),
        # code after a comment closes on its line was counted as a comment
        ("/* a */ int x;\nint y;\n", 2, 0),
        ("/* a\n b */ int x;\n", 1, 1),
        # comment openers in strings and line comments open nothing
        ('const glob = "src/*.ts";\nlet y = 1;\n', 2, 0),
        ("const glob = `src/*.ts`;\nlet y = 1;\n", 2, 0),
        ("// see /* here\nlet y = 1;\n", 1, 1),
        ("let a = 1; // x /* y\nlet b = 2;\n", 2, 0),
        ("/* one */ /* two */\nlet y = 1;\n", 1, 1),
    ],
)
def test_block_comments_are_told_from_code_anywhere_on_a_line(
    tmp_path: Path, source: str, code: int, comments: int
) -> None:
    f = tmp_path / "m.ts"
    f.write_text(source)
    r = count_lines_of_code(f)
    assert (r.code_lines, r.comment_lines) == (code, comments)


@pytest.mark.parametrize(
    "header",
    [
        "# Code generated by protoc-gen-go. DO NOT EDIT.",
        "# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler.  DO NOT EDIT!",
        "// @generated by tool",
        '// Code generated by "stringer -type=Pill"; DO NOT EDIT.',
        '"""This file is autogenerated; edits will be lost."""',
    ],
)
def test_generated_files_are_flagged(tmp_path: Path, header: str) -> None:
    f = tmp_path / "gen.py"
    f.write_text(header + "\n" + "x = call()\n" * 3000)
    r = count_lines_of_code(f)
    assert r.looks_generated
    assert r.generated_reason is not None and "line" in r.generated_reason
    assert any("generated" in w for w in r.warnings)
    assert r.code_lines >= 3000


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("stubgen.py", 'HEADER = "# Code generated by stubgen. DO NOT EDIT.\\n"\n'),
        ("banner.go", 'const banner = "// Code generated by gen. DO NOT EDIT."\n'),
        ("check.py", 'if "@generated" in text:\n    skip()\n'),
    ],
)
def test_a_marker_in_a_string_of_code_is_not_a_header(
    tmp_path: Path, name: str, source: str
) -> None:
    # the hand-written code of a generator (the header it writes, the marker it looks
    # for) was flagged "looks generated ...: consider excluding it"
    f = tmp_path / name
    f.write_text(source + "x = call()\n" * 50)
    r = count_lines_of_code(f)
    assert not r.looks_generated, r.generated_reason


def test_a_marker_deep_in_the_file_is_not_a_header(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("x = 1\n" * 100 + "# DO NOT EDIT below\n")
    assert not count_lines_of_code(f).looks_generated


def test_literal_tables_are_flagged_as_data(tmp_path: Path) -> None:
    f = tmp_path / "table.py"
    rows = "".join(
        f'    ({i}, "name-{i}", 0x{i:04x}, {i * 1.5}, True, None),\n' for i in range(500)
    )
    f.write_text("TABLE = [\n" + rows + "]\n\ndef lookup(i):\n    return TABLE[i]\n")
    r = count_lines_of_code(f)
    assert r.looks_like_data
    assert r.data_reason is not None and "literal" in r.data_reason
    assert r.literal_lines >= 500


@pytest.mark.parametrize(
    ("suffix", "row"),
    [
        (".py", '    "#{i:06x}",  # a colour\n'),
        (".py", '    ("https://example.com/doc#part-{i}", {i}),\n'),
        (".c", "    0x{i:02x}, 0x{i:02x}, /* {i} */\n"),
        (".js", '  [{i}, "n{i}"], // row {i}\n'),
        (".sql", "  ({i}, 'n{i}'), -- row\n"),
    ],
    ids=["colours", "links", "c-block-comments", "js-line-comments", "sql-comments"],
)
def test_a_data_table_with_comments_or_a_hash_in_strings_is_flagged(
    tmp_path: Path, suffix: str, row: str
) -> None:
    # a '#' inside a string was taken for a comment's start, cutting the string open,
    # and the comments of other languages (//, /* */, --) were taken for code: 0
    # literal lines, and a 200-row table of colours, links or bytes counted as code
    f = tmp_path / f"table{suffix}"
    f.write_text("TABLE = [\n" + "".join(row.format(i=i) for i in range(200)) + "]\n")
    r = count_lines_of_code(f)
    assert r.literal_lines == 200
    assert r.looks_like_data and r.data_reason is not None and "literal" in r.data_reason


def test_ordinary_code_is_not_data(tmp_path: Path) -> None:
    f = tmp_path / "code.py"
    f.write_text("".join(f"def f{i}(a, b):\n    return a + b * {i}\n" for i in range(200)))
    r = count_lines_of_code(f)
    assert not r.looks_like_data


def test_very_long_lines_count_as_line_equivalents(tmp_path: Path) -> None:
    f = tmp_path / "min.js"
    f.write_text("var a=" + "1," * 30_000 + "0;\n")
    r = count_lines_of_code(f)
    assert r.code_lines == 1
    assert r.looks_like_data and r.data_reason is not None
    assert r.effective_lines > 400  # not "a one-line, small module"
    strategy = AuthStrategy(subscription_tier="max")
    assert strategy.size_category(r.effective_lines) != "small"


def test_missing_directory_and_binary_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceFileError, match="no such file"):
        count_lines_of_code(tmp_path / "nope.py")
    with pytest.raises(SourceFileError, match="directory"):
        count_lines_of_code(tmp_path)
    binary = tmp_path / "blob.py"
    binary.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(SourceFileError, match="binary") as info:
        count_lines_of_code(binary)
    assert info.value.path == binary
    assert isinstance(info.value, OSError)


def test_a_fifo_is_refused_rather_than_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    with pytest.raises(SourceFileError, match="not a regular file"):
        count_lines_of_code(fifo)


def test_undecodable_text_is_counted_and_flagged_never_zero(tmp_path: Path) -> None:
    f = tmp_path / "latin1.py"
    f.write_bytes("name = 'café'\nother = 'naïve'\n".encode("latin-1"))
    r = count_lines_of_code(f)
    assert r.code_lines == 2
    assert r.decode_errors == 2
    assert any("UTF-8" in w for w in r.warnings)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_text_with_a_byte_order_mark_is_counted_not_called_binary(
    tmp_path: Path, encoding: str
) -> None:
    # Windows tools (Visual Studio, Windows PowerShell's Out-File) save UTF-16 with a
    # BOM: every ASCII character holds a NUL byte, which read as "looks binary"
    f = tmp_path / "Program.cs"
    text = "// entry point\nclass Program\n{\n    static void Main() { }\n}\n"
    bom = "\ufeff" if encoding in ("utf-16-le", "utf-16-be") else ""
    f.write_bytes((bom + text).encode(encoding))
    r = count_lines_of_code(f)
    assert (r.total_lines, r.code_lines, r.comment_lines) == (5, 4, 1)
    assert r.decode_errors == 0 and r.warnings == ()


def test_nul_characters_in_utf16_text_are_binary(tmp_path: Path) -> None:
    f = tmp_path / "blob.py"
    f.write_bytes("x = 1\n\x00\x00\x01".encode("utf-16"))
    with pytest.raises(SourceFileError, match="binary"):
        count_lines_of_code(f)


@pytest.mark.parametrize("separator", ["\x0c", "\u2028", "\u2029", "\x0b", "\x1c", "\x85"])
def test_only_physical_line_breaks_start_a_line(tmp_path: Path, separator: str) -> None:
    f = tmp_path / "one_line.py"
    f.write_text('s = "' + ("a" + separator) * 1000 + '"\n', encoding="utf-8", newline="")
    r = count_lines_of_code(f)
    assert (r.total_lines, r.code_lines) == (1, 1)


def test_lf_crlf_and_cr_each_end_a_line(tmp_path: Path) -> None:
    f = tmp_path / "mixed.py"
    f.write_bytes(b"a = 1\nb = 2\r\nc = 3\rd = 4")
    assert count_lines_of_code(f).code_lines == 4


async def test_async_count(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("a = 1\n")
    assert (await empathy_models.auth.acount_lines_of_code(f)).code_lines == 1


def test_saving_over_a_newer_file_keeps_the_settings_this_version_does_not_know(
    tmp_path: Path,
) -> None:
    # A newer release wrote a field this one does not know; updating one known field
    # (what `auth setup --mode api` does) must not drop it nor downgrade "v".
    file = tmp_path / "auth_strategy.json"
    file.write_text(
        json.dumps(
            {"v": 2, "subscription_tier": "max", "budget_alerts": {"monthly": 50}, "future": 1}
        )
    )
    AuthStrategy.load(file).replace(default_mode=AuthMode.API).save(file)
    data = json.loads(file.read_text())
    assert data["budget_alerts"] == {"monthly": 50} and data["future"] == 1
    assert data["v"] == 2 and next(iter(data)) == "v"
    assert data["default_mode"] == "api" and data["subscription_tier"] == "max"
    assert AuthStrategy.load(file).default_mode is AuthMode.API


@pytest.mark.parametrize("multiplier", [1e308, 10**400, 1e7], ids=["1e308", "10**400", "1e7"])
def test_a_multiplier_no_line_of_code_can_have_is_rejected_naming_the_field(
    multiplier: float, tmp_path: Path
) -> None:
    # 1e308 tokens per line passed validation and made estimate_tokens() raise
    # OverflowError; 10**400 in the file made load() raise OverflowError
    with pytest.raises(RecordValidationError, match="loc_to_tokens_multiplier"):
        AuthStrategy(loc_to_tokens_multiplier=multiplier)
    file = tmp_path / "auth_strategy.json"
    file.write_text(f'{{"v": 1, "loc_to_tokens_multiplier": {multiplier!r}}}')
    with pytest.raises(AuthFileError, match="loc_to_tokens_multiplier"):
        AuthStrategy.load(file)


def test_the_largest_multiplier_accepted_still_estimates() -> None:
    strategy = AuthStrategy(loc_to_tokens_multiplier=10_000)
    assert strategy.estimate_tokens(10**6) == 10**10


def test_a_newer_file_with_a_value_this_version_does_not_know_says_to_upgrade(
    tmp_path: Path,
) -> None:
    # a newer release added a tier: the fix is upgrading, not editing or moving the file
    # away (which would drop the newer release's settings)
    file = tmp_path / "auth_strategy.json"
    file.write_text(json.dumps({"v": 2, "subscription_tier": "team", "future": 1}))
    with pytest.raises(AuthFileError) as info:
        AuthStrategy.load(file)
    message = str(info.value)
    assert str(file) in message and "subscription_tier" in message
    assert "newer" in message and "upgrade empathy-models" in message
    assert "move the file away" not in message
    assert info.value.path == file


def test_a_long_line_of_escaped_quotes_is_counted_not_stuck(tmp_path: Path) -> None:
    # a line of escaped JSON whose opening quote is on an earlier line (inside a
    # triple-quoted string, say): the literal check retried every escaped quote to the
    # end of the line, quadratic (about 4 s for 40,000 characters, hours for this line);
    # linear it is instant, so the suite's timeout is the failure here
    source = tmp_path / "fixtures.py"
    source.write_text('DATA = """\n{' + '\\"k\\": 1, ' * 100_000 + '}\n"""\n')
    report = count_lines_of_code(source)
    assert (report.total_lines, report.code_lines) == (3, 3)
    assert report.looks_like_data


# --------------------------------------------------------------------------- not a regular file


def _refused(file: Path, info: pytest.ExceptionInfo[AuthFileError]) -> None:
    assert info.value.path == file
    assert f"{file}: not a regular file" in str(info.value)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_read_that_fails_once_the_file_is_open_leaves_no_descriptor_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "auth_strategy.json"
    AuthStrategy().save(file)

    def no_memory(*args: object, **kwargs: object) -> object:
        raise MemoryError

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fdopen", no_memory)
    for _ in range(3):
        with pytest.raises(MemoryError):
            AuthStrategy.load(file)
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.timeout(30)
def test_a_fifo_as_the_strategy_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    # nobody ever writes to the FIFO: reading it would wait forever
    file = tmp_path / "auth_strategy.json"
    os.mkfifo(file)
    for call in (
        lambda: AuthStrategy.load(file),
        lambda: AuthStrategy.load_existing(file),
        lambda: AuthStrategy().save(file),
        lambda: AuthStrategy.update(file, small_module_threshold=7),
    ):
        with pytest.raises(AuthFileError) as info:
            call()
        _refused(file, info)
    assert stat.S_ISFIFO(os.lstat(file).st_mode)  # left in place


@pytest.mark.timeout(30)
def test_restore_over_a_fifo_or_from_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    file = tmp_path / "auth_strategy.json"
    AuthStrategy(small_module_threshold=7).save(file)
    backup = reset_auth_strategy(file)
    assert backup is not None
    os.mkfifo(file)
    with pytest.raises(AuthFileError) as info:
        restore_auth_strategy(file)
    _refused(file, info)
    assert stat.S_ISFIFO(os.lstat(file).st_mode)
    fifo_backup = tmp_path / "fifo.bak"
    os.mkfifo(fifo_backup)
    with pytest.raises(AuthFileError) as info:
        restore_auth_strategy(tmp_path / "other.json", backup=fifo_backup)
    _refused(fifo_backup, info)


@pytest.mark.timeout(30)
def test_reset_of_a_symlink_to_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "auth_strategy.json"
    link.symlink_to(fifo)
    with pytest.raises(AuthFileError) as info:
        reset_auth_strategy(link)
    assert "not a regular file" in str(info.value)
    assert link.is_symlink() and list_auth_strategy_backups(link) == []


@pytest.mark.parametrize("below", ["auth_strategy.json", "deeper/auth_strategy.json"])
def test_a_file_where_the_directory_should_be_is_named_as_not_a_directory(
    tmp_path: Path, below: str
) -> None:
    blocker = tmp_path / "home"
    blocker.write_text("x")
    file = blocker / below
    for call in (
        lambda: AuthStrategy.load(file),
        lambda: AuthStrategy().save(file),
        lambda: AuthStrategy.update(file, small_module_threshold=7),
        lambda: reset_auth_strategy(file),
    ):
        with pytest.raises(AuthFileError) as info:
            call()
        assert f"{blocker} is not a directory" in str(info.value)
    assert blocker.read_text() == "x"


# a save killed (SIGKILL) after writing its temporary file, before renaming it
_KILLED_BEFORE_THE_RENAME = """
import os, signal, sys
from empathy_models.auth import AuthStrategy

def hook(event, args):
    if event == "os.rename" and str(args[0]).endswith(".tmp"):
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
AuthStrategy(small_module_threshold=7).save(sys.argv[1])
"""


def _killed_save(file: Path) -> Path:
    before = set(file.parent.glob(f".{file.name}.*.tmp"))
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_THE_RENAME, str(file)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == -9, result.stderr
    (left,) = set(file.parent.glob(f".{file.name}.*.tmp")) - before
    return left


def test_temporary_files_of_killed_saves_are_removed_by_a_later_save(tmp_path: Path) -> None:
    file = tmp_path / "auth_strategy.json"
    AuthStrategy(small_module_threshold=1).save(file)
    stale = _killed_save(file)
    hour_ago = stale.stat().st_mtime - 3600
    os.utime(stale, (hour_ago, hour_ago))  # as after an hour
    recent = _killed_save(file)  # could still be a save in progress elsewhere: kept
    others = [tmp_path / ".auth_strategy.json.notes.tmp", tmp_path / ".other.json.abcd1234.tmp"]
    for other in others:
        other.write_text("mine")
        os.utime(other, (hour_ago, hour_ago))
    AuthStrategy(small_module_threshold=2).save(file)
    assert not stale.exists()
    assert recent.exists() and all(other.exists() for other in others)
    assert AuthStrategy.load(file).small_module_threshold == 2


def test_a_file_too_large_for_a_module_is_refused_before_it_is_read_whole(
    tmp_path: Path,
) -> None:
    # counting reads the whole file and splits it into lines: a multi-GB file would
    # exhaust memory
    big = tmp_path / "huge.py"
    line = b"x = 1\n"
    big.write_bytes(line * ((32 * 1024 * 1024) // len(line) + 1))
    with pytest.raises(SourceFileError) as info:
        count_lines_of_code(big)
    assert info.value.path == big
    assert str(info.value) == (
        f"{big}: too large to count ({big.stat().st_size:,} bytes; the limit is "
        "33,554,432): not a hand-written module"
    )


def test_reset_of_a_fifo_is_refused_leaving_it(tmp_path: Path) -> None:
    # moved into a "backup" before, which no listing showed, no restore could read and
    # no pruning removed
    file = tmp_path / "auth_strategy.json"
    os.mkfifo(file)
    with pytest.raises(AuthFileError) as info:
        reset_auth_strategy(file)
    _refused(file, info)
    assert stat.S_ISFIFO(os.lstat(file).st_mode)
    assert os.listdir(tmp_path) == ["auth_strategy.json"]
