"""CitadelClient against the real stand-in over real HTTP: results, paging and the error tree."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from crm_syncd import __version__
from crm_syncd.crm import (
    Ambiguous,
    BadResponse,
    CitadelClient,
    CRMError,
    NotFound,
    Redirected,
    Rejected,
    ServerBusy,
    Throttled,
    Transient,
    Unauthorized,
    Unreachable,
    Untrusted,
)
from tests.harness.citadel import CitadelServer, Faults, self_signed_tls

T = TypeVar("T")
KEY = "sk-live-5ecret-key-0042"
TEXT = {"type": "TEXT_OUTBOUND", "occurredAt": "2024-03-01T10:00:00.000Z", "source": "IMPORT_IOS"}


@pytest.fixture
def crm(tmp_path: Path) -> Iterator[CitadelServer]:
    with CitadelServer(tmp_path / "citadel.db") as server:
        yield server
    assert server.errors == [], "the stand-in itself raised"


def run(url: str, use: Callable[[CitadelClient], Awaitable[T]], **options: Any) -> T:
    """Run `use(client)` on a fresh client in a fresh event loop."""

    async def main() -> T:
        async with CitadelClient(url, **options) as client:
            return await use(client)

    return asyncio.run(main())


def raises(kind: type[CRMError], url: str, use: Callable[[CitadelClient], Awaitable[Any]], **options: Any) -> CRMError:
    with pytest.raises(kind) as caught:
        run(url, use, **options)
    return caught.value


# -- results ------------------------------------------------------------------------------------


def test_the_health_check_passes_when_up_and_raises_why_when_down_or_wrong(crm: CitadelServer) -> None:
    assert run(crm.url, lambda c: c.check_health()) is None
    raises(BadResponse, crm.url + "/not-citadel", lambda c: c.check_health())  # HTML 404
    crm.go_down()
    raises(Unreachable, crm.url, lambda c: c.check_health())


def test_contact_crud_round_trip(crm: CitadelServer) -> None:
    async def use(c: CitadelClient) -> tuple[dict, dict, dict]:
        created = await c.create_contact({"firstName": "Ann", "lastName": "Lee", "phone": "+19025551234"})
        updated = await c.update_contact(created["id"], {"lastName": "Smith"})
        fetched = await c.get_contact(created["id"])
        await c.delete_contact(created["id"])
        return created, updated, fetched

    created, updated, fetched = run(crm.url, use)
    assert created["phone"] == "+19025551234" and updated["lastName"] == "Smith" and fetched == updated
    assert crm.contacts() == []


def test_create_interaction_returns_it_with_its_id(crm: CitadelServer) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    made = run(crm.url, lambda c: c.create_interaction(cid, {**TEXT, "occurredAt": "2024-03-01T10:00:00.123456Z"}))
    assert made["occurredAt"] == "2024-03-01T10:00:00.123Z"
    assert crm.interactions(cid) == [made]


def test_list_contacts_yields_every_contact_once_despite_unstable_ties(crm: CitadelServer) -> None:
    for _ in range(260):
        crm.add_contact(firstName="Sam", lastName="Same")  # the same name: paging by name shuffles them
    for n in range(60):
        crm.add_contact(firstName=f"P{n}", lastName="Other")
    crm.unstable_ties = True
    listed = run(crm.url, lambda c: c.list_contacts())
    assert sorted(c["id"] for c in listed) == [c["id"] for c in crm.contacts()]
    assert crm.stats[("GET", "/api/contacts", 200)] >= 4  # 4 pages; more when a pass came up short


def test_list_contacts_of_an_empty_crm_is_empty(crm: CitadelServer) -> None:
    assert run(crm.url, lambda c: c.list_contacts()) == []


def test_newest_contact_is_the_count_and_the_last_made_in_one_request(crm: CitadelServer) -> None:
    assert run(crm.url, lambda c: c.newest_contact()) == (0, None)
    for n in range(150):
        crm.add_contact(firstName=f"P{n}", lastName="Other")
    last = crm.add_contact(firstName="Aaron", lastName="First")  # first by name, last by creation
    crm.stats.clear()
    assert run(crm.url, lambda c: c.newest_contact()) == (151, last)
    assert crm.stats == {("GET", "/api/contacts", 200): 1}


    cid = crm.add_contact(firstName="Ann", lastName="Lee")

    async def use(c: CitadelClient) -> list[dict]:
        for n in range(230):  # 3 pages, many equal timestamps
            await c.create_interaction(cid, {**TEXT, "occurredAt": f"2024-03-01T10:00:{n % 7:02d}Z"})
        await c.create_interaction(cid, {**TEXT, "occurredAt": "2024-03-02T00:00:00Z"})
        return await c.list_interactions(cid, dt.date(2024, 3, 1))

    got = run(crm.url, use)
    assert len(got) == 230 == len({i["id"] for i in got})
    assert run(crm.url, lambda c: c.list_interactions(4242, dt.date(2024, 3, 1))) == []


def test_list_interactions_reads_every_row_of_a_day_whose_equal_times_straddle_pages(crm: CitadelServer) -> None:
    """Ties at a page's end may be missed, and missed again by the same query: each pass pages another way."""
    cid = crm.add_contact(firstName="Ann", lastName="Lee")

    async def use(c: CitadelClient) -> None:
        for n in range(230):  # newest first; rows 96-104 share one time, rows 196-204 another
            second = 229 - (96 if 96 <= n < 105 else 196 if 196 <= n < 205 else n)
            await c.create_interaction(cid, {**TEXT, "occurredAt": f"2024-03-01T10:{second // 60:02d}:{second % 60:02d}Z"})

    run(crm.url, use)
    crm.unstable_ties = True
    for salt in range(10):
        crm.tie_salt = salt
        got = run(crm.url, lambda c: c.list_interactions(cid, dt.date(2024, 3, 1)))
        assert len(got) == 230 == len({i["id"] for i in got}), salt


