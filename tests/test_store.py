"""The state database and the marks extraction resumes from: migrations, file identity, anchors.

The real Store and Engine run against fixture stores; extraction never talks to the CRM.
"""

from __future__ import annotations

from pathlib import Path

from crm_syncd.engine import Engine
from crm_syncd.settings import Settings
from crm_syncd.store import SCHEMA_VERSION, Mark, NewItem, Store
from tests.harness.library import Library, ago
from tests.harness.statedb import state_db_at

JANE = "+16135550111"


def extraction(library: Library, state_dir: Path) -> Engine:
    settings = Settings(messages_db=library.messages_db, calls_db=library.calls_db,
                        addressbook_dir=library.addressbook_dir, state_dir=state_dir)
    return Engine(settings, Store(settings.state_db), None)  # type: ignore[arg-type]


# -- migrations -----------------------------------------------------------------------------------

def test_a_version_2_state_database_keeps_its_ledger_and_marks_and_still_refuses_duplicates(tmp_path):
    conn = state_db_at(tmp_path / "state.db", 2)
    conn.execute("INSERT INTO outbox (key, fingerprint, address, type, occurred_ms, state, contact_id, crm_id) "
                 f"VALUES ('msg:A', '{JANE}|TEXT_INBOUND|1700000000', '{JANE}', 'TEXT_INBOUND', 1700000000123, "
                 "'delivered', 7, 70)")
    conn.execute("INSERT INTO marks (source, rowid, file_id, updated_ms) VALUES ('messages', 41, '1:2', 0)")
    conn.commit()
    conn.close()

    store = Store(tmp_path / "state.db")

    assert store.schema_version == SCHEMA_VERSION
    assert store.mark("messages") == Mark(41, "1:2", None)
    assert (store.counts()["delivered"], store.crm_ids(7)) == (1, {70})
    result = store.enqueue("messages", [
        NewItem("msg:A", "+16135550199", "TEXT_INBOUND", 1, None),  # the same key
        NewItem("msg:B", JANE, "TEXT_INBOUND", 1700000000999, None),  # the same counterpart, type and second
        NewItem("msg:C", JANE, "TEXT_INBOUND", 1700000001000, None),
    ], Mark(44, "1:2", "C"))
    assert (result.added, result.duplicates) == (1, 2)
    assert store.mark("messages") == Mark(44, "1:2", "C")


# -- where extraction resumes -----------------------------------------------------------------------

def test_call_history_started_over_in_the_same_file_is_read_again_and_delivers_only_new_calls(
        library: Library, tmp_path):
    engine = extraction(library, tmp_path / "state")
    for n in range(3):
        library.call(JANE, at=ago(hours=10 - n), unique_id=f"OLD-{n}")
    assert engine.extract("calls").added == 3

    library.calls.start_over()  # same file, same inode; Z_PK 4 will exist again, so only the anchor tells
    for n in range(4):
        library.call(JANE, at=ago(hours=5 - n), unique_id="OLD-0" if n == 0 else None)
    report = engine.extract("calls")

    assert report.rebuilt
    assert (report.added, report.duplicates) == (3, 1)  # OLD-0 came back: its key is in the outbox


def test_a_call_the_owner_deleted_at_the_mark_is_no_rebuild(library: Library, tmp_path):
    engine = extraction(library, tmp_path / "state")
    last = [library.call(JANE, at=ago(hours=10 - n)) for n in range(3)][-1]
    engine.extract("calls")

    library.calls.conn.execute("DELETE FROM ZCALLRECORD WHERE Z_PK = ?", (last,))
    library.call(JANE, at=ago(hours=1))
    report = engine.extract("calls")

    assert not report.rebuilt
    assert (report.rows, report.added) == (1, 1)
