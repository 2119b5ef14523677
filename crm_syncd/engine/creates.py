"""Contact creates (and placeholders' promotions) whose answer may never come: noted before they are
sent, so a later pass knows a contact it finds for them may be crm-syncd's own, or may still be on its
way into the CRM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from crm_syncd import crm as crmlib
from crm_syncd.engine.push import outlast_request
from crm_syncd.settings import Settings
from crm_syncd.store import Store, now_ms

CREATE_SENT = "contact_create_sent_ms"  # kv: when a contact pass that has not finished last sent a create
UNANSWERED_CREATES = "contact_creates_unanswered"  # kv: [{person, fields, sent_ms}] of card writes that may have landed


@dataclass
class Creates:
    """POSTs contacts for the contacts pass and the placeholders, and PUTs placeholders' promotions,
    keeping the notes above."""

    settings: Settings
    store: Store
    crm: crmlib.CitadelClient
    _answered: dict[str, dict] = field(default_factory=dict, init=False, repr=False)  # person -> note, until recorded
    _in_flight: bool = field(default=False, init=False, repr=False)  # a create this pass sent may still be landing

    async def create(self, fields: dict, made_for: tuple[str, dict] | None = None) -> dict:
        """POST a contact, noting the moment first: if its pass ends before the answer (a stop, a crash,
        a lost answer), the next pass knows the contact may still appear (`landed`). A card's
        create is noted first with its person and fields (`made_for`), the note kept until a definite
        refusal, or until the contact is recorded (`recorded`): the contact the next pass finds for them
        is the one crm-syncd made (`ContactsSync._own_unanswered_write`)."""
        self.store.put(CREATE_SENT, now_ms(), durable=False)  # a power cut outlasts any request anyway
        try:
            return await self._noted(lambda: self.crm.create_contact(fields), made_for)
        except crmlib.CRMError as exc:
            self._in_flight |= exc.in_flight
            raise

    async def update(self, contact_id: int, fields: dict, made_for: tuple[str, dict], card: dict) -> dict:
        """PUT a card's fields (a placeholder's promotion, a card's edits), noted like a card's create with
        what the contact then holds (`made_for`) and the `card` they came from: if it lands unanswered,
        the next pass finds the contact as crm-syncd left it, not edited by the owner. An answer that may
        hide the write (a 2xx without the record, a 500, a lost answer) is checked by a GET first."""
        return await self._noted(lambda: self._put(contact_id, fields), made_for, card)

    async def _put(self, contact_id: int, fields: dict) -> dict:
        """`update_contact`; when its answer may hide the write, the contact as a GET finds it, if it holds
        `fields` (after a request timeout when the CRM may still be writing), else the PUT's error."""
        try:
            return await self.crm.update_contact(contact_id, fields)
        except crmlib.CRMError as exc:
            if not exc.maybe_written:
                raise
            if exc.in_flight:  # a proxy (or we) stopped waiting: the CRM may not have
                await asyncio.sleep(self.settings.request_timeout_s)
            try:
                current = await self.crm.get_contact(contact_id)
            except crmlib.CRMError:
                raise exc from None
            if any((current.get(k) or None) != (v or None) for k, v in fields.items()):
                raise
            return current

    async def _noted(self, write: Callable[[], Awaitable[dict]], made_for: tuple[str, dict] | None,
                     card: dict | None = None) -> dict:
        # each note its own (its moment): a write sent again as an earlier one was is not taken for it
        note = None
        if made_for is not None:
            note = {"person": made_for[0], "fields": made_for[1], "sent_ms": now_ms(), **({"card": card} if card else {})}
            self.store.put(UNANSWERED_CREATES, [*self.unanswered(), note], durable=False)
        try:
            contact = await write()
        except crmlib.CRMError as exc:
            if note is not None and not exc.maybe_written:
                self.drop([note], durable=False)
            raise
        if note is not None:  # kept until the contact is recorded: a crash before then leaves it for the next pass
            self._answered[note["person"]] = note
        return contact

    def recorded(self, person: str) -> None:
        """The contact written for `person` is recorded as crm-syncd's: the note of its answered write goes."""
        if (note := self._answered.pop(person, None)) is not None:
            self.drop([note], durable=False)

    def unanswered(self) -> list[dict]:
        """The notes of creates sent without an answer (by earlier passes, or this one so far)."""
        return self.store.get(UNANSWERED_CREATES, [])

    def drop(self, notes: list[dict], *, durable: bool = True) -> None:
        """Forget these notes: their creates were answered, or the pass that was given them has ended
        (its listing found what landed)."""
        held = self.unanswered()
        if any(note in notes for note in held):
            self.store.put(UNANSWERED_CREATES, [note for note in held if note not in notes], durable=durable)

    def pass_ended(self) -> None:
        """The pass ends: every create it sent was answered (or refused), unless an answer came while the
        CRM may still have been writing (a proxy's 500 page): the next listing waits for it (`landed`)."""
        if self._in_flight:
            self._in_flight = False
        elif self.store.get(CREATE_SENT) is not None:
            self.store.put(CREATE_SENT, None, durable=False)

    async def landed(self) -> None:
        """Before listing the CRM's contacts: a create an unfinished pass sent less than a request timeout
        ago may still be on its way in, and a listing taken now would miss it and make the contact twice."""
        if (sent := self.store.get(CREATE_SENT)) is not None:
            await outlast_request(self.settings.request_timeout_s, sent, "contacts.create_waits")