def test_list_interactions_refuses_a_datetime(crm: CitadelServer) -> None:
    with pytest.raises(TypeError):
        run(crm.url, lambda c: c.list_interactions(1, dt.datetime(2024, 3, 1, 23, 0)))  # type: ignore[arg-type]


def test_requests_carry_user_agent_and_no_origin(crm: CitadelServer) -> None:
    run(crm.url, lambda c: c.list_contacts())  # the stand-in answers 500 to any Origin header
    assert crm.last_headers["user-agent"] == f"crm-syncd/{__version__}"
    assert "origin" not in crm.last_headers and "authorization" not in crm.last_headers


def test_connections_are_kept_alive(crm: CitadelServer) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")

    async def use(c: CitadelClient) -> None:
        for _ in range(20):
            await c.get_contact(cid)

    run(crm.url, use)
    assert crm.connections_accepted == 1


def test_a_request_after_the_server_closed_the_idle_connection_goes_out_once_on_a_new_one(tmp_path: Path) -> None:
    with CitadelServer(tmp_path / "idle.db", keepalive_timeout_s=0.2) as server:
        cid = server.add_contact(firstName="Ann", lastName="Lee")

        async def use(c: CitadelClient) -> None:
            await c.create_interaction(cid, TEXT)
            deadline = time.monotonic() + 10
            while server.open_connections and time.monotonic() < deadline:  # the server closes it, idle
                await asyncio.sleep(0.02)
            assert server.open_connections == 0
            await c.create_interaction(cid, {**TEXT, "occurredAt": "2024-03-01T10:00:01.000Z"})

        run(server.url, use)
        assert server.connections_accepted == 2
        assert server.stats[("POST", "/api/contacts/:id/interactions", 201)] == 2 and len(server.interactions()) == 2


def test_concurrent_requests_share_at_most_max_connections_each_with_the_key(crm: CitadelServer) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")

    async def use(c: CitadelClient) -> list[dict]:
        return await asyncio.gather(*(c.create_interaction(cid, {**TEXT, "occurredAt": f"2024-03-01T10:00:{s:02d}.000Z"})
                                      for s in range(40)))

    crm.require_key(KEY)  # a request without it would be refused
    created = run(crm.url, use, api_key=KEY, max_connections=3)
    assert len({i["id"] for i in created}) == 40
    assert 1 <= crm.connections_accepted <= 3


# -- the error tree -----------------------------------------------------------------------------


