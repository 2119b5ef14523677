"""`crm-syncd sync` end to end: Apple's stores in a temp HOME → the CLI → the stand-in CRM over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest

from crm_syncd.engine import Engine
from crm_syncd.identity import placeholder_fields
from crm_syncd.settings import Settings
from crm_syncd.store import Store
from tests.conftest import CLI, clean_env
from tests.harness.callhistory import CallHistoryDB
from tests.harness.citadel import CitadelServer, Faults, self_signed_tls
from tests.harness.library import Library, ago
from tests.harness.processes import REPO, unprivileged
from tests.harness.statedb import a_backup_of, restore, state_db_at

JANE = "+16135550111"
BOB = "+19025550122"
CAROL = "+14165550133"


def names(citadel) -> dict[str, dict]:
    return {f"{c['firstName']} {c['lastName']}": c for c in citadel.contacts()}


def kinds(citadel, name: str) -> Counter:
    contact = names(citadel)[name]
    return Counter(i["type"] for i in citadel.interactions(contact["id"]))


def test_contacts_messages_and_calls_arrive_once_each(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[("+1 (613) 555-0111", "Mobile")], emails=["Jane@Example.com"])
    library.text(JANE, at=ago(days=3))
    library.text(JANE, from_me=True, at=ago(days=2))
    library.call(JANE, originated=True, duration=65.4, at=ago(days=1))

    result = cli("sync")

    assert result.code == 0, result.output
    jane = names(citadel)["Jane Doe"]
    assert (jane["phone"], jane["email"]) == (JANE, "jane@example.com")
    rows = citadel.interactions(jane["id"])
    assert Counter(r["type"] for r in rows) == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1, "CALL_OUTBOUND": 1}
    assert {r["source"] for r in rows} == {"IMPORT_IOS"}
    assert [r["durationSeconds"] for r in rows if r["type"] == "CALL_OUTBOUND"] == [65]
    assert all(r["content"] in (None, "") for r in rows)


def test_a_second_run_and_a_full_resync_create_nothing(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=3))
    library.text("+15145550999", at=ago(days=2))
    library.call(JANE, answered=True, duration=30, at=ago(days=1))
    assert cli("sync").code == 0
    before = (len(citadel.contacts()), len(citadel.interactions()))

    again, full = cli("sync"), cli("sync", "--full")

    assert again.code == 0 and full.code == 0, full.output
    assert (len(citadel.contacts()), len(citadel.interactions())) == before == (2, 3)


def test_group_chats_count_for_the_sender_inbound_and_for_every_participant_outbound(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.group_text([JANE, BOB], sender=JANE)
    library.group_text([JANE, BOB])  # from me: handle_id 0

    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"TEXT_OUTBOUND": 1}


def test_a_group_text_listing_one_person_by_phone_and_email_reaches_them_once(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE], emails=["jane@example.com"])
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.group_text([JANE, "jane@example.com", BOB], at=ago(days=1))

    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_OUTBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"TEXT_OUTBOUND": 1}


def test_a_group_facetime_listing_one_person_by_phone_and_email_reaches_them_once(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE], emails=["jane@example.com"])
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.call(None, answered=True, duration=61, call_type=8, service_provider="com.apple.FaceTime",
                 handles=[JANE, "jane@example.com", BOB], at=ago(days=1))

    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"CALL_INBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"CALL_INBOUND": 1}


def test_a_group_text_listing_a_stranger_by_two_handles_messages_ties_reaches_their_one_placeholder_once(
        library: Library, citadel, cli: CLI):
    library.card(first="Bob", last="Roe", phones=[BOB])
    for address in (JANE, "jane@example.com"):
        library.chat.handle(address, person_centric_id="PCID-JANE")
    library.group_text([JANE, "jane@example.com", BOB], at=ago(days=1))

    assert cli("sync").code == 0
    (stranger,) = [c for c in citadel.contacts() if c["firstName"] != "Bob"]
    assert Counter(i["type"] for i in citadel.interactions(stranger["id"])) == {"TEXT_OUTBOUND": 1}


def test_two_texts_one_person_sent_in_one_second_from_two_addresses_are_two_on_a_seconds_dated_chat_db(
        home, citadel):
    lib = Library.create(home, chat_version="el-capitan")  # dates to the second
    try:
        lib.card(first="Jane", last="Doe", phones=[JANE], emails=["jane@example.com"])
        at = ago(days=1).replace(microsecond=0)
        lib.text(JANE, service="SMS", at=at)
        lib.text("jane@example.com", at=at)
        lib.group_text([JANE, BOB], at=at)  # and the owner's group text in that second: a third
        result = CLI(clean_env(home, CRM_SYNCD_API_URL=citadel.url))("sync")
    finally:
        lib.close()

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2, "TEXT_OUTBOUND": 1}


def test_a_group_text_that_reached_a_persons_number_and_email_placeholders_is_one_once_a_card_joins_them(
        library: Library, citadel, cli: CLI):
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.group_text([JANE, "jane@example.com", BOB], at=ago(days=1))
    assert cli("sync").code == 0
    assert len(citadel.contacts()) == 3 and len(citadel.interactions()) == 3

    library.card(first="Jane", last="Doe", phones=[JANE], emails=["jane@example.com"])
    result = cli("sync")

    assert result.code == 0, result.output
    assert sorted(names(citadel)) == ["Bob Roe", "Jane Doe"]
    assert kinds(citadel, "Jane Doe") == {"TEXT_OUTBOUND": 1}


def test_an_old_outgoing_one_to_one_row_without_a_handle_goes_to_the_chats_party(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=2))
    chat = library._chats[(JANE, "iMessage")]
    library.chat.message(chat=chat, handle=0, from_me=True, at=ago(days=1))

    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}


def test_a_one_to_one_any_chat_with_imessage_and_sms_handles_and_a_seconds_dated_row_is_one_persons(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    im, sms = library.chat.handle(JANE), library.chat.handle(JANE, service="SMS")
    chat = library.chat.chat([im], guid=f"any;-;{JANE}")
    library.chat.conn.execute("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?, ?)", (chat, sms))
    library.chat.commit()
    library.chat.message(chat=chat, handle=0, from_me=True, at=ago(days=2))
    library.chat.message(chat=chat, handle=sms, at=ago(days=1).replace(microsecond=0), date_unit="s", service="SMS")

    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_OUTBOUND": 1, "TEXT_INBOUND": 1}


def group_event(library: Library, chat: int, *, item_type: int, action: int, handle: int, other: int, at) -> None:
    """A group's membership event (item_type 1: `other` added (0) or removed (1); 3 with action 0:
    `handle` left), as Messages writes it beside the change to chat_handle_join."""
    rowid = library.chat.message(chat=chat, handle=handle, from_me=handle == 0, at=at, item_type=item_type, text=None)
    library.chat.conn.execute("UPDATE message SET group_action_type = ?, other_handle = ? WHERE ROWID = ?",
                              (action, other, rowid))
    library.chat.commit()


def test_an_old_group_message_goes_to_the_members_it_was_sent_to_not_todays(library: Library, citadel, cli: CLI):
    """A first sync reads a group message of three days ago. Since then the owner added Carol and
    removed Bob, and Dan left: Bob and Dan got it, Carol did not."""
    dan = "+16135550199"
    for first, last, phone in (("Jane", "Doe", JANE), ("Bob", "Roe", BOB), ("Carol", "Poe", CAROL), ("Dan", "Fox", dan)):
        library.card(first=first, last=last, phones=[phone])
    library.group_text([JANE, BOB, dan], at=ago(days=3))
    chat = library._chats[tuple(sorted([JANE, BOB, dan]))]
    bob, carol, dan_handle = (library.chat.handle(a) for a in (BOB, CAROL, dan))
    conn = library.chat.conn
    conn.execute("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?, ?)", (chat, carol))
    group_event(library, chat, item_type=1, action=0, handle=0, other=carol, at=ago(days=2))
    conn.execute("DELETE FROM chat_handle_join WHERE chat_id = ? AND handle_id IN (?, ?)", (chat, bob, dan_handle))
    group_event(library, chat, item_type=1, action=1, handle=0, other=bob, at=ago(days=1))
    group_event(library, chat, item_type=3, action=0, handle=dan_handle, other=0, at=ago(days=1))
    library.chat.message(chat=chat, from_me=True, at=ago(hours=1))  # today's members get today's message
    library.chat.commit()

    result = cli("sync")

    assert result.code == 0, result.output
    assert {name: kinds(citadel, name) for name in ("Jane Doe", "Bob Roe", "Carol Poe", "Dan Fox")} == {
        "Jane Doe": {"TEXT_OUTBOUND": 2}, "Bob Roe": {"TEXT_OUTBOUND": 1}, "Carol Poe": {"TEXT_OUTBOUND": 1},
        "Dan Fox": {"TEXT_OUTBOUND": 1}}


def test_a_send_later_group_text_goes_to_the_members_of_when_it_was_sent_not_when_it_was_scheduled(
        library: Library, citadel, cli: CLI):
    """At 10:00 the owner schedules a group text for 18:00 (Send Later): Messages writes its row then,
    dated 18:00. At 14:00 the owner adds Carol and removes Bob (rows written after the text's). At 18:00
    it goes to Jane and Carol, not Bob."""
    for first, last, phone in (("Jane", "Doe", JANE), ("Bob", "Roe", BOB), ("Carol", "Poe", CAROL)):
        library.card(first=first, last=last, phones=[phone])
    library.group_text([JANE, BOB], sender=JANE, at=ago(days=1))
    chat = library._chats[tuple(sorted([JANE, BOB]))]
    library.chat.message(chat=chat, from_me=True, at=ago(hours=1))  # 18:00, written at 10:00
    bob, carol = library.chat.handle(BOB), library.chat.handle(CAROL)
    library.chat.conn.execute("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?, ?)", (chat, carol))
    group_event(library, chat, item_type=1, action=0, handle=0, other=carol, at=ago(hours=5))  # 14:00
    library.chat.conn.execute("DELETE FROM chat_handle_join WHERE chat_id = ? AND handle_id = ?", (chat, bob))
    group_event(library, chat, item_type=1, action=1, handle=0, other=bob, at=ago(hours=5))

    result = cli("sync")

    assert result.code == 0, result.output
    assert {name: kinds(citadel, name) for name in ("Jane Doe", "Bob Roe", "Carol Poe")} == {
        "Jane Doe": {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}, "Bob Roe": {}, "Carol Poe": {"TEXT_OUTBOUND": 1}}


def test_a_group_text_delivered_late_goes_to_the_members_of_its_date(library: Library, citadel, cli: CLI):
    """Carol was added two days ago and Bob removed yesterday; iCloud then delivers a group text of mine
    from three days ago (a higher ROWID than both events, an older date): Jane and Bob got it, not Carol."""
    for first, last, phone in (("Jane", "Doe", JANE), ("Bob", "Roe", BOB), ("Carol", "Poe", CAROL)):
        library.card(first=first, last=last, phones=[phone])
    library.group_text([JANE, BOB], sender=JANE, at=ago(days=4))
    chat = library._chats[tuple(sorted([JANE, BOB]))]
    bob, carol = library.chat.handle(BOB), library.chat.handle(CAROL)
    library.chat.conn.execute("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?, ?)", (chat, carol))
    group_event(library, chat, item_type=1, action=0, handle=0, other=carol, at=ago(days=2))
    library.chat.conn.execute("DELETE FROM chat_handle_join WHERE chat_id = ? AND handle_id = ?", (chat, bob))
    group_event(library, chat, item_type=1, action=1, handle=0, other=bob, at=ago(days=1))
    library.chat.message(chat=chat, from_me=True, at=ago(days=3))  # delivered late

    result = cli("sync")

    assert result.code == 0, result.output
    assert {name: kinds(citadel, name) for name in ("Jane Doe", "Bob Roe", "Carol Poe")} == {
        "Jane Doe": {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}, "Bob Roe": {"TEXT_OUTBOUND": 1}, "Carol Poe": {}}


def test_an_el_capitan_group_message_reaches_a_member_removed_since(home, citadel):
    lib = Library.create(home, chat_version="el-capitan")
    try:
        lib.card(first="Jane", last="Doe", phones=[JANE])
        lib.card(first="Bob", last="Roe", phones=[BOB])
        lib.group_text([JANE, BOB], at=ago(days=3))
        chat = lib._chats[tuple(sorted([JANE, BOB]))]
        bob = lib.chat.handle(BOB)
        lib.chat.conn.execute("DELETE FROM chat_handle_join WHERE chat_id = ? AND handle_id = ?", (chat, bob))
        group_event(lib, chat, item_type=1, action=1, handle=0, other=bob, at=ago(days=1))
        result = CLI(clean_env(home, CRM_SYNCD_API_URL=citadel.url))("sync")
    finally:
        lib.close()

    assert result.code == 0, result.output
    assert kinds(citadel, "Bob Roe") == {"TEXT_OUTBOUND": 1}
    assert kinds(citadel, "Jane Doe") == {"TEXT_OUTBOUND": 1}


def test_group_messages_skip_setting_drops_outbound_group_messages(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.group_text([JANE, BOB], sender=JANE)
    library.group_text([JANE, BOB])
    cli.env["CRM_SYNCD_CREATE_UNKNOWN_CONTACTS"] = "false"
    cli.env["CRM_SYNCD_GROUP_MESSAGES"] = "skip"

    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}


def test_tapbacks_events_system_rows_and_failed_sends_are_not_interactions(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    library.text(JANE, associated_type=2001)  # a "like" tapback
    library.text(JANE, associated_type=3001)  # its removal
    library.text(JANE, associated_type=1000)  # a sticker
    library.text(JANE, item_type=2)  # group renamed
    library.text(JANE, is_system=1)
    library.text(JANE, from_me=True, error=22)  # failed to send
    library.text(JANE, at=None)  # no date

    result = cli("sync")

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}
    assert "reaction 3" in result.stdout and "failed-send 1" in result.stdout and "no-date 1" in result.stdout


def test_email_handles_match_cards_by_email_case_insensitively(library: Library, citadel, cli: CLI):
    library.card(first="Ann", last="Lee", phones=[], emails=["ann.lee@example.com"])
    library.text("Ann.Lee@Example.COM")

    assert cli("sync").code == 0

    assert kinds(citadel, "Ann Lee") == {"TEXT_INBOUND": 1}


def test_notes_to_self_are_not_interactions_even_without_a_me_card(library: Library, citadel, cli: CLI):
    """chat.last_addressed_handle names the owner's own addresses: a chat with oneself is nobody's."""
    own = "+16135550199"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    handle = library.chat.handle(own)
    library.chat.message(library.chat.chat([handle], last_addressed=own), handle, from_me=True, at=ago(minutes=1))

    result = cli("sync", "-v")

    assert result.code == 0
    assert list(names(citadel)) == ["Jane Doe"]
    assert "own-address" in result.output


def test_a_call_to_the_owners_own_number_is_nobodys_when_contacts_and_interactions_sync_apart(
        library: Library, citadel, cli: CLI):
    """The Me card names the owner's own numbers; an --interactions-only run after --contacts-only knows
    them as a plain sync does (calling one's own voicemail line makes no placeholder)."""
    own = "+16135550100"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Owner", last="Self", phones=["+1 613 555 0100"], me=True)
    library.text(JANE, at=ago(hours=2))
    library.call(own, originated=True, duration=20, at=ago(hours=1))

    assert cli("sync", "--contacts-only").code == 0
    result = cli("sync", "--interactions-only")

    assert result.code == 0, result.output
    assert list(names(citadel)) == ["Jane Doe"] and "own-address 1" in result.stdout


def test_a_number_taken_off_the_me_card_is_someone_elses_again(library: Library, citadel, cli: CLI):
    """The owner gives up an old number; it comes off the Me card and is now Sam's, on his card."""
    old = "+16135550100"
    library.card(first="Jane", last="Doe", phones=[JANE])
    me = library.card(first="Owner", last="Self", phones=["+1 613 555 0100", "+1 613 555 0177"], me=True)
    library.text(JANE, at=ago(hours=5))
    assert cli("sync").code == 0

    library.books[0].update_card(me, phones=["+1 613 555 0177"])
    library.books[0].commit()
    library.card(first="Sam", last="Roe", phones=[old])
    library.text(old, at=ago(minutes=30))
    library.call(old, answered=True, duration=30, at=ago(minutes=20))
    assert cli("sync", "--contacts-only").code == 0
    result = cli("sync", "--interactions-only")

    assert result.code == 0, result.output
    assert kinds(citadel, "Sam Roe") == {"TEXT_INBOUND": 1, "CALL_INBOUND": 1}, result.stdout


@pytest.mark.parametrize("gone", ["its store unreadable", "the whole AddressBook folder away"])
def test_the_owners_own_number_stays_theirs_while_the_me_card_cannot_be_read(library: Library, citadel, cli: CLI,
                                                                            gone):
    own = "+16135550100"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(source=1, first="Owner", last="Self", phones=["+1 613 555 0100"], me=True)
    assert cli("sync").code == 0
    for book in library.books:
        book.close()
    if gone == "its store unreadable":  # locked or being rewritten, for this pass
        library.books[1].path.write_bytes(b"not an address book " * 1000)
    else:  # moved away for a while (a migration, a restore under way)
        library.addressbook_dir.rename(library.addressbook_dir.with_name("AddressBook-aside"))
    library.call(own, originated=True, duration=20, at=ago(minutes=5))  # the owner calls their voicemail

    result = cli("sync")

    assert list(names(citadel)) == ["Jane Doe"] and "own-address 1" in result.stdout, result.output


def test_an_old_number_of_the_owners_chats_were_sent_from_is_someone_elses_once_on_their_card(
        library: Library, citadel, cli: CLI):
    """Years of chats name the owner's old number as the one they wrote from (last_addressed_handle);
    given up, off the Me card, it is now on Sam's card: Sam's texts and calls reach Sam."""
    old, new = "+16135550100", "+16135550177"
    me = library.card(first="Owner", last="Self", phones=["+1 613 555 0100"], me=True)
    jane = library.chat.handle(JANE)
    library.chat.message(library.chat.chat([jane], last_addressed=old), jane, at=ago(days=40))
    assert cli("sync").code == 0

    library.books[0].update_card(me, phones=["+1 613 555 0177"])
    library.books[0].commit()
    library.card(first="Sam", last="Roe", phones=[old])
    sam = library.chat.handle(old)
    library.chat.message(library.chat.chat([sam], last_addressed=new), sam, at=ago(minutes=30))
    library.call(old, answered=True, duration=30, at=ago(minutes=20))
    result = cli("sync")

    assert result.code == 0, result.output
    assert kinds(citadel, "Sam Roe") == {"TEXT_INBOUND": 1, "CALL_INBOUND": 1}, result.stdout


def test_short_codes_and_sender_names_are_skipped_and_counted_not_contacts(library: Library, citadel, cli: CLI):
    library.text("88202", service="SMS")
    library.text("AMAZON", service="SMS")
    library.text("urn:biz:5c9f1e1a-1111-4a4a-9b9b-123456789abc")

    result = cli("sync")

    assert result.code == 0, result.output
    assert citadel.contacts() == []
    assert "short-code 1" in result.stdout and "sender-id 1" in result.stdout and "business 1" in result.stdout


def not_utf8(text: str) -> str:
    """SQL for `text` stored as TEXT with a byte no UTF-8 text holds after its first five characters."""
    raw = text.encode()
    return "CAST(x'" + (raw[:5] + bytes([0xFF]) + raw[5:]).hex() + "' AS TEXT)"


def test_a_value_that_is_not_utf8_stops_no_source_and_its_row_is_read_as_far_as_it_can_be(
        library: Library, citadel, cli: CLI):
    """Python's sqlite3 fails a whole read on one such value (a damaged row, a foreign writer): one handle,
    call address or card field of it stopped its source for good, every message, call or card after it."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    bob = library.card(first="Bob", last="Busy", phones=[BOB])  # the error's words hold the text: not "busy"
    library.books[0].conn.execute(f"UPDATE ZABCDRECORD SET ZLASTNAME = {not_utf8('Busy')} WHERE Z_PK = ?", (bob,))
    library.books[0].commit()
    library.text(CAROL)
    library.chat.conn.execute(f"UPDATE handle SET id = {not_utf8(CAROL)} WHERE id = ?", (CAROL,))
    library.chat.commit()
    garbled = library.call(CAROL, answered=True, duration=30)
    library.calls.conn.execute(f"UPDATE ZCALLRECORD SET ZADDRESS = {not_utf8(CAROL)} WHERE Z_PK = ?", (garbled,))
    library.calls.commit()
    library.text(JANE)
    library.call(JANE, answered=True, duration=30)

    result = cli("sync")

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1, "CALL_INBOUND": 1}
    assert names(citadel)["Bob Busy\ufffd"]["phone"] == BOB  # the byte read as U+FFFD, the rest as it is
    messages, calls = (next(line for line in result.stdout.splitlines() if line.startswith(source))
                       for source in ("Messages", "Calls"))
    assert "skipped 1 (invalid 1)" in messages and "skipped 1 (invalid 1)" in calls  # Carol's garbled number


def test_the_same_person_in_two_sources_becomes_one_contact(library: Library, citadel, cli: CLI):
    library.card(source=1, first="Jane", last="Doe", phones=[JANE])
    library.card(source=2, first="Jane", last="Doe", phones=["613-555-0111"], emails=["jane@work.example"])
    library.text("jane@work.example")
    library.text(JANE)

    assert cli("sync").code == 0

    assert list(names(citadel)) == ["Jane Doe"]
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2}


def test_linked_cards_become_one_contact_named_from_the_card_contacts_prefers(library: Library, citadel, cli: CLI):
    """Contacts shows cards with one ZLINKID as one person, named from the card marked
    ZPREFERREDFORLINKNAME, however recently the other was edited."""
    library.card(source=1, first="Jane", last="Doe", link_id="LINK-1", preferred_name=True, modified=ago(days=400))
    library.card(source=2, first="J.", last="Doe (work)", link_id="LINK-1", phones=[JANE], modified=ago(days=1))

    assert cli("sync").code == 0

    assert list(names(citadel)) == ["Jane Doe"]
    assert names(citadel)["Jane Doe"]["phone"] == JANE


def test_cards_merged_for_a_shared_number_take_the_newest_name_whatever_their_link_flags(
        library: Library, citadel, cli: CLI):
    library.card(source=1, first="JANE", last="DOE", phones=[JANE], preferred_name=True, modified=ago(days=400))
    library.card(source=2, first="Jane", last="Doe", phones=[JANE], modified=ago(days=1))
    library.card(source=2, phones=[JANE], emails=["jane@example.com"])  # no name: an alias of hers

    assert cli("sync").code == 0

    assert list(names(citadel)) == ["Jane Doe"]


def test_a_companys_main_number_on_its_peoples_cards_keeps_each_of_them_and_its_calls_go_to_the_company(
        library: Library, citadel, cli: CLI):
    """Cards that share an address but not a name are different people, as Contacts shows them (a home
    line, an office's main number): the address is the one it ranks first for (their primary or mobile)."""
    main = "+16135550100"
    library.card(organization="Acme", company=True, phones=[(main, "Main")])
    library.card(first="Jane", last="Doe", organization="Acme", phones=[(JANE, "Mobile"), (main, "Work")])
    library.card(source=1, first="Bob", last="Roe", organization="Acme", phones=[(main, "Work")],
                 emails=["bob@acme.example"])
    library.call(main, answered=True, duration=60, at=ago(hours=2))
    library.text(JANE, at=ago(hours=1))
    library.text("bob@acme.example", at=ago(hours=1))

    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["Acme (company)", "Bob Roe", "Jane Doe"]
    assert kinds(citadel, "Acme (company)") == {"CALL_INBOUND": 1}
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1}
    assert names(citadel)["Jane Doe"]["phone"] == JANE
    assert cli("sync", "--full").code == 0 and len(citadel.contacts()) == 3


def test_a_contact_the_owner_made_for_someone_who_shares_a_number_is_theirs_not_the_numbers_owners(
        library: Library, citadel, cli: CLI):
    home = "+16135550100"
    bob = citadel.add_contact(firstName="Bob", lastName="Roe", phone="(613) 555-0100")
    library.card(first="Alice", last="Roe", phones=[(home, "Home")])
    library.card(first="Bob", last="Roe", phones=[(BOB, "Mobile"), (home, "Home")])
    library.text(home)
    library.text(BOB)

    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["Alice Roe", "Bob Roe"]
    assert names(citadel)["Bob Roe"]["id"] == bob
    assert kinds(citadel, "Alice Roe") == {"TEXT_INBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1}


HOME_LINE = "+16135550100"


def test_a_nameless_card_holding_two_peoples_numbers_joins_neither_and_every_run_agrees(
        library: Library, citadel, cli: CLI):
    library.card(first="Alice", last="Roe", phones=[(HOME_LINE, "Home")], unique_id="B:ABPerson")
    library.card(first="Bob", last="Roe", phones=[(BOB, "Work")], unique_id="C:ABPerson")
    library.card(phones=[(HOME_LINE, "Home"), (BOB, "Work")], unique_id="A:ABPerson")
    runs = []
    for seed in ("1", "4", "1", "4"):  # the order of Python's sets changes with the hash seed
        cli.env["PYTHONHASHSEED"] = seed
        assert cli("sync").code == 0
        runs.append({f"{c['firstName']} {c['lastName']}": c["id"] for c in citadel.contacts()})

    assert runs[0] == runs[1] == runs[2] == runs[3]
    assert sorted(runs[0]) == ["+16135550100 -", "Alice Roe", "Bob Roe"]


def test_one_person_on_two_accounts_under_two_spellings_is_one_contact(library: Library, citadel, cli: CLI):
    """The same mobile on both cards, or one name a part of the other: one person."""
    library.card(first="Robert", last="Roe", phones=[(BOB, "Mobile")])
    library.card(source=1, first="Bob", last="Roe", phones=[(BOB, "iPhone")], emails=["bob@example.com"])
    library.card(source=1, first="Jane", phones=[(JANE, "Home")])
    library.card(first="Jane", last="Doe", phones=[(JANE, "Home")])
    library.text("bob@example.com")

    assert cli("sync").code == 0

    assert len(citadel.contacts()) == 2
    assert "Jane Doe" in names(citadel)


def test_a_card_known_by_its_nickname_is_a_person_of_its_own(library: Library, citadel, cli: CLI):
    library.card(nickname="Mom", phones=[(HOME_LINE, "Home"), (CAROL, "Mobile")])
    library.card(first="John", last="Smith", phones=[(BOB, "Mobile"), (HOME_LINE, "Home")])
    library.text(CAROL)

    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["John Smith", "Mom -"]
    assert kinds(citadel, "Mom -") == {"TEXT_INBOUND": 1}


def test_a_deleted_card_leaves_its_contact_to_itself_not_to_who_shared_its_number(
        library: Library, citadel, cli: CLI):
    library.card(first="Alice", last="Roe", phones=[(HOME_LINE, "Home")], unique_id="A:ABPerson")
    bob = library.card(first="Bob", last="Roe", phones=[(HOME_LINE, "Home")], emails=["bob@example.com"],
                       unique_id="B:ABPerson")
    library.text("bob@example.com", at=ago(hours=2))
    assert cli("sync").code == 0
    before = {name: c["id"] for name, c in names(citadel).items()}

    library.books[0].delete_card(bob)
    library.books[0].commit()
    assert cli("sync").code == 0

    assert {name: c["id"] for name, c in names(citadel).items()} == before
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1}


@pytest.mark.parametrize("owner_edited,family_email", [(False, False), (True, False), (False, True)],
                         ids=["as-written", "owner-edited", "with-a-family-email"])
def test_linked_cards_the_owner_unlinks_leave_the_contact_to_the_person_it_is_named_after(
        library: Library, citadel, cli: CLI, owner_edited: bool, family_email: bool):
    """As an older crm-syncd left a couple who share a home line: one contact, named after one of them."""
    emails = ["roes@example.com"] if family_email else []
    alice = library.card(first="Alice", last="Roe", phones=[(CAROL, "Mobile"), (HOME_LINE, "Home")], emails=emails,
                         unique_id="A:ABPerson", link_id="L", modified=ago(days=10))
    bob = library.card(first="Bob", last="Roe", phones=[(BOB, "Mobile"), (HOME_LINE, "Home")], emails=emails,
                       unique_id="B:ABPerson", link_id="L", modified=ago(days=1))
    library.text(BOB, at=ago(hours=3))
    assert cli("sync").code == 0
    (merged,) = citadel.contacts()
    assert (merged["firstName"], merged["phone"]) == ("Bob", BOB)
    if owner_edited:
        citadel.update_contact(merged["id"], title="Plumber")
    for card in (alice, bob):
        library.books[0].update_card(card, link_id=None)
    library.books[0].commit()

    assert cli("sync").code == 0
    assert cli("sync").code == 0

    assert names(citadel)["Bob Roe"]["id"] == merged["id"]
    assert sorted(names(citadel)) == ["Alice Roe", "Bob Roe"]
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1}


def test_a_household_card_under_the_family_name_keeps_the_couple_apart(library: Library, citadel, cli: CLI):
    library.card(last="Smith", phones=[(HOME_LINE, "Home")], unique_id="A:ABPerson")
    library.card(first="Alice", last="Smith", phones=[(CAROL, "Mobile"), (HOME_LINE, "Home")], unique_id="B:ABPerson")
    library.card(first="Bob", last="Smith", phones=[(BOB, "Mobile"), (HOME_LINE, "Home")], unique_id="C:ABPerson")

    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["- Smith", "Alice Smith", "Bob Smith"]


def test_a_linked_card_with_another_spelling_renames_the_persons_contact_rather_than_making_a_second(
        library: Library, citadel, cli: CLI):
    """The person's smallest unique id and their name change at once."""
    library.card(first="Robert", last="Roe", phones=[(BOB, "Mobile")], unique_id="M:ABPerson", link_id="L",
                 modified=ago(days=30))
    library.text(BOB, at=ago(hours=3))
    assert cli("sync").code == 0
    (before,) = citadel.contacts()

    library.card(source=1, first="Bob", last="Roe", phones=[(BOB, "Mobile")], unique_id="C:ABPerson",
                 link_id="L", preferred_name=True)
    assert cli("sync").code == 0

    assert [(c["id"], c["firstName"]) for c in citadel.contacts()] == [(before["id"], "Bob")]


def test_deleting_the_card_that_named_a_linked_person_renames_their_contact(library: Library, citadel, cli: CLI):
    named_by = library.card(first="Bob", last="Roe", phones=[(BOB, "Mobile")], unique_id="A:ABPerson",
                            link_id="L", preferred_name=True)
    library.card(first="Robert", last="Roe", emails=["bob@example.com"], phones=[], unique_id="B:ABPerson",
                 link_id="L")
    library.text(BOB, at=ago(hours=3))
    assert cli("sync").code == 0
    (before,) = citadel.contacts()

    library.books[0].delete_card(named_by)
    library.books[0].commit()
    assert cli("sync").code == 0

    assert [(c["id"], c["firstName"]) for c in citadel.contacts()] == [(before["id"], "Robert")]


def remove_account(library: Library, source: int) -> None:
    """The owner removes an account from the Mac: its AddressBook store goes."""
    book = library.books[source]
    book.close()
    shutil.rmtree(book.path.parent)


def test_a_sparser_copy_of_a_card_in_an_account_added_later_hides_none_of_its_note_company_or_title(
        library: Library, citadel, cli: CLI):
    library.card(source=1, first="Jane", last="Doe", phones=[(JANE, "Mobile")], emails=["jane@acme.example"],
                 organization="Acme", job_title="CTO", note="Met at the 2024 conference", modified=ago(days=400))
    assert cli("sync").code == 0
    (jane,) = citadel.contacts()

    # a Google account holding a bare copy of her (name and number), edited today: it names her now
    library.card(source=2, first="Jane", last="Doe", phones=[("(613) 555-0111", "Mobile")], modified=ago(minutes=5))
    assert cli("sync").code == 0

    (after,) = citadel.contacts()
    assert after["id"] == jane["id"]
    assert (after["email"], after["organization"], after["title"], after["notes"]) == (
        "jane@acme.example", "Acme", "CTO", "Met at the 2024 conference")

def test_a_person_whose_number_the_owner_changed_in_the_crm_keeps_that_contact_when_a_card_joins_them(
        library: Library, citadel, cli: CLI):
    library.card(source=1, first="Jane", last="Doe", phones=[(JANE, "Mobile")], unique_id="B:ABPerson")
    assert cli("sync").code == 0
    (jane,) = citadel.contacts()
    citadel.update_contact(jane["id"], phone="+1 613 555 0999")  # the owner: "she has a new number"

    library.card(source=2, first="Jane", last="Doe", phones=[(JANE, "Mobile")], unique_id="A:ABPerson")
    assert cli("sync").code == 0

    assert [c["id"] for c in citadel.contacts()] == [jane["id"]]


def test_a_person_whose_contact_holds_none_of_their_addresses_keeps_it_when_a_card_joins_them(
        library: Library, citadel, cli: CLI):
    """Zoë's only address is one the CRM refuses (an internationalised domain): her contact holds none."""
    library.card(source=1, first="Zoë", last="Müller", emails=["zoe@müller.de"], unique_id="B:ABPerson")
    assert cli("sync").code == 0
    (zoe,) = citadel.contacts()

    library.card(source=2, first="Zoë", last="Müller", emails=["zoe@müller.de"], unique_id="A:ABPerson")
    assert cli("sync").code == 0

    assert [c["id"] for c in citadel.contacts()] == [zoe["id"]]


def test_a_card_moved_to_another_account_keeps_the_contact_whose_number_the_owner_changed(
        library: Library, citadel, cli: CLI):
    moved = library.card(source=1, first="Jane", last="Doe", phones=[(JANE, "Mobile")])
    library.text(JANE, at=ago(hours=3))
    assert cli("sync").code == 0
    (jane,) = citadel.contacts()
    citadel.update_contact(jane["id"], phone="+1 613 555 0999")  # the owner's edit in the CRM

    library.books[1].delete_card(moved)  # moved: deleted here, made anew (a new unique id) in the other account
    library.books[1].commit()
    library.card(source=2, first="Jane", last="Doe", phones=[(JANE, "Mobile")])
    library.text(JANE, at=ago(hours=1))
    assert cli("sync").code == 0

    assert [c["id"] for c in citadel.contacts()] == [jane["id"]]
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2}


