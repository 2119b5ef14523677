"""Build Messages `chat.db` fixtures from Apple's real per-version DDL.

    db = ChatDB.create(tmp_path / "chat.db", version="catalina")
    ann = db.handle("+15551234567")
    chat = db.chat([ann])
    db.message(chat, ann, at=datetime(2024, 5, 1, tzinfo=UTC))

The database is in WAL mode and ONE writer connection stays open, so rows live only in the
`-wal` until `checkpoint()` or `close()`, as on a Mac where Messages is running. Each write
commits at once unless the builder was made with `autocommit=False` (bulk builds), in which
case call `commit()`. Only columns the chosen version has are written.
"""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

VERSIONS = ("el-capitan", "high-sierra", "catalina", "big-sur", "monterey", "ventura", "sonoma", "sequoia")
NS_FROM = "high-sierra"  # message dates are nanoseconds from 10.13 on, seconds before
APPLE_EPOCH = datetime(2001, 1, 1, tzinfo=UTC)
GROUP, DIRECT = 43, 45  # chat.style

CORE_TABLES = ("handle", "chat", "message", "chat_handle_join", "chat_message_join",
               "attachment", "message_attachment_join")
# Columns a newer table file has that an older version lacked: (table, column) -> first version.
LATER_COLUMNS = {("chat_message_join", "message_date"): "high-sierra"}
# A few of Apple's real indexes (not in the DDL dumps); readers are planned against them.
INDEXES = (
    "CREATE INDEX chat_message_join_idx_message_id_only ON chat_message_join(message_id)",
    "CREATE INDEX chat_message_join_idx_chat_id ON chat_message_join(chat_id)",
    "CREATE INDEX chat_handle_join_idx_handle_id ON chat_handle_join(handle_id)",
)
CLIENT_VERSION = {"el-capitan": "9005", "sequoia": "18020"}  # _ClientVersion seen on real DBs
# Recently Deleted (macOS 13+), as apple-databases.md §1.4 gives it: the DDL dumps lack it.
RECOVERABLE_FROM = "ventura"
RECOVERABLE_JOIN = ("CREATE TABLE chat_recoverable_message_join (chat_id INTEGER REFERENCES chat (ROWID) "
                    "ON DELETE CASCADE, message_id INTEGER REFERENCES message (ROWID) ON DELETE CASCADE, "
                    "delete_date INTEGER, ck_sync_state INTEGER DEFAULT 0, PRIMARY KEY (chat_id, message_id), "
                    "CHECK (delete_date != 0))")

_NOW = object()  # default for message(at=...)


