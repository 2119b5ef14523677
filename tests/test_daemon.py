"""`crm-syncd run` end to end: the real daemon process, real watchdog, the stand-in CRM.

The test process is the "Apple" writer: it inserts into the fixture databases in WAL mode and
keeps its connections open, so new rows live only in the -wal files, as on a real Mac.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http.server
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from crm_syncd import daemon as daemon_module
from crm_syncd.crm import CitadelClient, occurred_iso
from crm_syncd.daemon import LAST_SWEEP, Lock
from crm_syncd.engine import Engine
from crm_syncd.settings import Settings
from crm_syncd.sources.messages import MessagesReader
from crm_syncd.store import SCREENED, Store, now_ms
from crm_syncd.watch import Probe, Watcher
from tests.conftest import CLI
from tests.harness.callhistory import CallHistoryDB
from tests.harness.chatdb import ChatDB
from tests.harness.citadel import Faults
from tests.harness.library import Library, ago
from tests.harness.processes import daemon_in_process, eventually, unprivileged, until
from tests.harness.statedb import a_backup_of, restore

JANE = "+16135550111"
STATE_DIR = "Library/Application Support/crm-syncd"  # the default, under HOME


def iso(at) -> str:
    return occurred_iso(int(at.timestamp() * 1000))


def status(cli: CLI) -> dict:
    return json.loads(cli("status", "--json").stdout)


def status_when(cli: CLI, holds: Callable[[dict], object], timeout: float = 20.0, what: str = "condition") -> dict:
    """The first `status --json` for which `holds` is true, polled as `eventually` does."""
    return eventually(lambda: doc if holds(doc := status(cli)) else None, timeout=timeout, what=what)


def test_new_messages_and_calls_arrive_once_each_while_apple_keeps_the_database_open(
        library: Library, citadel, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    d = daemon()

    library.text(JANE)
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the message")
    library.call(JANE, originated=True, duration=12)
    library.text(JANE, from_me=True)
    eventually(lambda: len(citadel.interactions_of(JANE)) == 3, what="the call and the reply")

    assert library.messages_db.with_name("chat.db-wal").stat().st_size > 0  # still only in the WAL
    assert d.stop() == 0
    assert Counter(i["type"] for i in citadel.interactions_of(JANE)) == {
        "TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1, "CALL_OUTBOUND": 1}


def test_a_burst_of_5000_messages_arrives_complete_in_bounded_batches(library: Library, citadel, daemon, daemon_env):
    daemon_env.env["CRM_SYNCD_BATCH_SIZE"] = "500"
    library.card(first="Jane", last="Doe", phones=[JANE])
    d = daemon()

    library.chat.autocommit = False
    start = ago(days=20)
    for n in range(5000):
        library.text(JANE, at=start.replace(microsecond=0) + timedelta(seconds=n))
    library.chat.commit()

    eventually(lambda: len(citadel.interactions_of(JANE)) >= 5000, timeout=120, what="5000 interactions")
    assert d.stop() == 0
    batches = [e["rows"] for e in d.events("extract.batch") if e.get("source") == "messages"]
    assert sum(batches) == 5000 and max(batches) <= 500
    assert len(citadel.interactions_of(JANE)) == 5000


def test_a_new_address_book_card_is_picked_up_by_the_rescan_timer(library: Library, citadel, daemon):
    d = daemon()
    assert citadel.contacts() == []

    library.card(source=1, first="Newly", last="Added", phones=["+1 613 555 0177"])

    eventually(lambda: [c for c in citadel.contacts() if c["lastName"] == "Added"], what="the new contact")
    assert d.stop() == 0



def test_an_account_removed_while_the_daemon_runs_takes_nothing_from_a_person_also_on_another_account(
        library: Library, citadel, daemon):
    library.card(source=1, first="Jane", last="Doe", phones=[(JANE, "Mobile")])
    library.card(source=2, first="Jane", last="Doe", phones=[(JANE, "Mobile")], emails=["jane@work.example"],
                 organization="Acme", note="Met at the 2024 conference")
    d = daemon()
    jane = eventually(lambda: citadel.contacts(), what="Jane's contact")[0]
    assert jane["notes"] == "Met at the 2024 conference"

    work = library.books[2]
    work.close()
    shutil.rmtree(work.path.parent)  # the owner removes the work account
    library.text(JANE)

    eventually(lambda: any(e["cards"] == 1 for e in d.events("contacts.synced")), what="a pass without the account")
    eventually(lambda: citadel.interactions(jane["id"]), what="the text")
    (after,) = citadel.contacts()
    assert (after["email"], after["organization"], after["notes"]) == (
        "jane@work.example", "Acme", "Met at the 2024 conference")
    assert d.stop() == 0


def test_texts_from_a_number_messages_links_later_to_a_cards_email_move_from_its_placeholder_to_that_contact(
        library: Library, citadel, daemon):
    """No card changes: the daemon learns the grouping from chat.db alone, and folds the placeholder at once."""
    stranger, email = "+19055551234", "sam@example.org"
    library.text(stranger, at=ago(minutes=9))
    library.card(first="Sam", last="Day", emails=[email])
    library.text(email, at=ago(minutes=8))
    d = daemon()
    eventually(lambda: len(citadel.interactions()) == 2, what="both texts")
    assert sorted(c["firstName"] for c in citadel.contacts()) == ["Sam", "Unknown"]
    sam = next(c["id"] for c in citadel.contacts() if c["firstName"] == "Sam")

    library.chat.conn.execute("UPDATE handle SET person_centric_id = 'p-1' WHERE id IN (?, ?)", (stranger, email))
    library.text(stranger, at=ago(minutes=1))  # Messages now takes them for one person, and he texts again

    eventually(lambda: [c["id"] for c in citadel.contacts()] == [sam], what="the placeholder folded into Sam's")
    eventually(lambda: len(citadel.interactions(sam)) == 3, what="every text on Sam's contact")
    assert Counter(i["occurredAt"] for i in citadel.interactions()).most_common(1)[0][1] == 1
    assert [(c["phone"], c["email"]) for c in citadel.contacts()] == [(stranger, email)]
    assert d.stop() == 0


def test_a_placeholder_whose_backlog_is_on_its_way_is_folded_when_messages_links_its_number_to_a_cards_email(
        library: Library, citadel, daemon, daemon_env: CLI):
    """As above, while the stranger's 400 texts are still being delivered to his placeholder: the fold
    waits for the push pass to end, rather than take its texts in flight for ones the owner added."""
    stranger, email = "+19055551234", "sam@example.org"
    library.chat.autocommit = False
    start = ago(days=3).replace(microsecond=0)
    for n in range(400):
        library.text(stranger, at=start + timedelta(minutes=n))
    library.chat.commit()
    library.chat.autocommit = True
    library.card(first="Sam", last="Day", emails=[email])
    library.text(email, at=ago(minutes=8))
    citadel.latency_s = 0.03  # a hosted CRM: the backlog takes a few seconds
    d = daemon()
    placeholder = eventually(lambda: next((c["id"] for c in citadel.contacts() if c["firstName"] == "Unknown"), None),
                             what="the placeholder")
    eventually(lambda: len(citadel.interactions(placeholder)) >= 30, what="part of the backlog")
    sam = next(c["id"] for c in citadel.contacts() if c["firstName"] == "Sam")

    library.chat.conn.execute("UPDATE handle SET person_centric_id = 'p-1' WHERE id IN (?, ?)", (stranger, email))
    library.text(stranger, at=ago(minutes=1))

    eventually(lambda: [c["id"] for c in citadel.contacts()] == [sam], timeout=30, what="the placeholder folded")
    eventually(lambda: len(citadel.interactions(sam)) == 402, timeout=60, what="every text on Sam's contact")
    assert status(daemon_env)["duplicates"] == []
    assert d.stop() == 0


def test_a_screened_call_waits_without_a_placeholder_until_its_number_is_on_a_card(
        library: Library, citadel, daemon, daemon_env):
    spam, stranger = "+19055551234", "+19055556789"
    d = daemon()
    library.call(spam, filtered_out_reason=1)  # blocked, or silenced as unknown
    library.call(stranger)
    eventually(lambda: len(citadel.interactions()) == 1, what="the stranger's call")  # read after the screened one
    assert [c["phone"] for c in citadel.contacts()] == [stranger]
    assert status(daemon_env)["outbox"]["held_by_reason"] == {SCREENED: 1}
    assert f"held 1 ({SCREENED} 1)" in daemon_env("status").stdout

    library.card(first="Jane", last="Doe", phones=[spam])
    eventually(lambda: len(citadel.interactions_of(spam)) == 1, what="the screened call, once her card is there")
    assert d.stop() == 0
    assert [i["type"] for i in citadel.interactions_of(spam)] == ["CALL_MISSED"]
    assert sorted(c["firstName"] for c in citadel.contacts()) == ["Jane", "Unknown"]


BACKLOG = 6000  # Jane's texts over 200 days: some 15 s of delivery to a CRM 20 ms away


def _a_backfill_under_way(library: Library, citadel, daemon, newest: Callable[[], object] = lambda: None):
    """The daemon's first run, delivering Jane's BACKLOG (and what `newest` writes after it, first)
    to a CRM a few ms away (as a hosted one is)."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.chat.autocommit = False
    start = ago(days=200).replace(microsecond=0)
    for n in range(BACKLOG):
        library.text(JANE, at=start + timedelta(minutes=n))
    newest()
    library.chat.commit()
    citadel.latency_s = 0.02
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) >= 300, timeout=60, what="the backfill under way")
    return d


