"""The pipeline shared by `crm-syncd sync` and `crm-syncd run`.

sources → identity → store → crm, in four steps:

1. `sync_contacts`: read every AddressBook store, merge cards into people, match them against
   the CRM by normalised phone/email, create what is missing, and fill the identity map.
2. `extract`: read a source past its high-water mark in bounded batches and move the rows
   into the outbox together with the new mark (one transaction per batch).
3. `resolve`: give every open item a contact: the identity map, Apple's own person grouping,
   or a placeholder contact ("Unknown (+1-905-555-1234)"), or hold it.
4. `push`: deliver the outbox with bounded concurrency; each item is durably `sending` before
   its request leaves; outcomes are settled in batches; after a crash, `sending` items are
   looked up in the CRM before anything is re-sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crm_syncd import crm as crmlib
from crm_syncd.identity import (
    MISSING_NAME,
    PEOPLE,
    Normalizer,
    Person,
    crm_addresses,
    crm_takes_email,
    is_placeholder,
    merge_cards,
    owner_notes,
    placeholder_fields,
)
from crm_syncd.logs import get_logger, mask_text
from crm_syncd.settings import Settings
from crm_syncd.sources import BEFORE_WINDOW, Batch, Card, contacts as contacts_source, sqlite
from crm_syncd.sources.calls import CallsReader
from crm_syncd.sources.messages import MessagesReader
from crm_syncd.sources.sqlite import NeedsFullDiskAccess, SourceError, SourceMissing, SourceReader
from crm_syncd.store import UNKNOWN_OUTCOME, Item, Mark, NewItem, Store, now_ms
from crm_syncd.watch import wait_event

log = get_logger("crm_syncd.engine")

SOURCES = ("messages", "calls")
DAY_MS = 86_400_000
CREATE_SENT = "contact_create_sent_ms"  # kv: when a contact pass that has not finished last sent a create
CONTACTS_SYNCED = "contacts_synced_ms"  # kv: when the last contacts pass ended (`status` shows it)
OWN_ADDRESSES = "own_addresses_by_store"  # kv: {AddressBook store: its Me cards' addresses, normalised}
UNANSWERED_CREATES = "contact_creates_unanswered"  # kv: [{person, fields, sent_ms}] of creates that may have landed
CONTACTS_PROBLEMS = "contacts_problems"  # kv: the last contacts pass's people not written and fields left out
DROPPABLE = frozenset({"phone", "email"})  # a contact is still worth writing without them
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 15.0  # the longest a returning CRM waits for us
SYNC_WAIT_MAX_S = 60.0  # a one-shot delivery the CRM asks to wait longer ends, keeping the rest queued
DEDUPE_RECHECK_MS = 3_600_000  # a contact found to need no look-up before sends is looked at again hourly


@dataclass
class SourceReport:
    source: str
    rows: int = 0
    added: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    missing: bool = False
    rebuilt: bool = False
    held: bool = False  # the mark waits before rows a later read must see (a message still being sent)
    error: str | None = None  # the database could not be read (damaged, locked past every retry)


@dataclass
class ContactsReport:
    cards: int = 0
    created: list[str] = field(default_factory=list)
    existing: int = 0
    promoted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    owner_edits: list[str] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (kept, possible duplicate) left alone
    merged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (name, the fields the CRM refused and why)
    skipped: Counter[str] = field(default_factory=Counter)
    store_errors: dict[str, str] = field(default_factory=dict)
    missing: bool = False


@dataclass
class PlaceholdersReport:
    created: list[str] = field(default_factory=list)  # names
    refused: list[tuple[str, str]] = field(default_factory=list)  # (name, why): their interactions failed


@dataclass
class PushReport:
    delivered: int = 0
    adopted: int = 0
    retried: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    delivered_by_type: Counter[str] = field(default_factory=Counter)
    unreachable: str | None = None  # why delivery stopped early, if it did
    throttled: float | None = None  # a one-shot delivery ended early: the CRM asked to wait this long (s)
    refused: str | None = None  # the CRM refused the API key (401/403): the owner must fix it


def occurred_iso(ms: int) -> str:
    """UTC ISO-8601 with milliseconds and a Z, as Citadel stores it."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def file_id(path: Path) -> str:
    """Identity of a database file: a restored or recreated file gets a new inode."""
    if (st := sqlite.stat(Path(path))) is None:
        raise FileNotFoundError(path)
    return f"{st.st_dev}:{st.st_ino}"


