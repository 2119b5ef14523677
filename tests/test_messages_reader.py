"""The chat.db reader, against fixtures built from every macOS version's real DDL."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest

from crm_syncd.sources import Activity, sqlite
from crm_syncd.sources.messages import MessagesReader
from tests.harness.chatdb import VERSIONS, ChatDB

AT = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
AT_MS = 1_714_566_615_123  # AT in Unix ms, truncated
SECONDS_VERSIONS = ("el-capitan",)
HAS_REACTIONS = [v for v in VERSIONS if v != "el-capitan"]  # associated_message_type came in 10.12
HAS_PERSON = VERSIONS[VERSIONS.index("catalina"):]  # handle.person_centric_id came in 10.15


@pytest.fixture(params=VERSIONS)
def db(request, tmp_path: Path):
    chat_db = ChatDB.create(tmp_path / "chat.db", version=request.param)
    yield chat_db
    chat_db.close()


def read(db: ChatDB, group_messages: str = "each-participant", **kwargs):
    return MessagesReader(db.path, group_messages=group_messages).read(**kwargs)  # type: ignore[arg-type]


def at_ms(db: ChatDB, at: datetime = AT) -> int:
    """What occurred_ms must be for `at` in this version's date unit."""
    exact = at.replace(microsecond=0) if db.unit == "s" else at
    return int(exact.timestamp()) * 1000 + exact.microsecond // 1000


def only(activities: list[Activity]) -> Activity:
    assert len(activities) == 1, activities
    return activities[0]


# -- one-to-one and group conversations ------------------------------------------------------

def test_fixtures_without_apples_table_definitions_name_the_folder_and_the_variable(tmp_path, monkeypatch):
    """`make demo` in a clone with no ../shared next to it."""
    monkeypatch.setenv("FIXTURES_SHARED_DIR", str(tmp_path / "nowhere"))

    with pytest.raises(FileNotFoundError) as caught:
        ChatDB.create(tmp_path / "chat.db", version="sequoia")

    assert str(tmp_path / "nowhere" / "reference" / "ddl") in str(caught.value)
    assert "FIXTURES_SHARED_DIR" in str(caught.value)


