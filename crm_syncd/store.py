"""crm-syncd's own state, in one SQLite database (WAL).

- `marks`: per-source high-water marks (chat.db ROWID, CallHistory Z_PK), the file identity
  they were taken against, and the anchor: the own id (guid, ZUNIQUE_ID) of the row at the mark,
  which tells a rebuilt file that reuses the inode and the ROWID from the one the mark was taken in;
  and, until a first sync's pass is complete, its lookback window (rows above the mark obey it too,
  up to the last row a pass held by a send under way read: those that came later are new history).
- `outbox`: every interaction ever extracted. It moves pending → sending → delivered (with the
  CRM id) or failed (with the reason); `held` waits for a contact. Delivered rows are the
  ledger: a unique `key` and a unique fingerprint (counterpart, type, and `occurred_ms`: a text's
  exact time, a call's second) are what make a second delivery impossible.
- `handles`: the identity map, normalised address → CRM contact id. An item takes its contact
  from it when extracted, or, if its address had none yet, at the next `attach`.
- `contacts`: the CRM contacts crm-syncd knows, where they came from, what it last wrote (as the CRM
  then held it), the card's fields as last applied and those the CRM refused, the cards they were made
  or kept for, when the CRM made them, and whether (and since when) sends to them are
  looked up first.
- `sources`: AddressBook file signatures, so an unchanged store is not re-read.
- `kv`: heartbeat, last error and other small facts `status` reads without the daemon.

Extraction writes the outbox rows and the advanced mark in one transaction, so a crash can
neither skip nor repeat a source row.

Durability. Transactions are fsynced on commit (synchronous=FULL), except extraction's
(`enqueue`, synchronous=NORMAL): in WAL mode such a commit is still atomic, but a power cut may
undo it. That is harmless: its outbox rows and its mark are a pure function of Apple's database
and go together, so the rows are extracted again. Every later FULL commit syncs the WAL up to
itself, earlier NORMAL frames included; `claim` is FULL, so an item is durably in the outbox
before it is durably `sending`, and durably `sending` before its request leaves.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

from crm_syncd.settings import DISK_ERRNOS, file_refusal, folder_refusal, secure_dir, secure_file

SCHEMA_VERSION = 12
APPLICATION_ID = 0x43524D53  # "CRMS": tells our database from any other SQLite file

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE marks (
        source TEXT PRIMARY KEY,
        rowid INTEGER NOT NULL,
        file_id TEXT,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        fingerprint TEXT NOT NULL UNIQUE,
        address TEXT NOT NULL,
        type TEXT NOT NULL,
        occurred_ms INTEGER NOT NULL,
        duration_s INTEGER,
        state TEXT NOT NULL DEFAULT 'pending',
        contact_id INTEGER,
        crm_id INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        reason TEXT,
        updated_ms INTEGER
    );
    CREATE INDEX outbox_open ON outbox(state, id) WHERE state != 'delivered';
    CREATE INDEX outbox_contact ON outbox(contact_id, occurred_ms);
    CREATE TABLE handles (
        address TEXT PRIMARY KEY,
        contact_id INTEGER NOT NULL,
        origin TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX handles_contact ON handles(contact_id);
    CREATE TABLE hints (
        address TEXT PRIMARY KEY,
        person TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE contacts (
        contact_id INTEGER PRIMARY KEY,
        origin TEXT NOT NULL,
        person_key TEXT,
        written TEXT,
        dedupe INTEGER,
        updated_ms INTEGER
    );
    CREATE INDEX contacts_person ON contacts(person_key);
    CREATE TABLE sources (
        path TEXT PRIMARY KEY,
        signature TEXT NOT NULL
    );
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    2: """
    CREATE INDEX outbox_waiting ON outbox(address) WHERE state IN ('pending', 'held');
    """,
    # Leaner outbox writes, and an index for every query. The fingerprint is an expression index, led
    # by the second so a backfill appends to it, instead of a stored text column. Partial indexes hold
    # only the rows their queries ask for (SQLite uses one only when the query's WHERE implies the
    # index's, hence `state = 'a' OR state = 'b'` on both sides): a freshly extracted item without a
    # contact is in the key, fingerprint and waiting indexes only. Marks get their anchor.
    3: """
    ALTER TABLE marks ADD COLUMN anchor TEXT;
    CREATE TABLE outbox_v3 (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        address TEXT NOT NULL,
        type TEXT NOT NULL,
        occurred_ms INTEGER NOT NULL,
        duration_s INTEGER,
        state TEXT NOT NULL DEFAULT 'pending',
        contact_id INTEGER,
        crm_id INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        reason TEXT,
        updated_ms INTEGER
    );
    INSERT INTO outbox_v3 (id, key, address, type, occurred_ms, duration_s, state, contact_id, crm_id,
                           attempts, reason, updated_ms)
        SELECT id, key, address, type, occurred_ms, duration_s, state, contact_id, crm_id,
               attempts, reason, updated_ms FROM outbox;
    DROP TABLE outbox;
    ALTER TABLE outbox_v3 RENAME TO outbox;
    CREATE UNIQUE INDEX outbox_key ON outbox(key);
    CREATE UNIQUE INDEX outbox_fingerprint ON outbox(occurred_ms / 1000, address, type);
    CREATE INDEX outbox_waiting ON outbox(state, address) WHERE state = 'pending' OR state = 'held';
    CREATE INDEX outbox_ready ON outbox(state, id) WHERE state = 'pending' AND contact_id IS NOT NULL;
    CREATE INDEX outbox_sent_or_failed ON outbox(state, id) WHERE state = 'sending' OR state = 'failed';
    CREATE INDEX outbox_contact ON outbox(contact_id, occurred_ms) WHERE contact_id IS NOT NULL;
    """,
    # A backfill only appends. Every index an extracted row enters is led by something that grows with
    # it (its time or its id), so a batch writes a few index pages, not one per row: the key is unique
    # with its time (a row's time never changes), items waiting for a contact are found by id, not
    # address (`attach` gives them their contact in one pass), and contacts are indexed by the ledger.
    # (contact_id, always NULL in outbox_unresolved, makes it a covering index for SQLite.)
    4: """
    DROP INDEX outbox_key;
    CREATE UNIQUE INDEX outbox_key ON outbox(occurred_ms, key);
    DROP INDEX outbox_waiting;
    CREATE INDEX outbox_unresolved ON outbox(state, id, address, contact_id)
        WHERE (state = 'pending' OR state = 'held') AND contact_id IS NULL;
    DROP INDEX outbox_contact;
    CREATE INDEX outbox_ledger ON outbox(contact_id, crm_id) WHERE crm_id IS NOT NULL;
    """,
    # A first sync that stops part-way (a send under way, a crash) keeps its lookback window in its
    # mark, so the next pass resumes from there instead of making the whole first sync again.
    5: """
    ALTER TABLE marks ADD COLUMN window_ms INTEGER;
    """,
    # When a contact's dedupe flag was decided: "no need to check" is decided again after a while,
    # since the owner's other Mac may begin delivering to the contact at any time.
    6: """
    ALTER TABLE contacts ADD COLUMN dedupe_ms INTEGER;
    """,
    # The unique ids of the cards a contact was made or kept for: a person whose smallest unique id
    # changes (a card added, linked or deleted) is known by the cards they still have.
    7: """
    ALTER TABLE contacts ADD COLUMN cards TEXT;
    """,
    # A message's fingerprint keeps its whole time (Messages dates are exact, and a re-downloaded copy
    # keeps its original one): two texts one person sent within a second (a photo and its caption) are
    # two interactions. A call's stays to the second. The texts an earlier version took for duplicates of
    # one in the same second lie behind the mark: the next messages extraction reads once more over the
    # lookback window (REREAD), where they are new and rows already in the outbox are ignored.
    8: """
    DROP INDEX outbox_fingerprint;
    CREATE UNIQUE INDEX outbox_fingerprint
        ON outbox(occurred_ms / (CASE WHEN type IN ('TEXT_INBOUND', 'TEXT_OUTBOUND') THEN 1 ELSE 1000 END),
                  address, type);
    INSERT OR REPLACE INTO kv (key, value) VALUES ('reread', '["messages"]');
    """,
    # When the CRM made each contact crm-syncd knows: an id the CRM hands out again (restored from a
    # backup, another CRM at the same address) belongs to another contact, never to the one remembered.
    9: """
    ALTER TABLE contacts ADD COLUMN created_at TEXT;
    """,
    # What a contact crm-syncd writes holds and what its card says are two things: a promoted placeholder
    # keeps the number a card without one cannot replace and the notes the owner wrote in it, and a field
    # the CRM refuses is left out. `written` (what the CRM holds after crm-syncd's write) tells the owner's
    # edits in the CRM; `card` (the card's fields as last applied) tells the card's edits; `left_out` names
    # the card's fields the CRM refused, with its reasons, until the card changes them. A row without a
    # `card` was written when the two were one: its card is what it wrote.
    10: """
    ALTER TABLE contacts ADD COLUMN card TEXT;
    ALTER TABLE contacts ADD COLUMN left_out TEXT;
    """,
    # Numbers earlier versions skipped as invalid are people now: a Mexican number written with a prefix
    # dropped in 2019, a number in international form whose length phonenumbers does not know. Their texts
    # and calls lie behind the marks: both sources are read once more over the lookback window (REREAD).
    11: """
    INSERT OR REPLACE INTO kv (key, value) VALUES ('reread', '["messages", "calls"]');
    """,
    # A first sync that read every row but waits for a send keeps its lookback window only for the rows it
    # read: the mark names the last one. Rows that come after it (an old conversation iCloud delivers late)
    # are new history, read whatever their date. A mark without it (a pass stopped part-way, or one an
    # earlier version held) keeps the window for every row above it until a pass reads to the end.
    12: """
    ALTER TABLE marks ADD COLUMN window_until INTEGER;
    """,
}
REREAD = "reread"  # kv: sources whose rows behind the mark are read once more over the lookback window
INSTANCE, GENERATION = "instance", "generation"  # kv: this state's id, and how many passes wrote to the CRM
LOOK_FIRST = "look_before_sending"  # kv: after a discontinuity, every item is looked for in the CRM first
# (the sources still to be read to their end; [] once all were, until nothing waits; None: off)
REBUILD = "rebuild_contacts"  # kv: the next contacts pass finds crm-syncd's own contacts again (a lost state)
UNRESOLVED = "(state = 'pending' OR state = 'held') AND contact_id IS NULL"  # as outbox_unresolved's WHERE
UNKNOWN_OUTCOME = "cannot tell whether it reached the CRM"  # a failed item's reason when it may be there
SCREENED = "screened call (blocked or silenced) from a number without a contact"  # held; makes no placeholder
ATTACH_ROWS = 20_000  # items given their contact per transaction
CACHE_KIB = 16_384  # page cache: a backfill's index pages stay in memory between its batches
WAL_PAGES = 8_192  # checkpoint every ~32 MiB of WAL, not every 4: a backfill rewrites the same index pages
ENQUEUE_ROWS = 100  # items per INSERT (501 variables: under the 999 that SQLite before 3.32 allows)
ASKED_ROWS = 400  # (key, time) pairs per `keys_continued` statement (800 variables)


@functools.cache
def _enqueue_sql(rows: int) -> str:
    """One INSERT of `rows` new items, given as VALUES in their order, each with its contact if known.

    Measured on 1M items against an executemany into a staging table moved by one INSERT ... SELECT
    (itself 25-45 % cheaper than an INSERT per item): about a third less CPU (bench/README.md).
    """
    values = ", ".join(["(?, ?, ?, ?, ?)"] * rows)
    return ("INSERT OR IGNORE INTO outbox (key, address, type, occurred_ms, duration_s, contact_id, updated_ms) "
            "SELECT column1, column2, column3, column4, column5, "
            "(SELECT contact_id FROM handles h WHERE h.address = v.column2), ? "
            f"FROM (VALUES {values}) v")


def _put_hints(conn: sqlite3.Connection, hints: dict[str, str]) -> bool:
    """Note Apple's grouping of addresses; whether it changed (rows already as noted are not written)."""
    before = conn.total_changes
    conn.executemany("INSERT INTO hints (address, person) VALUES (?, ?) ON CONFLICT(address) "
                     "DO UPDATE SET person = excluded.person WHERE person != excluded.person", hints.items())
    return conn.total_changes != before


