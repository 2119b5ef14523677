"""The state database: migrations, the marks extraction resumes from (file identity, anchors), how
waiting items get their contact, and the plans of the outbox's queries.

The real Store and Engine run against fixture stores; extraction never talks to the CRM.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from crm_syncd.daemon import Lock
from crm_syncd.engine import Engine
from crm_syncd.settings import Settings
from crm_syncd.store import SCHEMA_VERSION, Mark, NewItem, Store, StoreError
from tests.conftest import CLI
from tests.harness.library import Library, ago
from tests.harness.processes import eventually
from tests.harness.statedb import state_db_at

JANE = "+16135550111"


def extraction(library: Library, state_dir: Path, **options) -> Engine:
    settings = Settings(messages_db=library.messages_db, calls_db=library.calls_db,
                        addressbook_dir=library.addressbook_dir, state_dir=state_dir, **options)
    return Engine(settings, Store(settings.state_db), None)  # type: ignore[arg-type]


# -- migrations -----------------------------------------------------------------------------------

def test_a_version_2_state_database_keeps_its_ledger_and_marks_and_still_refuses_duplicates(tmp_path):
    conn = state_db_at(tmp_path / "state.db", 2)
    conn.execute("INSERT INTO outbox (key, fingerprint, address, type, occurred_ms, state, contact_id, crm_id) "
                 f"VALUES ('msg:A', '{JANE}|TEXT_INBOUND|1700000000', '{JANE}', 'TEXT_INBOUND', 1700000000123, "
                 "'delivered', 7, 70)")
    conn.execute("INSERT INTO marks (source, rowid, file_id, updated_ms) VALUES ('messages', 41, '1:2', 0)")
    conn.commit()
    conn.close()

    store = Store(tmp_path / "state.db")

    assert store.schema_version == SCHEMA_VERSION
    assert store.mark("messages") == Mark(41, "1:2", None)
    assert (store.counts()["delivered"], store.crm_ids(7)) == (1, {70})
    result = store.enqueue("messages", [
        NewItem("msg:A", "+16135550199", "TEXT_INBOUND", 1700000000123, None),  # the same key (and so time)
        NewItem("msg:B", JANE, "TEXT_INBOUND", 1700000000123, None),  # the same counterpart, type and time
        NewItem("msg:C", JANE, "TEXT_INBOUND", 1700000000999, None),  # a text later in the same second
        NewItem("call:D", JANE, "CALL_INBOUND", 1700000000500, None),
        NewItem("call:E", JANE, "CALL_INBOUND", 1700000000900, None),  # a call is told apart to the second
    ], Mark(44, "1:2", "C"))
    assert (result.added, result.duplicates) == (2, 3)
    assert store.mark("messages") == Mark(44, "1:2", "C")


def test_a_version_11_mark_keeps_its_lookback_window_for_every_row_above_it(tmp_path):
    """Version 11 kept no last row read with a mark's window: the window holds for every row above it, as
    it did, until a pass reads to the end."""
    conn = state_db_at(tmp_path / "state.db", 11)
    conn.execute("INSERT INTO marks (source, rowid, file_id, anchor, window_ms, updated_ms) "
                 "VALUES ('messages', 41, '1:2', 'A', 1700000000000, 0)")
    conn.commit()
    conn.close()

    store = Store(tmp_path / "state.db")

    assert store.mark("messages") == Mark(41, "1:2", "A", 1700000000000, None)
    store.enqueue("messages", [], Mark(41, "1:2", "A", 1700000000000, 57))
    assert store.mark("messages") == Mark(41, "1:2", "A", 1700000000000, 57)


def as_version_11_left_it(state_db: Path) -> None:
    """The state database as crm-syncd 11 kept it: a mark's lookback window held for every row above it."""
    conn = sqlite3.connect(state_db)
    conn.execute("ALTER TABLE marks DROP COLUMN window_until")
    conn.execute("PRAGMA user_version = 11")
    conn.commit()
    conn.close()


