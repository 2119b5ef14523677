"""Claims README.md makes that no other test pinned, each checked end to end (settings, calls, dates
ahead of the clock, configuration errors, card edits, placeholders turned off)."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import CLI
from tests.harness.library import Library, ago

JANE = "+16135550111"
UK = "+447700900123"


def names(citadel) -> dict[str, dict]:
    return {f"{c['firstName']} {c['lastName']}": c for c in citadel.contacts()}


def kinds(citadel, name: str) -> Counter:
    return Counter(i["type"] for i in citadel.interactions(names(citadel)[name]["id"]))


# Settings table: initial_lookback_days "Window of the first sync"
def test_initial_lookback_days_bounds_the_first_sync(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=ago(days=40))
    library.call(JANE, answered=True, duration=30, at=ago(days=45))
    library.text(JANE, at=ago(days=5))
    cli.env["CRM_SYNCD_INITIAL_LOOKBACK_DAYS"] = "30"

    result = cli("sync")

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}


# Settings table: default_region "Region for phone numbers without +"
def test_default_region_reads_a_card_number_typed_without_its_country_code(library: Library, citadel, cli: CLI):
    library.card(first="Ann", last="Lee", phones=[("07700 900123", "Mobile", True, None)])
    library.text(UK)
    cli.env["CRM_SYNCD_DEFAULT_REGION"] = "GB"

    result = cli("sync")

    assert result.code == 0, result.output
    assert names(citadel)["Ann Lee"]["phone"] == UK
    assert kinds(citadel, "Ann Lee") == {"TEXT_INBOUND": 1}
    assert len(citadel.contacts()) == 1


# "durationSeconds for connected calls (a zero duration is sent as null)"; "CALL_OUTBOUND (connected or not;
# duration only when connected)"; "occurredAt in UTC with milliseconds"
def test_call_durations_and_times_as_the_readme_says(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    at = ago(hours=3).replace(microsecond=123000)
    library.call(JANE, answered=True, duration=0, at=at)
    library.call(JANE, originated=True, duration=0, at=ago(hours=2))
    library.call(JANE, originated=True, duration=42, at=ago(hours=1))

    assert cli("sync").code == 0

    rows = citadel.interactions(names(citadel)["Jane Doe"]["id"])
    got = Counter((r["type"], r["durationSeconds"]) for r in rows)
    assert got == {("CALL_INBOUND", None): 1, ("CALL_OUTBOUND", None): 1, ("CALL_OUTBOUND", 42): 1}, got
    inbound = next(r for r in rows if r["type"] == "CALL_INBOUND")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", inbound["occurredAt"]), inbound["occurredAt"]
    assert inbound["occurredAt"] == at.strftime("%Y-%m-%dT%H:%M:%S.123Z")


# "a message or call dated over a day ahead ... up to 31 days: nothing yet ...; further ahead, a bad date"
def test_texts_ahead_of_the_clock(library: Library, citadel, cli: CLI):
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.text(JANE, at=datetime.now(UTC) + timedelta(hours=12))  # under a day: a normal text
    library.text(JANE, at=datetime.now(UTC) + timedelta(days=3))  # waits
    library.text(JANE, at=datetime.now(UTC) + timedelta(days=40))  # a bad date

    result = cli("sync")

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1}, result.stdout
    assert "ahead-of-clock 1" in result.stdout and "bad-date 1" in result.stdout, result.stdout


# Configuration: "An invalid setting stops every command with one line naming the setting and where it
# came from, exit code 2"
@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("doctor",), ("retry-failed",), ("run",),
                                     ("install", "--dry-run"), ("sync", "--dry-run")])
def test_an_invalid_setting_stops_every_command_with_one_line_and_exit_2(library: Library, cli: CLI, command):
    cli.env["CRM_SYNCD_BATCH_SIZE"] = "0"

    result = cli(*command)

    assert result.code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "batch_size" in lines[0] and "CRM_SYNCD_BATCH_SIZE" in lines[0], result.output
    assert "Traceback" not in result.output


# Configuration: a misspelt CRM_SYNCD_ variable "is ignored with a warning naming the setting it looks like"
def test_a_misspelt_variable_is_warned_about_by_sync(library: Library, citadel, cli: CLI):
    cli.env["CRM_SYNCD_APIKEY"] = "x"

    result = cli("sync")

    assert result.code == 0, result.output
    assert "CRM_SYNCD_APIKEY" in result.stderr and "CRM_SYNCD_API_KEY" in result.stderr, result.stderr


# Configuration: the legacy JSON is read for its listed keys only
def test_the_legacy_json_sets_only_its_listed_keys(library: Library, citadel, cli: CLI, home):
    (home / ".crm-sync-config.json").write_text(json.dumps({"group_messages": "skip"}))
    library.card(first="Jane", last="Doe", phones=[JANE])
    library.card(first="Bob", last="Roe", phones=["+19025550122"])
    library.group_text([JANE, "+19025550122"])

    assert cli("sync").code == 0

    assert kinds(citadel, "Jane Doe") == {"TEXT_OUTBOUND": 1}


# Contact lifecycle: "Card edits (name, organisation, phone, email, note) are applied to contacts crm-syncd created"
def test_card_edits_of_every_listed_field_reach_the_contact_by_sync(library: Library, citadel, cli: CLI):
    pk = library.card(first="Jane", last="Doe", organization="Acme", phones=[JANE], emails=["jane@acme.example"],
                      note="met at a conference", modified=ago(days=2))
    assert cli("sync").code == 0
    before = names(citadel)["Jane Doe"]

    library.books[0].update_card(pk, first="Janet", organization="Initech", phones=["+16135550199"],
                                 emails=["janet@initech.example"], note="now at Initech")
    library.books[0].commit()
    result = cli("sync")

    assert result.code == 0, result.output
    after = names(citadel)["Janet Doe"]
    assert after["id"] == before["id"]
    assert (after["organization"], after["phone"], after["email"], after["notes"]) == (
        "Initech", "+16135550199", "janet@initech.example", "now at Initech"), after


# Settings: create_unknown_contacts = false "when false their interactions are held"
def test_without_placeholders_an_unknown_persons_texts_are_held_and_reach_them_once_on_a_card(
        library: Library, citadel, cli: CLI):
    library.text(JANE, at=ago(days=3))
    library.call(JANE, answered=True, duration=20, at=ago(days=2))
    cli.env["CRM_SYNCD_CREATE_UNKNOWN_CONTACTS"] = "false"
    first = cli("sync")
    assert first.code == 0 and citadel.contacts() == [], first.output
    assert "held 2" in first.stdout, first.stdout

    library.card(first="Jane", last="Doe", phones=[JANE])
    result = cli("sync")

    assert result.code == 0, result.output
    assert kinds(citadel, "Jane Doe") == {"TEXT_INBOUND": 1, "CALL_INBOUND": 1}, result.stdout
