"""The measurements. Each returns plain numbers; __main__ turns them into rows."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import signal
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import procs
from crm_syncd import daemon as daemonlib
from crm_syncd import store as storelib
from crm_syncd.crm import occurred_iso
from crm_syncd.engine import Engine
from crm_syncd.settings import load_settings
from crm_syncd.sources import contacts as contacts_source
from crm_syncd.sources.calls import CallsReader
from crm_syncd.sources.messages import EPOCH_MS, NS_THRESHOLD, MessagesReader
from crm_syncd.store import Store

MESSAGES = "Library/Messages/chat.db"
CALLS = "Library/Application Support/CallHistoryDB/CallHistory.storedata"
BOOK = "Library/Application Support/AddressBook"


def settings_for(home: Path, state: Path):
    return load_settings(messages_db=home / MESSAGES, calls_db=home / CALLS, addressbook_dir=home / BOOK,
                         state_dir=state, log_dir=state / "logs")


# -- 1, 2: extraction vs the bare SELECT ---------------------------------------------------

@contextmanager
def fresh_engine(home: Path, work: Path) -> Iterator[Engine]:
    """An Engine over `home`'s Library with a new state db in `work` and no CRM (for what never calls it)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    settings = settings_for(home, work)
    store = Store(settings.state_db)
    try:
        yield Engine(settings, store, None)
    finally:
        store.close()


def extract_once(home: Path, work: Path, source: str) -> tuple[float, int]:
    """(seconds, source rows) for engine.extract(source) on a fresh state db."""
    with fresh_engine(home, work) as engine:
        t = time.perf_counter()
        report = engine.extract(source)
        return time.perf_counter() - t, report.rows


def _paged_floor(path: Path, main_sql: str, rowid_pat: str, batch: int,
                 into: Path | None = None) -> tuple[float, int]:
    """Run the reader's main SELECT page by page (same pages), iterating rows, no processing.

    With `into`, also write each page's rows as they are into an unindexed table of a new WAL
    database there (synchronous=NORMAL, one transaction per page, as extraction commits): the
    least any extraction that keeps its rows must do.
    """
    sql = re.sub(rowid_pat, lambda m: m.group(1) + " ?", main_sql, count=1)
    sql = re.sub(r"LIMIT \d+\s*$", "LIMIT ?", sql.strip())
    out = None
    if into is not None:
        into.unlink(missing_ok=True)
        out = sqlite3.connect(into, isolation_level=None)
        out.execute("PRAGMA journal_mode=WAL")
        out.execute("PRAGMA synchronous=NORMAL")
    t = time.perf_counter()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    rows, after = 0, 0
    try:
        while True:
            last = None
            n = 0
            page = conn.execute(sql, (after, batch)).fetchall() if out else conn.execute(sql, (after, batch))
            for row in page:
                last = row[0]
                n += 1
            if out and page:
                if rows == 0:  # the first page: its width
                    out.execute(f"CREATE TABLE IF NOT EXISTS t ({', '.join(f'c{i}' for i in range(len(page[0])))})")
                out.execute("BEGIN")
                out.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(page[0]))})", page)
                out.execute("COMMIT")
            rows += n
            if n < batch or last is None:
                break
            after = last
    finally:
        conn.close()
        if out:
            out.close()
    return time.perf_counter() - t, rows


def traced_select(reader_cls, path: Path, prefix: str, since_ms: int) -> str:
    statements: list[str] = []
    reader_cls(path, trace=statements.append).read(0, limit=2000, since_ms=since_ms)
    return next(s for s in statements if s.lstrip().startswith(prefix))


def messages_floor(home: Path, since_ms: int, batch: int, into: Path | None = None) -> tuple[float, int]:
    path = home / MESSAGES
    sql = traced_select(MessagesReader, path, "SELECT m.ROWID", since_ms)
    return _paged_floor(path, sql, r"(WHERE m\.ROWID >)\s*\d+", batch, into)


def messages_sql_floor(home: Path, since_ms: int, batch: int, into: Path) -> tuple[float, int]:
    """The reader's SELECT moved by SQLite alone into the outbox of a new state database of crm-syncd's
    schema (its indexes and pragmas; chat.db attached read-only), one `INSERT ... SELECT` and one
    transaction per page of `batch` message ROWIDs: every message with its handle and no skip reason
    becomes an item, no Python per row. The least any extraction into this outbox must do.
    """
    path = home / MESSAGES
    select = traced_select(MessagesReader, path, "SELECT m.ROWID", since_ms)
    select = re.sub(r"(WHERE m\.ROWID >)\s*\d+", r"\1 :after AND m.ROWID <= :last", select, count=1)
    select = re.sub(r"LIMIT \d+\s*$", "", select.strip())
    for f in storelib.db_files(into):
        f.unlink(missing_ok=True)
    Store(into).close()
    out = sqlite3.connect(f"file:{into}", uri=True, isolation_level=None)  # uri: ATTACH takes one
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"cache_size=-{storelib.CACHE_KIB}",
                   f"wal_autocheckpoint={storelib.WAL_PAGES}"):
        out.execute(f"PRAGMA {pragma}")
    insert = (f"WITH s(rowid_, guid, date, from_me, handle_id, chat_id, skip) AS ({select}) "
              "INSERT OR IGNORE INTO outbox (key, address, type, occurred_ms, updated_ms) "
              "SELECT 'msg:' || s.guid, h.id, CASE WHEN s.from_me THEN 'TEXT_OUTBOUND' ELSE 'TEXT_INBOUND' END, "
              f"CASE WHEN s.date > {NS_THRESHOLD} THEN s.date / 1000000 ELSE s.date * 1000 END + {EPOCH_MS}, 0 "
              "FROM s JOIN handle h ON h.ROWID = s.handle_id WHERE s.skip IS NULL ORDER BY s.rowid_")
    page = "SELECT COUNT(*), MAX(ROWID) FROM (SELECT ROWID FROM message WHERE ROWID > ? ORDER BY ROWID LIMIT ?)"
    t = time.perf_counter()
    out.execute("ATTACH DATABASE ? AS chat", (f"file:{path}?mode=ro",))
    rows, after = 0, 0
    try:
        while True:
            n, last = out.execute(page, (after, batch)).fetchone()
            if not n:
                break
            out.execute("BEGIN")
            out.execute(insert, {"after": after, "last": last})
            out.execute("COMMIT")
            rows, after = rows + n, last
    finally:
        out.close()
    return time.perf_counter() - t, rows