def test_removing_an_account_keeps_what_its_card_gave_a_person_also_on_another_account(
        library: Library, citadel, cli: CLI):
    library.card(source=1, first="Jane", last="Doe", phones=[(JANE, "Mobile")])
    library.card(source=2, first="Jane", last="Doe", phones=[(JANE, "Mobile")], emails=["jane@work.example"],
                 organization="Acme", note="Met at the 2024 conference")
    assert cli("sync").code == 0
    (jane,) = citadel.contacts()
    assert (jane["email"], jane["notes"]) == ("jane@work.example", "Met at the 2024 conference")

    remove_account(library, 2)  # the work account
    assert cli("sync").code == 0

    (after,) = citadel.contacts()
    assert (after["id"], after["email"], after["organization"], after["notes"]) == (
        jane["id"], "jane@work.example", "Acme", "Met at the 2024 conference")


@pytest.mark.parametrize("then", ["its store reads again", "the note is copied to the remaining card"])
def test_a_note_kept_while_its_card_was_gone_is_not_doubled_when_it_comes_back(library: Library, citadel, cli: CLI,
                                                                              then):
    note = "Met at the 2024 conference"
    home = library.card(source=1, first="Jane", last="Doe", phones=[(JANE, "Mobile")])
    library.card(source=2, first="Jane", last="Doe", phones=[(JANE, "Mobile")], note=note)
    assert cli("sync").code == 0
    book = library.books[2]
    book.close()
    saved = book.path.read_bytes()
    book.path.write_bytes(b"not a database" * 100)  # unreadable for a pass (or, for good, the account removed)
    assert cli("sync").code == 0 and citadel.contacts()[0]["notes"] == note

    if then == "its store reads again":
        book.path.write_bytes(saved)
    else:
        library.books[1].update_card(home, note=note)
        library.books[1].commit()
    assert cli("sync").code == 0

    assert citadel.contacts()[0]["notes"] == note


def test_removing_an_account_does_not_rename_a_person_after_their_email_even_when_that_card_changes(
        library: Library, citadel, cli: CLI):
    """Ann: a nameless card holding her email (saved from Mail), her full card on the work account."""
    nameless = library.card(source=1, emails=["ann@example.com"])
    library.card(source=2, first="Ann", last="Lee", phones=[(CAROL, "Mobile")], emails=["ann@example.com"],
                 organization="Acme")
    assert cli("sync").code == 0
    (ann,) = citadel.contacts()

    remove_account(library, 2)  # she left the job: the owner removes the work account
    assert cli("sync").code == 0
    library.books[1].update_card(nameless, emails=["ann@example.org"])
    library.books[1].commit()
    assert cli("sync").code == 0

    (after,) = citadel.contacts()
    assert (after["id"], after["firstName"], after["lastName"], after["phone"], after["organization"]) == (
        ann["id"], "Ann", "Lee", CAROL, "Acme")
    assert after["email"] == "ann@example.org"  # the remaining card's edits still follow it


