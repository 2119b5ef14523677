"""Synthetic ~/Library builds for the benchmark, cached under bench/.cache/.

Built with the fixture builders of tests.harness (their schemas, their writer connections), but
rows go in through executemany on the builder's own connection, in one transaction per database.
Every message gets its own second (base + i * STEP_S), so fingerprints (counterpart|type|second)
never collide.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.harness import library as _library
from tests.harness.chatdb import ddl_dir, to_apple
from tests.harness.library import Library, ago

CACHE = Path(__file__).resolve().parent / ".cache"
VERSION = 3  # the readable part of a build's name; what it is built from is in its digest
BUILDERS = ("library", "chatdb", "callhistory", "addressbook")  # the tests.harness modules a build runs


@dataclass(frozen=True)
class Spec:
    name: str
    messages: int
    handles: int
    groups: int
    calls: int
    cards: int
    group_share: float = 0.05  # of messages

    @property
    def label(self) -> str:
        return (f"v{VERSION}-{self.name}-m{self.messages}-h{self.handles}-g{self.groups}-c{self.calls}"
                f"-k{self.cards}")

    @property
    def key(self) -> str:
        """The label and a digest of everything the build is made from: every field of the spec, this
        generator, the fixture builders and Apple's DDL they run. A change to any of them builds anew."""
        digest = hashlib.sha256(repr(self).encode())
        harness = Path(_library.__file__).parent
        for path in (Path(__file__), *(harness / f"{name}.py" for name in BUILDERS), *sorted(ddl_dir().rglob("*.sql"))):
            digest.update(str(path.name).encode() + path.read_bytes())
        return f"{self.label}-{digest.hexdigest()[:10]}"


def phone(i: int) -> str:
    # +1 613 2xx xxxx: valid Canadian numbers (555 ones are mostly not)
    return f"+1613{2000000 + i:07d}"


def build(spec: Spec, log=print) -> Path:
    """The cached HOME for `spec` (built on first use). Callers copy it before writing to it."""
    home = CACHE / spec.key
    if (home / ".done").exists():
        return home
    for stale in CACHE.glob(f"{spec.label}*"):  # this spec built from other inputs (or a build cut short)
        shutil.rmtree(stale)
    started = time.monotonic()
    rng = random.Random(spec.label)
    lib = Library.create(home, sources=2)  # root + 2 Sources: three AddressBook stores
    try:
        _chat(lib, spec, rng)
        _calls(lib, spec, rng)
        _cards(lib, spec, rng)
        for db in (lib.chat, lib.calls, *lib.books):
            db.checkpoint()
    finally:
        lib.close()
    (home / ".done").write_text("ok")
    log(f"  built {spec.name} library ({spec.messages:,} messages, {spec.calls:,} calls, {spec.cards:,} cards) "
        f"in {time.monotonic() - started:.1f} s")
    return home


def copy(home: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(home, dest, ignore=shutil.ignore_patterns(".done"))
    return dest


def _chat(lib: Library, spec: Spec, rng: random.Random) -> None:
    chat = lib.chat
    conn = chat.conn
    cols = chat.cols
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO handle (ROWID, id, service, country, person_centric_id) VALUES (?, ?, ?, ?, ?)",
                     [(i + 1, phone(i), "iMessage", "us", None) for i in range(spec.handles)])
    # one 1:1 chat per handle (chat ROWID = handle ROWID), then the group chats
    chats = [(i + 1, f"iMessage;-;{phone(i)}", 45, 3, phone(i), "iMessage", None) for i in range(spec.handles)]
    members = []
    for i in range(spec.handles):
        members.append((i + 1, i + 1))
    groups = []
    for g in range(spec.groups):
        cid = spec.handles + g + 1
        ident = f"chat{cid:018d}"
        chats.append((cid, f"any;+;{uuid.UUID(int=rng.getrandbits(128)).hex}", 43, 3, ident, "iMessage", ident))
        people = rng.sample(range(1, spec.handles + 1), rng.randint(3, 6))
        groups.append((cid, people))
        members += [(cid, h) for h in people]
    conn.executemany("INSERT INTO chat (ROWID, guid, style, state, chat_identifier, service_name, room_name) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", chats)
    conn.executemany("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?, ?)", members)

    step_ns = 20 * 10**9
    n = spec.messages
    base = to_apple(ago(days=1), "ns") - n * step_ns
    base -= base % 10**9
    names = ["ROWID", "guid", "text", "handle_id", "service", "account", "date", "date_read", "date_delivered",
             "is_delivered", "is_finished", "is_from_me", "is_read", "is_sent", "item_type",
             "associated_message_type", "error", "is_system_message"]
    names = [c for c in names if c in cols["message"] or c == "ROWID"]
    sql = f"INSERT INTO message ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    join_sql = "INSERT INTO chat_message_join (chat_id, message_id, message_date) VALUES (?, ?, ?)"
    chunk = 50_000
    getrand = rng.random
    for start in range(0, n, chunk):
        rows, joins = [], []
        for r in range(start, min(n, start + chunk)):
            rowid = r + 1
            date = base + r * step_ns
            from_me = int(getrand() < 0.45)
            if getrand() < spec.group_share and groups:
                cid, people = groups[r % len(groups)]
                handle = 0 if from_me else people[r % len(people)]
            else:
                cid = handle = (r * 7919) % spec.handles + 1
            values = {"ROWID": rowid, "guid": f"{uuid.UUID(int=rng.getrandbits(128))}".upper(), "text": "x",
                      "handle_id": handle, "service": "iMessage", "account": "E:me@example.com", "date": date,
                      "date_read": 0, "date_delivered": 0, "is_delivered": 1, "is_finished": 1,
                      "is_from_me": from_me, "is_read": 1 - from_me, "is_sent": from_me, "item_type": 0,
                      "associated_message_type": 0, "error": 0, "is_system_message": 0}
            rows.append(tuple(values[c] for c in names))
            joins.append((cid, rowid, date))
        conn.executemany(sql, rows)
        conn.executemany(join_sql, joins)
    conn.execute("COMMIT")