def test_a_card_added_during_a_backfill_reaches_the_crm_before_the_backfill_ends(
        library: Library, citadel, daemon):
    """The rescan's listing of the CRM's contacts takes its turn for a connection behind the push
    workers, first come first served; it does not wait until the whole outbox is delivered."""
    d = _a_backfill_under_way(library, citadel, daemon)

    library.card(source=1, first="Newly", last="Added", phones=["+16135550177"])

    eventually(lambda: "Added" in [c["lastName"] for c in citadel.contacts()], timeout=120, what="the new contact")
    assert len(citadel.interactions_of(JANE)) < BACKLOG
    d.stop()


def test_a_text_written_during_a_backfill_reaches_the_crm_before_the_backfill_ends(
        library: Library, citadel, daemon):
    """Delivery takes the newest items first: a first run's year of history does not hold up today's
    text for the hour its backlog takes at the CRM's pace."""
    library.card(first="Sam", last="Roe", phones=["+16135550177"])
    d = _a_backfill_under_way(library, citadel, daemon)

    library.text("+16135550177")
    library.chat.commit()

    eventually(lambda: citadel.interactions_of("+16135550177"), timeout=60, what="today's text")
    assert len(citadel.interactions_of(JANE)) < BACKLOG / 2
    d.stop()
    assert len(citadel.interactions_of(JANE)) < BACKLOG  # still under way: the test showed the order, not the pace


def test_a_strangers_first_text_during_a_backfill_gets_its_placeholder_and_reaches_the_crm_before_it_ends(
        library: Library, citadel, daemon):
    """Items extracted while a push pass works through a backlog are resolved in that pass: a number
    with no contact yet gets its placeholder then, not once the backlog is delivered."""
    d = _a_backfill_under_way(library, citadel, daemon)

    library.text("+16135550199")
    library.chat.commit()

    eventually(lambda: citadel.interactions_of("+16135550199"), timeout=60, what="the stranger's text")
    assert len(citadel.interactions_of(JANE)) < BACKLOG / 2
    assert [c["firstName"] for c in citadel.contacts() if c["phone"] == "+16135550199"] == ["Unknown"]
    d.stop()


def test_a_text_another_mac_sends_during_a_backfill_is_adopted_not_created_twice(library: Library, citadel, daemon):
    """Two Macs: the other one delivers each text within a second. This one, newest first through its
    first run's backlog, listed Sam's day for his earlier text; the later one must be looked up
    afresh and adopted, not checked against that listing and created a second time."""
    sam = citadel.add_contact(firstName="Sam", lastName="Roe", phone="+16135550177")
    library.card(first="Sam", last="Roe", phones=["+16135550177"])

    def from_another_mac(at) -> None:
        httpx.post(f"{citadel.url}/api/contacts/{sam}/interactions", json={
            "type": "TEXT_INBOUND", "occurredAt": iso(at), "source": "IMPORT_IOS"}).raise_for_status()

    earlier = ago(hours=30).replace(hour=6, minute=0, second=0, microsecond=0)  # later: 08:00, the same UTC day
    from_another_mac(earlier)
    d = _a_backfill_under_way(library, citadel, daemon, newest=lambda: library.text("+16135550177", at=earlier))

    from_another_mac(earlier + timedelta(hours=2))
    library.text("+16135550177", at=earlier + timedelta(hours=2))
    library.chat.commit()

    eventually(lambda: len(citadel.interactions_of(JANE)) == BACKLOG, timeout=120, what="the backfill done")
    eventually(lambda: d.events("push.done"), timeout=30, what="the end of the push pass")
    assert d.stop() == 0
    assert sorted(i["occurredAt"] for i in citadel.interactions(sam)) == [
        iso(earlier), iso(earlier + timedelta(hours=2))]


def test_retry_failed_while_the_daemon_runs_has_its_next_rescan_send_a_refused_email(
        library: Library, citadel, daemon, daemon_env: CLI):
    """The address book has not changed, yet the rescan after `retry-failed` is a contacts pass."""
    library.card(first="Ann", last="Lee", phones=[JANE], emails=["ann@example.com"])
    citadel.reject_contact_values = {"ann@example.com"}
    d = daemon()
    eventually(lambda: d.events("contacts.field_left_out"), what="the email left out")
    citadel.reject_contact_values = set()  # the CRM takes it now

    retried = daemon_env("retry-failed")

    assert retried.code == 0 and "1 contact field(s) the CRM refused are sent again" in retried.stdout
    eventually(lambda: [c["email"] for c in citadel.contacts()] == ["ann@example.com"], what="the email sent")
    d.stop()


def test_sigterm_drains_and_a_restart_continues_from_the_mark(library: Library, citadel, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    first = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")
    assert first.stop() == 0

    library.text(JANE, at=ago(hours=2))  # arrives while the daemon is stopped
    second = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, what="the catch-up")
    library.text(JANE, at=ago(hours=1))
    eventually(lambda: len(citadel.interactions_of(JANE)) == 3, what="the live message")
    assert second.stop() == 0
    assert len(citadel.interactions_of(JANE)) == 3


def texts_around_a_gap(library: Library) -> int:
    """Jane's card and three texts of hers, the middle one deleted: returns its ROWID, a gap below the mark."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    gap = library.text(JANE, at=ago(hours=2))
    library.chat.delete_message(gap)
    library.text(JANE, at=ago(hours=1))
    return gap


def late_row_into(library: Library, gap: int) -> None:
    """A new text of Jane's that turns up at the gap's ROWID, below the mark (a restore renumbered it)."""
    late = library.text(JANE, at=ago(minutes=90))
    library.chat.conn.execute("UPDATE message SET ROWID = ? WHERE ROWID = ?", (gap, late))
    library.chat.conn.execute("UPDATE chat_message_join SET message_id = ? WHERE message_id = ?", (gap, late))
    library.chat.commit()


def test_the_daily_sweep_is_due_by_the_wall_clock_across_restarts_and_reads_a_row_below_the_mark(
        library: Library, citadel, daemon, home):
    """A Mac restarted or asleep every night still gets its daily re-read of the last days: the day is
    counted by the wall clock and kept in the state database, not by the daemon's own uptime."""
    gap = texts_around_a_gap(library)
    first = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, what="the first catch-up")
    assert first.stop() == 0
    late_row_into(library, gap)  # unseen by any catch-up past the mark
    state = sqlite3.connect(home / STATE_DIR / "state.db", timeout=10)
    with state:  # the last sweep was 25 hours ago, by the wall clock
        state.execute("INSERT OR REPLACE INTO kv (key, value) VALUES ('last_sweep_ms', ?)",
                      (int((time.time() - 25 * 3600) * 1000),))

    second = daemon()

    eventually(lambda: len(citadel.interactions_of(JANE)) == 3, what="the row below the mark, read by the sweep")
    assert second.stop() == 0
    (swept,) = state.execute("SELECT value FROM kv WHERE key = 'last_sweep_ms'").fetchone()
    state.close()
    assert time.time() - int(swept) / 1000 < 60  # its day noted: the next is due in 24 hours


def test_a_daily_sweep_that_could_not_read_a_source_is_not_counted_as_done(library: Library, citadel, daemon, home):
    gap = texts_around_a_gap(library)
    first = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, what="the first catch-up")
    assert first.stop() == 0
    late_row_into(library, gap)
    library.chat.checkpoint()
    library.chat.close()
    chat_db = library.messages_db
    readable = chat_db.read_bytes()
    chat_db.write_bytes(b"not a database " * 1000)  # damaged when the sweep comes
    with contextlib.closing(sqlite3.connect(home / STATE_DIR / "state.db", timeout=10)) as state, state:
        state.execute("INSERT OR REPLACE INTO kv (key, value) VALUES ('last_sweep_ms', ?)",
                      (int((time.time() - 25 * 3600) * 1000),))
    second = daemon()
    eventually(lambda: second.events("daemon.sweep_failed"), what="the sweep that could not read chat.db")
    assert second.stop() == 0

    chat_db.write_bytes(readable)
    third = daemon()

    eventually(lambda: len(citadel.interactions_of(JANE)) == 3, what="the row below the mark, read by the sweep")
    assert third.stop() == 0


def test_the_daily_sweep_still_comes_a_day_on_after_a_clock_set_ahead_is_put_right_under_the_daemon(
        library: Library, citadel, daemon, daemon_env, home, tmp_path):
    """A clock set a month ahead by mistake, then put right by network time while the daemon runs: the
    sweep it ran meanwhile does not put the next one a month away."""
    offset = tmp_path / "clock-offset"
    daemon_env.set_clock(offset, 0)
    gap = texts_around_a_gap(library)
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, what="the catch-up")

    offset.write_text(str(30 * 86_400))
    eventually(lambda: last_sweep_ms(home) > (time.time() + 86_400) * 1000, what="the sweep the clock ahead made due")
    offset.write_text("0")
    eventually(lambda: last_sweep_ms(home) <= time.time() * 1000, what="the day counted again from now")
    late_row_into(library, gap)
    offset.write_text(str(25 * 3600))  # a day and an hour on

    eventually(lambda: len(citadel.interactions_of(JANE)) == 3, what="the row below the mark, read by the sweep")
    assert d.stop() == 0


