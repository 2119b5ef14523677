"""Step 1: the address book's people as CRM contacts (matched, created, promoted, kept up to date)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from crm_syncd import crm as crmlib
from crm_syncd.engine.creates import Creates
from crm_syncd.engine.owner import OwnAddresses
from crm_syncd.engine.push import dedupe_wanted
from crm_syncd.engine.reports import ContactsReport
from crm_syncd.identity import (
    MISSING_NAME,
    Normalizer,
    Person,
    crm_addresses,
    is_placeholder,
    merge_cards,
    owner_notes,
)
from crm_syncd.logs import get_logger, mask_text
from crm_syncd.settings import Settings
from crm_syncd.sources import Card, contacts as contacts_source, sqlite
from crm_syncd.sources.sqlite import NeedsFullDiskAccess, SourceError, SourceMissing
from crm_syncd.store import REBUILD, Store, now_ms

log = get_logger("crm_syncd.engine")

CONTACTS_SYNCED = "contacts_synced_ms"  # kv: when the last contacts pass ended (`status` shows it)
CONTACTS_PROBLEMS = "contacts_problems"  # kv: the last contacts pass's people not written and fields left out
DROPPABLE = frozenset({"phone", "email"})  # a contact is still worth writing without them


class ContactsSync:
    """Reads every AddressBook store, merges cards into people, matches them against the CRM by
    normalised phone and email, creates what is missing, and fills the identity map."""

    def __init__(self, settings: Settings, store: Store, crm: crmlib.CitadelClient, normalize: Normalizer,
                 owner: OwnAddresses, creates: Creates) -> None:
        self.settings = settings
        self.store = store
        self.crm = crm
        self.normalize = normalize
        self.owner = owner
        self.creates = creates
        self._cards: dict[str, list[Card]] = {}  # AddressBook store → its cards, as last read
        self._me: dict[str, list[Card]] = {}  # AddressBook store → its Me cards, as last read
        self._store_errors: dict[str, str] = {}  # AddressBook store → why it was last unreadable

    def signatures(self) -> dict[str, str]:
        """The `sqlite.signature` of every AddressBook store: two stats per store."""
        base = Path(self.settings.addressbook_dir)
        return {db.relative_to(base).as_posix(): sqlite.signature(db) for db in contacts_source.store_paths(base)}

    async def run(self, *, list_crm: bool = False) -> ContactsReport:
        """Read the AddressBook stores that changed, then bring the CRM's contacts and the identity map in
        line with every card, unless only stores that failed again changed and not `list_crm` (set when a
        contact vanished from the CRM: the listing finds who must be made again)."""
        report = ContactsReport()
        base = Path(self.settings.addressbook_dir)
        signatures = self.signatures()
        if not signatures:
            report.missing = True
            log.warning("contacts.missing", path=str(base))
        previous = self.store.signatures() if self._cards else {}
        removed = set(self._cards) - set(signatures)
        for store_name in removed:
            del self._cards[store_name], self._me[store_name]
        self.owner.stores_present(signatures)
        changed = [name for name, sig in signatures.items() if previous.get(name) != sig or name not in self._cards]
        for name in changed:
            try:
                cards, me, skipped = await asyncio.to_thread(contacts_source.read_store, base / name, name)
            except SourceMissing:
                self._cards.pop(name, None)
                self._me.pop(name, None)
                self.owner.read_me(name, None)
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
            self._cards[name], self._me[name] = cards, me
            report.skipped.update(skipped)
        # the owner's cards: the Me cards, and those linked to one from another store (read now or before),
        # whose addresses are the owner's unless another person's card holds them (an office's main line)
        cards, owners = contacts_source.owners_apart([c for read in self._cards.values() for c in read],
                                                     [c for read in self._me.values() for c in read])
        held = self.owner.normalized(contacts_source.typed_addresses(cards)) if owners else set()
        for name, me in self._me.items():
            linked = contacts_source.typed_addresses([c for c in owners if c.store == name])
            self.owner.read_me(name, contacts_source.typed_addresses(me), linked, held)
        self.owner.me_read()
        if (previous and changed and not removed and set(changed) <= report.store_errors.keys()
                and not list_crm):
            return report  # only stores that failed again: nothing new for the CRM, so no listing of it

        people = merge_cards(cards, self.normalize)
        rebuilding = self.store.get(REBUILD, False)  # the state is rebuilt: `--reconcile`, a restored state
        report.cards = sum(len(c) for c in self._cards.values())
        await self.creates.landed()
        crm_contacts = await self.crm.list_contacts()
        unanswered = self.creates.unanswered()  # creates that may have landed: listed now if they did
        index = CRMIndex(crm_contacts, self.normalize)
        created = {c: contact.get("createdAt") for c, contact in index.by_id.items()}
        self.store.prune_contacts(created)
        # every address a placeholder serves: made for it, or found for it after an answer was lost
        index.placeholder_of = {a: c for a, c in sorted(self.store.addresses_of().items())
                                if c in index.by_id and is_placeholder(index.by_id[c])}
        # one a listing found (its create's answer lost, another Mac's) bears crm-syncd's marker: known as a
        # placeholder from now on, as the resolution knows those it finds
        for address, contact_id in index.placeholder_of.items():
            if (self.store.known_contact(contact_id) or ("crm",))[0] == "crm":
                self.store.remember_contact(contact_id, "placeholder", f"placeholder:{address}")
        index.grouped = self._grouped_placeholders(people, index)
        index.kept_for, index.card_made = self.store.contacts_by_card(), self.store.card_made_addresses()
        self.store.map_each(index.single_owner(), "crm", replace=False)
        live = {person.key for person in people}
        fields = {person.key: person.crm_fields() for person in people}
        self._give_back_by_name(people, fields, index)
        for person in sorted(people, key=lambda p: p.key):
            try:
                await self._apply_person(person, fields[person.key], index, report, live, unanswered, rebuilding)
            except (crmlib.Rejected, crmlib.Ambiguous, crmlib.NotFound, crmlib.BadResponse) as exc:
                # about this person (a 422, a 500 that Citadel gives many bad requests, a contact deleted
                # meanwhile): the others go on. A write that did land is found by the next pass's listing.
                reason = exc.reason if isinstance(exc, crmlib.Rejected) else exc.message
                report.failed.append((fields[person.key]["firstName"] or person.key, reason))
                log.warning("contacts.failed", person=person.key, reason=reason)
        self.store.note_created(created)  # of the contacts this pass found for a card or an address
        self.creates.pass_ended()
        self.creates.drop(unanswered)  # found by now, or never made: only this pass's own stay noted
        if rebuilding:
            self.store.put(REBUILD, False)
        await asyncio.to_thread(self.store.attach)  # off the loop: a big backlog may wait for these mappings
        self.store.save_signatures(signatures)
        self.store.put("duplicates", [{"kept": kept, "duplicate": other} for kept, other in report.duplicates])
        self.store.put(CONTACTS_SYNCED, now_ms(), durable=False)
        self.store.put(CONTACTS_PROBLEMS, {  # names masked: `status` shows them as they are
            kind: [{"name": mask_text(name), "reason": reason} for name, reason in problems]
            for kind, problems in (("failed", report.failed), ("left_out", report.left_out))}, durable=False)
        log.info("contacts.synced", cards=report.cards, people=len(people), created=len(report.created),
                 existing=report.existing, promoted=len(report.promoted), updated=len(report.updated))
        return report

    async def _apply_person(self, person: Person, fields: dict, index: CRMIndex, report: ContactsReport,
                            live: set[str], unanswered: list[dict], rebuilding: bool) -> None:
        """Match, create or promote the person's contact, follow card edits, fold in duplicates.

        A contact remembered for another person of this address book (`live` keys) is theirs: a number
        moved from their card to this one moves alone, whichever person comes first. `unanswered`: the
        creates earlier passes sent without an answer (`_own_unanswered_write`). `rebuilding`: the state is
        rebuilt, and finds again the contacts crm-syncd made before it was lost (`_own_as_written`).
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
                lambda sent: self.creates.create(sent, made_for=(person.key, {k: sent.get(k) for k in fields})),
                _present(fields), name)
            survivor = created["id"]
            index.add(created)
            # a field left out holds what the CRM has: not taken for an edit of the owner's, nor sent again
            # until the card changes it
            written = {**fields, **{k: created.get(k) for k in refused}}
            self.store.remember_contact(survivor, "card", person.key, written=written, cards=person.unique_ids,
                                        created_at=created.get("createdAt"), card=fields, left_out=refused)
            self.creates.recorded(person.key)
            _report_left_out(report, name, refused)
            report.created.append(name)
        elif real:
            survivor = remembered if remembered in real else self._preferred(real)
            if lost is not None:
                self._own_unanswered_write(survivor, person, index, lost)
            elif rebuilding:
                self._own_as_written(survivor, person, fields, index)
            report.existing += 1
            await self._follow_edits(survivor, person, fields, index, report, name)
            filed = (self.store.known_contact(survivor) or ("", None))[1]
            if filed in (None, person.key) or filed not in live:  # the owner's own may serve several people
                self.store.keep_contact_for(survivor, person.key, person.unique_ids)  # theirs under today's key
        else:
            survivor = placeholders[0]
            made = (self.store.known_contact(survivor) or ("", None, None))[2]  # the placeholder as this Mac made it
            filled = _filled_by_owner(index.by_id[survivor], made, fields)
            await dedupe_wanted(self.settings.dedupe_against_crm, self.store, self.crm, survivor)  # settled while it is known as found, not made, if another Mac made it
            updated, refused = await self._writing(
                lambda sent: self.creates.update(  # noted as `written` below: without the owner's fields
                    survivor, sent, (person.key, {k: sent.get(k) for k in fields if k not in filled}), fields),
                _present(_promotion(fields, index.by_id[survivor])), name)
            index.replace(updated)
            # written: what the CRM now holds (a number a card without one leaves, the owner's notes before
            # the card's), which an edit of the owner's would differ from, but for the fields the owner filled
            # in: left out, they are the owner's (`_follow_edits`); card: what the card's edits will
            written = {k: updated.get(k) for k in fields if k not in filled}
            self.store.remember_contact(survivor, "card", person.key, written=written,
                                        cards=person.unique_ids, card=fields, left_out=refused)
            self.creates.recorded(person.key)
            _report_left_out(report, name, refused)
            report.promoted.append(name)
            log.info("contacts.promoted", contact_id=survivor)
        self.store.map_addresses(person.owned, survivor, "card")
        folded = []
        for other in sorted(candidates - {survivor}):
            placeholder = index.by_id[other] if is_placeholder(index.by_id[other]) else None
            if not await self._merge(other, survivor, index):
                report.duplicates.append((survivor, other))
            else:
                report.merged.append(name)
                if placeholder:
                    folded.append(placeholder)
        if folded:
            await self._take_addresses(survivor, folded, index, name, person.key)

    async def _take_addresses(self, contact_id: int, placeholders: list[dict], index: CRMIndex, name: str,
                              person_key: str) -> None:
        """Give a contact crm-syncd writes the number or email of the placeholders folded into it, where it
        has none: the person texts from it, and a promotion keeps it the same way. Recorded as written, not
        as the card's: the card's next edit of that field still goes through."""
        known = self.store.known_contact(contact_id)
        if not known or known[0] != "card" or known[2] is None:
            return
        current = index.by_id[contact_id]
        taken: dict[str, str] = {}
        for placeholder in placeholders:
            for key in ("phone", "email"):
                if not current.get(key) and key not in taken and placeholder.get(key):
                    taken[key] = placeholder[key]
        if not taken:
            return
        card = self.store.applied_card(contact_id)[0] or known[2]  # a record older than v9: one for both
        updated, refused = await self._writing(self._card_write(contact_id, current, person_key, known[2], card),
                                               taken, name)
        index.replace(updated)
        self.store.remember_contact(contact_id, "card", written={**known[2], **{k: updated.get(k) for k in taken}})
        self.creates.recorded(person_key)
        log.info("contacts.addresses_kept", contact_id=contact_id, fields=sorted(taken.keys() - refused.keys()))

    def _card_write(self, contact_id: int, current: dict, person_key: str, held: dict, card: dict
                    ) -> Callable[[dict], Awaitable[dict]]:
        """`_writing`'s write of a card's fields to a contact crm-syncd keeps: a noted PUT (`Creates.update`,
        noting what the contact then holds: `held` with what is sent), or the contact as it is when nothing is
        left to send."""
        def write(sent: dict) -> Awaitable[dict]:
            if not sent:
                return _as_is(current)
            holds = {**held, **{k: v or None for k, v in sent.items()}}  # "" clears a field: the CRM holds none
            return self.creates.update(contact_id, sent, (person_key, holds), card)
        return write

    def _give_back_by_name(self, people: list[Person], fields: dict[str, dict], index: CRMIndex) -> None:
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

    def _grouped_placeholders(self, people: list[Person], index: CRMIndex) -> dict[str, set[int]]:
        """{a card's address: the placeholders mapped for addresses no card holds that Messages groups
        (`Store.hint`) with it}: the same person's, though the placeholder was made for one handle alone
        (before the grouping was known, or by an older crm-syncd that moved the card's handle to the
        card's contact). Only where every card address of the group is one person's own: a group that
        also holds another person's address, or one several cards share, ties the placeholder to no one."""
        held = {a for person in people for a in person.addresses}
        owners: dict[str, set[str]] = defaultdict(set)
        for person in people:
            for address in person.owned:
                owners[address].add(person.key)
        hints = self.store.hints() if index.placeholder_of else {}
        groups: dict[str, list[str]] = defaultdict(list)
        for address, person_id in hints.items():
            groups[person_id].append(address)
        found: dict[str, set[int]] = defaultdict(set)
        for address, contact_id in index.placeholder_of.items():
            if address in held or (person_id := hints.get(address)) is None:
                continue
            carded = [a for a in groups[person_id] if a in held]
            keys = {frozenset(owners.get(a, ())) for a in carded}
            if len(keys) == 1 and len(next(iter(keys))) == 1:  # all of them owned by one and the same person
                for a in carded:
                    found[a].add(contact_id)
        return found

    def _kept_under_another_key(self, person: Person, fields: dict, live: set[str], index: CRMIndex) -> list[int]:
        """The contacts crm-syncd made or kept for this person under another key, best first: those filed
        under one of their cards, then those it made for a card holding one of their numbers or emails
        (which the CRM may no longer hold: the owner changed it there), as `_unclaimed` leaves them."""
        by_card = sorted({c for unique_id in person.unique_ids for c in index.kept_for.get(unique_id, ())})
        by_address = sorted({c for a in person.owned if (c := index.card_made.get(a)) is not None} - set(by_card))
        found = [c for c in by_card + by_address if c in index.by_id]
        free = self._unclaimed(set(found), person, fields, live, index)
        return [c for c in found if c in free]

    def _unclaimed(self, contact_ids: set[int], person: Person, fields: dict, live: set[str],
                   index: CRMIndex) -> set[int]:
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

    async def _merge(self, victim: int, survivor: int, index: CRMIndex) -> bool:
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

    async def _follow_edits(self, contact_id: int, person: Person, fields: dict, index: CRMIndex,
                            report: ContactsReport, name: str) -> None:
        """Apply card edits to a contact crm-syncd created, unless the owner edited it in the CRM; what
        a card of the person that is gone gave stays (`_lasting`).

        The card's edits are what differs from the card as last applied; the owner's, what differs from
        the CRM's fields as crm-syncd left them (`written`). They are not the same when the contact holds
        what the card does not (a promoted placeholder's number and notes) or lacks what it does (a field
        the CRM refused): either is then neither an edit to send nor one of the owner's. A field `written`
        lacks is the owner's (filled in on a placeholder before its promotion): the card's edits leave it
        alone while it holds something."""
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
        changes = {k: v for k, v in fields.items() if v != card.get(k) and (k in written or not current.get(k))}
        gone = bool(self.store.contact_cards(contact_id) - person.unique_ids)
        lasting = _lasting(changes, written, card, gone, person.nameless)
        sent = {k: v if v is not None else "" for k, v in lasting.items()}
        if "notes" in sent:  # what the owner wrote in front of the card's note stays in front
            sent["notes"] = _notes_after(written.get("notes"), card.get("notes"), fields.get("notes"))
        updated, refused = await self._writing(self._card_write(contact_id, current, person.key, written, fields),
                                               sent, name)
        index.replace(updated)
        left_out = {**{k: reason for k, reason in left_out.items() if k not in changes}, **refused}
        self.store.remember_contact(contact_id, "card", written={**written, **{k: updated.get(k) for k in sent}},
                                    card=fields, left_out=left_out)
        self.creates.recorded(person.key)
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

    def _own_as_written(self, contact_id: int, person: Person, fields: dict, index: CRMIndex) -> None:
        """While the state is rebuilt: a contact found for a person that the state does not know (or knows
        as the placeholder it no longer is) and that holds exactly what crm-syncd writes for their card
        was crm-syncd's before the state was lost (a new Mac, a backup restored): it is again, so card
        edits reach it. Only then: a contact another Mac's crm-syncd made looks the same."""
        current, known = index.by_id[contact_id], self.store.known_contact(contact_id)
        if (known is None or (known[0] == "placeholder" and not is_placeholder(current))) and not _owner_edited(
                _present(fields), current) and not _owner_filled(current, _present(fields), "card"):
            self._file_as_written(contact_id, person, current, fields, fields)

    def _own_unanswered_write(self, contact_id: int, person: Person, index: CRMIndex, lost: dict) -> None:
        """File a contact found for a person as crm-syncd's, with what it sent, when it is exactly what
        their create, their placeholder's promotion or their card's edit whose answer was lost (`lost`: its
        note) would have made: its card edits are then followed. (The pass drops the notes it was given when it ends.)"""
        if _owner_edited(lost["fields"], current := index.by_id[contact_id]):
            return
        known = self.store.known_contact(contact_id)
        if (known is None or (known[0] == "crm" and known[2] is None) or known[0] == "placeholder"
                or (known[0] == "card" and known[1] == person.key)):  # a card edit of theirs, landed unanswered
            self._file_as_written(contact_id, person, current, lost["fields"], lost.get("card", lost["fields"]))

    def _file_as_written(self, contact_id: int, person: Person, current: dict, written: dict, card: dict) -> None:
        """Know a contact found in the CRM as crm-syncd's for `person`, holding `written` from `card`."""
        self.store.remember_contact(contact_id, "card", person.key, written=written, cards=person.unique_ids,
                                    created_at=current.get("createdAt"), card=card)
        log.info("contacts.write_found", contact_id=contact_id)