def calls_floor(home: Path, since_ms: int, batch: int) -> tuple[float, int]:
    path = home / CALLS
    sql = traced_select(CallsReader, path, "SELECT Z_PK", since_ms)
    return _paged_floor(path, sql, r"(WHERE Z_PK >)\s*\d+", batch)


def contacts_once(home: Path) -> tuple[float, int]:
    t = time.perf_counter()
    snap = contacts_source.read_contacts(home / BOOK)
    return time.perf_counter() - t, len(snap.cards)


PROFILED = ("messages", "calls", "contacts")


def profiled(home: Path, work: Path, source: str):
    """A pyinstrument Profiler that sampled one in-process read of `source` (one of PROFILED): the
    engine's extraction on a fresh state db, or the contacts reader."""
    from pyinstrument import Profiler

    profiler = Profiler()  # a sample every millisecond
    if source == "contacts":
        with profiler:
            contacts_source.read_contacts(home / BOOK)
    else:
        with fresh_engine(home, work) as engine, profiler:
            engine.extract(source)
    return profiler


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
    with fresh_engine(home, work) as engine:
        engine.store.save_signatures(engine.addressbook_signatures())
        times = []
        for _ in range(n):
            t = time.perf_counter()
            changed = engine.contacts_changed()
            times.append(time.perf_counter() - t)
            assert not changed
        return times


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


def async_client(url: str, in_flight: int = 8) -> httpx.AsyncClient:
    """Plain HTTP on loopback: verify=False only skips loading the CA bundle (~40 ms per client)."""
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    return httpx.AsyncClient(base_url=url, timeout=30, limits=limits, verify=False)


async def drive(client: httpx.AsyncClient, requests, in_flight: int = 8, seconds: float | None = None,
                keep=None) -> tuple[int, float]:
    """Send `requests` ((method, path, httpx kwargs, tag) tuples, taken lazily) from `in_flight`
    workers sharing `client`; a non-2xx answer raises. No new request is started after `seconds`.
    `keep(tag, response)` sees each answer. (requests done, seconds until the last worker ended)."""
    done = 0
    todo = iter(requests)
    deadline = time.monotonic() + seconds if seconds is not None else float("inf")

    async def worker() -> None:
        nonlocal done
        for method, path, kwargs, tag in todo:
            if time.monotonic() > deadline:
                return
            r = await client.request(method, path, **kwargs)
            r.raise_for_status()
            if keep is not None:
                keep(tag, r)
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done, time.perf_counter() - t


def concurrent_requests(url: str, requests, in_flight: int = 8, seconds: float | None = None,
                        keep=None) -> tuple[int, float]:
    """`drive` on a new AsyncClient with `in_flight` connections."""
    async def main() -> tuple[int, float]:
        async with async_client(url, in_flight) as client:
            return await drive(client, requests, in_flight, seconds, keep)
    return asyncio.run(main())


def load_concurrent(url: str, contact_ids: list[int], count: int, seconds: float, in_flight: int = 8,
                    start: int = 0) -> float:
    """Requests/s with `in_flight` concurrent POSTs (bounded by count and time)."""
    n = len(contact_ids)
    done, secs = concurrent_requests(
        url, (("POST", f"/api/contacts/{contact_ids[i % n]}/interactions", {"json": _payload(i)}, None)
              for i in range(start, start + count)), in_flight, seconds)
    return done / secs


def load_sequential(url: str, contact_ids: list[int], count: int, seconds: float, start: int = 0) -> float:
    with httpx.Client(base_url=url, timeout=30) as client:
        done = 0
        t = time.perf_counter()
        deadline = time.monotonic() + seconds
        for i in range(start, start + count):
            if time.monotonic() > deadline:
                break
            r = client.post(f"/api/contacts/{contact_ids[i % len(contact_ids)]}/interactions", json=_payload(i))
            r.raise_for_status()
            done += 1
        return done / (time.perf_counter() - t)


def load_raw(crm: procs.Citadel, contact_ids: list[int], count: int, seconds: float, in_flight: int = 8,
             start: int = 0) -> dict:
    """The stand-in's own capacity: the same POSTs from a client too lean to be the limit (HTTP/1.1
    written and read by hand on `in_flight` keep-alive asyncio connections, no httpx). Requests/s, and
    the share of one core the stand-in process used meanwhile (near 1: it was the limit)."""
    host, port = crm.url.removeprefix("http://").rsplit(":", 1)
    todo = iter(range(start, start + count))
    done = 0

    async def worker(deadline: float) -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in todo:
                if time.monotonic() > deadline:
                    return
                body = json.dumps(_payload(i)).encode()
                writer.write(b"POST /api/contacts/%d/interactions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (contact_ids[i % len(contact_ids)], host.encode(), len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 201"):
                    raise RuntimeError(f"stand-in answered {head[:40]!r}")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length[1]))
                done += 1
        finally:
            writer.close()

    async def main() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(worker(time.monotonic() + seconds) for _ in range(in_flight)))
        return time.perf_counter() - t

    cpu = procs.cpu_s(crm.proc.pid)  # clock ticks: they count its threads per connection, gone by the end
    secs = asyncio.run(main())
    return {"rate": done / secs, "server_core_share": (procs.cpu_s(crm.proc.pid) - cpu) / secs}


