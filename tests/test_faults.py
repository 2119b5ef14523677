"""Delivery guarantees under faults, end to end: real `crm-syncd` processes, real SQLite fixtures,
the stand-in Citadel over real HTTP. Each test says which fault it injects and proves that every
interaction arrives exactly once (none missing, none twice) and that the process survives it.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from crm_syncd.crm import CitadelClient
from crm_syncd.engine import Engine
from crm_syncd.engine.creates import UNANSWERED_CREATES, Creates
from crm_syncd.settings import Settings
from crm_syncd.store import Item, Store
from tests.conftest import CLI
from tests.harness.chatdb import ChatDB
from tests.harness.citadel import CitadelServer, Faults
from tests.harness.library import Library, ago
from tests.harness.processes import REPO, RunningDaemon, eventually, unprivileged

JANE = "+16135550111"
BOB = "+19025550122"


def iso(at) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def delivered(citadel: CitadelServer) -> Counter:
    """The CRM's interactions as a multiset of (contactId, type, occurredAt)."""
    return Counter((i["contactId"], i["type"], i["occurredAt"]) for i in citadel.interactions())


def compare(expected: Counter, got: Counter) -> tuple[int, int]:
    """(duplicates, missing): extra copies in `got`, and expected items absent from it."""
    duplicates = sum((got - expected).values())
    missing = sum((expected - got).values())
    return duplicates, missing


def count_interactions(citadel: CitadelServer) -> int:
    """How many interactions the CRM holds, read on a connection of our own (the server stays free)."""
    conn = sqlite3.connect(f"file:{citadel.db_path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM interactions").fetchone()[0]
    finally:
        conn.close()


def contact_ids(citadel: CitadelServer) -> dict[str, int]:
    """phone -> contact id; fails if one phone has several contacts."""
    seen: dict[str, int] = {}
    for c in citadel.contacts():
        if c["phone"]:
            assert c["phone"] not in seen, f"two contacts for {c['phone']}"
            seen[c["phone"]] = c["id"]
    return seen


@pytest.fixture
def daemon_env(daemon_env: CLI) -> CLI:
    daemon_env.env["CRM_SYNCD_SAFETY_PROBE_S"] = "1"  # fault tests lean on the safety net too
    return daemon_env


# -- kill -9 during a backfill ------------------------------------------------------------------