class StoreError(Exception):
    """The state database cannot be used as it is; the message says why and what to do."""


def _check(conn: sqlite3.Connection) -> None:
    """Raise if the database is damaged: quick_check reports damage within pages as a row, not an error."""
    verdict = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
    if verdict != "ok":
        raise sqlite3.DatabaseError(" ".join(verdict.split()))


def _disk_failed(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the disk refused a write or a read (full, over a size limit, failing)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR")


def _no_disk(path: Path | str | None, exc: sqlite3.Error | OSError) -> StoreError:
    folder = Path(path).parent if path not in (None, ":memory:") else "it"
    return StoreError(f"cannot write the state database {path}: the disk is full or failing ({exc}); free space "
                      f"on the disk holding {folder}. Nothing is lost: crm-syncd goes on from where it stopped")


def _damaged(path: Path | str, exc: sqlite3.DatabaseError) -> StoreError:
    return StoreError(f"the state database {path} is damaged ({exc}); crm-syncd will not reset it by itself. "
                      f"Move it aside and run `crm-syncd sync --reconcile` to rebuild it against the CRM.")


def db_files(path: Path) -> tuple[Path, Path, Path]:
    """The state database at `path` and the files SQLite keeps beside it (made even to read it)."""
    return path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _no_access(path: Path, reason: str) -> StoreError:
    """The state database, a file SQLite keeps beside it, or its folder is not the owner's to write: a
    `sudo crm-syncd` made it root's, a restore lost its mode, a read-only volume. The words name which."""
    head = f"cannot open the state database {path} ({reason})"
    tail = "Nothing is lost: crm-syncd goes on from where it stopped"
    for file in db_files(path):
        if refusal := file_refusal(file, path):
            return StoreError(f"{head}: {'; '.join(refusal)}. {tail}")
    folder = path.parent
    if refusal := folder_refusal(folder):
        where = ("SQLite makes the database's -wal and -shm files beside it even to read it, and "
                 if os.access(folder, os.X_OK) else "")
        return StoreError(f"{head}: {where}{refusal}. {tail}")
    return StoreError(f"{head}: crm-syncd must be able to read and write it and create files in {folder}. {tail}")


def state_exists(path: Path) -> bool:
    """Whether the state database at `path` exists (for the commands that only read it: `status`, `sync
    --dry-run`); a StoreError with the fix when its folder is not the owner's to enter."""
    try:
        return path.exists()
    except OSError as exc:
        raise _refused(path, exc) from exc


def _refused(path: Path | str, exc: sqlite3.Error | OSError) -> StoreError:
    """Why the state database at `path` cannot be opened or read, in the owner's words: a full or failing
    disk, a file or folder the owner may not write (SQLite makes its -wal and -shm files beside the
    database even to read it), or else damage. Only damage gets the advice to move the file aside: on
    a healthy database that would throw away the ledger and the marks."""
    if isinstance(exc, OSError):
        if exc.errno in DISK_ERRNOS:
            return _no_disk(path, exc)
        return _no_access(Path(path), exc.strerror or str(exc))
    if _disk_failed(exc):
        return _no_disk(path, exc)
    if (getattr(exc, "sqlite_errorname", None) or "").startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN",
                                                                   "SQLITE_PERM")):
        return _no_access(Path(path), str(exc))
    return _damaged(path, exc)


