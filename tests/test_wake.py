"""Waking from sleep: the wall clock has run ahead of the monotonic one, and file events may have
been missed meanwhile, so the daemon probes every source and rescans the AddressBook at once
instead of waiting for its next timers.

The daemon's timers run in-process with the real Engine, Store and the stand-in CRM. Two things
differ from a running daemon: the clock the daemon module reads is one a test can put to sleep, and
the timers look at it every 20 ms instead of every 5 s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from crm_syncd import daemon as daemon_module
from crm_syncd.crm import CitadelClient
from crm_syncd.engine import SOURCES
from crm_syncd.settings import Settings
from tests.harness.library import Library
from tests.harness.processes import daemon_in_process, until

JANE = "+16135550111"


class SleepyClock:
    """`time` as the daemon module sees it. `sleep(s)` moves the wall clock only, as on a Mac
    asleep; `ticks` counts the timers' looks at the monotonic clock."""

    def __init__(self) -> None:
        self.asleep_s = 0.0
        self.ticks = 0

    def sleep(self, seconds: float) -> None:
        self.asleep_s += seconds

    def time(self) -> float:
        return time.time() + self.asleep_s

    def monotonic(self) -> float:
        self.ticks += 1
        return time.monotonic()



def test_after_the_mac_wakes_every_source_is_probed_and_the_address_book_rescanned_at_once(
        library: Library, citadel, tmp_path: Path, monkeypatch):
    clock = SleepyClock()
    monkeypatch.setattr(daemon_module, "time", clock)
    monkeypatch.setattr(daemon_module, "TICK_S", 0.02)
    settings = Settings(api_url=citadel.url, messages_db=library.messages_db, calls_db=library.calls_db,
                        addressbook_dir=library.addressbook_dir, state_dir=tmp_path / "state",
                        contacts_rescan_s=3600, safety_probe_s=3600)  # no timer is due for an hour
    hinted: list[str] = []

    async def scenario() -> None:
        async with CitadelClient(citadel.url, timeout=5) as crm:
            daemon = await daemon_in_process(settings, crm)
            timers = asyncio.create_task(daemon._timers(lambda: hinted.extend(SOURCES)))  # as `run` probes them
            try:
                library.card(first="Added", last="Overnight", phones=[JANE])
                await until(lambda: clock.ticks >= 5, "five ticks of the timers")
                assert (hinted, citadel.contacts()) == ([], [])  # awake: nothing due yet

                clock.sleep(8 * 3600)

                await until(lambda: set(hinted) == set(SOURCES) and citadel.contacts(), "the probes and the rescan")
                assert [c["lastName"] for c in citadel.contacts()] == ["Overnight"]
            finally:
                daemon.stop.set()
                await timers
                daemon.store.close()

    asyncio.run(scenario())