def test_the_daily_sweep_of_a_source_not_read_yet_reads_it_as_a_first_sync(
        library: Library, citadel, tmp_path: Path, monkeypatch):
    """Call history not there at the start, or whose first read failed, has no mark when the daily sweep
    comes first: the sweep reads it over the lookback window and marks it, as the first sync would, not
    only its last 7 days (its mark would leave the older calls out for good). In-process, as in
    test_wake: nothing but the timers runs, so the sweep is the source's first read."""
    monkeypatch.setattr(daemon_module, "TICK_S", 0.02)
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.call(JANE, originated=True, duration=12, at=ago(days=30))
    library.call(JANE, originated=True, duration=5, at=ago(hours=1))
    settings = Settings(api_url=citadel.url, messages_db=library.messages_db, calls_db=library.calls_db,
                        addressbook_dir=library.addressbook_dir, state_dir=tmp_path / "state",
                        contacts_rescan_s=3600, safety_probe_s=3600)  # no timer but the sweep is due

    async def scenario() -> None:
        async with CitadelClient(citadel.url, timeout=5) as crm:
            daemon = await daemon_in_process(settings, crm)
            store = daemon.store
            due = now_ms() - 25 * 3600 * 1000
            store.put(LAST_SWEEP, due)
            timers = asyncio.create_task(daemon._timers(lambda: None))
            try:
                await until(lambda: store.get(LAST_SWEEP) > due, "the sweep")
            finally:
                daemon.stop.set()
                await timers
            assert store.mark("calls") is not None
            await daemon.engine.resolve()
            await daemon.engine.push()
            store.close()

    asyncio.run(scenario())
    assert len(citadel.interactions_of(JANE)) == 2


def last_sweep_ms(home: Path) -> int:
    with contextlib.closing(sqlite3.connect(home / STATE_DIR / "state.db", timeout=10)) as state:
        row = state.execute("SELECT value FROM kv WHERE key = 'last_sweep_ms'").fetchone()
    return int(row[0]) if row else 0


def test_a_429_dated_by_the_crms_clock_is_waited_out_as_asked_when_the_macs_clock_is_an_hour_behind(
        library: Library, citadel, daemon, daemon_env, tmp_path):
    """Retry-After as an HTTP date is measured from the answer's own Date, not from the Mac's clock."""
    offset = tmp_path / "clock-offset"
    daemon_env.set_clock(offset, -3600)
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    d = daemon()
    eventually(lambda: citadel.interactions_of(JANE), what="the first message")
    citadel.faults = Faults(rate=1.0, kinds=("429",), limit=1,
                            retry_after=email.utils.formatdate(time.time() + 2, usegmt=True))
    library.text(JANE)

    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, timeout=30, what="the message, 2 s after the 429")
    assert d.stop() == 0


def test_status_counts_the_daemons_uptime_on_its_own_clock_not_the_macs_set_back_one(
        library: Library, citadel, daemon, daemon_env, tmp_path):
    offset = tmp_path / "clock-offset"
    daemon_env.set_clock(offset, 3600)  # an hour fast when the daemon starts
    began = time.monotonic()
    d = daemon()
    offset.write_text("0")  # network time puts it right

    def beat_by_the_right_clock() -> dict | None:
        doc = status(daemon_env)
        return doc if doc["last_beat_at"] < doc["started_at"] else None

    doc = eventually(beat_by_the_right_clock, what="a beat by the corrected clock")

    assert 0 <= doc["uptime_s"] <= time.monotonic() - began + 1, doc
    assert d.stop() == 0


def test_an_interaction_another_mac_sent_later_the_same_day_is_adopted_not_created_twice(
        library: Library, citadel, daemon):
    """The pre-check's listing of a contact's day is read afresh by every push pass, not kept for the daemon's life."""
    jane = citadel.add_contact(firstName="Jane", lastName="Doe", phone=JANE)  # the owner's contact

    def from_another_mac(at) -> None:
        httpx.post(f"{citadel.url}/api/contacts/{jane}/interactions", json={
            "type": "TEXT_INBOUND", "occurredAt": iso(at), "source": "IMPORT_IOS"}).raise_for_status()

    base = ago(hours=30).replace(hour=6, minute=0, second=0, microsecond=0)  # well inside one UTC day
    older, first, second = base, base + timedelta(hours=1), base + timedelta(hours=2)
    from_another_mac(older)  # Jane holds IMPORT_IOS interactions crm-syncd did not send: it checks first
    library.text(JANE, at=older)
    library.text(JANE, at=first)
    d = daemon()
    eventually(lambda: d.events("push.done"), what="the first push pass")

    from_another_mac(second)  # the other Mac delivers the next message first; then iCloud brings it here
    library.text(JANE, at=second)

    eventually(lambda: len(d.events("push.done")) == 2, what="the second push pass")
    assert d.stop() == 0
    assert sorted(i["occurredAt"] for i in citadel.interactions(jane)) == [iso(older), iso(first), iso(second)]


