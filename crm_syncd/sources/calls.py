"""Call history (`CallHistory.storedata`) -> `Activity` records: who we called or who called us.

Each `read` is one read-only snapshot: it probes the columns, runs one SELECT over ZCALLRECORD by Z_PK
(dates, direction, duration and date-skip reasons decided in SQL), and one more for the participant
handles of the calls that have several (a group call) or no usable ZADDRESS. Entity numbers and the
call↔handle join table are discovered from Z_PRIMARYKEY and PRAGMA table_info, never assumed; within a
session (one extraction) these probes are made once.
"""

from __future__ import annotations

import re
import sqlite3
import time
import unicodedata
from collections import Counter

from crm_syncd.sources import AHEAD, AHEAD_MAX_MS, APPLE_EPOCH, BAD_DATE, FUTURE_SLACK_MS, Activity, Batch, sqlite

CALL_INBOUND, CALL_OUTBOUND, CALL_MISSED = "CALL_INBOUND", "CALL_OUTBOUND", "CALL_MISSED"
MAX_DURATION_S = 7 * 86_400  # longer "calls" are corrupt values, not calls
REQUIRED = ("Z_PK", "ZDATE")

# Skip reasons (stable names, counted in Batch.skipped).
NO_ADDRESS, ENCRYPTED_ADDRESS = "no-address", "encrypted-address"
NO_DATE = "no-date"  # and sources.BEFORE_WINDOW, AHEAD and BAD_DATE, counted by every reader

_JOIN_TABLE = re.compile(r"^Z_(\d+)REMOTEPARTICIPANTHANDLES$")
_ENTITY_COLUMN = re.compile(r"^Z_(\d+)(\w+)$")
_ENCRYPTED = object()  # bytes that are not text (macOS ≤ 12 encrypts ZADDRESS)
_NOT_TEXT = frozenset({"Cc", "Co", "Cn", "Cs"})  # control, private-use, unassigned, surrogate: no one types them


