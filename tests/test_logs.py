"""Logging: JSON lines in a private, rotated file; readable console; counterparts masked, keys redacted."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import structlog

from crm_syncd import logs
from crm_syncd.logs import configure, get_logger, mask_address, mask_key, mask_text

PHONE = "+15551231234"
EMAIL = "john.appleseed@example.com"
KEY = "sk-live-7d1f0c2b9a"


@pytest.fixture(autouse=True)
def fresh_logging():
    yield
    structlog.reset_defaults()
    stdlib = logging.getLogger("crm_syncd")
    for handler in stdlib.handlers[:]:
        stdlib.removeHandler(handler)
        handler.close()


def read_events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_events_are_json_lines_in_a_private_file_with_utc_iso_timestamps(tmp_path):
    log_file = tmp_path / "logs" / "crm-syncd.log"
    configure(log_file=log_file, console=False)
    get_logger("engine").info("extract.done", source="messages", rows=12)
    get_logger().warning("push.failed", status=503)

    first, second = read_events(log_file)
    assert first["event"] == "extract.done" and first["level"] == "info"
    assert first["rows"] == 12 and first["logger"] == "crm_syncd.engine"
    assert second["event"] == "push.failed" and second["level"] == "warning"
    stamp = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(minutes=5)
    assert log_file.stat().st_mode & 0o777 == 0o600
    assert log_file.parent.stat().st_mode & 0o777 == 0o700


def test_counterparts_are_masked_and_secrets_redacted_in_the_file(tmp_path):
    log_file = tmp_path / "crm-syncd.log"
    configure(log_file=log_file, console=False)
    get_logger().info("contacts.rescan", phone=PHONE, email=EMAIL, handle=PHONE,
                      counterpart=EMAIL, address=PHONE, from_phone=PHONE, emails=[EMAIL],
                      api_key=KEY, headers={"Authorization": f"Bearer {KEY}"}, token=KEY)
    text = log_file.read_text(encoding="utf-8")
    assert PHONE not in text and EMAIL not in text and KEY not in text
    (event,) = read_events(log_file)
    assert event["phone"] == "+1•••••••1234"
    assert event["email"] == "j•••@example.com"
    assert event["emails"] == ["j•••@example.com"]
    assert event["api_key"] == event["token"] == event["headers"]["Authorization"] == "[redacted]"


def test_debug_is_off_by_default_and_verbose_shows_it_with_secrets_still_redacted(tmp_path):
    log_file = tmp_path / "crm-syncd.log"
    configure(log_file=log_file, console=False)
    get_logger().debug("watch.tick")
    assert log_file.read_text() == ""

    configure(log_file=log_file, console=False, verbose=True)
    get_logger().debug("watch.tick", phone=PHONE, api_key=KEY)
    get_logger().info("extract.done", phone=PHONE)
    debug, info = read_events(log_file)
    assert debug["event"] == "watch.tick" and debug["phone"] == PHONE  # debug is for diagnosis
    assert debug["api_key"] == "[redacted]"
    assert info["phone"] == "+1•••••••1234"


def test_the_file_rotates_at_the_size_limit_and_keeps_a_bounded_number(tmp_path):
    log_file = tmp_path / "crm-syncd.log"
    configure(log_file=log_file, console=False, max_bytes=2_000, backups=2)
    log = get_logger()
    for i in range(200):
        log.info("push.batch", n=i, padding="x" * 50)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "crm-syncd.log", "crm-syncd.log.1", "crm-syncd.log.2"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 2_000
        assert path.stat().st_mode & 0o777 == 0o600
    assert read_events(log_file)[-1]["n"] == 199


def test_console_mode_writes_readable_lines_to_stderr(tmp_path, capsys):
    configure(console=True, log_file=tmp_path / "unused.log")
    get_logger("cli").info("sync.done", pushed=3, phone=PHONE)
    err = capsys.readouterr().err
    assert "sync.done" in err and "pushed=3" in err
    assert "+1•••••••1234" in err and PHONE not in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])
    assert not (tmp_path / "unused.log").exists()


def test_a_console_traceback_shows_no_local_variables(tmp_path, capsys):
    configure(console=True)

    def deliver(address: str, api_key: str) -> None:
        raise RuntimeError("boom")

    try:
        deliver(PHONE, KEY)
    except RuntimeError:
        get_logger().exception("daemon.failed")

    err = capsys.readouterr().err
    assert "RuntimeError" in err and "boom" in err
    assert PHONE not in err and KEY not in err


def test_loggers_taken_before_configure_follow_a_later_configure(tmp_path):
    early = get_logger("daemon")
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    configure(log_file=first, console=False)
    early.info("one")
    configure(log_file=second, console=False)
    early.info("two")
    assert [e["event"] for e in read_events(first)] == ["one"]
    assert [e["event"] for e in read_events(second)] == ["two"]


def test_exceptions_are_kept_on_one_json_line(tmp_path):
    log_file = tmp_path / "crm-syncd.log"
    configure(log_file=log_file, console=False)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger().exception("push.failed")
    (event,) = read_events(log_file)
    assert event["level"] == "error" and "RuntimeError: boom" in event["exception"]


@pytest.mark.parametrize("raw, masked", [
    ("+15551231234", "+1•••••••1234"),
    ("+44 20 7946 0958", "+4•••••••0958"),
    ("(555) 123-1234", "5•••••••1234"),
    ("john@example.com", "j•••@example.com"),
    ("12345", "•••45"),
    ("chat123456789", "c•••"),
    ("", ""),
])
def test_mask_address(raw, masked):
    assert mask_address(raw) == masked


@pytest.mark.parametrize("raw, masked", [
    ("msg:6F9A61C2-5B1E-4C4B-9E1D-3A6C2F0B7D11", "msg:6F9A61C2-5B1E-4C4B-9E1D-3A6C2F0B7D11"),
    ("msg:6F9A61C2-5B1E-4C4B-9E1D-3A6C2F0B7D11:+15551231234", "msg:6F9A61C2-5B1E-4C4B-9E1D-3A6C2F0B7D11:+1•••••••1234"),
    ("msg:6F9A61C2:john@example.com", "msg:6F9A61C2:j•••@example.com"),
    ("call:0B7D11A2-77C4-4E0D-8F3A-2C6E9D1B5A40:+15551231234", "call:0B7D11A2-77C4-4E0D-8F3A-2C6E9D1B5A40:+1•••••••1234"),
    ("call:pk:42", "call:pk:42"),
    ("call:pk:42:+15551231234", "call:pk:42:+1•••••••1234"),
])
def test_mask_key_masks_the_counterpart_an_item_key_ends_in(raw, masked):
    assert mask_key(raw) == masked


@pytest.mark.parametrize("raw, masked", [
    ("Unknown (+1-905-555-1234)", "Unknown (+1•••••••1234)"),
    ("Unknown (someone@example.org)", "Unknown (s•••@example.org)"),
    ("+16135550199 -", "+1•••••••0199 -"),
    ("Jane Doe", "Jane Doe"),
    ("Acme 2000 (company)", "Acme 2000 (company)"),  # a short run of digits is no number
])
def test_mask_text_masks_every_number_and_email_in_a_name(raw, masked):
    assert mask_text(raw) == masked


def test_item_keys_are_masked_at_info_level_and_whole_at_debug(tmp_path):
    log_file = tmp_path / "crm-syncd.log"
    configure(log_file=log_file, console=False, verbose=True)
    get_logger().warning("push.failed", key=f"msg:6F9A61C2:{PHONE}", reason="occurredAt: invalid")
    get_logger().debug("push.looked_up", key=f"msg:6F9A61C2:{PHONE}")
    warning, debug = read_events(log_file)
    assert warning["key"] == "msg:6F9A61C2:+1•••••••1234" and debug["key"] == f"msg:6F9A61C2:{PHONE}"


def test_privacy_processor_is_exported_for_reuse():
    assert logs.privacy(None, "info", {"phone": PHONE, "n": 1}) == {"phone": "+1•••••••1234", "n": 1}


def test_a_librarys_own_warning_goes_to_the_log_file_masked_not_raw_to_stderr(tmp_path):
    """watchdog logs an error when its emitter is read after a stop: with no handler of its own, logging's
    last resort printed it raw on the daemon's stderr, beside the one line a fatal error gets."""
    log_file = tmp_path / "crm-syncd.log"
    script = (f"from crm_syncd import logs; logs.configure(log_file={str(log_file)!r}, console=False)\n"
              "import logging; logging.getLogger('watchdog.observers.inotify').error('inactive for %s', "
              f"{PHONE!r})\n"
              "logging.getLogger('httpx').info('HTTP Request: POST /api/interactions')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0 and done.stderr == "", done.stderr
    (event,) = read_events(log_file)  # httpx's info line per request is not kept
    assert event["event"] == "library.log" and event["level"] == "error", event
    assert event["logger"].endswith("watchdog.observers.inotify") and event["message"] == "inactive for +1•••••••1234"