def test_a_field_emptied_on_a_persons_card_is_emptied_on_their_contact_while_their_other_cards_stay(
        library: Library, citadel, cli: CLI):
    home = library.card(source=1, first="Jane", last="Doe", phones=[(JANE, "Mobile")], note="Her dog: Rex")
    library.card(source=2, first="Jane", last="Doe", phones=[(JANE, "Mobile")], emails=["jane@work.example"])
    assert cli("sync").code == 0

    library.books[1].update_card(home, note=None)
    library.books[1].commit()
    assert cli("sync").code == 0

    (after,) = citadel.contacts()
    assert (after["notes"] or None, after["email"]) == (None, "jane@work.example")

def test_renaming_one_of_two_namesakes_keeps_their_contact_and_history(library: Library, citadel, cli: CLI):
    citadel.add_contact(firstName="John", lastName="Smith", phone="(902) 555-0122")  # the owner's, for the other
    library.card(first="John", last="Smith", phones=[(BOB, "Mobile")], unique_id="A:ABPerson")
    junior = library.card(first="John", last="Smith", phones=[(CAROL, "Mobile")], unique_id="B:ABPerson")
    library.text(CAROL, at=ago(hours=3))
    assert cli("sync").code == 0

    library.books[0].update_card(junior, last="Smith Jr")
    library.books[0].commit()
    assert cli("sync").code == 0
    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["John Smith", "John Smith Jr"]
    assert names(citadel)["John Smith Jr"]["phone"] == CAROL
    assert kinds(citadel, "John Smith Jr") == {"TEXT_INBOUND": 1}


def test_a_new_card_under_a_renamed_persons_old_name_gets_a_contact_of_its_own(library: Library, citadel, cli: CLI):
    jon = library.card(first="Jon", last="Smith", phones=[(BOB, "Mobile")], unique_id="B:ABPerson")
    library.text(BOB, at=ago(hours=3))
    assert cli("sync").code == 0
    (contact,) = citadel.contacts()
    citadel.update_contact(contact["id"], notes="met at the conference")  # the owner's: no longer renamed by us
    library.books[0].update_card(jon, first="John")
    library.books[0].commit()
    assert cli("sync").code == 0

    library.card(first="Jon", last="Smith", phones=[(CAROL, "Mobile")], unique_id="C:ABPerson")
    library.text(CAROL, at=ago(hours=1))
    assert cli("sync").code == 0
    assert cli("sync").code == 0

    by_phone = {c["phone"]: c for c in citadel.contacts()}
    assert sorted(by_phone) == sorted([BOB, CAROL]) and by_phone[BOB]["id"] == contact["id"]
    assert Counter(i["type"] for i in citadel.interactions(contact["id"])) == {"TEXT_INBOUND": 1}


def test_a_new_card_with_the_number_of_someone_deleted_gets_a_contact_of_its_own(library: Library, citadel, cli: CLI):
    """Alice left; months later her old mobile number is Carol's, and the owner adds Carol."""
    alice = library.card(first="Alice", last="Roe", phones=[(BOB, "Mobile")], unique_id="B:ABPerson")
    library.text(BOB, at=ago(days=30))
    assert cli("sync").code == 0
    library.books[0].delete_card(alice)
    library.books[0].commit()
    assert cli("sync").code == 0

    library.card(first="Carol", last="Zed", phones=[(BOB, "Mobile")], unique_id="C:ABPerson")
    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["Alice Roe", "Carol Zed"]
    assert kinds(citadel, "Alice Roe") == {"TEXT_INBOUND": 1}


def test_two_people_whose_cards_both_call_one_number_mobile_stay_apart(library: Library, citadel, cli: CLI):
    """An iPhone labels a number it is given "mobile" by default: a shared line may be one on both cards."""
    library.card(first="Alice", last="Smith", phones=[(HOME_LINE, "Mobile")], emails=["alice@example.com"])
    library.card(first="Bob", last="Jones", phones=[(HOME_LINE, "iPhone")], emails=["bob@example.com"])
    library.text("alice@example.com")

    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["Alice Smith", "Bob Jones"]
    assert kinds(citadel, "Alice Smith") == {"TEXT_INBOUND": 1}


def test_a_household_card_edited_last_does_not_name_the_person_or_keep_her_history_when_they_part(
        library: Library, citadel, cli: CLI):
    library.card(first="Alice", last="Smith", phones=[(CAROL, "Mobile"), (HOME_LINE, "Home")],
                 unique_id="B:ABPerson", modified=ago(days=10))
    library.card(last="Smith", phones=[(HOME_LINE, "Home")], unique_id="A:ABPerson", modified=ago(days=1))
    library.text(CAROL, at=ago(hours=3))
    assert cli("sync").code == 0
    assert [(c["firstName"], c["phone"]) for c in citadel.contacts()] == [("Alice", CAROL)]

    library.card(first="Bob", last="Smith", phones=[(BOB, "Mobile"), (HOME_LINE, "Home")], unique_id="C:ABPerson")
    assert cli("sync").code == 0
    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["- Smith", "Alice Smith", "Bob Smith"]
    assert kinds(citadel, "Alice Smith") == {"TEXT_INBOUND": 1}


def test_one_persons_mobile_in_two_accounts_joins_their_cards_after_the_names_do(library: Library, citadel, cli: CLI):
    library.card(first="Robert", last="Roe", phones=[(CAROL, "Mobile"), (HOME_LINE, "Home")])
    library.card(first="Robert", last="Roe", phones=[(HOME_LINE, "Home")])  # a duplicate card
    library.card(source=1, first="Bob", last="Roe", phones=[(CAROL, "Mobile")])  # his mobile sorts first

    assert cli("sync").code == 0

    assert len(citadel.contacts()) == 1


def test_a_couple_whose_shared_line_is_labelled_mobile_in_two_accounts_stays_two_people(
        library: Library, citadel, cli: CLI):
    library.card(first="Alice", last="Smith", phones=[(HOME_LINE, "Mobile")], emails=["alice@example.com"])
    library.card(source=1, first="Bob", last="Smith", phones=[(HOME_LINE, "iPhone")], emails=["bob@example.com"])
    library.text("alice@example.com")

    assert cli("sync").code == 0

    assert sorted(names(citadel)) == ["Alice Smith", "Bob Smith"]
    assert kinds(citadel, "Alice Smith") == {"TEXT_INBOUND": 1}


def test_a_long_name_and_the_same_name_with_one_more_surname_are_one_person(library: Library, citadel, cli: CLI):
    library.card(first="María de los Ángeles", last="García", phones=[(HOME_LINE, "Home")], unique_id="A:ABPerson")
    library.card(first="María de los Ángeles", last="García López", phones=[(HOME_LINE, "Home")],
                 unique_id="B:ABPerson")

    assert cli("sync").code == 0

    assert len(citadel.contacts()) == 1


def test_company_cards_and_first_name_only_cards_get_findable_names(library: Library, citadel, cli: CLI):
    library.card(organization="Acme Plumbing", company=True, phones=["+1 613 555 0144"])
    library.card(first="Prince", phones=["+1 613 555 0155"])

    assert cli("sync").code == 0

    contacts = names(citadel)
    assert contacts["Acme Plumbing (company)"]["organization"] == "Acme Plumbing"
    assert "Prince -" in contacts


def test_address_book_groups_and_the_me_card_are_not_contacts(library: Library, citadel, cli: CLI):
    friend = library.card(first="Jane", last="Doe", phones=[JANE])
    library.books[0].group("Friends", members=[friend])
    library.books[0].commit()
    library.card(first="Owner", last="Self", phones=["+1 613 555 0100"], me=True)
    library.text("+16135550100", from_me=True)  # a note to self

    assert cli("sync").code == 0

    assert list(names(citadel)) == ["Jane Doe"]


def test_the_owners_card_in_another_account_linked_to_the_me_card_is_the_owners_not_a_contact(
        library: Library, citadel, cli: CLI):
    """Contacts flags the Me card in one store; the owner's card in another account, linked to it, is not
    flagged there. Calls to a number only that card holds are the owner's own too."""
    library.card(source=0, first="Olivia", last="Owner", phones=["+1 415 555 0199"], emails=["olivia@example.com"],
                 me=True, link_id="LINK-ME")
    library.card(source=1, first="Olivia", last="Owner", phones=["+1 415 555 0199", "+1 415 555 0188"],
                 link_id="LINK-ME")
    library.card(source=1, first="Alice", last="Hill", phones=["+1 415 555 0100"])
    library.call("+14155550188", originated=True, duration=20, at=ago(hours=1))  # the owner's voicemail line

    result = cli("sync")

    assert result.code == 0, result.output
    assert list(names(citadel)) == ["Alice Hill"]
    assert "own-address 1" in result.stdout


def test_a_number_the_owners_linked_card_shares_with_another_persons_card_is_theirs(
        library: Library, citadel, cli: CLI):
    """The office's main line, on the owner's work card (linked to the Me card) and on a colleague's, is the
    colleague's: texts and calls on it are theirs. The Me card's own numbers stay the owner's, whoever else
    holds them (a family landline), and so does a number only the linked card holds."""
    main, landline, work_mobile = "+14155550111", "+14155550177", "+14155550188"
    library.card(source=0, first="Olivia", last="Owner", phones=["+1 415 555 0199", (landline, "Home")], me=True,
                 link_id="LINK-ME")
    library.card(source=1, first="Olivia", last="Owner", phones=[work_mobile, (main, "Work")], link_id="LINK-ME")
    library.card(source=1, first="Bob", last="Roe", phones=[(main, "Work")])
    library.card(source=1, first="Sam", last="Owner", phones=[(landline, "Home")])
    library.call(main, answered=True, duration=30, at=ago(hours=1))
    library.text(main, at=ago(hours=2))
    library.call(landline, originated=True, duration=20, at=ago(hours=3))
    library.call(work_mobile, originated=True, duration=20, at=ago(hours=4))

    result = cli("sync")

    assert result.code == 0, result.output
    assert sorted(names(citadel)) == ["Bob Roe", "Sam Owner"]
    assert kinds(citadel, "Bob Roe") == {"CALL_INBOUND": 1, "TEXT_INBOUND": 1}
    assert "own-address 2" in result.stdout


def test_a_crm_contact_with_an_unnormalised_phone_is_matched_not_duplicated(library: Library, citadel, cli: CLI):
    existing = citadel.add_contact(firstName="Robert", lastName="Roe", phone="(902) 555-0122")
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.text(BOB)

    assert cli("sync").code == 0

    assert [c["id"] for c in citadel.contacts()] == [existing]
    assert names(citadel)["Robert Roe"]["phone"] == "(902) 555-0122"  # the owner's field, untouched
    assert kinds(citadel, "Robert Roe") == {"TEXT_INBOUND": 1}


def test_a_card_number_typed_without_its_country_code_is_read_in_the_country_contacts_recorded(
        library: Library, citadel, cli: CLI):
    """The Mac's region is the US; Contacts recorded `gb` for a UK mobile typed as at home."""
    library.card(first="Alice", last="Hill", phones=[("07700 900123", "Mobile", True, "gb")])
    library.text("+447700900123")

    assert cli("sync").code == 0

    assert [f"{c['firstName']} {c['lastName']}" for c in citadel.contacts()] == ["Alice Hill"]
    assert names(citadel)["Alice Hill"]["phone"] == "+447700900123"
    assert kinds(citadel, "Alice Hill") == {"TEXT_INBOUND": 1}


def test_a_mexican_mobile_in_its_form_before_2019_is_the_same_person_as_today(library: Library, citadel, cli: CLI):
    """Mexico dropped its mobile `1` in 2019; cards and chat.db still hold `+52 1 55 …` beside `+52 55 …`."""
    library.card(first="Juan", last="Perez", phones=[("+52 1 55 1234 5678", "Mobile")])
    library.text("+5215512345678", at=ago(days=300))
    library.text("+525512345678", at=ago(hours=2))
    library.call("+5215512345678", iso_country="mx", answered=True, duration=20, at=ago(hours=1))

    assert cli("sync").code == 0

    assert [f"{c['firstName']} {c['lastName']}" for c in citadel.contacts()] == ["Juan Perez"]
    assert names(citadel)["Juan Perez"]["phone"] == "+525512345678"
    assert kinds(citadel, "Juan Perez") == {"TEXT_INBOUND": 2, "CALL_INBOUND": 1}


def test_a_number_in_international_form_that_phonenumbers_does_not_know_is_kept_as_stored(
        library: Library, citadel, cli: CLI):
    """A number Apple stored with its `+` whose length phonenumbers' metadata does not allow (yet) is
    still someone: its texts are not dropped as invalid."""
    library.text("+999123456789", at=ago(hours=1))

    result = cli("sync")

    assert result.code == 0, result.output
    assert kinds(citadel, "Unknown (+999123456789)") == {"TEXT_INBOUND": 1}


@pytest.mark.parametrize("pasted", ["Ann Lee <Ann.Lee@Example.com>", "Lee, Ann <ann.lee@example.com>", "<ann.lee@example.com>",
                                    "ann.lee@example.com,", "Ann Lee <mailto:ann.lee@example.com>"])
def test_a_card_email_pasted_with_its_name_or_punctuation_is_the_persons_address(
        library: Library, citadel, cli: CLI, pasted: str):
    library.card(first="Ann", last="Lee", phones=[], emails=[pasted])
    library.text("ann.lee@example.com")

    assert cli("sync").code == 0

    assert [f"{c['firstName']} {c['lastName']}" for c in citadel.contacts()] == ["Ann Lee"]
    assert names(citadel)["Ann Lee"]["email"] == "ann.lee@example.com"
    assert kinds(citadel, "Ann Lee") == {"TEXT_INBOUND": 1}


def test_a_card_email_field_listing_two_peoples_addresses_is_neither_of_theirs(library: Library, citadel, cli: CLI):
    """A household card holds both spouses' addresses in one field, as pasted from a To: line."""
    library.card(first="Lee", last="Family", emails=["ann@example.com, bob@example.com"], unique_id="A:ABPerson")
    library.card(first="Ann", last="Lee", emails=["ann@example.com"], unique_id="B:ABPerson")
    library.text("ann@example.com", at=ago(hours=1))

    assert cli("sync").code == 0

    assert (kinds(citadel, "Lee Family"), kinds(citadel, "Ann Lee")) == ({}, {"TEXT_INBOUND": 1})


def test_a_us_number_written_with_its_1_on_a_mac_in_mexico_is_not_taken_for_a_mexican_mobile(
        library: Library, citadel, cli: CLI):
    """`1 (415) 555-0123` is San Francisco written the US way; without a `+` the `1` is no Mexican mobile's
    (that `1` only ever came after +52), so the stranger texting from San Miguel de Allende's 415 is not Bob."""
    cli.env["CRM_SYNCD_DEFAULT_REGION"] = "MX"
    library.card(first="Bob", last="Friend", phones=[("1 (415) 555-0123", "Mobile", True, "mx")])
    library.text("+524155550123", at=ago(hours=1))

    assert cli("sync").code == 0

    assert (names(citadel)["Bob Friend"]["phone"], kinds(citadel, "Bob Friend")) == (None, {})
    assert kinds(citadel, "Unknown (+52-415-555-0123)") == {"TEXT_INBOUND": 1}


def test_the_me_cards_number_typed_without_its_country_code_is_the_owners_own_in_the_country_contacts_recorded(
        library: Library, citadel, cli: CLI):
    """A UK owner on a Mac left in the US region: notes to self and voicemail calls are nobody's."""
    library.card(first="Owner", last="Self", phones=[("07700 900123", "Mobile", True, "gb")], me=True)
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text("+447700900123", from_me=True, at=ago(hours=2))
    library.call("+447700900123", iso_country="gb", originated=True, duration=3, at=ago(hours=1))
    library.text(JANE)

    result = cli("sync")

    assert result.code == 0, result.output
    assert [f"{c['firstName']} {c['lastName']}" for c in citadel.contacts()] == ["Jane Doe"]
    assert result.stdout.count("own-address 1") == 2  # the note to self, and the call


def test_a_call_number_without_its_country_code_is_read_in_the_country_the_call_history_recorded(
        library: Library, citadel, cli: CLI):
    """The Mac's region is the US; calls made in the UK synced from the iPhone keep UK numbers as dialled."""
    library.card(first="Alice", last="Hill", phones=["+44 7700 900123"])
    library.call("07700 900123", iso_country="gb", originated=True, duration=42, at=ago(hours=3))
    library.call("020 7946 0018", iso_country="gb", answered=True, duration=7, at=ago(hours=2))
    library.call("(613) 555-0111", iso_country="us", answered=True, duration=9, at=ago(hours=1))

    assert cli("sync").code == 0

    assert kinds(citadel, "Alice Hill") == {"CALL_OUTBOUND": 1}
    assert kinds(citadel, "Unknown (+44-20-7946-0018)") == {"CALL_INBOUND": 1}
    assert kinds(citadel, "Unknown (+1-613-555-0111)") == {"CALL_INBOUND": 1}
    assert len(citadel.contacts()) == 3


def test_a_call_dialled_with_a_caller_id_code_before_the_number_reaches_the_person_called(
        library: Library, citadel, cli: CLI):
    """`*67` (North America) and `#31#` (GSM) hide the owner's number on one call; the call history keeps
    the number as dialled, code and all. Such calls used to be dropped as invalid addresses."""
    library.card(first="Alice", last="Hill", phones=["+1 415 555 0100"])
    library.card(first="Bob", last="Lamb", phones=["+44 7700 900123"])
    library.call("*67 (415) 555-0100", originated=True, duration=42, at=ago(hours=2))
    library.call("#31#07700900123", iso_country="gb", originated=True, duration=7, at=ago(hours=1))

    assert cli("sync").code == 0

    assert kinds(citadel, "Alice Hill") == kinds(citadel, "Bob Lamb") == {"CALL_OUTBOUND": 1}
    assert len(citadel.contacts()) == 2


@pytest.mark.parametrize("dialled", ["*67 (415) 555-0100", b"+1\xc2\xa0415\xc2\xa0555\xc2\xa00100",
                                     "\u202a+1 415 555 0100\u202c"], ids=["caller-id-code", "no-break-spaces", "marks"])
