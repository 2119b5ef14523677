"""Builds AddressBook-v22.abcddb fixtures in Contacts' Core Data layout (reference section 3).

No DDL dump of this store exists, so the schema follows the reference's column lists: single-table
inheritance in ZABCDRECORD (contacts, groups, containers and ABCDInfo rows told apart by Z_ENT),
multi-value tables with ZOWNER + Z<contactEnt>_OWNER, notes in ZABCDNOTE(ZCONTACT, ZTEXT), wrapped
built-in labels and a `Z_<contactEnt>PARENTGROUPS` join table. Entity numbers are configurable so
tests can prove readers look them up. WAL; one writer connection stays open.
"""

from __future__ import annotations

import os
import plistlib
import re
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

APPLE_EPOCH = 978_307_200
DB_NAME = "AddressBook-v22.abcddb"
BUILTIN_LABELS = frozenset({"Mobile", "iPhone", "Home", "Work", "Main", "HomeFAX", "WorkFAX", "OtherFAX",
                            "Pager", "Other", "School", "HomePage", "Anniversary"})

# (name, parent name or None, default entity number). Numbers follow the commonly seen model
# (ABCDContact 22, ABCDGroup 19); the rest are plausible and only need to be distinct.
MODEL: tuple[tuple[str, str | None, int], ...] = (
    ("ABCDAddressBookSource", None, 1), ("ABCDAlternateBirthday", None, 2), ("ABCDCalendarURI", None, 3),
    ("ABCDContactDate", None, 4), ("ABCDContactIndex", None, 5), ("ABCDCustomProperty", None, 6),
    ("ABCDCustomPropertyValue", None, 7), ("ABCDDeletedRecordLog", None, 8), ("ABCDDistributionList", None, 9),
    ("ABCDDistributionListConfig", None, 10), ("ABCDEmailAddress", None, 11), ("ABCDLikeness", None, 12),
    ("ABCDMessagingAddress", None, 13), ("ABCDNote", None, 14), ("ABCDPhoneNumber", None, 15),
    ("ABCDPostalAddress", None, 16), ("ABCDRecord", None, 17), ("ABCDAbstractGroup", "ABCDRecord", 18),
    ("ABCDGroup", "ABCDAbstractGroup", 19), ("ABCDSmartGroup", "ABCDAbstractGroup", 20),
    ("ABCDSubscribedGroup", "ABCDAbstractGroup", 21), ("ABCDContact", "ABCDRecord", 22),
    ("ABCDSubscribedContact", "ABCDContact", 23), ("ABCDInfo", "ABCDRecord", 24),
    ("CNCDContainer", "ABCDRecord", 25), ("ABCDRelatedName", None, 26), ("ABCDService", None, 27),
    ("ABCDSharedPhotoDisplayPreference", None, 28), ("ABCDSocialProfile", None, 29),
    ("ABCDUnknownPropertyValue", None, 30), ("ABCDURLAddress", None, 31),
)