def as_version_9_left_it(state_db: Path) -> None:
    """The state database as crm-syncd 9 kept it: one `written` per contact, the card's fields and the
    fields the CRM refused not recorded apart."""
    as_version_11_left_it(state_db)
    conn = sqlite3.connect(state_db)
    # what it recorded for a contact it wrote was the card's fields (the CRM's for a field it refused)
    conn.execute("UPDATE contacts SET written = card WHERE card IS NOT NULL AND (left_out IS NULL OR left_out = '{}')")
    conn.execute("ALTER TABLE contacts DROP COLUMN card")
    conn.execute("ALTER TABLE contacts DROP COLUMN left_out")
    conn.execute("PRAGMA user_version = 9")
    conn.commit()
    conn.close()


def test_contacts_a_version_9_state_database_knows_follow_card_edits_and_a_refused_email_is_tried_once_more(
        library: Library, citadel, cli: CLI, home: Path):
    jane = library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Ann", last="Lee", phones=["+16135550122"], emails=["ann@example.com"])
    citadel.reject_contact_values = {"ann@example.com"}
    assert cli("sync", "--contacts-only").code == 0
    as_version_9_left_it(home / "Library" / "Application Support" / "crm-syncd" / "state.db")
    refused = lambda: sum(n for (_method, _route, status), n in citadel.stats.items() if status == 422)  # noqa: E731
    assert refused() == 1

    library.books[0].update_card(jane, first="Janet")
    library.books[0].commit()
    upgraded = cli("sync", "--contacts-only")

    assert upgraded.code == 0 and "owner_edit_kept" not in upgraded.stderr, upgraded.output
    assert sorted((c["firstName"], c["email"]) for c in citadel.contacts()) == [("Ann", None), ("Janet", None)]
    assert refused() == 2  # crm-syncd 9 did not record the refusal: the email is sent once more, and recorded
    again = cli("sync", "--contacts-only")
    assert again.code == 0 and "Ann Lee: written without its email" in again.stdout, again.output
    assert refused() == 2
    assert Store(home / "Library" / "Application Support" / "crm-syncd" / "state.db").schema_version == SCHEMA_VERSION


def test_status_and_retry_failed_leave_the_state_database_of_an_older_crm_syncd_still_running_as_it_is(
        library: Library, citadel, cli: CLI, home: Path):
    """Upgraded while its daemon runs: a migration under it would pull its tables from under the old code,
    which then stops syncing without a word. The crm-syncd that holds the lock migrates, no other."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    assert cli("sync").code == 0
    state = home / "Library" / "Application Support" / "crm-syncd"
    as_version_9_left_it(state / "state.db")
    old_daemon = Lock(state / "crm-syncd.lock")
    old_daemon.acquire("run")
    try:
        status = cli("status", "--json")
        assert json.loads(status.stdout)["outbox"]["delivered"] == 1, status.output
        assert Store(state / "state.db", migrate=False).schema_version == 9  # read from a copy migrated in memory
        refused = cli("retry-failed")
        assert refused.code == 2 and "an older crm-syncd (run, pid" in refused.stderr, refused.output
        assert "crm-syncd install" in refused.stderr
        assert Store(state / "state.db", migrate=False).schema_version == 9
    finally:
        old_daemon.release()

    assert cli("retry-failed").code == 0  # the old daemon gone: migrated by whoever comes next
    assert Store(state / "state.db", migrate=False).schema_version == SCHEMA_VERSION


PLUMBER = "+19055551234"


def test_a_placeholder_version_9_promoted_with_the_owners_notes_follows_card_edits_after_the_upgrade(
        library: Library, citadel, cli: CLI, home: Path):
    library.text(PLUMBER)
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    citadel.update_contact(placeholder["id"], notes=placeholder["notes"] + "\nFixed the sink")
    pk = library.card(first="Joe", last="Pipes", phones=[PLUMBER], note="Call before 9")
    assert cli("sync").code == 0
    as_version_9_left_it(home / "Library" / "Application Support" / "crm-syncd" / "state.db")

    library.books[0].update_card(pk, first="Joseph", note="Call before 10")
    library.books[0].commit()
    upgraded = cli("sync")

    assert upgraded.code == 0 and "owner_edit_kept" not in upgraded.stderr, upgraded.output
    assert [(c["firstName"], c["notes"]) for c in citadel.contacts()] == [("Joseph", "Fixed the sink\nCall before 10")]


def test_a_placeholder_version_9_promoted_by_a_card_without_its_number_follows_a_rename_after_the_upgrade(
        library: Library, citadel, cli: CLI, home: Path):
    library.text(PLUMBER, person="person-7", at=ago(days=2))
    library.text("sam@example.org", person="person-7", at=ago(days=1))
    assert cli("sync").code == 0
    pk = library.card(first="Sam", last="Stone", emails=["sam@example.org"])
    assert cli("sync").code == 0
    as_version_9_left_it(home / "Library" / "Application Support" / "crm-syncd" / "state.db")

    library.books[0].update_card(pk, first="Samuel")
    library.books[0].commit()
    upgraded = cli("sync")

    assert upgraded.code == 0 and "owner_edit_kept" not in upgraded.stderr, upgraded.output
    assert [(c["firstName"], c["phone"]) for c in citadel.contacts()] == [("Samuel", PLUMBER)]


def test_a_contact_version_9_wrote_and_the_owner_edited_stays_the_owners_after_the_upgrade(
        library: Library, citadel, cli: CLI, home: Path):
    """Notes the owner wrote in front of the card's, a name changed: not what a promotion leaves."""
    pk = library.card(first="Ann", last="Lee", phones=[JANE], note="Card note")
    assert cli("sync").code == 0
    (ann,) = citadel.contacts()
    citadel.update_contact(ann["id"], lastName="Lee (neighbour)", notes="Owner's words\nCard note")
    as_version_9_left_it(home / "Library" / "Application Support" / "crm-syncd" / "state.db")

    library.books[0].update_card(pk, first="Anne", note="New card note")
    library.books[0].commit()
    upgraded = cli("sync")

    assert upgraded.code == 0 and "owner_edit_kept" in upgraded.stderr, upgraded.output
    assert [(c["firstName"], c["lastName"], c["notes"]) for c in citadel.contacts()] == [
        ("Ann", "Lee (neighbour)", "Owner's words\nCard note")]