def test_a_call_an_earlier_version_dropped_for_its_dialled_form_arrives_with_sync_days_once(
        library: Library, citadel, cli: CLI, dialled):
    """Calls an earlier version read and dropped (a caller-ID code, no-break spaces, direction marks) lie
    behind the mark after the upgrade: a plain `sync` does not read them again, `sync --days N` does, and
    sends nothing delivered before twice."""
    library.card(first="Alice", last="Hill", phones=["+1 415 555 0100"])
    library.call("+14155550100", originated=True, duration=30, at=ago(days=3))
    library.call("+14155550100", answered=True, duration=10, at=ago(hours=1), pk=3)
    assert cli("sync").code == 0
    library.call(dialled, originated=True, duration=42, at=ago(hours=2), pk=2)  # as the earlier version left it

    assert cli("sync").code == 0 and kinds(citadel, "Alice Hill") == {"CALL_OUTBOUND": 1, "CALL_INBOUND": 1}
    assert cli("sync", "--days", "7").code == 0 and cli("sync", "--days", "7").code == 0

    assert kinds(citadel, "Alice Hill") == {"CALL_OUTBOUND": 2, "CALL_INBOUND": 1}
    assert len(citadel.contacts()) == 1


@pytest.mark.parametrize("alice,bob", [("B-ALICE:ABPerson", "A-BOB:ABPerson"),
                                       ("A-ALICE:ABPerson", "B-BOB:ABPerson")], ids=["bob-first", "alice-first"])
def test_a_number_moved_to_another_card_moves_alone_and_both_contacts_keep_their_history(
        library: Library, citadel, cli: CLI, alice: str, bob: str):
    alice_card = library.card(first="Alice", last="Ames", phones=[JANE], unique_id=alice)
    bob_card = library.card(first="Bob", last="Roe", phones=[BOB], unique_id=bob)
    library.text(JANE, at=ago(days=3))
    library.text(JANE, from_me=True, at=ago(days=2))
    assert cli("sync").code == 0
    before = {name: c["id"] for name, c in names(citadel).items()}

    library.books[0].update_card(alice_card, phones=[CAROL])  # Alice has a new number; her old one is Bob's now
    library.books[0].update_card(bob_card, phones=[BOB, JANE])
    library.books[0].commit()
    library.text(JANE, at=ago(hours=1))
    result = cli("sync")

    assert result.code == 0, result.output
    assert {name: c["id"] for name, c in names(citadel).items()} == before
    assert names(citadel)["Alice Ames"]["phone"] == CAROL  # her contact follows her card
    assert kinds(citadel, "Alice Ames") == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1}  # the number's new message, not Alice's past


def test_a_placeholder_the_owner_made_their_own_is_kept_when_a_card_claims_its_address(
        library: Library, citadel, cli: CLI):
    bob = library.card(first="Bob", last="Roe", phones=[BOB])
    library.text("bob.work@example.org", at=ago(days=2))  # nobody's card has it: a placeholder
    assert cli("sync").code == 0
    placeholder = names(citadel)["Unknown (bob.work@example.org)"]
    citadel.update_contact(placeholder["id"], firstName="Robert", lastName="Roe (work)",
                           notes="Procurement lead at Acme")  # the owner names it, in the CRM

    library.books[0].update_card(bob, emails=["bob.work@example.org"])
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    assert sorted(names(citadel)) == ["Bob Roe", "Robert Roe (work)"]
    assert len(citadel.interactions(placeholder["id"])) == 1
    kept = names(citadel)["Bob Roe"]["id"]
    assert json.loads(cli("status", "--json").stdout)["duplicates"] == [{"kept": kept, "duplicate": placeholder["id"]}]


def annotated_placeholder(library: Library, citadel, cli: CLI, address: str, note: str) -> dict:
    """An unknown `address` texts; the owner writes `note` under the review note of its placeholder."""
    library.text(address)
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    citadel.update_contact(placeholder["id"], notes=placeholder["notes"] + "\n" + note)
    return placeholder


def test_a_card_contact_the_owner_annotated_is_kept_when_its_card_joins_another(library: Library, citadel, cli: CLI):
    """Two namesake cards, one with a number, one with an email: two contacts. The owner annotates the
    second; then the first card gains the email: one person now, and the annotated contact is kept."""
    bob = library.card(first="Robert", last="Roe", phones=[BOB], unique_id="A-1:ABPerson")
    library.card(first="Robert", last="Roe", emails=["bob@example.org"], unique_id="B-2:ABPerson")
    assert cli("sync").code == 0
    (annotated,) = [c for c in citadel.contacts() if c["email"] == "bob@example.org"]
    citadel.update_contact(annotated["id"], notes="Allergic to peanuts")  # the owner's own note

    library.books[0].update_card(bob, emails=["bob@example.org"])  # one person on two cards now
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    assert "possible duplicate" in result.output and "looks like" in result.output and str(annotated["id"]) in result.output, result.output
    kept = {c["id"]: c for c in citadel.contacts()}
    assert len(kept) == 2 and kept[annotated["id"]]["notes"] == "Allergic to peanuts"


def test_a_promoted_placeholder_holding_the_owners_notes_is_kept_when_its_card_joins_another(
        library: Library, citadel, cli: CLI):
    placeholder = annotated_placeholder(library, citadel, cli, "bob@example.org", "Allergic to peanuts")
    bob = library.card(first="Robert", last="Roe", phones=[BOB], unique_id="A-1:ABPerson")
    library.card(first="Robert", last="Roe", emails=["bob@example.org"], unique_id="B-2:ABPerson")
    assert cli("sync").code == 0  # two namesakes: one gets a contact, the other the placeholder and its note

    library.books[0].update_card(bob, emails=["bob@example.org"])  # one person on two cards now
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    assert "merged 0" in result.stdout
    assert sorted(c["id"] for c in citadel.contacts() if c["notes"] == "Allergic to peanuts") == [placeholder["id"]]


def test_a_card_without_addresses_whose_contact_the_owner_deleted_is_made_again_then_renamed_not_duplicated(
        library: Library, citadel, cli: CLI):
    card = library.card(first="Jon", last="Smiht", note="lives next door")  # found by its name only
    assert cli("sync").code == 0
    citadel.delete_contact(citadel.contacts()[0]["id"])  # the owner deletes it in the CRM
    assert cli("sync").code == 0  # made again, as for any card whose contact was deleted
    (again,) = citadel.contacts()

    library.books[0].update_card(card, first="John", last="Smith")
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    assert [(c["id"], c["firstName"], c["lastName"]) for c in citadel.contacts()] == [(again["id"], "John", "Smith")]


def test_facetime_and_callkit_calls_are_included_and_direction_comes_from_originated(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE], emails=["jane@example.com"])
    library.call(JANE, answered=True, duration=120, at=ago(hours=6))  # phone, answered
    library.call(JANE, answered=False, duration=0, at=ago(hours=5))  # missed
    library.call(JANE, originated=True, answered=False, duration=0, at=ago(hours=4))  # outgoing, not connected
    library.call(JANE, originated=True, answered=False, duration=42, call_type=16,
                 service_provider="com.apple.FaceTime", at=ago(hours=3))
    library.call("jane@example.com", answered=True, duration=5, call_type=8, service_provider="com.apple.FaceTime",
                 at=ago(hours=2))
    library.call(JANE, originated=True, duration=9, call_type=0, service_provider="net.whatsapp.WhatsApp",
                 at=ago(hours=1))

    assert cli("sync").code == 0

    jane = names(citadel)["Jane Doe"]
    calls = Counter((i["type"], i["durationSeconds"]) for i in citadel.interactions(jane["id"]))
    assert calls == Counter([("CALL_INBOUND", 120), ("CALL_MISSED", None), ("CALL_OUTBOUND", None),
                             ("CALL_OUTBOUND", 42), ("CALL_INBOUND", 5), ("CALL_OUTBOUND", 9)])


def test_a_group_message_read_again_behind_a_send_under_way_reaches_no_one_added_to_the_group_since(
        library: Library, citadel, cli: CLI):
    dan = "+15145550144"
    for first, last, phone in (("Jane", "Doe", JANE), ("Bob", "Roe", BOB), ("Carol", "Poe", CAROL), ("Dan", "Moe", dan)):
        library.card(first=first, last=last, phones=[phone])
    sending = library.text(dan, from_me=True, at=ago(seconds=30), is_sent=0)  # the mark waits just before it
    library.group_text([JANE, BOB], at=ago(seconds=20))  # queued for the members of the time
    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_OUTBOUND": 1}

    library.join_group([JANE, BOB], CAROL)
    library.chat.finish_sending(sending)
    assert cli("sync").code == 0

    assert kinds(citadel, "Dan Moe") == {"TEXT_OUTBOUND": 1}
    assert kinds(citadel, "Carol Poe") == Counter()


def test_a_group_message_read_again_behind_a_days_run_reaches_no_one_added_to_the_group_since(
        library: Library, citadel, cli: CLI):
    dan = "+15145550144"
    for first, last, phone in (("Jane", "Doe", JANE), ("Carol", "Poe", CAROL), ("Dan", "Moe", dan)):
        library.card(first=first, last=last, phones=[phone])
    library.text(dan, at=ago(days=10))
    assert cli("sync").code == 0
    library.text(dan, at=ago(days=5))  # history iCloud delivers late: above the mark, 5 days old
    library.group_text([JANE, BOB], at=ago(minutes=5))
    assert cli("sync", "--days", "1").code == 0  # leaves the late row out, so the mark stays before it

    library.join_group([JANE, BOB], CAROL)
    assert cli("sync").code == 0

    assert kinds(citadel, "Dan Moe") == {"TEXT_INBOUND": 2}
    assert kinds(citadel, "Jane Doe") == {"TEXT_OUTBOUND": 1}
    assert kinds(citadel, "Carol Poe") == Counter()


def test_someone_added_to_a_group_while_a_long_read_runs_gets_the_groups_texts_written_after_it(
        library: Library, citadel, cli: CLI, home):
    """Messages adds Carol (a number it never had) to a group between two batches of a read, and the owner
    texts the group: that text reaches her, though the read's maps of members predate her joining."""
    for first, last, phone in (("Jane", "Doe", JANE), ("Bob", "Roe", BOB), ("Carol", "Poe", CAROL)):
        library.card(first=first, last=last, phones=[phone])
    for hours in (3, 2, 1):
        library.group_text([JANE, BOB], at=ago(hours=hours))
    settings = Settings(messages_db=library.messages_db, calls_db=library.calls_db, batch_size=2,
                        addressbook_dir=library.addressbook_dir,
                        state_dir=home / "Library" / "Application Support" / "crm-syncd")  # the CLI's, below
    engine = Engine(settings, Store(settings.state_db), None)  # type: ignore[arg-type]

    def meanwhile(rows: int) -> None:
        if not library.chat.conn.execute("SELECT 1 FROM handle WHERE id = ?", (CAROL,)).fetchone():
            library.join_group([JANE, BOB], CAROL)
            library.group_text([JANE, BOB], at=ago(minutes=1))

    assert engine.extract("messages", progress=meanwhile).added == 2 * 4 + 1
    engine.store.close()
    assert cli("sync").code == 0  # delivers what the read queued

    assert kinds(citadel, "Jane Doe") == kinds(citadel, "Bob Roe") == {"TEXT_OUTBOUND": 4}
    assert kinds(citadel, "Carol Poe") == {"TEXT_OUTBOUND": 1}


def test_a_text_from_a_number_stored_without_its_country_code_is_read_in_the_country_messages_recorded(
        library: Library, citadel, cli: CLI):
    library.card(first="Harriet", last="Jones", phones=["+44 7700 900123"])
    library.text("07700900123", service="SMS", at=ago(days=1))
    library.chat.conn.execute("UPDATE handle SET country = 'gb' WHERE id = '07700900123'")
    library.chat.commit()
    library.call("07700900123", iso_country="gb", answered=True, duration=30, at=ago(days=1))

    assert cli("sync").code == 0

    assert kinds(citadel, "Harriet Jones") == {"CALL_INBOUND": 1, "TEXT_INBOUND": 1}


def test_a_group_facetime_whose_address_names_one_party_reaches_every_participant_once(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.call(JANE, answered=True, duration=300, call_type=16, service_provider="com.apple.FaceTime",
                 handles=[JANE, BOB, CAROL], at=ago(hours=2))

    assert cli("sync").code == 0
    again = cli("sync", "--full")

    assert again.code == 0, again.output
    assert kinds(citadel, "Jane Doe") == {"CALL_INBOUND": 1}
    assert kinds(citadel, "Unknown (+1-902-555-0122)") == {"CALL_INBOUND": 1}
    assert kinds(citadel, "Unknown (+1-416-555-0133)") == {"CALL_INBOUND": 1}


def test_a_group_facetime_whose_address_is_typed_otherwise_than_its_handles_reaches_each_party_once(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.call("(613) 555-0111", answered=True, duration=120, call_type=16, service_provider="com.apple.FaceTime",
                 handles=[JANE, BOB], at=ago(hours=2))

    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"CALL_INBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"CALL_INBOUND": 1}


def test_calls_of_the_newer_call_history_model_group_and_single_arrive(home, citadel):
    lib = Library.create(home, calls_version="sequoia")
    try:
        lib.card(first="Jane", last="Doe", phones=[JANE])
        lib.card(first="Bob", last="Roe", phones=[BOB])
        lib.call(JANE, originated=True, duration=0, at=ago(days=2))
        lib.call(None, answered=True, duration=61, call_type=8, service_provider="com.apple.FaceTime",
                 handles=[JANE, BOB], at=ago(days=1))
        lib.call(BOB, at=ago(hours=1))
        result = CLI(clean_env(home, CRM_SYNCD_API_URL=citadel.url))("sync")
    finally:
        lib.close()

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"CALL_OUTBOUND": 1, "CALL_INBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"CALL_INBOUND": 1, "CALL_MISSED": 1}


def test_old_seconds_format_dates_are_converted(home, citadel):
    lib = Library.create(home, chat_version="el-capitan")
    try:
        lib.card(first="Jane", last="Doe", phones=[JANE])
        moment = ago(days=10).replace(microsecond=0)
        lib.text(JANE, at=moment)
        result = CLI(clean_env(home, CRM_SYNCD_API_URL=citadel.url))("sync")
    finally:
        lib.close()

    assert result.code == 0, result.output
    (row,) = citadel.interactions()
    assert row["occurredAt"] == moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def test_rows_still_only_in_the_wal_are_read_while_apple_holds_the_database(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    wal = library.messages_db.with_name("chat.db-wal")
    assert wal.stat().st_size > 0
    with sqlite3.connect(library.messages_db) as probe:  # the main file alone has no messages yet
        assert probe.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}


def test_unknown_numbers_get_one_placeholder_and_known_only_holds_them(library: Library, citadel, cli: CLI):
    library.text("+19055551234")
    library.text("+19055551234", from_me=True)

    held = cli("sync", "--known-only")
    assert held.code == 0, held.output
    assert citadel.contacts() == [] and "held 2 (unknown contact 2)" in held.stdout

    created = cli("sync")
    assert created.code == 0, created.output
    (placeholder,) = citadel.contacts()
    assert (placeholder["firstName"], placeholder["lastName"]) == ("Unknown", "(+1-905-555-1234)")
    assert placeholder["phone"] == "+19055551234"
    assert placeholder["notes"] == "Auto-created by crm-syncd - needs review"
    assert "Placeholders" in created.stdout and "Unknown (+1•••••••1234)" in created.stdout  # masked
    assert len(citadel.interactions(placeholder["id"])) == 2


def test_a_call_the_phone_screened_out_makes_no_placeholder_and_waits_for_its_number_on_a_card(
        library: Library, citadel, cli: CLI):
    spam, blocked_friend = "+19055551234", "+19055556789"
    library.call(spam, filtered_out_reason=1)
    library.call(blocked_friend, filtered_out_reason=2, unique_id="SILENCED")

    held = cli("sync")
    assert held.code == 0, held.output
    assert citadel.contacts() == [] and citadel.interactions() == []
    assert "held 2 (screened call (blocked or silenced) from a number without a contact 2)" in held.stdout

    library.card(first="Jane", last="Doe", phones=[blocked_friend])
    assert cli("sync").code == 0
    assert [c["firstName"] for c in citadel.contacts()] == ["Jane"]
    assert kinds(citadel, "Jane Doe") == {"CALL_MISSED": 1}
    assert cli("sync", "--full").code == 0
    assert [c["firstName"] for c in citadel.contacts()] == ["Jane"] and len(citadel.interactions()) == 1


def test_a_screened_call_from_someone_on_a_card_or_with_a_placeholder_is_delivered_as_missed(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.call(JANE, filtered_out_reason=1)
    library.text(BOB, at=ago(minutes=5))  # Bob wrote first: his number gets a placeholder
    library.call(BOB, filtered_out_reason=1)

    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"CALL_MISSED": 1}
    (placeholder,) = [c for c in citadel.contacts() if c["firstName"] == "Unknown"]
    assert Counter(i["type"] for i in citadel.interactions(placeholder["id"])) == {"TEXT_INBOUND": 1, "CALL_MISSED": 1}


@pytest.mark.parametrize("no_placeholders", [["--known-only"], ["CRM_SYNCD_CREATE_UNKNOWN_CONTACTS=false"]])
def test_without_placeholders_a_handle_messages_groups_with_a_card_s_number_still_reaches_that_contact(
        library: Library, citadel, cli: CLI, no_placeholders):
    """Only unknown people's interactions are held: Jane's Apple ID email, which Messages groups with the
    number on her card, is Jane's."""
    flags = [a for a in no_placeholders if a.startswith("--")]
    cli.env.update(a.split("=") for a in no_placeholders if "=" in a)
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3), person="p-jane")
    library.text("jane.doe@icloud.com", at=ago(hours=2), person="p-jane")
    library.text("+19055551234", at=ago(hours=1))

    result = cli("sync", *flags)

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2}, result.stdout
    assert list(names(citadel)) == ["Jane Doe"] and "held 1 (unknown contact 1)" in result.stdout

@pytest.mark.parametrize("no_placeholders", [["--known-only"], ["CRM_SYNCD_CREATE_UNKNOWN_CONTACTS=false"]])
@pytest.mark.parametrize("only", [[], ["--interactions-only"]])
def test_without_placeholders_held_interactions_go_to_a_contact_the_owner_makes_in_the_crm_for_their_number(
        library: Library, citadel, cli: CLI, no_placeholders, only):
    """No card, no placeholder: the texts wait until a contact holds the number, one the owner typed in the
    CRM (in any format) too."""
    flags = [a for a in no_placeholders if a.startswith("--")]
    cli.env.update(a.split("=") for a in no_placeholders if "=" in a)
    library.text("+19055551234", at=ago(hours=2))
    library.text("+19055551234", from_me=True, at=ago(hours=1))
    held = cli("sync", *flags)
    assert held.code == 0 and "held 2 (unknown contact 2)" in held.stdout, held.output

    joe = citadel.add_contact(firstName="Joe", lastName="Pipes", phone="(905) 555-1234")
    delivered = cli("sync", *flags, *only)

    assert delivered.code == 0 and "held 0" in delivered.stdout, delivered.output
    assert [c["id"] for c in citadel.contacts()] == [joe]
    assert kinds(citadel, "Joe Pipes") == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}


