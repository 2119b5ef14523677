"""Builds CallHistory.storedata fixtures the way callhistoryd lays them out (Core Data, WAL).

"big-sur" runs Apple's real CREATE TABLEs (reference `ddl/big-sur/CallHistoryDB/*.sql`); "sequoia"
derives the newer model the reference describes from them: `EmergencyMediaItem` takes entity 3 so
Handle becomes 4 (join column `Z_4REMOTEPARTICIPANTHANDLES`), ZADDRESS is declared VARCHAR and a few
newer ZCALLRECORD columns exist. One writer connection stays open, so rows sit in the `-wal` until
`checkpoint()` or `close()`, as they do on a Mac.
"""

from __future__ import annotations

import os
import plistlib
import re
import sqlite3
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from tests.harness.chatdb import ddl_dir

APPLE_EPOCH = 978_307_200

ENTITIES = {
    "big-sur": ("CallDBProperties", "CallRecord", "Handle"),
    "sequoia": ("CallDBProperties", "CallRecord", "EmergencyMediaItem", "Handle"),
}
# Reported for newer models (reference 2.2, UNCONFIRMED there); types are Core Data's.
SEQUOIA_CALLRECORD_EXTRA = (
    ("ZAUTOANSWEREDREASON", "INTEGER"), ("ZCALLDIRECTORYIDENTITYTYPE", "INTEGER"),
    ("ZHASMESSAGE", "INTEGER"), ("ZINITIATOR", "INTEGER"), ("ZSCREENSHARINGTYPE", "INTEGER"),
    ("ZUSEDEMERGENCYVIDEOSTREAMING", "INTEGER"), ("ZWASEMERGENCYCALL", "INTEGER"),
    ("ZJUNKIDENTIFICATIONCATEGORY", "VARCHAR"), ("ZIMAGEURL", "VARCHAR"),
    ("ZORIGINATINGDEVICENAME", "VARCHAR"), ("ZCONVERSATIONID", "BLOB"),
    ("ZPARTICIPANTGROUPUUID", "BLOB"),
)
# Invented to the Core Data pattern (no dump of it was found).
SEQUOIA_EMERGENCY_MEDIA = """CREATE TABLE ZEMERGENCYMEDIAITEM (
    Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER, ZCALLRECORD INTEGER, ZTYPE INTEGER,
    ZDATE TIMESTAMP, ZASSETURL VARCHAR, ZIDENTIFIER VARCHAR)"""
TYPE_ORDER = ("INTEGER", "TIMESTAMP", "FLOAT", "VARCHAR", "BLOB")


def apple_seconds(at: datetime | float | None) -> float | None:
    """datetime (naive = UTC) → seconds since 2001; a float is taken as ZDATE already."""
    if at is None or isinstance(at, (int, float)):
        return at
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.timestamp() - APPLE_EPOCH


def big_sur_ddl_dir() -> Path:
    return ddl_dir() / "big-sur" / "CallHistoryDB"


def _big_sur_statements() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(big_sur_ddl_dir().glob("*.sql"))}


def _columns_of(ddl: str) -> list[tuple[str, str]]:
    body = ddl[ddl.index("(") + 1: ddl.rindex(")")]
    return [tuple(line.strip().rstrip(",").split(None, 1)) for line in body.splitlines() if line.strip()]


def _sequoia_callrecord(big_sur_ddl: str) -> str:
    cols = [(n, "VARCHAR" if n == "ZADDRESS" else t) for n, t in _columns_of(big_sur_ddl)]
    cols += SEQUOIA_CALLRECORD_EXTRA
    head, rest = cols[:3], cols[3:]
    rest.sort(key=lambda c: TYPE_ORDER.index(c[1].split()[0]))  # stable: Core Data groups columns by type
    return "CREATE TABLE ZCALLRECORD (\n    " + ",\n    ".join(f"{n} {t}" for n, t in head + rest) + "\n)"