class Item(NamedTuple):
    """An outbox row on its way to the CRM."""

    id: int
    key: str
    address: str
    type: str
    occurred_ms: int
    duration_s: int | None
    contact_id: int | None
    attempts: int


class NewItem(NamedTuple):
    """An extracted interaction; its fingerprint is (address, type, occurred_ms: a call's to the second)."""

    key: str
    address: str
    type: str
    occurred_ms: int
    duration_s: int | None


class Mark(NamedTuple):
    """How far extraction from a source got: a source row, the file it was in, and its anchor."""

    rowid: int
    file_id: str | None
    anchor: str | None = None
    window_ms: int | None = None  # an unfinished lookback pass's window: rows above the mark obey it too
    window_until: int | None = None  # ... up to this row, the last that pass read (None: every row)


@dataclass
class Enqueued:
    added: int = 0
    duplicates: int = 0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Store:
    """Thread-safe access to the state database (one connection, one lock)."""

    def __init__(self, path: Path | str, *, migrate: bool = True, reading: bool = False) -> None:
        self.path = Path(path) if path != ":memory:" else None
        self.in_memory = path == ":memory:"  # a dry run's copy too (which names its file): leaves no trace
        self._lock = threading.RLock()
        self._conn = self._open(path, reading=reading)
        self._unattached = True  # a mapping may have been made just before the last process stopped
        self._regrouped = False  # Messages' grouping of addresses changed since `regrouped` was last asked
        if migrate:
            self._migrate()

    # -- opening and migrating -------------------------------------------------------------

    def _open(self, path: Path | str, *, reading: bool = False) -> sqlite3.Connection:
        """A connection to the database at `path`; `reading` (for `status`) neither makes the file nor
        changes its mode, so a file the owner may not write is still read (SQLite opens it read-only)."""
        target = str(path)
        if path != ":memory:":
            path = Path(path)
            try:
                if reading:
                    target = path.absolute().as_uri() + "?mode=rw"
                else:
                    secure_dir(path.parent)
                    secure_file(path)  # SQLite gives the -wal and -shm files the database's mode
            except OSError as exc:  # a `sudo crm-syncd` made it root's, a restore lost its mode, a full disk
                raise _refused(path, exc) from exc
        try:
            conn = sqlite3.connect(target, uri=reading, isolation_level=None, check_same_thread=False, timeout=10)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            conn.execute("PRAGMA foreign_keys=OFF")
            _check(conn)
        except sqlite3.DatabaseError as exc:
            raise _refused(path, exc) from exc
        return conn

    @contextmanager
    def _disk(self) -> Iterator[None]:
        """Turn SQLite's word for a full or failing disk into a StoreError that names the fix."""
        try:
            yield
        except sqlite3.Error as exc:
            if _disk_failed(exc):
                raise _no_disk(self.path, exc) from exc
            raise

    def _migrate(self) -> None:
        for target in range(self.checked_version() + 1, SCHEMA_VERSION + 1):
            with self.transaction() as tx:
                tx.executescript_in_tx(MIGRATIONS[target])
                tx.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                tx.execute(f"PRAGMA user_version = {target}")

    def checked_version(self) -> int:
        """The schema version; refuses a file that is not crm-syncd's or comes from a newer crm-syncd."""
        conn = self._conn
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if has_tables and app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is not a crm-syncd state database; refusing to touch it.")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the state database {self.path} is from a newer crm-syncd (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); upgrade crm-syncd instead of downgrading."
            )
        return version

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @classmethod
    def copy_in_memory(cls, path: Path) -> Store:
        """An in-memory copy of the state database at `path`, migrated there: the file is only read
        (for --dry-run: everything runs, nothing persists, not even a migration)."""
        copy = cls(":memory:", migrate=False)
        copy.path = Path(path)  # named in errors
        try:
            source = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True, timeout=10)
            try:
                source.backup(copy._conn)
            finally:
                source.close()
            _check(copy._conn)
        except sqlite3.DatabaseError as exc:
            raise _refused(path, exc) from exc
        copy._migrate()
        return copy

    @classmethod
    def for_reading(cls, path: Path) -> Store:
        """The state database at `path` to read, never migrated in place (the crm-syncd that holds the
        lock, perhaps an older one still running, migrates it): as it is when current, else a copy
        migrated in memory."""
        store = cls(path, migrate=False, reading=True)
        try:
            current = store.checked_version() == SCHEMA_VERSION
        except BaseException:
            store.close()
            raise
        if current:
            return store
        store.close()
        return cls.copy_in_memory(path)

    @classmethod
    def memory(cls) -> Store:
        return cls(":memory:")

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[_Tx]:
        """One write transaction; `durable=False` skips the fsync (see the module docstring)."""
        with self._lock, self._disk():
            if not durable:  # per connection, and only outside a transaction
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield _Tx(self._conn)
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:  # not when SQLite rolled back itself (a full disk, an I/O error)
                        self._conn.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock, self._disk():
            return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._lock, self._disk():
            row = self._conn.execute(sql, params).fetchone()
        return row[0] if row else None

    # -- marks -----------------------------------------------------------------------------

    def mark(self, source: str) -> Mark | None:
        """Where the last extraction from `source` stopped, or None before the first."""
        with self._lock:
            row = self._conn.execute("SELECT rowid, file_id, anchor, window_ms, window_until FROM marks "
                                     "WHERE source = ?", (source,)).fetchone()
        return Mark(*row) if row else None

    def mark_details(self, source: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT rowid, file_id, updated_ms FROM marks WHERE source = ?",
                                     (source,)).fetchone()
        return {"rowid": row[0], "file_id": row[1], "updated_ms": row[2]} if row else None

    def enqueue(self, source: str, items: Sequence[NewItem], mark: Mark,
                hints: dict[str, str] | None = None, screened: Sequence[tuple[str, int]] = ()) -> Enqueued:
        """Add extracted items (ignoring any whose key or fingerprint is known) and move the mark. Items
        of `screened` (key, occurred_ms) that no contact claims are held (SCREENED) instead of pending.

        Not fsynced: a power cut may undo both, and the rows are then extracted again.
        """
        stamp = now_ms()
        with self.transaction(durable=False) as tx:
            before = tx.conn.total_changes
            for start in range(0, len(items), ENQUEUE_ROWS):
                chunk = items[start:start + ENQUEUE_ROWS]
                tx.execute(_enqueue_sql(len(chunk)), (stamp, *chain.from_iterable(chunk)))
            added = tx.conn.total_changes - before
            if screened:
                tx.conn.executemany("UPDATE outbox SET state = 'held', reason = ? WHERE occurred_ms = ? AND key = ? "
                                    "AND state = 'pending' AND contact_id IS NULL",
                                    [(SCREENED, at, key) for key, at in screened])
            if hints and _put_hints(tx.conn, hints):
                self._regrouped = True
            tx.execute(
                "INSERT INTO marks (source, rowid, file_id, anchor, window_ms, window_until, updated_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(source) DO UPDATE SET rowid = excluded.rowid, file_id = excluded.file_id, "
                "anchor = excluded.anchor, window_ms = excluded.window_ms, window_until = excluded.window_until, "
                "updated_ms = excluded.updated_ms",
                (source, *mark, stamp),
            )
        return Enqueued(added, len(items) - added)

    def keys_continued(self, keys: Sequence[tuple[str, int]]) -> set[str]:
        """Of (key, occurred_ms) pairs, the keys that some item's key continues (`<key>:...`, its time):
        one statement per ASKED_ROWS pairs, each pair a seek in outbox_key."""
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(keys), ASKED_ROWS):
                chunk = keys[start:start + ASKED_ROWS]
                sql = (f"WITH asked(key, at) AS (VALUES {','.join(['(?, ?)'] * len(chunk))}) "
                       "SELECT key FROM asked WHERE EXISTS (SELECT 1 FROM outbox o WHERE o.occurred_ms = asked.at "
                       "AND o.key > asked.key || ':' AND o.key < asked.key || ';')")
                found.update(key for (key,) in self._conn.execute(sql, tuple(chain.from_iterable(chunk))))
        return found

    # -- identity map ----------------------------------------------------------------------

    def contact_for(self, address: str) -> int | None:
        return self._one("SELECT contact_id FROM handles WHERE address = ?", (address,))

    def map_addresses(self, addresses: Iterable[str], contact_id: int, origin: str, *, replace: bool = True) -> None:
        """Point addresses at a contact; their waiting items get it at the next `attach`."""
        self.map_each(((a, contact_id) for a in addresses), origin, replace=replace)

    def addresses_of(self, origin: str | None = None) -> dict[str, int]:
        """{address: contact} of every address mapped with this origin (`placeholder`: the handles each
        placeholder was made for, a number and the email Messages grouped with it alike), or with any."""
        if origin is None:
            return dict(self._all("SELECT address, contact_id FROM handles"))
        return dict(self._all("SELECT address, contact_id FROM handles WHERE origin = ?", (origin,)))

    def map_each(self, pairs: Iterable[tuple[str, int]], origin: str, *, replace: bool = True) -> None:
        """Point each address at its contact, in one transaction (`replace=False`: unmapped ones only).

        Mappings already in place are not written again: a contacts sync re-maps every address
        of the address book, and a transaction that writes nothing costs no fsync.
        """
        update = ("DO UPDATE SET contact_id = excluded.contact_id, origin = excluded.origin "
                  "WHERE contact_id != excluded.contact_id OR origin != excluded.origin") if replace else "DO NOTHING"
        with self.transaction() as tx:
            before = tx.conn.total_changes
            tx.conn.executemany(f"INSERT INTO handles (address, contact_id, origin) VALUES (?, ?, ?) "
                                f"ON CONFLICT(address) {update}", [(a, c, origin) for a, c in pairs])
            changed = tx.conn.total_changes != before
        if changed:
            self._unattached = True

    def attach(self) -> int:
        """Give items waiting for a contact the one their address now has (held ones become pending).

        One pass over the waiting items in id order, ATTACH_ROWS per transaction, and none at all
        unless an address was mapped since the last pass: mapping is per person or address, this
        is once per batch of them. `claim` and `unresolved_addresses` attach first. Returns the
        items attached.
        """
        if not self._unattached:
            return 0
        self._unattached = False  # first: a mapping made during the pass asks for another
        try:
            return self._attach_pass()
        except BaseException:
            self._unattached = True  # the pass did not finish (a lock, a full disk): the next call makes it
            raise

    def _attach_pass(self) -> int:
        attached = 0
        for state in ("pending", "held"):  # one state at a time walks the index in id order, unsorted
            after = 0
            while True:
                with self.transaction() as tx:
                    ids = [r[0] for r in tx.execute(
                        "UPDATE outbox SET contact_id = (SELECT contact_id FROM handles WHERE address = outbox.address), "
                        "state = 'pending', reason = NULL WHERE id IN ("
                        "SELECT id FROM outbox WHERE state = ? AND contact_id IS NULL AND id > ? "
                        "AND address IN (SELECT address FROM handles) ORDER BY id LIMIT ?) RETURNING id",
                        (state, after, ATTACH_ROWS))]
                attached += len(ids)
                if len(ids) < ATTACH_ROWS:
                    break
                after = max(ids)
        return attached

    def handles(self) -> dict[str, int]:
        return dict(self._all("SELECT address, contact_id FROM handles"))

    def on_cards(self, addresses: Iterable[str]) -> set[str]:
        """Those of the addresses a card holds (as the last contacts pass mapped them)."""
        addresses = list(addresses)
        if not addresses:
            return set()
        return {r[0] for r in self._all(f"SELECT address FROM handles WHERE origin = 'card' AND address IN "
                                        f"({', '.join('?' * len(addresses))})", tuple(addresses))}

    def remember_hints(self, hints: dict[str, str]) -> None:
        """{address: Apple's person} for addresses it takes for one person with others."""
        with self.transaction() as tx:
            if _put_hints(tx.conn, hints):
                self._regrouped = True

    def hint(self, address: str) -> str | None:
        return self._one("SELECT person FROM hints WHERE address = ?", (address,))

    def addresses_with_hint(self, person: str) -> list[str]:
        return [r[0] for r in self._all("SELECT address FROM hints WHERE person = ?", (person,))]

    def regrouped(self) -> bool:
        """Whether Messages' grouping changed since last asked so that a handle not mapped for a card (a
        placeholder's, whether made here or found again by a listing) is now grouped with one a card holds,
        mapped to another contact: a contacts pass folds such a placeholder into that card's contact
        (`ContactsSync._grouped_placeholders`). Asking clears it."""
        if not self._regrouped:
            return False
        self._regrouped = False
        return self._one(
            "SELECT 1 FROM handles p JOIN hints hp ON hp.address = p.address "
            "JOIN hints hc ON hc.person = hp.person AND hc.address != hp.address "
            "JOIN handles c ON c.address = hc.address "
            "WHERE p.origin != 'card' AND c.origin = 'card' AND c.contact_id != p.contact_id LIMIT 1") is not None

    def regroup_again(self) -> None:
        """`regrouped` says so again (the contacts pass it called for did not run through)."""
        self._regrouped = True

    def hints(self) -> dict[str, str]:
        """Every {address: Apple's person} `remember_hints` noted."""
        return dict(self._all("SELECT address, person FROM hints"))

    def remember_contact(self, contact_id: int, origin: str, person_key: str | None = None,
                         written: dict | None = None, cards: Iterable[str] | None = None,
                         created_at: str | None = None, card: dict | None = None,
                         left_out: Mapping[str, str] | None = None) -> None:
        """Record a contact. `written`: its fields as the CRM holds them after crm-syncd's write (what an
        edit of the owner's differs from); `card`: the card's fields that write applied (what the card's
        next edit differs from); `left_out`: {field: the CRM's reason} of the card's fields it refused
        (an empty one clears them). None leaves what was recorded."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO contacts (contact_id, origin, person_key, written, cards, created_at, card, left_out, "
                "updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(contact_id) DO UPDATE SET origin = excluded.origin, "
                "person_key = COALESCE(excluded.person_key, contacts.person_key), "
                "written = COALESCE(excluded.written, contacts.written), "
                "cards = COALESCE(excluded.cards, contacts.cards), "
                "created_at = COALESCE(excluded.created_at, contacts.created_at), "
                "card = COALESCE(excluded.card, contacts.card), "
                "left_out = COALESCE(excluded.left_out, contacts.left_out), updated_ms = excluded.updated_ms",
                (contact_id, origin, person_key, json.dumps(written, sort_keys=True) if written else None,
                 json.dumps(sorted(cards)) if cards is not None else None, created_at,
                 json.dumps(card, sort_keys=True) if card else None,
                 json.dumps(dict(left_out), sort_keys=True) if left_out is not None else None, now_ms()),
            )

    def known_contact(self, contact_id: int) -> tuple[str, str | None, dict | None] | None:
        """(origin, person key, fields last written) of a contact crm-syncd knows."""
        with self._lock:
            row = self._conn.execute(
                "SELECT origin, person_key, written FROM contacts WHERE contact_id = ?", (contact_id,)).fetchone()
        return (row[0], row[1], json.loads(row[2]) if row[2] else None) if row else None

    def applied_card(self, contact_id: int) -> tuple[dict | None, dict[str, str]]:
        """(the card's fields crm-syncd last applied to a contact, {field: reason} of those the CRM refused).
        None for a contact written before the two were recorded apart (its written fields were its card)."""
        rows = self._all("SELECT card, left_out FROM contacts WHERE contact_id = ?", (contact_id,))
        if not rows:
            return None, {}
        card, left_out = rows[0]
        return (json.loads(card) if card else None), (json.loads(left_out) if left_out else {})

    def retry_left_out(self) -> int:
        """Have the next contacts pass send again every card field the CRM refused (`retry-failed`): each
        is recorded as applied with the value the CRM holds, so the card differs from it again, and the
        address book's signatures are forgotten, so a running daemon's next rescan is such a pass.
        Returns how many fields."""
        count = 0
        with self.transaction() as tx:
            rows = tx.execute("SELECT contact_id, card, written, left_out FROM contacts "
                              "WHERE left_out IS NOT NULL AND left_out != '{}'").fetchall()
            for contact_id, card, written, left_out in rows:
                written_fields = json.loads(written) if written else {}
                applied = json.loads(card or written or "{}")
                refused = json.loads(left_out)
                applied.update({k: written_fields.get(k) for k in refused})
                count += len(refused)
                tx.execute("UPDATE contacts SET card = ?, left_out = NULL WHERE contact_id = ?",
                           (json.dumps(applied, sort_keys=True), contact_id))
            if count:
                tx.execute("DELETE FROM sources")
        return count

    def created_at(self, contact_id: int) -> str | None:
        """When the CRM made this contact, as recorded (`createdAt`), if known."""
        return self._one("SELECT created_at FROM contacts WHERE contact_id = ?", (contact_id,))

    def keep_contact_for(self, contact_id: int, person_key: str, cards: Iterable[str]) -> None:
        """File a contact under the person and cards it is kept for today, so it is theirs whatever their
        card holds next; one the owner made is filed as found (`crm`: never written to, never deleted).
        A transaction that finds it filed already writes nothing, and costs no fsync."""
        listed = json.dumps(sorted(cards))
        with self.transaction() as tx:
            tx.execute("INSERT INTO contacts (contact_id, origin, person_key, cards, updated_ms) VALUES (?, 'crm', ?, ?, ?) "
                       "ON CONFLICT(contact_id) DO UPDATE SET person_key = excluded.person_key, cards = excluded.cards, "
                       "updated_ms = excluded.updated_ms WHERE contacts.origin != 'merging' "
                       "AND (contacts.person_key IS NOT excluded.person_key OR contacts.cards IS NOT excluded.cards)",
                       (contact_id, person_key, listed, now_ms()))

    def contact_cards(self, contact_id: int) -> set[str]:
        """The unique ids of the cards a contact was made or last kept for (its person key, if not recorded)."""
        rows = self._all("SELECT cards, person_key FROM contacts WHERE contact_id = ?", (contact_id,))
        if not rows:
            return set()
        cards, key = rows[0]
        return set(json.loads(cards)) if cards else {key} if key else set()

    def contacts_by_card(self) -> dict[str, set[int]]:
        """{card unique id: the contacts made or last kept for it} (see `contact_cards`), merging ones aside."""
        found: dict[str, set[int]] = {}
        for contact_id, cards, key in self._all("SELECT contact_id, cards, person_key FROM contacts WHERE origin != "
                                                "'merging' AND (cards IS NOT NULL OR person_key IS NOT NULL)"):
            for unique_id in json.loads(cards) if cards else [key]:
                found.setdefault(unique_id, set()).add(contact_id)
        return found

    def card_made_addresses(self) -> dict[str, int]:
        """{address: contact} of the addresses mapped to contacts crm-syncd made for cards."""
        return dict(self._all("SELECT h.address, h.contact_id FROM handles h JOIN contacts c "
                              "ON c.contact_id = h.contact_id WHERE h.origin = 'card' AND c.origin = 'card'"))

    def contact_for_person(self, person_key: str) -> int | None:
        return self._one("SELECT contact_id FROM contacts WHERE person_key = ? ORDER BY contact_id LIMIT 1",
                         (person_key,))

    def begin_merge(self, victim: int, survivor: int) -> None:
        """Durably move a contact's items to the survivor: delivered ones are to be re-created there.

        The victim is marked `merging` so that, after a crash before its deletion, the next
        contact sync deletes it without mistaking the now-unledgered copies for the owner's.
        """
        with self.transaction() as tx:
            for items in ("crm_id IS NOT NULL AND state = 'delivered'", "state = 'sending'", "state = 'pending'"):
                tx.execute(f"UPDATE outbox SET state = 'pending', crm_id = NULL, contact_id = ?, updated_ms = ? "
                           f"WHERE contact_id = ? AND {items}", (survivor, now_ms(), victim))
            tx.execute("UPDATE handles SET contact_id = ? WHERE contact_id = ?", (survivor, victim))
            tx.execute("UPDATE contacts SET origin = 'merging' WHERE contact_id = ?", (victim,))

    def prune_contacts(self, listed: Mapping[int, str | None]) -> list[int]:
        """Forget every contact, mapped or remembered, that the CRM no longer has or made anew, and
        record when the CRM made the ones kept. `listed`: the CRM's contact ids with their `createdAt`.

        An id listed with another creation time than recorded is another contact (a CRM restored from
        a backup, another CRM at the same address): what was known of it would file one person's
        interactions under someone else. Remembered ones go too: a card without addresses has no
        mapping, and its person's stale row would otherwise outrank the contact made again for it.
        """
        known: dict[int, str | None] = {}
        for contact_id, created in self._all("SELECT contact_id, created_at FROM contacts "
                                             "UNION ALL SELECT contact_id, NULL FROM handles"):
            known[contact_id] = known.get(contact_id) or created
        gone = [c for c, created in known.items()
                if c not in listed or (created is not None and listed[c] is not None and created != listed[c])]
        for contact_id in gone:
            self.forget_contact(contact_id)
        self.note_created(listed)
        return gone

    def note_created(self, listed: Mapping[int, str | None]) -> None:
        """Record when the CRM made each contact crm-syncd knows (mapped or remembered) and has no time for,
        from the listing its addresses were just mapped by: a contact found in the CRM is then told from
        another given its id later (a CRM reset on the same address) as one crm-syncd made is."""
        if not (times := [(c, made, now_ms()) for c, made in listed.items() if made is not None]):
            return
        with self.transaction() as tx:  # two index seeks a contact; no write (and no fsync) if none is new
            tx.conn.executemany(
                "INSERT INTO contacts (contact_id, origin, created_at, updated_ms) SELECT ?1, 'crm', ?2, ?3 "
                "WHERE EXISTS (SELECT 1 FROM handles WHERE contact_id = ?1) "
                "OR EXISTS (SELECT 1 FROM contacts WHERE contact_id = ?1) "
                "ON CONFLICT(contact_id) DO UPDATE SET created_at = excluded.created_at WHERE contacts.created_at IS NULL",
                times)

    def dedupe_flag(self, contact_id: int) -> tuple[bool, int] | None:
        """Whether this contact's interactions must be checked in the CRM before creating, and when that
        was decided (None: never; a time of 0: by a version that did not record it)."""
        rows = self._all("SELECT dedupe, dedupe_ms FROM contacts WHERE contact_id = ? AND dedupe IS NOT NULL",
                         (contact_id,))
        return (bool(rows[0][0]), rows[0][1] or 0) if rows else None

    def set_dedupe_flag(self, contact_id: int, flag: bool) -> None:
        with self.transaction() as tx:
            tx.execute("INSERT INTO contacts (contact_id, origin, dedupe, dedupe_ms, updated_ms) VALUES (?, 'crm', ?, ?, ?) "
                       "ON CONFLICT(contact_id) DO UPDATE SET dedupe = excluded.dedupe, dedupe_ms = excluded.dedupe_ms",
                       (contact_id, flag, now_ms(), now_ms()))

    def forget_contact(self, contact_id: int) -> int:
        """Drop a contact that vanished from the CRM; its open items go back to resolution."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM handles WHERE contact_id = ?", (contact_id,))
            tx.execute("DELETE FROM contacts WHERE contact_id = ?", (contact_id,))
            return sum(tx.execute(f"UPDATE outbox SET contact_id = NULL, state = 'pending' "
                                  f"WHERE contact_id = ? AND state = '{state}'", (contact_id,)).rowcount
                       for state in ("pending", "sending"))

    # -- the outbox ------------------------------------------------------------------------

    def unresolved_addresses(self, *, held: bool = False) -> list[str]:
        """Addresses of pending (and, with `held`, held but not SCREENED) items that no contact claims
        yet, sorted."""
        self.attach()
        waiting = f"{UNRESOLVED} AND reason IS NOT ?" if held else "state = 'pending' AND contact_id IS NULL"
        params = (SCREENED,) if held else ()
        return sorted(r[0] for r in self._all(f"SELECT DISTINCT address FROM outbox WHERE {waiting}", params))

    def fail_open(self, addresses: Iterable[str], reason: str) -> None:
        """Park the waiting items of addresses that cannot get a contact (kept for `retry-failed`)."""
        addresses = list(addresses)
        with self.transaction() as tx:
            tx.execute(f"UPDATE outbox SET state = 'failed', reason = ? WHERE {UNRESOLVED} "
                       f"AND address IN ({', '.join('?' * len(addresses))})", (reason, *addresses))

    def hold_unresolved(self, reason: str) -> int:
        """Hold every pending item no contact claims (they wait for the owner's address book)."""
        self.attach()
        with self.transaction() as tx:
            return tx.execute("UPDATE outbox SET state = 'held', reason = ? WHERE state = 'pending' "
                              "AND contact_id IS NULL", (reason,)).rowcount

    def claim(self, limit: int) -> list[Item]:
        """Mark up to `limit` deliverable items as sending (durably) and return them, newest first.

        Newest first: what was extracted last (today's text) goes ahead of a backlog (a first run's
        year of history), which the CRM may take an hour to accept. The order costs nothing else: the
        CRM recomputes a contact's derived dates over all its interactions at each single POST.
        """
        self.attach()
        with self.transaction() as tx:
            rows = tx.execute(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1, updated_ms = ? "
                "WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' AND contact_id IS NOT NULL "
                "ORDER BY id DESC LIMIT ?) "
                "RETURNING id, key, address, type, occurred_ms, duration_s, contact_id, attempts",
                (now_ms(), limit),
            ).fetchall()
        return sorted((Item(*r) for r in rows), key=lambda item: item.id, reverse=True)

    def sending(self) -> list[Item]:
        """Items a previous process may or may not have delivered before it stopped."""
        rows = self._all("SELECT id, key, address, type, occurred_ms, duration_s, contact_id, attempts "
                         "FROM outbox WHERE state = 'sending' ORDER BY id")
        return [Item(*r) for r in rows]

    def last_claim_ms(self) -> int | None:
        """When the newest `sending` item was claimed (its request left then, or just after), or its
        request left, when that was long after (`leaving`)."""
        return self._one("SELECT MAX(updated_ms) FROM outbox WHERE state = 'sending'")

    def leaving(self, items: Sequence[Item]) -> None:
        """These items' requests leave now, long after their claim (held back by a back-off)."""
        with self.transaction() as tx:
            tx.conn.executemany("UPDATE outbox SET updated_ms = ? WHERE id = ? AND state = 'sending'",
                                [(now_ms(), item.id) for item in items])

    def settle(self, delivered: Sequence[tuple[Item, int]] = (), failed: Sequence[tuple[Item, str]] = (),
               retry: Sequence[tuple[Item, str | None]] = ()) -> int:
        """Record outcomes: (item, crm id) delivered, (item, reason) failed, (item, reason) back to pending.

        Only the claim that sent an item can settle it (same `attempts`, still `sending`): an outcome
        that arrives after a merge or a vanished contact moved the item elsewhere is stale and
        ignored. Returns how many outcomes were stale.
        """
        ts = now_ms()
        where = "WHERE id = ? AND state = 'sending' AND attempts = ?"
        with self.transaction() as tx:
            before = tx.conn.total_changes
            tx.conn.executemany(f"UPDATE outbox SET state = 'delivered', crm_id = ?, reason = NULL, updated_ms = ? "
                                f"{where}", [(crm, ts, i.id, i.attempts) for i, crm in delivered])
            tx.conn.executemany(f"UPDATE outbox SET state = 'failed', reason = ?, updated_ms = ? {where}",
                                [(reason, ts, i.id, i.attempts) for i, reason in failed])
            tx.conn.executemany(f"UPDATE outbox SET state = 'pending', reason = ?, updated_ms = ? {where}",
                                [(reason, ts, i.id, i.attempts) for i, reason in retry])
            changed = tx.conn.total_changes - before
        return len(delivered) + len(failed) + len(retry) - changed

    def newest_id(self) -> int:
        """The id of the item extracted last (0 for an empty outbox): items above it came later."""
        return self._one("SELECT MAX(id) FROM outbox") or 0

    def delivered_twin(self, item: Item, row_key: str) -> int | None:
        """The CRM id of another party's item of the same fanned-out row (`<row_key>:...`) delivered to
        the same contact: one interaction (a group text or call listing the person under two addresses)."""
        return self._one("SELECT crm_id FROM outbox WHERE occurred_ms = ? AND key > ? || ':' AND key < ? || ';' "
                         "AND +contact_id = ? AND state = 'delivered' AND id != ? LIMIT 1",
                         (item.occurred_ms, row_key, row_key, item.contact_id, item.id))

    def crm_ids(self, contact_id: int) -> set[int]:
        """CRM interaction ids the ledger already holds for a contact."""
        return {r[0] for r in self._all(
            "SELECT crm_id FROM outbox WHERE contact_id = ? AND crm_id IS NOT NULL", (contact_id,))}

    def retry_failed(self) -> int:
        """Queue failed items again. One whose request may have reached the CRM (`UNKNOWN_OUTCOME`)
        goes back to `sending`, as a crash would leave it: it is looked up before anything is resent
        (and keeps its claim's time, so that look-up does not wait a request timeout again)."""
        with self.transaction() as tx:
            unknown = tx.execute("UPDATE outbox SET state = 'sending', reason = NULL WHERE state = 'failed' "
                                 "AND reason LIKE ? || '%'", (UNKNOWN_OUTCOME,)).rowcount
            return unknown + tx.execute("UPDATE outbox SET state = 'pending', attempts = 0, updated_ms = ? "
                                        "WHERE state = 'failed'", (now_ms(),)).rowcount

    def counts(self) -> dict[str, int]:
        """Items per state, from one snapshot (delivered: all items less the open ones).

        Counting all items reads the whole key index (~0.3 s at 1M rows): for `status`, not a timer.
        """
        counts: dict[str, int] = {}
        for state, n in self._all(  # one partial index each: waiting, ready, sending or failed
                f"SELECT state, count(*) FROM outbox WHERE {UNRESOLVED} GROUP BY state UNION ALL "
                "SELECT state, count(*) FROM outbox WHERE state = 'pending' AND contact_id IS NOT NULL UNION ALL "
                "SELECT state, count(*) FROM outbox WHERE state = 'sending' OR state = 'failed' GROUP BY state UNION ALL "
                "SELECT '', count(*) FROM outbox"):
            if state is not None:  # the ready count's row when none are ready
                counts[state] = counts.get(state, 0) + n
        counts["delivered"] = counts.pop("") - sum(counts.values())
        return counts

    def failed_count(self) -> int:
        """Items parked as failed (an index lookup, cheap at any outbox size)."""
        return self._one("SELECT count(*) FROM outbox WHERE state = 'failed'") or 0

    def failures(self, limit: int = 5) -> list[tuple[str, str, str | None]]:
        """(key, type, reason) of the first failed items."""
        return self._all("SELECT key, type, reason FROM outbox WHERE state = 'failed' ORDER BY id LIMIT ?", (limit,))

    def held_by_reason(self) -> dict[str, int]:
        return dict(self._all("SELECT reason, count(*) FROM outbox WHERE state = 'held' AND contact_id IS NULL "
                              "GROUP BY reason"))

    # -- AddressBook signatures and small facts ---------------------------------------------

    def signatures(self) -> dict[str, str]:
        return dict(self._all("SELECT path, signature FROM sources"))

    def save_signatures(self, signatures: dict[str, str]) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM sources")
            tx.conn.executemany("INSERT INTO sources (path, signature) VALUES (?, ?)", signatures.items())

    def put(self, key: str, value: Any, *, durable: bool = True) -> None:
        with self.transaction(durable=durable) as tx:
            tx.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._one("SELECT value FROM kv WHERE key = ?", (key,))
        return json.loads(raw) if raw is not None else default

    def to_reread(self, source: str) -> bool:
        """Whether `source`'s rows behind its mark are to be read once more over the lookback window (an
        upgrade that made rows an earlier version dropped new again)."""
        return source in self.get(REREAD, [])

    def reread_done(self, source: str) -> None:
        """`source` was read once more (or has no mark: nothing was read, nothing left behind)."""
        self.put(REREAD, [s for s in self.get(REREAD, []) if s != source])

    # -- continuity --------------------------------------------------------------------------
    # The state counts its passes that wrote to the CRM (its generation), in itself and in a stamp file
    # kept apart from it. A state behind its stamp is an older copy of itself: a backup restored over it.

    def discontinuity(self, stamp: Path) -> str | None:
        """None when this state is the one crm-syncd left last time, as `stamp` recorded it; "behind" when
        it is an older copy (a backup restored over it), "unstamped" when it has delivered items and the
        stamp does not know it (an upgrade from before stamps, another Mac, a cleaned cache): either way the
        CRM may hold interactions its ledger lacks. The stamp then records the state as it is; "unwritable"
        when it cannot (then only a state behind a stamp that can still be read is told). An in-memory
        state (a dry run's copy) neither reads nor writes the stamp."""
        if self.in_memory:
            return None
        instance = self.get(INSTANCE)
        if instance is None:
            self.put(INSTANCE, instance := uuid.uuid4().hex)
        generation, recorded = self.get(GENERATION, 0), _read_stamps(stamp).get(instance)
        if recorded is not None:
            found = "behind" if generation < recorded else None
        else:
            delivered = self._one("SELECT 1 FROM outbox WHERE crm_id IS NOT NULL LIMIT 1") is not None
            found = "unstamped" if delivered else None
        if found:
            self.put(GENERATION, generation := max(generation, recorded or 0) + 1)
        if not _write_stamp(stamp, instance, generation) and found != "behind":
            return "unwritable"
        return found

    def advance(self, stamp: Path) -> None:
        """Count a pass that wrote to the CRM, here (durably: one fsync a pass) and then in `stamp`. In that
        order a crash or a power cut between the two leaves the state ahead of its stamp, never behind it
        (which would be taken for a restore)."""
        if self.in_memory:
            return
        generation = self.get(GENERATION, 0) + 1
        self.put(GENERATION, generation)
        _write_stamp(stamp, self.get(INSTANCE), generation)

    def doubt_failed(self) -> int:
        """Failed items may have been retried and delivered since (a restored state): `retry-failed` looks
        each up before it is sent again, as it does those whose outcome is unknown. Returns how many."""
        with self.transaction() as tx:
            return tx.execute("UPDATE outbox SET reason = ? || ' (before the state was restored): ' || "
                              "COALESCE(reason, '') WHERE state = 'failed' AND COALESCE(reason, '') NOT LIKE ? || '%'",
                              (UNKNOWN_OUTCOME, UNKNOWN_OUTCOME)).rowcount

    def waiting_left(self) -> bool:
        """Whether any item waits to be sent, with its contact or for one, or is `sending` (held items, such
        as screened calls, aside: they may wait for ever). One index seek each."""
        return any(self._one(f"SELECT 1 FROM outbox WHERE {where} LIMIT 1") is not None for where in (
            "state = 'pending' AND contact_id IS NOT NULL", f"{UNRESOLVED} AND state = 'pending'",
            "state = 'sending'"))


def _read_stamps(stamp: Path) -> dict[str, int]:
    try:
        stamps = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamp(stamp: Path, instance: str, generation: int) -> bool:
    """Record a state's generation in the stamp file (one per state database it has seen), whole or not
    at all; False if it cannot be written."""
    try:
        secure_dir(stamp.parent)
        stamps = {**_read_stamps(stamp), instance: generation}
        fresh = stamp.with_name(f"{stamp.name}.{os.getpid()}.new")  # another state's process may write too
        secure_file(fresh).write_text(json.dumps(stamps))
        os.replace(fresh, stamp)
    except OSError:
        return False
    return True


class _Tx:
    """The open transaction: plain statements on the store's connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executescript_in_tx(self, script: str) -> None:
        for statement in filter(str.strip, script.split(";")):
            self.conn.execute(statement)