def as_version_7_left_it(state_db: Path) -> None:
    """The state database as crm-syncd 7 kept it: a text known by its second, as a call is; no contact's
    creation time; nothing to read again."""
    as_version_9_left_it(state_db)
    conn = sqlite3.connect(state_db)
    conn.execute("ALTER TABLE contacts DROP COLUMN created_at")
    conn.execute("DROP INDEX outbox_fingerprint")
    conn.execute("CREATE UNIQUE INDEX outbox_fingerprint ON outbox(occurred_ms / 1000, address, type)")
    conn.execute("DELETE FROM kv WHERE key = 'reread'")
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()


ANN = "+16135550122"


def two_texts_in_one_second_version_7_read(library: Library, cli: CLI, home: Path) -> list[str]:
    """Ann's photo (ROWID 1) and its caption (ROWID 2) in one second a month ago, and a later text (ROWID 3),
    as crm-syncd 7 left them: it read all three and dropped the caption as a duplicate of the photo.
    Returns the times the CRM should hold, oldest first."""
    library.card(first="Ann", last="Lee", phones=[ANN])
    photo = ago(days=30).replace(microsecond=100_000)
    caption = photo + timedelta(milliseconds=400)
    later = ago(days=2)
    library.text(ANN, at=photo)
    library.text(ANN, at=later, rowid=3)
    assert cli("sync").code == 0
    library.text(ANN, at=caption, rowid=2)  # behind the mark: the row version 7 read and dropped
    as_version_7_left_it(home / "Library" / "Application Support" / "crm-syncd" / "state.db")
    return [t.isoformat(timespec="milliseconds").replace("+00:00", "Z") for t in (photo, caption, later)]


def test_a_text_version_7_dropped_as_a_same_second_duplicate_arrives_once_at_the_first_sync_after_the_upgrade(
        library: Library, citadel, cli: CLI, home: Path):
    """Versions 1-7 knew a text by its second, so the second of two texts one person sent within one second
    was taken for a duplicate and dropped. The upgrade reads the messages behind the mark once more."""
    expected = two_texts_in_one_second_version_7_read(library, cli, home)
    assert len(citadel.interactions()) == 2

    upgraded = cli("sync", "-v")

    assert upgraded.code == 0, upgraded.output
    assert sorted(i["occurredAt"] for i in citadel.interactions()) == expected  # the caption once; no other twice
    assert "extract.reread" in upgraded.stderr and "already known 2" in upgraded.stdout, upgraded.output
    again = cli("sync", "-v")
    assert again.code == 0, again.output
    assert "extract.reread" not in again.stderr and "extract.batch" not in again.stderr, again.output
    assert sorted(i["occurredAt"] for i in citadel.interactions()) == expected