class CRMIndex:
    """The CRM's contacts, indexed by normalised address and by name."""

    def __init__(self, contacts: list[dict], normalize: Normalizer) -> None:
        self.normalize = normalize
        self.by_id: dict[int, dict] = {}
        self.by_address: dict[str, set[int]] = defaultdict(set)
        self.by_name: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.placeholder_of: dict[str, int] = {}  # address -> the placeholder made for it (crm-syncd's map)
        self.grouped: dict[str, set[int]] = {}  # a card's address -> placeholders of handles Messages groups with it
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
        holds one address; one made for handles Messages grouped was made for all of them) or of one
        Messages groups with an address they own (`grouped`: made for that handle alone)."""
        found = self.matching([a for a in person.addresses if a not in person.shared])
        found |= {self.placeholder_of[a] for a in person.owned if a in self.placeholder_of}
        found |= {c for a in person.owned for c in self.grouped.get(a, ())}
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


def _filled_by_owner(placeholder: dict, made: dict | None, fields: dict) -> set[str]:
    """The fields of a placeholder the owner filled in that its card leaves empty (an organisation, a job
    title, an email): a promotion keeps them as the owner's, left out of `written`. `made`: the placeholder's
    fields as this Mac made it (which of phone and email is its own address); unknown, both are its own."""
    ours = made.keys() if made else PLACEHOLDER_WRITTEN
    return {k for k in WRITTEN - ours - {"notes"} if placeholder.get(k) and fields.get(k) is None}


def _promotion(fields: dict, placeholder: dict) -> dict:
    """What a placeholder becomes when its person appears on a card: the card's fields; its notes lose
    the marker but keep what the owner wrote there, followed by the card's note."""
    return {**fields, "notes": "\n".join(n for n in (owner_notes(placeholder), fields.get("notes")) if n)}