class Engine:
    def __init__(self, settings: Settings, store: Store, crm: crmlib.CitadelClient, *,
                 known_only: bool = False) -> None:
        self.settings = settings
        self.store = store
        self.crm = crm
        self.known_only = known_only
        self.normalize = Normalizer(settings.default_region)
        self.stopping = threading.Event()  # set by a stopping process: extractions end at their next batch
        self.readers: dict[str, Any] = {
            "messages": MessagesReader(settings.messages_db, group_messages=settings.group_messages,
                                       stop=self.stopping),
            "calls": CallsReader(settings.calls_db, stop=self.stopping),
        }
        self.own_addresses: set[str] = set()  # the owner's own (notes to self are no one's): see `_own_changed`
        # AddressBook store → its Me cards' addresses, as last read (by this process or, for a store it
        # has not read, an earlier one: a run that reads no address book, a store unreadable just now)
        self._me: dict[str, set[str]] = {name: set(own) for name, own in store.get(OWN_ADDRESSES, {}).items()}
        self._own_lock = threading.Lock()
        self._own_named: dict[str, set[str]] = {}  # messages, calls → the owner's addresses they name
        self._people_seen: dict[str, list] = {}  # messages → the `people` it last noted
        self.contacts_stale = False  # set when a contact vanished from the CRM
        self._cards: dict[str, list[Card]] = {}  # AddressBook store → its cards, as last read
        self._store_errors: dict[str, str] = {}  # AddressBook store → why it was last unreadable
        self._day_cache: dict[tuple[int, str], list[dict]] = {}  # (contact, UTC day) -> listing, for one push
        self._adopted: dict[int, int] = {}  # CRM interaction id -> the outbox item that adopted it, for one push
        self._same_contact: dict[int, asyncio.Future[bool]] = {}  # contact id -> still the one made, for one push
        self._ambiguous: Counter[int] = Counter()  # outbox id -> 500s answered to it (this process), until settled
        self._backoff_until = 0.0
        self._backoff_since = 0.0  # when the current round of failures began
        self.crm_failure: str | None = None  # why the CRM did not answer the last delivery; None once it does
        self._failures_in_row = 0
        self._contacts_lock = asyncio.Lock()

    # -- 1. contacts ----------------------------------------------------------------------

    def addressbook_signatures(self) -> dict[str, str]:
        """The `sqlite.signature` of every AddressBook store: two stats per store."""
        base = Path(self.settings.addressbook_dir)
        return {db.relative_to(base).as_posix(): sqlite.signature(db) for db in contacts_source.store_paths(base)}

    def contacts_changed(self) -> bool:
        return self.addressbook_signatures() != self.store.signatures()

    @property
    def contacts_busy(self) -> bool:
        """A contacts sync or a resolution is under way (they take turns: see `sync_contacts`)."""
        return self._contacts_lock.locked()

    async def sync_contacts(self) -> ContactsReport:
        """Bring the CRM's contacts and the identity map in line with the address book.

        One at a time, and never beside `resolve`: two passes at once would each find a person
        missing from the CRM and each create a contact for them.
        """
        async with self._contacts_lock:
            return await self._sync_contacts()

    async def _sync_contacts(self) -> ContactsReport:
        report = ContactsReport()
        base = Path(self.settings.addressbook_dir)
        signatures = self.addressbook_signatures()
        if not signatures:
            report.missing = True
            log.warning("contacts.missing", path=str(base))
        previous = self.store.signatures() if self._cards else {}
        removed = set(self._cards) - set(signatures)
        for store_name in removed:
            del self._cards[store_name]
        for store_name in self._me.keys() - signatures.keys() if signatures else ():  # an account removed
            del self._me[store_name]  # (even before this process); no AddressBook at all: kept as they were
        changed = [name for name, sig in signatures.items() if previous.get(name) != sig or name not in self._cards]
        for name in changed:
            try:
                cards, own, skipped = await asyncio.to_thread(contacts_source.read_store, base / name, name)
            except SourceMissing:
                self._cards.pop(name, None)
                self._me.pop(name, None)
                continue
            except NeedsFullDiskAccess:
                raise
            except SourceError as exc:  # locked or corrupt: keep what we had, and read it again next time
                report.store_errors[name] = str(exc)
                said_before = self._store_errors.get(name) == str(exc)  # said once until it changes
                self._store_errors[name] = str(exc)
                (log.debug if said_before else log.warning)("contacts.store_error", store=name, error=str(exc))
                signatures.pop(name)
                continue
            self._store_errors.pop(name, None)
            self._cards[name] = cards
            self._me[name] = {a for a in map(self.normalize.person, own) if a}
            report.skipped.update(skipped)
        if (me := {name: sorted(own) for name, own in self._me.items()}) != self.store.get(OWN_ADDRESSES, {}):
            self.store.put(OWN_ADDRESSES, me, durable=False)
        self._own_changed()
        if (previous and changed and not removed and set(changed) <= report.store_errors.keys()
                and not self.contacts_stale):  # (a contact vanished: the listing finds who must be made again)
            return report  # only stores that failed again: nothing new for the CRM, so no listing of it

        people = merge_cards([c for cards in self._cards.values() for c in cards], self.normalize)
        report.cards = sum(len(c) for c in self._cards.values())
        await self._creates_landed()
        crm_contacts = await self.crm.list_contacts()
        unanswered = self.store.get(UNANSWERED_CREATES, [])  # creates that may have landed: listed now if they did
        index = _CRMIndex(crm_contacts, self.normalize)
        self.store.prune_contacts({c: contact.get("createdAt") for c, contact in index.by_id.items()})
        index.placeholder_of = {a: c for a, c in self.store.addresses_of("placeholder").items()
                                if c in index.by_id and is_placeholder(index.by_id[c])}
        index.kept_for, index.card_made = self.store.contacts_by_card(), self.store.card_made_addresses()
        self.store.map_each(index.single_owner(), "crm", replace=False)
        live = {person.key for person in people}
        fields = {person.key: person.crm_fields() for person in people}
        self._give_back_by_name(people, fields, index)
        for person in sorted(people, key=lambda p: p.key):
            try:
                await self._apply_person(person, fields[person.key], index, report, live, unanswered)
            except (crmlib.Rejected, crmlib.Ambiguous, crmlib.NotFound, crmlib.BadResponse) as exc:
                # about this person (a 422, a 500 that Citadel gives many bad requests, a contact deleted
                # meanwhile): the others go on. A write that did land is found by the next pass's listing.
                reason = exc.reason if isinstance(exc, crmlib.Rejected) else exc.message
                report.failed.append((fields[person.key]["firstName"] or person.key, reason))
                log.warning("contacts.failed", person=person.key, reason=reason)
        self._creates_answered()
        if unanswered:  # found by now, or never made: only this pass's own stay noted
            self.store.put(UNANSWERED_CREATES, [e for e in self.store.get(UNANSWERED_CREATES, [])
                                                if e not in unanswered])
        await asyncio.to_thread(self.store.attach)  # off the loop: a big backlog may wait for these mappings
        self.store.save_signatures(signatures)
        self.store.put("duplicates", [{"kept": kept, "duplicate": other} for kept, other in report.duplicates])
        self.store.put(CONTACTS_SYNCED, now_ms(), durable=False)
        self.store.put(CONTACTS_PROBLEMS, {  # names masked: `status` shows them as they are
            kind: [{"name": mask_text(name), "reason": reason} for name, reason in problems]
            for kind, problems in (("failed", report.failed), ("left_out", report.left_out))}, durable=False)
        self.contacts_stale = False
        log.info("contacts.synced", cards=report.cards, people=len(people), created=len(report.created),
                 existing=report.existing, promoted=len(report.promoted), updated=len(report.updated))
        return report

    def _own_changed(self) -> None:
        """The owner's own addresses: the Me cards' (a number taken off the Me card is someone's again),
        and those chat.db's chats were last addressed from, unless another card holds them (an old
        number of the owner's, given away)."""
        with self._own_lock:  # extraction's worker thread and the contacts pass on the loop both call it
            named = set().union(*self._own_named.values())
            self.own_addresses = set().union(*self._me.values()) | (named - self.store.on_cards(named))

    async def _apply_person(self, person: Person, fields: dict, index: _CRMIndex, report: ContactsReport,
                            live: set[str], unanswered: list[dict]) -> None:
        """Match, create or promote the person's contact, follow card edits, fold in duplicates.

        A contact remembered for another person of this address book (`live` keys) is theirs: a number
        moved from their card to this one moves alone, whichever person comes first. `unanswered`: the
        creates earlier passes sent without an answer (`_own_unanswered_create`).
        """
        name = f"{fields['firstName']} {fields['lastName']}"
        candidates = self._unclaimed(index.for_person(person, fields), person, fields, live, index)
        remembered = self.store.contact_for_person(person.key)
        if remembered not in index.by_id:  # their key changed: a card added, linked, deleted or moved
            known = self._kept_under_another_key(person, fields, live, index)
            remembered = known[0] if known else None
            candidates.update(known)
        if remembered is not None:
            candidates.add(remembered)
        if not candidates and not person.addresses:
            candidates = self._unclaimed(index.named(fields["firstName"], fields["lastName"]), person, fields, live,
                                         index)
        # their latest create sent without an answer (one an earlier pass sent, then found unmade, was not)
        lost = next((e for e in reversed(unanswered) if e["person"] == person.key), None)
        if not candidates and lost is not None:
            # their create whose answer was lost went without the addresses the CRM refused: by name, as sent
            candidates = {c for c in self._unclaimed(index.named(fields["firstName"], fields["lastName"]), person,
                                                     fields, live, index)
                          if not _owner_edited(lost["fields"], index.by_id[c])}
        real = sorted(c for c in candidates if not is_placeholder(index.by_id[c]))
        placeholders = sorted(c for c in candidates if is_placeholder(index.by_id[c]))

        if not candidates:
            created, refused = await self._writing(  # noted as sent: without a field the CRM refused
                lambda sent: self._create_contact(sent, made_for=(person.key, {k: sent.get(k) for k in fields})),
                _present(fields), name)
            survivor = created["id"]
            index.add(created)
            # a field left out holds what the CRM has: not taken for an edit of the owner's, nor sent again
            # until the card changes it
            written = {**fields, **{k: created.get(k) for k in refused}}
            self.store.remember_contact(survivor, "card", person.key, written=written, cards=person.unique_ids,
                                        created_at=created.get("createdAt"), card=fields, left_out=refused)
            _report_left_out(report, name, refused)
            report.created.append(name)
        elif real:
            survivor = remembered if remembered in real else self._preferred(real)
            if lost is not None:
                self._own_unanswered_create(survivor, person, index, lost)
            report.existing += 1
            await self._follow_edits(survivor, person, fields, index, report, name)
            filed = (self.store.known_contact(survivor) or ("", None))[1]
            if filed in (None, person.key) or filed not in live:  # the owner's own may serve several people
                self.store.keep_contact_for(survivor, person.key, person.unique_ids)  # theirs under today's key
        else:
            survivor = placeholders[0]
            await self._dedupe_wanted(survivor)  # settled while it is known as found, not made, if another Mac made it
            updated, refused = await self._writing(lambda sent: self.crm.update_contact(survivor, sent),
                                                   _present(_promotion(fields, index.by_id[survivor])), name)
            index.replace(updated)
            # written: what the CRM now holds (a number a card without one leaves, the owner's notes before
            # the card's), which an edit of the owner's would differ from; card: what the card's edits will
            self.store.remember_contact(survivor, "card", person.key, written={k: updated.get(k) for k in fields},
                                        cards=person.unique_ids, card=fields, left_out=refused)
            _report_left_out(report, name, refused)
            report.promoted.append(name)
            log.info("contacts.promoted", contact_id=survivor)
        self.store.map_addresses(person.owned, survivor, "card")
        for other in sorted(candidates - {survivor}):
            if not await self._merge(other, survivor, index):
                report.duplicates.append((survivor, other))
            else:
                report.merged.append(name)

    def _give_back_by_name(self, people: list[Person], fields: dict[str, dict], index: _CRMIndex) -> None:
        """A contact remembered for one person but written under another's name, holding their number or
        email and not this one's, is theirs (linked cards the owner unlinked, people an older crm-syncd
        merged for a shared number), unless they have one already."""
        by_name: dict[tuple, list[Person]] = {}
        for person in people:
            by_name.setdefault((fields[person.key]["firstName"], fields[person.key]["lastName"]), []).append(person)
        for person in people:
            contact_id = self.store.contact_for_person(person.key)
            known = self.store.known_contact(contact_id) if contact_id in index.by_id else None
            if known is None or known[2] is None or _same_name(known[2], fields[person.key]):
                continue
            named = by_name.get((known[2].get("firstName"), known[2].get("lastName")), [])
            holds = set(crm_addresses(index.by_id[contact_id], self.normalize))
            if len(named) != 1:
                continue
            other = named[0]  # holds their number or email and none of this person's but a shared one (a family email)
            if (holds & set(other.owned) and not holds & (set(person.owned) - set(other.addresses))
                    and self.store.contact_for_person(other.key) is None):
                self.store.remember_contact(contact_id, known[0], other.key, cards=other.unique_ids)
                log.info("contacts.given_back", contact_id=contact_id)

    def _kept_under_another_key(self, person: Person, fields: dict, live: set[str], index: _CRMIndex) -> list[int]:
        """The contacts crm-syncd made or kept for this person under another key, best first: those filed
        under one of their cards, then those it made for a card holding one of their numbers or emails
        (which the CRM may no longer hold: the owner changed it there), as `_unclaimed` leaves them."""
        by_card = sorted({c for unique_id in person.unique_ids for c in index.kept_for.get(unique_id, ())})
        by_address = sorted({c for a in person.owned if (c := index.card_made.get(a)) is not None} - set(by_card))
        found = [c for c in by_card + by_address if c in index.by_id]
        free = self._unclaimed(set(found), person, fields, live, index)
        return [c for c in found if c in free]

    def _unclaimed(self, contact_ids: set[int], person: Person, fields: dict, live: set[str],
                   index: _CRMIndex) -> set[int]:
        """The contacts not remembered for another person: not one still in the address book, nor one
        made for a person gone from it (who shared this one's number), unless it was made for one of
        this person's cards (their smallest unique id changed: a card added, linked or deleted) or
        under their name. A contact the owner made serves another person only under their name too."""
        def free(contact_id: int) -> bool:
            origin, key, written = self.store.known_contact(contact_id) or ("", None, None)
            if key is None or key == person.key:
                return True
            if key in live:  # another person's, unless the owner made it under this one's name too (one
                return origin == "crm" and _same_name(index.by_id[contact_id], fields)  # person, unlinked cards)
            return (origin != "card" or written is None or _same_name(written, fields)
                    or bool(self.store.contact_cards(contact_id) & person.unique_ids))
        return {c for c in contact_ids if free(c)}

    def _preferred(self, contact_ids: list[int]) -> int:
        """Among several real contacts, the owner's own survives (the lowest id among equals)."""
        ours = {c for c in contact_ids if (self.store.known_contact(c) or ("",))[0] in ("card", "placeholder")}
        return min(contact_ids, key=lambda c: (c in ours, c))

    async def _merge(self, victim: int, survivor: int, index: _CRMIndex) -> bool:
        """Fold a duplicate crm-syncd made into `survivor`; False if it must stay (the owner's).

        Citadel cannot move an interaction: the victim's are re-created under the survivor
        (through the outbox, so exactly once), then the victim is deleted.
        """
        known = self.store.known_contact(victim)
        if not known or known[0] not in ("card", "placeholder", "merging"):
            return False  # made by the owner: never deleted, only reported
        if known[0] != "merging":
            current = index.by_id[victim]
            if (_owner_edited(known[2], current) or _owner_filled(current, known[2], known[0])
                    or (known[0] == "placeholder" and not is_placeholder(current))
                    or (known[0] == "card" and _beyond_card(known[2], self.store.applied_card(victim)[0]))):
                return False  # the owner renamed, annotated or filled it in: theirs now
            theirs = {i["id"] for i in await self.crm.list_interactions(victim)} - self.store.crm_ids(victim)
            if theirs:
                return False  # the owner added something to it: keep it, report it
            self.store.begin_merge(victim, survivor)
        try:
            await self.crm.delete_contact(victim)
        except crmlib.NotFound:
            pass
        self.store.forget_contact(victim)
        index.remove(victim)
        log.info("contacts.merged", survivor=survivor, removed=victim)
        return True

    async def _follow_edits(self, contact_id: int, person: Person, fields: dict, index: _CRMIndex,
                            report: ContactsReport, name: str) -> None:
        """Apply card edits to a contact crm-syncd created, unless the owner edited it in the CRM; what
        a card of the person that is gone gave stays (`_lasting`).

        The card's edits are what differs from the card as last applied; the owner's, what differs from
        the CRM's fields as crm-syncd left them (`written`). They are not the same when the contact holds
        what the card does not (a promoted placeholder's number and notes) or lacks what it does (a field
        the CRM refused): either is then neither an edit to send nor one of the owner's."""
        known = self.store.known_contact(contact_id)
        if not known or known[0] != "card" or known[2] is None:
            return
        written = known[2]
        card, left_out = self.store.applied_card(contact_id)
        current = index.by_id[contact_id]
        if card is None:  # recorded before the two were kept apart
            card, written = written, self._promoted_before(contact_id, written, current)
        if card == fields or _owner_edited(written, current):
            if card != fields:
                report.owner_edits.append(name)
                log.info("contacts.owner_edit_kept", contact_id=contact_id)
            # refused values the card still holds and the CRM still lacks: named every pass, sent no more
            _report_left_out(report, name, {k: reason for k, reason in left_out.items() if fields.get(k) == card.get(k)
                                            and (current.get(k) or None) != fields.get(k)})
            return
        changes = {k: v for k, v in fields.items() if v != card.get(k)}
        gone = bool(self.store.contact_cards(contact_id) - person.unique_ids)
        lasting = _lasting(changes, written, card, gone, person.nameless)
        sent = {k: v if v is not None else "" for k, v in lasting.items()}
        if "notes" in sent:  # what the owner wrote in front of the card's note stays in front
            sent["notes"] = _notes_after(written.get("notes"), card.get("notes"), fields.get("notes"))
        updated, refused = await self._writing(
            lambda sent: self.crm.update_contact(contact_id, sent) if sent else _as_is(current), sent, name)
        index.replace(updated)
        left_out = {**{k: reason for k, reason in left_out.items() if k not in changes}, **refused}
        self.store.remember_contact(contact_id, "card", written={**written, **{k: updated.get(k) for k in sent}},
                                    card=fields, left_out=left_out)
        _report_left_out(report, name, left_out)
        if sent.keys() - refused.keys():  # not when the CRM refused all there was to write
            report.updated.append(name)

    def _promoted_before(self, contact_id: int, written: dict, current: dict) -> dict:
        """`written` as recorded by a version that kept one record for a card's fields and the CRM's, with
        what its promotion of a placeholder left beside the card's fields: the owner's notes in front of
        the card's note, the placeholder's own number or email where the card had none. Recorded once
        found; any other difference stays an edit of the owner's."""
        kept = {}
        for key, value in written.items():
            now = current.get(key) or None
            if now == (value or None):
                continue
            if key == "notes" and value and now and now.endswith("\n" + value) and now[:-len(value) - 1].strip():
                kept[key] = now
            elif (key in ("phone", "email") and value is None and (address := self.normalize.person(now))
                  and self.store.addresses_of("placeholder").get(address) == contact_id):
                kept[key] = now
            else:
                return written
        if kept:
            self.store.remember_contact(contact_id, "card", written={**written, **kept}, card=written)
            log.info("contacts.promotion_recorded", contact_id=contact_id, fields=sorted(kept))
        return {**written, **kept}

    async def _writing(self, write: Callable[[dict], Any], sent: dict, name: str) -> tuple[dict, dict[str, str]]:
        """`write(sent)`; if the CRM refuses only a phone or an email of it (a 422 naming no other field: an
        address it takes for invalid), once more without them. The contact, and {field: the CRM's reason}
        of the fields left out (recorded, so they are reported at every pass and not sent again until the
        card changes them)."""
        try:
            return await write(sent), {}
        except crmlib.Rejected as exc:
            refused = {key: ", ".join(messages) for key, messages in exc.details.items()}
            if not refused or not refused.keys() <= DROPPABLE or not refused.keys() & sent.keys():
                raise
        contact = await write({k: v for k, v in sent.items() if k not in refused})
        log.warning("contacts.field_left_out", contact_id=contact.get("id"), fields=sorted(refused),
                    reason=_left_out_reason(refused))
        return contact, {k: refused[k] for k in sorted(refused) if k in sent}

    # -- 2. extraction --------------------------------------------------------------------

    def extract(self, source: str, *, full: bool = False, days: int | None = None,
                progress: Callable[[int], None] | None = None) -> SourceReport:
        """Move new rows of one source into the outbox. Blocking; run it off the event loop."""
        report = SourceReport(source)
        reader = self.readers[source]
        try:
            current_file = file_id(reader.path)
        except FileNotFoundError:
            report.missing = True
            log.warning("extract.missing", source=source, path=str(reader.path))
            return report
        mark = self.store.mark(source)
        now = now_ms()
        since = now - days * DAY_MS if days is not None else None
        after, floor = 0, 0
        verdicts: dict[str | tuple[str, str], tuple[str, bool]] = {}  # raw address [and country] -> _counterpart
        with reader.session() as session:
            self._own_named[source] = {a for a in map(self.normalize.person, session.own_addresses()) if a}
            self._own_changed()
            self._people(source, session.people())
            if mark is None and since is None and not full:
                since = now - self.settings.initial_lookback_days * DAY_MS
            elif mark is not None and full:
                floor = mark.rowid  # --full re-reads from the start but never moves the mark back
            elif mark is not None:
                after = mark.rowid
                if self._replaced(session, mark, current_file):
                    report.rebuilt = True
                    log.warning("extract.rebuilt", source=source, mark=after)
                    after = 0  # read over the lookback window (a --days run's, if wider), as a first sync
                    since = min(since or now, now - self.settings.initial_lookback_days * DAY_MS)
                elif days is not None:  # --days N reads its days behind the mark too, never moving it back
                    after, floor = 0, mark.rowid
            resumed = mark is not None and not report.rebuilt  # else a lookback pass
            # rows already in the outbox may come again: all of them (--full, a rebuild), or those above a
            # mark an earlier pass held (a send under way, a --days run) while it went on queueing
            rereading = mark is not None
            # The window this pass's marks carry (a pass that completes drops it):
            if not resumed:  # a lookback pass's own: a mark saved part-way (a send under way, a crash) keeps it
                window = since
            elif full:  # --full reads past the mark without one
                window = None
            else:  # the one a lookback pass that stopped part-way left in the mark
                window = mark.window_ms
            if since is None:  # rows past the mark obey the window (--days N reads its own N days)
                since = window
            narrower = since is not None and (window is None or since > window)
            kept = mark._replace(file_id=current_file) if resumed else Mark(0, current_file, None, window)
            held = False  # once a row must be read again, the mark moves no further in this read
            while not self.stopping.is_set():
                batch = session.read(after, limit=self.settings.batch_size, since_ms=since)
                if batch.rows == 0 and batch.last_rowid <= after:
                    break
                if rereading and batch.fanned_out:
                    report.duplicates += self._keep_first_parties(batch)
                items, hints = self._items(batch, report, verdicts)
                # rows a later read must see stop the mark: old ones above it that a window narrower than
                # the mark's left out (they came late), or a message still being sent or dated ahead of the
                # clock (the mark waits just before it)
                dropped = resumed and narrower and batch.skipped[BEFORE_WINDOW] and batch.last_rowid > mark.rowid
                if held or dropped:
                    held = True
                elif batch.unsettled is not None:
                    held = True
                    if kept.rowid < batch.unsettled - 1:  # with its row's anchor (tells a rebuild)
                        kept = Mark(batch.unsettled - 1, current_file, session.anchor(batch.unsettled - 1),
                                    kept.window_ms)
                elif batch.last_rowid >= floor:  # --full behind the mark keeps it (floor is 0 without one)
                    kept = Mark(batch.last_rowid, current_file, batch.anchor, window)
                result = self.store.enqueue(source, items, kept, hints, batch.screened)
                report.rows += batch.rows
                report.added += result.added
                report.duplicates += result.duplicates
                report.skipped.update(batch.skipped)
                if batch.rows:
                    log.info("extract.batch", source=source, rows=batch.rows, added=result.added,
                             mark=batch.last_rowid)
                if progress:
                    progress(batch.rows)
                if batch.last_rowid <= after:
                    break
                after = batch.last_rowid
            # a complete pass: every row has met the window (an empty source keeps no mark: its first rows
            # still get a first sync)
            if kept.window_ms is not None and not held and kept.rowid > 0 and not self.stopping.is_set():
                self.store.enqueue(source, [], kept._replace(window_ms=None))
        report.held = held
        return report

    def _people(self, source: str, parties: list[tuple[str, str | None, str | None]]) -> None:
        """Note which addresses Apple takes for one person, every one the database holds, not only those
        of the rows read: a number whose texts lie outside a `--days` window, and whose call is read,
        shares the placeholder of the same person's email. Written when they change."""
        if not parties or self._people_seen.get(source) == parties:
            return
        hints = {}
        for address, person, country in parties:
            value, is_person = self._counterpart(address, country)
            if is_person and person:
                hints[value] = person
        self.store.remember_hints(hints)
        self._people_seen[source] = parties

    def _keep_first_parties(self, batch: Batch) -> int:
        """A row with several parties that is read again keeps those it was first read with: a group
        chat's members are today's, not the send's, and someone added since never got the message.
        Drops the Activities of rows already in the outbox; returns how many (all known rows)."""
        known = self.store.keys_continued(batch.fanned_out)
        if not known:
            return 0
        prefixes = tuple(f"{shared}:" for shared in known)
        kept = [a for a in batch.activities if not a.key.startswith(prefixes)]
        dropped = len(batch.activities) - len(kept)
        batch.activities = kept
        return dropped

    @staticmethod
    def _replaced(session: SourceReader, mark: Mark, current_file: str) -> bool:
        """Whether the source is no longer the database `mark` was taken in.

        Another file, a mark above every ROWID the database has handed out, or another row at the mark
        (a database deleted and recreated may get the same inode back). Rows merely missing at or below
        the mark were deleted by the owner.
        """
        if (mark.file_id and mark.file_id != current_file) or session.high_water() < mark.rowid:
            return True
        return mark.anchor is not None and session.anchor(mark.rowid) not in (None, mark.anchor)

    def _items(self, batch: Batch, report: SourceReport,
               verdicts: dict[str | tuple[str, str], tuple[str, bool]]) -> tuple[list[NewItem], dict[str, str]]:
        """The batch's Activities as outbox items; counterparts that are not other people are counted as skipped.

        `verdicts` remembers each raw address's `_counterpart` (with its country, if it has one) across
        the batches of one extraction.
        """
        items: list[NewItem] = []
        hints: dict[str, str] = {}
        add, new, skipped, region = items.append, tuple.__new__, report.skipped, self.normalize.region
        for key, address, interaction, occurred_ms, duration_s, person, country in batch.activities:
            seen = address if country is None or country == region else (address, country)
            verdict = verdicts.get(seen)
            if verdict is None:
                verdict = verdicts[seen] = self._counterpart(address, country)
            value, is_person = verdict
            if not is_person:
                skipped[value] += 1
                continue
            add(new(NewItem, (key, value, interaction, occurred_ms, duration_s)))
            if person:
                hints[value] = person
        return items, hints

    def _counterpart(self, raw: str, country: str | None = None) -> tuple[str, bool]:
        """(normalised address, True) for someone else; (why not, False) otherwise."""
        kind, value = self.normalize(raw, country)
        if kind not in PEOPLE:
            return kind, False
        if value in self.own_addresses:
            return "own-address", False
        return value, True

    # -- 3. resolution --------------------------------------------------------------------

    async def resolve(self) -> PlaceholdersReport:
        """Give open items a contact: the one their address (or a handle Messages groups with it) has,
        else a placeholder made for them, unless placeholders are off (--known-only,
        create_unknown_contacts = false): then they are held."""
        async with self._contacts_lock:
            return await self._resolve()

    async def _resolve(self) -> PlaceholdersReport:
        report = PlaceholdersReport()
        await asyncio.to_thread(self.store.attach)  # off the loop; the store's own calls below then find none due
        placeholders = not self.known_only and self.settings.create_unknown_contacts
        done: set[str] = set()
        listed: _CRMIndex | None = None  # the CRM's contacts, listed once a placeholder may be needed
        for address in self.store.unresolved_addresses(held=True):
            if address in done:
                continue
            person = self.store.hint(address)
            group = sorted(set(self.store.addresses_with_hint(person)) | {address}) if person else [address]
            done.update(group)
            known = next((c for c in map(self.store.contact_for, group) if c is not None), None)
            if known is not None:  # a placeholder's stays known as such: a card holding the new handle promotes it
                origin = "placeholder" if (self.store.known_contact(known) or ("",))[0] == "placeholder" else "person"
                self.store.map_addresses(group, known, origin)
                continue
            if not placeholders:
                continue
            primary = next((a for a in group if a.startswith("+")), group[0])
            # A contact may hold it since the last contacts sync: made by the owner or another Mac, or by
            # a placeholder create of ours whose answer was lost. Citadel's search cannot find a phone
            # stored in another format, so the listing is searched here, normalised like the cards.
            if listed is None:
                await self._creates_landed()
                listed = _CRMIndex(await self.crm.list_contacts(), self.normalize)
            if owners := listed.matching(group):
                existing = listed.by_id[min(owners)]
                if is_placeholder(existing):  # not written by this Mac (written=None): it looks before sending
                    self.store.remember_contact(existing["id"], "placeholder", f"placeholder:{primary}")
                self.store.map_addresses(group, existing["id"], "crm")
                continue
            fields = placeholder_fields(primary)
            name = f"{fields['firstName']} {fields['lastName']}"
            # an email the CRM is known to refuse is not sent (nor promised by a dry run): its 422's words
            refusal = None if "@" not in primary or crm_takes_email(primary) else "email: Invalid email"
            if refusal is None:
                try:
                    contact = await self._create_contact(fields)
                except crmlib.Rejected as exc:
                    refusal = exc.reason
            if refusal is not None:
                self.store.fail_open(group, f"placeholder rejected by the CRM: {refusal}")
                report.refused.append((name, refusal))
                log.warning("contacts.placeholder_refused", address=primary, reason=refusal)
                continue
            self.store.remember_contact(contact["id"], "placeholder", f"placeholder:{primary}", written=fields,
                                        created_at=contact.get("createdAt"))
            self.store.map_addresses(group, contact["id"], "placeholder")
            report.created.append(name)
            log.info("contacts.placeholder", contact_id=contact["id"], address=primary)
        self._creates_answered()
        if not placeholders:
            self.store.hold_unresolved("unknown contact")  # attaches what was mapped above first
        await asyncio.to_thread(self.store.attach)
        return report

    async def _create_contact(self, fields: dict, made_for: tuple[str, dict] | None = None) -> dict:
        """POST a contact, noting the moment first: if its pass ends before the answer (a stop, a crash,
        a lost answer), the next pass knows the contact may still appear (`_creates_landed`). A card's
        create is noted first with its person and fields (`made_for`), the note kept unless a definite
        answer comes: the contact the next pass finds for them is the one crm-syncd made
        (`_own_unanswered_create`)."""
        self.store.put(CREATE_SENT, now_ms(), durable=False)  # a power cut outlasts any request anyway
        # each note its own (its moment): a create sent again as an earlier one was is not taken for it
        note = {"person": made_for[0], "fields": made_for[1], "sent_ms": now_ms()} if made_for is not None else None
        if note is not None:
            self.store.put(UNANSWERED_CREATES, [*self.store.get(UNANSWERED_CREATES, []), note], durable=False)
        try:
            contact = await self.crm.create_contact(fields)
        except crmlib.CRMError as exc:
            if note is not None and not exc.maybe_written:
                self._answered(note)
            raise
        if note is not None:
            self._answered(note)
        return contact

    def _answered(self, note: dict) -> None:
        """Drop the note of a create whose outcome is known (made, or certainly not)."""
        notes = self.store.get(UNANSWERED_CREATES, [])
        if note in notes:
            notes.remove(note)
            self.store.put(UNANSWERED_CREATES, notes, durable=False)

    def _own_unanswered_create(self, contact_id: int, person: Person, index: _CRMIndex, lost: dict) -> None:
        """File a contact found for a person as crm-syncd's, with what it sent, when it is exactly what
        their create whose answer was lost (`lost`: its note) would have made: its card edits are then
        followed. (The pass drops the notes it was given when it ends.)"""
        if _owner_edited(lost["fields"], current := index.by_id[contact_id]):
            return
        known = self.store.known_contact(contact_id)
        if known is None or (known[0] == "crm" and known[2] is None):
            self.store.remember_contact(contact_id, "card", person.key, written=lost["fields"],
                                        cards=person.unique_ids, created_at=current.get("createdAt"),
                                        card=lost["fields"])
            log.info("contacts.create_found", contact_id=contact_id)

    def _creates_answered(self) -> None:
        """The pass ends: every create it sent was answered (or refused)."""
        if self.store.get(CREATE_SENT) is not None:
            self.store.put(CREATE_SENT, None, durable=False)

    async def _creates_landed(self) -> None:
        """Before listing the CRM's contacts: a create an unfinished pass sent less than a request timeout
        ago may still be on its way in, and a listing taken now would miss it and make the contact twice."""
        if (sent := self.store.get(CREATE_SENT)) is not None:
            await self._outlast_request(sent, "contacts.create_waits")

    async def _outlast_request(self, sent_ms: int, event: str, **fields: Any) -> None:
        """Wait until a request sent at `sent_ms` (wall clock) can no longer be on its way into the CRM:
        one request timeout after it, and never longer (the clock may have been set back since)."""
        timeout = self.settings.request_timeout_s
        if (wait := min(timeout, sent_ms / 1000 + timeout - time.time())) > 0:
            log.info(event, seconds=round(wait, 1), **fields)
            await asyncio.sleep(wait)

    # -- 4. delivery ----------------------------------------------------------------------

    async def push(self, *, stop: asyncio.Event | None = None) -> PushReport:
        """Deliver everything deliverable, then return (early when `stop` is set).

        `push_concurrency` workers take claimed items from one queue, each sending its next
        request as soon as its last is answered (keep-alive connections never wait for a
        scheduler); this loop keeps the queue topped up and settles outcomes in batches.
        Without `stop` (one-shot sync) it also gives up once the CRM has failed several
        times in a row, or asks to wait over SYNC_WAIT_MAX_S (`throttled`): whatever is left
        stays queued for the next run.
        """
        report = PushReport()
        limit = self.settings.push_concurrency
        queue: asyncio.Queue[Item] = asyncio.Queue()
        outcomes: list[tuple[str, Item, Any]] = []
        wake = asyncio.Event()  # the queue runs low, outcomes pile up, or a worker fell idle
        halt = asyncio.Event()  # delivery ends: an item still waiting out a back-off goes back unsent
        busy = 0

        async def worker() -> None:
            nonlocal busy
            while True:
                await self._wait_backoff()  # holding no item: a halt meanwhile finds them all in the queue
                item = await queue.get()
                busy += 1
                try:
                    outcomes.append(await self._deliver(item, halt))
                finally:
                    busy -= 1
                if queue.qsize() < limit or len(outcomes) >= 64 or not busy:
                    wake.set()

        async def woken(seconds: float) -> None:
            wake.clear()
            try:  # not wait_for: on 3.11 it swallows a cancellation that comes as the event is set
                async with asyncio.timeout(seconds):
                    await wake.wait()
            except TimeoutError:
                pass

        def halted() -> bool:
            if stop is None and self.backoff_left() > SYNC_WAIT_MAX_S:
                report.throttled = self.backoff_left()
                return True
            return bool(stop and stop.is_set()) or (
                stop is None and report.unreachable is not None and self._failures_in_row >= 3)

        self._day_cache.clear()  # another Mac may have written since the last pass: list each day afresh
        self._adopted.clear()  # the last pass's adoptions are in the ledger now, or still `sending` and looked up anew
        self._same_contact.clear()  # a CRM restored from a backup may have given a contact's id to another since
        if not await self._recover(report):
            return report
        workers = [asyncio.create_task(worker()) for _ in range(limit)]
        last_settle = time.monotonic()
        try:
            while True:
                if outcomes and (len(outcomes) >= 64 or time.monotonic() - last_settle > 0.05 or not busy):
                    self._settle(outcomes, report)
                    last_settle = time.monotonic()
                if dead := next((task for task in workers if task.done()), None):
                    dead.result()  # a worker fell to a bug: raise it (its item stays `sending`, looked up later)
                if halted():
                    break
                if queue.qsize() < limit:  # at most 3 × limit `sending` at once, as many as a crash leaves to look up
                    for item in self.store.claim(2 * limit - queue.qsize()):
                        queue.put_nowait(item)
                if queue.empty() and not busy:
                    if self.contacts_stale:
                        await self.sync_contacts()
                        await self.resolve()
                        continue
                    if self.store.sending():  # unsure writes: look them up, then resend what is missing
                        if not await self._recover(report):
                            break
                        continue
                    break
                await woken(min(1.0, max(0.05, self.backoff_left())))  # no busy waking while everything waits
        finally:
            halt.set()
            unsent = [queue.get_nowait() for _ in range(queue.qsize())]  # claimed, never sent: back to pending
            deadline = time.monotonic() + self.settings.shutdown_deadline_s
            while busy and time.monotonic() < deadline and not asyncio.current_task().cancelling():
                await woken(min(0.1, deadline - time.monotonic()))
            for task in workers:
                task.cancel()  # an abandoned request stays `sending`: the next start looks it up
            self._settle(outcomes, report)
            if unsent:
                self.store.settle(retry=[(item, None) for item in unsent])
        return report

    async def _deliver(self, item: Item, halt: asyncio.Event) -> tuple[str, Item, Any]:
        if not await self._wait_backoff(halt):
            return "unsent", item, None
        payload = {"type": item.type, "occurredAt": occurred_iso(item.occurred_ms), "source": "IMPORT_IOS"}
        if item.duration_s:
            payload["durationSeconds"] = item.duration_s
        try:
            if not await self._still_the_contact(item.contact_id):
                return "vanished", item, None  # its id is another contact's now: forgotten, matched afresh
            if await self._dedupe_wanted(item.contact_id):
                existing = await self._find_in_crm(item)
                if existing is not None:
                    return "adopted", item, existing
            created = await self.crm.create_interaction(item.contact_id, payload)
        except crmlib.Rejected as exc:
            return "failed", item, exc.reason
        except crmlib.NotFound:
            return "vanished", item, None
        except crmlib.Unauthorized as exc:  # nothing was written; it waits for the owner to fix the key
            self.back_off(exc.retry_after)
            return "refused", item, exc.message
        except crmlib.CRMError as exc:  # transient, a 500, or answers that are not Citadel's
            # The CRM is unwell: all wait. A 500 too, so its bounded retries are spread over the growing
            # backoff, not spent in one burst. Only a mangled 2xx (the write was accepted) does not wait.
            if not (isinstance(exc, crmlib.BadResponse) and exc.accepted):
                self.back_off(exc.retry_after)
            if exc.maybe_written:  # a 500 to the POST (whole or cut off), a lost answer, a mangled 2xx: look first
                return await self._unsure(item, exc)
            return "retry", item, exc.message
        self._remember_created(item, created)
        log.debug("push.created", item=item.id, crm_id=created["id"])
        return "delivered", item, created["id"]

    async def _still_the_contact(self, contact_id: int) -> bool:
        """Whether the contact behind this id is still the one crm-syncd knows (by when the CRM made it),
        asked once per contact and push: a CRM restored from a backup hands ids out again, and a
        person's interactions must never land on whoever got theirs."""
        check = self._same_contact.get(contact_id)
        if check is None:
            check = self._same_contact[contact_id] = asyncio.ensure_future(self._made_when_known(contact_id))
        try:
            return await asyncio.shield(check)
        except crmlib.CRMError:
            if self._same_contact.get(contact_id) is check:  # asked again by the next item
                del self._same_contact[contact_id]
            raise

    async def _made_when_known(self, contact_id: int) -> bool:
        recorded = self.store.created_at(contact_id)
        if recorded is None:
            return True
        made = (await self.crm.get_contact(contact_id)).get("createdAt")
        if made not in (None, recorded):
            log.warning("push.contact_replaced", contact_id=contact_id)
            return False
        return True

    async def _unsure(self, item: Item, exc: crmlib.CRMError) -> tuple[str, Item, Any]:
        """The write may have happened (a 500, or a reply lost after sending): look before resending."""
        await self._wait_backoff()  # a slow CRM may still be finishing the write
        if isinstance(exc, crmlib.Unreachable):  # we gave up waiting; the CRM may not have: give it as long again
            await asyncio.sleep(self.settings.request_timeout_s)
        self._day_cache.pop((item.contact_id, occurred_iso(item.occurred_ms)[:10]), None)
        try:
            existing = await self._find_in_crm(item)
        except crmlib.CRMError as lookup:
            log.debug("push.unsure", item=item.id, error=exc.message, lookup=lookup.message)
            return "unsure", item, exc.message  # stays `sending`: looked up again before any resend
        log.debug("push.looked_up", item=item.id, error=exc.message, found=existing)
        if existing is not None:
            return "adopted", item, existing
        if isinstance(exc, (crmlib.Ambiguous, crmlib.BadResponse)):  # bounded: 500s and mangled answers, not 503s
            self._ambiguous[item.id] += 1
            if self._ambiguous[item.id] >= self.settings.max_ambiguous_retries:
                return "failed", item, f"unclear CRM answer {self._ambiguous[item.id]} times: {exc.message}"
        return "retry", item, exc.message

    def _settle(self, outcomes: list[tuple[str, Item, Any]], report: PushReport) -> None:
        if not outcomes:
            return
        batch, outcomes[:] = outcomes[:], []
        delivered, failed, retry = [], [], []
        for outcome, item, value in batch:
            if outcome in ("delivered", "adopted"):
                delivered.append((item, value))
                report.delivered += 1
                report.delivered_by_type[item.type] += 1
                report.adopted += outcome == "adopted"
                self._failures_in_row = 0
                report.unreachable = self.crm_failure = None
            elif outcome == "failed":  # the CRM answered: this item is wrong, not the CRM
                failed.append((item, value))
                self.crm_failure = None
                report.failed.append((item.key, value))
                log.warning("push.failed", key=item.key, reason=value)
            elif outcome == "vanished":
                retry.append((item, "contact deleted in the CRM"))
                self.crm_failure = None
                self.contacts_stale = True
            elif outcome == "unsure":
                report.unreachable = self.crm_failure = value
            elif outcome == "unsent":  # delivery ended while it waited to be sent: nothing was tried
                retry.append((item, None))
            else:  # retry, or refused
                retry.append((item, value))
                report.retried += 1
                report.unreachable = self.crm_failure = value
                if outcome == "refused":
                    report.refused = value
        for item, _ in delivered + failed:
            self._ambiguous.pop(item.id, None)
        if stale := self.store.settle(delivered, failed, retry):
            log.debug("push.stale_outcomes", items=stale)  # their items were moved by a merge or a 404
        for contact_id in {item.contact_id for outcome, item, _ in batch if outcome == "vanished"}:
            self.store.forget_contact(contact_id)
            log.warning("push.contact_vanished", contact_id=contact_id)

    # -- exactly-once helpers -------------------------------------------------------------

    async def _recover(self, report: PushReport) -> bool:
        """Settle items a previous process left `sending`: adopt what reached the CRM, requeue the rest."""
        leftovers = self.store.sending()
        if not leftovers:
            return True
        # A request sent less than a timeout ago (a crash, then a quick restart) may still be on its
        # way into the CRM: looking now could miss it and send it again.
        await self._outlast_request(self.store.last_claim_ms() or 0, "push.recover_waits", items=len(leftovers))
        self._day_cache.clear()  # listings taken before these writes may predate them
        adopted, requeue, failed, complete = [], [], [], True
        for item in leftovers:
            await self._wait_backoff()
            try:
                existing = await self._find_in_crm(item) if item.contact_id is not None else None
            except (crmlib.Transient, crmlib.Unauthorized) as exc:  # the CRM is down, or refuses the key (it
                report.unreachable, complete = exc.message, False  # tells nothing of the item): keep what was
                if isinstance(exc, crmlib.Unauthorized):  # learnt; the rest is looked up next time
                    report.refused = exc.message
                self.back_off(exc.retry_after)
                log.warning("push.recover_deferred", items=len(leftovers) - len(adopted) - len(requeue) - len(failed),
                            reason=exc.message)
                break
            except crmlib.CRMError as exc:  # an answer about this item's day (a 500, a listing never complete):
                self.back_off(exc.retry_after)  # it alone waits, `sending`, for a bounded number of look-ups
                self._ambiguous[item.id] += 1
                if self._ambiguous[item.id] >= self.settings.max_ambiguous_retries:
                    failed.append((item, f"{UNKNOWN_OUTCOME}: {exc.message}"))
                log.warning("push.recover_unclear", item=item.id, reason=exc.message)
                continue
            log.debug("push.recover_lookup", item=item.id, found=existing)
            if existing is None:
                requeue.append((item, None))
            else:
                adopted.append((item, existing))
        self.store.settle(delivered=adopted, retry=requeue)
        self._settle([("failed", item, reason) for item, reason in failed], report)
        report.adopted += len(adopted)
        report.delivered += len(adopted)
        if complete:  # the CRM answered every look-up: whatever failed before is over
            report.unreachable = self.crm_failure = None
        log.info("push.recovered", adopted=len(adopted), requeued=len(requeue))
        return complete

    async def _find_in_crm(self, item: Item) -> int | None:
        """The id of an interaction in the CRM that is this item and not yet in the ledger."""
        day = occurred_iso(item.occurred_ms)[:10]
        cache_key = (item.contact_id, day)
        found = self._day_cache.get(cache_key)
        if found is None:
            found = await self.crm.list_interactions(item.contact_id, dt.date.fromisoformat(day))
            self._day_cache[cache_key] = found
        wanted = occurred_iso(item.occurred_ms)
        ledger = self.store.crm_ids(item.contact_id)
        for interaction in found:
            if (interaction.get("type") == item.type and interaction.get("occurredAt") == wanted
                    and interaction.get("source") == "IMPORT_IOS" and interaction["id"] not in ledger
                    and self._adopted.setdefault(interaction["id"], item.id) == item.id):
                return interaction["id"]
        return None

    def _remember_created(self, item: Item, created: dict) -> None:
        day = occurred_iso(item.occurred_ms)[:10]
        cached = self._day_cache.get((item.contact_id, day))
        if cached is not None:
            cached.append(created)

    async def _dedupe_wanted(self, contact_id: int) -> bool:
        """Check the CRM before creating? In `auto` mode: for contacts that hold IMPORT_IOS interactions
        crm-syncd did not send (another Mac, an older tool). "No" is asked again after an hour: the
        owner's other Mac may begin delivering to the contact at any time."""
        mode = self.settings.dedupe_against_crm
        if mode != "auto":
            return mode == "on"
        decided = self.store.dedupe_flag(contact_id)
        if decided is not None and (decided[0] or now_ms() - decided[1] < DEDUPE_RECHECK_MS):
            return decided[0]
        known = self.store.known_contact(contact_id)
        if decided is None and known and known[0] in ("card", "placeholder") and known[2] is not None:
            flag = False  # fields we wrote: ours, made this moment, before anyone else could deliver to it
        else:
            ours = self.store.crm_ids(contact_id)
            recent = await self.crm.recent_interactions(contact_id)
            flag = any(i.get("source") == "IMPORT_IOS" and i["id"] not in ours for i in recent)
        self.store.set_dedupe_flag(contact_id, flag)
        return flag

    def back_off(self, retry_after: float | None = None) -> None:
        """Hold every request for a while: exponential with jitter, capped, at least `retry_after`
        (itself capped at RETRY_AFTER_MAX_S).

        It grows once per round of failures, not once per request: eight requests failing together
        are one failure, or a short outage would push the wait to the cap.
        """
        now = time.monotonic()
        if now >= self._backoff_until:  # a new round; one after a write the CRM accepted starts the count again
            accepted = self.crm.wrote_at > self._backoff_since
            self._failures_in_row = 1 if accepted else self._failures_in_row + 1
            self._backoff_since = now
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(self._failures_in_row - 1, 10))
        delay = max(delay * random.uniform(0.5, 1.0), min(retry_after or 0.0, crmlib.RETRY_AFTER_MAX_S))  # NaN: ignored
        self._backoff_until = max(self._backoff_until, now + delay)

    def backoff_left(self) -> float:
        """Seconds until requests may go again (0 when not backing off)."""
        return max(0.0, self._backoff_until - time.monotonic())

    async def _wait_backoff(self, halt: asyncio.Event | None = None) -> bool:
        """Wait until requests may go again; False, at once, when `halt` is or gets set."""
        halt = halt or asyncio.Event()
        while (wait := self.backoff_left()) > 0 and not halt.is_set():
            await wait_event(halt, wait)
        return not halt.is_set()


