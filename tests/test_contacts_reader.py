"""AddressBook stores -> Cards: which records are people, and what each card carries."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from crm_syncd.sources import APPLE_EPOCH, Card, Email, Phone, sqlite
from crm_syncd.sources.contacts import DB_NAME, read_contacts, read_store, store_paths
from tests.harness.addressbook import AddressBookDB

ICLOUD = "Sources/1A2B3C4D-0000-4000-8000-00000000A001"
GOOGLE = "Sources/1A2B3C4D-0000-4000-8000-00000000B002"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "AddressBook"


@pytest.fixture
def stores(folder: Path):
    """The top-level store and two account stores, writers left open like Contacts does."""
    opened = {name: AddressBookDB.create(folder / name / DB_NAME) for name in ("", ICLOUD, GOOGLE)}
    yield opened
    for db in opened.values():
        db.close()


@pytest.fixture
def book(stores) -> AddressBookDB:
    return stores[ICLOUD]


def cards_of(folder: Path) -> dict[str, Card]:
    """All cards of the folder by display key (first name, else organization)."""
    snapshot = read_contacts(folder)
    assert not snapshot.errors
    return {c.first or c.organization or c.nickname: c for c in snapshot.cards}


def commit_all(stores) -> None:
    for db in stores.values():
        db.commit()


# -- which stores --------------------------------------------------------------------------------

def test_top_level_store_comes_first_then_account_stores_sorted(stores, folder):
    assert store_paths(folder) == [folder / DB_NAME, folder / ICLOUD / DB_NAME, folder / GOOGLE / DB_NAME]


def test_cards_are_read_from_every_store_and_say_which_store_they_came_from(stores, folder):
    stores[""].card("Local")
    stores[ICLOUD].card("Cloudy")
    stores[GOOGLE].card("Googly")
    commit_all(stores)
    by_name = {c.first: c.store for c in read_contacts(folder).cards}
    assert by_name == {"Local": DB_NAME, "Cloudy": f"{ICLOUD}/{DB_NAME}", "Googly": f"{GOOGLE}/{DB_NAME}"}


def test_missing_addressbook_folder_reads_as_empty(tmp_path):
    snapshot = read_contacts(tmp_path / "nowhere")
    assert (snapshot.cards, snapshot.own_addresses, snapshot.errors) == ([], set(), {})


def test_corrupt_store_is_reported_and_the_other_stores_are_still_read(stores, folder):
    stores[ICLOUD].card("Survivor")
    commit_all(stores)
    broken = folder / "Sources" / "FFFFFFFF-0000-4000-8000-000000000000" / DB_NAME
    broken.parent.mkdir(parents=True)
    broken.write_bytes(os.urandom(8192))
    snapshot = read_contacts(folder)
    assert [c.first for c in snapshot.cards] == ["Survivor"]
    assert list(snapshot.errors) == [broken.relative_to(folder).as_posix()]


def test_a_store_that_vanished_is_missing_not_an_error(folder):
    with pytest.raises(sqlite.SourceMissing):
        read_store(folder / ICLOUD / DB_NAME, f"{ICLOUD}/{DB_NAME}")


# -- which records are cards ---------------------------------------------------------------------

def test_groups_containers_info_rows_and_subscribed_contacts_are_not_cards(book, stores, folder):
    ann = book.card("Ann")
    book.group("Friends", members=[ann])
    book.card("Directory", entity="ABCDSubscribedContact")
    commit_all(stores)
    assert list(cards_of(folder)) == ["Ann"]


def test_entity_numbers_are_looked_up_not_assumed(folder):
    db = AddressBookDB.create(folder / DB_NAME, contact_entity=7, group_entity=30)
    assert db.entities["ABCDContact"] == 7 and db.entities["ABCDGroup"] == 30
    db.group("Team", members=[db.card("Renumbered", note="still mine")])
    db.commit()
    cards = read_contacts(folder).cards
    assert [(c.first, c.note) for c in cards] == [("Renumbered", "still mine")]
    db.close()


def test_company_card_is_flagged_and_named_by_its_organization(book, stores, folder):
    book.card(organization="Acme Corp", company=True, phones=[("+1 555 010 0199", "Main")])
    book.card("Pat", organization="Acme Corp", job_title="Engineer")
    commit_all(stores)
    cards = cards_of(folder)
    assert (cards["Acme Corp"].company, cards["Acme Corp"].first) == (True, None)
    pat = cards["Pat"]
    assert (pat.company, pat.organization, pat.job_title) == (False, "Acme Corp", "Engineer")


def test_cards_with_partial_names_are_kept(book, stores, folder):
    book.card("Solo", phones=())
    book.card(nickname="Ace", phones=())
    book.card(phones=(), emails=["only@example.com"])
    commit_all(stores)
    cards = read_contacts(folder).cards
    assert {(c.first, c.last, c.nickname) for c in cards if c.first or c.nickname} == {
        (None, None, "Ace"), ("Solo", None, None)}
    assert [c.emails[0].value for c in cards if not (c.first or c.nickname)] == ["only@example.com"]


def test_cards_with_nothing_on_them_are_skipped_and_counted(book, stores, folder):
    book.card(phones=(), note="a note is not enough")
    book.card("Kept")
    commit_all(stores)
    snapshot = read_contacts(folder)
    assert [c.first for c in snapshot.cards] == ["Kept"]
    assert snapshot.skipped == {"empty-card": 1}


def test_blank_fields_read_as_nothing_and_blobs_or_numbers_as_text(book, stores, folder):
    pk = book.card("Odd", "   ", middle="", nickname="x", organization="x", job_title=" ",
                   phones=[("  +1 613 555 0100 ", "Mobile"), ("   ", "Home"), ("+1 613 555 0101", "Work")],
                   emails=[("", None), (" odd@example.com", None)])
    book.conn.execute("UPDATE ZABCDRECORD SET ZNICKNAME = X'4f6464696521', ZORGANIZATION = 42 WHERE Z_PK = ?", (pk,))
    book.conn.execute("UPDATE ZABCDPHONENUMBER SET ZFULLNUMBER = CAST(ZFULLNUMBER AS BLOB) WHERE ZOWNER = ? "
                      "AND ZORDERINGINDEX = 2", (pk,))
    book.card("  ", phones=[(" ", "Mobile")], emails=[("", None)])  # blanks only: nothing on the card
    commit_all(stores)
    snapshot = read_contacts(folder)
    odd = next(c for c in snapshot.cards if c.first == "Odd")
    assert (odd.last, odd.middle, odd.nickname, odd.organization, odd.job_title) == (None, None, "Oddie!", "42", None)
    assert [p.value for p in odd.phones] == ["+1 613 555 0100", "+1 613 555 0101"]
    assert [e.value for e in odd.emails] == ["odd@example.com"]
    assert len(snapshot.cards) == 1 and snapshot.skipped == {"empty-card": 1}


def test_card_fields_come_through(book, stores, folder):
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    book.card("Jane", "Doe", middle="Q", nickname="JD", unique_id="AAAA-1111:ABPerson", link_id="LINK-1",
              modified=when)
    commit_all(stores)
    jane = cards_of(folder)["Jane"]
    assert (jane.unique_id, jane.last, jane.middle, jane.nickname, jane.link_id) == (
        "AAAA-1111:ABPerson", "Doe", "Q", "JD", "LINK-1")
    assert jane.modified == pytest.approx(when.timestamp())


def test_note_text_comes_from_the_note_table(book, stores, folder):
    book.card("Noted", note="Met at the 2023 offsite.\nLikes tea.")
    book.card("Plain")
    commit_all(stores)
    cards = cards_of(folder)
    assert (cards["Noted"].note, cards["Plain"].note) == ("Met at the 2023 offsite.\nLikes tea.", None)


def test_phones_and_emails_primary_first_then_apple_order_with_labels_unwrapped(book, stores, folder):
    book.card("Multi",
              phones=[("+1 555 010 0001", "Home"), ("+1 555 010 0002", "Mobile", True), ("555-0003", "Boat")],
              emails=[("a@example.com", "Work"), ("b@example.com", "Home", True), "c@example.com"])
    commit_all(stores)
    multi = cards_of(folder)["Multi"]
    assert multi.phones == (Phone("+1 555 010 0002", "Mobile", True), Phone("+1 555 010 0001", "Home", False),
                            Phone("555-0003", "Boat", False))
    assert multi.emails == (Email("b@example.com", "Home", True), Email("a@example.com", "Work", False),
                            Email("c@example.com", None, False))


def test_a_phone_keeps_the_country_contacts_recorded_for_it(book, stores, folder):
    book.card("Abroad", phones=[("07700 900123", "Mobile", True, "gb"), ("+1 555 010 0007", "Work")])
    commit_all(stores)
    assert [(p.value, p.country) for p in cards_of(folder)["Abroad"].phones] == [
        ("07700 900123", "gb"), ("+1 555 010 0007", None)]


def test_labels_are_stored_wrapped_as_contacts_does(book, stores):
    book.card("Wrapped", phones=[("+1 555 010 0004", "iPhone")])
    commit_all(stores)
    assert book.conn.execute("SELECT ZLABEL FROM ZABCDPHONENUMBER").fetchone()[0] == "_$!<iPhone>!$_"


# -- the user's own card -------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True], ids=["container-me", "source-me"])
def test_me_card_is_not_a_card_but_its_addresses_are_the_users_own(folder, legacy):
    db = AddressBookDB.create(folder / DB_NAME, legacy_me_column=legacy)
    db.card("Me", "Myself", phones=[("+1 (555) 010-0100", "iPhone")], emails=["me@example.com"], me=True)
    db.card("Friend", emails=["friend@example.com"])
    db.commit()
    snapshot = read_contacts(folder)
    assert [c.first for c in snapshot.cards] == ["Friend"]
    assert snapshot.own_addresses == {("+1 (555) 010-0100", None), ("me@example.com", None)}
    db.close()


@pytest.mark.parametrize("same", ["link id", "unique id"])
def test_the_owners_card_in_another_account_linked_to_the_me_card_is_not_a_card_but_the_users_own(
        stores, folder, same):
    """Contacts flags the Me card in one store only; its copy in another account is the same person."""
    stores[""].card("Olivia", "Owner", phones=["+1 415 555 0199"], emails=["olivia@example.com"], me=True,
                    unique_id="ME:ABPerson", link_id="LINK-ME")
    stores[ICLOUD].card("Olivia", "Owner", phones=[("+1 415 555 0188", "Work")],
                        **({"link_id": "LINK-ME"} if same == "link id" else {"unique_id": "ME:ABPerson"}))
    stores[GOOGLE].card("Alice", "Hill", phones=["+1 415 555 0100"], link_id="LINK-ALICE")
    commit_all(stores)
    snapshot = read_contacts(folder)
    assert [c.first for c in snapshot.cards] == ["Alice"]
    assert snapshot.own_addresses == {("+1 415 555 0199", None), ("olivia@example.com", None)}
    assert snapshot.linked_addresses == {("+1 415 555 0188", None)}  # the owner's unless another card holds it


# -- how the stores are read ---------------------------------------------------------------------

def test_statements_per_store_do_not_grow_with_the_number_of_cards(book, stores, folder):
    def statements_for(store_path: Path) -> int:
        seen: list[str] = []
        read_store(store_path, "x", trace=seen.append)
        return sum(not s.startswith("--") for s in seen)  # "--" lines are SQLite's own pragma internals

    book.card("One", emails=["one@example.com"], note="n")
    commit_all(stores)
    few = statements_for(book.path)
    for i in range(50):
        book.card(f"P{i}", phones=[f"+1555010{i:04d}", "+15550109999"], emails=[f"p{i}@example.com"], note="n")
    commit_all(stores)
    assert statements_for(book.path) == few <= 8


def test_changes_still_in_the_wal_are_seen(book, stores, folder):
    pk = book.card("Before", phones=["+1 555 010 0005"])
    book.checkpoint()
    book.update_card(pk, first="After", phones=[("+1 555 010 0006", "Work")], note="edited")
    book.commit()
    assert Path(f"{book.path}-wal").stat().st_size > 0
    card = cards_of(folder)["After"]
    assert (card.phones, card.note) == ((Phone("+1 555 010 0006", "Work", False),), "edited")
    assert book.conn.execute("SELECT Z_OPT FROM ZABCDRECORD WHERE Z_PK = ?", (pk,)).fetchone()[0] == 2


def test_deleted_cards_disappear(book, stores, folder):
    gone = book.card("Gone")
    book.card("Stays")
    book.delete_card(gone)
    commit_all(stores)
    assert list(cards_of(folder)) == ["Stays"]


def test_reading_changes_no_store_file(book, stores, folder):
    book.card("Ann", emails=["ann@example.com"], note="x")
    commit_all(stores)
    files = [p for db in stores.values() for p in (db.path, Path(f"{db.path}-wal"))]
    before = [f.read_bytes() for f in files]
    read_contacts(folder)
    assert [f.read_bytes() for f in files] == before


def test_modified_is_unix_seconds(book, stores, folder):
    book.card("Stamp")
    commit_all(stores)
    raw = book.conn.execute("SELECT ZMODIFICATIONDATE FROM ZABCDRECORD WHERE ZFIRSTNAME = 'Stamp'").fetchone()[0]
    assert cards_of(folder)["Stamp"].modified == raw + APPLE_EPOCH


def test_a_modification_date_that_is_not_a_number_reads_as_unknown(book, stores, folder):
    book.card("Stamp")
    book.conn.execute("UPDATE ZABCDRECORD SET ZMODIFICATIONDATE = 'yesterday' WHERE ZFIRSTNAME = 'Stamp'")
    commit_all(stores)
    assert cards_of(folder)["Stamp"].modified is None
