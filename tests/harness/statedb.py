"""crm-syncd state databases as older versions left them (migration tests), and as a backup holds them."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from crm_syncd.store import APPLICATION_ID, MIGRATIONS


def state_db_at(path: Path, version: int) -> sqlite3.Connection:
    """A state database at schema `version` (migrations 1..version applied), open for filling in."""
    conn = sqlite3.connect(path)
    for step in range(1, version + 1):
        conn.executescript(MIGRATIONS[step])
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {version}")
    return conn


def a_backup_of(state: Path, to: Path) -> Path:
    """A consistent copy of the state database, as a Time Machine snapshot holds it."""
    source, target = sqlite3.connect(state), sqlite3.connect(to)
    source.backup(target)
    source.close()
    target.close()
    return to


def restore(backup: Path, state: Path) -> None:
    """Put a backup back in the state database's place (without the -wal and -shm beside it)."""
    for extra in ("-wal", "-shm"):
        Path(f"{state}{extra}").unlink(missing_ok=True)
    shutil.copyfile(backup, state)