RECORD_COLUMNS = (
    # integers
    "ZCONTACTINDEX", "ZDISPLAYFLAGS", "ZIOSLEGACYIDENTIFIER", "ZPRIVACYFLAGS", "ZGUARDIANFLAGS",
    "ZSYNCSTATUS", "ZNOTE", "ZCONTAINER", "ZCONTAINER1", "ZCONTAINER2", "{me}", "ZISALL", "ZME",
    "ZINFO", "ZTYPE", "ZSHARECOUNT", "ZSYNCCOUNT", "ZVERSION", "ZPREFERREDFORLINKNAME",
    "ZPREFERREDFORLINKPHOTO", "ZIMAGETYPE", "ZCREATIONDATEYEAR", "ZCREATIONDATEYEARLESS",
    "ZMODIFICATIONDATEYEAR", "ZMODIFICATIONDATEYEARLESS", "ZBIRTHDAYYEAR", "ZBIRTHDAYYEARLESS",
    # timestamps / floats
    "ZBIRTHDAY TIMESTAMP", "ZCREATIONDATE TIMESTAMP", "ZMODIFICATIONDATE TIMESTAMP",
    "ZLASTSYNCDATE TIMESTAMP", "ZCROPRECTHEIGHT FLOAT", "ZCROPRECTWIDTH FLOAT", "ZCROPRECTX FLOAT",
    "ZCROPRECTY FLOAT",
    # strings
    "ZDEPARTMENT V", "ZFIRSTNAME V", "ZJOBTITLE V", "ZLASTNAME V", "ZMAIDENNAME V", "ZMIDDLENAME V",
    "ZNICKNAME V", "ZORGANIZATION V", "ZPHONETICFIRSTNAME V", "ZPHONETICLASTNAME V",
    "ZPHONETICMIDDLENAME V", "ZPHONETICORGANIZATION V", "ZSORTINGFIRSTNAME V", "ZSORTINGLASTNAME V",
    "ZSUFFIX V", "ZTITLE V", "ZUNIQUEID V", "ZLINKID V", "ZNAME V", "ZNAMENORMALIZED V",
    "ZEXTERNALCOLLECTIONPATH V", "ZEXTERNALFILENAME V", "ZEXTERNALHASH V", "ZEXTERNALIDENTIFIER V",
    "ZEXTERNALIMAGEURI V", "ZEXTERNALMODIFICATIONTAG V", "ZEXTERNALURI V", "ZEXTERNALUUID V",
    "ZIDENTITYUNIQUEID V", "ZIMAGEREFERENCE V", "ZIMAGEHASH V", "ZPREFERREDAPPLEPERSONAIDENTIFIER V",
    "ZPREFERREDLIKENESSSOURCE V", "ZPROVIDERIDENTIFIER V", "ZSERIALNUMBER V",
    # blobs
    "ZIMAGEDATA BLOB", "ZTHUMBNAILIMAGEDATA BLOB", "ZEXTERNALREPRESENTATION BLOB", "ZPROVIDERMETADATA BLOB",
    "ZMEMOJIMETADATA BLOB", "ZAVATARRECIPEDATA BLOB", "ZSENSITIVECONTENTCONFIGURATION BLOB",
    "ZLUNARBIRTHDAYCOMPONENTS BLOB", "ZWALLPAPER BLOB",
)
MULTI_VALUE = {  # table → (entity, value columns)
    "ZABCDPHONENUMBER": ("ABCDPhoneNumber", ("ZAREACODE", "ZCOUNTRYCODE", "ZEXTENSION", "ZFULLNUMBER",
                                             "ZLASTFOURDIGITS", "ZLOCALNUMBER")),
    "ZABCDEMAILADDRESS": ("ABCDEmailAddress", ("ZADDRESS", "ZADDRESSNORMALIZED")),
    "ZABCDPOSTALADDRESS": ("ABCDPostalAddress", ("ZCITY", "ZCOUNTRYCODE", "ZCOUNTRYNAME", "ZREGION",
                                                 "ZSTATE", "ZSTREET", "ZSUBLOCALITY", "ZZIPCODE")),
    "ZABCDURLADDRESS": ("ABCDURLAddress", ("ZURL",)),
}
FIELD_COLUMNS = {"first": "ZFIRSTNAME", "last": "ZLASTNAME", "middle": "ZMIDDLENAME", "nickname": "ZNICKNAME",
                 "organization": "ZORGANIZATION", "job_title": "ZJOBTITLE", "unique_id": "ZUNIQUEID",
                 "link_id": "ZLINKID"}

Entry = str | tuple[str, str | None] | tuple[str, str | None, bool] | tuple[str, str | None, bool, str]
# (value, label, primary, country: a phone's ZCOUNTRYCODE, as Contacts sets it for a number typed without one)


def _column_sql(spec: str) -> str:
    name, _, kind = spec.partition(" ")
    return f"{name} {'VARCHAR' if kind == 'V' else kind or 'INTEGER'}"


def entity_numbers(contact_entity: int = 22, group_entity: int = 19) -> dict[str, int]:
    """The model's entity numbers with ABCDContact/ABCDGroup moved; the others fill the free numbers."""
    if contact_entity == group_entity:
        raise ValueError("contact and group entities must differ")
    fixed = {"ABCDContact": contact_entity, "ABCDGroup": group_entity}
    free = iter(n for n in range(1, len(MODEL) + max(fixed.values()) + 1) if n not in fixed.values())
    return {name: fixed.get(name) or next(free) for name, _, _ in MODEL}


