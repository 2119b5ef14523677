"""The stand-in Citadel behaves like the contract in citadel-api.md, quirks included (raw HTTP)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.citadel import CitadelServer, Faults

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def crm(tmp_path: Path) -> Iterator[CitadelServer]:
    with CitadelServer(tmp_path / "citadel.db") as server:
        yield server
    assert server.errors == [], "the stand-in itself raised"


@pytest.fixture
def http(crm: CitadelServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=crm.url, timeout=5) as client:
        yield client


def new_contact(http: httpx.Client, **fields: object) -> int:
    r = http.post("/api/contacts", json={"firstName": "Ann", "lastName": "Lee", **fields})
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def new_contact_direct(crm: CitadelServer) -> int:
    return crm.add_contact(firstName="Ann", lastName="Lee")


def post_interaction(http: httpx.Client, contact_id: int, **fields: object) -> httpx.Response:
    body = {"type": "TEXT_OUTBOUND", "occurredAt": "2024-03-01T10:00:00.000Z", "source": "IMPORT_IOS", **fields}
    return http.post(f"/api/contacts/{contact_id}/interactions", json=body)


def error_of(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


# -- basics -------------------------------------------------------------------------------------


def test_health_is_not_wrapped_in_data(http: httpx.Client) -> None:
    r = http.get("/api/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_created_contact_is_wrapped_has_crm_keys_and_drops_unknown_fields(http: httpx.Client) -> None:
    r = http.post("/api/contacts", json={"firstName": "Ann", "lastName": "Lee", "phone": "(902) 555-1234",
                                         "externalId": "abc", "lastContactedAt": "2020-01-01T00:00:00Z"})
    assert r.status_code == 201
    c = r.json()["data"]
    assert c["phone"] == "(902) 555-1234"  # stored exactly as sent
    assert "externalId" not in c and c["lastContactedAt"] is None
    assert (c["tags"], c["groups"], c["notableDates"], c["region"]) == ([], [], [], None)
    assert http.get(f"/api/contacts/{c['id']}").json()["data"] == c


def test_requests_share_one_keep_alive_connection(crm: CitadelServer, http: httpx.Client) -> None:
    for _ in range(5):
        assert http.get("/api/health").status_code == 200
    assert crm.connections_accepted == 1


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_as_node_does(tmp_path: Path) -> None:
    with CitadelServer(tmp_path / "idle.db", keepalive_timeout_s=0.2) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):  # the answer, then the end of the stream once idle
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b"Connection: keep-alive" in answer
        assert server.connections_accepted == 1


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"firstName": "Ann"}, "lastName"),
        ({"firstName": "", "lastName": "Lee"}, "firstName"),
        ({"lastName": "Lee"}, "firstName"),
        ({"firstName": "Ann", "lastName": "Lee", "email": "not-an-email"}, "email"),
        ({"firstName": "Ann", "lastName": "Lee", "phone": 9025551234}, "phone"),
    ],
)
def test_contact_validation_is_422_with_details_per_field(http: httpx.Client, body: dict, field: str) -> None:
    r = http.post("/api/contacts", json=body)
    assert r.status_code == 422
    err = error_of(r)
    assert err["code"] == "VALIDATION_ERROR" and list(err["details"]) == [field]


@pytest.mark.parametrize("email", [
    "ann@example.com,", "ann@example.com;", "<ann@example.com>", "Ann Lee <ann@example.com>",  # pasted from a list
    "ann@example..com", ".ann@example.com", "ann.@example.com", "ann@example.c", "ann@example",
    "ann@-example.com", "änn@exämple.de", "ann@exämple.de", "ann@example.\u212az",  # non-ASCII (a Kelvin sign)
    "ann@example.com\n", "ann@@example.com",
])
def test_an_email_zods_email_rule_refuses_is_422_invalid_email(http: httpx.Client, email: str) -> None:
    r = http.post("/api/contacts", json={"firstName": "Ann", "lastName": "Lee", "email": email})
    assert r.status_code == 422, r.text
    assert error_of(r)["details"] == {"email": ["Invalid email"]}


@pytest.mark.parametrize("email", [
    "ann@example.com", "Ann.Lee+crm@Mail.Example.co.uk", "o'neil@example.ie", "a_b-c@x-y.example.museum",
])
def test_an_email_zods_email_rule_takes_is_stored_as_sent(http: httpx.Client, email: str) -> None:
    r = http.post("/api/contacts", json={"firstName": "Ann", "lastName": "Lee", "email": email})
    assert r.status_code == 201 and r.json()["data"]["email"] == email, r.text


def test_missing_last_name_reads_required(http: httpx.Client) -> None:
    assert error_of(http.post("/api/contacts", json={"firstName": "Ann"}))["details"] == {"lastName": ["Required"]}


def test_empty_email_is_accepted_as_none(http: httpx.Client) -> None:
    r = http.post("/api/contacts", json={"firstName": "Ann", "lastName": "Lee", "email": ""})
    assert r.status_code == 201 and r.json()["data"]["email"] is None


def test_put_is_partial_validated_and_ignores_last_contacted(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact(http, email="ann@example.com")
    r = http.put(f"/api/contacts/{cid}", json={"lastName": "Smith", "lastContactedAt": "2020-01-01T00:00:00Z"})
    assert r.status_code == 200
    c = r.json()["data"]
    assert (c["firstName"], c["lastName"], c["email"], c["lastContactedAt"]) == ("Ann", "Smith", "ann@example.com", None)
    assert http.put(f"/api/contacts/{cid}", json={"firstName": ""}).status_code == 422
    assert error_of(http.put("/api/contacts/999", json={"lastName": "X"}))["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"durationSeconds": 0}, "durationSeconds"),
        ({"durationSeconds": 12.5}, "durationSeconds"),
        ({"durationSeconds": "145"}, "durationSeconds"),
        ({"type": "call_inbound"}, "type"),
        ({"type": "PHONE"}, "type"),
        ({"source": "ios"}, "source"),
        ({"occurredAt": None}, "occurredAt"),
        ({"occurredAt": "yesterday"}, "occurredAt"),
        ({"occurredAt": "2024-02-30T10:00:00Z"}, "occurredAt"),
    ],
)
def test_single_interaction_post_is_strict(http: httpx.Client, fields: dict, field: str) -> None:
    cid = new_contact(http)
    r = post_interaction(http, cid, **fields)
    assert r.status_code == 422
    assert field in error_of(r)["details"]


def test_interaction_without_duration_and_source_defaults_to_manual(http: httpx.Client) -> None:
    cid = new_contact(http)
    r = http.post(f"/api/contacts/{cid}/interactions", json={"type": "CALL_MISSED", "occurredAt": "2024-03-01T10:00:00Z"})
    assert r.status_code == 201
    i = r.json()["data"]
    assert (i["contactId"], i["source"], i["durationSeconds"], i["content"]) == (cid, "MANUAL", None, None)
    assert post_interaction(http, cid, type="CALL_INBOUND", durationSeconds=145).json()["data"]["durationSeconds"] == 145


# -- timestamps and days ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2024-03-01T10:00:00.123999Z", "2024-03-01T10:00:00.123Z"),  # microseconds are cut
        ("2024-03-01T10:00:00+02:00", "2024-03-01T08:00:00.000Z"),
        ("2024-03-01T23:30:00.5-05:00", "2024-03-02T04:30:00.500Z"),
        ("2024-03-01", "2024-03-01T00:00:00.000Z"),  # a date alone is UTC midnight, as in JavaScript
    ],
)
def test_occurred_at_is_stored_with_ms_precision_in_utc(http: httpx.Client, sent: str, stored: str) -> None:
    cid = new_contact(http)
    assert post_interaction(http, cid, occurredAt=sent).json()["data"]["occurredAt"] == stored


def test_date_filter_selects_one_utc_day_newest_first(http: httpx.Client) -> None:
    cid = new_contact(http)
    for when in ("2024-03-01T23:59:59.999Z", "2024-03-02T00:00:00.000Z", "2024-03-01T00:00:00.000Z",
                 "2024-03-01T12:00:00.000Z", "2024-02-29T23:59:59.999Z", "2024-03-02T01:00:00+02:00"):
        assert post_interaction(http, cid, occurredAt=when).status_code == 201
    r = http.get(f"/api/contacts/{cid}/interactions", params={"date": "2024-03-01"})
    got = [i["occurredAt"] for i in r.json()["data"]]
    assert got == ["2024-03-01T23:59:59.999Z", "2024-03-01T23:00:00.000Z", "2024-03-01T12:00:00.000Z",
                   "2024-03-01T00:00:00.000Z"]
    assert r.json()["meta"]["total"] == 4


def test_interactions_default_limit_20_capped_at_100(http: httpx.Client) -> None:
    cid = new_contact(http)
    for n in range(105):
        post_interaction(http, cid, occurredAt=f"2024-03-01T10:{n // 60:02d}:{n % 60:02d}Z")
    meta = http.get(f"/api/contacts/{cid}/interactions").json()["meta"]
    assert (meta["limit"], meta["total"], meta["totalPages"]) == (20, 105, 6)
    r = http.get(f"/api/contacts/{cid}/interactions", params={"limit": 500, "page": 2})
    assert r.json()["meta"]["limit"] == 100 and len(r.json()["data"]) == 5


def test_last_contacted_is_the_newest_outbound_after_each_single_post(http: httpx.Client) -> None:
    cid = new_contact(http)

    def last() -> str | None:
        return http.get(f"/api/contacts/{cid}").json()["data"]["lastContactedAt"]

    post_interaction(http, cid, type="TEXT_INBOUND", occurredAt="2024-03-05T00:00:00Z")
    assert last() is None  # inbound does not count
    post_interaction(http, cid, type="CALL_OUTBOUND", occurredAt="2024-03-02T00:00:00Z", durationSeconds=60)
    assert last() == "2024-03-02T00:00:00.000Z"
    post_interaction(http, cid, type="TEXT_OUTBOUND", occurredAt="2024-03-01T00:00:00Z")
    assert last() == "2024-03-02T00:00:00.000Z"  # an older outbound does not move it back


# -- 404s ---------------------------------------------------------------------------------------


def test_unknown_contact_is_json_404_everywhere_but_listing_its_interactions(http: httpx.Client) -> None:
    for r in (http.get("/api/contacts/4242"), http.put("/api/contacts/4242", json={"firstName": "A"}),
              http.delete("/api/contacts/4242"), post_interaction(http, 4242)):
        assert r.status_code == 404 and error_of(r)["code"] == "NOT_FOUND"
    r = http.get("/api/contacts/4242/interactions")
    assert r.status_code == 200 and r.json()["data"] == []


def test_delete_cascades_interactions(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact(http)
    post_interaction(http, cid)
    r = http.delete(f"/api/contacts/{cid}")
    assert (r.status_code, r.json()) == (200, {"data": {"deleted": True}})
    assert crm.interactions() == [] and http.get(f"/api/contacts/{cid}").status_code == 404


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/nope"), ("GET", "/contacts"), ("PATCH", "/api/contacts/1")])
def test_unknown_routes_answer_an_html_404_page(http: httpx.Client, method: str, path: str) -> None:
    r = http.request(method, path)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html")
    assert f"Cannot {method} {path}" in r.text


# -- the 500 quirks -----------------------------------------------------------------------------


def test_client_mistakes_come_back_as_500_internal_error(http: httpx.Client) -> None:
    cid = new_contact(http)
    big = json.dumps({"firstName": "A", "lastName": "B", "notes": "x" * (5 * 1024 * 1024)})
    responses = [
        http.post("/api/contacts", content=b'{"firstName": "A", ', headers={"Content-Type": "application/json"}),
        http.get("/api/contacts/abc"),
        http.post("/api/contacts/abc/interactions", json={}),
        http.get(f"/api/contacts/{cid}/interactions", params={"date": "garbage"}),
        http.post("/api/contacts", content=big, headers={"Content-Type": "application/json"}),
        http.get("/api/contacts", headers={"Origin": "http://localhost:3000"}),
    ]
    for r in responses:
        assert (r.status_code, error_of(r)["code"]) == (500, "INTERNAL_ERROR"), r.request.url
    assert http.get("/api/health").status_code == 200  # the connection is still usable


# -- listing ------------------------------------------------------------------------------------


def test_contacts_default_sort_is_first_then_last_name(crm: CitadelServer, http: httpx.Client) -> None:
    for first, last in [("Zoe", "Adams"), ("Ann", "Young"), ("Ann", "Baker"), ("bob", "Cole")]:
        crm.add_contact(firstName=first, lastName=last)
    names = [(c["firstName"], c["lastName"]) for c in http.get("/api/contacts").json()["data"]]
    assert names == [("Ann", "Baker"), ("Ann", "Young"), ("bob", "Cole"), ("Zoe", "Adams")]
    desc = http.get("/api/contacts", params={"sort": "name_desc"}).json()["data"]
    assert [(c["firstName"], c["lastName"]) for c in desc] == names[::-1]


def test_contacts_limit_defaults_to_25_and_is_capped_at_100(crm: CitadelServer, http: httpx.Client) -> None:
    for n in range(130):
        crm.add_contact(firstName=f"P{n:03d}", lastName="X")
    assert http.get("/api/contacts").json()["meta"] == {"page": 1, "limit": 25, "total": 130, "totalPages": 6}
    r = http.get("/api/contacts", params={"limit": 1000, "page": 2}).json()
    assert r["meta"]["limit"] == 100 and [c["firstName"] for c in r["data"]] == [f"P{n:03d}" for n in range(100, 130)]


def test_unstable_ties_order_equal_rows_anew_for_each_query_and_alike_when_it_comes_again(
        crm: CitadelServer, http: httpx.Client) -> None:
    for _ in range(40):
        crm.add_contact(firstName="Sam", lastName="Same")

    def order(limit: int = 100, sort: str = "name_asc") -> tuple[int, ...]:
        return tuple(c["id"] for c in http.get("/api/contacts", params={"limit": limit, "sort": sort}).json()["data"])

    assert order() == order() == tuple(sorted(order()))  # stable by default
    crm.unstable_ties = True
    assert order() == order()  # a query asked again: the same order, so the same rows missed again
    orders = {order(limit) for limit in (100, 99, 98, 97, 96)} | {order(100, "name_desc"), order(100, "created_desc")}
    assert len(orders) > 1  # 40! orders: equal draws are practically impossible
    assert {tuple(sorted(o)) for o in orders} == {tuple(sorted(order()))}  # one page holds them all


def test_search_is_case_insensitive_and_every_word_must_match(crm: CitadelServer, http: httpx.Client) -> None:
    ann = crm.add_contact(firstName="Ann", lastName="Lee", email="ann@Example.com", organization="Acme Corp")
    crm.add_contact(firstName="Anne", lastName="Ho", phone="(902) 555-1234")
    crm.add_contact(firstName="Bob", lastName="Acme")

    def ids(q: str) -> set[int]:
        return {c["id"] for c in http.get("/api/contacts", params={"search": q}).json()["data"]}

    assert ids("EXAMPLE.COM") == {ann}
    assert len(ids("ann")) == 2
    assert ids("ann acme") == {ann}
    assert len(ids("555-1234")) == 1
    assert ids("+19025551234") == set()  # a raw substring match, no phone normalisation


# -- bulk imports -------------------------------------------------------------------------------


def test_contact_import_is_lax_and_returns_no_ids(crm: CitadelServer, http: httpx.Client) -> None:
    rows = [
        {"first_name": "Ann", "last_name": "Lee", "email": "not-an-email", "notes": 5},
        {"organization": "Acme Corp", "phone": "+1 902 555 1234"},
        {"firstName": "OnlyFirst"},
        "not a row",
    ]
    r = http.post("/api/import/contacts", json=rows)
    assert r.status_code == 200
    data = r.json()["data"]
    assert (data["imported"], data["skipped"]) == (2, 2) and [e["row"] for e in data["errors"]] == [3, 4]
    got = [(c["firstName"], c["lastName"], c["email"], c["notes"], c["organization"]) for c in crm.contacts()]
    assert got == [("Ann", "Lee", "not-an-email", None, None), ("", "Acme Corp", None, None, "Acme Corp")]


def test_interaction_import_matches_exact_email_and_does_not_recompute(crm: CitadelServer, http: httpx.Client) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee", email="Ann@example.com")
    rows = [
        {"email": "Ann@example.com", "type": "text_outbound", "occurred_at": "2024-03-01T10:00:00Z", "duration_seconds": 0},
        {"contact_email": "Ann@example.com", "type": "CALL_OUTBOUND", "occurredAt": "2024-03-02T10:00:00Z",
         "duration_seconds": 30, "source": "import_ios"},
        {"email": "ann@example.com", "type": "TEXT_OUTBOUND", "occurred_at": "2024-03-03T10:00:00Z"},
    ]
    data = http.post("/api/import/interactions", json=rows).json()["data"]
    assert (data["imported"], data["skipped"]) == (2, 1) and data["errors"][0]["row"] == 3
    got = [(i["type"], i["durationSeconds"], i["source"]) for i in crm.interactions(cid)]
    assert got == [("TEXT_OUTBOUND", None, "MANUAL"), ("CALL_OUTBOUND", 30, "IMPORT_IOS")]
    assert crm.contacts()[0]["lastContactedAt"] is None  # stale until the next single POST
    post_interaction(http, cid, type="TEXT_INBOUND", occurredAt="2024-01-01T00:00:00Z")
    assert crm.contacts()[0]["lastContactedAt"] == "2024-03-02T10:00:00.000Z"


# -- auth ---------------------------------------------------------------------------------------


def test_api_key_requires_the_bearer_header(tmp_path: Path) -> None:
    with CitadelServer(tmp_path / "c.db", api_key="s3cret") as crm, httpx.Client(base_url=crm.url) as http:
        assert http.get("/api/contacts").status_code == 401
        assert error_of(http.get("/api/contacts", headers={"Authorization": "Bearer nope"}))["code"] == "UNAUTHORIZED"
        assert http.get("/api/contacts", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# -- controls: faults, latency, outages, stats, helpers -----------------------------------------


@pytest.mark.parametrize("kind", ["502", "503", "504"])
def test_busy_faults_answer_the_status(crm: CitadelServer, http: httpx.Client, kind: str) -> None:
    crm.faults = Faults(rate=1.0, kinds=(kind,))
    assert post_interaction(http, new_contact_direct(crm)).status_code == int(kind)
    assert crm.interactions() == []


def test_429_fault_carries_retry_after(crm: CitadelServer, http: httpx.Client) -> None:
    crm.faults = Faults(rate=1.0, kinds=("429",))
    r = post_interaction(http, new_contact_direct(crm))
    assert (r.status_code, r.headers["retry-after"]) == (429, "1")


def test_500_after_write_writes_then_fails_and_before_write_does_not(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact_direct(crm)
    crm.faults = Faults(rate=1.0, kinds=("500-before-write",))
    assert post_interaction(http, cid).status_code == 500
    assert crm.interactions(cid) == []
    crm.faults = Faults(rate=1.0, kinds=("500-after-write",))
    r = post_interaction(http, cid)
    assert (r.status_code, error_of(r)["code"]) == (500, "INTERNAL_ERROR")
    assert len(crm.interactions(cid)) == 1


def test_faults_spare_reads_unless_asked_and_respect_their_limit(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact_direct(crm)
    crm.faults = Faults(rate=1.0, kinds=("503",), limit=2)
    assert http.get("/api/contacts").status_code == 200
    assert [post_interaction(http, cid).status_code for _ in range(3)] == [503, 503, 201]
    crm.faults = Faults(rate=1.0, kinds=("503",), reads=True)
    assert http.get("/api/contacts").status_code == 503


def test_fault_rate_is_seeded(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact_direct(crm)

    def run() -> list[int]:
        crm.faults = Faults(rate=0.5, kinds=("503", "429"), seed=7)
        return [post_interaction(http, cid).status_code for _ in range(20)]

    first = run()
    assert first == run() and {201, 503, 429} == set(first)


def test_reset_and_timeout_faults_give_no_answer(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact_direct(crm)
    crm.faults = Faults(rate=1.0, kinds=("reset",))
    with pytest.raises(httpx.TransportError):
        post_interaction(http, cid)
    crm.faults = Faults(rate=1.0, kinds=("timeout",))
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        http.post(f"/api/contacts/{cid}/interactions", json={}, timeout=0.3)
    assert time.monotonic() - started < 2
    assert crm.interactions() == [] and crm.stats[("POST", "/api/contacts/:id/interactions", "reset")] == 1


def test_slow_fault_and_latency_delay_but_answer(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact_direct(crm)
    crm.faults = Faults(rate=1.0, kinds=("slow",), slow_s=0.2)
    started = time.monotonic()
    assert post_interaction(http, cid).status_code == 201
    assert time.monotonic() - started >= 0.2
    crm.faults, crm.latency_s = Faults(), 0.1
    started = time.monotonic()
    assert http.get("/api/health").status_code == 200
    assert time.monotonic() - started >= 0.1


def test_truncate_fault_sends_half_the_body(crm: CitadelServer, http: httpx.Client) -> None:
    crm.faults = Faults(rate=1.0, kinds=("truncate",))
    with pytest.raises(httpx.RemoteProtocolError):
        post_interaction(http, new_contact_direct(crm))


def test_go_down_refuses_connections_and_come_up_keeps_port_and_data(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact(http)
    port = crm.port
    crm.go_down()
    with pytest.raises(httpx.ConnectError):
        http.get("/api/health")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    crm.come_up()
    assert crm.port == port
    assert http.get(f"/api/contacts/{cid}").json()["data"]["firstName"] == "Ann"


def test_stats_count_requests_per_route_template(crm: CitadelServer, http: httpx.Client) -> None:
    cid = new_contact(http)
    post_interaction(http, cid)
    post_interaction(http, cid)
    http.get("/api/contacts/999")
    http.get("/api/nope")
    assert crm.stats[("POST", "/api/contacts/:id/interactions", 201)] == 2
    assert crm.stats[("GET", "/api/contacts/:id", 404)] == 1
    assert crm.stats[("GET", "*", 404)] == 1


def test_helpers_seed_edit_and_delete_the_database_directly(crm: CitadelServer, http: httpx.Client) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee", phone="902.555.1234 ext 5", cadenceDays=7)
    assert http.get(f"/api/contacts/{cid}").json()["data"]["phone"] == "902.555.1234 ext 5"
    crm.update_contact(cid, email="ann@example.com")
    assert {c["id"] for c in http.get("/api/contacts", params={"search": "ann@example"}).json()["data"]} == {cid}
    post_interaction(http, cid, occurredAt="2024-03-01T00:00:00Z")
    assert crm.contacts()[0]["contactDueAt"] == "2024-03-08T00:00:00.000Z"  # lastContactedAt + cadence
    crm.delete_contact(cid)
    assert crm.contacts() == [] and crm.interactions() == []
    with pytest.raises(KeyError):
        crm.delete_contact(cid)


def test_data_persists_across_server_objects(tmp_path: Path) -> None:
    with CitadelServer(tmp_path / "c.db") as first:
        cid = first.add_contact(firstName="Ann", lastName="Lee")
    with CitadelServer(tmp_path / "c.db") as second, httpx.Client(base_url=second.url) as http:
        assert http.get(f"/api/contacts/{cid}").status_code == 200
        assert new_contact(http) > cid  # ids are never reused


def test_runs_as_a_process_until_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.harness.citadel", "--db", str(tmp_path / "p.db"), "--latency-ms", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert httpx.get(url + "/api/health").json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
