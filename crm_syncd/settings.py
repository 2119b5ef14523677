"""Configuration: command-line overrides > env (CRM_SYNCD_*) > config file > defaults.

The config file is TOML at `~/.config/crm-syncd/config.toml` (or `$CRM_SYNCD_CONFIG`). When that
file is absent, the legacy `~/.crm-sync-config.json` of the old sync script is read instead, so
existing users keep their settings. `~` is resolved from HOME when settings are loaded.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import json
import os
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import phonenumbers
from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "CRM_SYNCD_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
NOT_SETTINGS = frozenset({CONFIG_ENV})  # CRM_SYNCD_* variables crm-syncd reads that name no setting
LEGACY_KEYS = ("api_url", "api_key", "initial_lookback_days", "create_unknown_contacts", "default_region",
               "allow_insecure_http")  # the last: what the error for a LAN http:// api_url says to add
_SECRET_FIELDS = frozenset({"api_key"})
MIN_FREE_BYTES = 32 * 2**20  # `doctor` flags a state folder whose disk has less free (`space_problem`)
PATH_FIELDS = ("messages_db", "calls_db", "addressbook_dir", "state_dir", "log_dir")


class ConfigError(Exception):
    """A setting is invalid; the message is one line naming the setting and its source."""


def _home() -> Path:
    return Path("~").expanduser()


def _under_home(relative: str):
    return lambda: _home() / relative


def default_config_path() -> Path:
    return _home() / ".config" / "crm-syncd" / "config.toml"


def legacy_config_path() -> Path:
    return _home() / ".crm-sync-config.json"


def config_file_path() -> tuple[Path | None, bool]:
    """The config file to read now and whether it was named explicitly by $CRM_SYNCD_CONFIG.

    Returns (None, False) when neither the TOML file nor the legacy JSON file exists.
    """
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:  # made absolute: advice naming `crm.toml` would depend on the folder it is read in
        return Path(os.path.abspath(Path(explicit).expanduser())), True
    for candidate in (default_config_path(), legacy_config_path()):
        if candidate.exists():
            return candidate, False
    return None, False


def config_file_to_edit() -> str:
    """The config file to tell the owner to edit: the one crm-syncd reads ($CRM_SYNCD_CONFIG's, or the legacy
    JSON while it stands in for the TOML), else the default one, as `~/…`."""
    path = config_file_path()[0]
    return "~/.config/crm-syncd/config.toml" if path in (None, default_config_path()) else str(path)


def api_key_places() -> str:
    """Where the API key goes, for advice when none is set."""
    return f"{config_file_to_edit()}, {ENV_PREFIX}API_KEY or the Keychain"


def read_config_file() -> tuple[Path | None, dict[str, Any]]:
    """The config file in use and its settings; ConfigError if it cannot be read or parsed."""
    path, explicit = config_file_path()
    if path is None:
        return None, {}
    if explicit and not path.exists():
        raise ConfigError(f"config file {path} (from env {CONFIG_ENV}) does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"cannot parse config file {path}: expected a JSON object")
        if path == legacy_config_path():
            data = {k: data[k] for k in LEGACY_KEYS if k in data}
        return path, data
    try:
        return path, tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML (or legacy JSON) config file as a settings source."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole file

    def __call__(self) -> dict[str, Any]:
        return read_config_file()[1]


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        port = parts.port  # raises on 99999 or "x"
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return value


class Settings(BaseSettings):
    """Everything crm-syncd can be configured with (see module docstring for precedence)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # Declared before api_url so that api_url's validator can see it.
    allow_insecure_http: bool = False
    api_url: str = "http://localhost:3000"
    api_key: SecretStr | None = None
    default_region: str = "US"
    initial_lookback_days: int = Field(365, ge=0)
    create_unknown_contacts: bool = True
    group_messages: Literal["each-participant", "skip"] = "each-participant"
    dedupe_against_crm: Literal["auto", "on", "off"] = "auto"

    messages_db: Path = Field(default_factory=_under_home("Library/Messages/chat.db"))
    calls_db: Path = Field(
        default_factory=_under_home("Library/Application Support/CallHistoryDB/CallHistory.storedata"))
    addressbook_dir: Path = Field(default_factory=_under_home("Library/Application Support/AddressBook"))
    state_dir: Path = Field(default_factory=_under_home("Library/Application Support/crm-syncd"))
    log_dir: Path = Field(default_factory=_under_home("Library/Logs/crm-syncd"))

    debounce_ms: int = Field(250, ge=0)
    max_wait_ms: int = Field(2000, ge=0)
    safety_probe_s: float = Field(60, gt=0, allow_inf_nan=False)
    contacts_rescan_s: float = Field(60, gt=0, allow_inf_nan=False)
    push_concurrency: int = Field(8, ge=1, le=64)
    batch_size: int = Field(2000, ge=1)
    request_timeout_s: float = Field(10, gt=0, allow_inf_nan=False)
    shutdown_deadline_s: float = Field(10, gt=0, allow_inf_nan=False)
    max_ambiguous_retries: int = Field(3, ge=0)
    heartbeat_url: str | None = None
    heartbeat_interval_s: float = Field(300, gt=0, allow_inf_nan=False)

    _config_file: Path | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):  # noqa: D102 - pydantic-settings hook
        return init_settings, env_settings, _ConfigFileSource(settings_cls)

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str, info) -> str:
        _check_url(value)
        parts = urlsplit(value)
        if parts.scheme == "http" and not _is_loopback(parts.hostname or "") \
                and not info.data.get("allow_insecure_http", False):
            raise ValueError("plain http:// is only allowed to this machine (localhost); use https:// "
                             "or set allow_insecure_http = true")
        return value.rstrip("/")

    @field_validator("heartbeat_url")
    @classmethod
    def _heartbeat_url(cls, value: str | None) -> str | None:
        return _check_url(value) if value else None

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else _checked_api_key(value.get_secret_value())

    @field_validator("default_region", mode="before")
    @classmethod
    def _region(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        region = value.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError("not a known region (use a two-letter code such as US, GB, DE)")
        return region

    @field_validator(*PATH_FIELDS, mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():  # Path("") would be the current folder
            raise ValueError("must not be empty")
        return value

    @field_validator(*PATH_FIELDS)
    @classmethod
    def _expand(cls, value: Path) -> Path:
        value = value.expanduser()
        if not value.is_absolute():  # would depend on the folder a command is started in
            raise ValueError("must be an absolute path (it may start with ~)")
        return value

    @property
    def api_key_value(self) -> str | None:
        """The API key in clear, for the Authorization header only."""
        return self.api_key.get_secret_value() if self.api_key else None

    @property
    def state_db(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "crm-syncd.lock"

    @property
    def stamp_path(self) -> Path:
        """How far each state database got (`Store.discontinuity`), kept apart from the state folder, so that
        a backup restored over that folder does not bring back an older stamp with it."""
        return Path.home() / "Library" / "Caches" / "crm-syncd" / "stamps.json"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "crm-syncd.log"

    @property
    def config_file(self) -> Path | None:
        """The config file these settings were read from (set by load_settings)."""
        return self._config_file


def _env_name(field: str) -> str | None:
    wanted = (ENV_PREFIX + field).lower()
    return next((name for name in os.environ if name.lower() == wanted), None)


def _source_of(field: str, overrides: dict[str, Any], file: Path | None,
               file_data: dict[str, Any]) -> str:
    if field in overrides:
        return "from command line"
    env = _env_name(field)
    if env is not None:
        return f"from env {env}"
    if field in file_data:
        return f"from {file}"
    return "default"


def where_set(field: str, otherwise: str) -> str:
    """Where the owner changes `field`: the environment variable or config file that set it (naming
    config.toml when the legacy JSON or a variable is what counts would send them the wrong way),
    else `otherwise`."""
    source = _source_of(field, {}, *read_config_file())
    return source.removeprefix("from ") if source != "default" else otherwise


def _describe(error: dict[str, Any], overrides: dict[str, Any], file: Path | None,
              file_data: dict[str, Any]) -> str:
    field = str(error["loc"][0]) if error.get("loc") else "?"
    source = _source_of(field, overrides, file, file_data)
    if error.get("type") == "extra_forbidden":
        return f"unknown setting {field!r} ({source})"
    message = error.get("msg", "invalid")
    message = message.removeprefix("Value error, ")
    if field in _SECRET_FIELDS:
        return f"invalid setting {field} ({source}): {message}"
    return f"invalid setting {field} = {error.get('input')!r} ({source}): {message}"


def _checked_api_key(key: str) -> SecretStr | None:
    """The key as sent in an HTTP header (visible ASCII), surrounding whitespace trimmed; None if empty."""
    key = key.strip()
    if not key:
        return None
    if not all("!" <= c <= "~" for c in key):  # the message never shows the key, nor which character it is
        raise ValueError("must be visible ASCII characters only, without whitespace or line breaks "
                         "(a curly quote or a line break pasted with it?)")
    return SecretStr(key)


def load_settings(**overrides: Any) -> Settings:
    """Load settings; `overrides` (e.g. CLI flags) win. None-valued overrides count as not given.

    The API key falls back to the macOS Keychain (service "crm-syncd", user "api_key") when no
    other source sets it. Raises ConfigError with a one-line message.
    """
    from crm_syncd import macos

    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        file, file_data = read_config_file()
        errors = exc.errors()
        line = _describe(errors[0], overrides, file, file_data)
        if len(errors) > 1:
            line += f" (and {len(errors) - 1} more)"
        raise ConfigError(line) from None
    settings._config_file = config_file_path()[0]
    if settings.api_key is None and (key := macos.keychain_api_key()):
        try:
            settings.api_key = _checked_api_key(key)
        except ValueError as exc:
            raise ConfigError(f"invalid setting api_key (the Keychain, service {macos.KEYCHAIN_SERVICE}, "
                              f"account {macos.KEYCHAIN_USER}): {exc}") from None
    return settings


def config_warnings(settings: Settings) -> list[str]:
    """Problems worth telling the user about that do not stop crm-syncd from running."""
    warnings: list[str] = []
    path = settings.config_file or config_file_path()[0]
    try:
        mode = path.stat().st_mode if path is not None else None
    except OSError:
        mode = None
    if mode is not None and mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(f"config file {path} can be read by other users and may hold the API key; "
                        f"fix with: chmod 600 '{path}'")
    legacy = legacy_config_path()
    if path is not None and path != legacy and legacy.exists():
        warnings.append(f"legacy config {legacy} is ignored because {path} exists; "
                        "delete it once its settings are moved over")
    return warnings + _unknown_env_warnings()


def names_setting(variable: str) -> bool:
    """Whether an environment variable sets one of the settings (`CRM_SYNCD_STATE_DIR`, in any case)."""
    return variable.upper().startswith(ENV_PREFIX) and variable[len(ENV_PREFIX):].lower() in Settings.model_fields


def _unknown_env_warnings() -> list[str]:
    """One line for each CRM_SYNCD_* variable that names no setting (a typo the settings ignore)."""
    fields = list(Settings.model_fields)
    warnings = []
    for name in sorted(os.environ):
        if not name.upper().startswith(ENV_PREFIX) or name in NOT_SETTINGS or names_setting(name):
            continue
        field = name[len(ENV_PREFIX):].lower()
        guess = difflib.get_close_matches(field, fields, n=1)
        hint = f"; did you mean {ENV_PREFIX}{guess[0].upper()}?" if guess else ""
        warnings.append(f"environment variable {name} is not a crm-syncd setting and is ignored{hint}")
    return warnings


def existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists."""
    while not path.exists():
        path = path.parent
    return path


def folder_problem(path: Path) -> str | None:
    """Why `path` could not be made or written in (found without making it), or None if it can."""
    try:
        nearest = existing_ancestor(Path(path))  # a parent one may not enter raises here
        if not nearest.is_dir():
            return f"{nearest} is not a folder"
        tempfile.TemporaryFile(dir=nearest).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def space_problem(path: Path) -> str | None:
    """Why the disk holding `path` is too full for crm-syncd's state, or None. The state database's WAL
    grows up to 32 MiB between checkpoints (store.WAL_PAGES pages of 4 KiB), so with less free a
    backfill may meet a full disk part-way."""
    try:
        fs = os.statvfs(existing_ancestor(Path(path)))
    except OSError:
        return None  # folder_problem says why the folder cannot be used
    free = fs.f_bavail * fs.f_frsize
    if free < MIN_FREE_BYTES:
        return f"only {free / 2**20:.1f} MiB free on its disk (crm-syncd needs {MIN_FREE_BYTES // 2**20} MiB)"
    return None


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})  # a write failed: disk full or failing


def folder_closed(path: Path) -> tuple[str, bool] | None:
    """(what the owner may not do in the existing folder `path`: "enter" or "create files in"; whether it is
    another user's), or None if they may (or it is missing)."""
    try:
        owner = os.stat(path).st_uid
        if os.access(path, os.W_OK | os.X_OK) or os.statvfs(path).f_flag & os.ST_RDONLY:
            return None  # a read-only volume: no chown or chmod helps, the caller's own words say so
    except OSError:
        return None  # missing, or beyond a folder one may not enter: the caller's own words say why
    return ("create files in" if os.access(path, os.X_OK) else "enter"), owner != os.geteuid()


def folder_refusal(path: Path) -> str | None:
    """Why the owner may not enter crm-syncd's existing folder `path` or create files in it, with the fix;
    None if they may (or it is missing). The first `sudo crm-syncd` makes the state folder root's (0700):
    every command names it in these words, and none blames a file in it (removing one would not help)."""
    if (closed := folder_closed(path)) is None:
        return None
    doing, theirs = closed
    if theirs:
        return (f"{path} is another user's and you may not {doing} it; if a `sudo crm-syncd` made it, give it "
                f"back with `sudo chown -R $USER '{path}'`")
    return f"you may not {doing} {path}; make it writable for you (`chmod u+rwx '{path}'`)"


def owner_uid() -> int:
    """The user crm-syncd's files must belong to: the one running it, or, under sudo, the one who ran sudo
    (SUDO_UID), whose agent uses them: `sudo crm-syncd doctor` checks them for that user, not for root, who may
    do anything. Root without SUDO_UID (a root login) is their owner itself."""
    if os.geteuid() == 0:
        try:
            return int(os.environ["SUDO_UID"])
        except (KeyError, ValueError):
            pass
    return os.geteuid()


def file_refusal(file: Path, stem: Path | None = None) -> tuple[str, str] | None:
    """(why, fix) when the existing `file` is not the owner's (`owner_uid`) to read and write; None if it is (or
    it is missing). A `sudo crm-syncd` leaves its files root's, a restore may lose their mode: every command
    names them in these words. Another user's file is refused even when its mode lets anyone write: crm-syncd
    makes its files private (0600), which only their owner may. The chown takes `stem`* (default `file`*): the
    files beside it made with it too (the state database's -wal and -shm, the log's rotated copies)."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    owner = owner_uid()
    give_back = f"if a `sudo crm-syncd` made it, give it back with `sudo chown $USER '{stem or file}'*`"
    if st.st_uid != owner:
        return f"{file} is another user's", give_back
    if owner == os.geteuid():
        if os.access(file, os.R_OK | os.W_OK):
            return None
    elif st.st_mode & 0o600 == 0o600:  # root judging for the owner: os.access would answer for root
        return None
    return f"you may not read and write {file}", f"{give_back}, else `chmod u+rw '{file}'`"


def ready_folder(settings: Settings, field: str) -> Path:
    """The folder setting `field` names, made (private) if missing; ConfigError naming the setting,
    the folder and the reason when it cannot be made or written in (say, a volume not mounted)."""
    path = getattr(settings, field)
    problem = folder_problem(path)
    if problem is None:
        try:
            secure_dir(path)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem is not None:
        source = _source_of(field, {}, *read_config_file())
        raise ConfigError(f"cannot use {field} {path} ({source}): {folder_refusal(path) or problem}")
    return path


def secure_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing, private to the user (0700).

    A folder that already exists keeps its mode: it may be one the owner chose and shares (or may
    not chmod, like /tmp). What we keep in it is private by the files' own modes (`secure_file`).
    """
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a folder") from None
        return path
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    return path


def secure_file(path: Path) -> Path:
    """Create `path` if needed (without ever exposing it) and make it private to the user (0600)."""
    path = Path(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)
    return path