def test_rows_an_extraction_failed_to_read_are_read_once_chat_db_is_readable_again(
        library: Library, citadel, daemon):
    """Messages held chat.db locked through every retry of an extraction, then let go without writing:
    no file event follows and the probe sees nothing new, so the daemon must try again on its own
    (well before its 30 s safety probe)."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")

    library.chat.close()
    library.chat = ChatDB.open(library.messages_db)
    library.chat.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    library.text(JANE, at=ago(hours=2))  # takes the exclusive lock and keeps it
    eventually(lambda: d.events("extract.failed"), timeout=60, what="the extraction to give up on the lock")
    library.chat.conn.execute("PRAGMA locking_mode=NORMAL")
    library.chat.conn.execute("SELECT count(*) FROM message").fetchone()  # lets go, writing nothing

    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, timeout=10, what="the message read after the lock")
    assert d.stop() == 0


def test_sigterm_during_the_start_up_stops_within_the_shutdown_deadline_and_a_restart_duplicates_nothing(
        library: Library, citadel, daemon, daemon_env: CLI, home):
    """A stop cuts the start-up's contacts sync short, one create still on its way into a slow CRM. The
    restart must neither wait for the whole sync to end nor list the CRM before that create has landed."""
    daemon_env.env["CRM_SYNCD_SHUTDOWN_DEADLINE_S"] = "2"
    daemon_env.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "5"
    phones = [f"+1613555{n:04d}" for n in range(300, 315)]
    for n, phone in enumerate(phones):
        library.card(first=f"Card{n}", last="Slow", phones=[phone])
    citadel.latency_s = 3.0  # a slow CRM: the first contacts sync would take some 45 s
    proc = daemon_env.popen("run")
    log = home / "Library" / "Logs" / "crm-syncd" / "crm-syncd.log"
    try:
        eventually(lambda: citadel.contacts(), what="the first contact created by the start-up")
        proc.send_signal(signal.SIGTERM)  # the second create was sent as the first was answered
        sent = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
        assert code == 0 and took < 2 + 1, f"SIGTERM took {took:.1f}s, exit {code}"
        assert "daemon.watching" not in log.read_text()  # it was still starting up
    finally:
        proc.kill()
        proc.communicate()

    citadel.latency_s = 0
    d = daemon()  # at once: the stopped daemon's last create lands some 2 s from now
    eventually(lambda: d.events("daemon.watching") and not citadel.serving, what="the restart's contacts sync")
    assert d.stop() == 0
    assert sorted(c["phone"] for c in citadel.contacts()) == phones


def test_sigterm_while_an_extraction_waits_out_a_locked_chat_db_stops_within_the_shutdown_deadline(
        library: Library, citadel, daemon, daemon_env: CLI):
    """Messages holds chat.db locked for a long write; the extraction's thread is waiting it out (some 20 s
    of retries) when launchd sends SIGTERM: the process must not outlive the deadline (launchd's own
    ExitTimeOut, 20 s, ends in SIGKILL)."""
    daemon_env.env["CRM_SYNCD_SHUTDOWN_DEADLINE_S"] = "2"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    d = daemon()
    eventually(lambda: citadel.interactions_of(JANE), what="the first message")
    library.chat.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    library.text(JANE, at=ago(hours=2))  # takes the exclusive lock and keeps it
    time.sleep(1.5)  # no event tells: the hint, the debounce, then the extraction retrying against the lock

    d.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = d.proc.wait(timeout=60)
    took = time.monotonic() - sent

    assert code == 0 and took < 2 + 1, f"SIGTERM took {took:.1f}s, exit {code}"


def test_the_heartbeat_url_is_pinged_only_while_status_would_say_healthy(
        library: Library, citadel, daemon, daemon_env: CLI):
    """The dead-man switch is the owner's one alarm: while the daemon cannot read chat.db (no Full Disk
    Access after an upgrade) nothing reaches the CRM, so it must fall silent, and speak again once
    the daemon reads it."""
    pings: list[float] = []

    class Ping(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            pings.append(time.monotonic())
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    daemon_env.env.update(CRM_SYNCD_HEARTBEAT_URL=f"http://127.0.0.1:{server.server_address[1]}/ping",
                          CRM_SYNCD_HEARTBEAT_INTERVAL_S="1", CRM_SYNCD_ALLOW_INSECURE_HTTP="true")
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    os.chmod(library.messages_db, 0)
    try:
        d = daemon(prefix=unprivileged())
        eventually(lambda: status(daemon_env)["health"] == "degraded", what="status: degraded")
        silent_from = len(pings)
        beat = status(daemon_env)["last_beat_at"]
        for _ in range(2):  # two beats, each one due to ping (heartbeat_interval_s = 1, a beat every 5 s)
            beat = eventually(lambda: (lambda b: b if b != beat else None)(status(daemon_env)["last_beat_at"]),
                              timeout=15, what="the next beat")
        assert status(daemon_env)["health"] == "degraded"
        assert len(pings) == silent_from, f"{len(pings) - silent_from} ping(s) while status said degraded"

        os.chmod(library.messages_db, 0o644)
        eventually(lambda: citadel.interactions_of(JANE), timeout=90, what="the text, once chat.db is readable")
        eventually(lambda: len(pings) > silent_from, timeout=15, what="a ping once healthy again")
        assert status(daemon_env)["health"] == "healthy"
        assert d.stop() == 0
    finally:
        os.chmod(library.messages_db, 0o644)
        server.shutdown()


def test_a_heartbeat_url_slow_to_answer_never_holds_up_the_beat_status_reads(
        library: Library, citadel, daemon, daemon_env: CLI):
    """A dead-man switch (or a proxy) that trickles its answer a byte a second: the beat goes on every
    5 s, or `status` would call a working daemon hung after 15 s."""
    hits: list[socket.socket] = []
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:  # reads the request, then sends one byte of its answer and no more
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                conn.recv(65536)
                conn.sendall(b"H")
                hits.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    daemon_env.env.update(CRM_SYNCD_HEARTBEAT_URL=f"http://127.0.0.1:{server.getsockname()[1]}/ping",
                          CRM_SYNCD_ALLOW_INSECURE_HTTP="true")
    try:
        d = daemon()
        eventually(lambda: hits, what="the first ping")
        since = datetime.now(UTC) + timedelta(seconds=1)

        def beat_since_then() -> bool:
            doc = status(daemon_env)
            return bool(doc["last_beat_at"]) and datetime.fromisoformat(doc["last_beat_at"]) > since

        eventually(beat_since_then, timeout=12, what="a beat while the ping waits for its answer")
        assert status(daemon_env)["responding"] is True
        assert d.stop() == 0
    finally:
        server.close()
        for conn in hits:
            conn.close()


def test_a_messages_folder_moved_to_another_volume_and_linked_back_is_still_heard_at_once(
        library: Library, citadel, daemon, home):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.chat.close()
    elsewhere = home / "Volumes" / "External" / "Messages"
    elsewhere.parent.mkdir(parents=True)
    library.messages_db.parent.rename(elsewhere)
    library.messages_db.parent.symlink_to(elsewhere, target_is_directory=True)
    library.chat = ChatDB.open(library.messages_db)
    d = daemon()  # its safety probe comes every 30 s

    library.text(JANE)

    eventually(lambda: citadel.interactions_of(JANE), timeout=5, what="the message, from its file event")
    assert d.stop() == 0


def test_a_message_written_while_the_start_up_catches_up_arrives_at_once_not_at_the_next_probe(
        library: Library, citadel, daemon_env: CLI, home):
    """The watch begins after the start-up's catch-up; a row written during it made no event."""
    daemon_env.env["CRM_SYNCD_SAFETY_PROBE_S"] = "300"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    library.calls.close()  # the call history is held by its writer: the calls catch-up waits, retrying
    locker = CallHistoryDB.open(library.calls_db)
    locker.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.call(JANE, ago(hours=3))
    locker.commit()
    proc = daemon_env.popen("run")
    log = home / "Library" / "Logs" / "crm-syncd" / "crm-syncd.log"

    def messages_caught_up() -> bool:
        lines = log.read_text().splitlines() if log.exists() else []
        return any('"extract.done"' in line and json.loads(line).get("source") == "messages" for line in lines)

    try:
        eventually(messages_caught_up, timeout=30, what="the messages catch-up")
        library.text(JANE, at=ago(hours=1))  # while the calls catch-up waits for the lock
        locker.close()
        library.calls = CallHistoryDB.open(library.calls_db)
        eventually(lambda: len([i for i in citadel.interactions_of(JANE) if i["type"] == "TEXT_INBOUND"]) == 2,
                   timeout=20, what="the message written during the start-up")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_calls_arrive_promptly_once_the_call_history_folder_appears_after_the_start(
        library: Library, citadel, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.calls.close()
    shutil.rmtree(library.calls_db.parent)  # a Mac that has had no call yet
    d = daemon()  # its safety probe: every 30 s
    assert str(library.calls_db.parent) not in d.events("daemon.watching")[0]["directories"]

    library.calls_db.parent.mkdir()
    library.calls = CallHistoryDB.create(library.calls_db)
    library.call(JANE, originated=True, duration=12)

    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, timeout=10, what="the first call")
    library.call(JANE, originated=False, duration=5)  # and the folder is watched from now on
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, timeout=10, what="the second call")
    assert d.stop() == 0


def test_a_write_a_stat_cannot_see_is_read_when_its_event_comes(library: Library, citadel, daemon_env: CLI, daemon):
    """Messages' WAL, once checkpointed, is reused from its start at the same size; on HFS+ (mtimes to
    the whole second) a second commit in the same second leaves the -wal's stat as it was. The watch
    reported the write: that is enough, and the text arrives at once, not at the next write."""
    daemon_env.env["CRM_SYNCD_SAFETY_PROBE_S"] = "300"
    library.card(first="Jane", last="Doe", phones=[JANE])
    for minute in range(30):  # a WAL of some size, as Messages' is
        library.text(JANE, at=ago(hours=3, minutes=minute))
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 30, what="the backlog")
    library.chat.checkpoint("PASSIVE")  # SQLite's auto-checkpoint: the -wal keeps its size
    wal = library.messages_db.with_name("chat.db-wal")
    size = wal.stat().st_size
    library.text(JANE)  # written over the -wal's first frames
    eventually(lambda: len(citadel.interactions_of(JANE)) == 31, timeout=5, what="the first text")
    files = [library.messages_db, wal]
    mtimes = [f.stat().st_mtime_ns for f in files]

    os.kill(d.proc.pid, signal.SIGSTOP)  # its events wait in the kernel until the stat below is as HFS+'s
    eventually(lambda: Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
               what="the daemon stopped")
    library.text(JANE)
    for f, mtime in zip(files, mtimes):  # the same second: the mtimes HFS+ keeps do not move
        os.utime(f, ns=(f.stat().st_atime_ns, mtime))
    os.kill(d.proc.pid, signal.SIGCONT)

    assert wal.stat().st_size == size
    eventually(lambda: len(citadel.interactions_of(JANE)) == 32, timeout=5, what="the second text, from its event")


def test_the_daemon_is_quiet_after_a_text_its_own_reads_set_off_no_further_read(
        library: Library, citadel, daemon_env: CLI, daemon):
    """SQLite opens a -wal read-write even to read it: each read by crm-syncd closes one (a `closed`
    event, and an `attrib` one under root), which is no write, and must not set off the next read."""
    daemon_env.env.update(CRM_SYNCD_SAFETY_PROBE_S="300", CRM_SYNCD_CONTACTS_RESCAN_S="300")
    library.card(first="Jane", last="Doe", phones=[JANE])
    daemon()
    library.text(JANE)
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, timeout=10, what="the text")
    reads = Counter()

    class Reads(FileSystemEventHandler):  # every connection to chat.db opens its -wal
        def on_opened(self, event) -> None:
            reads[os.path.basename(event.src_path)] += 1

    observer = Observer()
    observer.schedule(Reads(), str(library.messages_db.parent))
    observer.start()
    try:
        time.sleep(3)  # nothing is written meanwhile: the absence of reads takes a while to see
    finally:
        observer.stop()
        observer.join()

    assert reads["chat.db-wal"] <= 1, f"chat.db read {reads['chat.db-wal']} times in 3 s, nothing written"


def inotify_watches(pid: int) -> int:
    """How many inotify watches a process holds (Linux: one `inotify wd:` line each in its fds' fdinfo)."""
    return sum(Path(f).read_text().count("inotify wd:") for f in Path(f"/proc/{pid}/fdinfo").iterdir()
               if Path(f"/proc/{pid}/fd/{Path(f).name}").exists())