def test_a_text_version_7_dropped_as_a_same_second_duplicate_arrives_at_the_daemons_first_catch_up(
        library: Library, citadel, cli: CLI, home: Path, daemon):
    expected = two_texts_in_one_second_version_7_read(library, cli, home)

    d = daemon()
    eventually(lambda: len(citadel.interactions()) >= 3, what="the dropped caption")
    assert [e["days"] for e in d.events("extract.reread")] == [365]
    library.text(ANN, at=ago(seconds=1))
    eventually(lambda: len(citadel.interactions()) >= 4, what="a new text")
    d.stop()

    got = sorted(i["occurredAt"] for i in citadel.interactions())
    assert len(got) == 4 and got[:3] == expected, got
    assert len(d.events("extract.reread")) == 1


def test_the_read_again_after_the_upgrade_is_made_again_when_a_stop_cut_it_short(
        library: Library, citadel, cli: CLI, home: Path):
    two_texts_in_one_second_version_7_read(library, cli, home)
    engine = extraction(library, home / "Library" / "Application Support" / "crm-syncd")

    engine.stopping.set()  # the process is stopping before the pass reads its first batch
    assert engine.extract("messages").added == 0
    engine.stopping.clear()
    assert engine.store.to_reread("messages")
    report = engine.extract("messages")

    assert (report.added, report.duplicates) == (1, 2)
    assert not engine.store.to_reread("messages")
    assert engine.extract("messages").rows == 0


def test_a_group_message_read_again_after_the_upgrade_from_version_7_reaches_no_one_added_to_the_group_since(
        library: Library, citadel, cli: CLI, home: Path):
    bob, carol = "+19025550133", "+14165550144"
    for first, last, phone in (("Ann", "Lee", ANN), ("Bob", "Roe", bob), ("Carol", "Poe", carol)):
        library.card(first=first, last=last, phones=[phone])
    library.group_text([ANN, bob], at=ago(days=10))
    assert cli("sync").code == 0
    library.join_group([ANN, bob], carol)
    as_version_7_left_it(home / "Library" / "Application Support" / "crm-syncd" / "state.db")

    upgraded = cli("sync", "-v")

    assert upgraded.code == 0 and "extract.reread" in upgraded.stderr, upgraded.output
    got = {c["firstName"]: [i["type"] for i in citadel.interactions(c["id"])] for c in citadel.contacts()}
    assert got == {"Ann": ["TEXT_OUTBOUND"], "Bob": ["TEXT_OUTBOUND"], "Carol": []}


def test_a_text_from_a_number_version_10_took_for_invalid_arrives_at_the_first_sync_after_the_upgrade(
        library: Library, citadel, cli: CLI, home: Path):
    """Versions 1-10 skipped a Mexican mobile written with the `1` dropped in 2019 (`+52 1 55 …`) as an
    invalid number: the upgrade reads both sources behind their marks once more."""
    library.card(first="Juan", last="Perez", phones=["+52 55 1234 5678"])
    library.text("+525512345678", at=ago(days=30))
    library.text("+525512345678", at=ago(days=2), rowid=3)
    library.call("+525512345678", answered=True, duration=30, at=ago(days=1))
    assert cli("sync").code == 0
    library.text("+5215512345678", at=ago(days=40), rowid=2)  # behind the mark, older than all it queued: skipped
    state = home / "Library" / "Application Support" / "crm-syncd" / "state.db"
    as_version_11_left_it(state)
    conn = sqlite3.connect(state)
    conn.execute("PRAGMA user_version = 10")
    conn.close()

    upgraded = cli("sync", "-v")

    assert upgraded.code == 0, upgraded.output
    assert sorted(e.split("source=")[1].split()[0] for e in upgraded.stderr.splitlines() if "extract.reread" in e) == [
        "calls", "messages"]
    assert len(citadel.interactions()) == 4 and "already known 2" in upgraded.stdout, upgraded.output