def test_without_placeholders_held_texts_go_to_the_lowest_id_of_the_crm_contacts_holding_the_number(
        library: Library, citadel, cli: CLI):
    """No placeholder of this Mac's: another Mac's placeholder for the number holds it, and so does a contact
    the owner made for it later; the text goes to the first, as the contacts pass maps it."""
    placeholder = citadel.add_contact(**placeholder_fields("+19055551234"))
    citadel.add_contact(firstName="Joe", lastName="Pipes", phone="(905) 555-1234")
    library.text("+19055551234", at=ago(hours=1))

    result = cli("sync", "--known-only")

    assert result.code == 0 and "held 0" in result.stdout, result.output
    assert [i["type"] for i in citadel.interactions(placeholder)] == ["TEXT_INBOUND"]


def test_an_unknown_email_the_crm_refuses_gets_no_placeholder_its_texts_fail_and_sync_says_so(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    library.text("josé@example.com", at=ago(hours=1))  # Citadel (Zod) refuses a non-ASCII address

    dry = cli("sync", "--dry-run")
    real = cli("sync")

    assert real.code == dry.code == 1, (real.output, dry.output)
    assert "refused 1" in real.stdout and "email: Invalid email" in real.stdout and "✓ done" not in real.stdout
    assert "Placeholders  would create 0 · refused 1" in dry.stdout
    assert "held 0 · failed 1" in real.stdout and "held 0 · failed 1" in dry.stdout
    assert list(names(citadel)) == ["Jane Doe"] and kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}
    assert "josé" not in real.output  # masked


def test_a_number_the_owner_typed_into_the_crm_in_another_format_gets_that_contact_not_a_placeholder(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync").code == 0
    citadel.add_contact(firstName="Sam", lastName="Poe", phone="(905) 555-1234")  # Citadel's search misses it
    library.text("+19055551234")

    result = cli("sync", "--interactions-only")  # as the daemon does while the address book is unchanged

    assert result.code == 0, result.output
    assert sorted(names(citadel)) == ["Jane Doe", "Sam Poe"]
    assert kinds(citadel, "Sam Poe") == {"TEXT_INBOUND": 1}


@pytest.mark.parametrize("taker", ["a new card", "a card with a contact of its own"])
def test_a_number_moved_off_a_person_whose_contact_the_owner_made_moves_alone(
        library: Library, citadel, cli: CLI, taker):
    alice_id = citadel.add_contact(firstName="Alice", lastName="Ames", phone=JANE)  # the owner's own
    alice = library.card(first="Alice", last="Ames", phones=[JANE], unique_id="A-ALICE:ABPerson")
    bob = library.card(first="Bob", last="Roe", phones=[BOB], unique_id="B-BOB:ABPerson") if taker != "a new card" else None
    library.text(JANE, at=ago(days=3))
    assert cli("sync").code == 0

    library.books[0].update_card(alice, phones=[CAROL])  # Alice's new number; her old one is Bob's now
    if bob is None:
        library.card(first="Bob", last="Roe", phones=[JANE], unique_id="B-BOB:ABPerson")
    else:
        library.books[0].update_card(bob, phones=[BOB, JANE])
    library.books[0].commit()
    library.text(JANE, at=ago(hours=1))
    result = cli("sync")

    assert result.code == 0, result.output
    assert len(citadel.interactions(alice_id)) == 1 and kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1}
    assert "duplicate" not in result.output.lower()


def test_handles_messages_groups_share_one_placeholder_even_when_one_of_them_has_no_message_read(
        library: Library, citadel, cli: CLI):
    """Ann's number texted three weeks ago, her email yesterday; her number called today. A `--days 7`
    run reads no text of the number: Messages' grouping still gives the call and the email's text one
    placeholder, which the later `--full` keeps."""
    library.text("+19055551234", at=ago(days=20), person="p-ann")
    library.text("ann@example.org", at=ago(days=1), person="p-ann")
    library.call("+19055551234", answered=True, duration=30, at=ago(hours=2))

    assert cli("sync", "--days", "7").code == 0 and cli("sync", "--full").code == 0

    assert sorted(names(citadel)) == ["Unknown (+1-905-555-1234)"]
    assert len(citadel.interactions()) == 3


def test_handles_messages_grouped_share_one_placeholder_which_a_card_with_either_of_them_promotes(
        library: Library, citadel, cli: CLI):
    library.text("+19055551234", person="person-7", at=ago(days=2))
    library.text("sam@example.org", person="person-7", at=ago(days=1))
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()  # holds the number only: the CRM keeps one phone and one email

    library.card(first="Sam", last="Stone", emails=["sam@example.org"])
    assert cli("sync").code == 0

    assert [(c["id"], c["firstName"]) for c in citadel.contacts()] == [(placeholder["id"], "Sam")]
    assert kinds(citadel, "Sam Stone") == {"TEXT_INBOUND": 2}


SAM_NUMBER, SAM_EMAIL = "+19055551234", "sam@example.org"


def _split_as_an_older_version_left_it(library: Library, citadel, cli: CLI, home: Path) -> tuple[dict, int]:
    """A placeholder made for a number and an email Messages groups, holding both texts; then, as crm-syncd
    before store v5 did when a card got the email, the card's own contact made and the email moved to it,
    the number left on the placeholder (with Messages' grouping known). Returns the placeholder and the
    card's z_pk."""
    library.text(SAM_NUMBER, person="person-7", at=ago(days=3))
    library.text(SAM_EMAIL, person="person-7", at=ago(days=2))
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    pk = library.card(first="Sam", last="Stone", emails=[SAM_EMAIL])
    with sqlite3.connect(home / "Library" / "Application Support" / "crm-syncd" / "state.db") as state:
        hints = state.execute("SELECT address, person FROM hints").fetchall()
        state.execute("DELETE FROM handles WHERE address = ?", (SAM_EMAIL,))
        state.execute("DELETE FROM hints")  # unknown to this pass: it makes the card's contact apart
    assert cli("sync", "--contacts-only").code == 0
    with sqlite3.connect(home / "Library" / "Application Support" / "crm-syncd" / "state.db") as state:
        state.executemany("INSERT INTO hints (address, person) VALUES (?, ?)", hints)
        assert dict(state.execute("SELECT address, origin FROM handles")) == {SAM_NUMBER: "placeholder",
                                                                              SAM_EMAIL: "card"}
    assert sorted(names(citadel)) == ["Sam Stone", "Unknown (+1-905-555-1234)"]
    return placeholder, pk


def test_a_placeholder_an_older_version_left_beside_the_card_of_a_handle_messages_groups_with_it_is_folded_in(
        library: Library, citadel, cli: CLI, home: Path):
    """The placeholder's texts move to the card's contact, once each, and the placeholder goes; later texts
    from the number reach the card's contact, which follows the card's edits."""
    placeholder, pk = _split_as_an_older_version_left_it(library, citadel, cli, home)
    sam = names(citadel)["Sam Stone"]["id"]

    folded = cli("sync")

    assert folded.code == 0, folded.output
    assert [c["id"] for c in citadel.contacts()] == [sam]
    assert len(citadel.interactions(sam)) == 2
    edited = _a_text_from_the_number_and_a_card_edit_reach_sams_contact(library, citadel, cli, pk, sam, texts=3)
    assert "duplicate" not in edited.output.lower()


def _a_text_from_the_number_and_a_card_edit_reach_sams_contact(library: Library, citadel, cli: CLI, card: int,
                                                              sam: int, *, texts: int):
    """A later text from Sam's number and a rename on his card: one contact, renamed, holding every text once
    and the number the folded placeholder had (his card has none)."""
    library.text(SAM_NUMBER, at=ago(minutes=5))
    library.books[0].update_card(card, first="Samuel")
    library.books[0].commit()
    edited = cli("sync")
    assert edited.code == 0 and "owner_edit_kept" not in edited.stderr, edited.output
    assert [(c["id"], c["firstName"], c["phone"], c["email"]) for c in citadel.contacts()] == [
        (sam, "Samuel", SAM_NUMBER, SAM_EMAIL)]
    got = Counter(i["occurredAt"] for i in citadel.interactions())
    assert sum(got.values()) == texts and set(got.values()) == {1}, got
    return edited


def test_a_placeholder_the_owner_filled_in_beside_the_card_of_a_handle_messages_groups_with_it_stays_reported(
        library: Library, citadel, cli: CLI, home: Path):
    placeholder, _ = _split_as_an_older_version_left_it(library, citadel, cli, home)
    citadel.update_contact(placeholder["id"], organization="Acme Plumbing")  # the owner's work: never deleted

    result = cli("sync")

    assert result.code == 0, result.output
    assert sorted(names(citadel)) == ["Sam Stone", "Unknown (+1-905-555-1234)"]
    assert f"CRM contact {placeholder['id']} looks like {names(citadel)['Sam Stone']['id']}" in result.output
    assert len(citadel.interactions(placeholder["id"])) == 2 and len(citadel.interactions()) == 2


def test_a_placeholder_of_a_handle_messages_groups_with_two_peoples_addresses_is_neither_ones(
        library: Library, citadel, cli: CLI, home: Path):
    """Messages' grouping ties the number to Sam's email and to Ann's number alike: the placeholder stays."""
    placeholder, _ = _split_as_an_older_version_left_it(library, citadel, cli, home)
    library.card(first="Ann", last="Lee", phones=[BOB])
    library.text(BOB, person="person-7", at=ago(days=1))
    with sqlite3.connect(home / "Library" / "Application Support" / "crm-syncd" / "state.db") as state:
        state.execute("INSERT INTO hints (address, person) VALUES (?, 'person-7')", (BOB,))  # known already

    assert cli("sync").code == 0 and cli("sync").code == 0

    assert sorted(names(citadel)) == ["Ann Lee", "Sam Stone", "Unknown (+1-905-555-1234)"]
    assert len(citadel.interactions(placeholder["id"])) == 2


def test_a_placeholder_of_a_number_messages_groups_later_with_a_cards_email_is_folded_into_its_contact(
        library: Library, citadel, cli: CLI):
    """The number got its placeholder, the email a card, before Messages took them for one person: the
    sync that learns it folds the placeholder into the card's contact, where the number's texts go on."""
    library.text(SAM_NUMBER, at=ago(days=3))
    assert cli("sync").code == 0
    pk = library.card(first="Sam", last="Stone", emails=[SAM_EMAIL])
    library.text(SAM_EMAIL, at=ago(days=2))
    assert cli("sync").code == 0
    assert sorted(names(citadel)) == ["Sam Stone", "Unknown (+1-905-555-1234)"]
    sam = names(citadel)["Sam Stone"]["id"]

    library.chat.conn.execute("UPDATE handle SET person_centric_id = 'person-7' WHERE id IN (?, ?)",
                              (SAM_NUMBER, SAM_EMAIL))  # Messages now takes them for one person
    library.chat.commit()
    library.text(SAM_NUMBER, at=ago(hours=1))
    grouped = cli("sync")

    assert grouped.code == 0, grouped.output
    assert [c["id"] for c in citadel.contacts()] == [sam]
    assert len(citadel.interactions(sam)) == 3
    _a_text_from_the_number_and_a_card_edit_reach_sams_contact(library, citadel, cli, pk, sam, texts=4)


def test_one_contact_the_owner_made_serves_a_person_on_two_unlinked_cards_holding_its_phone_and_its_email(
        library: Library, citadel, cli: CLI):
    kept = citadel.add_contact(firstName="Jane", lastName="Doe", phone=JANE, email="jane@work.example")
    library.card(first="Jane", last="Doe", phones=[JANE], unique_id="A-1:ABPerson")
    library.card(source=1, first="Jane", last="Doe", emails=["jane@work.example"], unique_id="B-2:ABPerson")
    library.text(JANE, at=ago(days=2))
    library.text("jane@work.example", at=ago(days=1))

    first, again = cli("sync"), cli("sync")

    assert (first.code, again.code) == (0, 0), first.output
    assert [c["id"] for c in citadel.contacts()] == [kept]
    assert len(citadel.interactions(kept)) == 2

def test_a_contact_the_owner_makes_by_hand_beside_a_placeholder_is_a_second_one_until_a_card_joins_them(
        library: Library, citadel, cli: CLI):
    """What the README tells the owner: to name an unknown person, rename the placeholder or add a card;
    a contact typed in the CRM for them stands beside the placeholder, which keeps their texts."""
    library.text("+19055551234", at=ago(hours=2))
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    joe = citadel.add_contact(firstName="Joe", lastName="Pipes", phone="(905) 555-1234")
    library.text("+19055551234", at=ago(hours=1))
    assert cli("sync").code == 0
    assert [c["id"] for c in citadel.contacts()] == [placeholder["id"], joe]
    assert len(citadel.interactions(placeholder["id"])) == 2 and citadel.interactions(joe) == []

    library.card(first="Joe", last="Pipes", phones=["905-555-1234"])
    assert cli("sync").code == 0
    assert [c["id"] for c in citadel.contacts()] == [joe]  # the owner's survives; the placeholder folds in
    assert len(citadel.interactions(joe)) == 2


@pytest.mark.parametrize("found", ["the owner's own", "a placeholder the owner renamed"])
def test_a_contact_found_for_a_card_stays_that_persons_after_their_number_changes(
        library: Library, citadel, cli: CLI, found):
    if found == "the owner's own":
        kept = citadel.add_contact(firstName="Robert", lastName="Roe", phone="(902) 555-0122")
    else:
        library.text(BOB, at=ago(days=3))
        assert cli("sync").code == 0
        (placeholder,) = citadel.contacts()
        kept = placeholder["id"]
        citadel.update_contact(kept, firstName="Robert", lastName="Roe (plumber)")
    bob = library.card(first="Bob", last="Roe", phones=[BOB])
    library.text(BOB, at=ago(days=2))
    assert cli("sync").code == 0
    assert [c["id"] for c in citadel.contacts()] == [kept]

    library.books[0].update_card(bob, phones=[CAROL])  # Bob's new number
    library.books[0].commit()
    library.text(CAROL, at=ago(hours=1))
    assert cli("sync").code == 0

    assert [c["id"] for c in citadel.contacts()] == [kept]
    assert citadel.contacts()[0]["firstName"] == "Robert"  # found, not made: never written to
    assert len(citadel.interactions(kept)) == (3 if found != "the owner's own" else 2)


def test_a_placeholder_another_mac_made_that_the_owner_filled_in_is_not_deleted_when_a_card_claims_it(
        library: Library, citadel, cli: CLI):
    bob = library.card(first="Bob", last="Roe", phones=[BOB])
    assert cli("sync", "--contacts-only").code == 0
    made = citadel.add_contact(**placeholder_fields("bob@example.org"))  # another Mac's, meanwhile
    library.text("bob@example.org", at=ago(days=2))
    assert cli("sync", "--interactions-only").code == 0  # adopted, not made again
    citadel.update_contact(made, organization="Acme")

    library.books[0].update_card(bob, emails=["bob@example.org"])
    library.books[0].commit()

    assert cli("sync").code == 0
    assert made in [c["id"] for c in citadel.contacts()]


@pytest.mark.parametrize("made, filled", [("placeholder", {"location": "Halifax"}),
                                          ("placeholder", {"organization": "Acme"}),  # never written to one
                                          ("card", {"location": "Halifax"})])
def test_a_contact_crm_syncd_made_that_the_owner_filled_in_is_not_deleted_when_it_turns_out_a_duplicate(
        library: Library, citadel, cli: CLI, made, filled):
    bob = library.card(first="Bob", last="Roe", phones=[BOB], unique_id="A-1:ABPerson")
    if made == "placeholder":
        library.text("bob@example.org", at=ago(days=2))  # an email no card has yet
    else:
        library.card(source=1, first="Bob", last="Roe", emails=["bob@example.org"], unique_id="B-2:ABPerson")
    assert cli("sync").code == 0
    [other] = [c for c in citadel.contacts() if c["email"] == "bob@example.org"]
    citadel.update_contact(other["id"], **filled)  # a field crm-syncd did not write to it

    library.books[0].update_card(bob, emails=["bob@example.org"])  # the two are one person now
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    assert other["id"] in [c["id"] for c in citadel.contacts()]
    assert "duplicate" in result.output.lower()


def test_a_promoted_placeholder_keeps_what_the_owner_wrote_in_its_notes(library: Library, citadel, cli: CLI):
    placeholder = annotated_placeholder(library, citadel, cli, "+19055551234", "The plumber: fixed the sink")

    library.card(first="Joe", last="Pipes", phones=["905-555-1234"], note="Call before 9")
    assert cli("sync").code == 0
    assert cli("sync").code == 0  # a later sync leaves them too

    (joe,) = citadel.contacts()
    assert (joe["id"], joe["firstName"]) == (placeholder["id"], "Joe")
    assert joe["notes"] == "The plumber: fixed the sink\nCall before 9"


def test_a_placeholder_promoted_by_a_card_without_its_number_keeps_it_and_follows_the_cards_later_edits(
        library: Library, citadel, cli: CLI):
    library.text("+19055551234", person="person-7", at=ago(days=2))
    library.text("sam@example.org", person="person-7", at=ago(days=1))
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    pk = library.card(first="Sam", last="Stone", emails=["sam@example.org"])  # no number: the contact keeps its own
    assert cli("sync").code == 0
    assert [(c["firstName"], c["phone"]) for c in citadel.contacts()] == [("Sam", "+19055551234")]

    library.books[0].update_card(pk, first="Samuel")  # nobody touched the contact in the CRM
    library.books[0].commit()
    renamed = cli("sync")

    assert renamed.code == 0 and "owner_edit_kept" not in renamed.stderr, renamed.output
    assert "updated 1" in renamed.stdout
    assert [(c["id"], c["firstName"], c["phone"]) for c in citadel.contacts()] == [
        (placeholder["id"], "Samuel", "+19055551234")]

    library.books[0].update_card(pk, phones=[BOB])  # the card gains a number: it is the card's to send
    library.books[0].commit()
    assert cli("sync").code == 0
    assert [(c["firstName"], c["phone"], c["email"]) for c in citadel.contacts()] == [
        ("Samuel", BOB, "sam@example.org")]
    assert kinds(citadel, "Samuel Stone") == {"TEXT_INBOUND": 2}
    assert "updated 0" in cli("sync").stdout