def test_a_watch_that_missed_a_write_is_made_anew_by_the_safety_probe(
        library: Library, citadel, daemon_env: CLI, daemon, tmp_path: Path):
    """~/Library/Messages on an external drive, linked back: the drive is ejected and mounted again
    (the same folder, the same inode), and the watch hears nothing more though it looks alive. The
    next safety probe finds the write no event reported and watches the folder anew: later texts
    arrive at once."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 to mount a volume")
    image, volume = tmp_path / "drive.img", tmp_path / "Volumes" / "Drive"
    volume.mkdir(parents=True)
    with image.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mount, unmount = ["mount", "-o", "loop", str(image), str(volume)], ["umount", str(volume)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a loop device here")
    try:
        library.card(first="Jane", last="Doe", phones=[JANE])
        library.chat.close()
        shutil.copytree(library.messages_db.parent, volume / "Messages")
        shutil.rmtree(library.messages_db.parent)
        library.messages_db.parent.symlink_to(volume / "Messages", target_is_directory=True)
        daemon_env.env["CRM_SYNCD_SAFETY_PROBE_S"] = "10"
        d = daemon()
        watches = inotify_watches(d.proc.pid)
        subprocess.run(unmount, check=True)  # ejected while Messages is closed
        subprocess.run(mount, check=True)
        library.chat = ChatDB.open(library.messages_db)
        library.text(JANE)  # heard by nothing: the next safety probe brings it
        eventually(lambda: d.events("watch.renewed"), timeout=15, what="the folder watched anew by the probe")
        eventually(lambda: len(citadel.interactions_of(JANE)) == 1, timeout=5, what="the first text")

        library.text(JANE)  # the next probe is some 8 s away

        eventually(lambda: len(citadel.interactions_of(JANE)) == 2, timeout=2, what="the next text, from its event")
        assert inotify_watches(d.proc.pid) == watches  # the same folders, none looked out for in passing
    finally:
        library.chat.close()
        subprocess.run(unmount, capture_output=True)


def test_messages_on_a_volume_mounted_after_the_start_is_watched_once_its_folder_appears(
        library: Library, citadel, daemon_env: CLI, daemon, tmp_path: Path):
    """~/Library/Messages linked to a drive that is not mounted yet when the daemon starts (at login):
    the drive appears under /Volumes, not next to the link, and is looked out for there."""
    daemon_env.env["CRM_SYNCD_SAFETY_PROBE_S"] = "300"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.chat.close()
    volumes = tmp_path / "Volumes"
    volumes.mkdir()
    parked = tmp_path / "parked"
    library.messages_db.parent.rename(parked)
    library.messages_db.parent.symlink_to(volumes / "Drive" / "Messages", target_is_directory=True)
    d = daemon()
    assert str(library.messages_db.parent) not in d.events("daemon.watching")[0]["directories"]

    (volumes / "Drive").mkdir()  # mounted: its folder appears, Messages in it
    parked.rename(volumes / "Drive" / "Messages")
    library.chat = ChatDB.open(library.messages_db)
    library.text(JANE)

    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, timeout=10, what="the text, without the probe")
    library.text(JANE, at=ago(seconds=1))
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, timeout=5, what="the next text")


def test_a_second_run_is_refused_at_once(library: Library, daemon, daemon_env: CLI):
    first = daemon()

    second = daemon_env("run", timeout=30)

    assert second.code == 1
    assert "already running" in second.stderr and str(first.proc.pid) in second.stderr


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
@pytest.mark.parametrize("command", ["status", "retry-failed", "sync", "run"])
def test_a_lock_file_it_may_not_use_is_named_in_one_line_with_its_fix(
        library: Library, citadel, cli: CLI, home, command: str):
    """A `sudo crm-syncd sync` in the folder `crm-syncd install` made left the lock file root's (0600): every
    command says which file and what to do, exit 2, instead of a traceback (`status`) or the file's name
    alone (`sync`, `run`). The fix is doctor's: give it back (a root daemon may still hold it), not remove it."""
    assert cli("sync").code == 0
    lock = home / STATE_DIR / "crm-syncd.lock"
    os.chmod(lock, 0)

    result = cli.run_with_prefix(unprivileged(), command, timeout=60)
    doctor = cli.run_with_prefix(unprivileged(), "doctor").stdout.splitlines()

    assert result.code == 2 and "Traceback" not in result.output, result.output
    (line,) = result.stderr.strip().splitlines()
    assert f"the lock file {lock}" in line and f"sudo chown $USER '{lock}'*" in line, line
    doctors_fix = doctor[doctor.index(f"✗ state files: you may not read and write {lock}") + 1]
    assert doctors_fix.removeprefix("    fix: ") in line and "sudo rm" not in line, (doctors_fix, line)


def test_a_sync_meeting_the_daemon_is_told_to_stop_it_and_one_meeting_another_sync_to_wait_for_it(
        library: Library, citadel, daemon, daemon_env: CLI, home):
    library.card(first="Jane", last="Doe", phones=[JANE])
    d = daemon()
    during_run = daemon_env("sync")
    assert during_run.code == 1 and f"crm-syncd run is already running (pid {d.proc.pid})" in during_run.stderr
    assert "syncs continuously (stop it" in during_run.stderr
    assert d.stop() == 0

    library.text(JANE)
    citadel.latency_s = 4.0  # the first sync takes a while
    first = daemon_env.popen("sync")
    try:
        eventually(lambda: Lock(home / STATE_DIR / "crm-syncd.lock").held_by_other(), what="the sync's lock")
        second = daemon_env("sync")
    finally:
        first.wait(timeout=60)
        first.communicate()

    assert second.code == 1 and f"crm-syncd sync is already running (pid {first.pid})" in second.stderr
    assert "wait for it to finish" in second.stderr and "continuously" not in second.stderr, second.stderr


