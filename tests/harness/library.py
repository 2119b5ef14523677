"""A synthetic `~/Library` in a temporary HOME: chat.db, CallHistory and AddressBook stores.

Everything is written with Apple's real tables and columns, in WAL mode, through writers that
stay open (so fresh rows live only in the `-wal` files, as on a real Mac). Tests describe
people, texts and calls in a few lines:

    lib = Library.create(tmp_path)
    lib.card(first="Jane", last="Doe", phones=["+1 613 555 0111"])
    lib.text("+16135550111", at=days_ago(2))
    lib.call("+16135550111", originated=True, duration=65)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.harness.addressbook import AddressBookDB
from tests.harness.callhistory import CallHistoryDB
from tests.harness.chatdb import ChatDB

DB_NAME = "AddressBook-v22.abcddb"
RECENT: datetime = datetime.min.replace(tzinfo=UTC)  # `at` unless given: a minute ago (None: no date, NULL)


def ago(**delta: float) -> datetime:
    """A moment in the past, e.g. ago(days=2), truncated to whole milliseconds."""
    moment = datetime.now(UTC) - timedelta(**delta)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass
class Library:
    home: Path
    chat: ChatDB
    calls: CallHistoryDB
    books: list[AddressBookDB]  # [root, Sources/<A>, Sources/<B>, ...]
    _chats: dict[tuple, int] = field(default_factory=dict)

    @classmethod
    def create(cls, home: Path, *, chat_version: str = "sequoia", calls_version: str = "big-sur",
               sources: int = 2) -> Library:
        home = Path(home)
        messages = home / "Library" / "Messages"
        calls = home / "Library" / "Application Support" / "CallHistoryDB"
        book = home / "Library" / "Application Support" / "AddressBook"
        for folder in (messages, calls, book):
            folder.mkdir(parents=True, exist_ok=True)
        books = [AddressBookDB.create(book / DB_NAME)]
        for _ in range(sources):
            source = book / "Sources" / str(uuid.uuid4()).upper()
            source.mkdir(parents=True)
            books.append(AddressBookDB.create(source / DB_NAME))
        return cls(home, ChatDB.create(messages / "chat.db", chat_version),
                   CallHistoryDB.create(calls / "CallHistory.storedata", calls_version), books)

    # -- paths ----------------------------------------------------------------------------

    @property
    def messages_db(self) -> Path:
        return self.chat.path

    @property
    def calls_db(self) -> Path:
        return self.calls.path

    @property
    def addressbook_dir(self) -> Path:
        return self.books[0].path.parent

    def apple_files(self) -> list[Path]:
        """Apple's databases and their -wal files, for byte-for-byte comparisons.

        `-shm` is left out: it is SQLite's shared-memory WAL index, in which every reader (Apple's
        own included) records its read marks; it holds no data.
        """
        roots = [self.messages_db.parent, self.calls_db.parent, self.addressbook_dir]
        return sorted(p for root in roots for p in root.rglob("*") if p.is_file() and not p.name.endswith("-shm"))

    def snapshot(self) -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in self.apple_files()}

    # -- people, texts, calls -------------------------------------------------------------

    def card(self, *, source: int = 0, phones=(), emails=(), **fields) -> int:
        """A card in the root store (source=0) or in Sources/<n> (source=1, 2, ...)."""
        pk = self.books[source].card(phones=tuple(phones), emails=tuple(emails), **fields)
        self.books[source].commit()
        return pk

    def text(self, address: str, *, from_me: bool = False, at: datetime | int | None = RECENT,
             service: str = "iMessage", person: str | None = None, **row) -> int:
        """A message in the 1:1 chat with `address` (created on first use)."""
        handle = self.chat.handle(address, service=service, person_centric_id=person)
        chat = self._chats.get((address, service))
        if chat is None:
            chat = self._chats[(address, service)] = self.chat.chat([handle], service=service)
        return self.chat.message(chat=chat, handle=handle, from_me=from_me, at=_recent(at),
                                 service=service, **row)

    def group_text(self, members: list[str], *, sender: str | None = None, at: datetime | None = RECENT,
                   **row) -> int:
        """A message in the group chat of `members`: from `sender`, or from me when sender is None."""
        handles = [self.chat.handle(m) for m in members]
        chat = self._chats.get(tuple(sorted(members)))
        if chat is None:
            chat = self._chats[tuple(sorted(members))] = self.chat.chat(handles, group=True)
        handle = self.chat.handle(sender) if sender else 0
        return self.chat.message(chat=chat, handle=handle, from_me=sender is None, at=_recent(at), **row)

    def join_group(self, members: list[str], newcomer: str) -> None:
        """`newcomer` is added to the group chat of `members` now (chat_handle_join holds today's members)."""
        chat, handle = self._chats[tuple(sorted(members))], self.chat.handle(newcomer)
        self.chat.conn.execute("INSERT INTO chat_handle_join (chat_id, handle_id) VALUES (?, ?)", (chat, handle))
        event = self.chat.message(chat=chat, from_me=True, item_type=1, text=None)  # "You added …"
        self.chat.conn.execute("UPDATE message SET group_action_type = 0, other_handle = ? WHERE ROWID = ?",
                               (handle, event))
        self.chat.commit()

    def call(self, address: str | bytes | None, *, at: datetime | float | None = RECENT, **row) -> int:
        pk = self.calls.call(address, _recent(at), **row)
        self.calls.commit()
        return pk

    def close(self) -> None:
        for db in (self.chat, self.calls, *self.books):
            db.close()


def _recent(at):
    """`at` as given (None and 0 included: rows without a date), or a minute ago by default."""
    return ago(minutes=1) if at is RECENT else at
