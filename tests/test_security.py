"""Security and privacy hygiene, end to end: secrets, file modes, masking, transport."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta
from pathlib import Path

from tests.conftest import CLI, clean_env
from tests.harness.citadel import CitadelServer
from tests.harness.library import Library, ago

JANE = "+16135550111"
SECRET = "sk-test-4f1c9a7e2b"


def everything_written(home: Path) -> str:
    """All of crm-syncd's own files (state, logs), as text."""
    roots = [home / "Library" / "Application Support" / "crm-syncd", home / "Library" / "Logs" / "crm-syncd"]
    return "".join(p.read_bytes().decode("latin-1") for r in roots if r.exists() for p in r.rglob("*") if p.is_file())


def test_the_api_key_authenticates_and_appears_nowhere(library: Library, tmp_path, home):
    server = CitadelServer(tmp_path / "locked.sqlite", api_key=SECRET).start()
    try:
        library.card(first="Jane", last="Doe", phones=[JANE])
        library.text(JANE)
        cli = CLI(clean_env(home, CRM_SYNCD_API_URL=server.url, CRM_SYNCD_API_KEY=SECRET))

        outputs = [cli("sync", "--dry-run"), cli("sync", "-v"), cli("status", "--json"), cli("doctor")]

        assert outputs[1].code == 0, outputs[1].output
        assert len(server.interactions()) == 1  # the bearer token was accepted
        for result in outputs:
            assert SECRET not in result.output
        assert SECRET not in everything_written(home)
    finally:
        server.stop()


def test_a_wrong_api_key_is_the_owners_fix_exit_2_and_nothing_is_lost(library: Library, tmp_path, home):
    server = CitadelServer(tmp_path / "locked.sqlite", api_key=SECRET).start()
    try:
        library.card(first="Jane", last="Doe", phones=[JANE])
        right = CLI(clean_env(home, CRM_SYNCD_API_URL=server.url, CRM_SYNCD_API_KEY=SECRET))
        assert right("sync", "--contacts-only").code == 0
        library.text(JANE)
        wrong = CLI(clean_env(home, CRM_SYNCD_API_URL=server.url, CRM_SYNCD_API_KEY="not-the-key"))

        for command in (["sync"], ["sync", "--interactions-only"]):  # refused listing contacts; posting
            failed = wrong(*command)
            assert failed.code == 2, failed.output
            assert "the CRM refused crm-syncd's API key" in failed.stdout and "set api_key in" in failed.stdout
            assert "not-the-key" not in failed.output and "Traceback" not in failed.output
        doctor = wrong("doctor")
        assert doctor.code == 2 and "refused crm-syncd's API key" in doctor.stdout and "set api_key in" in doctor.stdout

        assert right("sync").code == 0
        assert len(server.interactions()) == 1
    finally:
        server.stop()


def test_an_api_key_that_is_not_visible_ascii_is_a_one_line_setting_error_not_a_traceback(
        library: Library, citadel: CitadelServer, home: Path):
    """Pasted from a web page with a curly quote: an HTTP header cannot carry it."""
    config = home / ".config" / "crm-syncd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'api_key = "{SECRET}\u2019"\n', encoding="utf-8")
    config.chmod(0o600)
    library.text(JANE)
    cli = CLI(clean_env(home, CRM_SYNCD_API_URL=citadel.url))

    for result in (cli("sync"), cli("doctor"), cli("run")):
        assert result.code == 2, result.output
        assert "invalid setting api_key" in result.output and "visible ASCII" in result.output, result.output
        assert "Traceback" not in result.output and SECRET not in result.output
    assert citadel.interactions() == []


def test_a_keychain_api_key_is_checked_like_any_other_and_never_shown(
        library: Library, citadel: CitadelServer, home: Path, tmp_path: Path):
    """A key stored in the Keychain over two lines (`security add-generic-password -w` keeps it so)."""
    stored = tmp_path / "keychain-item"
    stored.write_text("sk-live-7Qx9Rt2Lm4\nZp8Wv3Kd6Hs1", encoding="utf-8")
    library.text(JANE)
    env = clean_env(home, CRM_SYNCD_API_URL=citadel.url, CRM_SYNCD_TEST_KEYCHAIN=str(stored))
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).parent / "harness" / "keychain")
    cli = CLI(env)

    outputs = [cli("sync"), cli("status"), cli("status", "--json"), cli("doctor")]

    assert outputs[0].code == 2, outputs[0].output
    assert "invalid setting api_key (the Keychain, service crm-syncd, account api_key)" in outputs[0].stderr
    assert outputs[3].code == 2 and "api_key" in outputs[3].output
    for text in [o.output for o in outputs] + [everything_written(home)]:
        assert "7Qx9Rt2Lm4" not in text and "Zp8Wv3Kd6Hs1" not in text
    stored.write_text(" sk-live-7Qx9Rt2Lm4Zp8Wv3Kd6Hs1\n", encoding="utf-8")  # surrounding whitespace is trimmed
    assert cli("sync").code == 0
    assert len(citadel.interactions()) == 1