def test_status_json_reflects_running_stopped_pending_and_failed(library: Library, citadel, daemon, daemon_env: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    stopped = daemon_env("status", "--json")
    assert stopped.code == 3 and json.loads(stopped.stdout)["running"] is False

    citadel.reject_interactions_at = {ago(days=1).strftime("%Y-%m-%d")}
    library.text(JANE, at=ago(days=1))
    d = daemon()
    doc = status_when(daemon_env, lambda s: s["outbox"]["failed"] == 1, what="the failed item in status")
    assert doc["running"] is True and doc["pid"] == d.proc.pid
    assert doc["crm"]["reachable"] is True
    assert doc["sources"]["messages"]["lag_rows"] == 0 and doc["sources"]["messages"]["last_sync_at"]
    assert "occurredAt" in doc["outbox"]["failures"][0]["reason"]
    assert daemon_env("status", "--json").code == 1  # degraded: a failed item

    citadel.go_down()
    library.text(JANE)
    eventually(lambda: json.loads(daemon_env("status", "--json").stdout)["outbox"]["pending"] == 1,
               what="the queued item in status")
    d.stop()
    assert json.loads(daemon_env("status", "--json").stdout)["running"] is False


def test_status_during_a_one_shot_sync_says_no_daemon_runs_and_names_the_sync(
        library: Library, citadel, daemon, daemon_env: CLI, home):
    """`sync` takes the daemon's lock; a stopped daemon's last heartbeat must not make it look alive."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    daemon().stop()
    library.text(JANE)
    citadel.latency_s = 4.0  # the sync takes a while (and status finds the CRM slow: no matter)
    lock = home / STATE_DIR / "crm-syncd.lock"
    proc = daemon_env.popen("sync")
    try:
        eventually(lambda: Lock(lock).held_by_other(), what="the sync holding the lock")
        result = daemon_env("status", "--json")
        doc = json.loads(result.stdout)
        assert (result.code, doc["running"], doc["pid"], doc["health"]) == (3, False, None, "not running")
        assert doc["sync_pid"] == str(proc.pid)
        assert f"a one-shot sync is running (pid {proc.pid})" in daemon_env("status").stdout
    finally:
        proc.wait(timeout=60)
        proc.communicate()


def test_status_is_degraded_while_the_crm_refuses_a_persons_contact_and_names_them(
        library: Library, citadel, daemon, daemon_env: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    citadel.reject_contact_values = {"Doe"}  # a 422 about her name: nothing left out would make it pass
    daemon()

    doc = status_when(daemon_env, lambda s: s["running"] and s["sources"]["contacts"]["failed"],
                      what="the failed contact in status")

    assert doc["health"] == "degraded" and daemon_env("status", "--json").code == 1
    assert doc["sources"]["contacts"]["failed"] == [{"name": "Jane", "reason": "lastName: Invalid lastName"}]


def test_status_is_not_degraded_by_a_message_that_came_after_a_quiet_spell(
        library: Library, citadel, daemon, daemon_env: CLI, home):
    """The lag is how long rows have waited, not how long the mark has not moved."""
    daemon_env.env["CRM_SYNCD_DEBOUNCE_MS"] = "3000"  # the new row stays unread for 3 s
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    daemon()
    eventually(lambda: citadel.interactions_of(JANE), what="the first message")
    state = sqlite3.connect(home / STATE_DIR / "state.db", timeout=10)
    with state:  # ten quiet minutes since the marks last moved
        state.execute("UPDATE marks SET updated_ms = updated_ms - 600000")
    state.close()

    library.text(JANE)
    result = daemon_env("status", "--json")

    doc = json.loads(result.stdout)
    assert doc["sources"]["messages"]["lag_rows"] == 1 and doc["sources"]["messages"]["lag_seconds"] < 120
    assert result.code == 0, doc


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
def test_status_names_the_full_disk_access_fix_while_the_daemon_cannot_read_chat_db(
        library: Library, citadel, daemon, daemon_env: CLI):
    """The daemon's binary lacks Full Disk Access; the Terminal running `status` may well have it
    (as root: the daemon runs without the capabilities that read anything, `status` with them)."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    os.chmod(library.messages_db, 0)
    d = daemon(prefix=unprivileged())

    doc = status_when(daemon_env, lambda s: s["sources"]["messages"]["problem"], what="the daemon's refusal in status")
    assert doc["health"] == "degraded" and daemon_env("status", "--json").code == 1
    assert "Full Disk Access" in doc["sources"]["messages"]["problem"]
    assert "Privacy & Security" in doc["sources"]["messages"]["problem"]

    os.chmod(library.messages_db, 0o644)  # granted: the daemon's next attempt reads it
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the message")
    eventually(lambda: status(daemon_env)["health"] == "healthy", what="a healthy status")
    assert d.stop() == 0


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
def test_the_daemon_refused_a_look_into_the_messages_folder_names_full_disk_access_and_keeps_running(
        library: Library, citadel, daemon, daemon_env: CLI):
    """macOS may refuse the binary without Full Disk Access even a stat of chat.db: the daemon says so
    in `status`, as for a refused open, instead of failing at start-up and being restarted forever."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    folder = library.messages_db.parent
    os.chmod(folder, 0)
    try:
        d = daemon(prefix=unprivileged())
        doc = status_when(daemon_env, lambda s: s["sources"]["messages"]["problem"],
                          what="the daemon's refusal in status")
        assert "Full Disk Access" in doc["sources"]["messages"]["problem"] and doc["running"]
    finally:
        os.chmod(folder, 0o755)
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the message once granted")
    assert d.stop() == 0


def test_an_address_book_store_that_stays_corrupt_does_not_make_every_rescan_list_the_crm(
        library: Library, citadel, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    corrupt = library.books[2]
    corrupt.close()
    corrupt.path.write_bytes(b"not an address book " * 1000)
    d = daemon()  # rescans every 0.5 s (the tests' setting)
    eventually(lambda: citadel.contacts(), what="Jane's contact")
    listed = citadel.stats[("GET", "/api/contacts", 200)]
    start = len(d.events("contacts.rescan"))

    eventually(lambda: len(d.events("contacts.rescan")) >= start + 4, what="four more rescans")

    assert citadel.stats[("GET", "/api/contacts", 200)] == listed
    assert len(d.events("contacts.store_error")) == 1  # said once, not at every rescan
    assert d.stop() == 0


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
def test_status_names_an_address_book_the_daemon_cannot_read_while_delivery_waits_for_it(
        library: Library, citadel, daemon, daemon_env: CLI):
    """Without every card, placeholders would be made for people who have one: nothing is delivered,
    so status must not say healthy."""
    daemon_env.env["CRM_SYNCD_SAFETY_PROBE_S"] = "2"  # the contacts sync is tried again that often
    library.card(source=1, first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    store = library.books[1].path
    os.chmod(store, 0)
    d = daemon(prefix=unprivileged())

    doc = status_when(daemon_env, lambda s: s["sources"]["contacts"]["problem"], what="the daemon's refusal in status")
    assert doc["health"] == "degraded" and "Full Disk Access" in doc["sources"]["contacts"]["problem"]
    assert doc["outbox"]["pending"] == 1 and not citadel.contacts()

    os.chmod(store, 0o644)
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the message, to Jane's contact")
    eventually(lambda: status(daemon_env)["health"] == "healthy", what="a healthy status")
    assert [c["firstName"] for c in citadel.contacts()] == ["Jane"]
    assert d.stop() == 0


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
def test_status_is_degraded_when_it_cannot_read_a_source_itself(library: Library, citadel, daemon, daemon_env: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    d = daemon()
    eventually(lambda: status(daemon_env)["health"] == "healthy", what="a healthy daemon")

    os.chmod(library.calls_db, 0)  # nothing written: the daemon has no reason to look

    result = daemon_env.run_with_prefix(unprivileged(), "status", "--json")
    assert result.code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["health"] == "degraded" and "Full Disk Access" in doc["sources"]["calls"]["problem"]
    os.chmod(library.calls_db, 0o644)
    assert d.stop() == 0


def test_status_is_degraded_while_the_daemon_holds_its_lock_but_no_longer_beats(
        library: Library, citadel, daemon, daemon_env: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    d = daemon()
    eventually(lambda: status(daemon_env)["health"] == "healthy", what="a healthy daemon")

    d.proc.send_signal(signal.SIGSTOP)  # hung: it holds its lock and does nothing
    try:
        doc = status_when(daemon_env, lambda s: s["health"] != "healthy", timeout=30,
                          what="three missed heartbeats (15 s)")
        assert doc["running"] is True and doc["responding"] is False and doc["last_beat_age_s"] >= 15
        assert "not responding" in daemon_env("status").stdout
    finally:
        d.proc.send_signal(signal.SIGCONT)
    eventually(lambda: status(daemon_env)["health"] == "healthy", what="the heartbeat again")
    assert d.stop() == 0


def daemon_with_janes_contact(library: Library, daemon, daemon_env: CLI):
    """A daemon that has made Jane's contact from her card: it has reached the CRM."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    d = daemon()
    eventually(lambda: status(daemon_env)["crm"]["daemon_reachable"], what="the daemon's contacts in the CRM")
    return d


def test_status_is_degraded_while_the_crm_says_it_is_up_but_refuses_the_daemons_writes(
        library: Library, citadel, daemon, daemon_env: CLI):
    d = daemon_with_janes_contact(library, daemon, daemon_env)

    citadel.faults = Faults(rate=1.0, kinds=("503",))  # writes refused; /api/health still answers "ok"
    library.text(JANE)

    doc = status_when(daemon_env, lambda s: s["health"] != "healthy", what="the refused write in status")
    assert doc["crm"]["reachable"] is True and doc["crm"]["daemon_reachable"] is False
    assert doc["crm"]["daemon_failure"].startswith("503") and doc["outbox"]["pending"] == 1
    text = daemon_env("status")
    assert text.code == 1 and "the daemon's requests fail: 503" in text.stdout

    citadel.faults = Faults()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, timeout=30, what="the message, writes accepted again")
    eventually(lambda: status(daemon_env)["health"] == "healthy", what="a healthy status again")
    assert d.stop() == 0


def test_status_says_a_crm_refusing_the_api_key_is_reachable_names_where_the_key_is_set_and_the_daemons_failure(
        library: Library, citadel, daemon, daemon_env: CLI):
    """The owner rotated the key in Citadel: the CRM answers every request with 401. Not "unreachable"."""
    d = daemon_with_janes_contact(library, daemon, daemon_env)

    citadel.require_key("the-rotated-key")
    library.text(JANE)

    doc = status_when(daemon_env, lambda s: s["crm"]["daemon_failure"], what="the daemon's refused request in status")
    assert doc["health"] == "degraded" and doc["crm"]["reachable"] is True
    assert "refused crm-syncd's API key" in doc["crm"]["problem"], doc["crm"]
    text = daemon_env("status")
    (line,) = [line for line in text.stdout.splitlines() if line.startswith("CRM ")]
    assert "reachable, but it refused crm-syncd's API key" in line and "unreachable" not in line, text.stdout
    assert "fix: set api_key in ~/.config/crm-syncd/config.toml" in line, line
    assert "the daemon's requests fail: 401" in text.stdout and text.code == 1, text.stdout
    assert d.stop() == 0


def test_status_names_why_the_crm_is_unreachable_and_the_daemons_failure(
        library: Library, citadel, daemon, daemon_env: CLI):
    d = daemon_with_janes_contact(library, daemon, daemon_env)

    citadel.go_down()
    library.text(JANE)

    doc = status_when(daemon_env, lambda s: s["crm"]["daemon_failure"], what="the daemon's failed request in status")
    text = daemon_env("status")
    assert doc["crm"]["reachable"] is False and doc["crm"]["problem"].startswith("unreachable: cannot connect")
    assert "unreachable: cannot connect" in text.stdout and "fix: start Citadel" in text.stdout, text.stdout
    assert "the daemon's requests fail: cannot connect" in text.stdout, text.stdout
    citadel.come_up()
    assert d.stop() == 0


def test_status_is_healthy_again_once_a_write_answered_with_500_is_found_in_the_crm(
        library: Library, citadel, daemon, daemon_env: CLI):
    """The CRM wrote the message, answered 500, and failed the look-up that followed; the next look-up
    finds it. Nothing was left to deliver, and status stayed degraded (the heartbeat ping withheld)
    until some other interaction got through, maybe hours later."""
    daemon_env.env.update(CRM_SYNCD_REQUEST_TIMEOUT_S="2")  # the wait before looking up a write left unsure
    d = daemon_with_janes_contact(library, daemon, daemon_env)

    citadel.faults = Faults(rate=1.0, kinds=("500-after-write",), reads=True, limit=2,
                            routes=("/api/contacts/:id/interactions",))  # the write, then its look-up
    library.text(JANE)

    found = eventually(lambda: d.events("push.recovered"), timeout=30, what="the unsure write looked up again")[0]
    assert citadel.faults.fired == {"500-after-write": 2} and len(citadel.interactions_of(JANE)) == 1

    def beat_since_then() -> dict | None:
        doc = status(daemon_env)
        return doc if doc["last_beat_at"] and datetime.fromisoformat(doc["last_beat_at"]) > since else None

    since = datetime.fromisoformat(found["timestamp"])
    doc = eventually(beat_since_then, what="a heartbeat after the look-up")
    assert (doc["health"], doc["crm"]["daemon_failure"]) == ("healthy", None)
    assert d.stop() == 0