def test_a_promoted_placeholder_with_the_owners_notes_follows_card_edits_keeping_those_notes_in_front(
        library: Library, citadel, cli: CLI):
    placeholder = annotated_placeholder(library, citadel, cli, "+19055551234", "The plumber: fixed the sink")
    pk = library.card(first="Joe", last="Pipes", phones=["905-555-1234"], note="Call before 9")
    assert cli("sync").code == 0

    library.books[0].update_card(pk, first="Joseph", note="Call before 10")
    library.books[0].commit()
    edited = cli("sync")

    assert edited.code == 0 and "owner_edit_kept" not in edited.stderr, edited.output
    (joe,) = citadel.contacts()
    assert (joe["id"], joe["firstName"]) == (placeholder["id"], "Joseph")
    assert joe["notes"] == "The plumber: fixed the sink\nCall before 10"

    library.books[0].update_card(pk, note=None)  # the card's note goes; the owner's stays
    library.books[0].commit()
    assert cli("sync").code == 0
    assert citadel.contacts()[0]["notes"] == "The plumber: fixed the sink"

    citadel.update_contact(placeholder["id"], lastName="Pipes (plumber)")  # the owner's edit in the CRM still wins
    library.books[0].update_card(pk, first="Joe")
    library.books[0].commit()
    kept = cli("sync")
    assert kept.code == 0 and "contacts.owner_edit_kept" in kept.stderr
    assert [(c["firstName"], c["lastName"]) for c in citadel.contacts()] == [("Joseph", "Pipes (plumber)")]

def test_a_promoted_placeholder_keeps_the_fields_the_owner_filled_in_and_follows_its_cards_other_edits(
        library: Library, citadel, cli: CLI):
    """The owner gives a stranger's placeholder a company, a title, an email and a location, then adds him to
    Contacts on a card with none of them: the card renames it in place and they stay. They are the owner's:
    no later card edit overwrites them (while they hold something), and every other card edit (the name, the
    number, the note) still reaches the contact."""
    library.text("+19055551234", at=ago(days=1))
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    filled = {"organization": "Pipes & Co", "title": "Plumber", "email": "joe@pipes.example", "location": "Ottawa"}
    citadel.update_contact(placeholder["id"], **filled)

    pk = library.card(first="Joe", last="Pipes", phones=["905-555-1234"], note="Call before 9")
    promoted = cli("sync")

    assert promoted.code == 0 and "promoted 1" in promoted.stdout, promoted.output
    (joe,) = citadel.contacts()
    assert (joe["id"], joe["firstName"], joe["lastName"], joe["phone"], joe["notes"]) == (
        placeholder["id"], "Joe", "Pipes", "+19055551234", "Call before 9")
    assert {k: joe[k] for k in filled} == filled

    library.books[0].update_card(pk, first="Joseph", organization="Acme", phones=["905-555-9999"],
                                 emails=["joseph@home.example"], note="Call after 9")
    library.books[0].commit()
    edited = cli("sync")

    assert edited.code == 0 and "contacts.owner_edit_kept" not in edited.stderr, edited.output
    (joe,) = citadel.contacts()
    assert (joe["firstName"], joe["phone"], joe["notes"]) == ("Joseph", "+19055559999", "Call after 9")
    assert {k: joe[k] for k in filled} == filled

    citadel.update_contact(joe["id"], title=None)  # the owner empties one: the card's may fill it
    library.books[0].update_card(pk, job_title="Master plumber", organization="Acme Pipes")
    library.books[0].commit()
    assert cli("sync").code == 0
    (joe,) = citadel.contacts()
    assert (joe["title"], joe["organization"], joe["email"]) == ("Master plumber", "Pipes & Co", "joe@pipes.example")
    assert kinds(citadel, "Joseph Pipes") == {"TEXT_INBOUND": 1}


def another_mac_delivered(citadel, address: str, at) -> int:
    """What crm-syncd on another Mac of the owner's leaves: a placeholder, and the message delivered to it."""
    contact = citadel.add_contact(**placeholder_fields(address))
    moment = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    answer = httpx.post(f"{citadel.url}/api/contacts/{contact}/interactions",
                        json={"type": "TEXT_INBOUND", "occurredAt": moment, "source": "IMPORT_IOS"})
    assert answer.status_code == 201
    return contact


def test_a_placeholder_another_mac_made_and_delivered_to_is_checked_before_sending(library: Library, citadel, cli: CLI):
    assert cli("sync", "--contacts-only").code == 0
    at = ago(days=1)
    library.text(CAROL, at=at)
    another_mac_delivered(citadel, CAROL, at)

    assert cli("sync", "--interactions-only").code == 0

    assert len(citadel.contacts()) == 1
    assert len(citadel.interactions_of(CAROL)) == 1


def test_a_placeholder_another_mac_delivered_to_then_named_by_a_card_is_checked_before_sending(
        library: Library, citadel, cli: CLI):
    at = ago(days=1)
    library.text(CAROL, at=at)
    another_mac_delivered(citadel, CAROL, at)
    library.card(first="Carol", last="Chen", phones=[CAROL])

    assert cli("sync").code == 0

    assert [c["firstName"] for c in citadel.contacts()] == ["Carol"]
    assert len(citadel.interactions_of(CAROL)) == 1


def test_a_contact_found_to_need_no_look_up_is_looked_at_again_once_another_mac_may_deliver_to_it(
        library: Library, citadel, cli: CLI, home):
    """The owner installs crm-syncd on a second Mac: it delivers the messages both Macs receive. This Mac
    decided long ago that its contact for Jane needed no look-up before sends; after an hour it asks again."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=2))
    assert cli("sync").code == 0
    at = ago(hours=1)
    library.text(JANE, at=at)  # arrives on both Macs; the other one delivers it first
    (jane,) = citadel.contacts()
    moment = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    assert httpx.post(f"{citadel.url}/api/contacts/{jane['id']}/interactions",
                      json={"type": "TEXT_INBOUND", "occurredAt": moment, "source": "IMPORT_IOS"}).status_code == 201
    state = sqlite3.connect(home / "Library" / "Application Support" / "crm-syncd" / "state.db")
    with state:  # that decision is two hours old
        assert state.execute("UPDATE contacts SET dedupe_ms = dedupe_ms - 7200000 WHERE dedupe = 0").rowcount == 1
    state.close()

    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2}


def test_create_unknown_contacts_false_holds_unknown_people(library: Library, citadel, cli: CLI):
    library.text("someone@example.org")
    cli.env["CRM_SYNCD_CREATE_UNKNOWN_CONTACTS"] = "false"

    assert cli("sync").code == 0

    assert citadel.contacts() == []


def test_dry_run_writes_nothing_anywhere_and_says_what_it_would_create(library: Library, citadel, cli: CLI, home):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    library.text("+19055551234")

    result = cli("sync", "--dry-run")

    assert result.code == 0, result.output
    assert citadel.contacts() == [] and citadel.interactions() == []
    assert "Jane Doe" in result.stdout and "Unknown (+1•••••••1234)" in result.stdout  # masked
    assert not (home / "Library" / "Application Support" / "crm-syncd").exists()


def test_dry_run_says_what_it_would_sync_not_that_it_synced(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    library.call(JANE, originated=True, duration=30, at=ago(hours=2))

    result = cli("sync", "--dry-run")

    assert result.code == 0 and citadel.interactions() == []
    assert "Messages  would sync 1 ·" in result.stdout and "Calls  would sync 1 ·" in result.stdout, result.stdout
    assert "synced" not in result.stdout


def test_dry_run_with_the_crm_down_does_not_say_anything_stays_queued(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    citadel.go_down()

    result = cli("sync", "--dry-run")

    assert result.code == 1 and "dry run: nothing was written" in result.stdout
    assert "CRM unreachable" in result.stdout and "queued" not in result.stdout, result.stdout


def test_dry_run_leaves_a_state_database_from_an_older_crm_syncd_as_it_was(library: Library, citadel, cli: CLI, home):
    """Not even migrated: an older daemon may still be running on it."""
    state = home / "Library" / "Application Support" / "crm-syncd"
    state.mkdir(parents=True)
    state_db_at(state / "state.db", 3).close()
    before = (state / "state.db").read_bytes()
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)

    result = cli("sync", "--dry-run")

    assert result.code == 0, result.output
    assert "Jane Doe" in result.stdout
    assert sorted(p.name for p in state.iterdir()) == ["state.db"]
    assert (state / "state.db").read_bytes() == before


def test_apple_databases_are_byte_identical_afterwards(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    library.call(JANE, answered=True, duration=3)
    before = library.snapshot()

    assert cli("sync").code == 0

    assert library.snapshot() == before


def test_status_after_a_sync_says_when_contacts_were_synced_as_it_does_for_messages_and_calls(
        library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    assert cli("sync").code == 0

    sources = json.loads(cli("status", "--json").stdout)["sources"]

    assert sources["contacts"]["last_sync_at"] is not None, sources
    contacts_line = next(line for line in cli("status").stdout.splitlines() if line.startswith("contacts"))
    assert "never" not in contacts_line


def test_contacts_only_and_interactions_only(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)

    assert cli("sync", "--contacts-only").code == 0
    assert list(names(citadel)) == ["Jane Doe"] and citadel.interactions() == []

    assert cli("sync", "--interactions-only").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}


def test_days_limits_the_window_of_a_first_sync(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=40))
    library.text(JANE, at=ago(days=5))

    assert cli("sync", "--days", "30").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}


def test_a_wider_days_run_after_a_narrow_one_sends_the_older_history_once(library: Library, citadel, cli: CLI):
    """`--days N` reads the last N days whatever an earlier run read: a first `--days 30`, then
    `--days 365`, sends the months between; a daemon or plain sync afterwards sends nothing again."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=400))
    library.text(JANE, at=ago(days=200))
    library.call(JANE, answered=True, duration=40, at=ago(days=100))
    library.text(JANE, at=ago(days=5))
    assert cli("sync", "--days", "30").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}

    result = cli("sync", "--days", "365")

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2, "CALL_INBOUND": 1}, result.stdout
    library.text(JANE, at=ago(hours=1))
    assert cli("sync").code == 0 and cli("sync", "--days", "365").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 3, "CALL_INBOUND": 1}


@pytest.mark.parametrize("first_sync", [True, False])
def test_an_outgoing_message_is_delivered_once_sent_and_never_if_its_send_fails(
        library: Library, citadel, cli: CLI, first_sync: bool):
    """Messages writes an outgoing row before it is sent (is_sent = 0) and updates it afterwards;
    a send that then fails is not an interaction, and nothing read meanwhile is lost."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    if not first_sync:
        library.text(JANE, at=ago(hours=2))
        assert cli("sync").code == 0
    sent = library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=30))
    failed = library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=20))
    library.text(JANE, at=ago(seconds=10))

    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2 - first_sync}

    library.chat.finish_sending(sent)
    library.chat.finish_sending(failed, error=4)
    assert cli("sync").code == 0
    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2 - first_sync, "TEXT_OUTBOUND": 1}


def test_a_first_sync_that_waits_for_a_send_keeps_its_lookback_window(library: Library, citadel, cli: CLI):
    """The mark waits before the unsent row and keeps the first sync's window: the next run reads on
    from there as the first sync would have."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    sending = library.text(JANE, from_me=True, is_sent=0, at=ago(seconds=30))
    library.text(JANE, at=ago(days=3 * 365))  # history iCloud brought in late, beyond the 365-day lookback

    assert cli("sync").code == 0
    library.chat.finish_sending(sending)
    assert cli("sync").code == 0
    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}


@pytest.mark.parametrize("waiting", ["being sent", "send later"])
def test_old_history_delivered_after_a_first_sync_that_waits_for_a_send_arrives(
        library: Library, citadel, cli: CLI, waiting: str, tmp_path):
    """A first sync held by a text still being sent (or a Send Later text) has read every row there was:
    its lookback window is for those rows only. An older conversation iCloud delivers afterwards is new
    history, taken like any row past the mark, before and after the text is sent; the three-year-old row
    the first sync read stays out."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.text(JANE, at=ago(days=2))
    at = ago(minutes=1) if waiting == "being sent" else ago(hours=-30)
    sending = library.text(JANE, from_me=True, is_sent=0, at=at)
    library.text(JANE, at=ago(days=3 * 365))  # beyond the 365-day lookback, read by the first sync
    assert cli("sync").code == 0
    library.text(BOB, at=ago(days=400))  # iCloud brings an older conversation in late
    library.text(BOB, from_me=True, at=ago(days=400, hours=-1))

    waited = cli("sync")
    assert waited.code == 0, waited.output
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}, waited.output
    if waiting == "send later":
        cli.set_clock(tmp_path / "clock-offset", 31 * 3600)  # its time comes
    library.chat.finish_sending(sending)
    assert cli("sync").code == 0
    library.text(BOB, at=ago(days=500))  # and more of it, once the text is sent
    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 2, "TEXT_OUTBOUND": 1}


def test_old_history_read_while_a_text_is_being_sent_is_not_stepped_over_once_it_is_sent(
        library: Library, citadel, cli: CLI):
    """The first sync waits for a text being sent; an old conversation arrives before the next run,
    which still waits; once the text is sent, the run that moves the mark past that history sends it."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.text(JANE, at=ago(days=2))
    sending = library.text(JANE, from_me=True, is_sent=0, at=ago(minutes=1))
    assert cli("sync").code == 0
    library.text(BOB, at=ago(days=400))
    assert cli("sync").code == 0
    library.chat.finish_sending(sending)

    sent = cli("sync")
    assert cli("sync").code == 0

    assert sent.code == 0, sent.output
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1}, sent.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1, "TEXT_OUTBOUND": 1}


def test_old_calls_delivered_after_a_first_sync_held_by_a_call_ahead_of_the_clock_arrive(
        library: Library, citadel, cli: CLI):
    """Calls share the extractor: a call dated days ahead (a clock that was wrong) holds the first sync's
    mark; an old call iCloud delivers afterwards is still taken, one older than the lookback read by the
    first sync is not."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.call(JANE, answered=True, duration=30, at=ago(days=2))
    library.call(JANE, answered=True, duration=30, at=ago(days=-5))  # ahead of the clock: read again later
    library.call(JANE, answered=True, duration=30, at=ago(days=3 * 365))
    assert cli("sync").code == 0
    library.call(BOB, answered=True, duration=40, at=ago(days=400))

    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"CALL_INBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"CALL_INBOUND": 1}


@pytest.mark.parametrize("window", [["--days", "7"], ["--full", "--days", "7"]])
def test_a_windowed_sync_leaves_older_rows_above_the_mark_to_the_next_sync(
        library: Library, citadel, cli: CLI, window: list[str]):
    """A message dated a month back that arrives late (iCloud downloading history) lies above the
    mark; a run limited to the last 7 days (or the daemon's daily sweep) must not step over it."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=1))
    assert cli("sync").code == 0
    library.text(JANE, at=ago(days=30))
    library.text(JANE, at=ago(hours=1))

    assert cli("sync", *window).code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2}
    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 3}


def test_an_unreachable_crm_queues_everything_and_a_later_run_delivers_it(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    citadel.go_down()

    down = cli("sync")

    assert down.code == 1
    assert "unreachable" in down.output.lower()
    citadel.come_up()
    up = cli("sync")
    assert up.code == 0, up.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}


def test_a_rejected_interaction_is_kept_with_its_reason_and_the_rest_continue(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=2))
    library.text(JANE, at=ago(days=1))
    citadel.reject_interactions_at = {ago(days=2).strftime("%Y-%m-%d")}

    result = cli("sync")

    assert result.code == 1
    assert "1 interaction(s) failed" in result.stdout and "occurredAt" in result.stdout
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}
    citadel.reject_interactions_at = set()
    assert "1 failed interaction(s) queued again" in cli("retry-failed").stdout
    assert cli("sync").code == 0
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 2}


def test_a_card_with_a_nul_in_its_name_and_a_note_past_the_crms_body_limit_is_still_created(
        library: Library, citadel, cli: CLI):
    """Citadel answers both with a 500 (PostgreSQL refuses a NUL; the body parser a body over 5 MiB)."""
    library.card(first="Ja\x00ne", last="Doe", phones=[JANE], note="pasted " * 1_000_000)
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.text(JANE)
    library.text(BOB)

    result = cli("sync")

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}
    assert kinds(citadel, "Bob Roe") == {"TEXT_INBOUND": 1}
    note = names(citadel)["Jane Doe"]["notes"]
    assert note.startswith("pasted pasted") and note.endswith("…") and len(note) == 100_000


def refusals(citadel) -> int:
    """How many 422s the stand-in answered."""
    return sum(n for (_method, _route, status), n in citadel.stats.items() if status == 422)


@pytest.mark.parametrize(("emails", "sent"), [
    (["ann@example..com", "ann.lee@example.org"], "ann.lee@example.org"),  # a typo Zod refuses: two dots
    (["ann@example..com"], None),  # her only email is one the CRM refuses
    (["änn@exämple.de", "ann.lee@example.org"], "ann.lee@example.org"),  # internationalised: Zod refuses it
    (["ann@example..com", "<Ann@Example.org>,"], "ann@example.org"),  # pasted: the address inside is sent
])
def test_a_card_whose_first_email_the_crm_refuses_gets_its_contact_with_the_first_email_it_takes(
        library: Library, citadel, cli: CLI, emails: list[str], sent: str | None):
    library.card(first="Ann", last="Lee", phones=[("+1 613 555 0111", "mobile")], emails=emails)
    library.call(JANE, answered=True, duration=42, at=ago(hours=2))

    first = cli("sync")
    second = cli("sync")

    assert first.code == 0 and second.code == 0, first.output + second.output
    (ann,) = citadel.contacts()
    assert (ann["firstName"], ann["lastName"], ann["phone"], ann["email"]) == ("Ann", "Lee", JANE, sent)
    assert kinds(citadel, "Ann Lee") == {"CALL_INBOUND": 1}
    assert refusals(citadel) == 0  # the address the CRM refuses is never sent
    assert "updated 0" in second.stdout and "owner_edit_kept" not in second.stderr


def left_out_in_status(cli: CLI) -> list[dict]:
    return json.loads(cli("status", "--json").stdout)["sources"]["contacts"]["left_out"]