def _schema(version: str) -> list[str]:
    ddl = _big_sur_statements()
    if not ddl:
        raise FileNotFoundError(f"no CallHistory DDL under {big_sur_ddl_dir()} (set FIXTURES_SHARED_DIR)")
    if version == "big-sur":
        join_cols = ("Z_2REMOTEPARTICIPANTCALLS", "Z_3REMOTEPARTICIPANTHANDLES")
        return [*ddl.values(), *_indexes(join_cols)]
    if version != "sequoia":
        raise ValueError(f"unknown CallHistory version {version!r}")
    ddl["ZCALLRECORD"] = _sequoia_callrecord(ddl["ZCALLRECORD"])
    ddl["Z_2REMOTEPARTICIPANTHANDLES"] = ddl["Z_2REMOTEPARTICIPANTHANDLES"].replace(
        "Z_3REMOTEPARTICIPANTHANDLES", "Z_4REMOTEPARTICIPANTHANDLES")
    join_cols = ("Z_2REMOTEPARTICIPANTCALLS", "Z_4REMOTEPARTICIPANTHANDLES")
    return [*ddl.values(), SEQUOIA_EMERGENCY_MEDIA, *_indexes(join_cols)]


def _indexes(join_cols: tuple[str, str]) -> list[str]:
    calls, handles = join_cols
    return [
        "CREATE INDEX ZCALLRECORD_ZDATE_INDEX ON ZCALLRECORD (ZDATE)",
        "CREATE INDEX ZCALLRECORD_ZUNIQUE_ID_INDEX ON ZCALLRECORD (ZUNIQUE_ID)",
        "CREATE INDEX ZHANDLE_ZNORMALIZEDVALUE_INDEX ON ZHANDLE (ZNORMALIZEDVALUE)",
        f"CREATE INDEX Z_2REMOTEPARTICIPANTHANDLES_{handles}_INDEX "
        f"ON Z_2REMOTEPARTICIPANTHANDLES ({handles}, {calls})",
    ]


def _normalized(value: str) -> str:
    if "@" in value:
        return value.strip().lower()
    digits = re.sub(r"[^\d]", "", value)
    return ("+" + digits) if value.strip().startswith("+") else digits


