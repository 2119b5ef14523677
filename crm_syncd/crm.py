"""The Citadel CRM client (async httpx, one client per keep-alive connection) and its error tree.

Status codes map exactly as /work/shared/reference/citadel-api.md says a sync client must read
them. The client never retries: the caller owns retry policy and reads it off the error class:

    CRMError
    ├── Transient      retry with backoff (`retry_after` when the server said)
    │   ├── Unreachable    connection refused/reset, DNS, timeouts
    │   │   └── Untrusted      the server's TLS certificate is not trusted (expired, self-signed, wrong host)
    │   ├── Throttled      429
    │   └── ServerBusy     502/503/504, Cloudflare's 520-524 (and 408)
    ├── Ambiguous      500 (or another 5xx): a write may or may not have happened
    ├── Rejected       422 (or another 4xx in Citadel's JSON envelope): a fact about the item; `details`, `reason`
    ├── NotFound       404 with Citadel's JSON envelope
    ├── Unauthorized   401/403
    ├── Redirected     3xx: api_url is not where the API is; `location`
    └── BadResponse    not JSON (Express's HTML 404 page, a proxy's bare 400/405/413), truncated, wrong
                       shape (a write's answer without its record's id), too large; `accepted` when it
                       answered a write with a 2xx

Every error also says `maybe_written` (the request may have changed the CRM: look before sending
it again), `in_flight` (the CRM may still be acting on it: wait a request timeout before looking) and
`retry_after` (seconds the server asked for, or None). Messages never contain the API key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import functools
import json
import math
import ssl
import time
from typing import Any

import httpx

from crm_syncd import __version__

CONTACTS_PAGE = 100  # the server's cap
# A listing's passes, until one is complete: (sort, page size). PostgreSQL may order rows with equal
# sort keys differently for each LIMIT/OFFSET but alike for a repeated query, so each pass asks
# another way: another sort, or pages that end elsewhere. Interactions have one sort (newest first).
_CONTACT_PASSES = (("name_asc", 100), ("created_desc", 100), ("name_desc", 97), ("created_desc", 89))
_INTERACTION_PASSES = ((None, 100), (None, 97), (None, 89), (None, 83))
_JSON_HEADERS = {"Content-Type": "application/json"}
# a timeout, a proxy, a restart: try again. 520-524 are Cloudflare's: an unknown answer from the origin,
# the origin down, not connected to, unreachable, or connected but silent for 100 s
BUSY_STATUSES = (408, 502, 503, 504, 520, 521, 522, 523, 524)
# of those, the ones that say the request never reached the CRM (502, 504, 520, 524: it may be acting on it)
UNHANDLED = (408, 503, 521, 522, 523)
# The longest wait a server may ask for: a proxy's `Retry-After: 86400` (or a date a skewed clock puts a
# day ahead) must not stop delivery for a day; a quarter of an hour outlasts any sane rate limit.
RETRY_AFTER_MAX_S = 900.0
KEEPALIVE_S = 4.0  # an idle connection is dropped before Node's 5 s: no request on one the server is closing
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def occurred_iso(ms: int) -> str:
    """UTC ISO-8601 with milliseconds and a Z, as Citadel stores it."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class CRMError(Exception):
    """Anything that went wrong talking to Citadel. `message` is human text without secrets."""

    retry_after: float | None = None
    maybe_written: bool = False
    # The answer did not come from the CRM finishing the request (a lost answer, a proxy that stopped
    # waiting): it may still be writing, and a look-up made at once may miss what lands a moment later.
    in_flight: bool = False
    # The answer is about the request's item (its data, its contact, its write), not the CRM or the way to
    # it (down, busy, a refused key, api_url redirecting, a proxy's own page): only such answers count
    # towards giving the item up.
    judges_item: bool = True

    def __init__(self, message: str, *, status: int | None = None, method: str | None = None, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status  # HTTP status when one was received
        self.method = method
        self.path = path

    def __str__(self) -> str:
        return self.message


class Transient(CRMError):
    """Worth retrying after a backoff; `retry_after` (seconds) when the server asked for one."""

    judges_item = False

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unreachable(Transient):
    """No HTTP answer: refused, reset, DNS, timeout. `maybe_written` is True when a mutating
    request was fully sent before the failure (a read timeout or a reset while waiting for the
    answer): like Ambiguous, the write may have happened, so check before re-sending."""

    def __init__(self, message: str, *, maybe_written: bool = False, **kw: Any):
        super().__init__(message, **kw)
        self.maybe_written = self.in_flight = maybe_written


class Untrusted(Unreachable):
    """The TLS handshake failed on the server's certificate (expired, self-signed, another host's):
    nothing was sent. The message names the cause."""


class Throttled(Transient):
    """429 Too Many Requests."""


class ServerBusy(Transient):
    """502/503/504, 520-524 (and 408): a proxy or the server is overloaded or restarting."""

    @property
    def maybe_written(self) -> bool:  # type: ignore[override]
        """A proxy's 502/504/520/524 to a write: the CRM behind it may have made the write, or be making it."""
        return self.method not in (None, "GET") and self.status not in UNHANDLED

    @property
    def in_flight(self) -> bool:  # type: ignore[override]
        return self.maybe_written


class Ambiguous(CRMError):
    """500: Citadel answers many client mistakes with 500, and an insert may have happened. `enveloped`:
    in Citadel's JSON error, so Citadel itself answered, done with the request; else a proxy's page."""

    def __init__(self, message: str, *, enveloped: bool = True, **kw: Any):
        super().__init__(message, **kw)
        self.enveloped = enveloped

    @property
    def maybe_written(self) -> bool:  # type: ignore[override]
        """Only a write may have happened: a 500 to a read changed nothing."""
        return self.method != "GET"

    @property
    def in_flight(self) -> bool:  # type: ignore[override]
        return self.maybe_written and not self.enveloped


class Rejected(CRMError):
    """422 (or another 4xx): the item itself is wrong. `details`: field -> messages; `reason`: one line."""

    def __init__(self, message: str, *, details: dict[str, list[str]] | None = None, reason: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.details = details or {}
        self.reason = reason


class NotFound(CRMError):
    """404 with Citadel's JSON error: the contact does not exist (any more)."""


class Unauthorized(CRMError):
    """401/403: the API key is missing, wrong or lacks rights."""

    judges_item = False


class Redirected(CRMError):
    """3xx: api_url is not where the API answers (http:// moved to https://, another host, a login page);
    `location` is the api_url the redirect points at, when it keeps the request's path (the API moved)."""

    judges_item = False

    def __init__(self, message: str, *, location: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.location = location


class BadResponse(CRMError):
    """The answer is not what Citadel sends: not JSON, truncated, unexpected shape or too large."""

    @property
    def judges_item(self) -> bool:  # type: ignore[override]
        """Not a 4xx page that is not Citadel's (a proxy's 400/405/413, Express's 404 for a route it lacks)."""
        return not 400 <= (self.status or 0) < 500

    @property
    def accepted(self) -> bool:
        """A 2xx to a write whose body was lost or mangled: the write happened."""
        return self.method not in (None, "GET") and 200 <= (self.status or 0) < 300

    @property
    def maybe_written(self) -> bool:  # type: ignore[override]
        """Accepted, or a write answered by a status that leaves it unclear (a 500, a 504) whose body was cut off."""
        status = self.status or 0
        return self.accepted or (self.method not in (None, "GET") and status >= 500 and status not in UNHANDLED)

    @property
    def in_flight(self) -> bool:  # type: ignore[override]
        """A write's 5xx cut off mid-answer: from a proxy perhaps, with the CRM still at work behind it."""
        return self.maybe_written and not self.accepted


def _retry_after(headers: httpx.Headers) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), between 0 and RETRY_AFTER_MAX_S; None when
    absent or not a finite number (`inf`, `nan`, garbage): then the caller's own back-off applies. A date
    is measured from the answer's own `Date` (the server's clock: the Mac's may be off), else from now."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        when = _http_date(value)
        if when is None:
            return None
        seconds = (when - (_http_date(headers.get("date")) or dt.datetime.now(dt.timezone.utc))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX_S)


def _http_date(value: str | None) -> dt.datetime | None:
    """An HTTP date as an aware datetime (UTC when it names no zone); None when absent or unreadable."""
    try:
        when = email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None
    return when.replace(tzinfo=dt.timezone.utc) if when is not None and when.tzinfo is None else when


@functools.lru_cache(maxsize=4096)
def _absolute(base_url: str, path: str) -> httpx.URL:
    """`path` under `base_url` (its fragment dropped, as httpx's `base_url` does), parsed once per path:
    httpx would merge and parse it for each request."""
    base = httpx.URL(base_url)
    return base.copy_with(raw_path=base.raw_path.rstrip(b"/") + path.encode(), fragment=None)


def _envelope(raw: bytes) -> tuple[str, str, dict[str, list[str]]] | None:
    """(code, message, details) from `{"error": {...}}`, or None when the body is not that."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return None
    details: dict[str, list[str]] = {}
    raw_details = err.get("details")
    if isinstance(raw_details, dict):
        for name, msgs in raw_details.items():
            items = msgs if isinstance(msgs, list) else [msgs]
            details[str(name)] = [str(m) for m in items]
    return str(err.get("code") or ""), str(err.get("message") or ""), details


def _certificate_refusal(exc: BaseException) -> str | None:
    """Why the TLS handshake refused the server's certificate (OpenSSL's words: "certificate has expired",
    "self-signed certificate", "Hostname mismatch, …"), or None when something else failed."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CitadelClient:
    """Async Citadel client over `max_connections` HTTP/1.1 keep-alive connections. Use as `async with`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        max_connections: int = 8,
        max_response_bytes: int = 20_000_000,
    ):
        self.base_url = base_url.rstrip("/")
        self._secret = api_key or None
        self._timeout = timeout
        self._max_connections = max_connections
        self._max_bytes = max_response_bytes
        self.wrote_at = 0.0  # time.monotonic() of the last write the CRM accepted (2xx to a POST/PUT/DELETE)
        headers = {"User-Agent": f"crm-syncd/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # One httpx client per connection, lent to one request at a time. httpcore's pool checks every
        # idle connection (a getpeername and a poll) at each request and each answer; with one
        # connection per client those checks go, and a request costs about a sixth less CPU (bench/README.md).
        tls = httpx.create_ssl_context()  # loaded once (the CA bundle), not per client
        self._clients = [
            httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout), verify=tls, follow_redirects=False,
                              limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                                  keepalive_expiry=KEEPALIVE_S))
            for _ in range(max_connections)
        ]
        self._idle = list(self._clients)  # the warmest connection last
        # First come, first served (asyncio's Semaphore hands a freed slot to its oldest waiter): a
        # contacts listing waits its turn behind the push workers, not until the outbox is empty.
        self._turns = asyncio.Semaphore(max_connections)

    def __repr__(self) -> str:
        return f"CitadelClient({self.base_url!r}, api_key={'***' if self._secret else None})"

    async def __aenter__(self) -> CitadelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    # -- endpoints -----------------------------------------------------------------------------

    async def check_access(self) -> None:
        """One small read that needs the API key (a page of one contact); raises what refused it."""
        await self._page("/api/contacts", {"limit": "1"})

    async def check_health(self) -> None:
        """The health check `doctor` and `status` make: /api/health says ok, and a read that needs the API
        key goes through. Raises what failed; its message says why (a redirect, a certificate, the key)."""
        doc = await self._call("GET", "/api/health", envelope=False)
        if doc.get("status") != "ok":
            raise BadResponse(f"/api/health says {_one_line(str(doc.get('status')), 40)!r}, not 'ok'",
                              status=200, method="GET", path="/api/health")
        await self.check_access()

    async def list_contacts(self) -> list[dict[str, Any]]:
        """Every contact exactly once. Paging is unstable when names tie, so pages are deduplicated
        by id and checked against meta.total; a short listing is re-paged another way and merged."""
        return await self._collect("/api/contacts", {}, _CONTACT_PASSES, "contacts")

    async def newest_contact(self) -> tuple[int, int | None]:
        """(how many contacts there are, the id of the one made last): one page of one contact, newest
        first. A contact made since (by hand, by another Mac) changes it; one edited does not."""
        rows, total, _pages = await self._page("/api/contacts", {"sort": "created_desc", "limit": "1"})
        return total, rows[0]["id"] if rows else None

    async def get_contact(self, contact_id: int) -> dict[str, Any]:
        return await self._data("GET", f"/api/contacts/{int(contact_id)}")

    async def create_contact(self, fields: dict[str, Any]) -> dict[str, Any]:
        return await self._data("POST", "/api/contacts", fields)

    async def update_contact(self, contact_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        return await self._data("PUT", f"/api/contacts/{int(contact_id)}", fields)

    async def delete_contact(self, contact_id: int) -> None:
        await self._call("DELETE", f"/api/contacts/{int(contact_id)}")

    async def create_interaction(self, contact_id: int, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._data("POST", f"/api/contacts/{int(contact_id)}/interactions", payload)

    async def list_interactions(self, contact_id: int, day: dt.date | None = None) -> list[dict[str, Any]]:
        """Every interaction of the contact (on one UTC day, if given): all pages, deduplicated by id."""
        if day is not None and (isinstance(day, dt.datetime) or not isinstance(day, dt.date)):
            raise TypeError("day must be a datetime.date (a UTC day)")
        path = f"/api/contacts/{int(contact_id)}/interactions"
        query = {"date": day.isoformat()} if day is not None else {}
        return await self._collect(path, query, _INTERACTION_PASSES, "interactions")

    async def recent_interactions(self, contact_id: int) -> list[dict[str, Any]]:
        """The contact's newest interactions (one page of up to 100)."""
        rows, _total, _pages = await self._page(f"/api/contacts/{int(contact_id)}/interactions",
                                                {"limit": str(CONTACTS_PAGE)})
        return rows

    # -- listing -------------------------------------------------------------------------------

    async def _collect(
        self, path: str, params: dict[str, str], passes: tuple[tuple[str | None, int], ...], what: str
    ) -> list[dict[str, Any]]:
        union: dict[int, dict[str, Any]] = {}
        union_total = -1
        for sort, limit in passes:
            query = dict(params, limit=str(limit))
            if sort:
                query["sort"] = sort
            rows, total, consistent = await self._all_pages(path, query)
            seen = {row["id"]: row for row in rows}
            if consistent and len(seen) == total:
                return list(seen.values())
            if total != union_total:
                union, union_total = {}, total  # the set changed between passes: start over
            union.update(seen)
            if consistent and len(union) == total:
                return list(union.values())
        raise BadResponse(
            f"incomplete listing of {what}: {len(union)} of {union_total} after {len(passes)} passes",
            method="GET", path=path,
        )

    async def _all_pages(self, path: str, query: dict[str, str]) -> tuple[list[dict[str, Any]], int, bool]:
        """(rows of every page, meta.total of page 1, whether every page agreed on the total)."""
        rows, total, pages = await self._page(path, {**query, "page": "1"})
        if pages <= 1:
            return rows, total, True
        gate = asyncio.Semaphore(self._max_connections)

        async def one(page: int) -> tuple[list[dict[str, Any]], int, int]:
            async with gate:
                return await self._page(path, {**query, "page": str(page)})

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(p)) for p in range(2, pages + 1)]
        except BaseExceptionGroup as eg:
            first = eg.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        consistent = True
        for task in tasks:
            page_rows, page_total, _ = task.result()
            rows.extend(page_rows)
            consistent = consistent and page_total == total
        return rows, total, consistent

    async def _page(self, path: str, query: dict[str, str]) -> tuple[list[dict[str, Any]], int, int]:
        doc = await self._call("GET", path, params=query)
        data, meta = doc.get("data"), doc.get("meta")
        if not isinstance(data, list) or not isinstance(meta, dict):
            raise BadResponse(f"unexpected listing shape from GET {path}", method="GET", path=path)
        total, limit = meta.get("total"), meta.get("limit")
        if not isinstance(total, int) or not isinstance(limit, int) or limit < 1 or total < 0:
            raise BadResponse(f"unexpected listing meta from GET {path}", method="GET", path=path)
        for row in data:
            if not isinstance(row, dict) or not isinstance(row.get("id"), int):
                raise BadResponse(f"listing row without an id from GET {path}", method="GET", path=path)
        pages = meta.get("totalPages")
        if not isinstance(pages, int) or pages < 0:
            pages = -(-total // limit)
        return data, total, pages

    # -- one request ---------------------------------------------------------------------------

    async def _data(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """The record a 2xx answers with; one without an integer id (`data: null`, `{}`) is a BadResponse
        (`accepted` for a write: it happened, and is looked up)."""
        return (await self._call(method, path, body, record=True))["data"]

    async def _call(
        self, method: str, path: str, body: Any = None, *, params: dict[str, str] | None = None, envelope: bool = True,
        record: bool = False,
    ) -> dict[str, Any]:
        """Send one request; the parsed JSON object of a 2xx (with a `record` in `data`: an object with an
        integer id), else the mapped CRMError."""
        content = None if body is None else _encode(body).encode()
        async with self._turns:
            client = self._idle.pop()
            try:
                request = client.build_request(method, _absolute(self.base_url, path), params=params,
                                               content=content, headers=_JSON_HEADERS if content is not None else None)
                try:
                    response = await client.send(request, stream=True)
                except httpx.TimeoutException as exc:
                    raise self._unreachable(method, path, exc, f"timed out after {self._timeout:g}s") from exc
                except httpx.TransportError as exc:
                    if (refusal := _certificate_refusal(exc)) is not None:
                        raise Untrusted(self._scrub(f"the CRM's TLS certificate is not trusted: {refusal} "
                                                    f"({request.url.host})"),
                                        method=method, path=path) from exc
                    raise self._unreachable(method, path, exc, "cannot connect") from exc
                try:
                    raw = await self._read(response, method, path)
                finally:
                    await response.aclose()
            finally:
                self._idle.append(client)
        status = response.status_code
        if 200 <= status < 300:
            try:
                doc = json.loads(raw)
            except ValueError:
                raise BadResponse(f"{status}: response is not JSON", status=status, method=method, path=path) from None
            if not isinstance(doc, dict) or (envelope and "data" not in doc):
                raise BadResponse(f"{status}: unexpected response shape", status=status, method=method, path=path)
            if method != "GET":
                self.wrote_at = time.monotonic()
            if record and not (isinstance(data := doc["data"], dict) and type(data.get("id")) is int):
                what = "a record without an id" if isinstance(data, dict) else "no record"
                raise BadResponse(f"{status}: {what} in the answer", status=status, method=method, path=path)
            return doc
        raise self._error(response, raw, method, path)

    async def _read(self, response: httpx.Response, method: str, path: str) -> bytes:
        """The body, refusing more than max_response_bytes and reporting truncation as BadResponse."""
        status = response.status_code
        declared = response.headers.get("content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
                raise BadResponse(
                    f"{status}: response of {declared} bytes exceeds the {self._max_bytes}-byte limit",
                    status=status, method=method, path=path,
                )
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self._max_bytes:
                    raise BadResponse(
                        f"{status}: response exceeds the {self._max_bytes}-byte limit",
                        status=status, method=method, path=path,
                    )
                chunks.append(chunk)
        except httpx.TimeoutException as exc:
            raise self._unreachable(method, path, exc, f"timed out after {self._timeout:g}s reading the body") from exc
        except httpx.HTTPError as exc:
            raise BadResponse(
                f"{status}: truncated response ({type(exc).__name__})", status=status, method=method, path=path
            ) from exc
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _unreachable(self, method: str, path: str, exc: httpx.HTTPError, what: str) -> Unreachable:
        # Once the request is on the wire, a missing answer does not mean the write did not happen.
        sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
        detail = str(exc)
        message = f"{what} ({type(exc).__name__}{': ' + detail if detail else ''})"
        return Unreachable(
            self._scrub(message), maybe_written=sent and method != "GET", method=method, path=path
        )

    def _error(self, response: httpx.Response, raw: bytes, method: str, path: str) -> CRMError:
        status = response.status_code
        parsed = _envelope(raw)
        _code, text, details = parsed if parsed else ("", "", {})
        text = self._scrub(_one_line(text or response.reason_phrase or "error"))
        message = f"{status}: {text}"
        where = {"status": status, "method": method, "path": path}
        if status in (401, 403):
            return Unauthorized(message, **where)
        if status == 404:
            if parsed is None:  # Express's HTML page: a route this server does not have
                return BadResponse("404: not a Citadel API route (non-JSON answer)", **where)
            return NotFound(message, **where)
        if status == 429:
            return Throttled(message, retry_after=_retry_after(response.headers), **where)
        if status in BUSY_STATUSES:
            return ServerBusy(message, retry_after=_retry_after(response.headers), **where)
        if status >= 500:
            return Ambiguous(message, enveloped=parsed is not None, **where)
        if 300 <= status < 400:
            return self._redirected(response, where)
        if 400 <= status < 500 and parsed is None:  # a proxy's or load balancer's page: no judgement of the item
            return BadResponse(f"{status}: {text} (not Citadel's answer)", **where)
        if 400 <= status < 500:
            details = {k: [self._scrub(m) for m in v] for k, v in details.items()}
            reason = "; ".join(f"{name}: {', '.join(msgs)}" for name, msgs in details.items()) if details else text
            reason = _one_line(reason)
            return Rejected(f"{status}: {reason}", details=details, reason=reason, **where)
        return BadResponse(f"{status}: unexpected status", **where)

    def _redirected(self, response: httpx.Response, where: dict[str, Any]) -> Redirected:
        """api_url moved: the words name the api_url the redirect points at (its path less the request's)."""
        target = response.headers.get("location")
        if not target:
            return Redirected(f"{response.status_code}: api_url redirects, without saying where", **where)
        moved = response.request.url.join(target).copy_with(query=None, fragment=None)
        path, asked = moved.path, response.request.url.path
        if not (asked != "/" and path.rstrip("/").endswith(asked.rstrip("/"))):  # elsewhere: a login page (SSO)
            return Redirected(f"api_url redirects to {self._scrub(str(moved))}, not to the API: set api_url to the "
                              "CRM's own address", **where)
        moved = moved.copy_with(path=path.rstrip("/")[: -len(asked.rstrip("/"))] or "/")
        location = self._scrub(str(moved).rstrip("/"))
        return Redirected(f"api_url redirects to {location}; set api_url to it", location=location, **where)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret and self._secret in text else text


class DryRun:
    """A CRM that reads from the real one and only pretends to write (for `sync --dry-run`).

    Pretend writes get negative ids, so nothing can mistake them for the CRM's own.
    """

    def __init__(self, real: CitadelClient) -> None:
        self.real = real
        self._next_id = -1

    def __getattr__(self, name: str) -> Any:  # reads: check_health, list_contacts, list_interactions, ...
        return getattr(self.real, name)

    def _fake(self, fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
        self._next_id -= 1
        return {**fields, **extra, "id": self._next_id + 1}

    async def create_contact(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self._fake(fields)

    async def get_contact(self, contact_id: int) -> dict[str, Any]:
        return await self.real.get_contact(contact_id) if contact_id > 0 else {"id": contact_id}  # a pretend one

    async def update_contact(self, contact_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        return {**await self.get_contact(contact_id), **fields, "id": contact_id}

    async def delete_contact(self, contact_id: int) -> None:
        return None

    async def create_interaction(self, contact_id: int, payload: dict[str, Any]) -> dict[str, Any]:
        return self._fake(payload, contactId=contact_id)

    async def list_interactions(self, contact_id: int, day: dt.date | None = None) -> list[dict[str, Any]]:
        return await self.real.list_interactions(contact_id, day) if contact_id > 0 else []

    async def recent_interactions(self, contact_id: int) -> list[dict[str, Any]]:
        return await self.real.recent_interactions(contact_id) if contact_id > 0 else []