def test_a_fresh_install_reads_no_history_again_at_its_second_sync(library: Library, citadel, cli: CLI):
    """Every migration runs at a fresh install, 8 too: its first sync reads the lookback window anyway."""
    library.card(first="Ann", last="Lee", phones=[ANN])
    library.text(ANN, at=ago(days=30))
    library.text(ANN, at=ago(days=2))

    first, second = cli("sync", "-v"), cli("sync", "-v")

    assert first.code == 0 and second.code == 0, second.output
    assert "extract.reread" not in first.stderr + second.stderr, first.output
    assert "extract.batch" in first.stderr and "extract.batch" not in second.stderr, second.output
    assert len(citadel.interactions()) == 2


def test_a_state_database_with_a_damaged_page_is_refused_with_the_fix(tmp_path):
    """Damage inside a page makes no error on open: quick_check reports it as a row."""
    path = tmp_path / "state.db"
    store = Store(path)
    store.enqueue("messages", [NewItem(f"msg:{n}", JANE, "TEXT_INBOUND", 1_700_000_000_000 + n * 1000, None)
                               for n in range(20_000)], Mark(20_000, "1:2", None))
    store.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:  # bit rot in the middle of the file
        f.seek((size // 4096 // 2) * 4096 + 100)
        f.write(b"\xff" * 600)

    with pytest.raises(StoreError, match="damaged .*--reconcile"):
        Store(path)


# -- where extraction resumes -----------------------------------------------------------------------

def test_call_history_started_over_in_the_same_file_is_read_again_and_delivers_only_new_calls(
        library: Library, tmp_path):
    engine = extraction(library, tmp_path / "state")
    times = [ago(hours=10 - n) for n in range(3)]
    for n, at in enumerate(times):
        library.call(JANE, at=at, unique_id=f"OLD-{n}")
    assert engine.extract("calls").added == 3

    library.calls.start_over()  # same file, same inode; Z_PK 4 will exist again, so only the anchor tells
    library.call(JANE, at=times[0], unique_id="OLD-0")
    for n in range(3):
        library.call(JANE, at=ago(hours=5 - n))
    report = engine.extract("calls")

    assert report.rebuilt
    assert (report.added, report.duplicates) == (3, 1)  # OLD-0 came back: it is in the outbox


def test_a_days_run_reads_behind_the_mark_but_still_tells_a_call_history_started_over(library: Library, tmp_path):
    engine = extraction(library, tmp_path / "state")
    for n in range(3):
        library.call(JANE, at=ago(days=40 - n), unique_id=f"OLD-{n}")
    assert engine.extract("calls", days=30).added == 0
    assert engine.extract("calls", days=60).added == 3  # behind the mark: the older history

    library.calls.start_over()
    library.call(JANE, at=ago(days=1), unique_id="NEW-0")
    report = engine.extract("calls", days=60)

    assert report.rebuilt and report.added == 1
    library.call(JANE, at=ago(hours=1), unique_id="NEW-1")
    assert engine.extract("calls").added == 1  # the mark is the new store's


def test_a_chat_db_started_over_while_a_send_is_under_way_is_read_again(library: Library, tmp_path):
    """The mark waiting before the unsent row keeps that row's neighbour as its anchor, so a rebuild
    in the same file is still told apart from more rows."""
    engine = extraction(library, tmp_path / "state")
    library.text(JANE, at=ago(hours=2), guid="OLD-0")
    engine.extract("messages")  # the source's first mark
    library.text(JANE, at=ago(hours=1), guid="OLD-1")
    library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=30), guid="SENDING")
    assert engine.extract("messages").added == 1  # the mark waits at OLD-1's row

    library.chat.start_over()  # same file, same inode; ROWID 2 exists again, so only the anchor tells
    for n in range(3):
        library.text(JANE, at=ago(minutes=30 - n), guid=f"NEW-{n}")
    report = engine.extract("messages")

    assert report.rebuilt
    assert report.added == 3


def test_a_first_sync_waiting_for_a_send_resumes_just_before_it_and_keeps_its_lookback(library: Library, tmp_path):
    """The mark of a first sync cannot pass a message still being sent, but the next pass need not read
    the whole lookback again: it reads from that row on, with the window, until a pass has read every row."""
    engine = extraction(library, tmp_path / "state")
    for n in range(5):
        library.text(JANE, at=ago(days=100 - n))
    sending = library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=30))
    library.text(JANE, at=ago(days=3 * 365))  # history iCloud brought in late, beyond the 365-day lookback
    first = engine.extract("messages")
    assert (first.added, first.skipped["not-sent-yet"], first.skipped["before-window"]) == (5, 1, 1)

    waiting = engine.extract("messages")  # still being sent
    assert (waiting.rows, waiting.added, waiting.skipped["before-window"]) == (2, 0, 1)

    library.chat.finish_sending(sending)
    sent = engine.extract("messages")
    assert (sent.rows, sent.added, sent.skipped["before-window"]) == (2, 1, 1)

    library.text(JANE, at=ago(days=2 * 365))  # came after the first sync was complete: taken like any new row
    assert engine.extract("messages").added == 1


