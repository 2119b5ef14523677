"""Hostile input: odd addresses, dates, durations, names and CRM answers never crash crm-syncd and
never put an interaction on the wrong contact. Property tests run the real Normalizer and the real
readers over real SQLite fixtures; the CLI tests run the real process against the stand-in CRM."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from crm_syncd.identity import PEOPLE, Normalizer
from crm_syncd.sources.calls import CallsReader
from crm_syncd.sources.messages import MessagesReader
from tests.conftest import CLI
from tests.harness.callhistory import CallHistoryDB
from tests.harness.chatdb import ChatDB
from tests.harness.citadel import CitadelServer, Faults
from tests.harness.library import Library, ago

E164 = re.compile(r"^\+\d{7,15}$")
PROPS = settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
REGIONS = ("US", "CA", "GB", "FR", "DE", "IN", "BR", "JP", "AU", "IL", "SA", "CN", "NG", "MX")

phone_like = st.builds(
    lambda cc, digits, sep, ext: f"+{cc}{sep}{digits}{ext}",
    st.sampled_from(["1", "44", "33", "49", "91", "55", "81", "61", "972", "966", "86", "234", "52"]),
    st.text("0123456789", min_size=4, max_size=14),
    st.sampled_from(["", " ", "-", " (", "."]),
    st.sampled_from(["", " ext. 12", " x9", ";ext=44", ",,123"]),
)
hostile = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(categories=["Zs", "Cc"]), max_size=5),  # whitespace, control
    st.just("😀📞"), st.text("😀👩‍👩‍👧‍👦", max_size=8),
    st.text("0123456789 ()-+.", min_size=1, max_size=20),
    st.just("9" * 500), st.just("a" * 500 + "@example.com"),
    st.builds(lambda u: f"urn:biz:{u}", st.uuids()),
    phone_like,
    st.emails().map(lambda e: e.upper()),
    st.text("\u05d0\u05d1\u0627\u0628\u0301\u0308", max_size=12),  # right-to-left and combining marks
)


@PROPS
@given(raw=st.one_of(hostile, st.none()), region=st.sampled_from(REGIONS))
def test_the_normalizer_never_raises_and_its_people_are_well_formed_and_stable(raw, region):
    normalize = Normalizer(region)
    kind, value = normalize(raw)
    if kind == "phone":
        assert E164.match(value), value
    if kind == "email":
        assert value == value.lower() and "@" in value
    if kind in PEOPLE:
        assert Normalizer(region)(value) == (kind, value)  # idempotent on its own output
        assert Normalizer("US")(value) == (kind, value)  # and an E.164 number needs no region


def test_a_cards_country_reads_a_number_typed_without_one_and_an_unknown_country_is_no_country():
    normalize = Normalizer("US")
    assert normalize("07700 900123", "gb") == ("phone", "+447700900123")
    assert normalize("07700 900123", "GB") == ("phone", "+447700900123")
    assert normalize("07700 900123", "xx") == normalize("07700 900123") == ("invalid", "07700 900123")
    assert normalize("+1 613 555 0111", "gb") == ("phone", "+16135550111")  # a number with its code keeps it


odd_dates = st.one_of(
    st.none(), st.just(0), st.integers(-(2**62), -1), st.just(2**62),  # null, zero, negative, far future
    st.datetimes(min_value=datetime(2001, 1, 2), max_value=datetime(2035, 1, 1)).map(lambda d: d.replace(tzinfo=UTC)),
)


@PROPS
@given(rows=st.lists(st.tuples(hostile, st.booleans(), odd_dates), min_size=1, max_size=25))
def test_every_message_row_is_either_an_activity_or_a_counted_skip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("chat") / "chat.db"
    db = ChatDB.create(path)
    chats: dict[int, int] = {}
    for address, from_me, at in rows:
        handle = db.handle(address)
        chat = chats.get(handle) or chats.setdefault(handle, db.chat([handle]))
        db.message(chat=chat, handle=handle, from_me=from_me, at=at)
    db.close()

    batch = MessagesReader(path).read(0, limit=1000)

    assert batch.rows == len(rows)
    assert len(batch.activities) + sum(batch.skipped.values()) == len(rows)
    stored = {a for a, _, _ in rows}
    for activity in batch.activities:
        assert activity.address in stored  # the counterpart is the row's own handle, nobody else
        assert activity.occurred_ms > 978_307_200_000


@PROPS
@given(rows=st.lists(st.tuples(hostile, st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                                                   st.integers(-(2**40), 2**40)),
                               st.one_of(st.none(), st.floats(-1e12, 1e12), st.just(0.0))),
                     min_size=1, max_size=25))
def test_every_call_row_is_either_an_activity_or_a_counted_skip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("calls") / "CallHistory.storedata"
    db = CallHistoryDB.create(path)
    for address, duration, at in rows:
        db.call(address, at, duration=duration, answered=True)
    db.commit()
    db.close()

    batch = CallsReader(path).read(0, limit=1000)

    assert batch.rows == len(rows)
    assert len(batch.activities) + sum(batch.skipped.values()) == len(rows)
    for activity in batch.activities:
        assert activity.duration_s is None or 0 < activity.duration_s <= 7 * 86_400


# -- end to end: odd rows and odd cards through the real CLI ---------------------------------------

def test_hostile_rows_and_cards_end_to_end_are_handled_or_skipped_never_misfiled(
        library: Library, citadel: CitadelServer, cli: CLI):
    many = [f"+1613555{n:04d}" for n in range(2000, 2050)]  # one card, 50 numbers
    library.card(first="Many", last="Numbers", phones=many)
    library.card(first="\u05d3\u05e0\u05d4", last="Zoe\u0301\u0308", phones=["+972 3 555 1234"])  # RTL, combining
    library.card(first="Ext", last="Ension", phones=["+1 613 555 0199 ext. 42"])
    library.text(many[-1], at=ago(days=1))
    library.text("+97235551234", at=ago(days=1, hours=1))
    library.text("+16135550199", at=ago(days=1, hours=2))
    for odd in ("", "   ", "😀", "x" * 500, "9" * 500, "urn:biz:5c9f1e1a-1111-4a4a-9b9b-123456789abc",
                "+44 20 7946 0958", "+81 3-1234-5678", "+33 1 23 45 67 89"):
        library.text(odd, at=ago(days=2))
    library.text("+16135553000", at=None)
    library.text("+16135553000", at=0)
    library.text("+16135553000", at=2**62)
    library.call("+16135553001", at=ago(days=1), duration=-5, answered=True)
    library.call("+16135553001", at=ago(days=1, hours=1), duration=1e12, answered=True)
    library.call("+16135553001", at=None, duration=30, answered=True)

    result = cli("sync")

    assert result.code == 0, result.output
    assert "Traceback" not in result.output
    by_name = {f"{c['firstName']} {c['lastName']}": c for c in citadel.contacts()}
    many_id = by_name["Many Numbers"]["id"]
    assert [i["type"] for i in citadel.interactions(many_id)] == ["TEXT_INBOUND"]
    rtl = next(c for c in citadel.contacts() if c["phone"] == "+97235551234")
    assert rtl["firstName"] == "\u05d3\u05e0\u05d4" and len(citadel.interactions(rtl["id"])) == 1
    ext = next(c for c in citadel.contacts() if c["lastName"] == "Ension")
    assert len(citadel.interactions(ext["id"])) == 1, citadel.contacts()
    for contact in citadel.contacts():  # every placeholder holds only its own address's interactions
        if contact["firstName"] == "Unknown":
            assert contact["phone"] or contact["email"]
    assert "skipped" in result.stdout


# -- CRM answers that are not Citadel's --------------------------------------------------------------

def test_truncated_crm_answers_are_a_clear_error_not_a_traceback(library: Library, citadel: CitadelServer, cli: CLI):
    library.card(first="Jane", last="Doe", phones=["+16135550111"])
    library.text("+16135550111")
    citadel.faults = Faults(rate=1.0, kinds=("truncate",), reads=True)

    result = cli("sync", timeout=60)

    assert result.code == 1, result.output
    assert "Traceback" not in result.output
    assert "truncated" in result.output.lower()


def test_an_api_url_that_serves_html_is_a_clear_error_not_a_traceback(library: Library, citadel: CitadelServer,
                                                                      cli: CLI):
    library.text("+16135550111")
    cli.env["CRM_SYNCD_API_URL"] = citadel.url + "/nope"

    result = cli("sync", timeout=60)

    assert result.code == 1, result.output
    assert "Traceback" not in result.output
    assert "not a Citadel API route" in result.output


def test_an_oversized_crm_answer_is_a_clear_error_not_a_traceback(library: Library, citadel: CitadelServer,
                                                                  cli: CLI):
    citadel.add_contact(firstName="Huge", lastName="Notes", notes="x" * 21_000_000)

    result = cli("sync", "--contacts-only", timeout=90)

    assert result.code == 1, result.output
    assert "Traceback" not in result.output
    assert "byte limit" in result.output
