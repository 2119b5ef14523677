"""Settings: where each value comes from, what is refused, and how the refusal reads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from crm_syncd import macos
from crm_syncd.settings import (
    ConfigError,
    Settings,
    config_warnings,
    load_settings,
    secure_dir,
    secure_file,
    space_problem,
)
from tests.harness.processes import in_process_home

SECRET = "sk-live-7d1f0c2b9a"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HOME with no crm-syncd environment and an empty Keychain."""
    home = in_process_home(tmp_path, monkeypatch)
    monkeypatch.setattr(macos, "keychain_api_key", lambda: None)
    return home


def write_toml(home: Path, text: str, mode: int = 0o600) -> Path:
    path = home / ".config" / "crm-syncd" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def write_legacy(home: Path, data: dict | str) -> Path:
    path = home / ".crm-sync-config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(0o600)
    return path


def config_error(**overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- where values come from ---------------------------------------------------------------------

def test_defaults_apply_when_nothing_is_configured(home):
    s = load_settings()
    assert s.api_url == "http://localhost:3000"
    assert s.api_key is None
    assert s.default_region == "US"
    assert s.initial_lookback_days == 365
    assert s.create_unknown_contacts is True
    assert s.group_messages == "each-participant"
    assert s.dedupe_against_crm == "auto"
    assert (s.debounce_ms, s.max_wait_ms, s.push_concurrency, s.batch_size) == (250, 2000, 8, 2000)
    assert s.heartbeat_url is None and s.allow_insecure_http is False
    assert s.config_file is None


def test_default_paths_follow_home_at_load_time_not_import_time(home, tmp_path, monkeypatch):
    s = load_settings()
    assert s.messages_db == home / "Library/Messages/chat.db"
    assert s.calls_db == home / "Library/Application Support/CallHistoryDB/CallHistory.storedata"
    assert s.addressbook_dir == home / "Library/Application Support/AddressBook"
    assert s.state_dir == home / "Library/Application Support/crm-syncd"
    assert s.log_dir == home / "Library/Logs/crm-syncd"
    assert s.state_db == s.state_dir / "state.db"
    assert s.lock_path.parent == s.state_dir
    assert s.log_file.parent == s.log_dir

    other = tmp_path / "other-home"
    other.mkdir()
    monkeypatch.setenv("HOME", str(other))
    assert load_settings().messages_db == other / "Library/Messages/chat.db"


def test_tilde_in_configured_paths_means_home(home, monkeypatch):
    write_toml(home, 'state_dir = "~/state"\n')
    monkeypatch.setenv("CRM_SYNCD_LOG_DIR", "~/logs")
    s = load_settings()
    assert s.state_dir == home / "state"
    assert s.log_dir == home / "logs"


def test_toml_file_overrides_defaults(home):
    path = write_toml(home, 'api_url = "https://crm.example.com/"\ndefault_region = "gb"\n'
                            'initial_lookback_days = 30\ngroup_messages = "skip"\n')
    s = load_settings()
    assert s.api_url == "https://crm.example.com"
    assert s.default_region == "GB"
    assert s.initial_lookback_days == 30
    assert s.group_messages == "skip"
    assert s.config_file == path


def test_env_overrides_toml(home, monkeypatch):
    write_toml(home, 'initial_lookback_days = 30\ndefault_region = "GB"\n')
    monkeypatch.setenv("CRM_SYNCD_INITIAL_LOOKBACK_DAYS", "7")
    s = load_settings()
    assert s.initial_lookback_days == 7
    assert s.default_region == "GB"


def test_explicit_overrides_beat_env_and_unset_ones_are_ignored(home, monkeypatch):
    monkeypatch.setenv("CRM_SYNCD_INITIAL_LOOKBACK_DAYS", "7")
    monkeypatch.setenv("CRM_SYNCD_DEFAULT_REGION", "FR")
    s = load_settings(initial_lookback_days=1, default_region=None)
    assert s.initial_lookback_days == 1
    assert s.default_region == "FR"


def test_config_path_can_be_moved_by_env(home, monkeypatch, tmp_path):
    elsewhere = tmp_path / "crm.toml"
    elsewhere.write_text("push_concurrency = 3\n")
    monkeypatch.setenv("CRM_SYNCD_CONFIG", str(elsewhere))
    write_toml(home, "push_concurrency = 5\n")
    assert load_settings().push_concurrency == 3


def test_a_named_config_file_that_is_missing_is_an_error(home, monkeypatch, tmp_path):
    monkeypatch.setenv("CRM_SYNCD_CONFIG", str(tmp_path / "nope.toml"))
    message = config_error()
    assert "nope.toml" in message and "CRM_SYNCD_CONFIG" in message


def test_legacy_json_is_read_when_there_is_no_toml(home):
    path = write_legacy(home, {"api_url": "https://old.example.com", "api_key": SECRET,
                               "initial_lookback_days": 90, "create_unknown_contacts": False,
                               "default_region": "de", "lastSync": 12345})
    s = load_settings()
    assert s.api_url == "https://old.example.com"
    assert s.api_key is not None and s.api_key.get_secret_value() == SECRET
    assert s.initial_lookback_days == 90
    assert s.create_unknown_contacts is False
    assert s.default_region == "DE"
    assert s.config_file == path


def test_a_lan_http_url_in_legacy_json_is_accepted_once_the_error_s_advice_is_followed(home):
    write_legacy(home, {"api_url": "http://192.168.1.20:3000"})
    with pytest.raises(ConfigError, match="allow_insecure_http = true"):
        load_settings()

    write_legacy(home, {"api_url": "http://192.168.1.20:3000", "allow_insecure_http": True})

    assert load_settings().api_url == "http://192.168.1.20:3000"


def test_legacy_json_is_ignored_once_a_toml_file_exists(home):
    write_legacy(home, {"initial_lookback_days": 90, "default_region": "DE"})
    write_toml(home, "initial_lookback_days = 10\n")
    s = load_settings()
    assert s.initial_lookback_days == 10
    assert s.default_region == "US"
    assert any("legacy" in w and ".crm-sync-config.json" in w for w in config_warnings(s))


def test_env_overrides_legacy_json(home, monkeypatch):
    write_legacy(home, {"initial_lookback_days": 90})
    monkeypatch.setenv("CRM_SYNCD_INITIAL_LOOKBACK_DAYS", "3")
    assert load_settings().initial_lookback_days == 3


def test_api_key_comes_from_the_keychain_only_when_not_configured(home, monkeypatch):
    monkeypatch.setattr(macos, "keychain_api_key", lambda: "from-keychain")
    assert load_settings().api_key.get_secret_value() == "from-keychain"
    monkeypatch.setenv("CRM_SYNCD_API_KEY", SECRET)
    monkeypatch.setattr(macos, "keychain_api_key", lambda: pytest.fail("keychain asked needlessly"))
    assert load_settings().api_key.get_secret_value() == SECRET


def test_keychain_lookup_is_silent_without_keyring(monkeypatch):
    monkeypatch.setitem(sys.modules, "keyring", None)  # makes `import keyring` fail
    assert macos.keychain_api_key() is None


# --- what is refused, and how it reads -----------------------------------------------------------

def test_unknown_region_names_setting_value_and_env_source(home, monkeypatch):
    monkeypatch.setenv("CRM_SYNCD_DEFAULT_REGION", "XX")
    message = config_error()
    assert message.startswith(
        "invalid setting default_region = 'XX' (from env CRM_SYNCD_DEFAULT_REGION): not a known region")


def test_invalid_value_in_toml_names_the_file(home):
    path = write_toml(home, "push_concurrency = 100\n")
    message = config_error()
    assert message.startswith(f"invalid setting push_concurrency = 100 (from {path}): ")


def test_invalid_value_in_legacy_json_names_the_file(home):
    path = write_legacy(home, {"initial_lookback_days": -1})
    assert f"invalid setting initial_lookback_days = -1 (from {path})" in config_error()


def test_invalid_override_is_attributed_to_the_command_line(home):
    message = config_error(group_messages="all")
    assert "group_messages = 'all' (from command line)" in message


@pytest.mark.parametrize("setting, value", [
    ("initial_lookback_days", "-1"),
    ("push_concurrency", "0"),
    ("push_concurrency", "65"),
    ("dedupe_against_crm", "maybe"),
    ("group_messages", "all"),
    ("create_unknown_contacts", "perhaps"),
    ("heartbeat_url", "ftp://hc.example.com/ping"),
    ("heartbeat_url", "http://127.0.0.1:99999/ping"),  # a port no request can reach
    ("api_url", "http://localhost:0"),
    ("api_url", "not a url"),
    ("request_timeout_s", "inf"),  # a wait that never ends
    ("shutdown_deadline_s", "inf"),
])
def test_each_invalid_setting_is_named_with_its_env_source(home, monkeypatch, setting, value):
    monkeypatch.setenv(f"CRM_SYNCD_{setting.upper()}", value)
    message = config_error()
    assert message.startswith(f"invalid setting {setting} = {value!r} (from env CRM_SYNCD_{setting.upper()}): ")


@pytest.mark.parametrize("setting", ["state_dir", "log_dir", "messages_db", "calls_db", "addressbook_dir"])
@pytest.mark.parametrize("value, why", [("", "must not be empty"), ("  ", "must not be empty"),
                                        ("crm-state", "must be an absolute path"),
                                        ("./crm-state", "must be an absolute path")])
def test_an_empty_or_relative_path_setting_is_refused_not_taken_as_the_current_folder(
        home, monkeypatch, setting, value, why):
    monkeypatch.setenv(f"CRM_SYNCD_{setting.upper()}", value)  # `export CRM_SYNCD_STATE_DIR=$STATE`, $STATE unset

    message = config_error()

    assert message.startswith(f"invalid setting {setting} = {value!r} (from env CRM_SYNCD_{setting.upper()}): {why}")


def test_a_relative_path_in_toml_is_refused_naming_the_file(home):
    path = write_toml(home, 'state_dir = "crm-state"\n')
    assert config_error().startswith(f"invalid setting state_dir = 'crm-state' (from {path}): must be an absolute")


def test_unknown_setting_in_toml_is_refused(home):
    path = write_toml(home, 'api_ur = "https://crm.example.com"\n')
    assert config_error() == f"unknown setting 'api_ur' (from {path})"


@pytest.mark.parametrize("write", [
    lambda home: write_toml(home, 'api_url = "https://x\n'),
    lambda home: write_legacy(home, '{"api_url": '),
])
def test_unparsable_config_file_is_a_config_error_naming_it(home, write):
    path = write(home)
    assert f"cannot parse config file {path}" in config_error()


def test_plain_http_to_another_host_is_refused(home, monkeypatch):
    monkeypatch.setenv("CRM_SYNCD_API_URL", "http://crm.example.com")
    message = config_error()
    assert "api_url" in message and "CRM_SYNCD_API_URL" in message and "https" in message


def test_plain_http_to_another_host_is_allowed_when_asked_for(home, monkeypatch):
    monkeypatch.setenv("CRM_SYNCD_API_URL", "http://crm.lan:3000")
    monkeypatch.setenv("CRM_SYNCD_ALLOW_INSECURE_HTTP", "true")
    assert load_settings().api_url == "http://crm.lan:3000"


@pytest.mark.parametrize("url", ["http://localhost:3000", "http://127.0.0.1:3000",
                                 "http://127.8.9.10", "http://[::1]:3000", "https://crm.example.com"])
def test_loopback_http_and_any_https_are_allowed(home, url):
    assert load_settings(api_url=url).api_url == url


# --- secrets and file permissions ----------------------------------------------------------------

def test_api_key_never_appears_in_repr_str_or_errors(home, monkeypatch):
    monkeypatch.setenv("CRM_SYNCD_API_KEY", SECRET)
    s = load_settings()
    assert s.api_key.get_secret_value() == SECRET
    assert SECRET not in repr(s) and SECRET not in str(s)

    monkeypatch.setenv("CRM_SYNCD_DEFAULT_REGION", "XX")
    assert SECRET not in config_error()

    monkeypatch.delenv("CRM_SYNCD_DEFAULT_REGION")
    monkeypatch.setenv("CRM_SYNCD_API_KEY", SECRET + " trailing words")
    message = config_error()
    assert message.startswith("invalid setting api_key (from env CRM_SYNCD_API_KEY): ")
    assert SECRET not in message


def test_world_readable_config_file_gets_a_chmod_warning(home):
    path = write_toml(home, f'api_key = "{SECRET}"\n', mode=0o644)
    warnings = config_warnings(load_settings())
    assert len(warnings) == 1
    assert str(path) in warnings[0] and "chmod 600" in warnings[0]
    assert SECRET not in warnings[0]

    path.chmod(0o640)
    assert any("chmod 600" in w for w in config_warnings(load_settings()))
    path.chmod(0o600)
    assert config_warnings(load_settings()) == []


@pytest.mark.parametrize("variable, meant", [("CRM_SYNCD_LOOKBACK_DAYS", "CRM_SYNCD_INITIAL_LOOKBACK_DAYS"),
                                             ("CRM_SYNCD_APIKEY", "CRM_SYNCD_API_KEY")])
def test_a_misspelt_environment_variable_gets_a_warning_naming_it_and_the_setting_it_looks_like(
        home, monkeypatch, variable, meant):
    monkeypatch.setenv(variable, SECRET)

    warnings = config_warnings(load_settings())

    assert len(warnings) == 1 and variable in warnings[0] and f"did you mean {meant}?" in warnings[0], warnings
    assert SECRET not in warnings[0]


def test_crm_syncd_variables_that_are_read_are_no_warning(home, monkeypatch, tmp_path):
    config = write_toml(home, "initial_lookback_days = 30\n")
    monkeypatch.setenv("CRM_SYNCD_CONFIG", str(config))
    monkeypatch.setenv("CRM_SYNCD_DEFAULT_REGION", "CA")
    monkeypatch.setenv("crm_syncd_group_messages", "skip")  # the settings' names are read in any case

    assert config_warnings(load_settings()) == []


def test_secure_dir_and_file_are_private(tmp_path):
    d = secure_dir(tmp_path / "a" / "state")
    f = secure_file(d / "state.db")
    assert d.stat().st_mode & 0o777 == 0o700
    assert f.stat().st_mode & 0o777 == 0o600
    d.chmod(0o755)  # a folder that exists is the owner's choice; the file in it is ours
    f.chmod(0o644)
    secure_dir(d)
    secure_file(f)
    assert (d.stat().st_mode & 0o777, f.stat().st_mode & 0o777) == (0o755, 0o600)
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        secure_dir(f)


def test_settings_class_reads_the_same_sources_without_load_settings(home, monkeypatch):
    write_toml(home, "batch_size = 50\n")
    monkeypatch.setenv("CRM_SYNCD_MAX_WAIT_MS", "10")
    s = Settings()
    assert (s.batch_size, s.max_wait_ms) == (50, 10)


def test_a_state_folder_on_a_nearly_full_disk_is_flagged_with_what_is_free(tmp_path: Path, monkeypatch) -> None:
    """`doctor` flags it (its state-folder check): a full disk stops the daemon part-way through a write.
    os.statvfs answers as a disk with 3 MiB free would (a full volume needs root to make)."""
    real = os.statvfs(tmp_path)
    assert space_problem(tmp_path / "not-made-yet") is None  # the test machine's disk has room
    nearly_full = os.statvfs_result((real.f_bsize, 4096, real.f_blocks, 768, 768, *real[5:]))
    monkeypatch.setattr(os, "statvfs", lambda path: nearly_full)
    assert space_problem(tmp_path / "not-made-yet") == "only 3.0 MiB free on its disk (crm-syncd needs 32 MiB)"
