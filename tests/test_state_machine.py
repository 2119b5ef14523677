"""A hypothesis state machine over the cursor, the outbox and the ledger.

The real Engine and Store run against a fixture chat.db and the stand-in CRM over real HTTP.
Rules insert messages, send from the Mac (a row that is sent or fails a while after it appears),
re-insert old ones with a high ROWID and a new guid (an iCloud history download), renumber the
whole database (a rebuild), restart, crash in the middle of a push, and make the CRM answer
429/500/503. Invariant: no interaction is ever in the CRM twice; after a final clean run, every
real one is there exactly once, and no failed send is.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, settings as hsettings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from crm_syncd.crm import CitadelClient, CRMError
from crm_syncd.engine import SOURCES, Engine
from crm_syncd.settings import Settings
from crm_syncd.store import Store
from tests.harness.chatdb import ChatDB
from tests.harness.citadel import CitadelServer, Faults
from tests.harness.library import Library, ago

PEOPLE = ["+16135550111", "+19025550122", "jane@example.org"]


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="crm-syncd-sm-"))
        self.lib = Library.create(self.tmp / "home", sources=0)
        self.lib.card(first="Jane", last="Doe", phones=[PEOPLE[0]], emails=[PEOPLE[2]])
        self.server = CitadelServer(self.tmp / "citadel.sqlite").start()
        self.settings = Settings(
            api_url=self.server.url, messages_db=self.lib.messages_db, calls_db=self.lib.calls_db,
            addressbook_dir=self.lib.addressbook_dir, state_dir=self.tmp / "state", push_concurrency=4,
            request_timeout_s=2, max_ambiguous_retries=50, initial_lookback_days=3650)
        self.clock = ago(days=30).replace(microsecond=0)
        self.real: Counter[tuple[str, str]] = Counter()  # (counterpart, occurredAt) of real messages
        self.rows: list[tuple[str, bool, object]] = []  # what chat.db holds: (address, from_me, at)
        self.sending: list[tuple[str, str, datetime]] = []  # sends under way: (guid, address, at)
        self.finished: set[str] = set()  # guids of those sent or failed
        self.send_clock = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)  # recent, own seconds

    # -- Apple's side ---------------------------------------------------------------------

    @rule(person=st.sampled_from(PEOPLE), from_me=st.booleans())
    def insert(self, person: str, from_me: bool) -> None:
        self.clock += timedelta(seconds=7)
        self.lib.text(person, from_me=from_me, at=self.clock)
        self.rows.append((person, from_me, self.clock))
        self.real[(person, self.clock.strftime("%Y-%m-%dT%H:%M:%S.000Z"))] += 1

    @rule(person=st.sampled_from(PEOPLE))
    def start_sending(self, person: str) -> None:
        """Messages writes an outgoing row before sending it (is_sent = 0); it is sent or fails later."""
        self.send_clock += timedelta(seconds=3)
        at = self.send_clock
        guid = f"SENDING-{len(self.sending)}"
        self.lib.text(person, from_me=True, is_sent=0, at=at, guid=guid)
        self.sending.append((guid, person, at))

    @rule(data=st.data(), fails=st.booleans())
    def finish_sending(self, data, fails: bool) -> None:
        open_sends = [s for s in self.sending if s[0] not in self.finished]
        if open_sends:
            guid, person, at = data.draw(st.sampled_from(open_sends))
            self._finish(guid, person, at, fails)

    def _finish(self, guid: str, person: str, at: datetime, fails: bool) -> None:
        (rowid,) = self.lib.chat.conn.execute("SELECT ROWID FROM message WHERE guid = ?", (guid,)).fetchone()
        self.lib.chat.finish_sending(rowid, error=4 if fails else 0)
        self.finished.add(guid)
        if not fails:
            self.rows.append((person, True, at))
            self.real[(person, at.strftime("%Y-%m-%dT%H:%M:%S.000Z"))] += 1

    @rule(data=st.data())
    def icloud_reinsert(self, data) -> None:
        """An old message comes back with a new ROWID and a new guid but its original date."""
        if self.rows:
            person, from_me, at = data.draw(st.sampled_from(self.rows))
            self.lib.text(person, from_me=from_me, at=at)

    @rule(seed=st.integers(0, 1000))
    def rebuild(self, seed: int) -> None:
        """chat.db is rebuilt: the same messages (same guids) under new, lower and shuffled ROWIDs."""
        old = self.lib.chat
        rows = old.conn.execute("SELECT m.guid, m.date, m.is_from_me, m.is_sent, m.error, h.id FROM message m "
                                "JOIN handle h ON h.ROWID = m.handle_id").fetchall()
        old.close()
        random.Random(seed).shuffle(rows)
        fresh_path = self.tmp / "rebuilt.db"
        fresh = ChatDB.create(fresh_path)
        chats: dict[str, tuple[int, int]] = {}
        for guid, date, from_me, is_sent, error, address in rows:
            if address not in chats:
                handle = fresh.handle(address)
                chats[address] = (handle, fresh.chat([handle]))
            handle, chat = chats[address]
            fresh.message(chat=chat, handle=handle, from_me=bool(from_me), at=date, guid=guid, is_sent=is_sent,
                          error=error)
        fresh.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{self.lib.messages_db}{suffix}").unlink(missing_ok=True)
        os.replace(fresh_path, self.lib.messages_db)
        self.lib.chat = ChatDB.open(self.lib.messages_db)
        self.lib._chats = {(address, "iMessage"): chat for address, (_, chat) in chats.items()}

    # -- the CRM's side -------------------------------------------------------------------

    @rule(kind=st.sampled_from(["", "429", "503", "500-before-write", "500-after-write"]))
    def crm_mood(self, kind: str) -> None:
        self.server.faults = Faults(rate=0.3 if kind else 0.0, kinds=(kind or "503",), seed=len(self.rows))

    # -- crm-syncd ------------------------------------------------------------------------

    @rule()
    def sync(self) -> None:
        asyncio.run(self._run())

    @rule(after=st.integers(1, 4))
    def crash_mid_push(self, after: int) -> None:
        asyncio.run(self._run(crash_after=after))

    async def _run(self, crash_after: int | None = None) -> None:
        store = Store(self.settings.state_db)
        try:
            async with CitadelClient(self.server.url, timeout=2, max_connections=4) as crm:
                engine = Engine(self.settings, store, crm)
                await engine.sync_contacts()
                for source in SOURCES:
                    await asyncio.to_thread(engine.extract, source)
                await engine.resolve()
                push = asyncio.create_task(engine.push())
                if crash_after is not None:
                    posted = self._posts() + crash_after
                    while not push.done() and self._posts() < posted:
                        await asyncio.sleep(0.005)
                    push.cancel()  # in-flight requests are abandoned: their items stay `sending`
                await asyncio.gather(push, return_exceptions=True)
        except CRMError:  # a CRM that keeps failing: the next run continues from the outbox
            pass
        finally:
            store.close()

    def _posts(self) -> int:
        return sum(n for (method, route, _), n in self.server.stats.items()
                   if method == "POST" and route.endswith("/interactions"))

    # -- the promise ----------------------------------------------------------------------

    def _in_crm(self) -> Counter[tuple[str, str]]:
        by_id = {c["id"]: c for c in self.server.contacts()}
        jane = next((c["id"] for c in by_id.values() if c["firstName"] == "Jane"), None)
        out: Counter[tuple[str, str]] = Counter()
        for i in self.server.interactions():
            person = PEOPLE[0] if i["contactId"] == jane else by_id[i["contactId"]]["phone"]
            out[(person, i["occurredAt"])] += 1
        return out

    @invariant()
    def never_twice(self) -> None:
        if hasattr(self, "server"):
            doubled = {k: n for k, n in self._in_crm().items() if n > 1}
            assert not doubled, f"delivered twice: {doubled}"

    def teardown(self) -> None:
        try:
            for guid, person, at in self.sending:  # what is still under way is sent at last
                if guid not in self.finished:
                    self._finish(guid, person, at, fails=False)
            self.server.faults = Faults()
            Store(self.settings.state_db).retry_failed() if self.settings.state_db.exists() else None
            asyncio.run(self._run())
            expected = Counter({(PEOPLE[0] if p == PEOPLE[2] else p, at): 1 for p, at in self.real})
            assert self._in_crm() == expected
        finally:
            self.lib.close()
            self.server.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)


SyncMachine.TestCase.settings = hsettings(max_examples=12, stateful_step_count=12, deadline=None, derandomize=True,
                                         suppress_health_check=list(HealthCheck))
TestSyncMachine = SyncMachine.TestCase


def test_a_send_under_way_across_a_run_is_delivered_once_it_is_sent():
    """The machine's shortest failure when the mark passed an unsent row (found at 40 × 20)."""
    machine = SyncMachine()
    machine.start_sending(PEOPLE[0])
    machine.sync()
    machine.teardown()