def test_the_crm_down_for_a_while_queues_everything_and_delivers_it_when_it_returns(
        library: Library, citadel, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    citadel.go_down()
    d = daemon()
    for hours in (3, 2, 1):
        library.text(JANE, at=ago(hours=hours))
    eventually(lambda: any(e.get("source") == "messages" for e in d.events("extract.batch")), what="extraction")

    citadel.come_up()

    eventually(lambda: len(citadel.interactions_of(JANE)) == 3, timeout=60, what="delivery after the outage")
    assert d.stop() == 0


def test_status_shows_the_last_error_with_its_age_while_degraded_and_not_once_healthy_again(
        library: Library, citadel, daemon, daemon_env: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    citadel.go_down()
    d = daemon()
    eventually(lambda: status(daemon_env)["last_error"], what="the CRM outage in status")
    degraded = daemon_env("status")
    assert degraded.code == 1 and "s ago: " in degraded.stdout.split("last error ", 1)[1], degraded.stdout

    citadel.come_up()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, timeout=60, what="the message delivered")
    eventually(lambda: status(daemon_env)["health"] == "healthy", what="a healthy status")
    healthy = daemon_env("status")

    assert healthy.code == 0 and "last error" not in healthy.stdout, healthy.stdout
    assert d.stop() == 0


def test_a_contacts_sync_retried_from_two_sides_at_once_creates_each_contact_once(
        library: Library, citadel, daemon):
    """After a failed first sync both the pusher and the rescan timer retry it; run together,
    each would find every person missing from the CRM and create them."""
    phones = [f"+1613555{n:04d}" for n in range(200, 212)]
    for n, phone in enumerate(phones):
        library.card(first=f"Slow{n}", last="Sync", phones=[phone])
    library.text(phones[-1], at=ago(hours=1))
    citadel.faults = Faults(rate=1.0, reads=True, limit=1)  # the first request (the contacts listing): 503
    citadel.latency_s = 0.2  # a sync now takes seconds, so two retries would overlap

    d = daemon()
    eventually(lambda: len(citadel.interactions_of(phones[-1])) == 1, timeout=60, what="the message")
    assert d.stop() == 0

    assert d.events("contacts.deferred"), "the first sync was meant to fail"
    assert sorted(c["phone"] for c in citadel.contacts()) == phones


def test_a_message_sent_from_the_mac_arrives_once_sent_and_a_failed_send_never(library: Library, citadel, daemon):
    """Messages commits an outgoing row before sending it (is_sent = 0), then updates it."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    d = daemon()
    sent = library.text(JANE, from_me=True, is_sent=0)
    failed = library.text(JANE, from_me=True, is_sent=0)
    library.text(JANE)
    eventually(lambda: citadel.interactions_of(JANE), what="the reply, read past both sends under way")

    library.chat.finish_sending(sent)
    library.chat.finish_sending(failed, error=4)
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, what="the message once sent")
    assert d.stop() == 0

    assert Counter(i["type"] for i in citadel.interactions_of(JANE)) == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}


def test_a_send_that_settles_without_any_write_is_read_at_the_next_probe(
        library: Library, citadel, daemon, daemon_env: CLI):
    """Messages may leave a row unsent (offline) and never touch chat.db again: 15 minutes after its
    date the row is taken as it is, and no file event will say so."""
    daemon_env.env["CRM_SYNCD_SAFETY_PROBE_S"] = "1"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, from_me=True, is_sent=0, at=ago(minutes=14, seconds=50))  # settles in 10 s
    library.text(JANE)
    daemon()
    eventually(lambda: citadel.interactions_of(JANE), what="the reply, read past the send under way")
    assert len(citadel.interactions_of(JANE)) == 1

    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, what="the send, read once it settled")

    assert Counter(i["type"] for i in citadel.interactions_of(JANE)) == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}


def test_a_crm_that_says_wait_at_start_up_is_not_asked_again_before_then(library: Library, citadel, daemon):
    """The first contacts sync is rate-limited (429, Retry-After: 1 s); the pusher used to retry it at once."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    citadel.faults = Faults(rate=1.0, kinds=("429",), reads=True, limit=1)
    citadel.timeline = []

    d = daemon()
    eventually(lambda: citadel.contacts(), what="Jane's contact")
    assert d.stop() == 0

    listings = [(at, status) for at, method, route, status in citadel.timeline
                if (method, route) == ("GET", "/api/contacts")]
    (refused_at, refusal), (retried_at, _) = listings[:2]
    assert refusal == 429
    assert retried_at - refused_at >= 1.0


def test_a_message_from_a_card_added_that_moment_gets_that_contact_not_a_placeholder_too(
        library: Library, citadel, daemon):
    """The rescan's sync would create the card's contact while resolution, not finding it yet,
    created a placeholder for the same number: they take turns instead."""
    d = daemon()
    citadel.latency_s = 1.0  # both would have looked the number up before either created a contact

    library.card(source=1, first="Just", last="Added", phones=[JANE])
    library.text(JANE)

    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, timeout=60, what="the message")
    eventually(lambda: [c for c in citadel.contacts() if c["lastName"] == "Added"], timeout=60, what="the card's contact")
    assert d.stop() == 0
    assert [(c["firstName"], c["lastName"]) for c in citadel.contacts() if c["phone"] == JANE] == [("Just", "Added")]


def test_reading_an_address_book_apple_had_closed_is_no_change_for_the_rescan(library: Library, citadel, cli: CLI):
    """With no -wal beside a store, the read itself creates an empty one (as any WAL reader does);
    counting that as a change made every daemon sync all contacts again at its first rescan."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    for book in library.books:
        book.close()  # Apple is done with it: no -wal
    assert not (library.addressbook_dir / "AddressBook-v22.abcddb-wal").exists()

    assert cli("sync", "--contacts-only").code == 0

    assert (library.addressbook_dir / "AddressBook-v22.abcddb-wal").exists()
    settings = Settings(addressbook_dir=library.addressbook_dir, state_dir=library.home / STATE_DIR)
    assert not Engine(settings, Store(settings.state_db), None).contacts_changed()  # type: ignore[arg-type]


def test_reading_a_chat_db_messages_had_closed_is_no_change_for_its_probe(library: Library):
    """The same empty -wal beside chat.db cost the daemon an extraction that found nothing."""
    library.text(JANE)
    library.chat.close()  # Messages is done with it: no -wal
    wal = library.messages_db.with_name("chat.db-wal")
    probe = Probe(library.messages_db)
    assert probe.changed() and not wal.exists()  # the first look

    MessagesReader(library.messages_db).read()

    assert wal.exists() and wal.stat().st_size == 0
    assert not probe.changed()
    library.chat = ChatDB.open(library.messages_db)
    library.text(JANE)  # Messages writes again
    assert probe.changed()


@asynccontextmanager
async def watching(databases: dict[str, Path], hinted: list[str]) -> AsyncIterator[Watcher]:
    """A started Watcher that appends its hints to `hinted`, stopped afterwards."""
    watcher = Watcher(databases, lambda source, written: hinted.append(source), asyncio.get_running_loop())
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


def test_a_folder_missing_two_levels_deep_is_watched_once_it_appears(tmp_path):
    """Looked out for from its nearest existing ancestor, one level at a time (FSEvents and inotify
    alike report only what appears directly in a directory watched non-recursively)."""
    hinted: list[str] = []
    a, b = tmp_path / "a", tmp_path / "a" / "b"

    async def scenario() -> None:
        async with watching({"calls": b / "calls.db"}, hinted) as watcher:
            watched = lambda: {e.watch.path for e in watcher.observer.emitters}  # noqa: E731
            assert watched() == {str(tmp_path)} and watcher.watched == []
            a.mkdir()
            await until(lambda: str(a) in watched(), "the lookout moving down to a/")
            b.mkdir()
            await until(lambda: hinted == ["calls"], "the hint that the folder appeared")
            assert str(b) in watched() and watcher.watched == [b]
            (b / "calls.db").write_bytes(b"rows")
            await until(lambda: len(hinted) > 1, "a hint from the new folder's watch")

    asyncio.run(scenario())


async def heard_again(watcher: Watcher, folder: Path, hinted: list[str]) -> None:
    """`folder` is watched once more, and a write in it is heard."""
    await until(lambda: watcher.watched == [folder], "the folder watched again")
    hinted.clear()
    (folder / "chat.db").write_bytes(b"rows")
    await until(lambda: "messages" in hinted, "a hint from the folder's watch")


def deleted_as_watched(watcher: Watcher, folder: Path) -> list[str]:
    """Delete `folder` just before watchdog's next attempt to watch it, once, as it may vanish between the
    look that found it and the watch: the race is forced, the failure is inotify's own. The attempts so met."""
    schedule, met = watcher.observer.schedule, []

    def folder_gone_first(handler, path, **kwargs):
        if path == str(folder) and not met:
            met.append(path)
            folder.rmdir()
        return schedule(handler, path, **kwargs)

    watcher.observer.schedule = folder_gone_first
    return met


def test_a_watched_folder_deleted_and_made_again_is_watched_again_at_once(tmp_path):
    """A watch follows its folder, not its path: inotify's ends when the folder is deleted (FSEvents'
    stream stops when its root goes), so a folder made again in its place was never heard of."""
    hinted: list[str] = []
    folder = tmp_path / "Messages"
    folder.mkdir()

    async def scenario() -> None:
        async with watching({"messages": folder / "chat.db"}, hinted) as watcher:
            shutil.rmtree(folder)
            await until(lambda: watcher.watched == [], "the lost watch noticed")
            folder.mkdir()
            await heard_again(watcher, folder, hinted)

    asyncio.run(scenario())


def test_a_folder_deleted_again_as_its_watch_is_set_up_is_watched_once_it_is_back(tmp_path):
    """inotify cannot watch a folder gone between the look that found it and the watch (nor one past its
    limit on watches): the folder was then dropped, neither watched nor looked out for, until a restart."""
    hinted: list[str] = []
    folder = tmp_path / "Messages"

    async def scenario() -> None:
        async with watching({"messages": folder / "chat.db"}, hinted) as watcher:
            met = deleted_as_watched(watcher, folder)
            folder.mkdir()
            await until(lambda: met, "the folder's watch tried")
            assert watcher.watched == []
            folder.mkdir()
            await heard_again(watcher, folder, hinted)

    asyncio.run(scenario())