def _schema(ents: dict[str, int], me_column: str) -> list[str]:
    c, g = ents["ABCDContact"], ents["ABCDGroup"]
    record_cols = ", ".join(_column_sql(s.format(me=me_column)) for s in RECORD_COLUMNS)
    common = "Z_PK INTEGER PRIMARY KEY, Z_ENT INTEGER, Z_OPT INTEGER"
    owner = f"ZOWNER INTEGER, Z{c}_OWNER INTEGER"
    mv_tail = ("ZISPRIMARY INTEGER, ZISPRIVATE INTEGER, ZORDERINGINDEX INTEGER, ZLABEL VARCHAR, "
               "ZUNIQUEID VARCHAR, ZIOSLEGACYIDENTIFIER INTEGER")
    statements = [
        "CREATE TABLE Z_PRIMARYKEY (Z_ENT INTEGER PRIMARY KEY, Z_NAME VARCHAR, Z_SUPER INTEGER, Z_MAX INTEGER)",
        "CREATE TABLE Z_METADATA (Z_VERSION INTEGER PRIMARY KEY, Z_UUID VARCHAR(255), Z_PLIST BLOB)",
        "CREATE TABLE Z_MODELCACHE (Z_CONTENT BLOB)",
        f"CREATE TABLE ZABCDRECORD ({common}, {record_cols})",
        f"CREATE TABLE ZABCDNOTE ({common}, ZCONTACT INTEGER, ZTEXT VARCHAR, ZRICHTEXTDATA BLOB)",
        f"CREATE TABLE ZABCDCONTACTINDEX ({common}, ZCONTACT INTEGER, ZSTRINGFORINDEXING VARCHAR)",
        f"CREATE TABLE Z_{c}PARENTGROUPS (Z_{c}CONTACTS INTEGER, Z_{g}PARENTGROUPS1 INTEGER, "
        f"PRIMARY KEY (Z_{c}CONTACTS, Z_{g}PARENTGROUPS1))",
        f"CREATE INDEX Z_{c}PARENTGROUPS_Z_{g}PARENTGROUPS1_INDEX "
        f"ON Z_{c}PARENTGROUPS (Z_{g}PARENTGROUPS1, Z_{c}CONTACTS)",
        "CREATE INDEX ZABCDRECORD_ZUNIQUEID_INDEX ON ZABCDRECORD (ZUNIQUEID)",
        "CREATE INDEX ZABCDRECORD_ZLINKID_INDEX ON ZABCDRECORD (ZLINKID)",
        "CREATE INDEX ZABCDNOTE_ZCONTACT_INDEX ON ZABCDNOTE (ZCONTACT)",
    ]
    for table, (_, values) in MULTI_VALUE.items():
        cols = ", ".join(f"{v} VARCHAR" for v in values)
        statements.append(f"CREATE TABLE {table} ({common}, {owner}, {mv_tail}, {cols})")
        statements.append(f"CREATE INDEX {table}_ZOWNER_INDEX ON {table} (ZOWNER)")
    return statements


def apple_now() -> float:
    return time.time() - APPLE_EPOCH


def _apple(at: datetime | None) -> float:
    if at is None:
        return apple_now()
    return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp() - APPLE_EPOCH


def wrap_label(label: str | None) -> str | None:
    return f"_$!<{label}>!$_" if label in BUILTIN_LABELS else label


def _entries(items: Iterable[Entry]) -> list[tuple[str, str | None, bool, str | None]]:
    out = []
    for item in items:
        if isinstance(item, str):
            item = (item, None)
        value, label, *rest = item
        out.append((value, label, bool(rest[0]) if rest else False, rest[1] if len(rest) > 1 else None))
    return out