def test_422_is_rejected_with_details_and_a_one_line_reason(crm: CitadelServer) -> None:
    err = raises(Rejected, crm.url, lambda c: c.create_contact({"firstName": "Ann"}))
    assert str(err) == "422: lastName: Required"
    assert err.details == {"lastName": ["Required"]} and err.reason == "lastName: Required"  # type: ignore[attr-defined]
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    err = raises(Rejected, crm.url, lambda c: c.create_interaction(cid, {**TEXT, "durationSeconds": 0}))
    assert list(err.details) == ["durationSeconds"] and "\n" not in err.reason  # type: ignore[attr-defined]


def test_unknown_contact_is_not_found(crm: CitadelServer) -> None:
    for use in (lambda c: c.get_contact(4242), lambda c: c.update_contact(4242, {"firstName": "A"}),
                lambda c: c.delete_contact(4242), lambda c: c.create_interaction(4242, TEXT)):
        err = raises(NotFound, crm.url, use)
        assert err.status == 404 and str(err) == "404: Contact not found"


def test_an_api_url_copied_from_a_browser_with_a_fragment_reaches_the_api_at_its_paths(crm: CitadelServer) -> None:
    """`http://host:port/#/contacts`, the address bar of a hash-routed web app: a fragment is never
    sent, so the API is where it is without one."""
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    contacts = run(crm.url + "/#/contacts", lambda c: c.list_contacts())
    assert [c["id"] for c in contacts] == [cid]


def test_html_404_from_a_wrong_base_url_is_a_bad_response(crm: CitadelServer) -> None:
    err = raises(BadResponse, crm.url + "/wrong-prefix", lambda c: c.get_contact(1))
    assert err.status == 404


def test_response_larger_than_the_limit_is_a_bad_response(crm: CitadelServer) -> None:
    crm.add_contact(firstName="Ann", lastName="Lee", notes="x" * 500)
    err = raises(BadResponse, crm.url, lambda c: c.list_contacts(), max_response_bytes=200)
    assert "limit" in str(err)


def test_truncated_body_is_a_bad_response(crm: CitadelServer) -> None:
    crm.faults = Faults(rate=1.0, kinds=("truncate",))
    err = raises(BadResponse, crm.url, lambda c: c.create_contact({"firstName": "Ann", "lastName": "Lee"}))
    assert err.status == 201 and err.maybe_written is True
    assert len(crm.contacts()) == 1  # the write happened; only the answer was cut


def test_a_500_cut_off_mid_body_may_have_written_as_any_500_to_a_write(crm: CitadelServer) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    crm.faults = Faults(rate=1.0, kinds=("500-after-write-truncated",), reads=True)
    write = raises(BadResponse, crm.url, lambda c: c.create_interaction(cid, TEXT))
    read = raises(BadResponse, crm.url, lambda c: c.list_interactions(cid, dt.date(2024, 3, 1)))
    assert (write.status, write.maybe_written, read.maybe_written) == (500, True, False)
    assert len(crm.interactions(cid)) == 1


def test_500_after_write_is_ambiguous_and_the_write_happened(crm: CitadelServer) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    crm.faults = Faults(rate=1.0, kinds=("500-after-write",))
    err = raises(Ambiguous, crm.url, lambda c: c.create_interaction(cid, TEXT))
    assert err.status == 500 and not isinstance(err, Transient)
    assert len(crm.interactions(cid)) == 1


@pytest.mark.parametrize("status, written", [(502, True), (504, True), (503, False), (520, True), (521, False),
                                             (522, False), (523, False), (524, True)])
def test_a_proxys_502_504_520_or_524_to_a_write_may_have_written_and_may_still_be_writing_the_others_did_not(
        crm: CitadelServer, status: int, written: bool) -> None:
    """Cloudflare's 521-523 say it never reached the origin; its 520 and 524, like a 502 or 504, that the
    origin had the request: it may have written, or be writing still."""
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    crm.faults = Faults(rate=1.0, kinds=(str(status),), reads=True)
    read = raises(ServerBusy, crm.url, lambda c: c.list_interactions(cid, dt.date(2024, 3, 1)))
    write = raises(ServerBusy, crm.url, lambda c: c.create_interaction(cid, TEXT))
    assert (read.maybe_written, write.maybe_written, write.in_flight) == (False, written, written)