def test_a_contact_the_crm_refuses_only_for_its_email_is_written_without_it_and_retry_failed_sends_it_once_the_crm_takes_it(
        library: Library, citadel, cli: CLI):
    """Once refused, the email is not sent again by every pass (one 422 each, forever); `retry-failed`
    sends it again once the owner knows the CRM takes it."""
    pk = library.card(first="Ann", last="Lee", phones=[JANE], emails=["ann@example.com"])
    library.text(JANE)
    citadel.reject_contact_values = {"ann@example.com"}  # a CRM stricter than its Zod rule

    made = cli("sync")

    assert made.code == 0, made.output
    (ann,) = citadel.contacts()
    assert (ann["firstName"], ann["phone"], ann["email"]) == ("Ann", JANE, None)
    assert kinds(citadel, "Ann Lee") == {"TEXT_INBOUND": 1}
    assert "Ann Lee: written without its email (email: Invalid email)" in made.stdout
    assert "contacts.field_left_out" in made.stderr and "ann@example.com" not in made.output

    library.books[0].update_card(pk, last="Lee-Smith")  # still refused: the rest of the edit goes through
    library.books[0].commit()
    renamed = cli("sync")
    assert renamed.code == 0 and "owner_edit_kept" not in renamed.stderr, renamed.output
    assert [(c["lastName"], c["email"]) for c in citadel.contacts()] == [("Lee-Smith", None)]
    assert "updated 1" in renamed.stdout and "Ann Lee-Smith: written without its email" in renamed.stdout
    assert refusals(citadel) == 1  # the rename alone was sent

    citadel.reject_contact_values = set()
    assert cli("sync").code == 0
    assert [c["email"] for c in citadel.contacts()] == [None]  # the card did not change: nothing is sent
    retried = cli("retry-failed")
    assert retried.code == 0 and "1 contact field(s) the CRM refused are sent again" in retried.stdout
    assert cli("sync").code == 0
    assert [(c["lastName"], c["email"]) for c in citadel.contacts()] == [("Lee-Smith", "ann@example.com")]
    assert kinds(citadel, "Ann Lee-Smith") == {"TEXT_INBOUND": 1}
    assert left_out_in_status(cli) == []


def test_an_email_the_crm_refused_is_not_sent_again_until_the_card_changes_it_and_stays_named_meanwhile(
        library: Library, citadel, cli: CLI):
    pk = library.card(first="Ann", last="Lee", phones=[JANE], emails=["ann@example.com"])
    citadel.reject_contact_values = {"ann@example.com"}
    assert cli("sync", "--contacts-only").code == 0
    assert refusals(citadel) == 1

    again = [cli("sync", "--contacts-only") for _ in range(2)]

    for result in again:  # not sent, not counted as an update, still named, in `sync` and in `status`
        assert result.code == 0, result.output
        assert "updated 0" in result.stdout, result.output
        assert "Ann Lee: written without its email (email: Invalid email)" in result.stdout
    assert refusals(citadel) == 1
    assert [(s["name"], s["reason"]) for s in left_out_in_status(cli)] == [
        ("Ann Lee", "written without its email (email: Invalid email)")]

    library.books[0].update_card(pk, emails=["ann.lee@example.org"])  # the owner fixes the card's email
    library.books[0].commit()
    fixed = cli("sync", "--contacts-only")
    assert fixed.code == 0 and "updated 1" in fixed.stdout and "written without" not in fixed.stdout, fixed.output
    assert [c["email"] for c in citadel.contacts()] == ["ann.lee@example.org"]
    assert left_out_in_status(cli) == []


def test_a_placeholder_promoted_by_a_card_whose_email_the_crm_refuses_is_promoted_without_it(
        library: Library, citadel, cli: CLI):
    library.text(JANE)
    assert cli("sync").code == 0
    library.card(first="Ann", last="Lee", phones=[JANE], emails=["ann@example.com"])
    citadel.reject_contact_values = {"ann@example.com"}

    result = cli("sync")

    assert result.code == 0, result.output
    (ann,) = citadel.contacts()
    assert (ann["firstName"], ann["lastName"], ann["phone"], ann["email"]) == ("Ann", "Lee", JANE, None)
    assert "promoted 1" in result.stdout and "written without its email" in result.stdout
    citadel.reject_contact_values = set()
    later = cli("sync")
    assert later.code == 0 and "updated 0" in later.stdout and "written without its email" in later.stdout
    assert cli("retry-failed").code == 0
    assert cli("sync").code == 0 and citadel.contacts()[0]["email"] == "ann@example.com"


def test_a_contact_the_crm_refuses_for_more_than_an_address_fails_with_its_reason_and_status_names_it_masked(
        library: Library, citadel, cli: CLI):
    library.card(phones=["+16135550199"])  # no name: named after its number, which the CRM refuses here
    library.card(first="Bob", last="Roe", phones=[BOB])
    citadel.reject_contact_values = {"+16135550199"}

    result = cli("sync", "--contacts-only")
    status = cli("status")
    doc = json.loads(cli("status", "--json").stdout)

    assert result.code == 1 and "failed 1" in result.stdout, result.output
    assert [c["firstName"] for c in citadel.contacts()] == ["Bob"]
    assert doc["sources"]["contacts"]["failed"] == [
        {"name": "+1•••••••0199", "reason": "firstName: Invalid firstName; phone: Invalid phone"}]
    assert "contact not written: +1•••••••0199: firstName: Invalid firstName" in status.stdout
    for text in (result.output, status.output, json.dumps(doc)):
        assert "6135550199" not in text and "613-555-0199" not in text

    citadel.reject_contact_values = set()
    assert cli("sync", "--contacts-only").code == 0
    assert json.loads(cli("status", "--json").stdout)["sources"]["contacts"]["failed"] == []


def test_an_invalid_setting_is_one_line_naming_it_and_its_source_with_exit_2(library: Library, cli: CLI):
    cli.env["CRM_SYNCD_DEFAULT_REGION"] = "XX"

    result = cli("sync")

    assert result.code == 2
    assert "default_region" in result.stderr and "CRM_SYNCD_DEFAULT_REGION" in result.stderr
    assert "Traceback" not in result.output


def _read_only_folder(tmp_path) -> str:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder / "crm-syncd")


def _a_parent_one_may_not_enter(tmp_path) -> str:
    folder = tmp_path / "locked"
    (folder / "inner").mkdir(parents=True)
    folder.chmod(0o600)  # readable, not searchable: even "does it exist?" is refused below it
    return str(folder / "inner" / "crm-syncd")


def _file_in_the_way(tmp_path) -> str:
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "crm-syncd")


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
@pytest.mark.parametrize("obstacle", [_read_only_folder, _a_parent_one_may_not_enter, _file_in_the_way])
@pytest.mark.parametrize("command, setting", [("sync", "state_dir"), ("retry-failed", "state_dir"),
                                              ("run", "state_dir"), ("run", "log_dir")])
def test_a_folder_setting_that_cannot_be_made_is_one_line_naming_setting_folder_and_reason_with_exit_2(
        library: Library, cli: CLI, tmp_path, obstacle, command: str, setting: str):
    folder = obstacle(tmp_path)
    cli.env[f"CRM_SYNCD_{setting.upper()}"] = folder

    result = cli.run_with_prefix(unprivileged(), command)  # root may write anywhere: drop that

    assert result.code == 2, result.output[-600:]
    assert "Traceback" not in result.output
    line = result.stderr.strip()
    assert "\n" not in line and setting in line and folder in line
    assert "Permission denied" in line or "is not a folder" in line, line


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("where", ["env", "legacy json"])
def test_doctor_names_where_a_dead_api_url_was_set_not_config_toml(library: Library, cli: CLI, home, where):
    """Following 'fix api_url in config.toml' would change nothing against the variable, and against the
    legacy file would make crm-syncd drop it whole, the API key too."""
    if where == "env":
        cli.env["CRM_SYNCD_API_URL"] = closed_port_url()
        expected = "CRM_SYNCD_API_URL"
    else:
        del cli.env["CRM_SYNCD_API_URL"]
        (home / ".crm-sync-config.json").write_text(json.dumps({"api_url": closed_port_url(), "api_key": "k"}))
        expected = str(home / ".crm-sync-config.json")

    result = cli("doctor")

    (line,) = [line for line in result.stdout.splitlines() if "fix:" in line and "api_url" in line]
    assert expected in line and "config.toml" not in line, line


@pytest.mark.parametrize("given", ["absolute", "relative"])
@pytest.mark.parametrize("command", [("sync",), ("doctor",), ("install", "--dry-run")], ids=" ".join)
def test_advice_to_put_the_api_key_in_the_config_file_names_the_file_crm_syncd_config_points_at(
        library: Library, citadel, cli: CLI, tmp_path, command, given: str):
    """With CRM_SYNCD_CONFIG set, ~/.config/crm-syncd/config.toml is never read: a key put there changes nothing.
    A relative one is named absolute: the advice is read in another folder than the one it was set in."""
    config = tmp_path / "crm.toml"
    config.write_text("batch_size = 500\n")
    cli.env["CRM_SYNCD_CONFIG"] = str(config) if given == "absolute" else os.path.relpath(config, REPO)
    citadel.require_key("the-key")  # and none is set: sync and doctor are refused
    if command[0] == "install":
        cli.env["CRM_SYNCD_API_KEY"] = "the-key"  # not passed on to the agent: install says where it belongs
    library.text(JANE, at=ago(days=1))

    result = cli(*command)

    (line,) = [line for line in result.stdout.splitlines() if "api_key in" in line]
    assert str(config) in line and "config.toml" not in line, line


def test_a_refused_api_key_from_the_legacy_json_is_named_there(library: Library, citadel, cli: CLI, home):
    citadel.require_key("the-right-key")
    del cli.env["CRM_SYNCD_API_URL"]
    (home / ".crm-sync-config.json").write_text(json.dumps({"api_url": citadel.url, "api_key": "an-old-key"}))
    library.text(JANE, at=ago(days=1))

    result = cli("sync")

    assert result.code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if "refused crm-syncd's API key" in line]
    assert f"set api_key in {home / '.crm-sync-config.json'}" in line, line


def test_doctor_says_where_an_api_url_that_redirects_points_and_to_set_it(library: Library, citadel, cli: CLI):
    """http:// moved to https:// (or the CRM to another host): the answer is a 301, not a failure to guess at."""
    citadel.redirect_to = "https://crm.example.com"

    result = cli("doctor")

    (line,) = [line for line in result.stdout.splitlines() if line.startswith("✗ CRM")]
    assert "api_url redirects to https://crm.example.com; set api_url to it" in line, result.stdout
    assert "fix: set api_url in env CRM_SYNCD_API_URL" in result.stdout and result.code == 2  # the owner's to fix


def test_a_sync_against_an_api_url_that_redirects_says_so_not_that_the_crm_is_unreachable(
        library: Library, citadel, cli: CLI):
    citadel.redirect_to = "https://crm.example.com"
    library.card(first="Jane", last="Doe", phones=[JANE])

    result = cli("sync")

    assert result.code == 1 and "unreachable" not in result.output, result.output
    assert ("✗ api_url is not the CRM's API: api_url redirects to https://crm.example.com; set api_url to it"
            in result.stdout), result.stdout


def test_doctor_names_a_crm_certificate_this_mac_does_not_trust(library: Library, cli: CLI, tmp_path):
    with CitadelServer(tmp_path / "https.db", tls=self_signed_tls(tmp_path)) as server:
        cli.env["CRM_SYNCD_API_URL"] = server.url
        result = cli("doctor")

    (line,) = [line for line in result.stdout.splitlines() if line.startswith("✗ CRM")]
    assert "TLS certificate is not trusted" in line and "signed certificate (127.0.0.1)" in line, line
    assert "fix: renew the CRM's certificate" in result.stdout and result.code == 1


def test_doctor_names_a_state_folder_that_cannot_be_made_and_its_setting(library: Library, cli: CLI, tmp_path):
    cli.env["CRM_SYNCD_STATE_DIR"] = folder = _file_in_the_way(tmp_path)

    result = cli("doctor")

    assert result.code != 0
    assert f"✗ state folder: {folder}: {tmp_path / 'a-file'} is not a folder" in result.stdout, result.stdout
    assert "set state_dir to a folder you can write in" in result.stdout
    assert not (tmp_path / "a-file").is_dir()


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
@pytest.mark.parametrize("terminal, grantee", [(None, "python"), ("Apple_Terminal", "add Terminal, the app")])
def test_a_database_macos_refuses_to_open_names_the_full_disk_access_fix(
        library: Library, cli: CLI, terminal: str | None, grantee: str):
    """Linux stand-in for a TCC refusal: the file exists (stat works) but opening it is denied. macOS
    holds the terminal app a command runs in responsible for its reads: that app needs the grant."""
    cli.env.pop("TERM_PROGRAM", None)
    if terminal:
        cli.env["TERM_PROGRAM"] = terminal
    library.text(JANE)
    os.chmod(library.messages_db, 0)
    command = ["sync", "--interactions-only"]
    if os.geteuid() == 0:  # root reads anything: drop the capability that lets it
        caps = "-dac_override,-dac_read_search"
        cli = CLI(cli.env)
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
        result = cli.run_with_prefix(prefix, *command)
    else:
        result = cli(*command)

    assert result.code == 2, result.output
    assert "Full Disk Access" in result.stderr and "Privacy & Security" in result.stderr
    assert grantee in " ".join(result.stderr.split())  # the interpreter's path, or the terminal app
    assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
@pytest.mark.parametrize("command", [["sync", "--interactions-only"], ["sync", "--contacts-only"], ["doctor"],
                                     ["status"]], ids=" ".join)
def test_a_folder_macos_refuses_a_look_into_names_the_full_disk_access_fix(library: Library, cli: CLI, command):
    """Without Full Disk Access, macOS may refuse even a stat of a protected folder's files: the
    Messages and AddressBook folders here. One clear fix, never a traceback."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=1))
    folders = (library.messages_db.parent, library.books[0].path.parent)
    for folder in folders:
        os.chmod(folder, 0)
    try:
        result = cli.run_with_prefix(unprivileged(), *command)
    finally:
        for folder in folders:
            os.chmod(folder, 0o755)

    assert "Traceback" not in result.output and "Full Disk Access" in result.output, result.output[-600:]


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
@pytest.mark.parametrize("where", ["folder", "another user's folder", "volume"])
def test_a_call_history_where_sqlite_cannot_make_its_shm_file_is_named_so_not_full_disk_access(
        library: Library, citadel, cli: CLI, where: str):
    """Its app closed the database and SQLite removed the -wal and -shm; reading it makes them again, which a
    folder the owner may not write, or a read-only volume, refuses. The file itself reads fine: granting
    Full Disk Access, which this used to advise, changes nothing. No `sudo crm-syncd` made the folder: the
    fix is a folder the owner can write in, not a chown of crm-syncd's."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    library.call(JANE, at=ago(hours=2))
    library.calls.close()
    folder = library.calls_db.parent
    if where == "volume":
        if os.geteuid() != 0 or subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode:
            pytest.skip("needs root and a bind mount to make a read-only volume")
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
    elif where == "folder":
        os.chmod(folder, 0o555)
    elif os.geteuid() != 0:
        pytest.skip("only root makes a folder another user's")
    else:
        os.chown(folder, 4242, 4242)
    try:
        result = cli.run_with_prefix(unprivileged(), "sync")
        doctor = cli.run_with_prefix(unprivileged(), "doctor")
    finally:
        if where == "volume":
            subprocess.run(["umount", folder], check=True)
        else:
            os.chmod(folder, 0o755)
            os.chown(folder, os.getuid(), os.getgid())
        library.calls = CallHistoryDB.open(library.calls_db)  # its app at work again, in a writable place

    said = " ".join(result.stdout.split())
    assert result.code == 1 and "Traceback" not in result.output, result.output[-800:]
    assert "Full Disk Access" not in result.output, result.output[-800:]
    fix = {"folder": f"chmod u+rwx '{folder}'", "volume": "read-only volume"}.get(where, f"{folder} is another user's")
    assert f"{library.calls_db.name}-shm" in said, said
    assert fix in said and "to a folder you can write in" in said and "sudo" not in said, said
    checked = " ".join(doctor.stdout.split())
    assert doctor.code == 1 and "✗ Call history" in checked and "Full Disk Access" not in checked, checked
    assert fix in checked and "to a folder you can write in" in checked and "sudo" not in checked, checked
    assert "restart the Mac" not in checked, checked  # waiting fixes nothing
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}
    assert cli("sync").code == 0  # the call was kept for it
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1, "CALL_MISSED": 1}


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
def test_doctor_without_full_disk_access_exits_2_as_sync_does(library: Library, cli: CLI):
    os.chmod(library.messages_db, 0)  # macOS refuses to open it

    sync = cli.run_with_prefix(unprivileged(), "sync")
    doctor = cli.run_with_prefix(unprivileged(), "doctor")

    assert sync.code == 2 and "Full Disk Access" in sync.stderr
    assert doctor.code == 2 and "✗ Messages (chat.db)" in doctor.stdout and "Full Disk Access" in doctor.stdout


def test_doctor_shows_a_call_history_this_mac_has_not_made_yet_as_a_note_not_a_failure(
        library: Library, cli: CLI, home):
    cli.env["CRM_SYNCD_CALLS_DB"] = str(home / "no-iphone" / "CallHistory.storedata")

    lines = cli("doctor").stdout.splitlines()

    calls = next(line for line in lines if "Call history" in line)
    assert calls.startswith("! Call history:") and "nothing to read yet" in calls, lines


def test_doctor_shows_an_address_book_this_mac_has_not_made_yet_as_a_note_not_a_failure(
        library: Library, cli: CLI, home):
    cli.env["CRM_SYNCD_ADDRESSBOOK_DIR"] = str(home / "no-contacts-yet" / "AddressBook")

    result = cli("doctor")

    contacts = next(line for line in result.stdout.splitlines() if line[2:].startswith("Contacts"))
    assert contacts.startswith("! Contacts:") and "nothing to read yet" in contacts, result.stdout


def test_a_damaged_chat_db_is_named_in_one_line_and_calls_are_still_delivered(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.call(JANE, at=ago(days=1), originated=True, duration=30)
    library.chat.close()
    for suffix in ("-wal", "-shm"):
        library.messages_db.with_name(library.messages_db.name + suffix).unlink(missing_ok=True)
    library.messages_db.write_bytes(b"half a restored backup " * 1000)

    result = cli("sync")

    assert result.code == 1
    assert "Messages  ✗ not read:" in result.stdout and "not a database" in result.stdout
    assert "Traceback" not in result.output
    assert kinds(citadel, "Jane Doe") == {"CALL_OUTBOUND": 1}


def test_reconcile_after_the_state_database_was_lost_creates_nothing_twice(library: Library, citadel, cli: CLI, home):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=3))
    library.text("+19055551234", at=ago(days=2))
    library.call(JANE, originated=True, duration=20, at=ago(days=1))
    assert cli("sync").code == 0
    before = (len(citadel.contacts()), len(citadel.interactions()))
    shutil.rmtree(home / "Library" / "Application Support" / "crm-syncd")

    result = cli("sync", "--reconcile")

    assert result.code == 0, result.output
    assert (len(citadel.contacts()), len(citadel.interactions())) == before == (2, 3)


# -- the CRM replaced under crm-syncd ---------------------------------------------------------------