def test_a_first_sync_waiting_for_a_send_keeps_its_lookback_only_for_the_rows_it_read(library: Library, tmp_path):
    """It read every row there was: history iCloud brings in afterwards is new, taken whatever its date, while
    the send waits and once it is done; the row beyond the lookback it read stays out."""
    engine = extraction(library, tmp_path / "state")
    library.text(JANE, at=ago(days=2))
    sending = library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=30))
    library.text(JANE, at=ago(days=3 * 365))
    first = engine.extract("messages")
    assert (first.added, first.held, first.skipped["before-window"]) == (1, True, 1)

    library.text(JANE, at=ago(days=400))  # delivered late
    waiting = engine.extract("messages")
    library.chat.finish_sending(sending)
    library.text(JANE, at=ago(days=500))
    sent = engine.extract("messages")

    assert (waiting.added, waiting.skipped["before-window"]) == (1, 1)
    assert (sent.added, sent.held, sent.skipped["before-window"]) == (2, False, 1)
    assert engine.store.mark("messages").window_ms is None


def test_a_first_sync_waiting_for_a_send_and_stopped_part_way_keeps_its_lookback_for_every_row(
        library: Library, tmp_path):
    """Stopped before it read every row, it has not seen the old ones above: the next pass reads them as
    the first sync would have."""
    engine = extraction(library, tmp_path / "state", batch_size=2)
    library.text(JANE, at=ago(days=2))
    library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=30))
    library.text(JANE, at=ago(hours=5))
    library.text(JANE, at=ago(days=3 * 365))  # beyond the lookback, not read yet

    stopped = engine.extract("messages", progress=lambda rows: engine.stopping.set())
    rest = extraction(library, tmp_path / "state", batch_size=2).extract("messages")

    assert (stopped.rows, stopped.added, stopped.held) == (2, 1, True)
    assert (rest.added, rest.skipped["before-window"]) == (1, 1)


@pytest.mark.parametrize(("days", "read"), [(7, 0), (450, 1)])
def test_a_days_run_does_not_step_over_history_that_came_after_a_waiting_first_sync(
        library: Library, tmp_path, days: int, read: int):
    """`--days N`, narrower or wider than the first sync's lookback, reads its own N days; the older history
    delivered late is left to the next run."""
    engine = extraction(library, tmp_path / "state")
    library.text(JANE, at=ago(days=2))
    sending = library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=30))
    engine.extract("messages")
    library.text(JANE, at=ago(days=400))  # delivered late
    library.text(JANE, at=ago(days=500))
    library.chat.finish_sending(sending)

    assert engine.extract("messages", days=days).added == 1 + read
    assert engine.extract("messages").added == 2 - read


def test_a_run_with_more_days_than_a_waiting_first_sync_reads_them(library: Library, tmp_path):
    engine = extraction(library, tmp_path / "state")
    library.text(JANE, at=ago(days=100))
    library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=30))
    library.text(JANE, at=ago(days=3 * 365))
    engine.extract("messages")

    assert engine.extract("messages", days=4 * 365).added == 1


def test_a_first_sync_stopped_part_way_resumes_with_its_lookback(library: Library, tmp_path):
    class Stopped(Exception):
        pass

    def stop(rows: int) -> None:
        raise Stopped

    engine = extraction(library, tmp_path / "state", batch_size=2)
    for n in range(5):
        library.text(JANE, at=ago(hours=10 - n))
    library.text(JANE, at=ago(days=3 * 365))  # history iCloud brought in late, beyond the 365-day lookback
    with pytest.raises(Stopped):
        engine.extract("messages", progress=stop)  # a crash or a stop after the first batch

    rest = engine.extract("messages")

    assert (rest.added, rest.skipped["before-window"]) == (3, 1)


