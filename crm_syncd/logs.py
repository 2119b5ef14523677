"""Structured logging: one event per line, readable on a terminal, JSON lines in the log file.

At info level and above, values of keys naming a counterpart (address, phone, email, handle,
counterpart, also as `*_phone`, `phones`, ...) are masked, as is the counterpart an outbox item's
`key` may end in; secrets (api_key, authorization, token) are always redacted. Call `configure()`
once at start-up; it may be called again to reconfigure.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import structlog

from crm_syncd.settings import file_refusal, secure_dir, secure_file

MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 5
BULLETS = "•••"
REDACTED = "[redacted]"

_LOGGER_NAME = "crm_syncd"
_MASKED = ("address", "phone", "email", "handle", "counterpart")
_MASKED_KEYS = frozenset(_MASKED) | {"addresses", "phones", "emails", "handles", "counterparts"}
_SECRET_KEYS = frozenset({"api_key", "apikey", "authorization", "token", "x_api_key"})
_PHONE_CHARS = re.compile(r"[\d\s+().\-]+")
# an address inside free text: an email, or a run of 7 digits or more in a phone number's characters
_IN_TEXT = re.compile(r"[^\s()<>@,;:\"']+@[^\s()<>@,;:\"']+|\+?\d(?:[\s().\-]*\d){6,}")


class LogFileError(Exception):
    """The log file cannot be written; the message names it and the fix."""


def mask_address(value: str) -> str:
    """A recognisable but private form of a phone number or email: `+1•••••••1234`, `j•••@example.com`."""
    value = str(value)
    if "@" in value:
        local, _, domain = value.rpartition("@")
        return f"{local[:1]}{BULLETS}@{domain}"
    digits = re.sub(r"\D", "", value)
    if _PHONE_CHARS.fullmatch(value) and len(digits) >= 7:
        lead = ("+" if value.lstrip().startswith("+") else "") + digits[0]
        return f"{lead}•••••••{digits[-4:]}"
    if _PHONE_CHARS.fullmatch(value) and digits:
        return f"{BULLETS}{digits[-2:]}"  # short codes
    return f"{value[:1]}{BULLETS}" if value else value


def mask_text(text: str) -> str:
    """Text (a contact's name, such as `Unknown (+1-905-555-1234)` or a nameless card's number) with
    every phone number and email in it masked: `Unknown (+1•••••••1234)`."""
    return _IN_TEXT.sub(lambda m: mask_address(m.group()), str(text))


def mask_key(key: str) -> str:
    """An outbox item key with the counterpart it may end in masked: `msg:<guid>:+1•••••••1234`.

    Keys are `msg:<guid>` or `call:<id>` (`<id>` may be `pk:<n>`); an item for one party of a group
    message or call adds `:<address>`.
    """
    parts = str(key).split(":")
    head = 3 if parts[1:2] == ["pk"] else 2
    if len(parts) <= head:
        return str(key)
    return ":".join(parts[:head] + [mask_address(":".join(parts[head:]))])


def _norm(key: str) -> str:
    return key.lower().replace("-", "_")


def _is_masked(key: str) -> bool:
    key = _norm(key)
    return key in _MASKED_KEYS or any(key.endswith("_" + k) for k in _MASKED_KEYS)


def _is_secret(key: str) -> bool:
    key = _norm(key)
    return key in _SECRET_KEYS or key.endswith(("_token", "_api_key"))


def _mask_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_mask_value(v) for v in value]
    return mask_address(str(value))


def _scrub(data: dict[str, Any], mask: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if _is_secret(str(key)):
            out[key] = REDACTED
        elif mask and _is_masked(str(key)):
            out[key] = _mask_value(value)
        elif mask and _norm(str(key)) == "key" and isinstance(value, str):
            out[key] = mask_key(value)
        elif isinstance(value, dict):
            out[key] = _scrub(value, mask)
        else:
            out[key] = value
    return out


def privacy(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: redact secrets always, mask counterparts unless at debug level."""
    return _scrub(event_dict, mask=method_name != "debug")


def _leading_fields(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Put timestamp, level, logger and event first so that JSON lines read well in `tail`."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "logger", "event") if k in event_dict}
    return {**head, **event_dict}


class _PrivateRotatingFileHandler(RotatingFileHandler):
    """RotatingFileHandler whose files (including those started after rotation) are 0600."""

    def _open(self):  # type: ignore[override]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


class _Libraries(logging.Handler):
    """Hands the libraries' own warnings (watchdog's, httpx's) to structlog: masked lines in our log, not
    raw lines on stderr through logging's last resort (the daemon's stderr is for its one fatal line)."""

    def emit(self, record: logging.LogRecord) -> None:
        get_logger(record.name).log(record.levelno, "library.log", message=mask_text(record.getMessage()),
                                    exc_info=record.exc_info)


def _stdlib_logger(name: str | None = None) -> logging.Logger:
    """Every event goes through a child of the `crm_syncd` stdlib logger, which has the handler."""
    if not name or name == _LOGGER_NAME:
        return logging.getLogger(_LOGGER_NAME)
    return logging.getLogger(name if name.startswith(_LOGGER_NAME + ".") else f"{_LOGGER_NAME}.{name}")


def configure(*, verbose: bool = False, log_file: Path | None = None, console: bool | None = None,
              max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
    """Set up logging for the process (again, if already configured).

    console=None means "if stderr is a terminal". Console mode renders readable lines to stderr
    (coloured on a terminal); otherwise JSON lines go to `log_file` (rotated at `max_bytes`,
    keeping `backups` old files), or to stderr when no file is given. LogFileError when the file
    cannot be written.
    """
    level = logging.DEBUG if verbose else logging.INFO
    stream = sys.stderr
    if console is None:
        console = stream.isatty()

    if not console and log_file is not None:
        log_file = Path(log_file)
        try:
            secure_dir(log_file.parent)
            secure_file(log_file)
            handler: logging.Handler = _PrivateRotatingFileHandler(
                log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        except OSError as exc:  # a `sudo crm-syncd run` left it root's, a restore lost its mode, a full disk
            why = "; ".join(file_refusal(log_file) or (exc.strerror or str(exc),))
            raise LogFileError(f"cannot write the log file {log_file}: {why}") from exc
    else:
        handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))

    stdlib_logger = _stdlib_logger()
    for old in stdlib_logger.handlers[:]:
        stdlib_logger.removeHandler(old)
        old.close()
    stdlib_logger.addHandler(handler)
    stdlib_logger.setLevel(logging.DEBUG)  # structlog filters by level
    stdlib_logger.propagate = False
    root = logging.getLogger()  # at its default level, WARNING: httpx's line per request stays out
    for old in [h for h in root.handlers if isinstance(h, _Libraries)]:
        root.removeHandler(old)
    root.addHandler(_Libraries())

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        privacy,
        structlog.processors.StackInfoRenderer(),
    ]
    if console:
        # tracebacks without their frames' locals: those hold addresses, and might hold the API key
        processors.append(structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)))
    else:
        processors += [structlog.processors.format_exc_info, _leading_fields,
                       structlog.processors.JSONRenderer(ensure_ascii=False)]

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stdlib_logger,
        cache_logger_on_first_use=False,  # module-level loggers must follow a later configure()
    )


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; every event carries `logger` ("crm_syncd" or "crm_syncd.<name>").

    If nothing configured logging yet, the defaults are applied first so that masking holds.
    """
    if not structlog.is_configured():
        configure()
    return structlog.get_logger(name) if name else structlog.get_logger()