PEOPLE = [f"+1613555{n:04d}" for n in range(1000, 1050)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_at_random_moments_during_a_backfill_loses_nothing_and_sends_nothing_twice(
        library: Library, citadel: CitadelServer, cli: CLI, home: Path):
    rng = random.Random(20240611)
    total, kills_wanted = 20_000, 20
    for n, phone in enumerate(PEOPLE):
        library.card(source=n % 3, first=f"Person{n}", last="Backfill", phones=[phone])
    library.chat.autocommit = False
    start = ago(days=100).replace(microsecond=0)
    sent: list[tuple[str, str, str]] = []  # (phone, type, occurredAt)
    for n in range(total):
        phone, from_me = PEOPLE[n % len(PEOPLE)], rng.random() < 0.4
        at = start + timedelta(seconds=7 * n, milliseconds=rng.randrange(1000))  # one message per second
        library.text(phone, from_me=from_me, at=at)
        sent.append((phone, "TEXT_OUTBOUND" if from_me else "TEXT_INBOUND", iso(at)))
    library.chat.commit()
    citadel.latency_s = 0.001
    cli.env.update(CRM_SYNCD_BATCH_SIZE="1000", CRM_SYNCD_CONTACTS_RESCAN_S="2", CRM_SYNCD_SAFETY_PROBE_S="2",
                   CRM_SYNCD_REQUEST_TIMEOUT_S="2")  # loopback: a restart waits out at most 2 s of in-flight writes

    posts = ("POST", "/api/contacts/:id/interactions", 201)
    kills, early, began = 0, 0, time.monotonic()
    while kills < kills_wanted:
        proc = cli.popen(rng.choice(("run", "run", "sync")))
        if rng.random() < 0.3:  # a random moment of start-up: imports, contacts, extraction
            early += 1
            time.sleep(rng.uniform(0.2, 2.5))
        else:  # a random moment of the push: after some more interactions were created
            target = citadel.stats[posts] + rng.randint(1, 1500)
            eventually(lambda: citadel.stats[posts] >= target or proc.poll() is not None, timeout=60,
                       what="progress before the kill")
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        proc.communicate()
    killed_at = len(citadel.interactions())

    final = cli("sync", timeout=150)
    assert final.code == 0, final.output

    ids = contact_ids(citadel)
    assert len(ids) == len(PEOPLE) and len(citadel.contacts()) == len(PEOPLE)
    expected = Counter((ids[phone], kind, at) for phone, kind, at in sent)
    got = delivered(citadel)
    duplicates, missing = compare(expected, got)
    print(f"\nkill -9 backfill: kills={kills} (at start-up {early}) expected={sum(expected.values())} "
          f"delivered={sum(got.values())} (before the final run: {killed_at}) duplicates={duplicates} "
          f"missing={missing} elapsed={time.monotonic() - began:.1f}s")
    assert (duplicates, missing) == (0, 0)
    assert got == expected


# -- a flaky CRM ----------------------------------------------------------------------------------

FLAKY_KINDS = ("503", "502", "429", "timeout", "reset", "slow", "500-before-write", "500-after-write")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_flaky_crm_gets_everything_exactly_once(library: Library, citadel: CitadelServer, daemon_env: CLI,
                                                   home: Path):
    rng = random.Random(7)
    known = [f"+1902555{n:04d}" for n in range(2000, 2010)]
    unknown = [f"+1416555{n:04d}" for n in range(3000, 3005)]
    for n, phone in enumerate(known):
        library.card(first=f"Flaky{n}", last="Person", phones=[phone])
    library.chat.autocommit = False
    start = ago(days=30).replace(microsecond=0)
    sent: list[tuple[str, str, str]] = []
    for n in range(600):
        phone, from_me = rng.choice(known + unknown), rng.random() < 0.5
        at = start + timedelta(seconds=11 * n, milliseconds=rng.randrange(1000))
        library.text(phone, from_me=from_me, at=at)
        sent.append((phone, "TEXT_OUTBOUND" if from_me else "TEXT_INBOUND", iso(at)))
    library.chat.commit()
    for n in range(60):
        phone = rng.choice(known + unknown)
        at = start + timedelta(seconds=11 * n + 5)
        library.calls.call(phone, at, duration=30, answered=True)
        sent.append((phone, "CALL_INBOUND", iso(at)))
    library.calls.commit()

    faults = citadel.faults = Faults(rate=0.2, kinds=FLAKY_KINDS, seed=3, slow_s=0.3, hold_s=5.0, reads=True)
    # "timeout" faults resolve after 2 s; "slow" (0.3 s) stays a slow answer, not a timeout. Three 500s to
    # one item fail it by design (its own test below); at this fault rate that struck one of 660 items in
    # a few % of runs, and this test is about exactly once, so it allows more
    daemon_env.env.update(CRM_SYNCD_REQUEST_TIMEOUT_S="2", CRM_SYNCD_MAX_AMBIGUOUS_RETRIES="10")
    began = time.monotonic()
    d = RunningDaemon(daemon_env, home, verbose=True)  # debug events say how each unsure item ended
    try:
        eventually(lambda: count_interactions(citadel) >= len(sent), timeout=240, what="every interaction")
        took = time.monotonic() - began
        citadel.faults = Faults()  # quiet: let anything still unsure settle, then stop cleanly
        assert d.stop() == 0
    finally:
        d.stop(signal.SIGKILL)

    ids = contact_ids(citadel)
    assert sorted(ids) == sorted(known + unknown)
    assert len(citadel.contacts()) == len(known) + len(unknown), "a contact was created twice"
    expected = Counter((ids[phone], kind, at) for phone, kind, at in sent)
    got = delivered(citadel)
    duplicates, missing = compare(expected, got)
    print(f"\nflaky CRM: expected={sum(expected.values())} delivered={sum(got.values())} "
          f"duplicates={duplicates} missing={missing} time={took:.1f}s faults fired={faults.fired.total()} {dict(faults.fired)}")
    assert (duplicates, missing) == (0, 0), (got - expected, expected - got, doubled_story(citadel, d, got - expected))


def doubled_story(citadel: CitadelServer, d: RunningDaemon, extra: Counter) -> list:
    """For a failure message: the CRM rows of each doubled interaction and the daemon's debug events naming them."""
    rows = [i for i in citadel.interactions() if (i["contactId"], i["type"], i["occurredAt"]) in extra]
    ids = {i["id"] for i in rows}
    events = [e for e in d.events() if e.get("crm_id") in ids or e.get("found") in ids]
    items = {e["item"] for e in events}
    return [rows, [e for e in d.events() if e.get("item") in items]]


# -- a 500 that keeps coming back ---------------------------------------------------------------------

def test_a_500_that_keeps_coming_back_fails_the_item_after_bounded_retries_spread_over_time(
        library: Library, citadel: CitadelServer, cli: CLI, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync").code == 0
    citadel.faults = Faults(rate=1.0, kinds=("500-before-write",))
    citadel.timeline = []
    library.text(JANE, at=ago(hours=2))

    d = daemon()
    (failed,) = eventually(lambda: d.events("push.failed"), what="the item failed")

    fives = [t for t, method, _route, status in citadel.timeline if method == "POST" and status == 500]
    assert len(fives) == 3 and "unclear CRM answer 3 times" in failed["reason"]  # max_ambiguous_retries
    assert fives[-1] - fives[0] >= 0.5, "retried without waiting: a short burst would fail items for good"
    assert d.proc.poll() is None and d.stop() == 0
    assert citadel.interactions_of(JANE) == []

def test_sync_says_the_item_a_500_kept_failing_is_kept_as_failed_and_the_rest_stays_queued(
        library: Library, citadel: CitadelServer, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync").code == 0
    citadel.faults = Faults(rate=1.0, kinds=("500-before-write",))
    library.text(JANE, at=ago(hours=2))

    result = cli("sync")

    assert result.code == 1
    assert "1 interaction(s) failed" in result.stdout, result.output
    assert "the rest stays queued" in result.stdout and "everything stays queued" not in result.stdout, result.output


def test_the_back_off_grows_round_by_round_only_while_the_crm_accepts_no_write(tmp_path: Path, citadel: CitadelServer):
    """A down CRM is waited on longer each round; a flaky one that accepted a write since the last round
    is not failing in a row, and its next wait starts short again (or a run of bad luck before the
    first delivery, such as a contact sync that keeps meeting faults, would wait the 15-s cap)."""
    settings = Settings(state_dir=tmp_path / "state")

    async def rounds() -> list[float]:
        async with CitadelClient(citadel.url) as crm:
            engine = Engine(settings, Store(settings.state_db), crm)
            waits = []
            for n in range(4):
                if n == 3:
                    await crm.create_contact({"firstName": "Jane", "lastName": "Doe"})  # accepted
                engine.back_off()
                waits.append(engine.backoff_left())
                await asyncio.sleep(waits[-1])  # the round's wait runs out before the next failure
            return waits

    waits = asyncio.run(rounds())
    assert waits[2] >= 0.9, waits  # 0.5 s doubled twice (2 s), jittered by at most half
    assert waits[3] <= 0.5, waits  # after the accepted write: the first round's wait again


def test_a_500_to_the_pre_check_read_is_retried_and_never_fails_an_item_it_did_not_send(
        library: Library, citadel: CitadelServer, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    cli.env.update(CRM_SYNCD_DEDUPE_AGAINST_CRM="on", CRM_SYNCD_MAX_AMBIGUOUS_RETRIES="1")
    assert cli("sync").code == 0
    at = ago(hours=3)
    library.text(JANE, at=at)
    faults = citadel.faults = Faults(rate=1.0, kinds=("500-before-write",), reads=True, limit=1)

    result = cli("sync", "--interactions-only")  # its first request is the listing of Jane's day: a 500

    assert faults.fired.total() == 1
    assert result.code == 0, result.output
    assert [r["occurredAt"] for r in citadel.interactions_of(JANE)] == [iso(at)]


# -- the CRM changes under the daemon ------------------------------------------------------------

def test_a_contact_deleted_in_the_crm_is_recreated_and_its_next_interaction_arrives(
        library: Library, citadel: CitadelServer, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")
    (old,) = [c["id"] for c in citadel.contacts() if c["phone"] == JANE]

    citadel.delete_contact(old)  # the owner deletes Jane in Citadel (her interactions go with her)
    later = ago(hours=1)
    library.text(JANE, from_me=True, at=later)

    rows = eventually(lambda: citadel.interactions_of(JANE), timeout=30, what="the message after the deletion")
    (new,) = [c["id"] for c in citadel.contacts() if c["phone"] == JANE]
    assert new != old and [c["lastName"] for c in citadel.contacts()] == ["Doe"]
    assert [(r["type"], r["occurredAt"]) for r in rows] == [("TEXT_OUTBOUND", iso(later))]
    assert d.proc.poll() is None  # no crash loop
    assert len(d.events("push.contact_vanished")) == 1
    assert d.stop() == 0
    assert [(r["type"], r["occurredAt"]) for r in citadel.interactions_of(JANE)] == [("TEXT_OUTBOUND", iso(later))]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_contact_deleted_in_the_crm_is_made_again_from_its_card_while_another_account_stays_unreadable(
        library: Library, citadel: CitadelServer, daemon):
    """A contacts pass that finds only the unreadable account changed lists nothing: it must still list
    the CRM when a contact vanished, or delivery asks for passes in a loop and makes a placeholder for
    someone on a card."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    corrupt = library.books[2]
    corrupt.close()
    corrupt.path.write_bytes(b"not an address book " * 1000)
    library.text(JANE, at=ago(hours=2))
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")
    (old,) = [c["id"] for c in citadel.contacts()]

    citadel.delete_contact(old)
    later = ago(hours=1)
    library.text(JANE, from_me=True, at=later)

    rows = eventually(lambda: citadel.interactions_of(JANE), timeout=30, what="the message after the deletion")
    assert [(r["type"], r["occurredAt"]) for r in rows] == [("TEXT_OUTBOUND", iso(later))]
    assert [(c["firstName"], c["lastName"]) for c in citadel.contacts()] == [("Jane", "Doe")]  # no placeholder
    start, used = len(d.events("contacts.rescan")), cpu_seconds(d.proc.pid)
    eventually(lambda: len(d.events("contacts.rescan")) >= start + 4, what="four more rescans (2 s)")
    assert cpu_seconds(d.proc.pid) - used < 0.5  # settled, not asking for contacts passes in a loop
    assert d.stop() == 0


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- chat.db rebuilt, deleted, checkpointed, locked ------------------------------------------------

def rebuilt_chat_db(path: Path, messages: list[tuple[str, str, bool, object]]) -> None:
    """A fresh chat.db at `path` holding `messages` (address, guid, from_me, at) from ROWID 1."""
    fresh = ChatDB.create(path)
    chats: dict[str, int] = {}
    for address, guid, from_me, at in messages:
        handle = fresh.handle(address)
        chat = chats.get(address) or chats.setdefault(address, fresh.chat([handle]))
        fresh.message(chat=chat, handle=handle, from_me=from_me, at=at, guid=guid)
    fresh.close()


def swap_in(library: Library, replacement: Path) -> None:
    """Put `replacement` where chat.db is, as a restore would (and reopen the 'Apple' writer on it)."""
    library.chat.close()
    for suffix in ("-wal", "-shm"):
        library.messages_db.with_name("chat.db" + suffix).unlink(missing_ok=True)
    os.replace(replacement, library.messages_db)
    library.chat = ChatDB.open(library.messages_db)
    library._chats.clear()


@pytest.mark.parametrize("run", [("--days", "3"), ("--full", "--days", "3"), ("--full",)])
def test_a_days_or_full_run_that_finds_chat_db_started_over_still_reads_the_lookback_window(
        library: Library, citadel: CitadelServer, cli: CLI, run: tuple[str, ...]):
    """The first run after chat.db was restored happens to be `sync --days 3`, or `--full` with or without
    days (as the daemon's daily sweep reads): a message of 20 days ago the old file never had (iCloud
    delivered it late) still arrives, as after a plain sync, though the copy holds it below the mark and
    the old file's message at the mark's ROWID: only the file tells."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    old = [(JANE, f"OLD-{n}", False, ago(days=30 - n)) for n in range(3)]
    for address, guid, from_me, at in old:
        library.text(address, from_me=from_me, at=at, guid=guid)
    assert cli("sync").code == 0
    staging = library.messages_db.parent / "rebuild"
    staging.mkdir()
    late, new = (JANE, "LATE", False, ago(days=20)), (JANE, "NEW", False, ago(hours=1))
    rebuilt_chat_db(staging / "chat.db", [late, *old[1:], new])  # OLD-2 at ROWID 3 still
    swap_in(library, staging / "chat.db")

    first = cli("sync", *run)

    assert first.code == 0 and "extract.rebuilt" in first.output, first.output
    assert cli("sync").code == 0
    assert len(citadel.interactions_of(JANE)) == 5  # the three old, LATE and NEW


def test_chat_db_replaced_by_a_rebuilt_copy_with_lower_rowids(library: Library, citadel: CitadelServer, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    for _ in range(30):  # rows a rebuild drops: they push the real messages' ROWIDs up
        library.text(JANE, is_system=1)
    old = [(JANE, f"OLD-{n}", n % 2 == 0, ago(hours=10 - n)) for n in range(5)]
    for address, guid, from_me, at in old:
        library.text(address, from_me=from_me, at=at, guid=guid)
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 5, what="the original messages")

    new = [(JANE, f"NEW-{n}", False, ago(minutes=30 - n)) for n in range(3)]
    staging = library.messages_db.parent / "rebuild"
    staging.mkdir()
    rebuilt_chat_db(staging / "chat.db", old + new)  # same guids at ROWIDs 1-5, new ones at 6-8
    swap_in(library, staging / "chat.db")

    eventually(lambda: len(citadel.interactions_of(JANE)) >= 8, timeout=30, what="the new messages")
    assert d.proc.poll() is None
    assert d.stop() == 0
    got = Counter((r["type"], r["occurredAt"]) for r in citadel.interactions_of(JANE))
    assert got == Counter(("TEXT_OUTBOUND" if m else "TEXT_INBOUND", iso(at)) for _, _, m, at in old + new)


def test_chat_db_deleted_and_recreated_delivers_the_new_rows_once(library: Library, citadel: CitadelServer, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    first = [ago(hours=20 - n) for n in range(4)]
    for n, at in enumerate(first):
        library.text(JANE, at=at, guid=f"FIRST-{n}")
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 4, what="the first messages")

    library.chat.close()
    for suffix in ("", "-wal", "-shm"):
        library.messages_db.with_name("chat.db" + suffix).unlink(missing_ok=True)
    eventually(lambda: d.events("extract.missing"), timeout=15, what="the daemon noticing chat.db is gone")
    assert d.proc.poll() is None

    library.chat = ChatDB.create(library.messages_db)  # Messages starts over: ROWIDs from 1
    library._chats.clear()
    again = first[:2] + [ago(hours=10 - n) for n in range(4)]
    for n, at in enumerate(again):
        library.text(JANE, at=at, guid=f"FIRST-{n}" if n < 2 else None)  # two restored (as they were), four new
    expected = Counter(("TEXT_INBOUND", iso(at)) for at in first + again[2:])
    eventually(lambda: len(citadel.interactions_of(JANE)) >= 8, timeout=20, what="the recreated rows")
    assert d.stop() == 0
    assert Counter((r["type"], r["occurredAt"]) for r in citadel.interactions_of(JANE)) == expected


def test_the_wal_truncated_by_checkpoints_mid_run_loses_and_repeats_nothing(
        library: Library, citadel: CitadelServer, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=30))
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")
    moments = [ago(hours=20 - n) for n in range(12)]
    for n, at in enumerate(moments):
        library.text(JANE, at=at)
        if n % 3 == 2:
            library.chat.checkpoint("TRUNCATE")  # Messages empties the -wal while the daemon reads
            assert library.messages_db.with_name("chat.db-wal").stat().st_size == 0
    eventually(lambda: len(citadel.interactions_of(JANE)) >= 13, timeout=30, what="every row")
    assert d.proc.poll() is None
    assert d.stop() == 0
    got = Counter(r["occurredAt"] for r in citadel.interactions_of(JANE))
    assert sum(got.values()) == 13 and max(got.values()) == 1
    assert {iso(at) for at in moments} <= set(got)


def test_chat_db_locked_by_a_writer_for_seconds_delays_but_loses_nothing(
        library: Library, citadel: CitadelServer, daemon):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    d = daemon()
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")

    library.chat.close()  # the locker is Messages itself: its one connection takes the database
    locker = ChatDB.open(library.messages_db)
    locker.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    handle = locker.handle(JANE)
    chat = locker.conn.execute("SELECT ROWID FROM chat WHERE chat_identifier = ?", (JANE,)).fetchone()[0]
    during = ago(hours=2)
    locker.message(chat=chat, handle=handle, at=during)  # the write takes the exclusive lock and keeps it
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        probe = sqlite3.connect(f"file:{library.messages_db}?mode=ro", uri=True, timeout=0.1)
        try:
            probe.execute("SELECT count(*) FROM message").fetchone()
        finally:
            probe.close()
    locked_at = time.monotonic()
    eventually(lambda: time.monotonic() - locked_at > 3, timeout=5, what="three seconds of lock")
    assert d.proc.poll() is None
    locker.close()  # Messages lets go

    library.chat = ChatDB.open(library.messages_db)
    after = ago(hours=1)
    library.text(JANE, at=after)
    eventually(lambda: len(citadel.interactions_of(JANE)) >= 3, timeout=30, what="the rows written around the lock")
    assert d.stop() == 0
    got = Counter((r["type"], r["occurredAt"]) for r in citadel.interactions_of(JANE))
    assert sum(got.values()) == 3 and max(got.values()) == 1
    assert {iso(during), iso(after)} <= {at for _, at in got}


# -- iCloud re-download ---------------------------------------------------------------------------

def test_an_icloud_redownload_with_new_rowid_and_guid_is_not_delivered_twice(
        library: Library, citadel: CitadelServer, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    at = ago(days=2).replace(microsecond=0)
    library.text(JANE, at=at)
    library.text(JANE, at=at)  # re-downloaded in the same batch: its original date, a new guid
    assert cli("sync").code == 0

    library.text(JANE, at=at)  # and again later: new ROWID, new guid, same moment and direction
    library.text(JANE, from_me=True, at=at)  # same moment, other direction: a different interaction
    second = cli("sync")

    assert second.code == 0, second.output
    got = Counter((r["type"], r["occurredAt"]) for r in citadel.interactions_of(JANE))
    assert got == {("TEXT_INBOUND", iso(at)): 1, ("TEXT_OUTBOUND", iso(at)): 1}


def test_two_texts_one_person_sent_within_a_second_are_two_interactions_and_a_call_copy_is_one(
        library: Library, citadel: CitadelServer, cli: CLI):
    """A photo and its caption arrive as two messages a few milliseconds apart: both count. A call is
    still told apart to the second only (its copies from another device carry their own id)."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    at = ago(days=2).replace(microsecond=0)
    library.text(JANE, at=at + timedelta(milliseconds=100))
    library.text(JANE, at=at + timedelta(milliseconds=500))
    library.call(JANE, answered=True, duration=30, at=at + timedelta(milliseconds=100))
    library.call(JANE, answered=True, duration=30, at=at + timedelta(milliseconds=600))

    first, again = cli("sync"), cli("sync", "--full")

    assert first.code == 0 and again.code == 0, first.output + again.output
    got = Counter((r["type"], r["occurredAt"]) for r in citadel.interactions_of(JANE))
    assert got == {("TEXT_INBOUND", iso(at + timedelta(milliseconds=100))): 1,
                   ("TEXT_INBOUND", iso(at + timedelta(milliseconds=500))): 1,
                   ("CALL_INBOUND", iso(at + timedelta(milliseconds=100))): 1}


# -- the state database ---------------------------------------------------------------------------

def state_db(home: Path) -> Path:
    return home / "Library" / "Application Support" / "crm-syncd" / "state.db"


def outbox_states(home: Path) -> dict[str, int]:
    with sqlite3.connect(state_db(home)) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"))


@pytest.mark.parametrize("fault", ["503", "500-before-write"])
def test_a_sync_that_gives_up_on_a_failing_crm_leaves_everything_pending_and_a_later_sync_delivers_it_once(
        library: Library, citadel: CitadelServer, cli: CLI, home: Path, fault: str):
    """A 503 wrote nothing; a burst of 500s is no item's fault (each round backs off longer, so the run
    gives up before any item has been tried its bounded number of times). What was claimed but never
    sent goes back to pending."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync").code == 0
    moments = [ago(hours=40 - n) for n in range(40)]
    for at in moments:
        library.text(JANE, at=at)
    citadel.faults = Faults(rate=1.0, kinds=(fault,))  # every write fails while this run lasts

    result = cli("sync")

    assert result.code == 1 and outbox_states(home) == {"pending": 40}, (result.output, outbox_states(home))
    citadel.faults = Faults()  # the CRM is well again
    assert cli("sync").code == 0
    got = Counter(occurred for _contact, _type, occurred in delivered(citadel).elements())
    assert compare(Counter(iso(at) for at in moments), got) == (0, 0)


def http_date_in(seconds: int) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize("retry_after", ["3600", "in an hour"])
def test_a_sync_the_crm_asks_to_wait_an_hour_ends_at_once_says_so_and_keeps_everything_queued(
        library: Library, citadel: CitadelServer, cli: CLI, home: Path, retry_after: str):
    """A rate limiter's 429 with `Retry-After: 3600` (or an HTTP date an hour ahead): a one-shot sync
    does not sit silent for an hour; it stops, says what the CRM asked (capped at 15 minutes), and the
    next sync delivers. One request at a time: the 429 is the first answer, so nothing was delivered."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    cli.env["CRM_SYNCD_PUSH_CONCURRENCY"] = "1"
    assert cli("sync", "--contacts-only").code == 0
    moments = [ago(hours=3 - n) for n in range(3)]
    for at in moments:
        library.text(JANE, at=at)
    header = http_date_in(3600) if retry_after == "in an hour" else retry_after
    citadel.faults = Faults(rate=1.0, kinds=("429",), retry_after=header, limit=1)

    started = time.monotonic()
    result = cli("sync", timeout=60)

    assert time.monotonic() - started < 30, result.output
    assert result.code == 1, result.output  # as for an unreachable CRM: kept for the next run
    assert re.search(r"the CRM asked to wait (8\d\d|900) s; 3 items stay queued for the next sync or the daemon",
                     result.stdout), result.output
    assert "Traceback" not in result.output and outbox_states(home) == {"pending": 3}, outbox_states(home)
    assert cli("sync").code == 0
    got = Counter(occurred for _contact, _type, occurred in delivered(citadel).elements())
    assert compare(Counter(iso(at) for at in moments), got) == (0, 0)


def test_a_sync_the_crm_asks_to_wait_a_few_seconds_waits_them_and_delivers(
        library: Library, citadel: CitadelServer, cli: CLI):
    """The other side of the bound: a short wait asked is waited out within the same sync."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync", "--contacts-only").code == 0
    at = ago(hours=2)
    library.text(JANE, at=at)
    citadel.faults = Faults(rate=1.0, kinds=("429",), retry_after="2", limit=1)

    started = time.monotonic()
    result = cli("sync")

    assert result.code == 0 and time.monotonic() - started >= 2, result.output
    assert [r["occurredAt"] for r in citadel.interactions_of(JANE)] == [iso(at)]


@pytest.mark.parametrize("retry_after", [float("inf"), 1e12])
def test_the_back_off_a_crm_asks_for_is_capped_at_a_quarter_of_an_hour(
        tmp_path: Path, citadel: CitadelServer, retry_after: float):
    """The daemon waits what the CRM asks, but never longer than 15 minutes: a proxy's absurd or
    infinite Retry-After does not stop delivery for good."""
    settings = Settings(state_dir=tmp_path / "state")

    async def wait_asked() -> float:
        async with CitadelClient(citadel.url) as crm:
            engine = Engine(settings, Store(settings.state_db), crm)
            engine.back_off(retry_after)
            return engine.backoff_left()

    assert 14 * 60 < asyncio.run(wait_asked()) <= 15 * 60


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_or_a_stop_ends_a_sync_at_once_saying_so_and_the_next_sync_delivers_the_rest_once(
        library: Library, citadel: CitadelServer, cli: CLI, stop: signal.Signals):
    library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync").code == 0
    moments = [ago(minutes=1500 - n) for n in range(1500)]  # several seconds of delivery
    for at in moments:
        library.text(JANE, at=at)

    # each write lands 50 ms after it arrives (~10 s for all): a busy machine that is slow to notice
    # the first delivery still sends the signal long before the last
    citadel.faults = Faults(rate=1.0, kinds=("slow",), slow_s=0.05)
    sync = cli.popen("sync")
    first = eventually(lambda: count_interactions(citadel), what="the first delivery")
    sync.send_signal(stop)
    _out, words = sync.communicate(timeout=30)

    assert sync.returncode == 1 and "stopped: what was not delivered stays queued" in words, (sync.returncode, words)
    stopped_at = count_interactions(citadel)
    assert 0 < stopped_at < len(moments), f"{first} delivered when interrupted"  # it stopped, not carried on
    citadel.faults = Faults()
    assert cli("sync").code == 0
    got = Counter(occurred for _contact, _type, occurred in delivered(citadel).elements())
    assert compare(Counter(iso(at) for at in moments), got) == (0, 0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_contact_whose_create_a_stop_cut_short_is_crm_syncds_and_follows_its_card(
        library: Library, citadel: CitadelServer, cli: CLI, sig):
    """Stopped while Jane's contact is on its way into a slow CRM: the next sync finds it (no second one)
    and files it as the one crm-syncd made, so her card's later rename reaches it."""
    card = library.card(first="Jane", last="Doe", phones=[JANE])
    citadel.faults = Faults(rate=1.0, kinds=("slow",), slow_s=2.0, routes=("/api/contacts",))
    sync = cli.popen("sync")
    eventually(lambda: citadel.faults.fired["slow"], what="the create on its way")
    sync.send_signal(sig)
    sync.communicate(timeout=30)
    eventually(lambda: citadel.contacts(), what="the create landed")
    citadel.faults = Faults()
    assert cli("sync").code == 0

    library.books[0].update_card(card, last="Smith")
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    assert [(c["firstName"], c["lastName"]) for c in citadel.contacts()] == [("Jane", "Smith")]


@pytest.mark.parametrize("first", ["500-before-write", "a stop"])
def test_a_contact_whose_second_create_lands_unanswered_after_a_first_that_never_landed_follows_its_card(
        library: Library, citadel: CitadelServer, cli: CLI, first):
    """The first create never lands (a 500 before the write, or a stop while it hangs); the next sync's
    lands but its answer is lost. The contact is still found as crm-syncd's: card edits reach it."""
    card = library.card(first="Jane", last="Doe", phones=[JANE])
    if first == "a stop":
        citadel.faults = Faults(rate=1.0, kinds=("timeout",), hold_s=5, routes=("/api/contacts",), limit=1)
        sync = cli.popen("sync")
        eventually(lambda: citadel.faults.fired["timeout"], what="the create on its way")
        sync.send_signal(signal.SIGTERM)
        sync.communicate(timeout=30)
    else:
        citadel.faults = Faults(rate=1.0, kinds=(first,), routes=("/api/contacts",), limit=1)
        cli("sync", "--contacts-only")
    assert citadel.contacts() == []
    citadel.faults = Faults(rate=1.0, kinds=("500-after-write",), routes=("/api/contacts",), limit=1)
    cli("sync", "--contacts-only")
    citadel.faults = Faults()
    assert cli("sync").code == 0 and len(citadel.contacts()) == 1

    library.books[0].update_card(card, last="Smith")
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    assert [(c["firstName"], c["lastName"]) for c in citadel.contacts()] == [("Jane", "Smith")], result.output


def test_a_cards_create_stays_noted_after_its_answer_until_its_contact_is_recorded(
        library: Library, citadel: CitadelServer, home: Path):
    """kill -9 may land between a create's answer and the moment its contact is recorded as crm-syncd's.
    The note of the create must outlive the answer: without it the next pass takes the contact for one
    the owner made, and no edit of the card ever reaches it."""
    settings = state_settings(library, citadel, home)
    store = Store(settings.state_db)
    fields = {"firstName": "Jane", "lastName": "Doe", "phone": JANE}

    async def answered_then_recorded() -> tuple[list[dict], list[dict]]:
        async with CitadelClient(citadel.url) as crm:
            creates = Creates(settings, store, crm)
            await creates.create(fields, made_for=("A:ABPerson", fields))
            answered = store.get(UNANSWERED_CREATES, [])
            creates.recorded("A:ABPerson")
            return answered, store.get(UNANSWERED_CREATES, [])

    answered, recorded = asyncio.run(answered_then_recorded())

    assert [(n["person"], n["fields"]) for n in answered] == [("A:ABPerson", fields)]
    assert recorded == [] and len(citadel.contacts()) == 1


def test_a_sync_that_creates_and_promotes_contacts_leaves_no_create_noted(
        library: Library, citadel: CitadelServer, cli: CLI, home: Path):
    library.text(BOB, at=ago(hours=2))
    assert cli("sync").code == 0  # Bob's placeholder
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[BOB])

    assert cli("sync").code == 0

    assert sorted(c["firstName"] for c in citadel.contacts()) == ["Bob", "Jane"]
    assert Store(state_settings(library, citadel, home).state_db).get(UNANSWERED_CREATES, []) == []


@pytest.mark.parametrize("filled", [{}, {"organization": "Acme"}], ids=["as-made", "filled-in-by-the-owner"])
def test_a_placeholder_whose_promotion_landed_unanswered_is_crm_syncds_and_follows_its_card(
        library: Library, citadel: CitadelServer, cli: CLI, filled: dict):
    """A stranger texted (a placeholder); the owner adds him to Contacts, and the promotion's PUT lands but
    its answer is lost (a 500 after the write). The contact now bears the card's name, not the
    placeholder's: the next sync must still know it as crm-syncd's, so the card's rename reaches it (and
    leaves what the owner filled in on the placeholder as it is)."""
    library.text(JANE, at=ago(hours=2))
    assert cli("sync").code == 0
    (placeholder,) = citadel.contacts()
    citadel.update_contact(placeholder["id"], **filled)
    card = library.card(first="Jane", last="Doe", phones=[JANE])
    citadel.faults = Faults(rate=1.0, kinds=("500-after-write",), routes=("/api/contacts/:id",), limit=1)
    cli("sync", "--contacts-only")
    citadel.faults = Faults()
    assert [(c["id"], c["firstName"]) for c in citadel.contacts()] == [(placeholder["id"], "Jane")]
    assert cli("sync").code == 0

    library.books[0].update_card(card, first="Janet")
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    assert [(c["id"], c["firstName"], c["lastName"]) for c in citadel.contacts()] == [
        (placeholder["id"], "Janet", "Doe")], result.output
    assert {k: citadel.contacts()[0][k] for k in filled} == filled


def test_ctrl_c_stops_a_sync_waiting_out_a_locked_chat_db_at_once(library: Library, citadel: CitadelServer, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.chat.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    library.text(JANE, at=ago(hours=2))  # Messages takes the lock for a long write, and keeps it
    sync = cli.popen("sync")
    eventually(lambda: citadel.contacts(), what="the contacts sync, which comes before the extraction")
    time.sleep(0.5)  # no event tells: the extraction now retries against the lock (some 20 s of it)

    sync.send_signal(signal.SIGINT)
    sent = time.monotonic()
    sync.communicate(timeout=60)

    assert time.monotonic() - sent < 3


def refused(cli: CLI, what: str) -> None:
    for command in ("sync", "run"):
        result = cli(command, timeout=60)
        assert result.code == 2, (command, result.output)
        assert what in result.stderr and "Traceback" not in result.output, result.output


def fill_the_disk(pid: int, home: Path) -> int:
    """Make the state database's disk full for process `pid`, without root: RLIMIT_FSIZE at the WAL's
    size (CPython ignores SIGXFSZ, so a write past it fails with EFBIG, and SQLite reports a disk I/O
    error as for ENOSPC). The log file, smaller, can still be written. Returns the limit."""
    limit = state_db(home).with_name("state.db-wal").stat().st_size
    log = home / "Library" / "Logs" / "crm-syncd" / "crm-syncd.log"
    assert log.exists() and log.stat().st_size < limit // 2, (log.stat().st_size, limit)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return limit


def test_a_full_disk_under_the_state_database_stops_the_daemon_in_clear_words_and_loses_nothing(
        library: Library, citadel: CitadelServer, daemon_env: CLI, home: Path):
    """The disk holding state.db fills up while the daemon runs (a laptop's disk does, over months).
    It used to end in a traceback. Now: one line naming the state database and the fix, exit 2 (as for
    any state database the owner must see to); once space is freed, every message arrives exactly once."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    d = RunningDaemon(daemon_env, home)
    eventually(lambda: len(citadel.interactions_of(JANE)) == 1, what="the first message")
    fill_the_disk(d.proc.pid, home)
    later = [ago(hours=2 - n * 0.1) for n in range(3)]
    for at in later:
        library.text(JANE, at=at)

    eventually(lambda: d.proc.poll() is not None, timeout=30, what="the daemon to stop on the full disk")
    _out, err = d.proc.communicate()
    assert d.proc.returncode == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, whatever else went wrong
    (line,) = err.strip().splitlines()
    assert f"cannot write the state database {state_db(home)}: the disk is full or failing" in line, line
    assert f"free space on the disk holding {state_db(home).parent}" in line, line
    (failed,) = d.events("daemon.failed")
    assert "disk is full" in failed["error"] and "Traceback" not in d.log.read_text()
    # launchd starts it again 30 s later, the disk still full (too full for SQLite's 32 KiB -shm file)
    assert d.log.stat().st_size < 32_767  # the log can still be written
    restart = subprocess.run([sys.executable, "-m", "crm_syncd", "run"], env=daemon_env.env, cwd=REPO,
                             capture_output=True, text=True, timeout=60,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (32_767, 32_767)))
    assert restart.returncode == 2 and "Traceback" not in restart.stderr, restart.stderr
    assert "the disk is full or failing" in restart.stderr, restart.stderr

    again = RunningDaemon(daemon_env, home)  # space freed: launchd's next restart
    eventually(lambda: len(citadel.interactions_of(JANE)) >= 4, timeout=30, what="the rest after space is freed")
    assert again.stop() == 0
    got = Counter(r["occurredAt"] for r in citadel.interactions_of(JANE))
    assert sum(got.values()) == 4 and max(got.values()) == 1, got


def test_a_sync_on_a_full_disk_says_so_instead_of_calling_the_state_database_damaged(
        library: Library, citadel: CitadelServer, cli: CLI, home: Path):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    assert cli("sync").code == 0
    library.text(JANE, at=ago(hours=2))

    full = subprocess.run([sys.executable, "-m", "crm_syncd", "sync"], env=cli.env, cwd=REPO, capture_output=True,
                          text=True, timeout=60,  # too full for SQLite's 32 KiB -shm file
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (32_767, 32_767)))

    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert "the disk is full or failing" in full.stderr and "damaged" not in full.stderr, full.stderr
    assert cli("sync").code == 0
    got = Counter(r["occurredAt"] for r in citadel.interactions_of(JANE))
    assert sum(got.values()) == 2 and max(got.values()) == 1, got


@pytest.mark.parametrize("command", ["sync", "run"])
def test_a_disk_too_full_for_the_lock_file_is_named_in_clear_words(
        library: Library, citadel: CitadelServer, cli: CLI, command: str):
    """Not even the lock file's few bytes can be written (RLIMIT_FSIZE 0, as a full disk refuses them):
    one line naming the file and the fix, exit 2, where a traceback came at every start of the agent."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    assert cli("sync").code == 0

    full = subprocess.run([sys.executable, "-m", "crm_syncd", command], env=cli.env, cwd=REPO, capture_output=True,
                          text=True, timeout=60, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))

    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert "cannot write the lock file" in full.stderr and "free space on the disk" in full.stderr, full.stderr
    library.text(JANE, at=ago(hours=2))
    assert cli("sync").code == 0  # space freed: the lock is free and nothing was lost
    assert len(citadel.interactions_of(JANE)) == 2


def test_a_corrupt_state_database_is_refused_and_left_as_it_is(library: Library, citadel, cli: CLI, home: Path):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    assert cli("sync").code == 0
    path = state_db(home)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    garbage = random.Random(5).randbytes(path.stat().st_size or 8192)
    path.write_bytes(garbage)

    refused(cli, "damaged")

    assert path.read_bytes() == garbage
    assert len(citadel.interactions()) == 1


def test_a_state_database_from_a_newer_crm_syncd_is_refused(library: Library, citadel, cli: CLI, home: Path):
    from crm_syncd.store import APPLICATION_ID

    assert cli("sync").code == 0
    path = state_db(home)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 99")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = path.read_bytes()

    refused(cli, "newer crm-syncd")

    assert path.read_bytes() == before
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (99,)


def test_a_foreign_sqlite_file_as_state_database_is_refused(library: Library, citadel, cli: CLI, home: Path):
    path = state_db(home)
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")

    refused(cli, "not a crm-syncd state database")


def _read_only(db: Path) -> None:
    os.chmod(db, 0o400)  # a restore that lost its mode, a `chmod a-w`


def _another_users(db: Path) -> None:
    os.chown(db, 4242, 4242)  # root's, as a `sudo crm-syncd sync --reconcile` leaves it (the stand-in: any other user)


def _another_users_writable_by_all(file: Path) -> None:
    _another_users(file)
    os.chmod(file, 0o666)  # anyone may write it, but only its owner may make it private (0600) again


def _owners_again(db: Path) -> None:
    if os.geteuid() == 0:
        os.chown(db, 0, 0)
    os.chmod(db, 0o600)


needs_setpriv = pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
only_root_chowns = pytest.mark.skipif(os.geteuid() != 0, reason="only root makes a file another user's")
others = pytest.param(_another_users, id="another user's", marks=only_root_chowns)
others_writable = pytest.param(_another_users_writable_by_all, id="another user's, writable by all",
                               marks=only_root_chowns)


def named_with_the_fix(result, db: Path) -> None:
    """One line, exit 2: the state database, and how to give it back to the owner; never "damaged"."""
    assert result.code == 2 and "Traceback" not in result.output, result.output[-800:]
    (line,) = result.stderr.strip().splitlines()
    assert f"cannot open the state database {db}" in line and f"sudo chown $USER '{db}'*" in line, line
    assert "damaged" not in line, line


@needs_setpriv
@pytest.mark.parametrize("make", [pytest.param(_read_only, id="read-only"), others, others_writable])
@pytest.mark.parametrize("command", ["sync", "run", "retry-failed"])
def test_a_state_database_the_owner_may_not_write_is_named_in_one_line_with_the_fix(
        library: Library, citadel, cli: CLI, home: Path, make, command: str):
    """It used to end in a traceback (PermissionError), at every start of the agent."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    assert cli("sync").code == 0
    db = state_db(home)
    make(db)
    before = db.stat()
    library.text(JANE, at=ago(hours=1))
    try:
        result = cli.run_with_prefix(unprivileged(), command, timeout=60)  # root may write anywhere: drop that
        after = db.stat()
    finally:
        _owners_again(db)

    named_with_the_fix(result, db)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)  # left as it was
    assert cli("sync").code == 0  # given back: nothing was lost
    assert len(citadel.interactions_of(JANE)) == 2


@needs_setpriv
@pytest.mark.parametrize("make", [pytest.param(_read_only, id="read-only"), others, others_writable])
def test_a_log_file_the_daemon_may_not_write_is_named_in_one_line_with_the_fix(
        library: Library, citadel, cli: CLI, home: Path, make):
    """A `sudo crm-syncd run` leaves the log file root's: the agent's every start used to end in a traceback."""
    assert cli("sync").code == 0
    log = home / "Library" / "Logs" / "crm-syncd" / "crm-syncd.log"
    log.parent.mkdir(parents=True)
    log.write_text("")
    make(log)
    try:
        result = cli.run_with_prefix(unprivileged(), "run", timeout=60)
    finally:
        _owners_again(log)

    assert result.code == 2 and "Traceback" not in result.output, result.output[-800:]
    (line,) = result.stderr.strip().splitlines()
    assert f"cannot write the log file {log}" in line and f"sudo chown $USER '{log}'*" in line, line


@needs_setpriv
@pytest.mark.parametrize("make", [pytest.param(_read_only, id="read-only"), others, others_writable])
@pytest.mark.parametrize("name, stem", [("state.db", "state.db"), ("state.db-shm", "state.db"),
                                        ("crm-syncd.lock", "crm-syncd.lock"), ("crm-syncd.log", "crm-syncd.log")])
def test_doctor_names_each_state_file_the_owner_may_not_write_with_the_fix(
        library: Library, citadel, cli: CLI, home: Path, make, name: str, stem: str):
    """`sync` and `run` would stop on it (exit 2): doctor, which used to check only the folders, says so first."""
    assert cli("sync").code == 0
    folder = home / "Library" / "Logs" / "crm-syncd" if name.endswith(".log") else state_db(home).parent
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / name
    file.touch()  # a -shm a `sudo crm-syncd` left behind, a log it started
    make(file)
    try:
        result = cli.run_with_prefix(unprivileged(), "doctor")
    finally:
        _owners_again(file)

    assert result.code == 2, result.output[-800:]
    lines = result.stdout.splitlines()
    at = lines.index(f"✗ state files: {file} is another user's" if make is not _read_only
                     else f"✗ state files: you may not read and write {file}")
    assert f"sudo chown $USER '{folder / stem}'*" in lines[at + 1] and "fix:" in lines[at + 1], lines[at + 1]
    assert sum("✗ state files" in line for line in lines) == 1, result.stdout


@only_root_chowns
def test_doctor_under_sudo_checks_the_state_files_for_the_user_who_ran_sudo(
        library: Library, citadel, cli: CLI, home: Path):
    """`sudo crm-syncd doctor` runs as root, who may read and write anything: it used to pass every state file,
    exactly those a `sudo crm-syncd` left root's, on which the owner's `sync` and agent then stop."""
    assert cli("sync").code == 0
    db, lock = state_db(home), state_db(home).parent / "crm-syncd.lock"
    os.chown(db, 4242, 4242)  # the owner's (the stand-in: uid 4242, who runs sudo)...
    os.chmod(db, 0o400)  # ...made read-only by a restore; the lock file stays root's, as a `sudo crm-syncd` left it
    cli.env["SUDO_UID"] = "4242"
    try:
        result = cli("doctor")  # as root, every power kept: sudo's
    finally:
        _owners_again(db)

    assert result.code == 2, result.output[-800:]
    lines = result.stdout.splitlines()
    assert f"✗ state files: {lock} is another user's" in lines, result.stdout
    assert f"✗ state files: you may not read and write {db}" in lines, result.stdout
    assert sum("✗ state files" in line for line in lines) == 2, result.stdout


@needs_setpriv
def test_status_reads_a_state_database_it_may_not_write_and_leaves_it_as_it_is(
        library: Library, citadel, cli: CLI, home: Path):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    assert cli("sync").code == 0
    db = state_db(home)
    _read_only(db)
    try:
        result = cli.run_with_prefix(unprivileged(), "status", "--json")
        mode = db.stat().st_mode & 0o777
    finally:
        _owners_again(db)

    assert result.code == 3, result.output[-800:]  # not running: it only reads, so it reports
    assert json.loads(result.stdout)["outbox"]["delivered"] == 1
    assert mode == 0o400


@needs_setpriv
@only_root_chowns
@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("sync", "--dry-run")], ids=" ".join)
def test_reading_another_users_state_database_names_it_and_the_fix(
        library: Library, citadel, cli: CLI, home: Path, command):
    library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync").code == 0
    db = state_db(home)
    _another_users(db)
    try:
        result = cli.run_with_prefix(unprivileged(), *command)
    finally:
        _owners_again(db)

    named_with_the_fix(result, db)


@needs_setpriv
@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("sync", "--dry-run")], ids=" ".join)
def test_a_state_folder_crm_syncd_may_not_write_in_is_named_not_the_database_called_damaged(
        library: Library, citadel, cli: CLI, home: Path, command):
    """A read-only volume, a folder whose mode a restore lost: SQLite cannot make the -wal and -shm files
    it needs even to read the database. It used to say "damaged … move it aside", which would throw away
    the ledger and the marks of a healthy database."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    assert cli("sync").code == 0
    folder = state_db(home).parent
    os.chmod(folder, 0o500)
    try:
        result = cli.run_with_prefix(unprivileged(), *command)
    finally:
        os.chmod(folder, 0o700)

    assert result.code == 2 and "Traceback" not in result.output, result.output[-800:]
    (line,) = result.stderr.strip().splitlines()
    assert "damaged" not in line and "move it aside" not in line.lower(), line
    assert f"may not create files in {folder}" in line and f"chmod u+rwx '{folder}'" in line, line


@needs_setpriv
@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes a folder another user's")
@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("sync", "--dry-run"), ("sync",),
                                     ("retry-failed",), ("run",)], ids=" ".join)