def test_an_extraction_a_stopping_daemon_ends_between_batches_keeps_its_lookback_for_the_next_start(
        library: Library, tmp_path):
    engine = extraction(library, tmp_path / "state", batch_size=2)
    for n in range(5):
        library.text(JANE, at=ago(hours=10 - n))
    library.text(JANE, at=ago(days=3 * 365))  # history iCloud brought in late, beyond the 365-day lookback

    stopped = engine.extract("messages", progress=lambda rows: engine.stopping.set())  # SIGTERM meanwhile
    rest = extraction(library, tmp_path / "state", batch_size=2).extract("messages")  # the next start

    assert (stopped.rows, stopped.added) == (2, 2)
    assert (rest.added, rest.skipped["before-window"]) == (3, 1)


def test_a_group_message_read_again_goes_to_no_one_added_to_the_group_since(library: Library, tmp_path):
    """chat_handle_join holds today's members: a re-read (--full, the daily sweep, a rebuild) must not
    send an old message to someone who joined after it."""
    ann, bob, cat = "+16135550111", "+16135550122", "+16135550133"
    engine = extraction(library, tmp_path / "state")
    library.group_text([ann, bob], at=ago(days=2))
    assert engine.extract("messages").added == 2

    chat = library.chat.conn.execute("SELECT chat_id FROM chat_handle_join LIMIT 1").fetchone()[0]
    library.chat.conn.execute("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?, ?)",
                              (chat, library.chat.handle(cat)))
    library.chat.commit()
    library.group_text([ann, bob], at=ago(hours=1))  # the chat as it is now: Cat gets this one
    assert engine.extract("messages").added == 3

    again = engine.extract("messages", full=True, days=7)

    assert (again.added, again.duplicates) == (0, 6)  # both messages known, with every party they have now
    assert sorted(a for (a,) in engine.store._conn.execute("SELECT address FROM outbox")) == [ann, ann, bob, bob, cat]


def test_a_call_the_owner_deleted_at_the_mark_is_no_rebuild(library: Library, tmp_path):
    """Deleting the newest call lowers MAX(Z_PK), not Core Data's Z_MAX: nothing is read again."""
    engine = extraction(library, tmp_path / "state")
    last = [library.call(JANE, at=ago(hours=10 - n)) for n in range(3)][-1]
    engine.extract("calls")

    library.calls.conn.execute("DELETE FROM ZCALLRECORD WHERE Z_PK = ?", (last,))
    library.calls.commit()
    deleted = engine.extract("calls")
    library.call(JANE, at=ago(hours=1))
    report = engine.extract("calls")

    assert not deleted.rebuilt and deleted.rows == 0
    assert not report.rebuilt
    assert (report.rows, report.added) == (1, 1)


def test_the_newest_message_deleted_by_the_owner_is_no_rebuild(library: Library, tmp_path):
    """Deleting the newest message lowers MAX(ROWID), not the sequence SQLite hands ROWIDs out from."""
    engine = extraction(library, tmp_path / "state")
    library.text(JANE, at=ago(hours=2))
    spam = library.text("+16135550999", at=ago(minutes=5))
    engine.extract("messages")

    library.chat.delete_message(spam)
    report = engine.extract("messages")

    assert not report.rebuilt
    assert report.rows == 0


# -- contacts for waiting items, and the queries' plans ---------------------------------------------

def items(address: str, n: int, start: int = 0) -> list[NewItem]:
    return [NewItem(f"msg:{address}:{i}", address, "TEXT_INBOUND", 1_700_000_000_000 + i * 1000, None)
            for i in range(start, start + n)]


def test_items_waiting_for_a_contact_get_it_in_passes_however_many_wait(monkeypatch):
    monkeypatch.setattr("crm_syncd.store.ATTACH_ROWS", 3)  # several transactions for one pass
    store = Store.memory()
    store.enqueue("messages", items(JANE, 7) + items("+16135550122", 4, start=100), Mark(11, "1:2"))
    store.hold_unresolved("unknown contact")
    store.enqueue("messages", items(JANE, 2, start=50), Mark(13, "1:2"))

    store.map_addresses([JANE], 7, "card")
    assert store.counts() == {"held": 11, "pending": 2, "delivered": 0}  # status sees what is written

    claimed = store.claim(100)
    assert sorted(item.id for item in claimed) == list(range(1, 8)) + [12, 13]  # held ones were released too
    assert {item.contact_id for item in claimed} == {7}
    assert store.unresolved_addresses(held=True) == ["+16135550122"]
    assert store.attach() == 0  # nothing mapped since