class CallHistoryDB:
    """A writable CallHistory.storedata for tests; readers must only ever see it read-only."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = Path(path)
        self.conn = conn
        self.entities = {name: ent for ent, name in conn.execute("SELECT Z_ENT, Z_NAME FROM Z_PRIMARYKEY")}
        self.version = "sequoia" if "EmergencyMediaItem" in self.entities else "big-sur"
        self.record_columns = {r[1] for r in conn.execute("PRAGMA table_info(ZCALLRECORD)")}
        join = [r[1] for r in conn.execute("PRAGMA table_info(Z_2REMOTEPARTICIPANTHANDLES)")]
        self.join_calls, self.join_handles = join

    @classmethod
    def create(cls, path: Path, version: str = "big-sur") -> CallHistoryDB:
        path = Path(path)
        if path.exists():
            raise FileExistsError(path)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # only checkpoint()/close() move rows to the main file
        schema = _schema(version)
        with conn:
            for statement in schema:
                conn.execute(statement)
            conn.executemany("INSERT INTO Z_PRIMARYKEY (Z_ENT, Z_NAME, Z_SUPER, Z_MAX) VALUES (?, ?, 0, 0)",
                             list(enumerate(ENTITIES[version], start=1)))
            conn.execute("INSERT INTO Z_METADATA (Z_VERSION, Z_UUID, Z_PLIST) VALUES (1, ?, ?)",
                         (str(uuid.uuid4()).upper(), _metadata_plist(ENTITIES[version])))
            conn.execute("INSERT INTO Z_MODELCACHE (Z_CONTENT) VALUES (?)", (os.urandom(64),))
        db = cls(path, conn)
        with conn:
            pk = db._next_pk("CallDBProperties")
            conn.execute("INSERT INTO ZCALLDBPROPERTIES VALUES (?, ?, 1, 0.0, 0.0, 0.0, 0.0, 0.0)",
                         (pk, db.entities["CallDBProperties"]))
        return db

    @classmethod
    def open(cls, path: Path) -> CallHistoryDB:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(path)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return cls(path, conn)

    def _next_pk(self, entity: str) -> int:
        ent = self.entities[entity]
        self.conn.execute("UPDATE Z_PRIMARYKEY SET Z_MAX = Z_MAX + 1 WHERE Z_ENT = ?", (ent,))
        return self.conn.execute("SELECT Z_MAX FROM Z_PRIMARYKEY WHERE Z_ENT = ?", (ent,)).fetchone()[0]

    def _handle(self, value: str | bytes) -> int:
        row = self.conn.execute("SELECT Z_PK FROM ZHANDLE WHERE ZVALUE = ?", (value,)).fetchone()
        if row:
            return row[0]
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        pk = self._next_pk("Handle")
        self.conn.execute(
            "INSERT INTO ZHANDLE (Z_PK, Z_ENT, Z_OPT, ZTYPE, ZNORMALIZEDVALUE, ZVALUE) VALUES (?, ?, 1, ?, ?, ?)",
            (pk, self.entities["Handle"], 3 if "@" in text else 2, _normalized(text), value))
        return pk

    def call(
        self,
        address: str | bytes | None,
        at: datetime | float | None,
        duration: float = 0.0,
        originated: bool = False,
        answered: bool = False,
        call_type: int = 1,
        service_provider: str | None = "com.apple.Telephony",
        unique_id: str | None = None,
        handles: Iterable[str | bytes] = (),
        name: str | None = None,
        iso_country: str | None = "us",
        disconnected_cause: int | None = 0,
        filtered_out_reason: int | None = 0,
        pk: int | None = None,
    ) -> int:
        """Insert one ZCALLRECORD row (plus handles and join rows); returns its Z_PK.

        `at` as a float is stored as ZDATE unchanged (seconds since 2001), so tests can write odd values.
        `pk`: the row's Z_PK (a free one below the newest: a row an earlier read saw), else the next.
        """
        pk = pk if pk is not None else self._next_pk("CallRecord")
        facetime = call_type in (8, 16)
        text = address.decode("utf-8", "replace") if isinstance(address, bytes) else (address or "")
        values = {
            "Z_PK": pk, "Z_ENT": self.entities["CallRecord"], "Z_OPT": 1,
            "ZANSWERED": int(answered), "ZCALL_CATEGORY": 2 if call_type == 8 else 1,
            "ZCALLTYPE": call_type, "ZDISCONNECTED_CAUSE": disconnected_cause, "ZFACE_TIME_DATA": None,
            "ZFILTERED_OUT_REASON": filtered_out_reason, "ZHANDLE_TYPE": 3 if "@" in text else 2, "ZJUNKCONFIDENCE": 0,
            "ZNUMBER_AVAILABILITY": 0, "ZORIGINATED": int(originated), "ZREAD": 1,
            "ZVERIFICATIONSTATUS": 0, "ZDATE": apple_seconds(at), "ZDURATION": duration,
            "ZISO_COUNTRY_CODE": iso_country, "ZLOCATION": None, "ZNAME": name,
            "ZSERVICE_PROVIDER": service_provider,
            "ZUNIQUE_ID": unique_id if unique_id is not None else str(uuid.uuid4()).upper(),
            "ZLOCALPARTICIPANTUUID": uuid.uuid4().bytes if facetime else None,
            "ZOUTGOINGLOCALPARTICIPANTUUID": uuid.uuid4().bytes if facetime and originated else None,
            "ZADDRESS": address,
            "ZWASEMERGENCYCALL": 0, "ZHASMESSAGE": 0, "ZAUTOANSWEREDREASON": 0,
            "ZCONVERSATIONID": uuid.uuid4().bytes if facetime else None,
        }
        values = {k: v for k, v in values.items() if k in self.record_columns}
        self.conn.execute(f"INSERT INTO ZCALLRECORD ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                          tuple(values.values()))
        for handle in handles:
            self.conn.execute(
                f"INSERT OR IGNORE INTO Z_2REMOTEPARTICIPANTHANDLES ({self.join_calls}, {self.join_handles}) "
                "VALUES (?, ?)", (pk, self._handle(handle)))
        return pk

    def commit(self) -> None:
        self.conn.commit()

    def start_over(self) -> None:
        """Delete every call and number new ones from Z_PK 1 again, in the same file (a restore over it)."""
        self.conn.execute("DELETE FROM ZCALLRECORD")
        self.conn.execute("DELETE FROM Z_2REMOTEPARTICIPANTHANDLES")
        self.conn.execute("UPDATE Z_PRIMARYKEY SET Z_MAX = 0 WHERE Z_ENT = ?", (self.entities["CallRecord"],))
        self.commit()

    def checkpoint(self) -> None:
        self.conn.commit()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.conn.commit()
        self.conn.close()


def _metadata_plist(entities: tuple[str, ...]) -> bytes:
    return plistlib.dumps({
        "NSPersistenceFrameworkVersion": 1041,
        "NSStoreModelVersionHashes": {name: uuid.uuid5(uuid.NAMESPACE_URL, name).bytes for name in entities},
        "NSStoreModelVersionIdentifiers": [""],
        "NSStoreType": "SQLite",
        "_NSAutoVacuumLevel": "2",
    }, fmt=plistlib.FMT_BINARY)
