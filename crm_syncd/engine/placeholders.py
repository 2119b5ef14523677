"""Step 3: every open item gets a contact, or a placeholder made for its unknown number or email."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from crm_syncd import crm as crmlib
from crm_syncd.engine.contacts import CRMIndex
from crm_syncd.engine.creates import Creates
from crm_syncd.engine.reports import PlaceholdersReport
from crm_syncd.identity import Normalizer, crm_takes_email, is_placeholder, placeholder_fields
from crm_syncd.logs import get_logger
from crm_syncd.settings import Settings
from crm_syncd.store import Store

log = get_logger("crm_syncd.engine")

HELD_WAIT_MAX_S = 3600.0  # the longest wait between listings that look up held addresses and find no one


@dataclass
class HeldLookUps:
    """When held addresses (no placeholders) are looked up in a listing of every contact, which is costly
    (100 requests for 10,000 contacts): checked at most once per `contacts_rescan_s`, at once for an
    address not looked up before, or when the CRM holds a contact it did not at the last listing (a page
    of one, newest first: one the owner made); else when the wait runs out, doubled after each listing
    that found no one, from `contacts_rescan_s` to an hour (a contact the owner edited to hold one)."""

    rescan_s: float
    checked: float = -math.inf  # monotonic, as the rest
    listed: float = -math.inf
    wait: float = 0.0
    newest: tuple[int, int | None] | None = None  # the CRM's (contacts, newest id) at the last listing
    seen: frozenset[str] = frozenset()  # the addresses looked up then

    async def due(self, crm: crmlib.CitadelClient, addresses: list[str]) -> bool:
        now = time.monotonic()
        if now - self.checked < self.rescan_s:
            return False
        self.checked = now
        newest, new = await crm.newest_contact(), not self.seen.issuperset(addresses)
        if newest == self.newest and not new and now - self.listed < self.wait:
            return False
        self.newest, self.seen = newest, frozenset(addresses)
        if new:
            self.wait = 0.0
        return True

    def looked_up(self, found: bool) -> None:
        """A listing looked them up; `found`: it gave one of them a contact."""
        self.listed = time.monotonic()
        self.wait = self.rescan_s if found else min(max(2 * self.wait, self.rescan_s), HELD_WAIT_MAX_S)


@dataclass
class Placeholders:
    """Matches open items' addresses to contacts: the identity map, Apple's own person grouping, the
    CRM's contacts, or a placeholder contact ("Unknown (+1-905-555-1234)")."""

    settings: Settings
    store: Store
    crm: crmlib.CitadelClient
    normalize: Normalizer
    creates: Creates
    known_only: bool = False
    _held: HeldLookUps = field(init=False)

    def __post_init__(self) -> None:
        self._held = HeldLookUps(self.settings.contacts_rescan_s)

    async def resolve(self) -> PlaceholdersReport:
        """Give open items a contact: the one their address (or a handle Messages groups with it) has,
        else one the CRM's listing holds it in, else a placeholder made for them, unless placeholders are
        off (--known-only, create_unknown_contacts = false): then they are held, and looked for in the
        listing (a contact the owner made or edited) when `HeldLookUps` says so (a `sync`, a process of
        its own, looks at its first resolution)."""
        report = PlaceholdersReport()
        await asyncio.to_thread(self.store.attach)  # off the loop; the store's own calls below then find none due
        placeholders = not self.known_only and self.settings.create_unknown_contacts
        addresses = self.store.unresolved_addresses(held=True)
        look_up = placeholders or (bool(addresses) and await self._held.due(self.crm, addresses))
        found = False  # a held address a listing gave a contact
        done: set[str] = set()
        listed: CRMIndex | None = None  # the CRM's contacts, listed once an address no contact is known for is looked up
        for address in addresses:
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
            if not look_up:
                continue
            primary = next((a for a in group if a.startswith("+")), group[0])
            # A contact may hold it since the last contacts sync: made by the owner or another Mac, or by
            # a placeholder create of ours whose answer was lost. Citadel's search cannot find a phone
            # stored in another format, so the listing is searched here, normalised like the cards.
            if listed is None:
                await self.creates.landed()
                listed = CRMIndex(await self.crm.list_contacts(), self.normalize)
            if owners := listed.matching(group):
                found = True
                existing = listed.by_id[min(owners)]
                origin = "crm"
                if is_placeholder(existing):  # not written by this Mac (written=None): it looks before sending
                    self.store.remember_contact(existing["id"], "placeholder", f"placeholder:{primary}")
                    origin = "placeholder"  # of the whole group: a card holding any of them promotes it
                self.store.map_addresses(group, existing["id"], origin)
                self.store.note_created({existing["id"]: existing.get("createdAt")})
                continue
            if not placeholders:
                continue
            fields = placeholder_fields(primary)
            name = f"{fields['firstName']} {fields['lastName']}"
            # an email the CRM is known to refuse is not sent (nor promised by a dry run): its 422's words
            refusal = None if "@" not in primary or crm_takes_email(primary) else "email: Invalid email"
            if refusal is None:
                try:
                    contact = await self.creates.create(fields)
                except crmlib.Rejected as exc:
                    refusal = exc.reason
                except (crmlib.Ambiguous, crmlib.BadResponse) as exc:  # about this create alone: a 500, a 2xx
                    # without the record, a proxy's page. The address stays unresolved, its items wait, and
                    # the next resolution's listing finds the placeholder if it landed (`Creates.landed`).
                    report.unclear.append((name, exc.message))
                    log.warning("contacts.placeholder_unclear", address=primary, reason=exc.message)
                    continue
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
        self.creates.pass_ended()
        if not placeholders:
            if listed is not None:
                self._held.looked_up(found)
            self.store.hold_unresolved("unknown contact")  # attaches what was mapped above first
        await asyncio.to_thread(self.store.attach)
        return report