class _CRMIndex:
    """The CRM's contacts, indexed by normalised address and by name."""

    def __init__(self, contacts: list[dict], normalize: Normalizer) -> None:
        self.normalize = normalize
        self.by_id: dict[int, dict] = {}
        self.by_address: dict[str, set[int]] = defaultdict(set)
        self.by_name: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.placeholder_of: dict[str, int] = {}  # address -> the placeholder made for it (crm-syncd's map)
        self.kept_for: dict[str, set[int]] = {}  # card unique id -> the contacts made or kept for it (crm-syncd's)
        self.card_made: dict[str, int] = {}  # address -> the contact crm-syncd made for a card holding it
        for contact in contacts:
            self.add(contact)

    def add(self, contact: dict) -> None:
        self.by_id[contact["id"]] = contact
        for address in crm_addresses(contact, self.normalize):
            self.by_address[address].add(contact["id"])
        self.by_name[(contact.get("firstName") or "", contact.get("lastName") or "")].add(contact["id"])

    def replace(self, contact: dict) -> None:
        self.remove(contact["id"])
        self.add(contact)

    def remove(self, contact_id: int) -> None:
        old = self.by_id.pop(contact_id, None)
        if old:
            for address in crm_addresses(old, self.normalize):
                self.by_address[address].discard(contact_id)
            self.by_name[(old.get("firstName") or "", old.get("lastName") or "")].discard(contact_id)

    def matching(self, addresses: list[str]) -> set[int]:
        return {cid for a in addresses for cid in self.by_address.get(a, ())}

    def named(self, first: str | None, last: str | None) -> set[int]:
        return set(self.by_name.get((first or "", last or ""), ()))

    def for_person(self, person: Person, fields: dict) -> set[int]:
        """The contacts that may be this person: any holding an address no one else's card holds; by a
        shared one, only a contact under their name, or the placeholder of an address they own (the CRM's
        holds one address; one made for handles Messages grouped was made for all of them)."""
        found = self.matching([a for a in person.addresses if a not in person.shared])
        found |= {self.placeholder_of[a] for a in person.owned if a in self.placeholder_of}
        found |= {c for c in self.matching([a for a in person.owned if a in person.shared])
                  if is_placeholder(self.by_id[c])}
        return found | (self.matching(sorted(person.shared)) & self.named(fields["firstName"], fields["lastName"]))

    def single_owner(self) -> list[tuple[str, int]]:
        """Every address the CRM holds, with the lowest id among the contacts holding it."""
        return [(address, min(ids)) for address, ids in self.by_address.items() if ids]


