"""The pipeline shared by `crm-syncd sync` and `crm-syncd run`.

sources → identity → store → crm, in four steps, a module each:

1. `contacts`: read every AddressBook store, merge cards into people, match them against the CRM by
   normalised phone/email, create what is missing, and fill the identity map.
2. `extract`: read a source past its high-water mark in bounded batches and move the rows into the
   outbox together with the new mark (one transaction per batch).
3. `placeholders`: give every open item a contact: the identity map, Apple's own person grouping, or
   a placeholder contact ("Unknown (+1-905-555-1234)"), or hold it.
4. `push`: deliver the outbox exactly once, with bounded concurrency.

Beside them: `owner` (the owner's own addresses), `creates` (contact creates whose answer may be
lost), `reports` (what each step reports).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from crm_syncd import crm as crmlib
from crm_syncd.engine.contacts import CONTACTS_PROBLEMS, CONTACTS_SYNCED, ContactsSync
from crm_syncd.engine.creates import Creates
from crm_syncd.engine.extract import SOURCES, Extractor
from crm_syncd.engine.owner import OwnAddresses
from crm_syncd.engine.placeholders import Placeholders
from crm_syncd.engine.push import Pusher
from crm_syncd.engine.reports import ContactsReport, PlaceholdersReport, PushReport, SourceReport
from crm_syncd.identity import Normalizer
from crm_syncd.logs import get_logger
from crm_syncd.settings import Settings
from crm_syncd.sources.sqlite import NeedsFullDiskAccess
from crm_syncd.store import LOOK_FIRST, REBUILD, Store

log = get_logger("crm_syncd.engine")

__all__ = ["CONTACTS_PROBLEMS", "CONTACTS_SYNCED", "SOURCES", "ContactsReport", "Engine", "PlaceholdersReport",
           "PushReport", "SourceReport"]


class Engine:
    """The four steps over one state store and one CRM client."""

    def __init__(self, settings: Settings, store: Store, crm: crmlib.CitadelClient, *,
                 known_only: bool = False) -> None:
        self.settings = settings
        self.store = store
        self.crm = crm
        self.stopping = threading.Event()  # set by a stopping process: extractions end at their next batch
        normalize = Normalizer(settings.default_region)
        owner = OwnAddresses(store, normalize)
        creates = Creates(settings, store, crm)
        self.contacts = ContactsSync(settings, store, crm, normalize, owner, creates)
        self.extractor = Extractor(settings, store, normalize, owner, self.stopping)
        self.placeholders = Placeholders(settings, store, crm, normalize, creates, known_only=known_only)
        self.pusher = Pusher(settings, store, crm, self._refresh_contacts, self._resolve_fresh)
        self.readers = self.extractor.readers
        self._contacts_lock = asyncio.Lock()

    def check_continuity(self, *, rebuild: bool = False) -> None:
        """Before anything is sent: when the state is not the one crm-syncd left (a backup restored over it,
        or a stamp lost), what the CRM got after the backup is above the state's marks and missing from its
        ledger. Every item is then looked for in the CRM before it is sent, until every source was read to
        its end and a delivery pass leaves nothing waiting; after a restore, the next contacts pass also
        rebuilds what the state knows of crm-syncd's contacts, as it does when `rebuild` (`--reconcile`)."""
        if rebuild:
            self.store.put(REBUILD, True)
        stamp = self.settings.stamp_path
        found = self.store.discontinuity(stamp)
        if found == "unwritable":
            log.warning("state.stamp_unwritable", path=str(stamp),
                        fix=f"make {stamp.parent} a folder you can write to, or remove what is in its place")
        elif found:
            log.warning("state.restored" if found == "behind" else "state.unstamped")
            self.store.put(LOOK_FIRST, list(SOURCES))  # the sources still to be read to their end (`extract`)
            if found == "behind":  # a stamp merely missing (as at an upgrade) lost nothing of the state
                self.store.doubt_failed()  # one may have been retried and delivered since: looked up first
                self.store.put(REBUILD, True)  # contacts made since the backup are found, not known

    def _advanced(self, wrote: bool) -> None:
        """After a pass that wrote to the CRM: a backup of the state from before it is now behind."""
        if wrote:
            self.store.advance(self.settings.stamp_path)

    # -- 1. contacts ----------------------------------------------------------------------

    def addressbook_signatures(self) -> dict[str, str]:
        """The `sqlite.signature` of every AddressBook store: two stats per store."""
        return self.contacts.signatures()

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
            stale = self.pusher.contacts_stale
            report = await self.contacts.run(list_crm=stale)
            if stale:
                self.pusher.contacts_stale = False
            self._advanced(bool(report.created or report.promoted or report.updated or report.merged))
            return report

    # -- 2. extraction --------------------------------------------------------------------

    def extract(self, source: str, *, full: bool = False, days: int | None = None,
                progress: Callable[[int], None] | None = None) -> SourceReport:
        """Move new rows of one source into the outbox. Blocking; run it off the event loop."""
        report = self.extractor.extract(source, full=full, days=days, progress=progress)
        if (days is None and not report.error and not self.stopping.is_set()
                and not (report.missing and self.store.mark(source))  # gone for now: back later, unread
                and source in (behind := self.store.get(LOOK_FIRST) or [])):  # read to its end since a discontinuity
            self.store.put(LOOK_FIRST, [s for s in behind if s != source])
        if report.added:
            self.pusher.fresh_items = True  # a push pass under way gives them a contact, if they need one
        return report

    # -- 3. resolution --------------------------------------------------------------------

    async def resolve(self, *, fold: bool = True) -> PlaceholdersReport:
        """Give open items a contact (see `Placeholders.resolve`); never beside a contacts pass.

        First, unless `fold` is False, a contacts pass when Messages has newly grouped a placeholder's
        handle with a card's (`Store.regrouped`): it folds the placeholder into the card's contact, so
        the handle's items go there, not to the placeholder, from now on."""
        if fold and self.store.regrouped():
            try:
                await self.sync_contacts()
            except NeedsFullDiskAccess as exc:  # the daemon's own contacts pass names it; this one is a bonus
                log.warning("contacts.regroup_skipped", error=str(exc))
            except BaseException:
                self.store.regroup_again()  # a CRM down: asked for again at the next resolution
                raise
        async with self._contacts_lock:
            self.pusher.fresh_items = False  # all extracted so far are resolved here
            report = await self.placeholders.resolve()
            self._advanced(bool(report.created))
            return report

    # -- 4. delivery ----------------------------------------------------------------------

    async def push(self, *, stop: asyncio.Event | None = None) -> PushReport:
        """Deliver everything deliverable, then return (early when `stop` is set): see `Pusher.push`."""
        report = await self.pusher.push(stop=stop)
        self._advanced(bool(report.delivered or report.twins))
        return report

    @property
    def crm_failure(self) -> str | None:
        """Why the CRM did not answer the last delivery; None once it does."""
        return self.pusher.crm_failure

    def back_off(self, retry_after: float | None = None) -> None:
        self.pusher.back_off(retry_after)

    def backoff_left(self) -> float:
        return self.pusher.backoff_left()

    def recover_in(self) -> float:
        return self.pusher.recover_in()

    async def _refresh_contacts(self) -> None:
        await self.sync_contacts()
        await self.resolve()

    async def _resolve_fresh(self) -> bool:
        """Resolve what was extracted during a push pass, unless a contacts pass is under way (False).

        No fold: its contacts pass would list a placeholder's interactions while the pass still has
        some of them in flight, unsettled, and take those for the owner's. It waits for the pass's end."""
        if self.contacts_busy:
            return False
        await self.resolve(fold=False)
        return True
