"""`make bench` drives crm-syncd's own code in-process (the engine's extraction, the readers, the
daemon's heartbeat). These run those paths on a toy Library, so that a change which breaks the
benchmark fails here, not minutes into a `make bench` (as a daemon refactor once did)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bench import gen, measure
from bench.__main__ import profile

TOY = gen.Spec("toy", messages=300, handles=6, groups=2, calls=40, cards=12)


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(gen, "CACHE", tmp_path / "cache")  # never the real bench cache
    return gen.build(TOY, log=lambda line: None)


def test_the_in_process_measurements_read_every_row_of_a_toy_library(toy: Path, tmp_path: Path):
    since = int(time.time() * 1000) - 365 * 86_400_000
    for source, rows in (("messages", TOY.messages), ("calls", TOY.calls)):
        seconds, examined = measure.extract_once(toy, tmp_path / "extract", source)
        assert examined == rows and seconds > 0
    assert measure.messages_floor(toy, since, 100)[1] == measure.messages_floor(toy, since, 7)[1] >= TOY.messages
    assert measure.messages_floor(toy, since, 100, into=tmp_path / "floor.db")[1] >= TOY.messages
    assert measure.calls_floor(toy, since, 100)[1] == TOY.calls
    assert measure.messages_sql_floor(toy, since, 7, tmp_path / "sql-floor.db")[1] == TOY.messages
    assert measure.contacts_once(toy)[1] == TOY.cards
    assert measure.contacts_floor(measure.contacts_floor_sql(toy))[1] > 0


def test_the_sql_floor_writes_the_items_extraction_writes_for_every_message_with_a_handle(toy: Path, tmp_path: Path):
    since = int(time.time() * 1000) - 365 * 86_400_000
    measure.extract_once(toy, tmp_path / "extract", "messages")
    measure.messages_sql_floor(toy, since, 7, tmp_path / "sql-floor.db")

    def one_to_one(db: Path) -> set[tuple[str, str, int]]:  # a group's outgoing fans out: not in the floor
        with sqlite3.connect(db) as conn:
            return set(conn.execute("SELECT key, type, occurred_ms FROM outbox WHERE key NOT GLOB 'msg:*:*'"))

    extracted = one_to_one(tmp_path / "extract" / "state.db")
    assert extracted and one_to_one(tmp_path / "sql-floor.db") == extracted


def test_the_heartbeat_measurement_runs_the_daemons_own_beat(toy: Path, tmp_path: Path):
    measure.extract_once(toy, tmp_path / "extract", "calls")
    beat = measure.heartbeat_times(tmp_path / "extract" / "state.db", 2)
    assert len(beat["seconds"]) == len(beat["cpu_seconds"]) == 2 and beat["outbox_rows"] > 0


@pytest.mark.parametrize("source, reader", [("messages", "extract"), ("calls", "extract"), ("contacts", "read_contacts")])
def test_a_profile_shows_the_call_tree_of_one_read(toy: Path, tmp_path: Path, capsys, source: str, reader: str):
    html = profile(source, TOY, tmp_path / "work", say=lambda line: None)

    tree = capsys.readouterr().out
    assert reader in tree and reader in html.read_text()