def _same_name(fields: dict, others: dict) -> bool:
    return (fields.get("firstName"), fields.get("lastName")) == (others.get("firstName"), others.get("lastName"))


async def _as_is(contact: dict) -> dict:
    """A write with nothing left to write: the contact as it is."""
    return contact


def _present(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def _owner_edited(written: dict | None, current: dict) -> bool:
    """Whether a contact's CRM fields differ from what crm-syncd last wrote to them (empty equals absent)."""
    return written is not None and any((current.get(k) or None) != (v or None) for k, v in written.items())


NAME_FIELDS = ("firstName", "lastName")
# a contact's fields crm-syncd may write (`Person.crm_fields`), and those the server sets itself
WRITTEN = frozenset({"firstName", "lastName", "phone", "email", "organization", "title", "notes"})
PLACEHOLDER_WRITTEN = frozenset({"firstName", "lastName", "phone", "email", "notes"})  # `placeholder_fields`
SERVER_SET = frozenset({"id", "createdAt", "updatedAt", "lastContactedAt", "contactDueAt"})


def _owner_filled(current: dict, written: dict | None, origin: str) -> bool:
    """Whether a contact holds something in a field crm-syncd did not write to it (a placeholder's
    organization, a location, tags, a field newer than crm-syncd): the owner's work, which deleting
    the contact would lose. `written`: the fields last written, if this Mac wrote them."""
    ours = written.keys() if written is not None else PLACEHOLDER_WRITTEN if origin == "placeholder" else WRITTEN
    return any(value not in (None, "", [], {}) for key, value in current.items()
               if key not in ours and key not in SERVER_SET)


def _beyond_card(written: dict | None, card: dict | None) -> bool:
    """Whether crm-syncd left a contact holding what its card does not: the owner's notes or the number
    of the placeholder it promoted, which deleting it as a duplicate would lose."""
    return written is not None and card is not None and any(
        value and value != (card.get(key) or None) for key, value in written.items())


def _lasting(changes: dict, written: dict, card: dict, cards_gone: bool, nameless: bool) -> dict:
    """The card's changes a contact takes. While some of the cards it was last written for are gone
    (deleted, their account removed, their store unreadable), what they gave stays: no field is emptied
    and no name part becomes "-"; a field the remaining cards change still follows them. A name made
    from an address (no card has one) never replaces a card's name the contact holds, then or later."""
    keep_name = nameless and (cards_gone or any(written.get(k) != card.get(k) for k in NAME_FIELDS))
    return {k: v for k, v in changes.items()
            if not (k in NAME_FIELDS and (keep_name or (cards_gone and v == MISSING_NAME)))
            and not (cards_gone and v is None)}


def _left_out_reason(refused: dict[str, str]) -> str:
    return "; ".join(f"{k}: {refused[k]}" for k in sorted(refused))


def _report_left_out(report: ContactsReport, name: str, left_out: dict[str, str]) -> None:
    """Name the fields of a person's card the CRM holds without (it refused them), and why."""
    if left_out:
        report.left_out.append((name, f"written without its {' and '.join(sorted(left_out))} "
                                      f"({_left_out_reason(left_out)})"))


def _notes_after(held: str | None, before: str | None, card_note: str | None) -> str:
    """A contact's notes once its card's note changes from `before` to `card_note`: what the CRM `held`
    in front of the old note (the owner's words a promoted placeholder kept, `_promotion`) stays in front.
    Notes that do not end with the old note are kept whole: nothing the owner wrote is written over. Notes
    that already end with the new one (kept while its card was gone, now back or copied) take it once."""
    held, before = held or "", before or ""
    if before and held.endswith(before):
        held = held[:-len(before)]
    held = held.strip()
    if card_note and (held == card_note or held.endswith("\n" + card_note)):
        return held
    return "\n".join(n for n in (held, card_note) if n)


def _promotion(fields: dict, placeholder: dict) -> dict:
    """What a placeholder becomes when its person appears on a card: the card's fields; its notes lose
    the marker but keep what the owner wrote there, followed by the card's note."""
    return {**fields, "notes": "\n".join(n for n in (owner_notes(placeholder), fields.get("notes")) if n)}