def capacity_and_backfills(lib_home: Path, work: Path, latency_ms: float, reps: int, load_s: tuple[float, float],
                           expected: int, window_s: float, max_s: float, first_n: int = 0) -> dict:
    """One stand-in process per latency; `reps` rounds of: its capacity (8 in flight, httpx and a lean
    client), a sequential client's rate, one backfill run. Interleaved, so a slow spell of a shared
    machine hits both sides.

    Sharing the process does not bias the figures: after each backfill its contacts are deleted (and
    with them its interactions), so every round is a first backfill. Left in place, they would be
    another crm-syncd's placeholders holding the same messages, which dedupe_against_crm = auto
    rightly checks before sending anything to them.
    """
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    conc, raw, seq, runs = [], [], [], []
    with procs.Citadel(work / "citadel.db", latency_ms) as crm:
        ids = seed_contacts(crm.url, 10)
        for r in range(reps):
            conc.append(load_concurrent(crm.url, ids, 1_000_000, load_s[0], start=3_000_000 * r))
            raw.append(load_raw(crm, ids, 1_000_000, load_s[0], start=3_000_000 * r + 1_000_000))
            seq.append(load_sequential(crm.url, ids, 1_000_000, load_s[1], start=3_000_000 * r + 2_000_000))
            runs.append(backfill(crm, lib_home, work / f"run{r}", expected, window_s, max_s, first_n))
            delete_contacts(crm, keep=ids)
    return {"concurrent": conc, "raw": raw, "sequential": seq, "runs": runs}


def delete_contacts(crm: procs.Citadel, keep: list[int]) -> None:
    """Delete every contact but `keep` through the API (their interactions go with them)."""
    placeholders = "?, " * (len(keep) - 1) + "?"
    doomed = [row[0] for row in crm.reader().execute(f"SELECT id FROM contacts WHERE id NOT IN ({placeholders})", keep)]
    with httpx.Client(base_url=crm.url, timeout=60) as client:
        for contact in doomed:
            client.delete(f"/api/contacts/{contact}").raise_for_status()


# -- 11: the bulk import (issue 6): bare, and as crm-syncd would have to use it ---------------

BULK_BATCH = 500  # rows per POST /api/import/interactions
BULK_BASE_MS = 1_704_096_000_000  # 2024-01-01T08:00:00Z: each round and shape gets its own 30 days after it
_DAY_MS = 86_400_000
OUTBOUND = frozenset(("CALL_OUTBOUND", "TEXT_OUTBOUND", "EMAIL_OUTBOUND", "MAIL_SENT"))  # lastContactedAt
# The contract's capacity table (real server, 2 cores, loopback), for the projection.
REAL = {"bulk_rows_s": 530.0, "single_s": 255.0}


@dataclass(frozen=True)
class BulkShape:
    """Interactions of `contacts` contacts with unique emails: `per_day` rows (a minute apart) on each
    of `days` UTC days, 45 % outbound."""

    name: str
    contacts: int
    days: int
    per_day: int

    @property
    def rows(self) -> int:
        return self.contacts * self.days * self.per_day


def _contacts_by_tag(client: httpx.Client, tag: str) -> dict[int, dict]:
    """Every contact whose email ends in `@{tag}.bulk.example`, by id (listing paged at 100, deduplicated
    by id, checked against meta.total, bounded)."""
    out: dict[int, dict] = {}
    total = None
    for page in range(1, 1_000):
        r = client.get("/api/contacts", params={"search": f"@{tag}.bulk.example", "limit": 100, "page": page,
                                                "sort": "created_asc"})
        r.raise_for_status()
        body = r.json()
        out.update({c["id"]: c for c in body["data"]})
        total = body["meta"]["total"]
        if page >= body["meta"]["totalPages"]:
            break
    if len(out) != total:
        raise RuntimeError(f"contacts of {tag}: {len(out)} listed, meta.total {total}")
    return out


def _bulk_contacts(client: httpx.Client, tag: str, n: int) -> dict[str, int]:
    """`n` contacts with unique emails `c{i}@{tag}.bulk.example` (one bulk contact import; it returns no
    ids, so they are learned from the listing): email -> id."""
    rows = [{"first_name": "Bulk", "last_name": f"{tag}-{i}", "email": f"c{i}@{tag}.bulk.example"} for i in range(n)]
    r = client.post("/api/import/contacts", json=rows)
    r.raise_for_status()
    ids = {c["email"]: cid for cid, c in _contacts_by_tag(client, tag).items()}
    if len(ids) != n:
        raise RuntimeError(f"seeding {tag}: {len(ids)} of {n} contacts")
    return ids


def _bulk_items(shape: BulkShape, emails: list[str], base_ms: int, rng: random.Random) -> dict[str, list]:
    """(occurred ms, type) per email, oldest first."""
    out = {}
    for c, email in enumerate(emails):
        out[email] = [(base_ms + d * _DAY_MS + k * 60_000 + c * 1000,
                       "TEXT_OUTBOUND" if rng.random() < 0.45 else "TEXT_INBOUND")
                      for d in range(shape.days) for k in range(shape.per_day)]
    return out


async def _send_bulk(client: httpx.AsyncClient, rows: list[tuple[str, int, str]], deadline: float) -> tuple[int, bool]:
    """(email, ms, type) rows through POST /api/import/interactions, BULK_BATCH per request, one request
    at a time (the real server inserts them one by one on its single thread). (imported, all sent
    before the deadline)."""
    imported = 0
    for k in range(0, len(rows), BULK_BATCH):
        if time.monotonic() > deadline:
            return imported, False
        batch = [{"email": e, "type": kind, "occurred_at": occurred_iso(ms), "source": "IMPORT_IOS"}
                 for e, ms, kind in rows[k:k + BULK_BATCH]]
        r = await client.post("/api/import/interactions", json=batch)
        r.raise_for_status()
        data = r.json()["data"]
        if data["errors"]:
            raise RuntimeError(f"bulk import skipped rows: {data['errors'][:3]}")
        imported += data["imported"]
    return imported, True