def shared_dir() -> Path:
    """`/work/shared` next to the repo, or $FIXTURES_SHARED_DIR."""
    env = os.environ.get("FIXTURES_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"


def ddl_dir() -> Path:
    return shared_dir() / "reference" / "ddl"


def _version_dir(version: str) -> Path:
    folder = ddl_dir() / version
    return folder / "Messages" if (folder / "Messages").is_dir() else folder


def _table_file(version: str, table: str) -> str | None:
    """The CREATE TABLE text for `table` in `version`'s folder, if that folder really has it."""
    file = _version_dir(version) / f"{table}.sql"
    if not file.is_file():
        return None
    sql = file.read_text()
    # sequoia/message_processing_task.sql holds recoverable_message_part's DDL: not usable.
    name = re.match(r"\s*CREATE TABLE\s+(\w+)", sql)
    return sql if name and name.group(1) == table else None


def schema(version: str) -> dict[str, str]:
    """table -> CREATE TABLE for `version`, filling gaps from the nearest older (else newer) dump."""
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; pick one of {VERSIONS}")
    if not ddl_dir().is_dir():
        raise FileNotFoundError(f"no Apple table definitions (DDL) for Messages under {ddl_dir()}: "
                                "set FIXTURES_SHARED_DIR to the folder that holds reference/ddl")
    at = VERSIONS.index(version)
    names = set(CORE_TABLES)
    for older in VERSIONS[: at + 1]:
        names |= {f.stem for f in _version_dir(older).glob("*.sql")}
    tables = {}
    for table in sorted(names):
        older = (_table_file(v, table) for v in reversed(VERSIONS[: at + 1]))
        sql = next((s for s in older if s), None)
        if sql is None:  # only a newer dump has it: drop the columns that came later
            sql = next((s for s in (_table_file(v, table) for v in VERSIONS[at + 1:]) if s), None)
            if sql is None:
                raise FileNotFoundError(f"no {table}.sql in any version's folder under {ddl_dir()}")
            for (t, column), since in LATER_COLUMNS.items():
                if t == table and at < VERSIONS.index(since):
                    sql = re.sub(rf"\n\s*{column}\b[^\n]*", "", sql)
        tables[table] = sql
    return tables


def _columns(conn: sqlite3.Connection, table: str) -> frozenset[str]:
    return frozenset(r[1] for r in conn.execute(f'PRAGMA table_info("{table}")'))


def to_apple(at: datetime, unit: Literal["s", "ns"]) -> int:
    """`at` (naive = UTC) as Apple's integer date, exactly (no float on the way)."""
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    delta = at - APPLE_EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    return seconds if unit == "s" else seconds * 10**9 + delta.microseconds * 1_000


class ChatDB:
    """A chat.db of one macOS version, with a single writer connection kept open."""

    def __init__(self, conn: sqlite3.Connection, path: Path, version: str, autocommit: bool) -> None:
        self.conn, self.path, self.version, self.autocommit = conn, path, version, autocommit
        self.cols = {t: _columns(conn, t) for t in ("message", "handle", "chat", "chat_message_join")}
        self.unit: Literal["s", "ns"] = "ns" if VERSIONS.index(version) >= VERSIONS.index(NS_FROM) else "s"
        self.closed = False

    @classmethod
    def create(cls, path: Path, version: str = "sequoia", *, indexes: bool = True,
               autocommit: bool = True) -> ChatDB:
        path = Path(path)
        if path.exists():
            raise FileExistsError(path)
        tables = schema(version)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE _SqliteDatabaseProperties (key TEXT, value TEXT, UNIQUE(key))")
        conn.executemany("INSERT INTO _SqliteDatabaseProperties VALUES (?, ?)",
                         [("_ClientVersion", CLIENT_VERSION.get(version, "0")),
                          ("__CSDBRecordSequenceNumber", "0")])
        for sql in tables.values():
            conn.execute(sql)
        if VERSIONS.index(version) >= VERSIONS.index(RECOVERABLE_FROM):
            conn.execute(RECOVERABLE_JOIN)
        for sql in INDEXES if indexes else ():
            conn.execute(sql)
        conn.execute("COMMIT")
        return cls(conn, path, version, autocommit)

    @classmethod
    def open(cls, path: Path, *, autocommit: bool = True) -> ChatDB:
        """Reopen a fixture for more writes; the version is recognised from its message columns."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(path)
        conn = sqlite3.connect(path, isolation_level=None)
        have = _columns(conn, "message")
        for version in reversed(VERSIONS):
            if _columns_of(schema(version)["message"]) <= have:
                return cls(conn, path, version, autocommit)
        conn.close()
        raise ValueError(f"{path} does not look like a chat.db")

    # -- writes ------------------------------------------------------------------------------

    def handle(self, address: str, service: str = "iMessage", person_centric_id: str | None = None,
               country: str = "us") -> int:
        found = self.conn.execute("SELECT ROWID FROM handle WHERE id = ? AND service = ?",
                                  (address, service)).fetchone()
        if found:
            return found[0]
        return self._insert("handle", id=address, service=service, country=country,
                            uncanonicalized_id=None, person_centric_id=person_centric_id)

    def chat(self, handles: list[int], group: bool = False, service: str = "iMessage",
             guid: str | None = None, display_name: str | None = None,
             last_addressed: str = "me@example.com") -> int:
        """A chat with `handles`; `last_addressed` is the owner's own address Messages last used in it."""
        if group:
            identifier = f"chat{uuid.uuid4().int % 10**18}"
            guid = guid or f"any;+;{uuid.uuid4().hex}"
        else:
            (other,) = handles
            identifier = self.conn.execute("SELECT id FROM handle WHERE ROWID = ?", (other,)).fetchone()[0]
            guid = guid or f"{service};-;{identifier}"
        chat = self._insert("chat", commit=False, guid=guid, style=GROUP if group else DIRECT, state=3,
                            chat_identifier=identifier, service_name=service,
                            room_name=identifier if group else None, display_name=display_name,
                            account_login="E:me@example.com", last_addressed_handle=last_addressed,
                            is_filtered=0, successful_query=1)
        self.conn.executemany("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?, ?)",
                              [(chat, h) for h in handles])
        self._done()
        return chat

    def message(self, chat: int | None = None, handle: int = 0, from_me: bool = False,
                at: datetime | int | None = _NOW, item_type: int = 0, associated_type: int = 0,  # type: ignore[assignment]
                error: int = 0, guid: str | None = None, service: str = "iMessage",
                text: str | None = "a private message body", date_unit: Literal["s", "ns"] | None = None,
                is_sent: int | None = None, is_system: int = 0, rowid: int | None = None) -> int:
        """Insert one message row (and its chat_message_join row when `chat` is given).

        `at`: a datetime (encoded in this version's unit or `date_unit`), a raw int, or None (NULL).
        `rowid`: the row's ROWID (a free one below the newest: a row an earlier read saw), else the next.
        """
        if at is _NOW:
            at = datetime.now(UTC)
        date = to_apple(at, date_unit or self.unit) if isinstance(at, datetime) else at
        rowid = self._insert(
            "message", commit=False, **({"ROWID": rowid} if rowid is not None else {}),
            guid=guid or str(uuid.uuid4()).upper(), text=text,
            attributedBody=b"streamtyped\x81\xe8\x03\x84\x01@\x84NSAttributedString " + (text or "").encode(),
            payload_data=b"bplist00-private", message_summary_info=b"bplist00-summary",
            handle_id=handle, service=service, account="E:me@example.com", error=error, date=date,
            date_read=0, date_delivered=0, is_delivered=1, is_finished=1, is_from_me=int(from_me),
            is_read=int(not from_me), is_sent=int(from_me and not error) if is_sent is None else is_sent,
            is_system_message=is_system, item_type=item_type, associated_message_type=associated_type,
            associated_message_guid=f"p:0/{uuid.uuid4()}".upper() if associated_type else None,
            destination_caller_id="me@example.com", cache_roomnames=None,
        )
        if chat is not None:
            self._insert("chat_message_join", commit=False, chat_id=chat, message_id=rowid,
                         message_date=date or 0)
        self._done()
        return rowid

    def finish_sending(self, rowid: int, *, error: int = 0) -> None:
        """Messages is done sending an outgoing row: sent, or failed with `error`."""
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")
        self.conn.execute("UPDATE message SET is_sent = ?, error = ? WHERE ROWID = ?", (int(not error), error, rowid))
        self._done()

    def start_over(self) -> None:
        """Delete every message and number new ones from ROWID 1 again, in the same file (a restore over it)."""
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")
        for sql in ("DELETE FROM chat_message_join", "DELETE FROM message",
                    "DELETE FROM sqlite_sequence WHERE name = 'message'"):
            self.conn.execute(sql)
        self._done()

    def move_to_recently_deleted(self, rowid: int) -> None:
        """What deleting a message does on macOS 13+: its chat join row moves to Recently Deleted."""
        chats = [r[0] for r in self.conn.execute("SELECT chat_id FROM chat_message_join WHERE message_id = ?", (rowid,))]
        self.conn.execute("DELETE FROM chat_message_join WHERE message_id = ?", (rowid,))
        self.conn.executemany("INSERT INTO chat_recoverable_message_join (chat_id, message_id, delete_date) "
                              "VALUES (?, ?, ?)", [(c, rowid, to_apple(datetime.now(UTC), self.unit)) for c in chats])
        self._done()

    def delete_message(self, rowid: int) -> None:
        for sql in ("DELETE FROM chat_message_join WHERE message_id = ?",
                    "DELETE FROM message_attachment_join WHERE message_id = ?",
                    "DELETE FROM message WHERE ROWID = ?"):
            self.conn.execute(sql, (rowid,))
        self._done()

    # -- lifecycle ---------------------------------------------------------------------------

    def commit(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Move the -wal's pages into the main file (the writer stays open)."""
        self.commit()
        self.conn.execute(f"PRAGMA wal_checkpoint({mode})")

    def close(self) -> None:
        """Commit and close; SQLite checkpoints and removes the -wal. Again: nothing."""
        if not self.closed:
            self.commit()
            self.conn.close()
            self.closed = True

    def __enter__(self) -> ChatDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _insert(self, table: str, commit: bool = True, **values: object) -> int:
        have = self.cols[table]
        names = [k for k in values if k in have]
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")
        try:
            cursor = self.conn.execute(
                f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [values[k] for k in names])
        except sqlite3.Error:
            if self.autocommit:
                self.conn.execute("ROLLBACK")
            raise
        if commit:
            self._done()
        return cursor.lastrowid

    def _done(self) -> None:
        if self.autocommit:
            self.commit()


def _columns_of(create_table: str) -> frozenset[str]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(create_table)
        name = re.match(r"\s*CREATE TABLE\s+(\w+)", create_table).group(1)  # type: ignore[union-attr]
        return _columns(conn, name)
    finally:
        conn.close()
