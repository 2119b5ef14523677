"""Contacts (`AddressBook-v22.abcddb` stores) -> `Card` records.

The AddressBook folder holds a top-level store plus one store per account under `Sources/<UUID>/`.
Each store is read read-only with a fixed set of statements (column probe, entity lookup, records,
phones, emails, notes), whatever the number of cards. Only rows of the `ABCDContact` entity are cards:
groups, containers, info rows and `ABCDSubscribedContact` rows (directory/subscription entries the user
did not create) are left out. The "Me" card is not one of the cards; its phones and emails are the
user's own addresses. Nor is a card Contacts links to it in another account (`owners_apart`): its phones and
emails are the user's too, unless another card holds them (the engine compares them normalised).
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from crm_syncd.sources import APPLE_EPOCH, Card, Email, Phone, sqlite

DB_NAME = "AddressBook-v22.abcddb"
CONTACT_ENTITY = "ABCDContact"
ME_COLUMNS = ("ZCONTAINERWHERECONTACTISME", "ZSOURCEWHERECONTACTISME")  # newer, older
EMPTY_CARD, NO_UNIQUE_ID = "empty-card", "no-unique-id"

_LABEL = re.compile(r"^_\$!<(.*)>!\$_$", re.DOTALL)
_TABLES = ("ZABCDRECORD", "ZABCDPHONENUMBER", "ZABCDEMAILADDRESS", "ZABCDNOTE")
# Card field -> ZABCDRECORD column, in SELECT order after Z_PK, which is Card's order after `store`.
_FIELDS = (("unique_id", "ZUNIQUEID"), ("first", "ZFIRSTNAME"), ("last", "ZLASTNAME"),
           ("middle", "ZMIDDLENAME"), ("nickname", "ZNICKNAME"), ("organization", "ZORGANIZATION"),
           ("job_title", "ZJOBTITLE"), ("link_id", "ZLINKID"))
assert Card._fields[1:1 + len(_FIELDS)] == tuple(name for name, _ in _FIELDS)

Trace = Callable[[str], None]
OwnAddress = tuple[str, str | None]  # a card's phone or email as typed, and the country of a phone's number
Entry = TypeVar("Entry", Phone, Email)


@dataclass
class ContactsSnapshot:
    """Every readable card of one AddressBook folder, and what could not be read."""

    cards: list[Card] = field(default_factory=list)
    own_addresses: set[OwnAddress] = field(default_factory=set)  # the Me cards' phones and emails, as typed
    linked_addresses: set[OwnAddress] = field(default_factory=set)  # those of the owner's cards linked to one
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> cards
    errors: dict[str, str] = field(default_factory=dict)  # store -> problem (locked, corrupt, ...)


def store_paths(addressbook_dir: Path) -> list[Path]:
    """The top-level store (if present), then every `Sources/*/` store, sorted."""
    addressbook_dir = Path(addressbook_dir)
    root = addressbook_dir / DB_NAME
    sqlite.stat(addressbook_dir)  # a refused folder names Full Disk Access, not "no address book"
    return ([root] if sqlite.stat(root) else []) + sorted(addressbook_dir.glob(f"Sources/*/{DB_NAME}"))


def read_contacts(addressbook_dir: Path, *, trace: Trace | None = None) -> ContactsSnapshot:
    """Read every store; a store that is locked, corrupt or vanished does not stop the others.

    NeedsFullDiskAccess propagates: without it no store can be read.
    """
    addressbook_dir = Path(addressbook_dir)
    snapshot = ContactsSnapshot()
    me: list[Card] = []
    for path in store_paths(addressbook_dir):
        store = path.relative_to(addressbook_dir).as_posix()
        try:
            cards, mine, skipped = sqlite.retrying(read_store, path, store, trace=trace)
        except sqlite.NeedsFullDiskAccess:
            raise
        except sqlite.SourceMissing:
            continue  # the account was removed while we listed the folder
        except sqlite.SourceError as exc:
            snapshot.errors[store] = str(exc)
            continue
        snapshot.cards += cards
        me += mine
        snapshot.skipped += skipped
    snapshot.cards, owners = owners_apart(snapshot.cards, me)
    snapshot.own_addresses, snapshot.linked_addresses = typed_addresses(me), typed_addresses(owners)
    return snapshot


def owners_apart(cards: list[Card], me: list[Card]) -> tuple[list[Card], list[Card]]:
    """(the other cards, the owner's): a card Contacts links to a Me card of any store (the same link id or
    unique id: the owner's card in another account, not flagged Me there) is the owner's, as the Me card is."""
    links = {("id", c.unique_id) for c in me if c.unique_id} | {("link", c.link_id) for c in me if c.link_id}
    if not links:
        return cards, []
    others: list[Card] = []
    owners: list[Card] = []
    for card in cards:
        (owners if ("id", card.unique_id) in links or ("link", card.link_id) in links else others).append(card)
    return others, owners


def typed_addresses(cards: list[Card]) -> set[OwnAddress]:
    """The cards' phones (each with its number's country) and emails, as typed."""
    phones = {(p.value, p.country) for c in cards for p in c.phones}
    return phones | {(e.value, None) for c in cards for e in c.emails}


def read_store(path: Path, store: str, *, trace: Trace | None = None
               ) -> tuple[list[Card], list[Card], Counter[str]]:
    """The cards of one store, its Me cards apart, and skip counts."""
    return sqlite.run(path, lambda conn: _read_cards(conn, path, store), trace=trace)


def _read_cards(conn: sqlite3.Connection, path: Path, store: str) -> tuple[list[Card], list[Card], Counter[str]]:
    """`read_store` within its read."""
    cols = _columns(conn)
    if "Z_PK" not in cols["ZABCDRECORD"]:
        raise sqlite.SourceError(f"{path}: not an AddressBook store (no ZABCDRECORD)")
    row = conn.execute("SELECT Z_ENT FROM Z_PRIMARYKEY WHERE Z_NAME = ?", (CONTACT_ENTITY,)).fetchone()
    if row is None:
        raise sqlite.SourceError(f"{path}: no {CONTACT_ENTITY} entity in Z_PRIMARYKEY")
    entity = row[0]
    records = conn.execute(_records_sql(cols["ZABCDRECORD"]), (entity,)).fetchall()
    phones = _values(conn, cols, "ZABCDPHONENUMBER", "ZFULLNUMBER", entity, Phone, also="ZCOUNTRYCODE")
    emails = _values(conn, cols, "ZABCDEMAILADDRESS", "ZADDRESS", entity, Email)
    notes = _notes(conn, cols, entity)
    return _cards(records, phones, emails, notes, store)


def _columns(conn: sqlite3.Connection) -> dict[str, frozenset[str]]:
    """Columns of the tables we read, in one statement (absent tables map to an empty set)."""
    found: dict[str, set[str]] = {t: set() for t in _TABLES}
    names = ", ".join(f"'{t}'" for t in _TABLES)
    for table, column in conn.execute(
            f"SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p "
            f"WHERE m.type = 'table' AND m.name IN ({names})"):
        found[table].add(column)
    return {t: frozenset(c) for t, c in found.items()}


def _records_sql(cols: frozenset[str]) -> str:
    def col(name: str) -> str:
        return name if name in cols else "NULL"

    me = [c for c in ME_COLUMNS if c in cols]
    is_me = " OR ".join(f"{c} IS NOT NULL" for c in me) or "0"
    selected = ", ".join(col(c) for _, c in _FIELDS)
    modified = col("ZMODIFICATIONDATE")  # Apple seconds -> Unix seconds; NULL unless a number
    return (f"SELECT Z_PK, {selected}, COALESCE({col('ZDISPLAYFLAGS')}, 0) & 1, "
            f"CASE WHEN typeof({modified}) IN ('integer', 'real') THEN {modified} + {APPLE_EPOCH} END, "
            f"COALESCE({col('ZPREFERREDFORLINKNAME')}, 0) != 0, ({is_me}) FROM ZABCDRECORD WHERE Z_ENT = ? ORDER BY Z_PK")


def _values(conn: sqlite3.Connection, cols: dict[str, frozenset[str]], table: str, value: str,
            entity: int, record: type[Entry], also: str | None = None) -> dict[int, tuple[Entry, ...]]:
    """Owner Z_PK -> its Phones or Emails, primary first, then Apple's ordering index.

    `also` names one more column, the record's last field (NULL where the store lacks it).
    """
    have = cols[table]
    if not {"ZOWNER", value} <= have:
        return {}
    label = "v.ZLABEL" if "ZLABEL" in have else "NULL"
    primary = "COALESCE(v.ZISPRIMARY, 0)" if "ZISPRIMARY" in have else "0"
    ordering = "v.ZORDERINGINDEX, " if "ZORDERINGINDEX" in have else ""
    extra = f"v.{also}" if also in have else "NULL"
    out: dict[int, tuple[Entry, ...]] = {}
    new = tuple.__new__  # NamedTuples built positionally, without their Python-level __new__
    owner_now, entries = None, []  # rows come grouped by owner
    for owner, raw, lab, prim, more in conn.execute(
            f"SELECT v.ZOWNER, v.{value}, {label}, {primary}, {extra} FROM {table} v "
            f"JOIN ZABCDRECORD r ON r.Z_PK = v.ZOWNER WHERE r.Z_ENT = ? "
            f"ORDER BY v.ZOWNER, {primary} DESC, {ordering}v.Z_PK", (entity,)):
        text = raw.strip() if type(raw) is str else _text(raw)
        if not text:
            continue
        if owner != owner_now:
            if entries:
                out[owner_now] = tuple(entries)
            owner_now, entries = owner, []
        fields = (text, _unwrap(lab), bool(prim), more) if also else (text, _unwrap(lab), bool(prim))
        entries.append(new(record, fields))
    if entries:
        out[owner_now] = tuple(entries)
    return out


def _notes(conn: sqlite3.Connection, cols: dict[str, frozenset[str]], entity: int) -> dict[int, str]:
    """Card Z_PK -> note text: via ZABCDNOTE.ZCONTACT, or ZABCDRECORD.ZNOTE on stores without it."""
    have = cols["ZABCDNOTE"]
    if "ZTEXT" not in have:
        return {}
    if "ZCONTACT" in have:
        sql = ("SELECT n.ZCONTACT, n.ZTEXT FROM ZABCDNOTE n JOIN ZABCDRECORD r ON r.Z_PK = n.ZCONTACT "
               "WHERE r.Z_ENT = ? ORDER BY n.Z_PK")
    elif "ZNOTE" in cols["ZABCDRECORD"]:
        sql = "SELECT r.Z_PK, n.ZTEXT FROM ZABCDRECORD r JOIN ZABCDNOTE n ON n.Z_PK = r.ZNOTE WHERE r.Z_ENT = ?"
    else:
        return {}
    return {pk: text for pk, raw in conn.execute(sql, (entity,)) if (text := _note(raw)) is not None}


def _cards(records: list[tuple], phones: dict[int, tuple[Phone, ...]], emails: dict[int, tuple[Email, ...]],
           notes: dict[int, str], store: str) -> tuple[list[Card], list[Card], Counter[str]]:
    """The store's cards, its Me cards (kept whatever they lack: their addresses are the owner's), skips."""
    cards: list[Card] = []
    me: list[Card] = []
    skipped: Counter[str] = Counter()
    new = tuple.__new__
    for pk, unique_id, first, last, middle, nickname, organization, job_title, link_id, company, modified, \
            preferred, is_me in records:
        card_phones = phones.get(pk, ())
        card_emails = emails.get(pk, ())
        # most fields are empty (None): `_text` only for the others
        first = None if first is None else _text(first)
        last = None if last is None else _text(last)
        middle = None if middle is None else _text(middle)
        nickname = None if nickname is None else _text(nickname)
        organization = None if organization is None else _text(organization)
        if not (is_me or first or last or middle or nickname or organization or card_phones or card_emails):
            skipped[EMPTY_CARD] += 1
            continue
        if (unique_id := _text(unique_id)) is None and not is_me:
            skipped[NO_UNIQUE_ID] += 1
            continue
        (me if is_me else cards).append(new(Card, (
            store, unique_id or "", first, last, middle, nickname, organization,
            None if job_title is None else _text(job_title), None if link_id is None else _text(link_id),
            bool(company), card_phones, card_emails, notes.get(pk), modified, bool(preferred))))
    return cards, me, skipped


def _text(raw: object) -> str | None:
    if raw is None:
        return None
    if type(raw) is not str:  # a BLOB or a number where text belongs
        raw = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return raw.strip() or None


def _note(raw: object) -> str | None:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return raw if isinstance(raw, str) and raw.strip() else None


@functools.lru_cache(maxsize=1024)  # a store has a handful of distinct labels
def _unwrap(label: object) -> str | None:
    text = _text(label)
    if text is None:
        return None
    m = _LABEL.match(text)
    return (m.group(1) or None) if m else text
