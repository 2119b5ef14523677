"""Messages (`chat.db`) -> `Activity` records: who texted whom, and when.

Metadata only: the reader never selects a message's body columns (its text, its attributed body,
payload data or summary info); a test traces every statement to prove it.
Each `read` is one read-only snapshot: it probes the columns, loads the handle and chat maps, then
runs one SELECT over `message` by ROWID that also decides skip reasons in SQL. Within a session
(one extraction) the probes and maps are kept across reads, and loaded again when a row names a
handle or chat newer than them, or is a non-message row (a group's membership event) written since.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Literal, NamedTuple

from crm_syncd.sources import AHEAD, AHEAD_MAX_MS, APPLE_EPOCH, BAD_DATE, FUTURE_SLACK_MS, Activity, Batch, sqlite

TEXT_INBOUND, TEXT_OUTBOUND = "TEXT_INBOUND", "TEXT_OUTBOUND"
GROUP_STYLE, DIRECT_STYLE = 43, 45  # chat.style
NS_THRESHOLD = 1_000_000_000_000  # a message date above this is nanoseconds, else seconds
EPOCH_MS = APPLE_EPOCH * 1000
REQUIRED = ("guid", "date", "is_from_me", "handle_id")

# Skip reasons: stable names, counted in Batch.skipped.
NOT_A_MESSAGE, REACTION, SYSTEM, FAILED_SEND = "not-a-message", "reaction", "system", "failed-send"
DELETED = "deleted"  # in Recently Deleted (macOS 13+) when read
NOT_SENT_YET = "not-sent-yet"  # outgoing, Messages still sending it: read again until it is sent or failed
SKEW_MS = 60_000  # two of the owner's devices' clocks disagree by less: within it, the order rows were written decides
PENDING_SEND_MS = 900_000  # still unsent 15 min after its date: taken as it is (Messages has sent or given up by then)
NO_DATE = "no-date"  # and sources.BEFORE_WINDOW, AHEAD and BAD_DATE, counted by every reader
NO_COUNTERPART, GROUP_OUTGOING = "no-counterpart", "group-outgoing"

RECENTLY_DELETED = "chat_recoverable_message_join"
Party = tuple[str, str | None, str | None]  # (handle.id as stored, person_centric_id, country of a national number)
_ROWID, _HANDLE, _CHAT, _SKIP = itemgetter(0), itemgetter(4), itemgetter(5), itemgetter(6)  # columns of the SELECT's rows


class MessagesReader(sqlite.SourceReader):
    """Reads Activities from one chat.db past a ROWID high-water mark."""

    TABLE, ROWID, ANCHOR = "message", "ROWID", "guid"
    SEQUENCE = ("sqlite_sequence", "SELECT seq FROM sqlite_sequence WHERE name = 'message'")  # AUTOINCREMENT's

    def __init__(self, path: Path, *, group_messages: Literal["each-participant", "skip"] = "each-participant",
                 trace: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> None:
        if group_messages not in ("each-participant", "skip"):
            raise ValueError(f"group_messages must be 'each-participant' or 'skip', not {group_messages!r}")
        super().__init__(path, trace=trace, stop=stop)
        self.group_messages = group_messages

    def own_addresses(self) -> set[str]:
        """The addresses the owner's chats were last addressed from (chat.last_addressed_handle)."""
        return sqlite.retrying(self._reading, lambda db, conn: set(_maps(db, conn, []).own), stop=self._stop)

    def people(self) -> list[Party]:
        """Every handle Messages takes for one person with others (`person_centric_id`), read or not."""
        return sqlite.retrying(self._reading, lambda db, conn: [p for p in _maps(db, conn, []).handles.values() if p[1]],
                               stop=self._stop)

    def _read(self, db: sqlite.Database, conn: sqlite3.Connection, after_rowid: int, limit: int,
              since_ms: int | None, window_until: int | None) -> tuple[Batch, bool]:
        cols = self._columns(db, conn)
        if missing := [c for c in REQUIRED if c not in cols]:
            raise sqlite.SourceError(f"{self.path}: message table lacks {', '.join(missing)}")
        join_cols = db.remembered("chat_message_join", lambda: sqlite.columns(conn, "chat_message_join"))
        deleted = db.remembered("recently_deleted", lambda: "message_id" in sqlite.columns(conn, RECENTLY_DELETED))
        sql, params = _select(cols, join_cols, deleted, since_ms, window_until)
        params |= {"after": after_rowid, "limit": limit}
        rows = conn.execute(sql, params).fetchall()
        full = len(rows) == limit
        if full and (cut := _rows_cut_off(conn, rows)):  # LIMIT split a message in several chats
            start, short = cut
            rows = rows[:start] if start else conn.execute(sql, params | {"limit": limit + short}).fetchall()
        if len(rows) != len(set(map(_ROWID, rows))):
            rows = _lowest_chat_each(rows)
        batch = self._activities(rows, _maps(db, conn, rows))
        batch.last_rowid, batch.rows = (rows[-1][0] if rows else after_rowid), len(rows)
        return batch, full

    def _activities(self, rows: list[tuple], maps: _Maps) -> Batch:
        """Turn SELECT rows into Activities (the hot loop: lookups and tuple building only)."""
        out: list[Activity] = []
        add, new = out.append, tuple.__new__
        skipped: Counter[str] = Counter()
        fan_out = self.group_messages == "each-participant"
        get_handle, get_single, get_group = maps.handles.get, maps.singles.get, maps.groups.get
        unsettled = None
        fanned_out: list[tuple[str, int]] = []
        for rowid, guid, date, from_me, handle_id, chat_id, skip in rows:
            if skip is not None:
                skipped[skip] += 1
                if (skip == NOT_SENT_YET or skip == AHEAD) and unsettled is None:
                    unsettled = rowid
                continue
            occurred = (date // 1_000_000 if date > NS_THRESHOLD else date * 1000) + EPOCH_MS  # unix_ms, inlined
            parties = get_group(chat_id)
            if parties is None:  # one-to-one chat, or no chat at all
                party = get_handle(handle_id) or get_single(chat_id)
            elif not from_me:  # group, incoming: the sender
                party = get_handle(handle_id)
            elif not fan_out:
                skipped[GROUP_OUTGOING] += 1
                continue
            else:  # group, outgoing: one Activity per participant (as the group was when it was sent)
                parties = maps.events.members_at(chat_id, occurred, rowid, parties)
                for address, person, country in parties:
                    add(new(Activity, (f"msg:{guid}:{address}", address, TEXT_OUTBOUND, occurred, None, person, country)))
                if parties:
                    fanned_out.append((f"msg:{guid}", occurred))
                else:
                    skipped[NO_COUNTERPART] += 1
                continue
            if party is None:
                skipped[NO_COUNTERPART] += 1
                continue
            add(new(Activity, (f"msg:{guid}", party[0], TEXT_OUTBOUND if from_me else TEXT_INBOUND,
                               occurred, None, party[1], party[2])))
        return Batch(activities=out, skipped=skipped, unsettled=unsettled, fanned_out=fanned_out)


class _Maps(NamedTuple):
    """Who is behind each handle and chat, as of one snapshot."""

    handles: dict[int, Party]
    singles: dict[int, Party]  # one-to-one chat -> its party
    groups: dict[int, tuple[Party, ...]]  # group chat -> its distinct parties
    newest_handle: int
    newest_chat: int
    newest_message: int  # the message rows written when loaded: a group's membership changes after it are not in
    own: frozenset[str]  # the owner's addresses the chats were last addressed from
    events: _MembershipEvents  # who joined and left each group since

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> _Maps:
        handles = _handles(conn)
        singles, groups, newest_chat, own = _chats(conn, handles)
        newest_message = conn.execute("SELECT MAX(ROWID) FROM message").fetchone()[0] or 0
        return cls(handles, singles, groups, max(handles, default=0), newest_chat, newest_message, own,
                   _MembershipEvents(conn, handles))

    def behind(self, rows: list[tuple]) -> bool:
        """Whether some row names a handle or chat newer than these maps, or is a non-message row (a group's
        membership event: chat_handle_join changed with it) written since they were loaded."""
        return (max(filter(None, map(_HANDLE, rows)), default=0) > self.newest_handle
                or max(filter(None, map(_CHAT, rows)), default=0) > self.newest_chat
                or (_ROWID(rows[-1]) > self.newest_message  # rows come in ROWID order: most batches stop here
                    and any(_SKIP(row) == NOT_A_MESSAGE and _ROWID(row) > self.newest_message for row in rows)))


class _MembershipEvents:
    """A group's members when one of its messages was sent: `chat_handle_join` holds today's only, so
    the events since (someone added or removed, item_type 1; someone left, item_type 3) are undone.
    "Since" goes by the order Messages wrote the rows (ROWID), unless the dates of the
    event and the message lie further apart than two devices' clocks do (SKEW_MS) and say otherwise: a
    Send Later text's row is written when it is scheduled and dated when it is sent, and iCloud delivers
    old rows late. An event without a date keeps its place by ROWID. The events since are undone newest
    first by date (iCloud may write a day's events after the next day's), an undated one dated as the
    event written before it. Each chat's events are read once per session, when it first needs them."""

    def __init__(self, conn: sqlite3.Connection, handles: dict[int, Party]) -> None:
        self._conn, self._handles = conn, handles
        self._able: bool | None = None  # whether message has the event columns: probed when first needed
        # chat -> (ROWID, Unix ms or None, added?, who, Unix ms to undo them by), in ROWID order
        self._chats: dict[int, list[tuple[int, int | None, bool, Party, int]]] = {}

    def members_at(self, chat: int, occurred_ms: int, rowid: int, parties: tuple[Party, ...]) -> tuple[Party, ...]:
        events = self._of(chat)
        if not events:
            return parties
        later = [event for event in events if (
            event[0] > rowid if event[1] is None or abs(event[1] - occurred_ms) <= SKEW_MS else event[1] > occurred_ms)]
        if not later:
            return parties
        members = {party[0]: party for party in parties}
        for _rowid, _ms, added, party, _undo in sorted(later, key=_UNDO_ORDER, reverse=True):
            if added:
                members.pop(party[0], None)
            else:
                members.setdefault(party[0], party)
        return tuple(members.values())

    def _of(self, chat: int) -> list[tuple[int, int | None, bool, Party, int]]:
        if (events := self._chats.get(chat)) is not None:
            return events
        events = self._chats[chat] = []
        if self._able is None:
            self._able = {"item_type", "group_action_type", "other_handle"} <= sqlite.columns(self._conn, "message")
        if not self._able:
            return events
        for rowid, date, item_type, action, handle, other in self._conn.execute(
                "SELECT m.ROWID, m.date, m.item_type, m.group_action_type, m.handle_id, m.other_handle "
                "FROM chat_message_join j JOIN message m ON m.ROWID = j.message_id "
                "WHERE j.chat_id = ? AND m.item_type IN (1, 3) ORDER BY m.ROWID", (chat,)):
            if item_type == 1 and action in (0, 1) and other != handle:  # the same: a member changed number
                who, added = other, action == 0
            elif item_type == 3 and action == 0 and handle:  # a member left (handle 0: the owner did)
                who, added = handle, False
            else:
                continue
            if (party := self._handles.get(who)) is not None:
                ms = unix_ms(date) if isinstance(date, int) and date > 0 else None  # 0 or NULL: not set
                undo = ms if ms is not None else (events[-1][4] if events else 0)
                events.append((rowid, ms, added, party, undo))
        return events


_UNDO_ORDER = itemgetter(4, 0)  # (Unix ms to undo by, ROWID)


def unix_ms(date: int) -> int:
    """A chat.db date (seconds or nanoseconds since 2001, told apart by size) in Unix ms."""
    return (date // 1_000_000 if date > NS_THRESHOLD else date * 1000) + EPOCH_MS


def _maps(db: sqlite.Database, conn: sqlite3.Connection, rows: list[tuple]) -> _Maps:
    """The maps, loaded once per session and again when a row names a handle or chat they lack, or a
    group's membership may have changed since (in the snapshot of that row's batch)."""
    maps = db.remembered("maps", lambda: _Maps.load(conn))
    if rows and maps.behind(rows):
        maps = db.remembered("maps", lambda: _Maps.load(conn), fresh=True)
    return maps


def _handles(conn: sqlite3.Connection) -> dict[int, Party]:
    """{handle ROWID: its Party}; a number stored without its country code (`07700 900123`) keeps the
    country Messages recorded for it (in any case: `gb`, `GB`)."""
    cols = sqlite.columns(conn, "handle")
    person = "person_centric_id" if "person_centric_id" in cols else "NULL"
    country = "UPPER(country)" if "country" in cols else "NULL"
    return {rowid: (address, pcid, country if isinstance(address, str) and address[:1].isdigit() else None)
            for rowid, address, pcid, country in conn.execute(f"SELECT ROWID, id, {person}, {country} FROM handle")}


def _chats(conn: sqlite3.Connection, handles: dict[int, Party]
           ) -> tuple[dict[int, Party], dict[int, tuple[Party, ...]], int, frozenset[str]]:
    """({one-to-one chat: its party}, {group chat: its distinct parties}, newest chat ROWID,
    the owner's addresses the chats were last addressed from).

    Other chats are in neither map.
    A chat is a group when style = 43, or when its style is unknown and it has several parties.
    """
    last = "last_addressed_handle" if "last_addressed_handle" in sqlite.columns(conn, "chat") else "NULL"
    styles, own = {}, set()
    for chat, style, address in conn.execute(f"SELECT ROWID, style, {last} FROM chat"):
        styles[chat] = style
        if isinstance(address, str) and address.strip():
            own.add(address)
    members: dict[int, dict[str, Party]] = {chat: {} for chat in styles}
    if {"chat_id", "handle_id"} <= sqlite.columns(conn, "chat_handle_join"):
        for chat, handle in conn.execute("SELECT chat_id, handle_id FROM chat_handle_join ORDER BY chat_id, handle_id"):
            if (party := handles.get(handle)) is not None and chat in members:
                members[chat].setdefault(party[0], party)  # iMessage + SMS handles of one address: once
    singles, groups = {}, {}
    for chat, style in styles.items():
        parties = tuple(members[chat].values())
        if style == GROUP_STYLE or (style != DIRECT_STYLE and len(parties) > 1):
            groups[chat] = parties
        elif len(parties) == 1:
            singles[chat] = parties[0]
    return singles, groups, max(styles, default=0), frozenset(own)


def _select(cols: frozenset[str], join_cols: frozenset[str], deleted: bool,
            since_ms: int | None, window_until: int | None = None) -> tuple[str, dict[str, int]]:
    """The one SELECT over message: ROWID, guid, date, is_from_me, handle_id, chat_id, skip reason.

    Date rules compare the raw column against thresholds pre-computed in both units, so SQLite
    does no per-row arithmetic; the join yields one row per chat a message is in.
    """
    ahead = time.time_ns() // 1_000_000 + FUTURE_SLACK_MS - EPOCH_MS  # ms after 2001 that is ahead of the clock
    far = ahead + AHEAD_MAX_MS  # and too far ahead to be a clock behind or a send scheduled
    params = {"ns": NS_THRESHOLD, "future_ns": ahead * 1_000_000 + 999_999, "future_s": ahead // 1000,
              "far_ns": far * 1_000_000 + 999_999, "far_s": far // 1000}
    reasons = []
    if "item_type" in cols:
        reasons.append(f"WHEN m.item_type != 0 THEN '{NOT_A_MESSAGE}'")
    if "associated_message_type" in cols:  # 0 a message, 2 and 3 app payloads; others are not messages
        reasons += [f"WHEN m.associated_message_type >= 1000 THEN '{REACTION}'",
                    f"WHEN m.associated_message_type NOT IN (0, 2, 3) THEN '{NOT_A_MESSAGE}'"]
    if flags := [f"m.{c} = 1" for c in ("is_system_message", "is_service_message") if c in cols]:
        reasons.append(f"WHEN {' OR '.join(flags)} THEN '{SYSTEM}'")
    if "error" in cols:
        reasons.append(f"WHEN m.is_from_me = 1 AND m.error != 0 THEN '{FAILED_SEND}'")
    reasons += [f"WHEN m.date IS NULL OR m.date = 0 THEN '{NO_DATE}'",
                f"WHEN m.date < 0 OR m.date > :far_ns OR (m.date <= :ns AND m.date > :far_s) THEN '{BAD_DATE}'",
                f"WHEN m.date > :future_ns OR (m.date <= :ns AND m.date > :future_s) THEN '{AHEAD}'"]
    if "is_sent" in cols:  # rows appear before they are sent and are updated once sent (or failed)
        pending = time.time_ns() // 1_000_000 - PENDING_SEND_MS - EPOCH_MS
        params |= {"pending_ns": pending * 1_000_000, "pending_s": -(-pending // 1000)}
        reasons.append("WHEN m.is_from_me = 1 AND m.is_sent = 0 AND "
                       f"m.date >= CASE WHEN m.date > :ns THEN :pending_ns ELSE :pending_s END THEN '{NOT_SENT_YET}'")
    window = ""
    if since_ms is not None:
        after = since_ms - EPOCH_MS
        params |= {"since_ns": after * 1_000_000, "since_s": -(-after // 1000)}
        beyond = ""
        if window_until is not None:  # rows above it are past the window, whatever their date
            params["window_until"] = window_until
            beyond = "m.ROWID > :window_until OR "
        window = (f"AND ({beyond}m.date IS NULL OR m.date = 0 OR "
                  "m.date >= CASE WHEN m.date > :ns THEN :since_ns ELSE :since_s END)")
    joined = {"chat_id", "message_id"} <= join_cols
    chat, join = (("j.chat_id", "LEFT JOIN chat_message_join j ON j.message_id = m.ROWID") if joined
                  else ("NULL", ""))
    if joined and deleted:  # deleting moves a message's chat join row there
        reasons.append(f"WHEN j.chat_id IS NULL AND m.ROWID IN (SELECT message_id FROM {RECENTLY_DELETED}) "
                       f"THEN '{DELETED}'")
    sql = (f"SELECT m.ROWID, m.guid, m.date, m.is_from_me, m.handle_id, {chat}, CASE {' '.join(reasons)} END "
           f"FROM message m {join} WHERE m.ROWID > :after {window} ORDER BY m.ROWID LIMIT :limit")
    return sql, params


def _rows_cut_off(conn: sqlite3.Connection, rows: list[tuple]) -> tuple[int, int] | None:
    """If LIMIT cut off some of the last message's join rows: (index of its first row, rows missing).

    A message's rows are adjacent; a message in several chats has one row per chat.
    """
    last = rows[-1][0]
    if rows[-1][5] is None:
        return None
    start = len(rows) - 1
    while start and rows[start - 1][0] == last:
        start -= 1
    listed = conn.execute("SELECT COUNT(*) FROM chat_message_join WHERE message_id = ?", (last,)).fetchone()[0]
    return (start, listed - (len(rows) - start)) if listed > len(rows) - start else None


def _lowest_chat_each(rows: list[tuple]) -> list[tuple]:
    """One row per message: a message in several chats keeps its lowest chat_id."""
    kept: dict[int, tuple] = {}
    for row in rows:
        best = kept.get(row[0])
        if best is None or (row[5] is not None and (best[5] is None or row[5] < best[5])):
            kept[row[0]] = row
    return list(kept.values())