def test_a_state_folder_a_sudo_run_left_roots_is_named_with_its_fix_by_every_command(
        library: Library, citadel, cli: CLI, home: Path, command):
    """The first `sudo crm-syncd sync` makes the whole state folder root's (0700). `status` and `sync
    --dry-run` used to end in a traceback (PermissionError) or tell the owner to remove the lock file, which
    cannot help: the folder stays closed to them."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    assert cli("sync").code == 0
    folder = state_db(home).parent
    os.chown(folder, 4242, 4242)  # root's, as a `sudo crm-syncd` leaves it (the stand-in: any other user's)
    try:
        result = cli.run_with_prefix(unprivileged(), *command, timeout=60)
    finally:
        os.chown(folder, 0, 0)

    assert result.code == 2 and "Traceback" not in result.output, result.output[-800:]
    (line,) = result.stderr.strip().splitlines()
    assert f"sudo chown -R $USER '{folder}'" in line and "crm-syncd.lock" not in line, line


@pytest.mark.parametrize("command", [("status",), ("sync", "--dry-run")], ids=" ".join)
def test_reading_the_state_on_a_full_disk_says_so_instead_of_calling_the_database_damaged(
        library: Library, citadel: CitadelServer, cli: CLI, home: Path, command):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=3))
    assert cli("sync").code == 0

    full = subprocess.run([sys.executable, "-m", "crm_syncd", *command], env=cli.env, cwd=REPO, capture_output=True,
                          text=True, timeout=60,  # too full for SQLite's 32 KiB -shm file
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (32_767, 32_767)))

    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert "the disk is full or failing" in full.stderr and "damaged" not in full.stderr, full.stderr


def test_an_empty_state_database_file_is_migrated_to_the_current_schema(
        library: Library, citadel, cli: CLI, home: Path):
    from crm_syncd.store import APPLICATION_ID, SCHEMA_VERSION

    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE)
    path = state_db(home)
    path.parent.mkdir(parents=True)
    path.touch()  # user_version 0: older than every schema

    result = cli("sync")

    assert result.code == 0, result.output
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
    assert len(citadel.interactions()) == 1


@pytest.mark.parametrize("fault", ["truncate", "500-after-write-truncated",  # a 201, or a 500, arrives half
                                   "504-after-write"])  # a proxy gave up waiting for the CRM's answer
def test_a_written_interaction_whose_answer_was_cut_off_is_looked_up_not_sent_again(
        library: Library, citadel: CitadelServer, cli: CLI, fault: str):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    assert cli("sync", "--contacts-only").code == 0
    citadel.faults = Faults(rate=1.0, kinds=(fault,), limit=1)  # the POST is written; its answer is cut off

    result = cli("sync")

    assert result.code == 0, result.output
    assert citadel.faults.fired[fault] == 1
    assert len(citadel.interactions_of(JANE)) == 1


def sync_through_one(fault: str, library: Library, citadel: CitadelServer, cli: CLI):
    """A `sync` of Jane's text (her contact made by an earlier pass) whose POST meets `fault`, once."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    assert cli("sync", "--contacts-only").code == 0
    citadel.faults = Faults(rate=1.0, kinds=(fault,), limit=1)
    result = cli("sync")
    assert citadel.faults.fired[fault] == 1
    return result