def janes_id_handed_to_bob(library: Library, citadel, cli: CLI) -> int:
    """Jane synced; then the owner restores Citadel from a backup older than her contact and types in
    Bob, who gets the id crm-syncd had for her (the restored sequence hands it out again). That id."""
    backup = citadel.backup()
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    assert cli("sync").code == 0
    (jane_before,) = [c["id"] for c in citadel.contacts()]
    citadel.restore(backup)
    assert citadel.add_contact(firstName="Bob", lastName="Smith", phone=BOB) == jane_before
    return jane_before


def test_a_crm_restored_from_a_backup_that_hands_a_persons_id_to_another_never_files_them_there(
        library: Library, citadel, cli: CLI):
    """Jane's next text goes to a contact of hers, never to Bob, who got her old id."""
    bob = janes_id_handed_to_bob(library, citadel, cli)

    library.text(JANE, at=ago(minutes=5))
    result = cli("sync")

    assert result.code == 0, result.output
    assert citadel.interactions(bob) == []
    jane = names(citadel)["Jane Doe"]
    assert (jane["id"] != bob, [i["type"] for i in citadel.interactions(jane["id"])]) == (True, ["TEXT_INBOUND"])
    assert names(citadel)["Bob Smith"]["phone"] == BOB  # the owner's contact is left as they typed it


@pytest.mark.parametrize(("card", "lands_on"), [(True, "Jane Doe"), (False, "Unknown (+1-613-555-0111)")],
                         ids=["found-for-her-card", "found-for-her-number"])
def test_a_crm_installed_afresh_that_hands_the_id_of_a_contact_crm_syncd_found_to_another_never_files_anything_there(
        library: Library, citadel, cli: CLI, card: bool, lands_on: str):
    """Jane's number was found on the contact the owner had typed for her (by her card, or with no card at
    all); Citadel is then installed afresh on the same address, and the owner's first contact there, Bob,
    gets that id. Her next text never reaches Bob."""
    empty = citadel.backup()
    hers = citadel.add_contact(firstName="Jane", lastName="Doe (mine)", phone="(613) 555-0111")
    if card:
        library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    assert cli("sync").code == 0
    assert len(citadel.interactions(hers)) == 1
    citadel.restore(empty)
    assert citadel.add_contact(firstName="Bob", lastName="Smith", phone=BOB) == hers

    library.text(JANE, at=ago(hours=1))
    result = cli("sync")

    assert result.code == 0, result.output
    assert citadel.interactions(hers) == []
    assert kinds(citadel, lands_on) == {"TEXT_INBOUND": 1}


def test_api_url_pointed_at_another_crm_never_takes_its_contacts_for_the_ones_crm_syncd_made(
        library: Library, citadel, cli: CLI, tmp_path):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    assert cli("sync").code == 0
    (jane_before,) = [c["id"] for c in citadel.contacts()]
    with CitadelServer(tmp_path / "other.sqlite") as other:
        assert other.add_contact(firstName="Bob", lastName="Smith", phone=BOB) == jane_before
        cli.env["CRM_SYNCD_API_URL"] = other.url
        library.text(JANE, at=ago(minutes=5))

        result = cli("sync")

        assert result.code == 0, result.output
        assert other.interactions(jane_before) == []
        jane = {f"{c['firstName']} {c['lastName']}": c for c in other.contacts()}["Jane Doe"]
        assert [i["type"] for i in other.interactions(jane["id"])] == ["TEXT_INBOUND"]


@pytest.mark.parametrize(("first_since_backup", "stamp_lost"), [(True, False), (False, False), (False, True)],
                         ids=["a-contacts-first-texts", "more-texts", "and-the-stamp-lost"])
def test_a_state_restored_from_a_backup_sends_nothing_delivered_since_again(
        library: Library, citadel, cli: CLI, home: Path, tmp_path: Path, first_since_backup: bool, stamp_lost: bool):
    """Time Machine puts back an older state.db (minutes old: the contacts' decisions not to check the
    CRM before sends are still fresh in it). What was delivered after the backup is above its mark and
    not in its ledger: found in the CRM and adopted, not sent again."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Ann", last="Lee", phones=[CAROL])
    library.text(JANE, at=ago(days=2))
    if not first_since_backup:
        library.text(CAROL, at=ago(days=2))
    assert cli("sync").code == 0
    state = home / "Library" / "Application Support" / "crm-syncd" / "state.db"
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    library.text(CAROL, at=ago(hours=3))
    library.call(CAROL, answered=True, duration=40, at=ago(hours=2))
    library.text(JANE, from_me=True, at=ago(minutes=9))
    assert cli("sync").code == 0
    before = Counter((i["contactId"], i["type"], i["occurredAt"]) for i in citadel.interactions())

    restore(backup, state)
    if stamp_lost:
        (home / "Library" / "Caches" / "crm-syncd" / "stamps.json").unlink()
    result = cli("sync", "-v")

    assert result.code == 0, result.output
    assert ("state.unstamped" if stamp_lost else "state.restored") in result.stderr, result.output
    assert Counter((i["contactId"], i["type"], i["occurredAt"]) for i in citadel.interactions()) == before
    assert "Messages  synced 2" in result.stdout, result.output  # adopted: in the ledger again


def test_a_state_restored_mid_backlog_has_the_older_texts_delivered_since_found_not_sent_again(
        library: Library, citadel, cli: CLI, home: Path, tmp_path: Path):
    """A first sync delivers newest first; a CRM outage stops it with the newest 130 of Jane's 150
    texts in, and Time Machine backs the state up then. The next sync sends the 20 older ones; then
    the backup is put back. The CRM's 100 newest of Jane's are all in its ledger: the 20 are found anyway."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    for i in range(150):
        library.text(JANE, at=ago(hours=300 - 2 * i))
    cli.env["CRM_SYNCD_PUSH_CONCURRENCY"] = "1"
    citadel.faults = Faults(rate=1.0, kinds=("503",), retry_after=None, after=130,
                            routes=("/api/contacts/:id/interactions",))
    assert cli("sync").code == 1
    citadel.faults = Faults()
    state = home / "Library" / "Application Support" / "crm-syncd" / "state.db"
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    assert len(citadel.interactions_of(JANE)) == 130
    assert cli("sync").code == 0
    assert len(citadel.interactions_of(JANE)) == 150

    restore(backup, state)
    result = cli("sync", "-v")

    assert result.code == 0 and "state.restored" in result.stderr and "push.caught_up" in result.stderr, result.output
    got = Counter(i["occurredAt"] for i in citadel.interactions_of(JANE))
    assert sum(got.values()) == 150 and max(got.values()) == 1, result.output
    again = cli("sync", "-v")
    assert again.code == 0 and "state.restored" not in again.stderr, again.output


def test_a_restored_state_read_first_by_sync_days_looks_up_what_it_lacks_at_the_next_whole_read(
        library: Library, citadel, cli: CLI, home: Path, tmp_path: Path):
    """A week-old backup is put back, and the first run is `sync --days 1`: Jane's texts of 4 and 3 days
    ago, delivered after the backup, are above the restored mark but outside that window."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=10))
    assert cli("sync").code == 0
    state = home / "Library" / "Application Support" / "crm-syncd" / "state.db"
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    library.text(JANE, at=ago(days=4))
    library.text(JANE, from_me=True, at=ago(days=3))
    assert cli("sync").code == 0

    restore(backup, state)
    library.text(JANE, at=ago(hours=2))
    first = cli("sync", "--days", "1", "-v")
    between = cli("status", "--json"), cli("status")
    second = cli("sync", "-v")

    assert first.code == 0 and "state.restored" in first.stderr and "push.caught_up" not in first.stderr, first.output
    assert json.loads(between[0].stdout)["looking_up_before_sending"] == ["messages", "calls"], between[0].output
    assert "after a restored state: each item is looked for in the CRM" in between[1].stdout, between[1].output
    assert second.code == 0 and "push.caught_up" in second.stderr, second.output
    assert json.loads(cli("status", "--json").stdout)["looking_up_before_sending"] is None
    got = Counter(i["occurredAt"] for i in citadel.interactions_of(JANE))
    assert sum(got.values()) == 4 and max(got.values()) == 1, second.output


def test_after_an_upgrade_a_placeholder_the_owner_renamed_stays_theirs(library: Library, citadel, cli: CLI, home: Path):
    """A stamp merely missing (the upgrade that brings stamps) lost no state: no contact is taken back."""
    library.text(BOB, at=ago(days=2))
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    citadel.update_contact(placeholder["id"], firstName="Bob", lastName="Roe", notes="")  # the owner renames it
    card = library.card(first="Bob", last="Roe", phones=[BOB])
    assert cli("sync").code == 0
    (home / "Library" / "Caches" / "crm-syncd" / "stamps.json").unlink()

    upgraded = cli("sync", "-v")
    a_card_edit(library, card)
    result = cli("sync")

    assert upgraded.code == 0 and "state.unstamped" in upgraded.stderr, upgraded.output
    assert result.code == 0, result.output
    assert names(citadel)["Bob Roe"]["organization"] is None


def test_a_stamp_that_cannot_be_written_is_named_with_its_fix_and_raises_no_false_alarm(
        library: Library, citadel, cli: CLI, home: Path):
    """~/Library/Caches/crm-syncd left as something this user cannot write into."""
    caches = home / "Library" / "Caches"
    caches.mkdir(parents=True)
    (caches / "crm-syncd").write_text("")
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=2))
    outputs = []
    for hours in (3, 2, 1):
        library.text(JANE, at=ago(hours=hours))
        result = cli("sync", "-v")
        assert result.code == 0, result.output
        outputs.append(result.stderr)

    assert all("state.stamp_unwritable" in err and str(caches / "crm-syncd") in err for err in outputs)
    assert not any("state.unstamped" in err or "state.restored" in err for err in outputs)
    assert len(citadel.interactions_of(JANE)) == 4


def a_card_edit(library: Library, card: int) -> None:
    library.books[0].update_card(card, organization="Acme", job_title="CTO", modified=ago(seconds=1))
    library.books[0].commit()


def test_after_sync_reconcile_on_a_new_mac_card_edits_reach_the_contacts_crm_syncd_made(
        library: Library, citadel, cli: CLI, home: Path):
    """Only the Apple data moved to the new Mac: crm-syncd starts without its state, the CRM holds the
    contacts it made on the old one."""
    card = library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=2))
    assert cli("sync").code == 0
    shutil.rmtree(home / "Library" / "Application Support" / "crm-syncd")
    assert cli("sync", "--reconcile").code == 0

    a_card_edit(library, card)
    result = cli("sync")

    assert result.code == 0, result.output
    (jane,) = citadel.contacts()
    assert (jane["organization"], jane["title"]) == ("Acme", "CTO"), result.output
    assert len(citadel.interactions()) == 1


@pytest.mark.parametrize("since_backup", ["made", "promoted"])
def test_after_a_state_restore_card_edits_reach_a_contact_crm_syncd_made_or_promoted_since_the_backup(
        library: Library, citadel, cli: CLI, home: Path, tmp_path: Path, since_backup: str):
    library.text(BOB, at=ago(days=2))  # a placeholder, before the backup
    assert cli("sync").code == 0
    state = home / "Library" / "Application Support" / "crm-syncd" / "state.db"
    backup = a_backup_of(state, tmp_path / "state-backup.db")
    card = (library.card(first="Bob", last="Roe", phones=[BOB]) if since_backup == "promoted"
            else library.card(first="Ann", last="Lee", phones=[CAROL]))
    assert cli("sync").code == 0
    restore(backup, state)
    assert cli("sync").code == 0

    a_card_edit(library, card)
    result = cli("sync")

    assert result.code == 0, result.output
    edited = names(citadel)["Bob Roe" if since_backup == "promoted" else "Ann Lee"]
    assert (edited["organization"], edited["title"]) == ("Acme", "CTO"), result.output


def test_a_contact_the_owner_made_like_a_card_stays_the_owners_when_no_state_was_lost(
        library: Library, citadel, cli: CLI):
    """Outside a rebuild an identical contact may be the owner's or another Mac's: card edits go to it no more."""
    citadel.add_contact(firstName="Jane", lastName="Doe", phone=JANE)
    card = library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync").code == 0

    a_card_edit(library, card)
    result = cli("sync")

    assert result.code == 0, result.output
    (jane,) = citadel.contacts()
    assert (jane["organization"], jane["title"]) == (None, None)


def test_a_state_that_was_not_restored_is_not_taken_for_one(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=2))
    first = cli("sync", "-v")
    library.text(JANE, at=ago(hours=1))
    second = cli("sync", "-v")

    assert first.code == 0 and second.code == 0, second.output
    assert "state.restored" not in first.stderr + second.stderr
    assert len(citadel.interactions()) == 2


def test_after_a_crm_restore_the_state_moved_aside_and_sync_reconcile_sends_back_what_the_backup_lacks(
        library: Library, citadel, cli: CLI, home):
    """The README's way back after a restore: texts delivered after the backup are sent again, once,
    and those the backup kept are not doubled."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=3))
    library.text(JANE, at=ago(days=2), from_me=True)
    assert cli("sync").code == 0
    backup = citadel.backup()
    library.call(JANE, answered=True, duration=60, at=ago(days=1))
    library.text(JANE, at=ago(hours=2))
    assert cli("sync").code == 0
    citadel.restore(backup)
    state = home / "Library" / "Application Support" / "crm-syncd" / "state.db"
    state.rename(state.with_name("state.db.before-restore"))

    result = cli("sync", "--reconcile")

    assert result.code == 0, result.output
    (jane,) = citadel.contacts()
    assert sorted(i["type"] for i in citadel.interactions(jane["id"])) == [
        "CALL_INBOUND", "TEXT_INBOUND", "TEXT_INBOUND", "TEXT_OUTBOUND"]


# -- the Mac's clock --------------------------------------------------------------------------------

def test_a_text_and_a_call_dated_ahead_of_a_clock_set_behind_wait_and_arrive_once_it_is_right(
        library: Library, citadel, cli: CLI, tmp_path):
    """The Mac's clock is two days behind (reset before the network time came back); a text and an
    iPhone call arrive dated at the real time. They are not dropped as bad dates: the mark waits before
    them, and the sync after the clock is corrected delivers them, once."""
    offset = tmp_path / "clock-offset"
    cli.set_clock(offset, -2 * 86_400)
    library.card(first="Jane", last="Doe", phones=[JANE])
    text_at, call_at = ago(minutes=5), ago(minutes=3)
    library.text(JANE, at=text_at)
    library.call(JANE, answered=True, duration=30, at=call_at)

    behind = cli("sync")

    assert behind.code == 0, behind.output
    assert "ahead-of-clock 1" in behind.stdout and citadel.interactions() == []
    offset.write_text("0")  # the clock is right again
    assert cli("sync").code == 0 and cli("sync").code == 0
    got = Counter((i["type"], i["occurredAt"][:19]) for i in citadel.interactions())
    assert got == {("TEXT_INBOUND", text_at.strftime("%Y-%m-%dT%H:%M:%S")): 1,
                   ("CALL_INBOUND", call_at.strftime("%Y-%m-%dT%H:%M:%S")): 1}


def test_a_placeholder_a_grouped_number_joined_later_is_promoted_by_a_card_holding_that_number(
        library: Library, citadel, cli: CLI):
    """An unknown person writes from an email, later from a number Messages groups with it: one
    placeholder. A card with the number promotes it; nothing is split over two contacts."""
    number, email = "+19055551235", "pc@example.org"
    library.text(email, at=ago(days=3), person="pc-1")
    assert cli("sync").code == 0
    library.text(number, at=ago(days=2), person="pc-1")
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    assert placeholder["firstName"] == "Unknown" and len(citadel.interactions(placeholder["id"])) == 2

    library.card(first="Jane", last="Doe", phones=["(905) 555-1235"])
    assert cli("sync").code == 0
    library.text(email, at=ago(days=1), person="pc-1")
    assert cli("sync").code == 0

    (jane,) = citadel.contacts()
    assert (jane["id"], jane["firstName"], len(citadel.interactions(jane["id"]))) == (placeholder["id"], "Jane", 3)


def test_a_send_later_text_days_ahead_holds_the_mark_without_status_calling_it_a_growing_lag(
        library: Library, citadel, cli: CLI, tmp_path):
    """A text scheduled with Send Later five days ahead holds the mark until then; ten quiet minutes
    later nothing waits on crm-syncd, so `status` reports no lag for it."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(minutes=5))
    library.text(JANE, from_me=True, at=ago(days=-5))
    assert cli("sync").code == 0 and len(citadel.interactions()) == 1
    offset = tmp_path / "clock-offset"
    cli.set_clock(offset, 10 * 60)

    messages = json.loads(cli("status", "--json").stdout)["sources"]["messages"]

    assert (messages["lag_rows"], messages["lag_seconds"]) == (1, 0), messages


def test_status_before_the_first_read_counts_every_row_as_not_read_yet(library: Library, citadel, cli: CLI):
    """Before any mark (a daemon's first contacts pass, a fresh install) the history is all unread:
    `status` says so, with no alarm, rather than "nothing behind". It counts the rows that are there:
    the 300 Messages deleted (keep messages: 1 year) left their ROWIDs unused."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    for rowid in [library.text(JANE, at=ago(days=700, minutes=n)) for n in range(300)]:
        library.chat.delete_message(rowid)
    for days in (3, 2, 1):
        library.text(JANE, at=ago(days=days))

    before = cli("status")
    messages = json.loads(cli("status", "--json").stdout)["sources"]["messages"]

    assert (messages["lag_rows"], messages["lag_seconds"], messages["first_read_days"]) == (3, 0, 365), messages
    assert "not read yet: 3 rows (the first read takes the last 365 days)" in before.stdout
    assert cli("sync").code == 0
    messages = json.loads(cli("status", "--json").stdout)["sources"]["messages"]
    assert (messages["lag_rows"], messages["first_read_days"]) == (0, None), messages
    assert "not read yet" not in cli("status").stdout


def test_a_crm_restored_under_a_sync_of_interactions_alone_never_files_a_persons_text_under_another(
        library: Library, citadel, cli: CLI):
    """Without a contacts pass (`--interactions-only`, or a daemon between changes in Contacts), a send
    to an id the restored CRM gave to Bob is caught before it is made: Jane is matched afresh."""
    jane_before = janes_id_handed_to_bob(library, citadel, cli)

    library.text(JANE, at=ago(minutes=1))
    result = cli("sync", "--interactions-only")

    assert result.code == 0, result.output
    assert citadel.interactions(jane_before) == []
    jane = names(citadel)["Jane Doe"]
    assert [i["type"] for i in citadel.interactions(jane["id"])] == ["TEXT_INBOUND"]
