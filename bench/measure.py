"""The measurements. Each returns plain numbers; __main__ turns them into rows."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sqlite3
import statistics
import time
from pathlib import Path

import httpx

from bench import procs
from crm_syncd.engine import Engine, occurred_iso
from crm_syncd.settings import load_settings
from crm_syncd.sources import contacts as contacts_source
from crm_syncd.sources.calls import CallsReader
from crm_syncd.sources.messages import MessagesReader
from crm_syncd.store import Store

MESSAGES = "Library/Messages/chat.db"
CALLS = "Library/Application Support/CallHistoryDB/CallHistory.storedata"
BOOK = "Library/Application Support/AddressBook"


def settings_for(home: Path, state: Path):
    return load_settings(messages_db=home / MESSAGES, calls_db=home / CALLS, addressbook_dir=home / BOOK,
                         state_dir=state, log_dir=state / "logs")


# -- 1, 2: extraction vs the bare SELECT ---------------------------------------------------

def extract_once(home: Path, work: Path, source: str) -> tuple[float, int]:
    """(seconds, source rows) for engine.extract(source) on a fresh state db."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    settings = settings_for(home, work)
    store = Store(settings.state_db)
    try:
        engine = Engine(settings, store, None)  # extract never touches the CRM
        t = time.perf_counter()
        report = engine.extract(source)
        return time.perf_counter() - t, report.rows
    finally:
        store.close()


def _paged_floor(path: Path, main_sql: str, rowid_pat: str, batch: int) -> tuple[float, int]:
    """Run the reader's main SELECT page by page (same pages), iterating rows, no processing."""
    sql = re.sub(rowid_pat, lambda m: m.group(1) + " ?", main_sql, count=1)
    sql = re.sub(r"LIMIT \d+\s*$", "LIMIT ?", sql.strip())
    t = time.perf_counter()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    rows, after = 0, 0
    try:
        while True:
            last = None
            n = 0
            for row in conn.execute(sql, (after, batch)):
                last = row[0]
                n += 1
            rows += n
            if n < batch or last is None:
                break
            after = last
    finally:
        conn.close()
    return time.perf_counter() - t, rows


def traced_select(reader_cls, path: Path, prefix: str, since_ms: int) -> str:
    statements: list[str] = []
    reader_cls(path, trace=statements.append).read(0, limit=2000, since_ms=since_ms)
    return next(s for s in statements if s.lstrip().startswith(prefix))


def messages_floor(home: Path, since_ms: int, batch: int) -> tuple[float, int]:
    path = home / MESSAGES
    sql = traced_select(MessagesReader, path, "SELECT m.ROWID", since_ms)
    return _paged_floor(path, sql, r"(WHERE m\.ROWID >)\s*\d+", batch)


def calls_floor(home: Path, since_ms: int, batch: int) -> tuple[float, int]:
    path = home / CALLS
    sql = traced_select(CallsReader, path, "SELECT Z_PK", since_ms)
    return _paged_floor(path, sql, r"(WHERE Z_PK >)\s*\d+", batch)


def contacts_once(home: Path) -> tuple[float, int]:
    t = time.perf_counter()
    snap = contacts_source.read_contacts(home / BOOK)
    return time.perf_counter() - t, len(snap.cards)


def contacts_floor_sql(home: Path) -> dict[Path, list[str]]:
    out = {}
    for path in contacts_source.store_paths(home / BOOK):
        statements: list[str] = []
        contacts_source.read_store(path, "x", trace=statements.append)
        out[path] = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    return out


def contacts_floor(sqls: dict[Path, list[str]]) -> tuple[float, int]:
    t = time.perf_counter()
    rows = 0
    for path, statements in sqls.items():
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        try:
            for sql in statements:
                for _ in conn.execute(sql):
                    rows += 1
        finally:
            conn.close()
    return time.perf_counter() - t, rows


# -- 8: AddressBook rescan, nothing changed ---------------------------------------------------

def contacts_changed_times(home: Path, work: Path, n: int) -> list[float]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    settings = settings_for(home, work)
    store = Store(settings.state_db)
    try:
        engine = Engine(settings, store, None)
        store.save_signatures(engine.addressbook_signatures())
        times = []
        for _ in range(n):
            t = time.perf_counter()
            changed = engine.contacts_changed()
            times.append(time.perf_counter() - t)
            assert not changed
        return times
    finally:
        store.close()


# -- 3: capacity of the stand-in --------------------------------------------------------------

def seed_contacts(url: str, n: int) -> list[int]:
    ids = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(n):
            r = client.post("/api/contacts", json={"firstName": "Load", "lastName": f"Gen{i}",
                                                   "phone": f"+1613300{i:04d}"})
            ids.append(r.json()["data"]["id"])
    return ids


