"""Contact lifecycle with the daemon running: placeholders promoted, duplicates merged, edits followed."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import CLI
from tests.harness.library import Library, ago
from tests.harness.processes import eventually

STRANGER = "+19055551234"
ANN = "+16135550171"


@pytest.fixture
def daemon_env(daemon_env: CLI) -> CLI:
    daemon_env.env.update(CRM_SYNCD_CONTACTS_RESCAN_S="0.3", CRM_SYNCD_DEBOUNCE_MS="50",
                          CRM_SYNCD_MAX_WAIT_MS="300")
    return daemon_env


def contact(citadel, **match) -> dict | None:
    found = [c for c in citadel.contacts() if all(c.get(k) == v for k, v in match.items())]
    return found[0] if len(found) == 1 else None


def test_a_texted_stranger_added_to_contacts_is_promoted_in_place_with_its_interactions(
        library: Library, citadel, daemon):
    library.text(STRANGER, at=ago(days=3))
    library.text(STRANGER, from_me=True, at=ago(days=2))
    d = daemon()
    placeholder = eventually(lambda: contact(citadel, phone=STRANGER, firstName="Unknown"), what="the placeholder")
    eventually(lambda: len(citadel.interactions(placeholder["id"])) == 2, what="its interactions")

    library.card(source=1, first="Jane", last="Doe", organization="Acme", phones=["905-555-1234"], note="New friend")

    jane = eventually(lambda: contact(citadel, firstName="Jane"), what="the promotion")
    assert jane["id"] == placeholder["id"] and len(citadel.contacts()) == 1
    assert (jane["lastName"], jane["organization"], jane["notes"]) == ("Doe", "Acme", "New friend")
    assert len(citadel.interactions(jane["id"])) == 2
    assert d.stop() == 0


def test_one_unknown_person_texting_from_phone_and_email_gets_one_placeholder(library: Library, citadel, daemon):
    library.text(STRANGER, person="person-7")
    library.text("stranger@example.org", person="person-7")
    d = daemon()

    eventually(lambda: len(citadel.interactions()) == 2, what="both messages")

    (only,) = citadel.contacts()
    assert only["lastName"] == "(+1-905-555-1234)"
    assert d.stop() == 0


def test_a_card_renamed_is_renamed_in_the_crm_and_a_deleted_card_deletes_nothing(library: Library, citadel, daemon):
    pk = library.card(first="Jon", last="Smiht", phones=["+1 613 555 0161"])
    d = daemon()
    created = eventually(lambda: contact(citadel, lastName="Smiht"), what="the contact")

    library.books[0].update_card(pk, first="John", last="Smith")
    library.books[0].commit()
    renamed = eventually(lambda: contact(citadel, lastName="Smith"), what="the rename")
    assert renamed["id"] == created["id"] and renamed["firstName"] == "John"

    library.books[0].delete_card(pk)
    library.books[0].commit()
    library.text("+16135550161")
    eventually(lambda: len(citadel.interactions(created["id"])) == 1, what="a message after the deletion")
    assert [c["id"] for c in citadel.contacts()] == [created["id"]]
    assert d.stop() == 0


def test_an_owner_edit_in_the_crm_wins_over_a_later_card_edit(library: Library, citadel, daemon):
    pk = library.card(first="Ann", last="Lee", phones=["+1 613 555 0171"])
    d = daemon()
    ann = eventually(lambda: contact(citadel, firstName="Ann"), what="the contact")
    citadel.update_contact(ann["id"], firstName="Annie")

    library.books[0].update_card(pk, last="Lee-Smith")
    library.books[0].commit()
    eventually(lambda: d.events("contacts.owner_edit_kept"), what="the owner's edit to be noticed")

    kept = contact(citadel, id=ann["id"])
    assert (kept["firstName"], kept["lastName"]) == ("Annie", "Lee")
    assert d.stop() == 0

def test_without_placeholders_an_idle_daemon_lists_the_crm_for_a_held_stranger_ever_more_rarely(
        library: Library, citadel, daemon, daemon_env: CLI):
    """Held addresses are looked for in a listing of every contact (100 requests for 10,000 contacts).
    Once per `contacts_rescan_s` a page of one contact, newest first, tells whether the CRM holds one it did
    not: a contact the owner makes is listed then. Otherwise each listing that found no one doubles the wait
    for the next (up to an hour): an idle daemon does not list the CRM every rescan for ever."""
    daemon_env.env.update(CRM_SYNCD_CREATE_UNKNOWN_CONTACTS="false", CRM_SYNCD_CONTACTS_RESCAN_S="1",
                          CRM_SYNCD_SAFETY_PROBE_S="1")
    library.card(first="Ann", last="Lee", phones=[ANN])
    library.text(STRANGER, at=ago(hours=1))
    d = daemon()
    eventually(lambda: json.loads(daemon_env("status", "--json").stdout)["outbox"]["held"] == 1, what="the hold")

    citadel.contact_listings.clear()
    time.sleep(15)  # idle: nothing to read or send, one held stranger
    listings = [q for q in citadel.contact_listings if q.get("page", "1") == "1" and q.get("limit") != "1"]
    assert len(listings) <= 4, listings  # 1, 2, 4, 8 s apart: not 15
    assert len(citadel.contact_listings) - len(listings) <= 16  # the page of one, once a second

    joe = citadel.add_contact(firstName="Joe", lastName="Pipes", phone="(905) 555-1234")  # typed by the owner
    eventually(lambda: citadel.interactions(joe), what="the held text at the owner's contact")
    assert [c["firstName"] for c in citadel.contacts()] == ["Ann", "Joe"]
    assert d.stop() == 0


def test_a_placeholder_and_a_card_contact_for_one_person_are_merged(library: Library, citadel, daemon):
    pk = library.card(first="Bob", last="Roe", phones=["+1 902 555 0122"])
    library.text("bob@example.org", at=ago(days=2))  # an email nobody's card has yet
    library.text("+19025550122", at=ago(days=1))
    d = daemon()
    eventually(lambda: len(citadel.contacts()) == 2 and len(citadel.interactions()) == 2, what="both contacts")
    bob = contact(citadel, firstName="Bob")

    library.books[0].update_card(pk, emails=["bob@example.org"])
    library.books[0].commit()

    eventually(lambda: len(citadel.contacts()) == 1, what="the merge")
    eventually(lambda: len(citadel.interactions(bob["id"])) == 2, what="the re-created interaction")
    assert [c["id"] for c in citadel.contacts()] == [bob["id"]]
    assert d.stop() == 0


def test_a_contact_the_owner_made_is_never_deleted_only_reported_as_a_possible_duplicate(
        library: Library, citadel, daemon, cli: CLI):
    mine = citadel.add_contact(firstName="Robert", lastName="Roe", phone="(902) 555-0122")
    also = citadel.add_contact(firstName="Bobby", lastName="Roe", email="bob@example.org")
    library.card(first="Bob", last="Roe", phones=["+1 902 555 0122"], emails=["bob@example.org"])
    d = daemon()
    eventually(lambda: d.events("contacts.synced"), what="a contact sync")

    assert sorted(c["id"] for c in citadel.contacts()) == sorted([mine, also])
    status = json.loads(cli("status", "--json").stdout)
    assert status["duplicates"] == [{"kept": mine, "duplicate": also}]
    assert d.stop() == 0