def test_one_to_one_incoming_and_outgoing_become_text_activities_of_the_counterpart(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    incoming = db.message(chat, ann, at=AT, guid="IN-1")
    outgoing = db.message(chat, ann, from_me=True, at=AT + timedelta(minutes=1), guid="OUT-1")

    batch = read(db)

    assert batch.activities == [
        Activity("msg:IN-1", "+15551230001", "TEXT_INBOUND", at_ms(db), None, None),
        Activity("msg:OUT-1", "+15551230001", "TEXT_OUTBOUND", at_ms(db) + 60_000, None, None),
    ]
    assert (batch.last_rowid, batch.rows, sum(batch.skipped.values())) == (outgoing, 2, 0)
    assert incoming < outgoing


def test_group_incoming_message_is_attributed_to_its_sender(db):
    ann, bob = db.handle("+15551230001"), db.handle("bob@example.com")
    group = db.chat([ann, bob], group=True, display_name="Climbing")
    db.message(group, bob, at=AT, guid="G-IN")

    assert only(read(db).activities) == Activity("msg:G-IN", "bob@example.com", "TEXT_INBOUND", at_ms(db), None, None)


def test_group_outgoing_message_fans_out_to_each_distinct_participant(db):
    ann, bob = db.handle("+15551230001"), db.handle("bob@example.com")
    ann_sms = db.handle("+15551230001", service="SMS")  # same address, second handle row
    group = db.chat([ann, bob, ann_sms], group=True)
    db.message(group, 0, from_me=True, at=AT, guid="G-OUT")

    batch = read(db)

    assert sorted(batch.activities) == [
        Activity("msg:G-OUT:+15551230001", "+15551230001", "TEXT_OUTBOUND", at_ms(db), None, None),
        Activity("msg:G-OUT:bob@example.com", "bob@example.com", "TEXT_OUTBOUND", at_ms(db), None, None),
    ]
    assert batch.rows == 1
    assert batch.fanned_out == [("msg:G-OUT", at_ms(db))]  # what their keys share, and when


def test_group_outgoing_message_is_skipped_when_group_messages_is_skip(db):
    ann, bob = db.handle("+15551230001"), db.handle("bob@example.com")
    group = db.chat([ann, bob], group=True)
    db.message(group, 0, from_me=True, at=AT)
    db.message(group, ann, at=AT, guid="G-IN")

    batch = read(db, group_messages="skip")

    assert [a.key for a in batch.activities] == ["msg:G-IN"]
    assert batch.skipped == {"group-outgoing": 1}


def test_chat_with_unknown_style_is_a_group_when_it_has_several_participants(db):
    ann, bob = db.handle("+15551230001"), db.handle("+15551230002")
    chat = db.chat([ann, bob], group=True)
    db.conn.execute("UPDATE chat SET style = NULL WHERE ROWID = ?", (chat,))
    db.message(chat, 0, from_me=True, at=AT, guid="X")

    assert sorted(a.key for a in read(db).activities) == ["msg:X:+15551230001", "msg:X:+15551230002"]


def membership_event(db: ChatDB, group: int, other: int, *, added: bool, at: datetime,
                     date_unit: Literal["s", "ns"] | None = None) -> int:
    """A "You added/removed …" row in `group` (item_type 1); chat_handle_join already holds the change."""
    rowid = db.message(group, 0, from_me=True, at=at, item_type=1, text=None, date_unit=date_unit)
    db.conn.execute("UPDATE message SET group_action_type = ?, other_handle = ? WHERE ROWID = ?",
                    (0 if added else 1, other, rowid))
    return rowid


def recipients(batch) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in batch.activities:
        guid = a.key.split(":")[1]
        out.setdefault(guid, []).append(a.address)
    return {guid: sorted(addresses) for guid, addresses in out.items()}


def test_a_membership_event_and_a_group_text_as_close_as_two_clocks_go_in_the_order_they_were_written(db):
    """Cat is added at AT, on a device whose clock is ahead of the Mac's or behind it: a text written
    before the event did not reach her, one written after did, within a minute either way of its date.
    Further apart, the dates decide: a text dated two minutes before the event, written after it (late
    from iCloud), did not reach her."""
    ann, cat = db.handle("+15551230001"), db.handle("+15551230003")
    group = db.chat([ann, cat], group=True)  # today's members
    db.message(group, 0, from_me=True, at=AT + timedelta(seconds=5), guid="BEFORE")
    membership_event(db, group, cat, added=True, at=AT)
    db.message(group, 0, from_me=True, at=AT - timedelta(seconds=5), guid="AFTER")
    db.message(group, 0, from_me=True, at=AT - timedelta(minutes=2), guid="LATE")

    assert recipients(read(db)) == {"BEFORE": ["+15551230001"], "AFTER": ["+15551230001", "+15551230003"],
                                    "LATE": ["+15551230001"]}


def test_a_membership_event_without_a_date_keeps_its_place_in_the_order_rows_were_written(db):
    """chat.db's 0 (or NULL) is "not set", not 2001: Cat, added by such a row, got only the texts after it."""
    ann, cat = db.handle("+15551230001"), db.handle("+15551230003")
    group = db.chat([ann, cat], group=True)
    db.message(group, 0, from_me=True, at=AT - timedelta(days=2), guid="BEFORE")
    event = membership_event(db, group, cat, added=True, at=AT - timedelta(days=1))
    db.conn.execute("UPDATE message SET date = 0 WHERE ROWID = ?", (event,))
    db.message(group, 0, from_me=True, at=AT, guid="AFTER")

    assert recipients(read(db)) == {"BEFORE": ["+15551230001"], "AFTER": ["+15551230001", "+15551230003"]}


def test_membership_events_written_out_of_date_order_are_undone_newest_date_first(db):
    """A 12:00 text to Ann and Cat; on the iPhone Cat is removed and Dan added at 13:00, Cat added back
    and Dan removed at 14:00; iCloud writes the 14:00 rows before the 13:00 ones. The text reached Ann
    and Cat, not Dan."""
    ann, cat, dan = db.handle("+15551230001"), db.handle("+15551230003"), db.handle("+15551230004")
    group = db.chat([ann, cat], group=True)  # today's members
    db.message(group, 0, from_me=True, at=AT, guid="NOON")
    membership_event(db, group, cat, added=True, at=AT + timedelta(hours=2))
    membership_event(db, group, dan, added=False, at=AT + timedelta(hours=2))
    membership_event(db, group, cat, added=False, at=AT + timedelta(hours=1))
    membership_event(db, group, dan, added=True, at=AT + timedelta(hours=1))

    assert recipients(read(db)) == {"NOON": ["+15551230001", "+15551230003"]}


def test_a_membership_event_and_a_group_text_in_different_date_units_are_ordered_by_their_dates(db):
    """An event dated in nanoseconds and texts dated in seconds (a database holding both units)."""
    ann, bob = db.handle("+15551230001"), db.handle("+15551230002")
    group = db.chat([ann], group=True)  # Bob was removed at AT
    membership_event(db, group, bob, added=False, at=AT, date_unit="ns")
    db.message(group, 0, from_me=True, at=AT - timedelta(minutes=2), date_unit="s", guid="BEFORE")
    db.message(group, 0, from_me=True, at=AT + timedelta(minutes=2), date_unit="s", guid="AFTER")

    assert recipients(read(db)) == {"BEFORE": ["+15551230001", "+15551230002"], "AFTER": ["+15551230001"]}


def test_group_without_participants_gives_no_counterpart(db):
    group = db.chat([], group=True)
    db.message(group, 0, from_me=True, at=AT)

    batch = read(db)
    assert (batch.activities, batch.skipped) == ([], {"no-counterpart": 1})


# -- rows that are not conversation messages -------------------------------------------------

@pytest.mark.parametrize("kind", [1000, 2000, 2005, 2006, 3001])
def test_tapbacks_and_stickers_are_skipped_as_reactions(tmp_path, kind):
    for version in HAS_REACTIONS:
        with ChatDB.create(tmp_path / f"{version}.db", version) as db:
            ann = db.handle("+15551230001")
            chat = db.chat([ann])
            db.message(chat, ann, at=AT, associated_type=kind)
            db.message(chat, ann, at=AT, associated_type=2, guid="APP")  # app payloads are messages

            batch = read(db)
            assert [a.key for a in batch.activities] == ["msg:APP"], version
            assert batch.skipped == {"reaction": 1}, version


@pytest.mark.parametrize("kind", [1, 4, 999])
def test_associated_types_outside_the_known_ones_are_not_messages(tmp_path, kind):
    with ChatDB.create(tmp_path / "chat.db") as db:
        ann = db.handle("+15551230001")
        chat = db.chat([ann])
        db.message(chat, ann, at=AT, associated_type=kind)
        db.message(chat, ann, at=AT, associated_type=3, guid="APP")  # app payloads are messages

        batch = read(db)
        assert [a.key for a in batch.activities] == ["msg:APP"]
        assert batch.skipped == {"not-a-message": 1}


def test_a_message_in_recently_deleted_when_read_is_skipped_as_deleted(tmp_path):
    for version in VERSIONS[VERSIONS.index("ventura"):]:
        with ChatDB.create(tmp_path / f"{version}.db", version) as db:
            ann = db.handle("+15551230001")
            chat = db.chat([ann])
            gone = db.message(chat, ann, at=AT, guid="GONE")
            db.message(chat, ann, at=AT, guid="KEPT")
            db.message(None, ann, at=AT, guid="ORPHAN")  # in no chat at all: still a message
            db.move_to_recently_deleted(gone)

            batch = read(db)
            assert [a.key for a in batch.activities] == ["msg:KEPT", "msg:ORPHAN"], version
            assert batch.skipped == {"deleted": 1}, version


@pytest.mark.parametrize("item_type", [1, 2, 3, 4, 6])
def test_group_events_and_other_item_types_are_skipped(db, item_type):
    ann = db.handle("+15551230001")
    group = db.chat([ann], group=True)
    db.message(group, ann, at=AT, item_type=item_type)

    batch = read(db)
    assert (batch.activities, batch.skipped, batch.rows) == ([], {"not-a-message": 1}, 1)


def test_failed_sends_and_system_messages_are_skipped(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    db.message(chat, ann, from_me=True, at=AT, error=4)
    db.message(chat, ann, at=AT, is_system=1)
    db.message(chat, ann, at=AT, error=4, guid="IN-ERR")  # an error on an incoming row is not a failed send
    db.message(chat, ann, from_me=True, at=AT, is_sent=0, guid="UNSENT")  # unsent for days: taken as it is

    batch = read(db)
    assert [a.key for a in batch.activities] == ["msg:IN-ERR", "msg:UNSENT"]
    assert batch.skipped == {"failed-send": 1, "system": 1}
    assert batch.unsettled is None


def test_an_outgoing_message_still_being_sent_is_left_for_a_later_read(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    db.message(chat, ann, at=datetime.now(UTC), guid="BEFORE")
    sending = db.message(chat, ann, from_me=True, at=datetime.now(UTC), is_sent=0, guid="SENDING")
    db.message(chat, ann, at=datetime.now(UTC), guid="AFTER")

    batch = read(db)
    assert [a.key for a in batch.activities] == ["msg:BEFORE", "msg:AFTER"]
    assert (batch.skipped, batch.unsettled) == ({"not-sent-yet": 1}, sending)

    db.finish_sending(sending)
    assert [a.key for a in read(db, after_rowid=sending - 1).activities] == ["msg:SENDING", "msg:AFTER"]


def test_missing_and_impossible_dates_are_skipped(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    db.message(chat, ann, at=None)
    db.message(chat, ann, at=0)
    db.message(chat, ann, at=-5)  # before 2001
    db.message(chat, ann, at=datetime.now(UTC) + timedelta(days=90))  # no clock is that far behind
    ahead = db.message(chat, ann, at=datetime.now(UTC) + timedelta(days=3))  # this Mac's clock is behind
    db.message(chat, ann, at=datetime.now(UTC) + timedelta(hours=20), guid="SOON")  # clock skew is fine

    batch = read(db)
    assert [a.key for a in batch.activities] == ["msg:SOON"]
    assert batch.skipped == {"no-date": 2, "bad-date": 2, "ahead-of-clock": 1}
    assert batch.unsettled == ahead  # read again later: the mark waits before it


# -- dates ------------------------------------------------------------------------------------

def test_dates_convert_exactly_from_the_versions_unit(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    db.message(chat, ann, at=AT)
    raw = db.conn.execute("SELECT date FROM message").fetchone()[0]

    occurred = only(read(db).activities).occurred_ms

    if db.version in SECONDS_VERSIONS:
        assert raw == 736_259_415 and occurred == AT_MS - 123
    else:
        assert raw == 736_259_415_123_456_000 and occurred == AT_MS


def test_a_database_holding_both_date_units_converts_each_row(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    db.message(chat, ann, at=AT, date_unit="s", guid="S")
    db.message(chat, ann, at=AT, date_unit="ns", guid="NS")

    assert [(a.key, a.occurred_ms) for a in read(db).activities] == [("msg:S", AT_MS - 123), ("msg:NS", AT_MS)]


def test_since_ms_drops_earlier_messages_of_either_unit_and_still_advances(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    db.message(chat, ann, at=AT - timedelta(days=2), date_unit="s")
    db.message(chat, ann, at=AT - timedelta(days=2), date_unit="ns")
    db.message(chat, ann, at=AT, date_unit="s", guid="S")
    db.message(chat, ann, at=AT, date_unit="ns", guid="NS")
    db.message(chat, ann, at=None)
    last = db.message(chat, ann, at=AT - timedelta(days=3))

    batch = read(db, since_ms=AT_MS - 123)

    assert [a.key for a in batch.activities] == ["msg:S", "msg:NS"]
    assert batch.skipped == {"before-window": 3, "no-date": 1}
    assert (batch.last_rowid, batch.rows) == (last, 6)


def test_since_ms_with_every_row_before_the_window_still_moves_the_mark_to_the_newest_row(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    rowids = [db.message(chat, ann, at=AT - timedelta(days=30)) for _ in range(5)]

    batch = read(db, after_rowid=rowids[0], limit=3, since_ms=AT_MS)

    assert (batch.activities, batch.skipped, batch.last_rowid, batch.rows) == ([], {"before-window": 4}, rowids[-1], 4)



def test_since_ms_up_to_window_until_drops_only_earlier_messages_at_or_below_it(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    db.message(chat, ann, at=AT - timedelta(days=30))
    db.message(chat, ann, at=AT, guid="NEW")
    until = db.message(chat, ann, at=AT - timedelta(days=30))
    db.message(chat, ann, at=AT - timedelta(days=30), guid="LATE-S", date_unit="s")  # arrived after that read
    last = db.message(chat, ann, at=AT - timedelta(days=30), guid="LATE-NS")

    batch = read(db, since_ms=AT_MS - 123, window_until=until)

    assert [a.key for a in batch.activities] == ["msg:NEW", "msg:LATE-S", "msg:LATE-NS"]
    assert batch.skipped == {"before-window": 2}
    assert (batch.last_rowid, batch.rows) == (last, 5)


# -- counterparts -----------------------------------------------------------------------------

def test_email_handles_are_reported_exactly_as_stored(db):
    eve = db.handle("Eve.Example@Example.COM")
    chat = db.chat([eve])
    db.message(chat, eve, at=AT)

    assert only(read(db).activities).address == "Eve.Example@Example.COM"


def test_one_to_one_rows_without_handle_fall_back_to_the_chats_participant(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    db.message(chat, 0, at=AT, guid="IN")
    db.message(chat, 0, from_me=True, at=AT, guid="OUT")

    assert [(a.key, a.address, a.type) for a in read(db).activities] == [
        ("msg:IN", "+15551230001", "TEXT_INBOUND"), ("msg:OUT", "+15551230001", "TEXT_OUTBOUND")]


def test_outgoing_one_to_one_row_carrying_the_recipients_handle_is_outbound_to_them(db):
    ann, bob = db.handle("+15551230001"), db.handle("+15551230002")
    chat = db.chat([ann])
    db.message(chat, bob, from_me=True, at=AT)  # handle_id wins over the chat's participant

    activity = only(read(db).activities)
    assert (activity.address, activity.type) == ("+15551230002", "TEXT_OUTBOUND")


def test_orphan_messages_use_their_handle_or_have_no_counterpart(db):
    ann = db.handle("+15551230001")
    db.message(None, ann, at=AT, guid="ORPHAN")
    db.message(None, 0, from_me=True, at=AT)
    db.message(None, 999, at=AT)  # a handle row that no longer exists

    batch = read(db)
    assert [(a.key, a.address) for a in batch.activities] == [("msg:ORPHAN", "+15551230001")]
    assert batch.skipped == {"no-counterpart": 2}


def test_imessage_and_sms_handles_of_one_number_each_report_the_same_address(db):
    imessage = db.handle("+15551230001", person_centric_id="P-ANN")
    sms = db.handle("+15551230001", service="SMS", person_centric_id="P-ANN")
    assert imessage != sms and db.handle("+15551230001") == imessage  # UNIQUE(id, service)
    db.message(db.chat([imessage]), imessage, at=AT, guid="I")
    db.message(db.chat([sms], service="SMS"), sms, at=AT, service="SMS", guid="S")

    assert [(a.key, a.address) for a in read(db).activities] == [("msg:I", "+15551230001"),
                                                                  ("msg:S", "+15551230001")]


def test_person_centric_id_is_passed_through_where_the_version_has_it(db):
    ann = db.handle("+15551230001", person_centric_id="P-ANN")
    bob = db.handle("+15551230002")
    db.message(db.chat([ann]), ann, at=AT)
    group = db.chat([ann, bob], group=True)
    db.message(group, 0, from_me=True, at=AT)

    persons = [a.person for a in read(db).activities]
    assert persons == (["P-ANN", "P-ANN", None] if db.version in HAS_PERSON else [None, None, None])


def test_a_message_in_several_chats_belongs_to_the_lowest_chat(db):
    ann, bob = db.handle("+15551230001"), db.handle("+15551230002")
    direct = db.chat([ann])
    group = db.chat([ann, bob], group=True)
    rowid = db.message(group, 0, from_me=True, at=AT, guid="TWO")
    db.conn.execute("INSERT INTO chat_message_join (chat_id, message_id) VALUES (?, ?)", (direct, rowid))
    db.message(direct, ann, at=AT, guid="NEXT")

    for limit in (1, 2, 5):  # however LIMIT cuts, the message is read whole, once
        reader, mark, activities = MessagesReader(db.path), 0, []
        while mark < db.conn.execute("SELECT MAX(ROWID) FROM message").fetchone()[0]:
            batch = reader.read(after_rowid=mark, limit=limit)
            mark, activities = batch.last_rowid, activities + batch.activities
        assert [(a.key, a.type) for a in activities] == [("msg:TWO", "TEXT_OUTBOUND"),
                                                         ("msg:NEXT", "TEXT_INBOUND")], limit


def test_reader_works_without_apples_join_indexes(tmp_path):
    with ChatDB.create(tmp_path / "chat.db", indexes=False) as db:
        ann = db.handle("+15551230001")
        db.message(db.chat([ann]), 0, at=AT, guid="IN")
        assert only(read(db).activities).address == "+15551230001"


# -- batches and marks ------------------------------------------------------------------------

def test_batches_examine_at_most_limit_rows_and_report_the_last_rowid_even_when_skipped(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    rowids = [db.message(chat, ann, at=AT, item_type=1 if i % 3 == 2 else 0, guid=f"M{i}") for i in range(7)]
    reader = MessagesReader(db.path)

    first = reader.read(limit=3)
    second = reader.read(after_rowid=first.last_rowid, limit=3)
    third = reader.read(after_rowid=second.last_rowid, limit=3)
    done = reader.read(after_rowid=third.last_rowid, limit=3)

    assert [(b.rows, b.last_rowid, len(b.activities)) for b in (first, second, third, done)] == [
        (3, rowids[2], 2), (3, rowids[5], 2), (1, rowids[6], 1), (0, rowids[6], 0)]
    assert first.skipped == second.skipped == {"not-a-message": 1}


def test_deleted_rows_leave_gaps_that_batches_step_over(db):
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    rowids = [db.message(chat, ann, at=AT) for _ in range(4)]
    db.delete_message(rowids[1])
    db.delete_message(rowids[3])

    batch = read(db, limit=10)
    assert (batch.rows, batch.last_rowid, len(batch.activities)) == (2, rowids[2], 2)


def test_a_session_keeps_its_maps_yet_sees_chats_added_between_reads_and_holds_no_read_open(db):
    ann = db.handle("+15551230001")
    first = db.message(db.chat([ann]), ann, at=AT, guid="M1")
    with MessagesReader(db.path).session() as reader:
        assert only(reader.read().activities).address == "+15551230001"
        bob, cat = db.handle("+15551230002"), db.handle("+15551230003")
        db.message(db.chat([bob, cat], group=True), 0, from_me=True, at=AT, guid="G1")
        db.commit()
        busy, _, _ = db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0  # Apple can empty its -wal between the session's reads
        batch = reader.read(after_rowid=first)
    assert sorted(a.key for a in batch.activities) == ["msg:G1:+15551230002", "msg:G1:+15551230003"]
    assert batch.anchor == "G1"


def test_newest_rowid_is_zero_when_empty_then_the_highest_message(db):
    reader = MessagesReader(db.path)
    assert reader.newest_rowid() == 0
    ann = db.handle("+15551230001")
    chat = db.chat([ann])
    last = [db.message(chat, ann, at=AT) for _ in range(3)][-1]
    assert reader.newest_rowid() == last


# -- files, WAL and access --------------------------------------------------------------------

def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rows_still_only_in_the_wal_are_read_and_nothing_beside_the_db_changes(db):
    ann = db.handle("+15551230001")
    db.message(db.chat([ann]), ann, at=AT)
    wal = Path(f"{db.path}-wal")
    assert wal.stat().st_size > 0 and b"+15551230001" not in db.path.read_bytes()  # the row lives in the -wal
    before = (sorted(os.listdir(db.path.parent)), digest(db.path), digest(wal))

    reader = MessagesReader(db.path)
    assert len(reader.read().activities) == 1 and reader.newest_rowid() == 1

    assert (sorted(os.listdir(db.path.parent)), digest(db.path), digest(wal)) == before


def test_a_path_with_space_hash_and_question_mark_is_opened_read_only(tmp_path):
    folder = tmp_path / "Application Support #1 ?x=y"
    folder.mkdir()
    with ChatDB.create(folder / "chat.db?mode=rw#frag") as db:
        ann = db.handle("+15551230001")
        db.message(db.chat([ann]), ann, at=AT)
        before = sorted(p.name for p in tmp_path.rglob("*"))

        assert len(read(db).activities) == 1
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no truncated-path database appeared
        with sqlite.read(db.path) as conn, pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM message")


def test_the_reader_never_selects_message_bodies(db):
    ann, bob = db.handle("+15551230001"), db.handle("+15551230002")
    db.message(db.chat([ann]), ann, at=AT, text="secret body")
    db.message(db.chat([ann, bob], group=True), 0, from_me=True, at=AT, text="secret group body")
    statements: list[str] = []
    reader = MessagesReader(db.path, trace=statements.append)

    batch = reader.read(since_ms=0)
    reader.newest_rowid()

    assert len(batch.activities) == 3 and any("FROM message m" in s for s in statements)
    body = re.compile(r"\b(text|attributedBody|payload_data|message_summary_info)\b|select\s+\*|\.\*", re.IGNORECASE)
    assert [s for s in statements if body.search(s)] == []
    assert "secret" not in repr(batch)


def test_a_missing_database_raises_source_missing_and_creates_nothing(tmp_path):
    with pytest.raises(sqlite.SourceMissing):
        MessagesReader(tmp_path / "chat.db").read()
    with pytest.raises(sqlite.SourceMissing):
        MessagesReader(tmp_path / "chat.db").newest_rowid()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses file permissions")
def test_an_unreadable_database_needs_full_disk_access(tmp_path):
    with ChatDB.create(tmp_path / "chat.db") as db:
        db.message(None, db.handle("+15551230001"), at=AT)
    (tmp_path / "chat.db").chmod(0)
    try:
        with pytest.raises(sqlite.NeedsFullDiskAccess):
            MessagesReader(tmp_path / "chat.db").read()
    finally:
        (tmp_path / "chat.db").chmod(0o644)


def test_a_database_briefly_locked_by_its_writer_is_read_once_the_lock_is_gone(tmp_path):
    with ChatDB.create(tmp_path / "chat.db") as db:
        db.message(db.chat([ann := db.handle("+15551230001")]), ann, at=AT)
    locked, release = threading.Event(), 0.3

    def writer() -> None:
        conn = sqlite3.connect(tmp_path / "chat.db", isolation_level=None)
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("INSERT INTO _SqliteDatabaseProperties VALUES ('lock-test', '1')")
        locked.set()
        time.sleep(release)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert locked.wait(5)
        probe = sqlite3.connect(sqlite.readonly_uri(tmp_path / "chat.db"), uri=True, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):  # the lock really blocks readers
            probe.execute("SELECT COUNT(*) FROM message").fetchone()
        probe.close()
        started = time.monotonic()

        batch = MessagesReader(tmp_path / "chat.db").read()

        assert len(batch.activities) == 1
        assert time.monotonic() - started > release / 2
    finally:
        thread.join()