def test_a_folder_deleted_as_its_watch_is_made_anew_is_watched_once_it_is_back(tmp_path):
    """The safety probe renews a watch that missed a write; a folder gone as that happens was left
    neither watched nor looked out for."""
    hinted: list[str] = []
    folder = tmp_path / "Messages"
    folder.mkdir()

    async def scenario() -> None:
        async with watching({"messages": folder / "chat.db"}, hinted) as watcher:
            deleted_as_watched(watcher, folder)
            watcher.renew(folder / "chat.db")
            assert watcher.watched == [] and not folder.exists()
            folder.mkdir()
            await heard_again(watcher, folder, hinted)

    asyncio.run(scenario())


def test_a_watched_folder_moved_away_and_replaced_is_watched_again_at_the_next_refresh(tmp_path):
    """A moved folder takes its inotify watch along and nothing reports it: the safety probe's refresh
    compares the folder at the path with the one watched."""
    hinted: list[str] = []
    folder = tmp_path / "Messages"
    folder.mkdir()

    async def scenario() -> None:
        async with watching({"messages": folder / "chat.db"}, hinted) as watcher:
            folder.rename(tmp_path / "Messages.old")
            folder.mkdir()
            hinted.clear()
            watcher.refresh()
            assert hinted == ["messages"] and watcher.watched == [folder]
            (folder / "chat.db").write_bytes(b"rows")
            await until(lambda: len(hinted) > 1, "a hint from the new folder")

    asyncio.run(scenario())


def test_messages_arrive_promptly_after_the_messages_folder_is_deleted_and_made_again(
        library: Library, citadel, daemon):
    """Signing out of Messages and in again, or restoring ~/Library/Messages from a backup."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    d = daemon()  # its safety probe: every 30 s
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")

    library.chat.close()
    shutil.rmtree(library.messages_db.parent)
    library.messages_db.parent.mkdir()
    library.chat = ChatDB.create(library.messages_db)
    library.text(JANE, at=ago(minutes=5))

    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, timeout=10, what="the message in the new chat.db")
    library.text(JANE)
    eventually(lambda: len(citadel.interactions_of(JANE)) == 3, timeout=10, what="the next one")
    assert d.stop() == 0


def test_a_daemon_that_loses_a_task_to_an_error_exits_1_saying_why_instead_of_idling_on(
        library: Library, citadel, daemon, home):
    """Its state database locked for longer than the store waits (10 s): the heartbeat's write fails.
    That task used to die alone, leaving a daemon that looked alive and did nothing; launchd
    restarts a daemon that exits 1."""
    d = daemon()
    blocker = sqlite3.connect(home / STATE_DIR / "state.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        failed = eventually(lambda: d.events("daemon.failed"), timeout=60, what="the daemon to give up")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert d.proc.wait(timeout=60) == 1
    assert "database is locked" in failed[0]["error"]
    assert d.events("daemon.stopped")[0]["code"] == 1


def replace_with_a_copy(path: Path) -> None:
    """Put a consistent copy of a SQLite file in its place (a backup restored over it)."""
    copy = path.with_name(path.name + ".restored")
    source, target = sqlite3.connect(path), sqlite3.connect(copy)
    source.backup(target)
    source.close()
    target.close()
    os.replace(copy, path)


STATE_LOSSES = {
    "the state folder removed": lambda state: shutil.rmtree(state),
    "state.db replaced": lambda state: replace_with_a_copy(state / "state.db"),
    "the lock file removed": lambda state: (state / "crm-syncd.lock").unlink(),
}


@pytest.mark.parametrize("loss", list(STATE_LOSSES))
def test_state_files_removed_or_replaced_under_a_running_daemon_stop_it_and_a_restart_duplicates_nothing(
        library: Library, citadel, daemon, daemon_env: CLI, home: Path, loss: str):
    """A cleaner app deletes ~/Library/Application Support/crm-syncd, or a backup is restored over
    state.db, while the daemon runs. It used to write on into a file no one could see, with no lock
    a `sync` would meet. It notices at its next heartbeat, says which file and what happened, and exits
    1 like on any unexpected failure; launchd's restart rebuilds what was lost without duplicates."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")
    state = home / STATE_DIR
    assert (state / "crm-syncd.lock").exists()

    STATE_LOSSES[loss](state)

    eventually(lambda: d.proc.poll() is not None, timeout=20, what="the daemon to notice and stop")
    assert d.proc.returncode == 1 and "Traceback" not in d.proc.communicate()[1]
    (lost,) = [e for e in d.events() if e.get("level") == "error"]
    assert lost["event"] == "daemon.state_lost" and str(state) in lost["error"], lost
    assert ("replaced" if "replaced" in loss else "removed") in lost["error"], lost
    library.text(JANE, at=ago(hours=2))
    again = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, timeout=40, what="the message after the loss")
    assert again.stop() == 0
    got = Counter(r["occurredAt"] for r in citadel.interactions_of(JANE))
    assert sum(got.values()) == 2 and max(got.values()) == 1, got


def test_a_backup_restored_over_state_db_under_the_daemon_and_the_restart_send_nothing_twice(
        library: Library, citadel, daemon, home: Path, tmp_path: Path):
    """The backup is of this morning; Jane texted since, and that text reached the CRM."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")
    state = home / STATE_DIR / "state.db"
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    library.text(JANE, at=ago(minutes=2))
    eventually(lambda: len(citadel.interactions_of(JANE)) == 2, what="the second message")

    for extra in ("-wal", "-shm"):
        Path(f"{state}{extra}").unlink(missing_ok=True)
    os.replace(shutil.copyfile(backup, state.with_name("state.db.restored")), state)  # as one file, at once
    eventually(lambda: d.proc.poll() is not None, timeout=20, what="the daemon to notice and stop")
    again = daemon()

    eventually(lambda: again.events("state.restored"), what="the restored state recognised")
    eventually(lambda: any(e.get("adopted") for e in again.events("push.done")), what="the text found in the CRM")
    assert again.stop() == 0
    got = Counter(r["occurredAt"] for r in citadel.interactions_of(JANE))
    assert sum(got.values()) == 2 and max(got.values()) == 1, got


def test_a_daemon_that_cannot_read_chat_db_yet_on_a_restored_state_still_looks_up_what_it_lacks(
        library: Library, citadel, cli: CLI, daemon, home: Path, tmp_path: Path):
    """Its first start after the restore cannot read chat.db (Full Disk Access being granted again):
    its first delivery pass, on the calls alone, is not the end of the look-ups."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=2))
    assert cli("sync").code == 0
    state = home / STATE_DIR / "state.db"
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    library.text(JANE, at=ago(hours=5))
    library.text(JANE, from_me=True, at=ago(hours=4))
    assert cli("sync").code == 0
    restore(backup, state)
    os.chmod(library.messages_db, 0)

    d = daemon(prefix=unprivileged())
    eventually(lambda: d.events("state.restored") and d.events("extract.denied"), what="the start")
    os.chmod(library.messages_db, 0o644)

    def delivered_after_the_texts_were_read() -> bool:
        names = [e.get("event") for e in d.events()]
        read = [i for i, e in enumerate(d.events()) if e.get("event") == "extract.done" and e.get("source") == "messages"]
        return bool(read) and any(n in ("push.done", "push.caught_up") for n in names[read[0]:])
    eventually(delivered_after_the_texts_were_read, timeout=60, what="a delivery pass once chat.db is read")

    assert d.stop() == 0
    got = Counter(i["occurredAt"] for i in citadel.interactions_of(JANE))
    assert sum(got.values()) == 3 and max(got.values()) == 1, got


def test_an_idle_daemon_holds_no_read_transaction_so_apple_can_truncate_its_wal(library: Library, citadel, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the message")

    busy, log_frames, checkpointed = library.chat.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    assert busy == 0 and log_frames == checkpointed
    assert library.messages_db.with_name("chat.db-wal").stat().st_size == 0
    assert d.proc.poll() is None
    d.stop()


@pytest.mark.parametrize("found", [False, True], ids=["made-for-her-card", "the-owners-found-for-her-card"])
def test_a_crm_restored_under_the_running_daemon_never_gets_a_persons_text_filed_under_another(
        library: Library, citadel, daemon, found: bool):
    """The owner restores Citadel from a backup older than Jane's contact (or installs it afresh) while the
    daemon runs, then types in Bob, who gets her old id: that of the contact crm-syncd made for her card,
    or of the one the owner had typed for her, which her card found. Her next text reaches a contact of
    hers, not Bob's."""
    backup = citadel.backup()
    if found:
        citadel.add_contact(firstName="Jane", lastName="Doe", phone="(613) 555-0111")
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    d = daemon()
    eventually(lambda: len(citadel.interactions()) == 1, what="her first text")
    (jane_before,) = [c["id"] for c in citadel.contacts()]
    citadel.restore(backup)
    assert citadel.add_contact(firstName="Bob", lastName="Smith", phone="+19025550122") == jane_before

    library.text(JANE, at=ago(minutes=1))

    eventually(lambda: any(c["firstName"] == "Jane" and citadel.interactions(c["id"]) for c in citadel.contacts()),
               what="her second text on a contact of hers")
    assert d.stop() == 0
    assert citadel.interactions(jane_before) == []
