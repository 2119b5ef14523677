"""CallHistory.storedata -> Activities: what the reader must make of each kind of call row."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from crm_syncd.identity import Normalizer
from crm_syncd.sources import Activity, sqlite
from crm_syncd.sources.calls import CALL_INBOUND, CALL_MISSED, CALL_OUTBOUND, CallsReader
from tests.harness.callhistory import CallHistoryDB

AT = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
AT_MS = int(AT.timestamp() * 1000)
ALICE, BOB, CAROL = "+15550100101", "+15550100102", "carol@example.com"
VERSIONS = ("big-sur", "sequoia")


@pytest.fixture(params=VERSIONS)
def store(request, tmp_path: Path):
    db = CallHistoryDB.create(tmp_path / "CallHistory.storedata", version=request.param)
    yield db
    db.close()


def only(store: CallHistoryDB, **call) -> Activity:
    """Write one call, read past it, and return the single Activity it produced."""
    call.setdefault("at", AT)
    pk = store.call(call.pop("address", ALICE), **call)
    store.commit()
    batch = CallsReader(store.path).read(after_rowid=pk - 1)
    assert len(batch.activities) == 1, batch
    return batch.activities[0]


# -- direction and outcome (reference 2.3) ---------------------------------------------------------

def test_incoming_answered_call_is_inbound_with_its_duration(store):
    act = only(store, originated=False, answered=True, duration=61.4)
    assert (act.type, act.duration_s) == (CALL_INBOUND, 61)


def test_incoming_unanswered_call_is_missed_without_duration(store):
    act = only(store, originated=False, answered=False, duration=0.0)
    assert (act.type, act.duration_s) == (CALL_MISSED, None)


def test_incoming_declined_call_is_missed(store):
    act = only(store, originated=False, answered=False, disconnected_cause=6)
    assert act.type == CALL_MISSED


@pytest.mark.parametrize("reason", [1, 2])
def test_a_call_the_phone_screened_out_is_missed_and_marked_screened(store, reason):
    pk = store.call(ALICE, AT, unique_id="BLOCKED", filtered_out_reason=reason)
    store.call(BOB, AT, unique_id="RANG")
    store.commit()
    batch = CallsReader(store.path).read(after_rowid=pk - 1)
    assert [(a.key, a.type) for a in batch.activities] == [("call:BLOCKED", CALL_MISSED), ("call:RANG", CALL_MISSED)]
    assert batch.screened == [("call:BLOCKED", AT_MS)]


@pytest.mark.parametrize("reason", [0, None, "text"])
def test_a_call_with_no_filter_reason_is_not_screened(store, reason):
    store.call(ALICE, AT, filtered_out_reason=reason)
    store.commit()
    assert CallsReader(store.path).read().screened == []


def test_an_outgoing_call_is_never_screened(store):
    store.call(ALICE, AT, originated=True, filtered_out_reason=1)
    store.commit()
    assert CallsReader(store.path).read().screened == []


def test_a_screened_group_call_screens_every_party(store):
    store.call(None, AT, unique_id="G", handles=[ALICE, BOB], filtered_out_reason=1)
    store.commit()
    assert sorted(CallsReader(store.path).read().screened) == [(f"call:G:{ALICE}", AT_MS), (f"call:G:{BOB}", AT_MS)]


@pytest.mark.parametrize("answered", [False, True])
def test_outgoing_call_that_lasted_is_outbound_and_connected_whatever_zanswered_says(store, answered):
    act = only(store, originated=True, answered=answered, duration=125.0)
    assert (act.type, act.duration_s) == (CALL_OUTBOUND, 125)


@pytest.mark.parametrize("answered", [False, True])
def test_outgoing_call_that_never_connected_is_outbound_not_missed(store, answered):
    act = only(store, originated=True, answered=answered, duration=0.0)
    assert (act.type, act.duration_s) == (CALL_OUTBOUND, None)


def test_answered_call_of_zero_seconds_has_no_duration_because_the_crm_rejects_zero(store):
    assert only(store, answered=True, duration=0.0).duration_s is None
    assert only(store, answered=True, duration=0.2).duration_s is None


@pytest.mark.parametrize("duration", [-5.0, float("nan"), 8 * 86_400.0])
def test_negative_nan_or_absurd_durations_are_dropped_but_the_call_is_kept(store, duration):
    act = only(store, originated=True, duration=duration)
    assert (act.type, act.duration_s) == (CALL_OUTBOUND, None)


@pytest.mark.parametrize("call_type, provider", [
    (16, "com.apple.FaceTime"),  # FaceTime audio
    (8, "com.apple.FaceTime"),  # FaceTime video
    (0, "net.whatsapp.WhatsApp"),  # CallKit app
    (42, "com.example.future"),  # a medium we have never seen
])
def test_every_call_medium_is_included(store, call_type, provider):
    act = only(store, address=CAROL, call_type=call_type, service_provider=provider, answered=True, duration=30)
    assert (act.address, act.type, act.duration_s) == (CAROL, CALL_INBOUND, 30)


# -- time -----------------------------------------------------------------------------------------

def test_zdate_is_seconds_since_2001_turned_into_unix_milliseconds(store):
    assert only(store, at=AT + timedelta(milliseconds=250)).occurred_ms == AT_MS + 250


def test_calls_without_a_usable_date_are_skipped_and_counted(store):
    store.call(ALICE, None)
    store.call(ALICE, -3600.0)  # before 2001
    store.call(ALICE, datetime.now(timezone.utc) + timedelta(days=90))  # no clock is that far behind
    ahead = store.call(ALICE, datetime.now(timezone.utc) + timedelta(days=2))  # this Mac's clock is behind
    store.call(ALICE, datetime.now(timezone.utc) + timedelta(hours=1))  # clock skew is tolerated
    store.commit()
    batch = CallsReader(store.path).read()
    assert batch.skipped == {"no-date": 1, "bad-date": 2, "ahead-of-clock": 1}
    assert len(batch.activities) == 1 and (batch.rows, batch.last_rowid) == (5, 5)
    assert batch.unsettled == ahead  # read again later: the mark waits before it


def test_calls_before_the_window_are_counted_and_the_mark_still_moves_past_them(store):
    since_ms = AT_MS - 60_000
    store.call(ALICE, AT)
    for _ in range(3):
        store.call(BOB, AT - timedelta(days=30))
    store.commit()
    batch = CallsReader(store.path).read(since_ms=since_ms)
    assert [a.address for a in batch.activities] == [ALICE]
    assert batch.skipped == {"before-window": 3}
    assert (batch.rows, batch.last_rowid) == (4, 4)


def test_a_full_windowed_page_only_counts_old_calls_it_passed(store):
    for day in (40, 0, 40, 0, 40):
        store.call(ALICE, AT - timedelta(days=day))
    store.commit()
    batch = CallsReader(store.path).read(limit=2, since_ms=AT_MS - 1000)
    assert (len(batch.activities), batch.last_rowid, batch.rows) == (2, 4, 4)
    assert batch.skipped == {"before-window": 2}
    rest = CallsReader(store.path).read(after_rowid=batch.last_rowid, limit=2, since_ms=AT_MS - 1000)
    assert (rest.activities, rest.last_rowid, rest.rows, rest.skipped) == ([], 5, 1, {"before-window": 1})



def test_calls_above_window_until_are_read_whatever_their_date(store):
    for day in (40, 0, 40, 40):
        store.call(ALICE, AT - timedelta(days=day))
    store.commit()
    batch = CallsReader(store.path).read(since_ms=AT_MS - 1000, window_until=3)
    assert (len(batch.activities), batch.last_rowid, batch.rows) == (2, 4, 4)
    assert batch.skipped == {"before-window": 2}


# -- addresses (reference 2.4) --------------------------------------------------------------------

def test_address_may_be_stored_as_bytes_or_as_text(store):
    store.call(ALICE.encode(), AT)
    store.call(CAROL, AT)
    store.commit()
    assert [a.address for a in CallsReader(store.path).read().activities] == [ALICE, CAROL]


@pytest.mark.parametrize("typed, person", [
    ("+1\u00a0415\u00a0555\u00a00100", ("phone", "+14155550100")),  # no-break spaces
    ("\u202a+1 (415) 555-0100\u202c", ("phone", "+14155550100")),  # a left-to-right embedding around it
    ("\u2068Carol@Example.com\u2069", ("email", "carol@example.com")),  # an isolate around it
])
def test_an_address_stored_as_bytes_with_no_break_spaces_or_direction_marks_is_read_not_taken_for_encrypted(
        store, typed, person):
    """A number copied from a right-to-left page keeps such marks; as text or as bytes, it is the same person."""
    store.call(typed, AT, unique_id="TEXT")
    store.call(typed.encode(), AT, unique_id="BYTES")
    store.commit()
    batch = CallsReader(store.path).read()
    assert batch.skipped == {}
    assert {a.key: Normalizer("US")(a.address) for a in batch.activities} == {"call:TEXT": person, "call:BYTES": person}


def test_bytes_that_decode_to_control_or_private_use_characters_are_still_an_encrypted_address(store):
    store.call("\x1b\x07\ue000+14155550100".encode(), AT)
    store.commit()
    assert CallsReader(store.path).read().skipped == {"encrypted-address": 1}


def test_a_call_keeps_the_country_its_number_is_from_and_none_when_the_store_has_none(store):
    assert only(store, address="07700 900123", iso_country="gb").country == "GB"
    assert only(store, address="+16135550111", iso_country=None).country is None


def test_encrypted_address_from_macos_12_and_older_is_skipped_and_counted(store):
    store.call(os.urandom(16) + os.urandom(16) + b"\xff\xfe" + os.urandom(14), AT)  # tag ‖ nonce ‖ ciphertext
    store.commit()
    batch = CallsReader(store.path).read()
    assert (batch.activities, batch.skipped, batch.rows) == ([], {"encrypted-address": 1}, 1)


def test_encrypted_address_falls_back_to_readable_participant_handles(store):
    store.call(b"\xff" * 48, AT, unique_id="U1", handles=[BOB])
    store.commit()
    assert [(a.key, a.address) for a in CallsReader(store.path).read().activities] == [("call:U1", BOB)]


@pytest.mark.parametrize("address", [None, "", b""])
def test_call_without_address_or_participants_is_skipped_as_no_address(store, address):
    store.call(address, AT)
    store.commit()
    batch = CallsReader(store.path).read()
    assert (batch.activities, batch.skipped) == ([], {"no-address": 1})


def test_group_call_without_address_yields_one_activity_per_participant(store):
    store.call(None, AT, unique_id="GROUP", handles=[ALICE, CAROL, BOB], originated=True, duration=600)
    store.commit()
    batch = CallsReader(store.path).read()
    assert {(a.key, a.address, a.type, a.duration_s) for a in batch.activities} == {
        (f"call:GROUP:{who}", who, CALL_OUTBOUND, 600) for who in (ALICE, CAROL, BOB)}
    assert batch.fanned_out == [("call:GROUP", batch.activities[0].occurred_ms)]


def test_call_without_address_but_one_participant_keeps_the_plain_key(store):
    store.call(None, AT, unique_id="SOLO", handles=[CAROL])
    store.commit()
    assert [(a.key, a.address) for a in CallsReader(store.path).read().activities] == [("call:SOLO", CAROL)]


def test_participant_handles_are_loaded_with_one_query_per_read(store):
    for i in range(20):
        store.call(None, AT, handles=[f"+1555010{i:04d}", CAROL])
    store.call(ALICE, AT)
    store.commit()
    statements: list[str] = []
    batch = CallsReader(store.path, trace=statements.append).read()
    assert len(batch.activities) == 41
    assert sum("JOIN ZHANDLE" in s for s in statements) == 1


def test_a_call_with_an_address_and_its_own_handle_stays_one_activity(store):
    store.call(ALICE, AT, unique_id="SOLO", handles=[ALICE])
    store.commit()
    assert [(a.key, a.address) for a in CallsReader(store.path).read().activities] == [("call:SOLO", ALICE)]


def test_group_call_that_names_one_party_in_its_address_yields_one_activity_per_participant(store):
    store.call(ALICE, AT, unique_id="GROUP", handles=[ALICE, CAROL, BOB], answered=True, duration=60)
    store.call(BOB, AT, unique_id="GROUP2", handles=[CAROL, ALICE])  # the address is not among the handles
    store.commit()
    batch = CallsReader(store.path).read()
    assert sorted((a.key, a.address) for a in batch.activities) == sorted(
        [(f"call:GROUP:{who}", who) for who in (ALICE, CAROL, BOB)]
        + [(f"call:GROUP2:{who}", who) for who in (BOB, CAROL, ALICE)])
    assert [key for key, _ in batch.fanned_out] == ["call:GROUP", "call:GROUP2"]


# -- keys and marks -------------------------------------------------------------------------------

def test_key_is_the_call_unique_id_or_the_row_when_it_has_none(store):
    store.call(ALICE, AT, unique_id="5B3C1E2A-0000-4000-8000-000000000001")
    pk = store.call(BOB, AT)
    store.conn.execute("UPDATE ZCALLRECORD SET ZUNIQUE_ID = NULL WHERE Z_PK = ?", (pk,))
    store.commit()
    keys = [a.key for a in CallsReader(store.path).read().activities]
    assert keys == ["call:5B3C1E2A-0000-4000-8000-000000000001", f"call:pk:{pk}"]


def test_activities_never_name_a_person(store):
    assert only(store).person is None


def test_reading_in_pages_resumes_after_the_last_row_examined_even_if_it_was_skipped(store):
    store.call(ALICE, AT)
    store.call(None, AT)  # skipped, but still examined
    store.call(BOB, AT)
    store.commit()
    reader = CallsReader(store.path)
    first = reader.read(limit=2)
    assert ([a.address for a in first.activities], first.last_rowid, first.rows) == ([ALICE], 2, 2)
    second = reader.read(after_rowid=first.last_rowid, limit=2)
    assert ([a.address for a in second.activities], second.last_rowid, second.rows) == ([BOB], 3, 1)
    third = reader.read(after_rowid=second.last_rowid)
    assert (third.activities, third.last_rowid, third.rows) == ([], 3, 0)
    assert reader.newest_rowid() == 3


def test_empty_store_has_newest_rowid_zero(store):
    store.commit()
    assert CallsReader(store.path).newest_rowid() == 0


# -- the store as Apple keeps it ------------------------------------------------------------------

def test_each_layout_names_its_join_columns_after_its_own_entity_numbers(store):
    handle_column = {"big-sur": "Z_3REMOTEPARTICIPANTHANDLES", "sequoia": "Z_4REMOTEPARTICIPANTHANDLES"}
    assert store.join_handles == handle_column[store.version]


def test_store_without_service_provider_column_is_read(store):
    store.call(ALICE, AT, answered=True, duration=5)
    store.commit()
    store.conn.execute("ALTER TABLE ZCALLRECORD DROP COLUMN ZSERVICE_PROVIDER")
    store.commit()
    assert [a.address for a in CallsReader(store.path).read().activities] == [ALICE]


def test_committed_calls_still_only_in_the_wal_are_seen_and_uncommitted_ones_are_not(store):
    store.call(ALICE, AT)
    store.commit()
    store.call(BOB, AT)  # not committed yet
    wal = Path(f"{store.path}-wal")
    assert wal.stat().st_size > 0
    assert [a.address for a in CallsReader(store.path).read().activities] == [ALICE]
    store.commit()
    assert [a.address for a in CallsReader(store.path).read().activities] == [ALICE, BOB]


def test_reading_changes_neither_the_database_nor_its_wal(store):
    store.call(ALICE, AT, handles=[ALICE])
    store.call(None, AT, handles=[BOB, CAROL])
    store.commit()
    files = [store.path, Path(f"{store.path}-wal")]
    before = [f.read_bytes() for f in files]
    reader = CallsReader(store.path)
    reader.read()
    reader.read(since_ms=AT_MS)
    reader.newest_rowid()
    assert [f.read_bytes() for f in files] == before


def test_reopened_store_is_read_after_a_checkpoint(store, tmp_path):
    store.call(ALICE, AT)
    store.checkpoint()
    store.close()
    again = CallHistoryDB.open(store.path)
    again.call(BOB, AT)
    again.commit()
    assert [a.address for a in CallsReader(store.path).read().activities] == [ALICE, BOB]
    store.conn = again.conn  # the fixture closes it


def test_missing_store_says_so(tmp_path):
    with pytest.raises(sqlite.SourceMissing):
        CallsReader(tmp_path / "CallHistory.storedata").read()