def test_a_500_page_from_a_proxy_or_a_cut_off_500_may_still_be_writing_citadels_own_500_is_done(
        crm: CitadelServer) -> None:
    """Citadel's 500 (in its JSON envelope) comes once it is done with the request; a proxy's HTML 500,
    or a 500 cut off mid-answer, may come while the CRM still works on it."""
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    errors = {}
    for fault in ("500-page", "500-after-write-truncated", "500-after-write"):
        crm.faults = Faults(rate=1.0, kinds=(fault,))
        errors[fault] = raises(CRMError, crm.url, lambda c: c.create_interaction(cid, TEXT))
    assert {fault: (err.maybe_written, err.in_flight) for fault, err in errors.items()} == {
        "500-page": (True, True), "500-after-write-truncated": (True, True), "500-after-write": (True, False)}


@pytest.mark.parametrize("status", ["400", "405", "413"])
def test_a_bare_4xx_page_from_a_proxy_is_a_bad_response_not_the_crm_rejecting_the_item(
        crm: CitadelServer, status: str) -> None:
    """Citadel's 4xx come in its JSON error envelope; an HTML 400/405/413 is a load balancer's or a proxy's."""
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    crm.faults = Faults(rate=1.0, kinds=(status,))
    err = raises(BadResponse, crm.url, lambda c: c.create_interaction(cid, TEXT))
    assert err.status == int(status) and not err.maybe_written and "not Citadel's answer" in str(err)
    assert crm.interactions(cid) == []


@pytest.mark.parametrize("fault", ["data-null-after-write", "id-less-after-write"])
def test_a_2xx_to_a_write_without_its_records_id_is_a_bad_response_that_was_accepted(
        crm: CitadelServer, fault: str) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    crm.faults = Faults(rate=1.0, kinds=(fault,))
    interaction = raises(BadResponse, crm.url, lambda c: c.create_interaction(cid, TEXT))
    contact = raises(BadResponse, crm.url, lambda c: c.update_contact(cid, {"firstName": "Anne"}))
    for err in (interaction, contact):
        assert err.accepted and err.maybe_written and not err.in_flight
    assert len(crm.interactions(cid)) == 1 and crm.contacts()[0]["firstName"] == "Anne"


def test_an_api_url_that_redirects_names_the_api_url_it_points_at(crm: CitadelServer) -> None:
    """http:// moved to https://: each request is a 301 to the same path there."""
    crm.redirect_to = "https://crm.example.com/citadel"
    err = raises(Redirected, crm.url + "/", lambda c: c.list_contacts())
    assert err.location == "https://crm.example.com/citadel"  # type: ignore[attr-defined]
    assert str(err) == "api_url redirects to https://crm.example.com/citadel; set api_url to it"


def test_an_api_url_that_redirects_to_a_login_page_says_api_url_must_be_the_crms_own_address(
        crm: CitadelServer) -> None:
    """A single sign-on proxy sends every request to its login page: that is no api_url to set."""
    crm.redirect_to, crm.redirect_keeps_path = "https://sso.example.com/login", False
    err = raises(Redirected, crm.url, lambda c: c.list_contacts())
    assert err.location is None  # type: ignore[attr-defined]
    assert str(err) == ("api_url redirects to https://sso.example.com/login, not to the API: "
                        "set api_url to the CRM's own address")


def test_a_crm_whose_certificate_is_not_trusted_is_untrusted_naming_the_cause(tmp_path: Path) -> None:
    with CitadelServer(tmp_path / "c.db", tls=self_signed_tls(tmp_path)) as server:
        err = raises(Untrusted, server.url, lambda c: c.create_contact({"firstName": "A", "lastName": "B"}))
        assert server.contacts() == []
    assert "certificate is not trusted: self" in str(err) and "signed certificate (127.0.0.1)" in str(err)
    assert not err.maybe_written


def test_500_is_maybe_written_only_for_a_write(crm: CitadelServer) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    crm.faults = Faults(rate=1.0, kinds=("500-before-write",), reads=True)
    read = raises(Ambiguous, crm.url, lambda c: c.list_interactions(cid, dt.date(2024, 3, 1)))
    write = raises(Ambiguous, crm.url, lambda c: c.create_interaction(cid, TEXT))
    assert read.maybe_written is False and write.maybe_written is True


@pytest.mark.parametrize("status", ["502", "503", "504", "520", "521", "522", "523", "524"])
def test_gateway_and_unavailable_statuses_are_server_busy(crm: CitadelServer, status: str) -> None:
    crm.faults = Faults(rate=1.0, kinds=(status,))
    err = raises(ServerBusy, crm.url, lambda c: c.create_contact({"firstName": "A", "lastName": "B"}))
    assert err.status == int(status) and isinstance(err, Transient)