@pytest.mark.parametrize("fault", ["504-then-write", "524-then-write",  # a proxy answers; the CRM writes a second later
                                   "524",  # Cloudflare gave up on an origin that never wrote
                                   "data-null-after-write", "id-less-after-write"])  # written; no id in the answer
def test_a_write_a_proxy_answered_for_or_answered_without_its_id_is_delivered_once(
        library: Library, citadel: CitadelServer, cli: CLI, fault: str):
    """The look-up waits a request timeout for a write the CRM may still be making: nothing twice, nothing lost."""
    cli.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "2"  # longer than the stand-in's late write (Faults.late_s)

    result = sync_through_one(fault, library, citadel, cli)

    assert result.code == 0, result.output
    eventually(lambda: citadel.serving == 0, what="the stand-in's late write")  # a late second copy would show
    assert len(citadel.interactions_of(JANE)) == 1


@pytest.mark.parametrize("fault", ["400", "405", "413"])
def test_a_proxys_bare_4xx_page_is_retried_not_kept_as_the_crms_rejection(
        library: Library, citadel: CitadelServer, cli: CLI, fault: str):
    """A load balancer's HTML 400/405/413 judges no item (Citadel's own 4xx are JSON): it is sent again."""
    result = sync_through_one(fault, library, citadel, cli)

    assert result.code == 0 and "failed" not in result.stdout.replace("failed 0", ""), result.output
    assert len(citadel.interactions_of(JANE)) == 1


