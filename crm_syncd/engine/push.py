"""Step 4: the outbox delivered exactly once.

Each item is durably `sending` before its request leaves; outcomes are settled in batches; after a
crash, `sending` items are looked up in the CRM before anything is re-sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from crm_syncd import crm as crmlib
from crm_syncd.crm import occurred_iso
from crm_syncd.engine.reports import PushReport
from crm_syncd.logs import get_logger
from crm_syncd.settings import Settings
from crm_syncd.sources import row_key
from crm_syncd.store import LOOK_FIRST, UNKNOWN_OUTCOME, Item, Store, now_ms
from crm_syncd.watch import wait_event

log = get_logger("crm_syncd.engine")

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 15.0  # the longest a returning CRM waits for us
LATE_SEND_S = 1.0  # an item sent this long after its claim has its request's time recorded
SYNC_WAIT_MAX_S = 60.0  # a one-shot delivery the CRM asks to wait longer ends, keeping the rest queued
DEDUPE_RECHECK_MS = 3_600_000  # a contact found to need no look-up before sends is looked at again hourly


class Pusher:
    """Delivers the outbox with bounded concurrency, backing off while the CRM is unwell.

    `refresh_contacts` runs a contacts pass and a resolution: delivery asks for them when a contact
    vanished from the CRM (`contacts_stale`). `resolve_fresh` runs a resolution unless a contacts pass
    is under way (then it says False): delivery asks for it when items were extracted during its pass
    (`fresh_items`), so a stranger's first text does not wait for a backlog to be delivered.
    """

    def __init__(self, settings: Settings, store: Store, crm: crmlib.CitadelClient,
                 refresh_contacts: Callable[[], Awaitable[Any]],
                 resolve_fresh: Callable[[], Awaitable[bool]]) -> None:
        self.settings = settings
        self.store = store
        self.crm = crm
        self._refresh_contacts = refresh_contacts
        self._resolve_fresh = resolve_fresh
        self.contacts_stale = False  # set when a contact vanished from the CRM
        self.fresh_items = False  # set when an extraction added items: some may need a contact
        self.crm_failure: str | None = None  # why the CRM did not answer the last delivery; None once it does
        # (contact, UTC day) -> the newest outbox id when it was listed, and the listing; for one push, and
        # only for items extracted by then: another Mac may have sent a later item's copy since
        self._day_cache: dict[tuple[int, str], tuple[int, list[dict]]] = {}
        self._adopted: dict[int, int] = {}  # CRM interaction id -> the outbox item that adopted it, for one push
        self._same_contact: dict[int, asyncio.Future[bool]] = {}  # contact id -> still the one made, for one push
        self._ambiguous: Counter[int] = Counter()  # outbox id -> 500s answered to it (this process), until settled
        # Twins: one fanned-out row's items for one contact (`_twins_of`), one interaction. Whose delivery is
        # under way (the others wait for it), which reached the CRM as what id (until settled), and which
        # may have reached it (a write left unsure: the others stay `sending`, looked up with it)
        self._twins_busy: dict[Twins, asyncio.Event] = {}
        self._twins_landed: dict[Twins, int] = {}
        self._twins_unsure: set[Twins] = set()
        self._look_first = False  # every item is looked for in the CRM before it is sent (a restored state)
        self._claimed: dict[int, float] = {}  # outbox id -> when it was claimed (monotonic), until it is sent
        self._recover_at = 0.0  # when the writes left `sending` may be looked up (monotonic; 0: not reckoned yet)
        self._backoff_until = 0.0
        self._backoff_since = 0.0  # when the current round of failures began
        self._failures_in_row = 0
        self._stop = asyncio.Event()  # the daemon's stop, for this pass (a sync has none)

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
        self._look_first = self.store.get(LOOK_FIRST) is not None
        self._claimed.clear()
        self._stop = stop or asyncio.Event()
        if not await self._recover(report, wait=stop is None):  # the daemon delivers new items meanwhile
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
                if self.fresh_items:  # a contacts pass under way leaves it set: asked again next round
                    await self._resolve_fresh()
                due = self._recover_at and not self.recover_in()  # leftovers' look-up: once the queue drains
                if queue.qsize() < limit and not due:  # at most 3 × limit `sending` at once, as many as a crash leaves to look up
                    for item in self.store.claim(2 * limit - queue.qsize()):
                        self._claimed[item.id] = time.monotonic()
                        queue.put_nowait(item)
                if queue.empty() and not busy:
                    if self.contacts_stale:  # a contact vanished: match its items afresh
                        await self._refresh_contacts()
                        continue
                    if self.store.sending():  # unsure writes: look them up, then resend what is missing
                        if not await self._recover(report, wait=stop is None) or self.recover_in():
                            break  # the CRM failed again, or not yet: the daemon comes back for them then
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
        # every source read to its end since, and nothing waits: what the state lacked is in its ledger now
        if self._look_first and self.store.get(LOOK_FIRST) == [] and not self.store.waiting_left():
            self.store.put(LOOK_FIRST, None)
            log.info("push.caught_up", after="a discontinuity of the state")
        return report

    async def _deliver(self, item: Item, halt: asyncio.Event) -> tuple[str, Item, Any]:
        """Deliver one item, or take its twin's interaction: a group text or call that lists a person
        under two addresses (a phone and an email on one card, or handles Messages ties) gives their
        contact two items of one row, which are one interaction."""
        if (twins := _twins_of(item)) is None:
            return await self._send(item, halt)
        while (busy := self._twins_busy.get(twins)) is not None:
            await busy.wait()
        self._twins_busy[twins] = done = asyncio.Event()
        try:
            if twins in self._twins_unsure:
                return "waits", item, None
            twin = self._twins_landed.get(twins) or self.store.delivered_twin(item, twins[1])
            if twin is not None:
                log.debug("push.twin", item=item.id, crm_id=twin)
                return "twin", item, twin
            outcome = await self._send(item, halt)
            if outcome[0] in ("delivered", "adopted"):
                self._twins_landed[twins] = outcome[2]
            elif outcome[0] == "unsure" or (outcome[0] == "failed" and self._ambiguous[item.id]):
                self._twins_unsure.add(twins)  # its write may have landed: its twins wait for a look-up
            return outcome
        finally:
            del self._twins_busy[twins]
            done.set()

    async def _send(self, item: Item, halt: asyncio.Event) -> tuple[str, Item, Any]:
        if not await self._wait_backoff(halt):
            return "unsent", item, None
        payload = {"type": item.type, "occurredAt": occurred_iso(item.occurred_ms), "source": "IMPORT_IOS"}
        if item.duration_s:
            payload["durationSeconds"] = item.duration_s
        try:
            if not await self._still_the_contact(item.contact_id):
                return "vanished", item, None  # its id is another contact's now: forgotten, matched afresh
            if self._look_first or await dedupe_wanted(self.settings.dedupe_against_crm, self.store, self.crm,
                                                       item.contact_id):
                existing = await self._find_in_crm(item)
                if existing is not None:
                    return "adopted", item, existing
            if time.monotonic() - self._claimed.pop(item.id, 0.0) > LATE_SEND_S:  # held back (a back-off)
                self.store.leaving([item])  # a restart after a crash waits for its write from now, not its claim
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
        made = (await self.crm.get_contact(contact_id)).get("createdAt")
        if recorded is None:  # mapped by a version that did not record it: from now on
            self.store.note_created({contact_id: made})
        elif made not in (None, recorded):
            log.warning("push.contact_replaced", contact_id=contact_id)
            return False
        return True

    async def _unsure(self, item: Item, exc: crmlib.CRMError) -> tuple[str, Item, Any]:
        """The write may have happened (a 500, or a reply lost after sending): look before resending. The
        daemon stopping meanwhile leaves it `sending`, looked up by the next start; a sync that gives up on
        the CRM lets the look-up end (within the shutdown deadline), so its bounded retries can conclude."""
        if not await self._wait_backoff(self._stop):  # a slow CRM may still be finishing the write
            return "unsure", item, exc.message
        if exc.in_flight:  # we, or a proxy (a 504, a 524), gave up waiting; the CRM may not have: give it as long again
            log.info("push.unsure_waits", item=item.id, seconds=self.settings.request_timeout_s)
            if await wait_event(self._stop, self.settings.request_timeout_s):
                return "unsure", item, exc.message
        self._day_cache.pop((item.contact_id, occurred_iso(item.occurred_ms)[:10]), None)
        try:
            existing = await self._find_in_crm(item)
        except crmlib.CRMError as lookup:
            log.debug("push.unsure", item=item.id, error=exc.message, lookup=lookup.message)
            return "unsure", item, exc.message  # stays `sending`: looked up again before any resend
        log.debug("push.looked_up", item=item.id, error=exc.message, found=existing)
        if existing is not None:
            return "adopted", item, existing
        if exc.judges_item:  # bounded: 500s and mangled answers, not 503s
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
            elif outcome == "twin":  # its interaction is its twin's: in the ledger under that id
                delivered.append((item, value))
                report.twins += 1
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
            elif outcome == "waits":  # stays `sending`: looked up with its twin, whose write may have landed
                pass
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
        for item, _ in delivered:  # in the store now (or moved by a merge, the contact gone)
            self._twins_landed.pop(_twins_of(item), None)
        for contact_id in {item.contact_id for outcome, item, _ in batch if outcome == "vanished"}:
            self.store.forget_contact(contact_id)
            log.warning("push.contact_vanished", contact_id=contact_id)

    # -- exactly-once helpers -------------------------------------------------------------

    def recover_in(self) -> float:
        """Seconds until the writes left `sending` by a previous process may be looked up (0: now)."""
        return max(0.0, self._recover_at - time.monotonic())

    async def _recover(self, report: PushReport, *, wait: bool = True) -> bool:
        """Settle items a previous process left `sending`: adopt what reached the CRM, requeue the rest.
        A request sent lately (a crash, then a quick restart) may still be on its way into the CRM, and
        looking now could miss it and send it again: that is waited out, or, without `wait`, left for
        later (`recover_in`) while other items go; their twins wait with them."""
        self._twins_unsure.clear()  # each `sending` item is looked up now
        leftovers = self.store.sending()
        if not leftovers:
            self._recover_at = 0.0
            return True
        if not self._recover_at:  # reckoned once for them: a clock set back meanwhile must not stretch it
            self._recover_at = time.monotonic() + outlasted_in(self.settings.request_timeout_s,
                                                               self.store.last_claim_ms() or 0)
        if left := self.recover_in():
            log.info("push.recover_waits", seconds=round(left, 1), items=len(leftovers))
            if not wait:
                self._twins_unsure.update(twins for item in leftovers if (twins := _twins_of(item)))
                return True
            await asyncio.sleep(left)
        self._recover_at = 0.0  # looked up now: the next leftovers are reckoned afresh
        self._day_cache.clear()  # listings taken before these writes may predate them
        adopted, requeue, failed, complete = [], [], [], True
        for item in leftovers:
            await self._wait_backoff()
            try:
                existing = await self._find_in_crm(item) if item.contact_id is not None else None
            except crmlib.CRMError as exc:
                self.back_off(exc.retry_after)
                if not exc.judges_item:  # the CRM is down, refuses the key, a redirect, a proxy's page: keep
                    report.unreachable, complete = exc.message, False  # what was learnt; the rest is looked up
                    if isinstance(exc, crmlib.Unauthorized):  # next time
                        report.refused = exc.message
                    log.warning("push.recover_deferred", reason=exc.message,
                                items=len(leftovers) - len(adopted) - len(requeue) - len(failed))
                    break
                # an answer about this item's day (a 500, a listing never complete): it alone waits,
                # `sending`, for a bounded number of look-ups
                self._ambiguous[item.id] += 1
                if self._ambiguous[item.id] >= self.settings.max_ambiguous_retries:
                    failed.append((item, f"{UNKNOWN_OUTCOME}: {exc.message}"))
                if twins := _twins_of(item):  # its write may have landed: its twins wait for a look-up
                    self._twins_unsure.add(twins)
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
        report.delivered_by_type.update(item.type for item, _ in adopted)
        if complete:  # the CRM answered every look-up: whatever failed before is over
            report.unreachable = self.crm_failure = None
        log.info("push.recovered", adopted=len(adopted), requeued=len(requeue))
        return complete

    async def _find_in_crm(self, item: Item) -> int | None:
        """The id of an interaction in the CRM that is this item and not yet in the ledger."""
        day = occurred_iso(item.occurred_ms)[:10]
        cache_key = (item.contact_id, day)
        listed_after, found = self._day_cache.get(cache_key, (0, None))
        if found is None or item.id > listed_after:
            listed_after = self.store.newest_id()
            found = await self.crm.list_interactions(item.contact_id, dt.date.fromisoformat(day))
            self._day_cache[cache_key] = listed_after, found
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
        if (cached := self._day_cache.get((item.contact_id, day))) is not None:
            cached[1].append(created)

    # -- back-off ---------------------------------------------------------------------------

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


Twins = tuple[int | None, str]


def _twins_of(item: Item) -> Twins | None:
    """(contact, row key) of an item of a fanned-out row; None for a row with one party."""
    shared = row_key(item.key)
    return None if shared is None else (item.contact_id, shared)


def outlasted_in(timeout: float, sent_ms: int) -> float:
    """Seconds until a request sent at `sent_ms` (wall clock) can no longer be on its way into the CRM:
    it is given as long as a live one (its `timeout`, then as long again for the CRM to finish a write
    it had received: `Pusher._unsure`), and never longer (the clock may have been set back since)."""
    return max(0.0, min(2 * timeout, sent_ms / 1000 + 2 * timeout - time.time()))


async def outlast_request(timeout: float, sent_ms: int, event: str, **fields: Any) -> None:
    """Wait until a request sent at `sent_ms` can no longer be on its way into the CRM (`outlasted_in`)."""
    if wait := outlasted_in(timeout, sent_ms):
        log.info(event, seconds=round(wait, 1), **fields)
        await asyncio.sleep(wait)


async def dedupe_wanted(mode: str, store: Store, crm: crmlib.CitadelClient, contact_id: int) -> bool:
    """Check the CRM before creating? `mode` is the `dedupe_against_crm` setting; in `auto` mode: for
    contacts that hold IMPORT_IOS interactions crm-syncd did not send (another Mac, an older tool). "No"
    is asked again after an hour: the owner's other Mac may begin delivering to the contact at any time."""
    if mode != "auto":
        return mode == "on"
    decided = store.dedupe_flag(contact_id)
    if decided is not None and (decided[0] or now_ms() - decided[1] < DEDUPE_RECHECK_MS):
        return decided[0]
    known = store.known_contact(contact_id)
    if decided is None and known and known[0] in ("card", "placeholder") and known[2] is not None:
        flag = False  # fields we wrote: ours, made this moment, before anyone else could deliver to it
    else:
        ours = store.crm_ids(contact_id)
        recent = await crm.recent_interactions(contact_id)
        flag = any(i.get("source") == "IMPORT_IOS" and i["id"] not in ours for i in recent)
    store.set_dedupe_flag(contact_id, flag)
    return flag