def _payload(i: int) -> dict:
    ms = 1_700_000_000_000 + i * 1000
    return {"type": "TEXT_INBOUND" if i % 2 else "TEXT_OUTBOUND", "occurredAt": occurred_iso(ms),
            "source": "IMPORT_IOS"}


def load_concurrent(url: str, contact_ids: list[int], count: int, seconds: float, in_flight: int = 8) -> float:
    """Requests/s with `in_flight` concurrent POSTs (bounded by count and time)."""
    async def main() -> float:
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            done = 0
            counter = iter(range(count))
            deadline = time.monotonic() + seconds

            async def worker() -> None:
                nonlocal done
                for i in counter:
                    if time.monotonic() > deadline:
                        return
                    r = await client.post(f"/api/contacts/{contact_ids[i % len(contact_ids)]}/interactions",
                                          json=_payload(i))
                    r.raise_for_status()
                    done += 1

            t = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return done / (time.perf_counter() - t)
    return asyncio.run(main())


def load_sequential(url: str, contact_ids: list[int], count: int, seconds: float) -> float:
    with httpx.Client(base_url=url, timeout=30) as client:
        done = 0
        t = time.perf_counter()
        deadline = time.monotonic() + seconds
        for i in range(count):
            if time.monotonic() > deadline:
                break
            r = client.post(f"/api/contacts/{contact_ids[i % len(contact_ids)]}/interactions", json=_payload(i))
            r.raise_for_status()
            done += 1
        return done / (time.perf_counter() - t)


# -- 3, 7, 9: backfill through the CLI ----------------------------------------------------------

def backfill(lib_home: Path, work: Path, latency_ms: float, expected: int, max_s: float) -> dict:
    """`crm-syncd sync --interactions-only` in its own process against a fresh stand-in process.

    Rate = interactions the stand-in created / span of their createdAt (first to last), i.e. the
    delivery phase; the run is stopped (SIGINT) if it exceeds `max_s`.
    """
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    from bench.gen import copy
    home = copy(lib_home, work / "home")
    with procs.Citadel(work / "citadel.db", latency_ms) as crm:
        env = procs.crm_env(home, crm.url)
        t0 = time.monotonic()
        proc = procs.crm_syncd(["sync", "--interactions-only"], env, work / "sync.log")
        hwm = 0
        while proc.poll() is None and time.monotonic() - t0 < max_s:
            hwm = max(hwm, procs.vm_hwm_kb(proc.pid) or 0)
            time.sleep(0.1)
        completed = proc.poll() is not None
        if not completed:
            hwm = max(hwm, procs.vm_hwm_kb(proc.pid) or 0)
            procs.stop(proc, signal.SIGINT)
        wall = time.monotonic() - t0
        time.sleep(0.2)
        n, first, last = crm.created_span()
    state = home / "Library/Application Support/crm-syncd/state.db"
    delivered, state_bytes = 0, 0
    if state.exists():
        conn = sqlite3.connect(state)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        delivered = conn.execute("SELECT count(*) FROM outbox WHERE state = 'delivered'").fetchone()[0]
        conn.close()
        state_bytes = sum(p.stat().st_size for p in state.parent.glob("state.db*") if not p.name.endswith("-shm"))
    return {"interactions": n, "rate": (n - 1) / ((last - first) / 1000) if n > 1 and last > first else 0.0,
            "completed": completed and n >= expected, "wall_s": wall, "vm_hwm_kb": hwm,
            "delivered": delivered, "state_bytes": state_bytes}