@pytest.mark.parametrize("fault", ["500-before-write", "500-after-write"])
def test_a_500_to_one_contacts_create_holds_up_no_one_else_and_a_later_sync_names_them_once(
        library: Library, citadel: CitadelServer, cli: CLI, fault: str):
    bob = "+19025550122"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[bob])
    library.text(JANE, at=ago(hours=2))
    library.text(bob, at=ago(hours=1))
    citadel.faults = Faults(rate=1.0, kinds=(fault,), limit=1)  # the first contact create of the pass

    first = cli("sync")

    assert citadel.faults.fired[fault] == 1
    assert first.code == 1 and "failed 1" in first.output  # said, not hidden
    assert (len(citadel.interactions_of(JANE)), len(citadel.interactions_of(bob))) == (1, 1)
    assert cli("sync").code == 0
    assert sorted(f"{c['firstName']} {c['lastName']}" for c in citadel.contacts()) == ["Bob Roe", "Jane Doe"]
    assert (len(citadel.interactions_of(JANE)), len(citadel.interactions_of(bob))) == (1, 1)


def test_a_cards_create_a_proxy_answered_with_a_500_page_while_the_crm_still_wrote_gets_no_placeholder_beside_it(
        library: Library, citadel: CitadelServer, cli: CLI):
    """Jane's create lands a second after a proxy's HTML 500: her text's resolution, in the same sync,
    waits for it before it lists the CRM's contacts, finds her contact and makes no placeholder."""
    cli.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "2"  # longer than the stand-in's late write (Faults.late_s)
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=1))
    citadel.faults = Faults(rate=1.0, kinds=("500-then-write",), routes=("/api/contacts",), limit=1)

    cli("sync")

    assert citadel.faults.fired["500-then-write"] == 1
    eventually(lambda: citadel.serving == 0, what="the stand-in's late write")
    assert [(c["firstName"], c["lastName"]) for c in citadel.contacts()] == [("Jane", "Doe")]
    assert len(citadel.interactions_of(JANE)) == 1