def _newest_outbound(items) -> int | None:
    return max((ms for ms, kind in items if kind in OUTBOUND), default=None)


def _last_contacted(client: httpx.Client, tag: str, ids: dict[str, int], expect: dict[str, int | None]) -> dict:
    """Each contact's lastContactedAt (from the listing) against `expect` (email -> ms or None)."""
    from datetime import datetime

    listed = _contacts_by_tag(client, tag)
    equal = 0
    for email, ms in expect.items():
        got = listed[ids[email]]["lastContactedAt"]
        got_ms = round(datetime.fromisoformat(got.replace("Z", "+00:00")).timestamp() * 1000) if got else None
        equal += got_ms == ms
    return {"contacts": len(expect), "equal": equal}


async def _warm(client: httpx.AsyncClient) -> None:
    """Open the client's 8 connections first: crm-syncd's client is long-lived."""
    await drive(client, [("GET", "/api/health", {}, None)] * 16, 8)


def bulk_bare(url: str, client: httpx.Client, tag: str, ids: dict[str, int], items: dict[str, list],
              max_s: float) -> dict:
    """Every row through the bulk import, nothing else; then (not timed) is lastContactedAt still unset?"""
    rows = [(e, ms, kind) for e, its in items.items() for ms, kind in its]

    async def timed() -> tuple[int, float, bool]:
        async with async_client(url) as ac:
            await _warm(ac)
            t = time.perf_counter()
            imported, done = await _send_bulk(ac, rows, time.monotonic() + max_s)
            return imported, time.perf_counter() - t, done

    imported, secs, done = asyncio.run(timed())
    would = {e: _newest_outbound(its) for e, its in items.items() if _newest_outbound(its) is not None}
    after = _last_contacted(client, tag, ids, would)  # what a recomputing server would show
    return {"rows": imported, "seconds": secs, "rate": imported / secs if secs else 0.0, "completed": done,
            "requests": -(-imported // BULK_BATCH), "stale": after["contacts"] - after["equal"],
            "with_outbound": after["contacts"]}


def bulk_procedure(url: str, client: httpx.Client, tag: str, ids: dict[str, int], items: dict[str, list],
                   max_s: float) -> dict:
    """The bulk import as crm-syncd would have to use it, timed end to end (three steps, one client
    with 8 connections, opened before the clock starts):

    1. every contact's rows but its newest through the bulk import (batches of BULK_BATCH, one at a time);
    2. the ids of what it created: GET /api/contacts/:id/interactions?date=DAY&limit=100, one per contact
       and UTC day that got bulk rows (8 in flight; further pages after the first from meta.totalPages),
       deduplicated by id, checked against meta.total, matched to our rows by (type, occurredAt);
    3. each contact's newest interaction by a single POST (8 in flight), so the server recomputes
       lastContactedAt over everything, the bulk rows included.

    Not timed: lastContactedAt of every contact after step 1 (stale?) and after step 3 (right?)."""
    bulk = [(e, ms, kind) for e, its in items.items() for ms, kind in its[:-1]]
    would = {e: _newest_outbound(its[:-1]) for e, its in items.items() if _newest_outbound(its[:-1]) is not None}
    pages: dict[tuple[int, str], list[dict]] = {}
    meta: dict[tuple[int, str], dict] = {}
    created: dict[str, int] = {}

    def keep(key, r: httpx.Response) -> None:
        body = r.json()
        pages.setdefault(key, []).extend(body["data"])
        meta[key] = body["meta"]

    def remember(email, r: httpx.Response) -> None:
        created[email] = r.json()["data"]["id"]

    def listing(keys_pages):
        return (("GET", f"/api/contacts/{cid}/interactions", {"params": {"date": day, "limit": 100, "page": page}},
                 (cid, day)) for (cid, day), page in keys_pages)

    async def timed() -> dict:
        async with async_client(url) as ac:
            await _warm(ac)
            deadline = time.monotonic() + max_s
            t = time.perf_counter()
            imported, bulk_done = await _send_bulk(ac, bulk, deadline)
            bulk_s = time.perf_counter() - t
            stale = _last_contacted(client, tag, ids, would)  # not timed (blocks the loop; nothing else runs)
            expected: dict[tuple[int, str], set[tuple[str, str]]] = {}
            for e, ms, kind in bulk[:imported]:
                iso = occurred_iso(ms)
                expected.setdefault((ids[e], iso[:10]), set()).add((kind, iso))
            t = time.perf_counter()
            n1, _ = await drive(ac, listing(((key, 1) for key in expected)), 8, max(0.0, deadline - time.monotonic()),
                                keep)
            more = [(key, page) for key, m in meta.items() for page in range(2, min(m["totalPages"], 1_000) + 1)]
            n2, _ = await drive(ac, listing(more), 8, max(0.0, deadline - time.monotonic()), keep)
            learned: dict[tuple[str, str, int], int] = {}
            short = foreign = 0
            for key, rows in pages.items():
                unique = {r["id"]: r for r in rows}
                short += len(unique) != meta[key]["total"]
                for r in unique.values():
                    mark = (r["type"], r["occurredAt"])
                    if mark in expected.get(key, ()):
                        learned[(*mark, key[0])] = r["id"]
                    else:
                        foreign += 1
            list_s = time.perf_counter() - t
            newest = (("POST", f"/api/contacts/{ids[e]}/interactions",
                       {"json": {"type": its[-1][1], "occurredAt": occurred_iso(its[-1][0]), "source": "IMPORT_IOS"}},
                       e) for e, its in items.items())
            singles, single_s = await drive(ac, newest, 8, max(0.0, deadline - time.monotonic()), remember)
            return {"imported": imported, "bulk_s": bulk_s, "bulk_done": bulk_done, "stale": stale,
                    "list_requests": n1 + n2, "later_pages": n2, "list_s": list_s,
                    "list_done": n1 == len(expected) and n2 == len(more), "learned": len(learned), "short": short,
                    "foreign": foreign, "singles": singles, "single_s": single_s}

    x = asyncio.run(timed())
    secs = x["bulk_s"] + x["list_s"] + x["single_s"]
    rows = x["imported"] + x["singles"]
    after = _last_contacted(client, tag, ids, {e: _newest_outbound(its) for e, its in items.items()})
    return {"rows": rows, "seconds": secs, "rate": rows / secs if secs else 0.0,
            "completed": x["bulk_done"] and x["list_done"] and x["singles"] == len(items),
            "bulk": {"rows": x["imported"], "requests": -(-x["imported"] // BULK_BATCH), "seconds": x["bulk_s"]},
            "listings": {"requests": x["list_requests"], "later_pages": x["later_pages"], "seconds": x["list_s"],
                         "ids_learned": x["learned"], "ids_expected": x["imported"], "foreign_rows": x["foreign"],
                         "short_days": x["short"]},
            "singles": {"requests": x["singles"], "seconds": x["single_s"], "ids": len(created)},
            "newest_inbound": sum(its[-1][1] not in OUTBOUND for its in items.values()),
            "stale_after_bulk": x["stale"]["contacts"] - x["stale"]["equal"],
            "with_outbound_bulk": x["stale"]["contacts"],
            "last_contacted_right": after["equal"], "contacts": after["contacts"]}


def real_projection(run: dict, list_s: float | None = None) -> dict:
    """The same requests at the contract's real-server rates: bulk rows at ~530/s, single POSTs at ~255/s
    (8 in flight), day listings assumed to cost what a single POST does (`list_s`, per second)."""
    list_s = list_s or REAL["single_s"]
    if "bulk" not in run:  # bare
        return {"rate": REAL["bulk_rows_s"], "seconds": run["rows"] / REAL["bulk_rows_s"]}
    secs = (run["bulk"]["rows"] / REAL["bulk_rows_s"] + run["listings"]["requests"] / list_s
            + run["singles"]["requests"] / REAL["single_s"])
    return {"rate": run["rows"] / secs if secs else float("nan"), "seconds": secs}


def bulk_vs_single(work: Path, reps: int, load_s: float, bare: BulkShape, shapes: tuple[BulkShape, ...],
                   max_s: float) -> dict:
    """One stand-in process; `reps` rounds of: its single-POST capacity (load_concurrent, 8 in flight),
    the bare bulk import of `bare`, the procedure for each of `shapes`. Interleaved, so a slow spell of a
    shared machine hits all sides. Fresh contacts (unique emails) for every round and shape, seeded
    before the first round; each round and shape has its own 30 days."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rng = random.Random(6)
    out: dict = {"concurrent": [], bare.name: [], **{s.name: [] for s in shapes}}
    with procs.Citadel(work / "citadel.db") as crm, httpx.Client(base_url=crm.url, timeout=60) as client:
        cap_ids = seed_contacts(crm.url, 10)
        rounds = []
        for r in range(reps):
            sets = []
            for k, shape in enumerate((bare, *shapes)):
                tag = f"{shape.name}-r{r}"
                ids = _bulk_contacts(client, tag, shape.contacts)
                items = _bulk_items(shape, list(ids), BULK_BASE_MS + (r * 8 + k) * 30 * _DAY_MS, rng)
                sets.append((shape, tag, ids, items))
            rounds.append(sets)
        for r, sets in enumerate(rounds):
            out["concurrent"].append(load_concurrent(crm.url, cap_ids, 1_000_000, load_s, start=2_000_000 * r))
            for shape, tag, ids, items in sets:
                if shape is bare:
                    out[shape.name].append(bulk_bare(crm.url, client, tag, ids, items, max_s))
                else:
                    out[shape.name].append(bulk_procedure(crm.url, client, tag, ids, items, max_s))
    return out


# -- 3, 7, 9: backfill through the CLI ----------------------------------------------------------

def backfill(crm: procs.Citadel, lib_home: Path, work: Path, expected: int, window_s: float, max_s: float,
             first_n: int = 0) -> dict:
    """`crm-syncd sync --interactions-only` in its own process, on a fresh copy of `lib_home`.

    Rate = interactions the stand-in created / span of their createdAt (first to last), i.e. the
    delivery phase. The run is stopped (SIGINT) once delivery has gone on for `window_s` seconds, or
    after `max_s` in all. `first_n_s`: createdAt of the `first_n`-th interaction - the first's.
    """
    work.mkdir(parents=True)
    from bench.gen import copy
    home = copy(lib_home, work / "home")
    skip = crm.max_id()
    env = procs.crm_env(home, crm.url)
    t0 = time.monotonic()
    proc = procs.crm_syncd(["sync", "--interactions-only"], env, work / "sync.log")
    hwm, first_seen = 0, None
    while proc.poll() is None and time.monotonic() - t0 < max_s:
        hwm = max(hwm, procs.vm_hwm_kb(proc.pid) or 0)
        if first_seen is None and crm.count_since(skip) > 0:
            first_seen = time.monotonic()
        if first_seen is not None and time.monotonic() - first_seen >= window_s:
            break
        time.sleep(0.1)
    completed = proc.poll() is not None
    if not completed:
        hwm = max(hwm, procs.vm_hwm_kb(proc.pid) or 0)
        procs.stop(proc, signal.SIGINT)
    wall = time.monotonic() - t0
    time.sleep(0.2)
    n, first, last = crm.created_span(skip)
    nth = None
    if first_n and n >= first_n:
        nth = crm.reader().execute("SELECT created_at FROM interactions WHERE id > ? ORDER BY created_at, id "
                                   "LIMIT 1 OFFSET ?", (skip, first_n - 1)).fetchone()[0]
    size = state_size(home / "Library/Application Support/crm-syncd/state.db")
    return {"interactions": n, "rate": (n - 1) / ((last - first) / 1000) if n > 1 and last > first else 0.0,
            "completed": completed and n >= expected, "wall_s": wall, "vm_hwm_kb": hwm,
            "to_first_delivery_s": (first_seen - t0) if first_seen else None,
            "first_n": first_n, "first_n_s": (nth - first) / 1000 if nth is not None else None,
            "delivered": size["delivered"], "outbox_rows": size["rows"], "state_bytes": size["bytes"]}


def state_size(state: Path) -> dict:
    """Bytes of a state.db (+ -wal after a TRUNCATE checkpoint; not -shm), outbox rows, delivered rows."""
    if not state.exists():
        return {"bytes": 0, "rows": 0, "delivered": 0}
    conn = sqlite3.connect(state)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows, delivered = conn.execute("SELECT count(*), count(*) FILTER (WHERE state = 'delivered') "
                                       "FROM outbox").fetchone()
    finally:
        conn.close()
    size = sum(p.stat().st_size for p in state.parent.glob("state.db*") if not p.name.endswith("-shm"))
    return {"bytes": size, "rows": rows, "delivered": delivered}


_TS = re.compile(r'(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z?')
_FIELD = {k: re.compile(rf'(?:"{k}": "?|\b{k}=)(\w+)') for k in ("source", "mark", "rows")}


def extraction_batches(log: Path, source: str) -> list[tuple[float, int]]:
    """(epoch seconds, mark) of every `extract.batch` of `source` in a crm-syncd log (console or JSON)."""
    from datetime import datetime, timezone
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "extract.batch" not in line:
            continue
        ts, src, mark = _TS.search(line), _FIELD["source"].search(line), _FIELD["mark"].search(line)
        if not (ts and src and mark) or src.group(1) != source:
            continue
        at = datetime.fromisoformat(ts.group(1)).replace(tzinfo=timezone.utc).timestamp()
        out.append((at, int(mark.group(1))))
    return out


def extraction_rate(batches: list[tuple[float, int]], parts: int = 3) -> dict:
    """Rows/s from the first logged batch to the last (the first batch's own time is not seen), and
    per consecutive part of the rows (the rate's trend as the outbox grows)."""
    if len(batches) < 2:
        return {"rate": float("nan"), "rows": batches[-1][1] if batches else 0, "parts": []}
    (t0, m0), (t1, m1) = batches[0], batches[-1]
    rates = []
    bounds = [m0 + (m1 - m0) * k / parts for k in range(parts + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        seg = [b for b in batches if lo <= b[1] <= hi]
        if len(seg) >= 2 and seg[-1][0] > seg[0][0]:
            rates.append((seg[-1][1] - seg[0][1]) / (seg[-1][0] - seg[0][0]))
    return {"rate": (m1 - m0) / (t1 - t0) if t1 > t0 else float("nan"), "rows": m1, "seconds": t1 - t0,
            "parts": rates}


def history_sync(lib_home: Path, work: Path, max_s: float, after_delivery_s: float) -> dict:
    """`crm-syncd sync --interactions-only` over a large history: through extraction, resolution
    (placeholders) and the first `after_delivery_s` seconds of delivery, bounded by `max_s`.
    Peak RSS (VmHWM), overall and by phase (from VmRSS polled every 0.2 s and the phases' times in
    its log), and, from its log, the extraction rate of messages and calls."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    from bench.gen import copy
    home = copy(lib_home, work / "home")
    rss: list[tuple[float, int]] = []  # (epoch s, VmRSS kB)
    with procs.Citadel(work / "citadel.db") as crm:
        env = procs.crm_env(home, crm.url)
        t0 = time.monotonic()
        proc = procs.crm_syncd(["sync", "--interactions-only"], env, work / "sync.log")
        hwm, first_delivery, first_delivery_at = 0, None, None
        while proc.poll() is None and time.monotonic() - t0 < max_s:
            hwm = max(hwm, procs.vm_hwm_kb(proc.pid) or 0)
            rss.append((time.time(), procs.vm_rss_kb(proc.pid) or 0))
            if first_delivery is None and crm.interactions() > 0:
                first_delivery, first_delivery_at = time.monotonic(), time.time()
            if first_delivery is not None and time.monotonic() - first_delivery > after_delivery_s:
                break
            time.sleep(0.2)
        hwm = max(hwm, procs.vm_hwm_kb(proc.pid) or 0)
        completed = proc.poll() is not None
        procs.stop(proc, signal.SIGINT, wait=2.0)  # measured already; a large state db is slow to close
        out = {"vm_hwm_kb": hwm, "reached_delivery": first_delivery is not None, "completed": completed,
               "to_first_delivery_s": (first_delivery - t0) if first_delivery else None,
               "wall_s": time.monotonic() - t0, "delivered": crm.interactions()}
    out["state_db"] = str(home / "Library/Application Support/crm-syncd/state.db")
    log = work / "sync.log"
    out["messages"] = extraction_rate(extraction_batches(log, "messages"))
    out["calls"] = extraction_rate(extraction_batches(log, "calls"))
    ends = [b[0] for src in ("messages", "calls") for b in extraction_batches(log, src)]
    extracted_at = max(ends) if ends else None
    phases = {"extraction": (0.0, extracted_at), "resolution": (extracted_at, first_delivery_at),
              "delivery": (first_delivery_at, float("inf"))}
    out["peak_rss_mb_by_phase"] = {
        name: max((kb for at, kb in rss if lo is not None and lo <= at and (hi is None or at < hi)), default=0) / 1024
        for name, (lo, hi) in phases.items()}
    out["rss_timeline_mb"] = [(round(at - rss[0][0], 1), round(kb / 1024, 1)) for at, kb in rss[::10]] if rss else []
    return out


def heartbeat_times(state_db: Path, n: int) -> dict:
    """CPU and wall seconds per idle heartbeat on a state db: `Daemon.beat()` and the failed count a
    due heartbeat_url ping asks for (the daemon does this every HEARTBEAT_S, idle or not). The wall
    time adds the wait for the fsync of the heartbeat's commit, which costs the Mac no CPU."""
    store = Store(state_db)
    try:
        settings = load_settings(state_dir=state_db.parent, log_dir=state_db.parent / "logs")
        beating = daemonlib.Daemon(settings)
        beating.engine, beating.store = Engine(settings, store, None), store  # what `Daemon.run` sets
        wall, cpu = [], []
        for _ in range(n):
            t, c = time.perf_counter(), time.thread_time()
            beating.beat()
            store.failed_count()
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        return {"cpu_seconds": cpu, "seconds": wall, "outbox_rows": sum(store.counts().values())}
    finally:
        store.close()


# -- 4, 5, 6, 10: the daemon --------------------------------------------------------------------

class IdleSampler(threading.Thread):
    """CPU of a process over `windows` consecutive windows of `window_s` (sampled on a thread, so the
    caller may do other work meanwhile)."""

    def __init__(self, pid: int, windows: int, window_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.windows, self.window_s = pid, windows, window_s
        self.samples: list[dict] = []
        self.total: dict | None = None

    def run(self) -> None:
        first = prev = procs.CPUSample(self.pid)
        for k in range(1, self.windows + 1):
            time.sleep(max(0.0, first.at + k * self.window_s - time.monotonic()))
            now = procs.CPUSample(self.pid)
            self.samples.append(now.since(prev))
            prev = now
        self.total = prev.since(first)


class Daemon:
    """`crm-syncd run` on a copy of `lib_home` against its own stand-in process, caught up."""

    def __init__(self, lib_home: Path, work: Path, debounce_ms: int) -> None:
        from tests.harness.chatdb import ChatDB

        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        from bench.gen import copy
        self.home = copy(lib_home, work / "home")
        self.debounce_ms = debounce_ms
        self.log_path = self.home / "Library/Logs/crm-syncd/crm-syncd.log"
        self.state_db = self.home / "Library/Application Support/crm-syncd/state.db"
        self.rng = random.Random(7)
        self.crm = procs.Citadel(work / "citadel.db")
        env = procs.crm_env(self.home, self.crm.url, debounce_ms=debounce_ms)
        self.proc = procs.crm_syncd(["run"], env, work / "daemon.log")
        self.chat = None
        try:
            self.chat = ChatDB.open(self.home / MESSAGES)  # the writer stays open, as Messages' does
            initial = _count_rows(self.home)
            if not procs.wait_until(lambda: self.crm.interactions() >= initial, 120, 0.1):
                raise RuntimeError(f"daemon catch-up incomplete: {self.crm.interactions()} of {initial}")
            self.handles = [r[0] for r in self.chat.conn.execute("SELECT ROWID FROM handle ORDER BY ROWID")]
            time.sleep(1.0)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self, wait: float = 15.0) -> None:
        if self.chat is not None:
            self.chat.close()
            self.chat = None
        procs.stop(self.proc, wait=wait)
        self.crm.stop()

    def state_size(self) -> dict:
        """Bytes of state.db (+ -wal after a TRUNCATE checkpoint), its outbox rows, delivered ones.
        Call after close()."""
        return state_size(self.state_db)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def latency(self, inserts: int, gap: tuple[float, float], bound_s: float = 60.0) -> dict:
        """Single messages, each committed `gap` seconds after the previous one was delivered. A latency
        is that message's own `createdAt` − its commit; one not in the stand-in within `bound_s` is lost."""
        from datetime import UTC, datetime, timedelta

        base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
        latencies, lost = [], 0
        for i in range(inserts):
            h = self.handles[i % len(self.handles)]
            at = base - timedelta(seconds=i)  # its own second: found in the stand-in by its time
            self.chat.conn.execute("BEGIN")
            _insert_message(self.chat, h, h, at=at)
            self.chat.conn.execute("COMMIT")
            committed_ms = time.time() * 1000
            if procs.wait_until(lambda: self.created_at(at) is not None, bound_s, 0.01):
                latencies.append(self.created_at(at) - committed_ms)
            else:
                lost += 1
            time.sleep(self.rng.uniform(*gap))
        return {"latencies_ms": latencies, "lost": lost, "bound_s": bound_s}

    def created_at(self, at) -> int | None:
        """When the stand-in stored the interaction of the message dated `at` (whole seconds)."""
        return self.crm.reader().execute("SELECT min(created_at) FROM interactions WHERE occurred_at = ?",
                                         (int(at.timestamp()) * 1000,)).fetchone()[0]

    def bursts(self, size: int, reps: int, behind_s: float) -> list[dict]:
        """Bursts of `size` messages in one commit; `behind_s` after each, one more message of now:
        its latency (commit → `createdAt`) while the burst is still being delivered."""
        from datetime import UTC, datetime

        rates = []
        for rep in range(reps):
            time.sleep(0.5)
            before = self.crm.interactions()
            self.chat.conn.execute("BEGIN")
            for j in range(size):  # own second each: fingerprints are counterpart|type|second
                h = self.handles[j % len(self.handles)]
                _insert_message(self.chat, h, h, seconds_ago=4 * 3600 + rep * size + size - j)
            self.chat.conn.execute("COMMIT")
            committed = time.time() * 1000
            time.sleep(behind_s)
            at = datetime.now(UTC).replace(microsecond=0)
            self.chat.conn.execute("BEGIN")
            _insert_message(self.chat, self.handles[0], self.handles[0], at=at)
            self.chat.conn.execute("COMMIT")
            live_committed = time.time() * 1000
            self._settle(before + size + 1, 120)
            _, _, last = self.crm.created_span()
            got = self.crm.interactions() - before
            live = self.created_at(at)
            rates.append({"delivered": got, "seconds": (last - committed) / 1000,
                          "rate": got / ((last - committed) / 1000) if last > committed else 0.0,
                          "behind_latency_ms": None if live is None else live - live_committed,
                          "burst_left_ms": last - live_committed})
        return rates

    def _settle(self, target: int, timeout: float, quiet_s: float = 5.0) -> bool:
        """Until the stand-in holds `target` interactions, or nothing new arrived for `quiet_s`."""
        seen = [self.crm.interactions(), time.monotonic()]

        def settled() -> bool:
            now = self.crm.interactions()
            if now != seen[0]:
                seen[:] = [now, time.monotonic()]
            return now >= target or time.monotonic() - seen[1] > quiet_s

        procs.wait_until(settled, timeout, 0.05)
        return self.crm.interactions() >= target

    def _undelivered(self) -> int:
        conn = sqlite3.connect(f"file:{self.state_db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM outbox WHERE state != 'delivered'").fetchone()[0]
        finally:
            conn.close()

    def outage(self, n: int, hold_s: float, max_wait_s: float, batches: int = 4) -> dict:
        """The stand-in goes down; `n` messages arrive (in `batches` commits, 0.25 s apart) and are
        queued; after `hold_s` (and at least until the daemon has queued all `n`) it comes back up on
        the same port and database. Times from its coming up to the first and the last of the `n`
        in the stand-in; what was missing or duplicated."""
        from datetime import UTC, datetime, timedelta

        procs.wait_until(lambda: self._undelivered() == 0, 30, 0.1)
        time.sleep(0.5)
        max_id = self.crm.reader().execute("SELECT coalesce(max(id), 0) FROM interactions").fetchone()[0]
        t_down = self.crm.down()
        t_down_mono = time.monotonic()
        cpu_down = procs.CPUSample(self.pid)
        base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
        expected = {}
        per = -(-n // batches)
        for b in range(batches):
            self.chat.conn.execute("BEGIN")
            for j in range(b * per, min(n, (b + 1) * per)):
                h = self.handles[j % len(self.handles)]
                at = base - timedelta(seconds=j)  # whole seconds, each its own
                _insert_message(self.chat, h, h, at=at)
                expected[int(at.timestamp() * 1000)] = h
            self.chat.conn.execute("COMMIT")
            time.sleep(0.25)
        queued = procs.wait_until(lambda: self._undelivered() >= n, 60, 0.1)
        queued_s = time.monotonic() - t_down_mono
        time.sleep(max(0.0, hold_s - (time.monotonic() - t_down_mono)))
        cpu_up = procs.CPUSample(self.pid)
        t_up = self.crm.up()
        first_seen: list[procs.CPUSample] = []

        def all_in() -> bool:
            got = self._count_since(max_id)
            if got and not first_seen:
                first_seen.append(procs.CPUSample(self.pid))
            return got >= n

        recovered = procs.wait_until(all_in, max_wait_s, 0.02)
        waited_s = time.time() - t_up / 1000
        cpu_end = procs.CPUSample(self.pid)
        if recovered:
            time.sleep(1.0)  # late duplicates
        rows = self.crm.reader().execute("SELECT contact_id, type, occurred_at, created_at FROM interactions "
                                         "WHERE id > ?", (max_id,)).fetchall()
        ours = [r for r in rows if r[2] in expected]
        created = sorted(r[3] for r in ours)
        keys = [(r[0], r[1], r[2]) for r in rows]
        dups_all = self.crm.reader().execute(
            "SELECT count(*) - (SELECT count(*) FROM (SELECT DISTINCT contact_id, type, occurred_at "
            "FROM interactions)) FROM interactions").fetchone()[0]
        return {"n": n, "down_s": (t_up - t_down) / 1000, "queued": queued, "queued_after_s": queued_s,
                "recovered": recovered, "waited_s": waited_s,
                "to_first_s": (created[0] - t_up) / 1000 if created else None,
                "to_last_s": (created[-1] - t_up) / 1000 if created and len({r[2] for r in ours}) >= n else None,
                "delivered": len({r[2] for r in ours}), "missing": n - len({r[2] for r in ours}),
                "duplicates": len(keys) - len(set(keys)), "unexpected": len(rows) - len(ours),
                "duplicates_whole_run": dups_all,
                "daemon_events": self._events_between(t_down, t_up + waited_s * 1000),
                "daemon_cpu": {"while_down": cpu_up.since(cpu_down),
                               "up_to_first": (first_seen[0] if first_seen else cpu_end).since(cpu_up),
                               "first_to_end": cpu_end.since(first_seen[0]) if first_seen else None}}

    def _count_since(self, max_id: int) -> int:
        return self.crm.reader().execute("SELECT count(*) FROM interactions WHERE id > ?", (max_id,)).fetchone()[0]

    def _events_between(self, t0_ms: float, t1_ms: float) -> dict:
        """Counts of the daemon's log events (its JSON log) between two wall-clock instants."""
        from collections import Counter
        from datetime import datetime

        counts: Counter[str] = Counter()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return {}
        for line in lines:
            try:
                rec = json.loads(line)
                at = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp() * 1000
            except (ValueError, KeyError, TypeError):
                continue
            if t0_ms <= at <= t1_ms:
                counts[rec.get("event", "?")] += 1
        return dict(counts)

    def events_between(self, t0_ms: float, t1_ms: float) -> dict:
        return self._events_between(t0_ms, t1_ms)


_MSG_COLS = ("guid", "text", "handle_id", "service", "account", "date", "is_from_me", "is_sent", "is_delivered",
             "is_finished", "item_type", "associated_message_type", "error", "is_system_message")


def _insert_message(chat, handle: int, chat_id: int, seconds_ago: int = 0, at=None) -> None:
    import uuid
    from datetime import UTC, datetime, timedelta

    from tests.harness.chatdb import to_apple

    date = to_apple(at if at is not None else datetime.now(UTC) - timedelta(seconds=seconds_ago), "ns")
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
