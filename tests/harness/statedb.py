"""crm-syncd state databases as older versions left them, for migration tests."""

from __future__ import annotations

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