class CallsReader(sqlite.SourceReader):
    """Reads Activities from one CallHistory.storedata past a Z_PK high-water mark."""

    TABLE, ROWID, ANCHOR = "ZCALLRECORD", "Z_PK", "ZUNIQUE_ID"
    SEQUENCE = ("Z_PRIMARYKEY", "SELECT Z_MAX FROM Z_PRIMARYKEY WHERE Z_NAME = 'CallRecord'")  # Core Data's

    def _read(self, db: sqlite.Database, conn: sqlite3.Connection, after_rowid: int, limit: int,
              since_ms: int | None, window_until: int | None) -> tuple[Batch, bool]:
        cols = self._columns(db, conn)
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise sqlite.SourceError(f"{self.path}: ZCALLRECORD lacks {', '.join(missing) or 'everything'}")
        rows = conn.execute(_select(cols, since_ms is not None, window_until is not None), {
            "after": after_rowid, "limit": limit, "since": since_ms, "window_until": window_until,
            "now": time.time_ns() // 1_000_000}).fetchall()
        batch = _activities(db, conn, rows)
        batch.last_rowid = rows[-1][0] if rows else after_rowid
        batch.rows = len(rows)
        return batch, len(rows) == limit


def _select(cols: frozenset[str], windowed: bool, bounded: bool = False) -> str:
    """One SELECT: Z_PK, key, occurred_ms, skip reason, CRM type, duration_s, raw ZADDRESS, its country,
    and whether the phone screened the call out."""
    def col(name: str) -> str:
        return name if name in cols else "NULL"

    number = "typeof(ZDATE) IN ('integer', 'real')"
    occurred = f"(CASE WHEN {number} THEN CAST(ROUND((ZDATE + {APPLE_EPOCH}) * 1000) AS INTEGER) END)"
    skip = (f"CASE WHEN {occurred} IS NULL THEN '{NO_DATE}' "
            f"WHEN ZDATE < 0 OR {occurred} > :now + {FUTURE_SLACK_MS + AHEAD_MAX_MS} THEN '{BAD_DATE}' "
            f"WHEN {occurred} > :now + {FUTURE_SLACK_MS} THEN '{AHEAD}' END")
    originated = f"COALESCE({col('ZORIGINATED')}, 0) != 0"
    answered = f"COALESCE({col('ZANSWERED')}, 0) != 0"
    kind = (f"CASE WHEN {originated} THEN '{CALL_OUTBOUND}' "
            f"WHEN {answered} THEN '{CALL_INBOUND}' ELSE '{CALL_MISSED}' END")
    # ZANSWERED is meaningless for outgoing calls: an outgoing call connected iff it lasted.
    # NaN reads back as NULL from SQLite; text and out-of-range values fail the numeric tests.
    d = col("ZDURATION")
    duration = (f"CASE WHEN ({originated} OR {answered}) AND typeof({d}) IN ('integer', 'real') "
                f"AND {d} >= 0.5 AND {d} <= {MAX_DURATION_S} THEN CAST(ROUND({d}) AS INTEGER) END")
    key = f"'call:' || COALESCE(NULLIF({col('ZUNIQUE_ID')}, ''), 'pk:' || Z_PK)"
    # blocked, or silenced (Silence Unknown Callers, a call-blocking app): the phone kept it from the owner
    f = col("ZFILTERED_OUT_REASON")
    screened = f"(NOT {originated} AND typeof({f}) = 'integer' AND {f} != 0)"
    beyond = "Z_PK > :window_until OR " if bounded else ""  # calls above it are past the window
    window = f"AND ({beyond}{occurred} IS NULL OR {occurred} >= :since)" if windowed else ""
    return (f"SELECT Z_PK, {key}, {occurred}, {skip}, {kind}, {duration}, {col('ZADDRESS')}, "
            f"UPPER({col('ZISO_COUNTRY_CODE')}), {screened} "
            f"FROM ZCALLRECORD WHERE Z_PK > :after {window} ORDER BY Z_PK LIMIT :limit")


def _address(raw: object) -> object:
    """ZADDRESS/ZVALUE as text; None when empty; `_ENCRYPTED` for bytes that are not text. Text may hold
    no-break spaces and direction marks (a number copied from a right-to-left page): the Normalizer's."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _ENCRYPTED
        raw = raw.strip("\x00 \t\r\n")
        if any(unicodedata.category(ch) in _NOT_TEXT for ch in raw):
            return _ENCRYPTED
    text = str(raw).strip()
    return text or None


def _activities(db: sqlite.Database, conn: sqlite3.Connection, rows: list[tuple]) -> Batch:
    skipped: Counter[str] = Counter()
    out: list[Activity] = []
    fanned_out: list[tuple[str, int]] = []
    screened: list[tuple[str, int]] = []
    add = out.append
    new = tuple.__new__
    decoded = [(row, _address(row[6])) if row[3] is None else (row, None) for row in rows]
    needy = [row[0] for row, address in decoded if row[3] is None and (address is None or address is _ENCRYPTED)]
    parties = _participants(db, conn, rows[0][0], rows[-1][0], needy) if rows else {}
    unsettled = None
    for (pk, key, occurred, skip, kind, duration, _raw, country, filtered), address in decoded:
        if skip is not None:
            skipped[skip] += 1
            if skip == AHEAD and unsettled is None:
                unsettled = pk
            continue
        first = len(out)
        readable = address is not None and address is not _ENCRYPTED
        if readable and pk not in parties:  # the common case: one party, named by ZADDRESS
            add(new(Activity, (key, address, kind, occurred, duration, None, country)))
        else:
            found, unreadable, forms = parties.get(pk, _NO_PARTIES)
            if readable and len(found) > 1 and address not in forms:  # a group call that names one party
                found = (address, *found)
            if len(found) > 1:  # a group call: one Activity per party
                for party in found:
                    add(new(Activity, (f"{key}:{party}", party, kind, occurred, duration, None, country)))
                fanned_out.append((key, occurred))
            elif readable or found:
                add(new(Activity, (key, address if readable else found[0], kind, occurred, duration, None, country)))
            else:
                skipped[ENCRYPTED_ADDRESS if address is _ENCRYPTED or unreadable else NO_ADDRESS] += 1
        if filtered:
            screened.extend((a.key, occurred) for a in out[first:])
    return Batch(activities=out, skipped=skipped, unsettled=unsettled, fanned_out=fanned_out, screened=screened)


_NO_PARTIES: tuple[tuple[str, ...], bool, frozenset[str]] = ((), False, frozenset())


def _participants(db: sqlite.Database, conn: sqlite3.Connection, low: int, high: int,
                  needy: list[int]) -> dict[int, tuple[tuple[str, ...], bool, frozenset[str]]]:
    """Call Z_PK -> (distinct readable handle addresses, whether some handle was unreadable, every form
    of them stored), for the calls of Z_PKs `low`..`high` with several handles, and for the `needy`
    (no usable ZADDRESS) with any."""
    sql = db.remembered("participants", lambda: _participants_sql(conn))
    if sql is None:
        return {}
    needy_low, needy_high = (needy[0], needy[-1]) if needy else (1, 0)
    found: dict[int, dict[str, None]] = {}
    forms: dict[int, set[str]] = {}
    unreadable: set[int] = set()
    for call, raw, norm in conn.execute(sql, {"low": low, "high": high, "needy_low": needy_low,
                                              "needy_high": needy_high}):
        value, normalized = _address(raw), _address(norm)
        if value is _ENCRYPTED:
            unreadable.add(call)
        stored = [a for a in (value, normalized) if a is not None and a is not _ENCRYPTED]
        forms.setdefault(call, set()).update(stored)
        if stored:
            found.setdefault(call, {})[stored[0]] = None
    return {call: (tuple(found.get(call, ())), call in unreadable, frozenset(forms.get(call, ())))
            for call in found.keys() | unreadable}


def _participants_sql(conn: sqlite3.Connection) -> str | None:
    """The SELECT of (call Z_PK, handle value, normalised value) for the calls of a Z_PK range that have
    several handles or lie in the needy sub-range; None without the join."""
    join = _join(conn)
    handle_cols = sqlite.columns(conn, "ZHANDLE")
    if join is None or "Z_PK" not in handle_cols:
        return None
    table, calls, handles = join
    value = "h.ZVALUE" if "ZVALUE" in handle_cols else "NULL"
    normalized = "h.ZNORMALIZEDVALUE" if "ZNORMALIZEDVALUE" in handle_cols else "NULL"
    several = (f'SELECT k."{calls}" FROM "{table}" k WHERE k."{calls}" BETWEEN :low AND :high '
               f'GROUP BY k."{calls}" HAVING COUNT(*) > 1')
    return (f'SELECT j."{calls}", {value}, {normalized} FROM "{table}" j JOIN ZHANDLE h ON h.Z_PK = j."{handles}" '
            f'WHERE j."{calls}" BETWEEN :low AND :high '
            f'AND (j."{calls}" BETWEEN :needy_low AND :needy_high OR j."{calls}" IN ({several})) '
            f'ORDER BY j."{calls}", h.Z_PK')


def _join(conn: sqlite3.Connection) -> tuple[str, str, str] | None:
    """(join table, call column, handle column) for CallRecord.remoteParticipantHandles, if present."""
    ents = dict(conn.execute("SELECT Z_NAME, Z_ENT FROM Z_PRIMARYKEY WHERE Z_NAME IN ('CallRecord', 'Handle')"))
    call_ent, handle_ent = ents.get("CallRecord"), ents.get("Handle")
    tables = sorted((t for t in sqlite.tables(conn) if _JOIN_TABLE.match(t)),
                    key=lambda t: int(_JOIN_TABLE.match(t).group(1)) != call_ent)
    for table in tables:
        calls = handles = None
        for name in (r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')):
            m = _ENTITY_COLUMN.match(name)
            if not m:
                continue
            ent, relation = int(m.group(1)), m.group(2)
            if ent == call_ent or (ent != handle_ent and relation.endswith("CALLS")):
                calls = name
            elif ent == handle_ent or relation.endswith("HANDLES"):
                handles = name
        if calls and handles:
            return table, calls, handles
    return None