def test_state_is_private_0700_folders_and_0600_files(library: Library, cli: CLI, home):
    library.text(JANE)
    assert cli("sync").code == 0

    state = home / "Library" / "Application Support" / "crm-syncd"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "state.db").stat().st_mode) == 0o600


def test_a_folder_the_owner_chose_keeps_its_mode_and_what_we_keep_in_it_is_private(
        library: Library, citadel: CitadelServer, home, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: a folder others use too (and that its owner may not chmod)
    library.text(JANE)
    cli = CLI(clean_env(home, CRM_SYNCD_API_URL=citadel.url,
                        CRM_SYNCD_STATE_DIR=str(shared)))

    result = cli("sync")

    assert result.code == 0, result.output
    assert len(citadel.interactions()) == 1
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in shared.iterdir()}
    assert modes == {"state.db": 0o600, "crm-syncd.lock": 0o600}


def test_plain_http_to_a_remote_crm_is_refused(library: Library, home):
    result = CLI(clean_env(home, CRM_SYNCD_API_URL="http://crm.example.com"))("sync")

    assert result.code == 2
    assert "api_url" in result.stderr and "Traceback" not in result.output


def test_logs_at_info_level_carry_no_full_phone_numbers_or_emails(library: Library, cli: CLI, home):
    library.text("+19055551234")  # a placeholder: logged when created
    library.text("someone@example.org")

    result = cli("sync")

    assert result.code == 0, result.output
    assert "+19055551234" not in result.stderr and "someone@example.org" not in result.stderr
    assert "1234" in result.stderr  # masked, not dropped


def test_a_rejected_group_message_shows_its_key_without_the_full_number_in_logs_output_and_status(
        library: Library, citadel: CitadelServer, cli: CLI):
    ana, bob = "+16135550111", "+19025550122"
    library.card(first="Ana", last="A", phones=[ana])
    library.card(first="Bob", last="B", phones=[bob])
    at = ago(hours=3)
    library.group_text([ana, bob], at=at)  # from me: one item per participant, keyed msg:<guid>:<address>
    citadel.reject_interactions_at.update((at + timedelta(days=d)).strftime("%Y-%m-%d") for d in (-1, 0, 1))

    result = cli("sync")
    status = cli("status", "--json")

    assert "push.failed" in result.stderr and "2 interaction(s) failed" in result.stdout, result.output
    for text in (result.stderr, result.stdout):
        assert ana not in text and bob not in text
        assert "+1•••••••0111" in text and "+1•••••••0122" in text  # masked, not dropped
    failures = json.loads(status.stdout)["outbox"]["failures"]
    assert sorted(f["key"][-13:] for f in failures) == ["+1•••••••0111", "+1•••••••0122"]
    assert ana not in status.stdout and bob not in status.stdout


def test_sync_names_placeholders_with_their_number_and_email_masked(library: Library, cli: CLI, citadel: CitadelServer):
    library.text("+19055551234")
    library.text("someone.private@example.org")

    result = cli("sync")

    assert result.code == 0, result.output
    assert len(citadel.interactions()) == 2
    for full in ("+19055551234", "+1-905-555-1234", "905-555-1234", "someone.private@example.org"):
        assert full not in result.output
    assert "Unknown (+1•••••••1234)" in result.stdout and "Unknown (s•••@example.org)" in result.stdout


def test_dry_run_names_a_nameless_card_and_a_placeholder_without_their_full_numbers(
        library: Library, cli: CLI, citadel: CitadelServer):
    library.card(phones=["+16135550199"])  # no name: its contact is named after its number
    library.text("+19055551234")

    result = cli("sync", "--dry-run")

    assert result.code == 0, result.output
    for full in ("+16135550199", "+1-613-555-0199", "6135550199", "+19055551234", "+1-905-555-1234"):
        assert full not in result.output
    assert "+1•••••••0199" in result.stdout and "Unknown (+1•••••••1234)" in result.stdout


def test_verbose_sync_output_still_names_placeholders_masked(library: Library, cli: CLI):
    library.text("+19055551234")

    result = cli("sync", "-v")

    assert result.code == 0, result.output
    assert "Unknown (+1•••••••1234)" in result.stdout and "+1-905-555-1234" not in result.stdout