def test_429_is_throttled_with_retry_after(crm: CitadelServer) -> None:
    crm.faults = Faults(rate=1.0, kinds=("429",))
    err = raises(Throttled, crm.url, lambda c: c.create_contact({"firstName": "A", "lastName": "B"}))
    assert err.retry_after == 1.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(("header", "seconds"), [
    ("0", 0.0), ("-5", 0.0), ("2.5", 2.5), ("86400", 900.0), ("1e400", None), ("inf", None), ("nan", None),
    ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
])
def test_a_429s_retry_after_is_read_as_finite_seconds_capped_at_a_quarter_of_an_hour(
        crm: CitadelServer, header: str, seconds: float | None) -> None:
    """Delta-seconds or an HTTP date, never negative, never past RETRY_AFTER_MAX_S; what is no finite
    number (`inf`, `nan`, garbage) is as if the server had said nothing."""
    crm.faults = Faults(rate=1.0, kinds=("429",), retry_after=header)
    err = raises(Throttled, crm.url, lambda c: c.create_contact({"firstName": "A", "lastName": "B"}))
    assert err.retry_after == seconds


def test_a_retry_after_as_an_http_date_a_day_ahead_is_capped_too(crm: CitadelServer) -> None:
    crm.faults = Faults(rate=1.0, kinds=("429",), retry_after=email.utils.formatdate(time.time() + 86_400, usegmt=True))
    err = raises(Throttled, crm.url, lambda c: c.create_contact({"firstName": "A", "lastName": "B"}))
    assert err.retry_after == 900.0  # RETRY_AFTER_MAX_S


def test_connection_refused_is_unreachable_and_the_pool_recovers(crm: CitadelServer) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")

    async def use(c: CitadelClient) -> dict:
        await c.get_contact(cid)  # a pooled keep-alive connection now exists
        crm.go_down()
        with pytest.raises(Unreachable):
            await c.get_contact(cid)
        with pytest.raises(Unreachable) as refused:
            await c.create_interaction(cid, TEXT)
        assert refused.value.maybe_written is False  # never connected: certainly not written
        crm.come_up()
        return await c.get_contact(cid)

    assert run(crm.url, use)["id"] == cid


def test_nothing_listening_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: refused
        raises(Unreachable, f"http://127.0.0.1:{port}", lambda c: c.list_contacts())


def test_timeout_is_unreachable_and_maybe_written(crm: CitadelServer) -> None:
    cid = crm.add_contact(firstName="Ann", lastName="Lee")
    crm.faults = Faults(rate=1.0, kinds=("timeout",))
    err = raises(Unreachable, crm.url, lambda c: c.create_interaction(cid, TEXT), timeout=0.3)
    assert "timed out" in str(err) and err.maybe_written is True  # type: ignore[attr-defined]


def test_reset_is_unreachable(crm: CitadelServer) -> None:
    crm.faults = Faults(rate=1.0, kinds=("reset",))
    raises(Unreachable, crm.url, lambda c: c.create_contact({"firstName": "A", "lastName": "B"}))


def test_bearer_key_is_sent_and_never_appears_in_errors(tmp_path: Path) -> None:
    with CitadelServer(tmp_path / "c.db", api_key=KEY) as crm:
        assert run(crm.url, lambda c: c.list_contacts(), api_key=KEY) == []
        assert crm.last_headers["authorization"] == f"Bearer {KEY}"
        cid = crm.add_contact(firstName="Ann", lastName="Lee")
        errors = [
            raises(Unauthorized, crm.url, lambda c: c.list_contacts(), api_key="wrong-" + KEY),
            raises(Unauthorized, crm.url, lambda c: c.list_contacts()),
            # the 422 echoes the received enum value: the client must scrub it
            raises(Rejected, crm.url, lambda c: c.create_interaction(cid, {**TEXT, "type": KEY}), api_key=KEY),
        ]
        crm.go_down()
        errors.append(raises(Unreachable, crm.url, lambda c: c.list_contacts(), api_key=KEY))
    assert "***" in errors[2].reason  # type: ignore[attr-defined]
    for err in errors:
        assert KEY not in str(err) and KEY not in repr(err) and KEY not in repr(err.args)
    assert KEY not in repr(CitadelClient("http://127.0.0.1:1", KEY))