class AddressBookDB:
    """A writable AddressBook store for tests; readers must only ever see it read-only."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = Path(path)
        self.conn = conn
        self.closed = False
        rows = conn.execute("SELECT Z_ENT, Z_NAME, Z_SUPER FROM Z_PRIMARYKEY").fetchall()
        self.entities = {name: ent for ent, name, _ in rows}
        self._root_of: dict[str, int] = {}
        parent = {ent: sup for ent, _, sup in rows}
        for ent, name, _ in rows:
            root = ent
            while parent.get(root):
                root = parent[root]
            self._root_of[name] = root
        self.contact_entity = self.entities["ABCDContact"]
        self.group_entity = self.entities["ABCDGroup"]
        cols = {r[1] for r in conn.execute("PRAGMA table_info(ZABCDRECORD)")}
        self.me_column = next(c for c in ("ZCONTAINERWHERECONTACTISME", "ZSOURCEWHERECONTACTISME") if c in cols)
        self.container = conn.execute("SELECT MIN(Z_PK) FROM ZABCDRECORD WHERE Z_ENT = ?",
                                      (self.entities["CNCDContainer"],)).fetchone()[0]

    @classmethod
    def create(cls, path: Path, contact_entity: int = 22, group_entity: int = 19,
               legacy_me_column: bool = False) -> AddressBookDB:
        """A new store; `legacy_me_column` uses the older ZSOURCEWHERECONTACTISME for the Me card."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ents = entity_numbers(contact_entity, group_entity)
        me_column = "ZSOURCEWHERECONTACTISME" if legacy_me_column else "ZCONTAINERWHERECONTACTISME"
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        with conn:
            for statement in _schema(ents, me_column):
                conn.execute(statement)
            conn.executemany("INSERT INTO Z_PRIMARYKEY VALUES (?, ?, ?, 0)",
                             [(ents[n], n, ents[p] if p else 0) for n, p, _ in MODEL])
            conn.execute("INSERT INTO Z_METADATA VALUES (1, ?, ?)", (
                str(uuid.uuid4()).upper(),
                plistlib.dumps({"NSStoreType": "SQLite", "NSPersistenceFrameworkVersion": 1041,
                                "NSStoreModelVersionHashes": {n: uuid.uuid5(uuid.NAMESPACE_DNS, n).bytes
                                                              for n, _, _ in MODEL}}, fmt=plistlib.FMT_BINARY)))
            conn.execute("INSERT INTO Z_MODELCACHE VALUES (?)", (os.urandom(128),))
        db = cls(path, conn)
        with conn:
            db.container = db._record("CNCDContainer", ZNAME="Card", ZTYPE=0,
                                      ZUNIQUEID=f"{uuid.uuid4()}".upper() + ":ABContainer")
            for kind in ("Sync", "Version", "ChangeLog"):
                db._record("ABCDInfo", ZNAME=kind, ZUNIQUEID=f"{uuid.uuid4()}".upper() + ":ABInfo")
        return db

    # -- low level -------------------------------------------------------------------------------
    def _next_pk(self, entity: str) -> int:
        """Core Data hands out Z_PK per inheritance root and records the high mark in Z_MAX."""
        root = self._root_of[entity]
        self.conn.execute("UPDATE Z_PRIMARYKEY SET Z_MAX = Z_MAX + 1 WHERE Z_ENT = ?", (root,))
        return self.conn.execute("SELECT Z_MAX FROM Z_PRIMARYKEY WHERE Z_ENT = ?", (root,)).fetchone()[0]

    def _insert(self, table: str, values: dict) -> None:
        self.conn.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                          tuple(values.values()))

    def _record(self, entity: str, **columns) -> int:
        pk = self._next_pk(entity)
        self._insert("ZABCDRECORD", {"Z_PK": pk, "Z_ENT": self.entities[entity], "Z_OPT": 1, **columns})
        return pk

    def _multi_values(self, table: str, owner: int,
                      entries: Sequence[tuple[str, str | None, bool, str | None]]) -> None:
        entity, _ = MULTI_VALUE[table]
        for index, (value, label, primary, country) in enumerate(entries):
            values = {"Z_PK": self._next_pk(entity), "Z_ENT": self.entities[entity], "Z_OPT": 1,
                      "ZOWNER": owner, f"Z{self.contact_entity}_OWNER": self.contact_entity,
                      "ZISPRIMARY": int(primary), "ZISPRIVATE": 0, "ZORDERINGINDEX": index,
                      "ZLABEL": wrap_label(label), "ZUNIQUEID": f"{uuid.uuid4()}".upper()}
            if table == "ZABCDPHONENUMBER":
                digits = re.sub(r"\D", "", value)
                values.update(ZFULLNUMBER=value, ZLASTFOURDIGITS=digits[-4:] or None, ZCOUNTRYCODE=country)
            else:
                values.update(ZADDRESS=value, ZADDRESSNORMALIZED=value.strip().lower())
            self._insert(table, values)

    def _set_note(self, pk: int, note: str | None) -> None:
        self.conn.execute("DELETE FROM ZABCDNOTE WHERE ZCONTACT = ?", (pk,))
        note_pk = None
        if note is not None:
            note_pk = self._next_pk("ABCDNote")
            self._insert("ZABCDNOTE", {"Z_PK": note_pk, "Z_ENT": self.entities["ABCDNote"], "Z_OPT": 1,
                                       "ZCONTACT": pk, "ZTEXT": note})
        self.conn.execute("UPDATE ZABCDRECORD SET ZNOTE = ? WHERE Z_PK = ?", (note_pk, pk))

    # -- what tests use --------------------------------------------------------------------------
    def card(
        self,
        first: str | None = None,
        last: str | None = None,
        organization: str | None = None,
        company: bool = False,
        phones: Iterable[Entry] = (("+1 (555) 010-0100", "Mobile"),),
        emails: Iterable[Entry] = (),
        note: str | None = None,
        unique_id: str | None = None,
        me: bool = False,
        link_id: str | None = None,
        nickname: str | None = None,
        middle: str | None = None,
        job_title: str | None = None,
        modified: datetime | None = None,
        preferred_name: bool = False,
        entity: str = "ABCDContact",
    ) -> int:
        """Insert a card (ABCDContact unless `entity` says otherwise); returns its Z_PK."""
        stamp = _apple(modified)
        pk = self._record(
            entity, ZFIRSTNAME=first, ZLASTNAME=last, ZMIDDLENAME=middle, ZNICKNAME=nickname,
            ZORGANIZATION=organization, ZJOBTITLE=job_title, ZDISPLAYFLAGS=1 if company else 0,
            ZUNIQUEID=unique_id or f"{uuid.uuid4()}".upper() + ":ABPerson", ZLINKID=link_id,
            ZCONTAINER1=self.container, **{self.me_column: self.container if me else None},
            ZCREATIONDATE=stamp, ZMODIFICATIONDATE=stamp, ZSORTINGFIRSTNAME=(first or organization or "").upper(),
            ZSORTINGLASTNAME=(last or "").upper(), ZPRIVACYFLAGS=0, ZSYNCSTATUS=0,
            ZPREFERREDFORLINKNAME=int(preferred_name),
        )
        self._multi_values("ZABCDPHONENUMBER", pk, _entries(phones))
        self._multi_values("ZABCDEMAILADDRESS", pk, _entries(emails))
        if note is not None:
            self._set_note(pk, note)
        return pk

    def group(self, name: str, members: Iterable[int] = ()) -> int:
        pk = self._record("ABCDGroup", ZNAME=name, ZCONTAINER1=self.container,
                          ZUNIQUEID=f"{uuid.uuid4()}".upper() + ":ABGroup", ZCREATIONDATE=apple_now(),
                          ZMODIFICATIONDATE=apple_now())
        c, g = self.contact_entity, self.group_entity
        self.conn.executemany(f"INSERT INTO Z_{c}PARENTGROUPS (Z_{c}CONTACTS, Z_{g}PARENTGROUPS1) VALUES (?, ?)",
                              [(member, pk) for member in members])
        return pk

    def update_card(self, z_pk: int, modified: datetime | None = None, **fields) -> None:
        """Change card fields as Contacts would: bumps Z_OPT and ZMODIFICATIONDATE.

        Accepts card()'s field names; `phones`/`emails` replace the whole list, `note` replaces the note.
        """
        sets = {"ZMODIFICATIONDATE": _apple(modified)}
        for name, value in fields.items():
            if name in FIELD_COLUMNS:
                sets[FIELD_COLUMNS[name]] = value
            elif name == "company":
                sets["ZDISPLAYFLAGS"] = 1 if value else 0
            elif name == "me":
                sets[self.me_column] = self.container if value else None
            elif name in ("phones", "emails"):
                table = "ZABCDPHONENUMBER" if name == "phones" else "ZABCDEMAILADDRESS"
                self.conn.execute(f"DELETE FROM {table} WHERE ZOWNER = ?", (z_pk,))
                self._multi_values(table, z_pk, _entries(value))
            elif name == "note":
                self._set_note(z_pk, value)
            else:
                raise TypeError(f"unknown card field {name!r}")
        assignments = ", ".join(f"{col} = ?" for col in sets)
        self.conn.execute(f"UPDATE ZABCDRECORD SET Z_OPT = Z_OPT + 1, {assignments} WHERE Z_PK = ?",
                          (*sets.values(), z_pk))

    def delete_card(self, z_pk: int) -> None:
        c = self.contact_entity
        for table in MULTI_VALUE:
            self.conn.execute(f"DELETE FROM {table} WHERE ZOWNER = ?", (z_pk,))
        self.conn.execute("DELETE FROM ZABCDNOTE WHERE ZCONTACT = ?", (z_pk,))
        self.conn.execute(f"DELETE FROM Z_{c}PARENTGROUPS WHERE Z_{c}CONTACTS = ?", (z_pk,))
        self.conn.execute("DELETE FROM ZABCDRECORD WHERE Z_PK = ?", (z_pk,))

    def commit(self) -> None:
        self.conn.commit()

    def checkpoint(self) -> None:
        self.conn.commit()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Commit and close, as Apple does when it is done (SQLite removes the -wal); again: nothing."""
        if not self.closed:
            self.conn.commit()
            self.conn.close()
            self.closed = True