@pytest.mark.parametrize("fault", ["data-null-after-write", "500-page", "400"])
def test_a_placeholder_create_answered_unclearly_holds_up_no_one_else_and_the_next_sync_finds_or_makes_it_once(
        library: Library, citadel: CitadelServer, cli: CLI, fault: str):
    """Bob's placeholder create gets a 2xx without the record, a proxy's 500 page or its bare 400: Jane's
    text still goes out, the sync says so (exit 1), and the next finds the placeholder that landed, or makes
    the one that did not, once."""
    cli.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "2"
    library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync", "--contacts-only").code == 0
    library.text(JANE, at=ago(hours=1))
    library.text(BOB, at=ago(hours=1))
    citadel.faults = Faults(rate=1.0, kinds=(fault,), routes=("/api/contacts",), limit=1)

    first = cli("sync")

    assert citadel.faults.fired[fault] == 1
    assert first.code == 1 and "unclear 1" in first.stdout and "unreachable" not in first.output, first.output
    assert len(citadel.interactions_of(JANE)) == 1
    assert cli("sync").code == 0
    assert len(citadel.contacts()) == 2 and len(citadel.interactions_of(BOB)) == 1


def test_a_group_text_to_both_of_a_persons_addresses_whose_first_write_went_unanswered_is_still_one(
        library: Library, citadel: CitadelServer, cli: CLI):
    """The first copy is written but answered 500, and so is its look-up: the other copy waits for it."""
    library.card(first="Jane", last="Doe", phones=[JANE], emails=["jane@example.com"])
    library.group_text([JANE, "jane@example.com"], at=ago(days=1))
    citadel.faults = Faults(rate=1.0, kinds=("500-after-write",), reads=True, limit=2,
                            routes=("/api/contacts/:id/interactions",))
    cli.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "2"

    result = cli("sync")

    assert citadel.faults.fired["500-after-write"] == 2, result.output
    assert result.code == 0 and "Messages  synced 1 · new 2" in result.stdout, result.output
    assert len(citadel.interactions_of(JANE)) == 1


def test_a_placeholder_whose_create_answer_was_lost_is_found_not_made_twice(
        library: Library, citadel: CitadelServer, daemon_env: CLI, home: Path):
    stranger = "+14165550199"
    library.text(stranger, at=ago(hours=1))
    citadel.faults = Faults(rate=1.0, kinds=("500-after-write",), limit=1)  # the placeholder is made, then 500
    daemon_env.env.update(CRM_SYNCD_SAFETY_PROBE_S="1")  # retry soon after the error
    d = RunningDaemon(daemon_env, home)
    try:
        rows = eventually(lambda: citadel.interactions_of(stranger), timeout=30, what="the stranger's message")
        assert citadel.faults.fired["500-after-write"] == 1
        assert [c["firstName"] for c in citadel.contacts()] == ["Unknown"]
        assert len(rows) == 1
        assert d.stop() == 0
    finally:
        d.stop(signal.SIGKILL)


def test_a_placeholder_whose_create_answer_was_lost_is_promoted_by_a_card_holding_the_persons_other_handle(
        library: Library, citadel: CitadelServer, cli: CLI):
    """Found again by the next pass, it is still the placeholder of every handle Messages groups."""
    stranger = "+14165550199"
    library.chat.handle(stranger, person_centric_id="p-1")
    library.chat.handle("sam@example.org", person_centric_id="p-1")  # Messages: one person, two handles
    library.text(stranger, at=ago(hours=1))
    citadel.faults = Faults(rate=1.0, kinds=("500-after-write",), routes=("/api/contacts",), limit=1)
    assert cli("sync").code == 1  # the placeholder is made, its answer lost
    assert cli("sync").code == 0  # found again, not made twice
    (placeholder,) = citadel.contacts()

    library.card(first="Sam", last="Day", emails=["sam@example.org"])
    assert cli("sync").code == 0

    assert [(c["id"], c["firstName"], c["phone"], c["email"]) for c in citadel.contacts()] == [
        (placeholder["id"], "Sam", stranger, "sam@example.org")]
    assert len(citadel.interactions_of(stranger)) == 1


def test_a_placeholder_found_again_after_a_lost_answer_is_folded_into_a_card_once_messages_groups_them(
        library: Library, citadel: CitadelServer, cli: CLI):
    """The sync that learns the grouping folds it, as it does a placeholder crm-syncd knows it made."""
    stranger = "+14165550199"
    library.text(stranger, at=ago(days=3))
    citadel.faults = Faults(rate=1.0, kinds=("500-after-write",), routes=("/api/contacts",), limit=1)
    assert cli("sync").code == 1  # the placeholder is made, its answer lost
    assert cli("sync").code == 0  # found again by the listing
    library.card(first="Sam", last="Day", emails=["sam@example.org"])
    library.text("sam@example.org", at=ago(days=2))
    assert cli("sync").code == 0
    sam = next(c["id"] for c in citadel.contacts() if c["firstName"] == "Sam")

    library.chat.conn.execute("UPDATE handle SET person_centric_id = 'p-1' WHERE id IN (?, ?)",
                              (stranger, "sam@example.org"))  # Messages now takes them for one person
    library.chat.commit()
    library.text(stranger, at=ago(hours=1))
    assert cli("sync").code == 0

    assert [c["id"] for c in citadel.contacts()] == [sam]
    assert len(citadel.interactions(sam)) == 3


def test_an_item_left_sending_whose_day_never_lists_in_full_holds_up_no_other_and_fails_with_its_reason(
        library: Library, citadel: CitadelServer, tmp_path: Path):
    """After a crash, an item left `sending` is looked up before it is sent again. If its day's listing
    never comes out complete (hundreds of the owner's notes at one time, ties paged unstably), the other
    items are delivered all the same and this one is kept as failed after a few spaced look-ups."""
    bob = "+19025550122"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[bob])
    day = ago(days=2).replace(hour=10, minute=0, second=0, microsecond=0)
    library.text(JANE, at=day)
    for n in range(3):
        library.text(bob, at=ago(hours=n + 1))
    settings = Settings(api_url=citadel.url, messages_db=library.messages_db, calls_db=library.calls_db,
                        addressbook_dir=library.addressbook_dir, state_dir=tmp_path / "state", request_timeout_s=1)
    store = Store(settings.state_db)

    async def scenario():
        async with CitadelClient(citadel.url, timeout=1) as crm:
            engine = Engine(settings, store, crm)
            await engine.sync_contacts()
            jane = store.contact_for(JANE)
            note = {"type": "NOTE", "source": "MANUAL", "occurredAt": iso(day + timedelta(minutes=30))}
            for _ in range(400):
                await crm.create_interaction(jane, note)
            engine.extract("messages")
            await engine.resolve()
            claimed = store.claim(10)  # then a crash: Jane's item stays `sending`
            store.settle(retry=[(item, None) for item in claimed if item.contact_id != jane])
            citadel.unstable_ties = True
            return await engine.push()

    report = asyncio.run(scenario())

    assert report.delivered == 3 and len(citadel.interactions_of(bob)) == 3
    [(key, reason)] = report.failed
    assert "cannot tell whether it reached the CRM" in reason and "incomplete listing" in reason
    assert [i["type"] for i in citadel.interactions_of(JANE)] == ["NOTE"] * 400  # not sent blind
    assert store.counts().get("sending", 0) == 0


def state_settings(library: Library, citadel: CitadelServer, home: Path, **kw) -> Settings:
    """The settings the CLI in `home` runs with, for a scenario staged in-process on the same state."""
    return Settings(api_url=citadel.url, messages_db=library.messages_db, calls_db=library.calls_db,
                    addressbook_dir=library.addressbook_dir,
                    state_dir=home / "Library" / "Application Support" / "crm-syncd", **kw)