def rss_history(lib_home: Path, work: Path, max_s: float, after_extract_s: float) -> dict:
    """Peak RSS of `crm-syncd sync --interactions-only` over a large history: through extraction,
    resolution and the first `after_extract_s` seconds of delivery, bounded by `max_s`."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    from bench.gen import copy
    home = copy(lib_home, work / "home")
    with procs.Citadel(work / "citadel.db") as crm:
        env = procs.crm_env(home, crm.url)
        t0 = time.monotonic()
        proc = procs.crm_syncd(["sync", "--interactions-only"], env, work / "sync.log")
        hwm, first_delivery = 0, None
        while proc.poll() is None and time.monotonic() - t0 < max_s:
            hwm = max(hwm, procs.vm_hwm_kb(proc.pid) or 0)
            if first_delivery is None and crm.interactions() > 0:
                first_delivery = time.monotonic()
            if first_delivery is not None and time.monotonic() - first_delivery > after_extract_s:
                break
            time.sleep(0.2)
        hwm = max(hwm, procs.vm_hwm_kb(proc.pid) or 0)
        procs.stop(proc, signal.SIGINT)
        return {"vm_hwm_kb": hwm, "reached_delivery": first_delivery is not None,
                "to_first_delivery_s": (first_delivery - t0) if first_delivery else None,
                "wall_s": time.monotonic() - t0, "delivered": crm.interactions()}


# -- 4, 5, 6: the daemon ------------------------------------------------------------------------

def daemon_run(lib_home: Path, work: Path, debounce_ms: int, inserts: int, spacing: tuple[float, float],
               burst: int, bursts: int, idle_windows: int, idle_s: float, log=print) -> dict:
    import random

    from tests.harness.chatdb import ChatDB

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    from bench.gen import copy, phone
    home = copy(lib_home, work / "home")
    rng = random.Random(7)
    out: dict = {"debounce_ms": debounce_ms}
    with procs.Citadel(work / "citadel.db") as crm:
        env = procs.crm_env(home, crm.url, debounce_ms=debounce_ms)
        daemon = procs.crm_syncd(["run"], env, work / "daemon.log")
        try:
            chat = ChatDB.open(home / MESSAGES)  # the writer stays open, as Messages' does
            initial = _count_rows(home)
            if not procs.wait_until(lambda: crm.interactions() >= initial, 120, 0.1):
                raise RuntimeError(f"daemon catch-up incomplete: {crm.interactions()} of {initial}")
            handles = [r[0] for r in chat.conn.execute("SELECT ROWID FROM handle ORDER BY ROWID")]
            time.sleep(1.0)
            # 4. live latency
            latencies = []
            for i in range(inserts):
                h = handles[i % len(handles)]
                before = crm.interactions()
                chat.conn.execute("BEGIN")
                _insert_message(chat, h, h)
                chat.conn.execute("COMMIT")
                committed_ms = time.time() * 1000
                ok = procs.wait_until(lambda: crm.interactions() > before, 5.0, 0.01)
                if ok:
                    created = crm.reader().execute("SELECT max(created_at) FROM interactions").fetchone()[0]
                    latencies.append(created - committed_ms)
                time.sleep(rng.uniform(*spacing))
            out["latencies_ms"] = latencies
            out["lost"] = inserts - len(latencies)
            # 5. burst
            rates = []
            for rep in range(bursts):
                time.sleep(1.0)
                before = crm.interactions()
                rows = [(handles[j % len(handles)],) for j in range(burst)]
                chat.conn.execute("BEGIN")
                for j, (h,) in enumerate(rows):  # own second each: fingerprints are counterpart|type|second
                    _insert_message(chat, h, h, seconds_ago=4 * 3600 + rep * burst + burst - j)
                chat.conn.execute("COMMIT")
                committed = time.time() * 1000
                seen = [crm.interactions(), time.monotonic()]

                def settled() -> bool:  # all in, or nothing new for 5 s
                    now = crm.interactions()
                    if now != seen[0]:
                        seen[:] = [now, time.monotonic()]
                    return now >= before + burst or time.monotonic() - seen[1] > 5

                procs.wait_until(settled, 120, 0.05)
                n, _, last = crm.created_span()
                got = crm.interactions() - before
                rates.append({"delivered": got, "seconds": (last - committed) / 1000,
                              "rate": got / ((last - committed) / 1000) if last > committed else 0.0})
            out["bursts"] = rates
            # 6. idle
            time.sleep(3.0)
            cpu = []
            for _ in range(idle_windows):
                c0 = procs.cpu_s(daemon.pid)
                time.sleep(idle_s)
                cpu.append(procs.cpu_s(daemon.pid) - c0)
            out["idle_cpu_s"] = cpu
            out["idle_s"] = idle_s
            out["vm_hwm_kb"] = procs.vm_hwm_kb(daemon.pid)
            chat.close()
        finally:
            procs.stop(daemon)
    return out


_MSG_COLS = ("guid", "text", "handle_id", "service", "account", "date", "is_from_me", "is_sent", "is_delivered",
             "is_finished", "item_type", "associated_message_type", "error", "is_system_message")


def _insert_message(chat, handle: int, chat_id: int, seconds_ago: int = 0) -> None:
    import uuid

    from tests.harness.chatdb import to_apple
    from datetime import UTC, datetime

    from datetime import timedelta
    date = to_apple(datetime.now(UTC) - timedelta(seconds=seconds_ago), "ns")
    values = {"guid": str(uuid.uuid4()).upper(), "text": "x", "handle_id": handle, "service": "iMessage",
              "account": "E:me@example.com", "date": date, "is_from_me": 0, "is_sent": 0, "is_delivered": 1,
              "is_finished": 1, "item_type": 0, "associated_message_type": 0, "error": 0, "is_system_message": 0}
    names = [c for c in _MSG_COLS if c in chat.cols["message"]]
    rowid = chat.conn.execute(f"INSERT INTO message ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                              [values[c] for c in names]).lastrowid
    chat.conn.execute("INSERT INTO chat_message_join (chat_id, message_id, message_date) VALUES (?, ?, ?)",
                      (chat_id, rowid, date))


def _count_rows(home: Path) -> int:
    conn = sqlite3.connect(f"file:{home / MESSAGES}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM message").fetchone()[0]
    finally:
        conn.close()


def med(xs):
    return statistics.median(xs) if xs else float("nan")