def test_an_attach_pass_that_fails_is_made_again_by_the_next_call(tmp_path):
    """The pass cleared its 'something was mapped' flag first; failing, it left the items waiting
    for good (until some other address was mapped)."""
    store = Store(tmp_path / "state.db")
    store.enqueue("messages", items(JANE, 3), Mark(3, "1:2"))
    store.map_addresses([JANE], 7, "card")
    store._conn.execute("PRAGMA busy_timeout = 50")  # give up on a lock at once, not after 10 s
    blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer, e.g. `crm-syncd retry-failed`

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.attach()
    blocker.execute("ROLLBACK")

    assert store.attach() == 3
    assert [item.contact_id for item in store.claim(10)] == [7, 7, 7]


def test_an_item_extracted_after_its_address_is_known_needs_no_pass():
    store = Store.memory()
    store.map_addresses([JANE], 7, "card")
    store.attach()
    store.enqueue("messages", items(JANE, 2), Mark(2, "1:2"))
    assert store.attach() == 0
    assert [item.contact_id for item in store.claim(10)] == [7, 7]


def test_a_batch_of_several_statements_keeps_its_order_refuses_its_duplicates_and_finds_known_contacts(monkeypatch):
    monkeypatch.setattr("crm_syncd.store.ENQUEUE_ROWS", 4)  # 11 items: statements of 4, 4 and 3
    store = Store.memory()
    store.map_addresses([JANE], 7, "card")
    store.attach()
    batch = items("+16135550122", 5, start=20)[::-1] + items(JANE, 3)
    again = [batch[1], batch[6]._replace(key="msg:elsewhere")]  # the same key; the same address, type and second
    result = store.enqueue("messages", batch + again + items(JANE, 1, start=9), Mark(11, "1:2"))

    assert (result.added, result.duplicates) == (9, 2)
    assert store._conn.execute("SELECT key, contact_id FROM outbox ORDER BY id").fetchall() == (
        [(item.key, None) for item in batch[:5]] + [(item.key, 7) for item in batch[5:]] + [(f"msg:{JANE}:9", 7)])


def test_mapping_an_address_to_the_contact_it_already_has_writes_nothing():
    store = Store.memory()
    store.map_addresses([JANE], 7, "card")
    written = store._conn.total_changes

    store.map_addresses([JANE], 7, "card")  # every contacts sync maps the whole address book again
    store.map_addresses([JANE], 9, "crm", replace=False)
    assert store._conn.total_changes == written

    store.map_addresses([JANE], 9, "card")
    assert store.contact_for(JANE) == 9


def test_the_outbox_queries_of_extraction_resolution_and_delivery_never_scan_or_sort_the_outbox():
    store = Store.memory()
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    store.enqueue("messages", items(JANE, 3) + items("+16135550122", 3, start=10), Mark(6, "1:2"))
    store.map_addresses([JANE], 7, "card")
    sending = store.claim(2)
    store.settle(delivered=[(sending[0], 70)], retry=[(sending[1], "503")])
    store.unresolved_addresses()
    store.hold_unresolved("unknown contact")
    store.unresolved_addresses(held=True)
    store.fail_open(["+16135550122"], "placeholder rejected")
    store.crm_ids(7), store.sending(), store.last_claim_ms(), store.failed_count(), store.held_by_reason()
    store.keys_continued([("msg:G", 1_700_000_000_000)])
    store.map_addresses(["+16135550122"], 8, "placeholder")
    store.attach()
    store.begin_merge(8, 7)
    store.forget_contact(7)
    store._conn.set_trace_callback(None)

    plans = {}
    for sql in {s for s in statements if " outbox" in s and not s.startswith(("BEGIN", "COMMIT", "PRAGMA"))}:
        plans[sql] = [row[3] for row in store._conn.execute("EXPLAIN QUERY PLAN " + sql)]
    assert len(plans) >= 15
    assert {sql: plan for sql, plan in plans.items()
            if any(step.startswith("SCAN outbox") or "TEMP B-TREE FOR ORDER BY" in step for step in plan)} == {}
