"""Contact creates (and placeholders' promotions) whose answer may never come: noted before they are
sent, so a later pass knows a contact it finds for them may be crm-syncd's own, or may still be on its
way into the CRM."""

from __future__ import annotations

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

    async def create(self, fields: dict, made_for: tuple[str, dict] | None = None) -> dict:
        """POST a contact, noting the moment first: if its pass ends before the answer (a stop, a crash,
        a lost answer), the next pass knows the contact may still appear (`landed`). A card's
        create is noted first with its person and fields (`made_for`), the note kept until a definite
        refusal, or until the contact is recorded (`recorded`): the contact the next pass finds for them
        is the one crm-syncd made (`ContactsSync._own_unanswered_write`)."""
        self.store.put(CREATE_SENT, now_ms(), durable=False)  # a power cut outlasts any request anyway
        return await self._noted(lambda: self.crm.create_contact(fields), made_for)

    async def promote(self, contact_id: int, fields: dict, made_for: tuple[str, dict], card: dict) -> dict:
        """PUT a card's fields on a placeholder, noted like a card's create (with the `card` they came
        from: the placeholder's notes and number may have been kept): if it lands unanswered, the
        contact the next pass finds bears the card's name, no longer a placeholder's, and is still
        crm-syncd's."""
        return await self._noted(lambda: self.crm.update_contact(contact_id, fields), made_for, card)

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
        """The pass ends: every create it sent was answered (or refused)."""
        if self.store.get(CREATE_SENT) is not None:
            self.store.put(CREATE_SENT, None, durable=False)

    async def landed(self) -> None:
        """Before listing the CRM's contacts: a create an unfinished pass sent less than a request timeout
        ago may still be on its way in, and a listing taken now would miss it and make the contact twice."""
        if (sent := self.store.get(CREATE_SENT)) is not None:
            await outlast_request(self.settings.request_timeout_s, sent, "contacts.create_waits")
