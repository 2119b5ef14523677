"""A state restored from a backup, further cases: a database away at the first read, a first run without
a contacts pass, failed items retried after the backup (the first cases are in test_sync.py)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import timezone
from pathlib import Path

import pytest

from tests.conftest import CLI
from tests.harness.citadel import Faults
from tests.harness.library import Library, ago
from tests.harness.statedb import a_backup_of, restore
from tests.test_sync import BOB, CAROL, JANE, a_card_edit, names


def _state(home: Path) -> Path:
    return home / "Library" / "Application Support" / "crm-syncd" / "state.db"


@pytest.mark.parametrize("dedupe", ["auto", "off"])
def test_a_calls_database_missing_at_the_restore_and_back_later_sends_no_call_twice(
        library: Library, citadel, cli: CLI, home: Path, tmp_path: Path, dedupe: str):
    """The calls database is away (CallHistoryDB folder not there yet) at the first sync after a
    restore: the look-ups go on until it is back and read, so the calls delivered after the backup
    are found, not sent again."""
    cli.env["CRM_SYNCD_DEDUPE_AGAINST_CRM"] = dedupe
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.call(JANE, answered=True, duration=30, at=ago(days=2))
    assert cli("sync").code == 0
    state = _state(home)
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    library.call(JANE, answered=True, duration=40, at=ago(hours=5))
    library.call(JANE, answered=True, duration=50, at=ago(hours=3))
    assert cli("sync").code == 0
    assert len(citadel.interactions_of(JANE)) == 3

    restore(backup, state)
    calls_dir = library.calls_db.parent
    aside = tmp_path / "CallHistoryDB-aside"
    shutil.move(calls_dir, aside)
    first = cli("sync", "-v")
    shutil.move(aside, calls_dir)
    second = cli("sync", "-v")

    assert first.code == 0 and "state.restored" in first.stderr, first.output
    assert "extract.missing" in first.stderr and "push.caught_up" not in first.stderr, first.output
    assert second.code == 0 and "push.caught_up" in second.stderr, second.output
    got = Counter(i["occurredAt"] for i in citadel.interactions_of(JANE))
    assert sum(got.values()) == 3 and max(got.values()) == 1, (got, first.stderr[-3000:], second.output)


@pytest.mark.parametrize("first_run", ["interactions-only", "crm-down"])
def test_a_restore_whose_first_sync_makes_no_contacts_pass_still_rebuilds_the_contacts(
        library: Library, citadel, cli: CLI, home: Path, tmp_path: Path, first_run: str):
    """Ann's contact was made after the backup. The first sync after the restore makes no contacts
    pass (`--interactions-only`, or the CRM is down): the rebuild waits for the next one, which finds
    Ann's contact crm-syncd's, so her card's edits reach it."""
    library.text(BOB, at=ago(days=2))
    assert cli("sync").code == 0
    state = _state(home)
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    card = library.card(first="Ann", last="Lee", phones=[CAROL])
    assert cli("sync").code == 0
    restore(backup, state)
    if first_run == "interactions-only":
        first = cli("sync", "--interactions-only", "-v")
    else:
        citadel.go_down()
        first = cli("sync", "-v")
        citadel.come_up()
    assert "state.restored" in first.stderr, first.output
    assert cli("sync").code == 0

    a_card_edit(library, card)
    result = cli("sync")

    assert result.code == 0, result.output
    edited = names(citadel)["Ann Lee"]
    assert (edited["organization"], edited["title"]) == ("Acme", "CTO"), result.output


@pytest.mark.parametrize("dedupe", ["auto", "off"])
def test_a_failed_text_retried_after_the_backup_is_not_sent_again_by_retry_failed_after_the_restore(
        library: Library, citadel, cli: CLI, home: Path, tmp_path: Path, dedupe: str):
    """A text the CRM refused (422) is in the backup as failed; after the backup the owner ran
    `retry-failed` and it was delivered. The restored state lists it as failed again; the owner's
    `retry-failed` (as `sync` and `status` invite) looks it up first, and finds it."""
    cli.env["CRM_SYNCD_DEDUPE_AGAINST_CRM"] = dedupe
    library.card(first="Jane", last="Doe", phones=[JANE])
    at = ago(days=3)
    library.text(JANE, at=at)
    library.text(JANE, at=ago(days=1))
    citadel.reject_interactions_at = {at.astimezone(timezone.utc).date().isoformat()}
    assert cli("sync").code == 1
    state = _state(home)
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    citadel.reject_interactions_at = set()
    assert cli("retry-failed").code == 0
    assert cli("sync").code == 0
    assert len(citadel.interactions_of(JANE)) == 2

    restore(backup, state)
    after = cli("sync", "-v")
    assert after.code == 0 and "state.restored" in after.stderr, after.output
    assert cli("retry-failed").code == 0
    result = cli("sync", "-v")

    got = Counter(i["occurredAt"] for i in citadel.interactions_of(JANE))
    assert sum(got.values()) == 2 and max(got.values()) == 1, (got, after.output, result.output)


# -- no restore at all: a preview leaves no trace --------------------------------------------------


def _stamps(home: Path) -> str:
    return (home / "Library" / "Caches" / "crm-syncd" / "stamps.json").read_text()


def test_a_dry_run_neither_reads_nor_writes_the_stamp_so_the_next_sync_sees_no_restore(
        library: Library, citadel, cli: CLI, home: Path):
    library.card(first="Jane", last="Doe", phones=[JANE])
    at = ago(days=3)
    library.text(JANE, at=at)
    citadel.reject_interactions_at = {at.astimezone(timezone.utc).date().isoformat()}  # kept as failed, 422
    assert cli("sync").code == 1
    stamps = _stamps(home)
    library.text(JANE, at=ago(hours=1))  # something new to preview

    preview = cli("sync", "--dry-run")
    real = cli("sync", "-v")

    assert preview.code == 0 and _stamps(home) != stamps, preview.output  # moved by the real sync only
    assert real.code == 0 and "state.restored" not in real.stderr and "state.unstamped" not in real.stderr
    (failure,) = json.loads(cli("status", "--json").stdout)["outbox"]["failures"]
    assert failure["reason"].startswith("422") or "Rejected" in failure["reason"], failure


def test_a_dry_run_after_the_upgrade_that_brings_stamps_leaves_the_state_unstamped_not_restored(
        library: Library, citadel, cli: CLI, home: Path):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=2))
    assert cli("sync").code == 0
    (home / "Library" / "Caches" / "crm-syncd" / "stamps.json").unlink()  # as before stamps existed

    assert cli("sync", "--dry-run").code == 0
    real = cli("sync", "-v")

    assert "state.unstamped" in real.stderr and "state.restored" not in real.stderr, real.stderr[-1500:]