async def crash_with_a_request_in_flight(settings: Settings, store: Store, crm: CitadelClient) -> Item:
    """Sync contacts, queue the messages and claim one: durably `sending`, as kill -9 leaves it."""
    engine = Engine(settings, store, crm)
    await engine.sync_contacts()
    engine.extract("messages")
    await engine.resolve()
    [item] = store.claim(10)
    return item


def test_retry_failed_looks_up_an_item_that_may_have_reached_the_crm_before_sending_it_again(
        library: Library, citadel: CitadelServer, cli: CLI, home: Path):
    """The request reached the CRM, then the process died; the day's listing then stayed incomplete, so the
    item was kept as failed ("cannot tell whether it reached the CRM"). `retry-failed` must not resend it
    blind once the CRM lists in full again."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    day = ago(days=2).replace(hour=10, minute=0, second=0, microsecond=0)
    library.text(JANE, at=day)
    settings = state_settings(library, citadel, home, request_timeout_s=1)
    store = Store(settings.state_db)

    async def scenario():
        async with CitadelClient(citadel.url, timeout=1) as crm:
            item = await crash_with_a_request_in_flight(settings, store, crm)
            note = {"type": "NOTE", "source": "MANUAL", "occurredAt": iso(day + timedelta(minutes=30))}
            for _ in range(400):  # the owner's notes that day: ties paged unstably
                await crm.create_interaction(item.contact_id, note)
            await crm.create_interaction(item.contact_id, {  # the request that was in flight lands
                "type": item.type, "occurredAt": iso(day), "source": "IMPORT_IOS"})
            citadel.unstable_ties = True
            return await Engine(settings, store, crm).push()

    report = asyncio.run(scenario())
    store.close()
    assert "cannot tell whether it reached the CRM" in report.failed[0][1]

    citadel.unstable_ties = False
    assert cli("retry-failed").code == 0
    result = cli("sync")

    assert result.code == 0, result.output
    assert [i["type"] for i in citadel.interactions_of(JANE) if i["type"] != "NOTE"] == ["TEXT_INBOUND"]


def test_a_clock_set_back_after_a_crash_holds_up_delivery_for_two_request_timeouts_at_most(
        library: Library, citadel: CitadelServer, daemon_env: CLI, home: Path):
    """A restart waits out requests a crash may have left on their way (two request timeouts after the
    claim, by the wall clock); a clock set back an hour since must not make that wait an hour."""
    daemon_env.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "3"
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    settings = state_settings(library, citadel, home)
    store = Store(settings.state_db)

    async def scenario():
        async with CitadelClient(citadel.url) as crm:
            await crash_with_a_request_in_flight(settings, store, crm)

    asyncio.run(scenario())
    store._conn.execute("UPDATE outbox SET updated_ms = updated_ms + 3600000 WHERE state = 'sending'")
    store.put("contact_create_sent_ms", int(time.time() * 1000) + 3_600_000)  # a create cut short, too
    store.close()

    d = RunningDaemon(daemon_env, home)
    try:
        library.text(JANE, at=ago(seconds=5))
        eventually(lambda: len(citadel.interactions_of(JANE)) == 2, timeout=30,
                   what="both messages, after at most 2 × 2 request timeouts of 3 s")
    finally:
        d.stop(signal.SIGKILL)


def _refuse_the_key(citadel: CitadelServer, on: bool) -> None:
    citadel.require_key("a-new-key" if on else None)  # the owner rotated the key in the CRM; crm-syncd has the old one


def _redirect(citadel: CitadelServer, on: bool) -> None:
    citadel.redirect_to = "https://crm.example.com" if on else None  # api_url is not where the API answers


def _bare_405(citadel: CitadelServer, on: bool) -> None:
    citadel.faults = Faults(rate=1.0, kinds=("405",), reads=True) if on else Faults()  # a proxy's HTML page


@pytest.mark.parametrize(("answer", "code", "said"), [(_refuse_the_key, 2, "API key"), (_redirect, 1, "redirects"),
                                                      (_bare_405, 1, "not Citadel's answer")],
                         ids=["a refused key", "a redirect", "a proxy's bare 405"])
def test_an_answer_that_judges_no_item_while_an_item_left_sending_is_looked_up_keeps_it_queued_and_says_why(
        library: Library, citadel: CitadelServer, cli: CLI, home: Path, answer, code: int, said: str):
    """A look-up the CRM refuses for the key, that api_url redirects, or that a proxy answers with its own
    page says nothing of the item: it stays `sending`, not counted towards failing it, and is looked up
    once the CRM answers again."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(hours=2))
    settings = state_settings(library, citadel, home, request_timeout_s=1)
    store = Store(settings.state_db)

    async def scenario():
        async with CitadelClient(citadel.url) as crm:
            await crash_with_a_request_in_flight(settings, store, crm)

    asyncio.run(scenario())
    store.close()
    answer(citadel, True)
    cli.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "1"

    met = cli("sync", "--interactions-only")

    assert met.code == code and said in met.output, met.output
    store = Store(settings.state_db)
    assert (store.counts().get("failed", 0), store.counts().get("sending")) == (0, 1)  # looked up next time
    store.close()
    answer(citadel, False)
    assert cli("sync", "--interactions-only").code == 0
    assert len(citadel.interactions_of(JANE)) == 1


def sending_count(home: Path) -> int:
    """Items the daemon has durably marked `sending` (read from its state database, read-only)."""
    path = home / "Library" / "Application Support" / "crm-syncd" / "state.db"
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM outbox WHERE state = 'sending'").fetchone()[0]
    except sqlite3.OperationalError:  # not migrated yet
        return 0
    finally:
        conn.close()


def test_a_restart_right_after_a_crash_waits_for_requests_still_on_their_way(
        library: Library, citadel: CitadelServer, daemon_env: CLI, home: Path):
    library.card(first="Jane", last="Doe", phones=[JANE])
    moments = [ago(hours=5 - n) for n in range(5)]
    for at in moments:
        library.text(JANE, at=at)
    citadel.faults = Faults(rate=1.0, kinds=("slow",), slow_s=3.0)  # every write lands 3 s after it arrives
    daemon_env.env.update(CRM_SYNCD_REQUEST_TIMEOUT_S="5")
    first = RunningDaemon(daemon_env, home)
    # the contact's create and the five interactions have reached the CRM, which sits on them
    eventually(lambda: citadel.faults.fired["slow"] == 6, timeout=30, what="five requests inside the CRM")
    assert sending_count(home) == 5
    first.stop(signal.SIGKILL)  # the five are not written yet

    second = RunningDaemon(daemon_env, home)
    try:
        eventually(lambda: second.events("push.recovered"), timeout=30, what="the recovery")
        citadel.faults = Faults()
        assert second.events("push.recovered")[-1]["adopted"] == 5
        assert second.stop() == 0
    finally:
        second.stop(signal.SIGKILL)
    assert sorted(r["occurredAt"] for r in citadel.interactions_of(JANE)) == sorted(map(iso, moments))


@pytest.mark.parametrize(("restart", "backoff"), [("run", False), ("sync", False), ("run", True)],
                         ids=["run", "sync", "run, the writes sent after a back-off"])
def test_writes_a_stop_abandoned_in_a_crm_slower_than_the_request_timeout_are_looked_up_not_sent_again(
        library: Library, citadel: CitadelServer, daemon_env: CLI, home: Path, restart: str, backoff: bool):
    """`uninstall` then `install` (SIGTERM, a restart) while the CRM takes longer than a request timeout
    to commit each write: the writes the stop abandoned are given as long as a live one that timed out
    (a timeout, then as long again) before they are looked up, so none is sent twice; also those
    claimed before a back-off (a 429 asking for 3 s) and sent after it."""
    daemon_env.env.update(CRM_SYNCD_SHUTDOWN_DEADLINE_S="1", CRM_SYNCD_REQUEST_TIMEOUT_S="2")
    library.card(first="Jane", last="Doe", phones=[JANE])
    moments = [ago(minutes=900 - k) for k in range(40)]
    for at in moments:
        library.text(JANE, at=at)
    slow = Faults(rate=1.0, kinds=("slow",), slow_s=3.5, routes=("/api/contacts/:id/interactions",))
    citadel.faults = Faults(rate=1.0, kinds=("429",), retry_after="3", limit=1,
                            routes=("/api/contacts/:id/interactions",)) if backoff else slow
    first = daemon_env.popen("run")
    if backoff:
        eventually(lambda: citadel.faults.fired["429"] == 1, what="the CRM asking for 3 s")
        citadel.faults = slow
    eventually(lambda: slow.fired["slow"] >= 8, what="writes on their way")
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    citadel.faults = Faults()  # quick again; the slow writes still land, 3.5 s after they came

    if restart == "run":
        second = RunningDaemon(daemon_env, home)
        eventually(lambda: len(citadel.interactions_of(JANE)) >= len(moments), timeout=60, what="every text")
        assert second.stop() == 0
    else:
        assert daemon_env("sync").code == 0
    eventually(lambda: citadel.serving == 0, what="every write the CRM received, landed")

    landed = Counter(i["occurredAt"] for i in citadel.interactions_of(JANE))
    assert sorted(landed) == sorted(map(iso, moments)) and set(landed.values()) == {1}


def test_a_stop_while_a_write_a_proxy_answered_for_is_waited_on_ends_at_once_and_the_next_start_looks_it_up(
        library: Library, citadel: CitadelServer, daemon, daemon_env: CLI):
    """A proxy's 504 to Jane's text: the pusher gives the CRM behind it a request timeout (8 s here)
    before looking; a stop meanwhile ends the daemon at once, leaving the text `sending` for the next
    start to look up, not send twice."""
    daemon_env.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "8"
    library.card(first="Jane", last="Doe", phones=[JANE])
    first = daemon()
    eventually(citadel.contacts, what="Jane's contact")
    citadel.faults = Faults(rate=1.0, kinds=("504-after-write",), routes=("/api/contacts/:id/interactions",), limit=1)
    library.text(JANE)
    eventually(lambda: first.events("push.unsure_waits"), what="the wait for a write the CRM may still make")

    began = time.monotonic()
    assert first.stop() == 0
    assert time.monotonic() - began < 4  # not the wait's 8 s, nor the shutdown deadline's 10

    second = daemon()
    eventually(lambda: second.events("push.recovered"), timeout=90, what="the look-up of the unsure text")
    assert len(citadel.interactions_of(JANE)) == 1