def _calls(lib: Library, spec: Spec, rng: random.Random) -> None:
    db = lib.calls
    conn = db.conn
    n = spec.calls
    if not n:
        return
    ent = db.entities["CallRecord"]
    step = 400.0
    base = time.time() - 978_307_200 - 86_400 - n * step
    base = float(int(base))
    names = [c for c in ("Z_PK", "Z_ENT", "Z_OPT", "ZANSWERED", "ZCALL_CATEGORY", "ZCALLTYPE", "ZDISCONNECTED_CAUSE",
                         "ZFILTERED_OUT_REASON", "ZHANDLE_TYPE", "ZJUNKCONFIDENCE", "ZNUMBER_AVAILABILITY",
                         "ZORIGINATED", "ZREAD", "ZVERIFICATIONSTATUS", "ZDATE", "ZDURATION", "ZISO_COUNTRY_CODE",
                         "ZSERVICE_PROVIDER", "ZUNIQUE_ID", "ZADDRESS") if c in db.record_columns]
    rows = []
    for i in range(n):
        originated = int(rng.random() < 0.4)
        answered = int(rng.random() < 0.7)
        v = {"Z_PK": i + 1, "Z_ENT": ent, "Z_OPT": 1, "ZANSWERED": answered, "ZCALL_CATEGORY": 1, "ZCALLTYPE": 1,
             "ZDISCONNECTED_CAUSE": 0, "ZFILTERED_OUT_REASON": 0, "ZHANDLE_TYPE": 2, "ZJUNKCONFIDENCE": 0,
             "ZNUMBER_AVAILABILITY": 0, "ZORIGINATED": originated, "ZREAD": 1, "ZVERIFICATIONSTATUS": 0,
             "ZDATE": base + i * step, "ZDURATION": float(rng.randint(0, 900)) if answered or originated else 0.0,
             "ZISO_COUNTRY_CODE": "us", "ZSERVICE_PROVIDER": "com.apple.Telephony",
             "ZUNIQUE_ID": f"{uuid.UUID(int=rng.getrandbits(128))}".upper(),
             "ZADDRESS": phone((i * 104729) % spec.handles)}
        rows.append(tuple(v[c] for c in names))
    with conn:
        conn.executemany(f"INSERT INTO ZCALLRECORD ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", rows)
        conn.execute("UPDATE Z_PRIMARYKEY SET Z_MAX = ? WHERE Z_ENT = ?", (n + 1, ent))


def _cards(lib: Library, spec: Spec, rng: random.Random) -> None:
    """Cards over the three stores; card i holds handle i's number (formatted variously)."""
    books = lib.books
    for i in range(spec.cards):
        digits = phone(i % max(spec.handles, 1))[2:]
        shown = rng.choice([f"+1 {digits[:3]} {digits[3:6]} {digits[6:]}", f"({digits[:3]}) {digits[3:6]}-{digits[6:]}",
                            f"+1{digits}"])
        book = books[i % len(books)]
        book.card(first=f"First{i}", last=f"Last{i}", phones=[(shown, "Mobile")],
                  emails=[f"person{i}@example.com"] if i % 3 == 0 else [])
    for book in books:
        book.commit()
