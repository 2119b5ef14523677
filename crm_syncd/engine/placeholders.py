"""Step 3: every open item gets a contact, or a placeholder made for its unknown number or email."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from crm_syncd import crm as crmlib
from crm_syncd.engine.contacts import CRMIndex
from crm_syncd.engine.creates import Creates
from crm_syncd.engine.reports import PlaceholdersReport
from crm_syncd.identity import Normalizer, crm_takes_email, is_placeholder, placeholder_fields
from crm_syncd.logs import get_logger
from crm_syncd.settings import Settings
from crm_syncd.store import Store

log = get_logger("crm_syncd.engine")


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

    async def resolve(self) -> PlaceholdersReport:
        """Give open items a contact: the one their address (or a handle Messages groups with it) has,
        else a placeholder made for them, unless placeholders are off (--known-only,
        create_unknown_contacts = false): then they are held."""
        report = PlaceholdersReport()
        await asyncio.to_thread(self.store.attach)  # off the loop; the store's own calls below then find none due
        placeholders = not self.known_only and self.settings.create_unknown_contacts
        done: set[str] = set()
        listed: CRMIndex | None = None  # the CRM's contacts, listed once a placeholder may be needed
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
                await self.creates.landed()
                listed = CRMIndex(await self.crm.list_contacts(), self.normalize)
            if owners := listed.matching(group):
                existing = listed.by_id[min(owners)]
                origin = "crm"
                if is_placeholder(existing):  # not written by this Mac (written=None): it looks before sending
                    self.store.remember_contact(existing["id"], "placeholder", f"placeholder:{primary}")
                    origin = "placeholder"  # of the whole group: a card holding any of them promotes it
                self.store.map_addresses(group, existing["id"], origin)
                self.store.note_created({existing["id"]: existing.get("createdAt")})
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
            self.store.hold_unresolved("unknown contact")  # attaches what was mapped above first
        await asyncio.to_thread(self.store.attach)
        return report