def test_a_stop_while_the_back_off_after_a_proxys_504_runs_ends_at_once_and_the_next_start_looks_it_up(
        library: Library, citadel: CitadelServer, daemon, daemon_env: CLI):
    """Five 503s in a row, then a proxy's 504 to Jane's text: the back-off before looking it up is now 7.5 s
    or more (it grows per failure). A stop meanwhile ends the daemon at once, the text left `sending` for
    the next start to look up, not send twice."""
    library.card(first="Jane", last="Doe", phones=[JANE])
    first = daemon()
    eventually(citadel.contacts, what="Jane's contact")
    # seed 7 draws 503 five times, then 504-after-write
    faults = Faults(rate=1.0, kinds=("503", "504-after-write"), seed=7, routes=("/api/contacts/:id/interactions",),
                    limit=6)
    citadel.faults = faults
    library.text(JANE)
    eventually(lambda: faults.fired["504-after-write"] == 1, timeout=60, what="the proxy's 504 after five 503s")
    assert faults.fired["503"] == 5

    began = time.monotonic()
    assert first.stop() == 0
    assert time.monotonic() - began < 4  # not the back-off's 7.5 s or more, nor the shutdown deadline's 10

    second = daemon()
    eventually(lambda: second.events("push.recovered"), timeout=90, what="the look-up of the unsure text")
    assert len(citadel.interactions_of(JANE)) == 1


def test_writes_sent_after_a_back_off_are_waited_for_by_a_restart_right_after_a_crash(
        library: Library, citadel: CitadelServer, daemon_env: CLI, home: Path):
    """The CRM asks for 12 s (a 429), then sits 3 s on each write: the texts claimed before the back-off
    leave after it. Killed meanwhile (a crash; launchd starts it again at once), the restart waits for
    those writes from when they left, not from their claim 12 s earlier: each text reaches the CRM once."""
    daemon_env.env.update(CRM_SYNCD_REQUEST_TIMEOUT_S="5")
    library.card(first="Jane", last="Doe", phones=[JANE])
    moments = [ago(hours=5 - n) for n in range(5)]
    for at in moments:
        library.text(JANE, at=at)
    route = ("/api/contacts/:id/interactions",)
    citadel.faults = Faults(rate=1.0, kinds=("429",), retry_after="12", limit=5, routes=route)
    first = RunningDaemon(daemon_env, home)
    try:
        eventually(lambda: citadel.faults.fired["429"] == 5, what="the CRM asking for 12 s")
        slow = citadel.faults = Faults(rate=1.0, kinds=("slow",), slow_s=3.0, routes=route)
        eventually(lambda: slow.fired["slow"] == 5, timeout=30, what="the five writes inside the CRM")
    finally:
        first.stop(signal.SIGKILL)
    citadel.faults = Faults()  # quick again; the five still land, 3 s after they came

    second = RunningDaemon(daemon_env, home)
    try:
        eventually(lambda: second.events("push.recovered"), timeout=30, what="the recovery")
    finally:
        second.stop(signal.SIGKILL)
    eventually(lambda: citadel.serving == 0, what="every write the CRM received, landed")

    landed = Counter(i["occurredAt"] for i in citadel.interactions_of(JANE))
    assert sorted(landed) == sorted(map(iso, moments)) and set(landed.values()) == {1}, dict(landed)
    assert second.events("push.recovered")[-1]["adopted"] == 5


def test_new_texts_do_not_wait_behind_the_look_up_of_a_write_a_stop_abandoned(
        library: Library, citadel: CitadelServer, daemon_env: CLI, home: Path):
    """`crm-syncd install` (SIGTERM, then a start) while Jane's text hangs in the CRM: the restart looks
    it up only two request timeouts after it left. Bob's text, written meanwhile, cannot be a copy of
    it: it goes at once, and Jane's once looked up."""
    daemon_env.env.update(CRM_SYNCD_SHUTDOWN_DEADLINE_S="1", CRM_SYNCD_REQUEST_TIMEOUT_S="4")
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[BOB])
    library.text(JANE, at=ago(minutes=5))
    hang = citadel.faults = Faults(rate=1.0, kinds=("timeout",), hold_s=30, routes=("/api/contacts/:id/interactions",))
    first = RunningDaemon(daemon_env, home)
    eventually(lambda: hang.fired["timeout"] == 1, what="Jane's text hanging in the CRM")
    assert first.stop() == 0
    citadel.faults = Faults()

    second = RunningDaemon(daemon_env, home)
    try:
        library.text(BOB)

        eventually(lambda: len(citadel.interactions_of(BOB)) == 1, timeout=3, what="Bob's text, at once")
        assert not second.events("push.recovered")  # Jane's write is not looked up yet
        eventually(lambda: len(citadel.interactions_of(JANE)) == 1, timeout=20, what="Jane's text, looked up")
    finally:
        second.stop(signal.SIGKILL)


def test_a_new_text_a_restart_left_unsure_is_looked_up_when_due_not_behind_a_first_runs_backlog(
        library: Library, citadel: CitadelServer, daemon_env: CLI, home: Path):
    """A first run's backlog (600 older texts with Bob; the CRM takes 0.2 s a write) is under way, and
    Jane's new text (newest first) hangs in the CRM when the daemon is restarted. Her write is looked up
    two request timeouts (4 s) after it left, while the backlog goes on, and sent again: not an hour
    later, behind the backlog."""
    daemon_env.env.update(CRM_SYNCD_SHUTDOWN_DEADLINE_S="1", CRM_SYNCD_REQUEST_TIMEOUT_S="2")
    route = ("/api/contacts/:id/interactions",)
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=[BOB])
    for n in range(600):
        library.text(BOB, at=ago(days=2, minutes=n))
    jane_at = ago(minutes=1)
    library.text(JANE, at=jane_at)  # the newest item: claimed first
    hang = citadel.faults = Faults(rate=1.0, kinds=("timeout",), hold_s=30, routes=route)  # never written
    first = RunningDaemon(daemon_env, home)
    eventually(lambda: hang.fired["timeout"] >= 1, what="the first writes hanging in the CRM")
    assert first.stop() == 0
    citadel.faults = Faults(rate=1.0, kinds=("slow",), slow_s=0.2, routes=route)

    second = RunningDaemon(daemon_env, home)
    try:
        eventually(lambda: citadel.interactions_of(JANE), timeout=30, what="Jane's text")
        assert len(citadel.interactions_of(BOB)) < 500  # not behind the backlog
        eventually(lambda: len(citadel.interactions_of(BOB)) == 600, timeout=90, what="Bob's backlog")
    finally:
        second.stop(signal.SIGKILL)
    assert [i["occurredAt"] for i in citadel.interactions_of(JANE)] == [iso(jane_at)]
    assert set(Counter(i["occurredAt"] for i in citadel.interactions_of(BOB)).values()) == {1}


@pytest.mark.parametrize("fault", ["500-after-write", "504-after-write", "500-after-write-truncated", "524-then-write",
                                   "data-null-after-write", "id-less-after-write"])
def test_a_contact_whose_create_answer_was_lost_is_still_crm_syncds_and_follows_card_edits(
        library: Library, citadel: CitadelServer, cli: CLI, fault: str):
    """The CRM made Jane's contact but its answer was lost: the next sync finds it by her number (no
    second contact) and knows it as its own, so her new name and number reach it."""
    cli.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "2"  # the wait for a create that may still land
    pk = library.card(first="Jane", last="Doe", phones=[("+1 613 555 0111", "mobile")])
    citadel.faults = Faults(rate=1.0, kinds=(fault,), limit=1)
    cli("sync")
    assert citadel.faults.fired[fault] == 1
    assert cli("sync").code == 0
    assert [(c["firstName"], c["lastName"]) for c in citadel.contacts()] == [("Jane", "Doe")]

    library.books[0].update_card(pk, last="Smith", phones=[("+1 613 555 0112", "mobile")])
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    (jane,) = citadel.contacts()
    assert (jane["firstName"], jane["lastName"], jane["phone"]) == ("Jane", "Smith", "+16135550112")


@pytest.mark.parametrize(("fault", "late_s"), [("data-null-after-write", 0), ("500-after-write", 0),
                                               ("504-then-write", 1.0), ("504-then-write", 4.0)],
                         ids=["2xx without the record", "Citadel's 500", "proxy's 504, write lands in the wait",
                              "proxy's 504, write lands after the look-up"])
def test_a_card_edit_whose_answer_hides_the_write_is_not_taken_for_the_owners_and_later_edits_follow(
        library: Library, citadel: CitadelServer, cli: CLI, fault: str, late_s: float):
    """Jane's new name reached the CRM, but the answer did not say so: the contact is looked at (after a
    request timeout when the CRM may still be writing), or, written later still, found as sent by the
    next pass. Either way her contact is crm-syncd's as before, and her next edit reaches it."""
    cli.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "2"
    pk = library.card(first="Jane", last="Doe", phones=[JANE])
    assert cli("sync", "--contacts-only").code == 0
    library.books[0].update_card(pk, first="Janet")
    library.books[0].commit()
    citadel.faults = Faults(rate=1.0, kinds=(fault,), routes=("/api/contacts/:id",), limit=1, late_s=late_s)
    cli("sync", "--contacts-only")
    assert citadel.faults.fired[fault] == 1
    eventually(lambda: citadel.serving == 0, what="the stand-in's late write")

    library.books[0].update_card(pk, last="Smith")
    library.books[0].commit()
    result = cli("sync", "--contacts-only")

    assert result.code == 0 and "owner_edit_kept" not in result.output, result.output
    assert [(c["firstName"], c["lastName"]) for c in citadel.contacts()] == [("Janet", "Smith")]


@pytest.mark.parametrize("phones", [[], [JANE]], ids=["email only", "with a number"])
def test_a_create_made_again_without_a_refused_email_whose_answer_is_lost_is_found_not_made_twice(
        library: Library, citadel: CitadelServer, cli: CLI, phones: list[str]):
    """The CRM refuses Ann's email; the create sent again without it lands, but its answer is lost (a
    proxy's 504). The next pass finds that contact as sent (by name when it holds no address), files it
    as crm-syncd's (card edits reach it) and names the email left out."""
    cli.env["CRM_SYNCD_REQUEST_TIMEOUT_S"] = "2"
    pk = library.card(first="Ann", last="Lee", phones=phones, emails=["ann@example.com"])
    citadel.reject_contact_values = {"ann@example.com"}
    citadel.faults = Faults(rate=0.5, kinds=("504-after-write",), seed=10, limit=1, routes=("/api/contacts",))
    cli("sync", "--contacts-only")
    assert citadel.faults.fired["504-after-write"] == 1 and len(citadel.contacts()) == 1
    citadel.faults = Faults()

    found = cli("sync", "--contacts-only")
    library.books[0].update_card(pk, first="Anne")
    library.books[0].commit()
    edited = cli("sync", "--contacts-only")

    assert found.code == 0 and "written without its email" in found.stdout, found.output
    assert edited.code == 0, edited.output
    assert [(c["firstName"], c["lastName"], c["phone"]) for c in citadel.contacts()] == [
        ("Anne", "Lee", (phones or [None])[0])], found.output + edited.output
