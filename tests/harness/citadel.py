"""A stand-in Citadel CRM: real HTTP/1.1 (keep-alive) over real SQLite, with the contract's quirks.

Follows /work/shared/reference/citadel-api.md: envelopes, validation (422), 404s, the 500s for
client mistakes (malformed JSON, non-numeric ids, `?date=garbage`, bodies over 5 MiB, an `Origin`
header) and for PostgreSQL's refusal of a NUL in a contact's text, Express's HTML 404 page for unknown
routes, ms-precision timestamps, limit capped at 100, optionally unstable ordering of rows whose sort
keys tie (`unstable_ties`), and the lax bulk imports.

Test controls: `faults` (injected 5xx/429/timeouts/resets), `latency_s`, `reject_interactions_at` and
`reject_contact_values` (422s), `go_down()`/`come_up()`, `redirect_to` (every answer a 301), `tls` (HTTPS),
`stats`, and helpers that read and seed the database directly.

    with CitadelServer(tmp_path / "crm.db") as crm:
        httpx.get(crm.url + "/api/health")

As a process: `python -m tests.harness.citadel --db PATH [--port N] [--latency-ms N]`.
"""

from __future__ import annotations

import argparse
import calendar
import email.utils
import json
import random
import re
import select
import signal
import socket
import socketserver
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

TYPES = frozenset(
    "CALL_INBOUND CALL_OUTBOUND CALL_MISSED TEXT_INBOUND TEXT_OUTBOUND EMAIL_INBOUND EMAIL_OUTBOUND"
    " MEETING MAIL_SENT MAIL_RECEIVED NOTE OTHER".split()
)
SOURCES = frozenset("MANUAL IMPORT_IOS IMPORT_ANDROID IMPORT_EMAIL API".split())
OUTBOUND = frozenset(("CALL_OUTBOUND", "TEXT_OUTBOUND", "EMAIL_OUTBOUND", "MAIL_SENT"))  # lastContactedAt
MAX_BODY = 5 * 1024 * 1024
MAX_LIMIT = 100
_DAY_MS = 86_400_000
_PRIME = 2_147_483_647  # (id * m) % _PRIME permutes ids: a shuffle of ties, one per query (see `_order`)
_MUTATING = frozenset(("POST", "PUT", "DELETE", "PATCH"))
FAULT_KINDS = frozenset(
    ("503", "502", "504", "520", "521", "522", "523", "524", "429", "400", "405", "413", "500-page", "500-before-write", "500-after-write", "504-after-write",
     "504-then-write", "524-then-write", "timeout", "reset", "slow", "truncate", "500-after-write-truncated",
     "data-null-after-write", "id-less-after-write", "500-then-write")
)
_LATE_WRITES = ("504-then-write", "524-then-write", "500-then-write")  # a proxy answers; the CRM behind it writes a moment later
_ODD_2XX = {"data-null-after-write": lambda record: None,  # the write happens; its answer holds no record's id
            "id-less-after-write": lambda record: {k: v for k, v in record.items() if k != "id"}}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    first_name TEXT NOT NULL, last_name TEXT NOT NULL,
    phone TEXT, email TEXT, organization TEXT, title TEXT, location TEXT, notes TEXT,
    cadence_days INTEGER, last_contacted_at INTEGER, contact_due_at INTEGER,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
    search TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS contacts_name ON contacts (first_name COLLATE NOCASE, last_name COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS contacts_created ON contacts (created_at);
CREATE INDEX IF NOT EXISTS contacts_email ON contacts (email);
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL,
    type TEXT NOT NULL, content TEXT, duration_seconds INTEGER,
    occurred_at INTEGER NOT NULL, source TEXT NOT NULL, created_at INTEGER NOT NULL,
    outbound INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS interactions_contact ON interactions (contact_id, occurred_at);
CREATE INDEX IF NOT EXISTS interactions_outbound ON interactions (contact_id, outbound, occurred_at);
"""

_C_COLS = (
    "id, first_name, last_name, phone, email, organization, title, location, notes,"
    " last_contacted_at, contact_due_at, created_at, updated_at"
)
_INSERT_INTERACTION = (
    "INSERT INTO interactions (contact_id, type, content, duration_seconds, occurred_at, source, created_at, outbound)"
    " VALUES (?,?,?,?,?,?,?,?)"
)
_I_COLS = "id, contact_id, type, content, duration_seconds, occurred_at, source, created_at"
# API field -> column, for the fields a client may write.
_CONTACT_FIELDS = {
    "firstName": "first_name", "lastName": "last_name", "phone": "phone", "email": "email",
    "organization": "organization", "title": "title", "location": "location", "notes": "notes",
}
_SEED_FIELDS = {
    **_CONTACT_FIELDS, "cadenceDays": "cadence_days", "lastContactedAt": "last_contacted_at",
    "contactDueAt": "contact_due_at", "createdAt": "created_at", "updatedAt": "updated_at",
}
_SEED_FIELDS.update({col: col for col in list(_SEED_FIELDS.values())})
_ORDERS = {  # sort -> (its keys, the order of rows equal on them when ties are stable)
    "name_asc": ("first_name COLLATE NOCASE, last_name COLLATE NOCASE", "id"),
    "name_desc": ("first_name COLLATE NOCASE DESC, last_name COLLATE NOCASE DESC", "id"),
    "created_desc": ("created_at DESC", "id DESC"),
    "created_asc": ("created_at", "id"),
    "updated_desc": ("updated_at DESC", "id DESC"),
}
# Citadel validates with Zod 3 (its 422 details are flatten().fieldErrors, its "Invalid email" Zod 3's):
# z.string().email() is this pattern (JavaScript's /i spelt out in ASCII: Python's re.I would let "K", the
# Kelvin sign, pass for K). ASCII only; no leading dot, no "..", a last character before the @ that is no
# dot or quote; a domain of labels that start with a letter or digit, ending in two letters or more.
_EMAIL = re.compile(r"(?!\.)(?!.*\.\.)[A-Za-z0-9_'+\-.]*[A-Za-z0-9_+\-]@([A-Za-z0-9][A-Za-z0-9\-]*\.)+[A-Za-z]{2,}")
_ISO = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d+))?)?\s*(Z|z|[+-]\d\d(?::?\d\d)?)?)?"
)
_DAY = re.compile(r"(\d{4})-(\d\d)-(\d\d)")
_JSON_CT = b"application/json; charset=utf-8"
_HTML_CT = b"text/html; charset=utf-8"
_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized",
    301: "Moved Permanently", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large", 422: "Unprocessable Entity",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 520: "Unknown Error", 521: "Web Server Is Down", 522: "Connection Timed Out",
    523: "Origin Is Unreachable", 524: "A Timeout Occurred",
}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class _Fail(Exception):
    """An error response: the JSON envelope `{"error": {code, message, details?}}`."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, list[str]] | None = None):
        self.status, self.code, self.message, self.details = status, code, message, details

    def body(self) -> bytes:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            err["details"] = self.details
        return _dumps({"error": err}).encode()


def _internal() -> _Fail:
    return _Fail(500, "INTERNAL_ERROR", "Internal server error")


def _not_found() -> _Fail:
    return _Fail(404, "NOT_FOUND", "Contact not found")


def _invalid(details: dict[str, list[str]]) -> _Fail:
    return _Fail(422, "VALIDATION_ERROR", "Validation failed", details)


@dataclass
class Faults:
    """Which requests fail and how. Kinds: 503 502 504, Cloudflare's 520-524, 429 (with `retry_after`),
    400 405 413 and 500-page (a proxy's or load balancer's HTML page, no write), 500-before-write,
    500-after-write (the write happens, then 500), 504-after-write (the write happens, then a proxy's
    504: it gave up waiting), 504-then-write, 524-then-write and 500-then-write (the proxy's answer comes first; the CRM,
    still at work behind it, writes `late_s` later), timeout (hold `hold_s` or until the client
    gives up, then close without answering), reset (RST, no response), slow (wait `slow_s`, then
    answer normally), truncate (answer with half the announced body, then close), 500-after-write-truncated
    (both: the write happens, then half of a 500's body), data-null-after-write and id-less-after-write
    (the write happens, then a 2xx whose `data` is null, or the record without its `id`).

    Only mutating requests are affected unless `reads`, and only those of `routes` if given (route
    patterns such as "/api/contacts/:id/interactions"); the first `after` of those pass unharmed; `limit`
    caps how many faults fire in total. `retry_after` is the 429's Retry-After header as sent (None: no header).
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = ("503",)
    seed: int = 0
    slow_s: float = 0.5
    late_s: float = 1.0
    reads: bool = False
    hold_s: float = 30.0
    limit: int | None = None
    after: int = 0
    retry_after: str | None = "1"
    routes: tuple[str, ...] | None = None
    fired: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - FAULT_KINDS
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._passed = 0  # requests let through unharmed before faults begin (`after`)

    def pick(self, method: str, route: str = "*") -> str | None:
        if (self.rate <= 0.0 or (not self.reads and method not in _MUTATING)
                or (self.routes is not None and route not in self.routes)):
            return None
        with self._lock:
            if self._passed < self.after:
                self._passed += 1
                return None
            if self.limit is not None and self.fired.total() >= self.limit:
                return None
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.kinds)
            self.fired[kind] += 1
            return kind


# ---------------------------------------------------------------------------------------------
# Parsing and formatting helpers


def iso_ms(ms: int | None) -> str | None:
    """Epoch ms -> `YYYY-MM-DDTHH:MM:SS.mmmZ`, as Citadel returns timestamps."""
    if ms is None:
        return None
    s, m = divmod(ms, 1000)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (time.gmtime(s)[:6] + (m,))


def parse_instant(value: str) -> int | None:
    """ISO-8601 -> epoch ms, like JavaScript's Date: ms precision (extra digits cut), a date alone
    is UTC midnight, a date-time without a zone is server-local time. None when unparsable."""
    m = _ISO.fullmatch(value.strip())
    if not m:
        return None
    y, mo, d, hh, mi, ss, frac, zone = m.groups()
    try:
        naive = datetime(int(y), int(mo), int(d), int(hh or 0), int(mi or 0), int(ss or 0))
    except ValueError:
        return None
    ms = int((frac or "0")[:3].ljust(3, "0"))
    if hh is not None and zone is None:
        return int(naive.timestamp()) * 1000 + ms  # naive -> the server's local zone
    offset_min = 0
    if zone and zone not in ("Z", "z"):
        digits = zone[1:].replace(":", "")
        offset_min = int(digits[:2]) * 60 + int(digits[2:] or 0)
        if zone[0] == "-":
            offset_min = -offset_min
    return (calendar.timegm(naive.timetuple()) - offset_min * 60) * 1000 + ms


def _js_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _blob(first: Any, last: Any, email: Any, phone: Any, org: Any) -> str:
    return "\n".join(str(v).lower() for v in (first, last, email, phone, org) if v)


def _int_param(q: dict[str, str], name: str, default: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        return default
    return value if value >= 1 else default


def _contact_json(r: tuple) -> dict[str, Any]:
    return {
        "id": r[0], "firstName": r[1], "lastName": r[2], "phone": r[3], "email": r[4],
        "organization": r[5], "title": r[6], "location": r[7], "notes": r[8],
        "lastContactedAt": iso_ms(r[9]), "contactDueAt": iso_ms(r[10]),
        "createdAt": iso_ms(r[11]), "updatedAt": iso_ms(r[12]),
        "tags": [], "groups": [], "notableDates": [], "region": None,
    }


def _interaction_json(r: tuple) -> dict[str, Any]:
    return {
        "id": r[0], "contactId": r[1], "type": r[2], "content": r[3], "durationSeconds": r[4],
        "occurredAt": iso_ms(r[5]), "source": r[6], "createdAt": iso_ms(r[7]),
    }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON.parse does not accept {name}")


def _parse_rows(body: bytes) -> list:
    """An import endpoint's body: a JSON array, else the validator's 422."""
    rows = _parse_body(body)
    if not isinstance(rows, list):
        raise _invalid({"body": [f"Expected array, received {_js_type(rows)}"]})
    return rows


def _parse_body(body: bytes) -> Any:
    """express.json(strict): an object or array, else the parser's 400 that Citadel turns into 500."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except ValueError:  # includes UnicodeDecodeError
        raise _internal() from None
    if not isinstance(value, (dict, list)):
        raise _internal()
    return value


def _html_404(method: str, path: str) -> bytes:
    safe = path.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _html_page(f"Cannot {method} {safe}")


def _html_page(text: str) -> bytes:
    """Express's (or a proxy's) HTML error page saying `text`."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Error</title>\n'
        f"</head>\n<body>\n<pre>{text}</pre>\n</body>\n</html>\n"
    ).encode()


# ---------------------------------------------------------------------------------------------
# Validation (the strict single endpoints)


def _check_contact(body: Any, partial: bool) -> dict[str, Any]:
    """Validated column values for POST (all rules) or PUT (only the fields present)."""
    if not isinstance(body, dict):
        raise _invalid({"body": [f"Expected object, received {_js_type(body)}"]})
    details: dict[str, list[str]] = {}
    out: dict[str, Any] = {}
    for name in ("firstName", "lastName"):
        if name not in body:
            if not partial:
                details[name] = ["Required"]
            continue
        v = body[name]
        if not isinstance(v, str):
            details[name] = [f"Expected string, received {_js_type(v)}"]
        elif not v.strip():
            details[name] = ["Required"]
        else:
            out[_CONTACT_FIELDS[name]] = v
    for name in ("phone", "email", "organization", "title", "location", "notes"):
        if name not in body:
            continue
        v = body[name]
        if v is not None and not isinstance(v, str):
            details[name] = [f"Expected string, received {_js_type(v)}"]
        elif name == "email" and v:
            if not _EMAIL.fullmatch(v):
                details[name] = ["Invalid email"]
            else:
                out["email"] = v
        else:
            out[_CONTACT_FIELDS[name]] = v if v != "" or name != "email" else None
    if details:
        raise _invalid(details)
    if any(isinstance(v, str) and "\x00" in v for v in out.values()):
        raise _internal()  # valid JSON, but PostgreSQL refuses a NUL in text: Prisma's error becomes a 500
    return out


def _check_interaction(body: Any) -> tuple[str, int, str, str | None, int | None]:
    if not isinstance(body, dict):
        raise _invalid({"body": [f"Expected object, received {_js_type(body)}"]})
    details: dict[str, list[str]] = {}
    kind = body.get("type")
    if kind is None:
        details["type"] = ["Required"]
    elif kind not in TYPES:
        details["type"] = [f"Invalid enum value. Expected one of {', '.join(sorted(TYPES))}, received '{kind}'"]
    source = body.get("source", "MANUAL")
    if source is None:
        source = "MANUAL"
    elif source not in SOURCES:
        details["source"] = [f"Invalid enum value. Expected one of {', '.join(sorted(SOURCES))}, received '{source}'"]
    occurred = body.get("occurredAt")
    occurred_ms = None
    if occurred is None:
        details["occurredAt"] = ["Required"]
    elif not isinstance(occurred, str):
        details["occurredAt"] = [f"Expected string, received {_js_type(occurred)}"]
    else:
        occurred_ms = parse_instant(occurred)
        if occurred_ms is None:
            details["occurredAt"] = ["Invalid date"]
    content = body.get("content")
    if content is not None and not isinstance(content, str):
        details["content"] = [f"Expected string, received {_js_type(content)}"]
    duration = body.get("durationSeconds")
    if duration is not None:
        if isinstance(duration, bool) or not isinstance(duration, (int, float)):
            details["durationSeconds"] = [f"Expected number, received {_js_type(duration)}"]
        elif isinstance(duration, float) and not duration.is_integer():
            details["durationSeconds"] = ["Expected integer, received float"]
        elif duration <= 0:
            details["durationSeconds"] = ["Number must be greater than 0"]
        else:
            duration = int(duration)
    if details:
        raise _invalid(details)
    return kind, occurred_ms, source, content, duration  # type: ignore[return-value]


def self_signed_tls(folder: Path, host: str = "127.0.0.1") -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for `host` (made by the openssl command):
    a certificate no client trusts."""
    cert, key = folder / "citadel-cert.pem", folder / "citadel-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# ---------------------------------------------------------------------------------------------
# The HTTP side


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256

    def __init__(self, addr: tuple[str, int], owner: CitadelServer):
        self.owner = owner
        super().__init__(addr, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.owner.tls is not None:  # the handshake is the handler thread's: a stalled client blocks no accept
            sock = self.owner.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            self.owner._record_error()


class _Handler(socketserver.StreamRequestHandler):
    """A minimal HTTP/1.1 server loop: request line, headers, Content-Length or chunked body."""

    rbufsize = 65536
    wbufsize = 0
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.owner: CitadelServer = self.server.owner  # type: ignore[attr-defined]
        self.owner._track(self.connection, True)

    def finish(self) -> None:
        self.owner._track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def handle(self) -> None:
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()  # a client that distrusts the certificate ends it here
            while self._one():
                pass
        except (OSError, ValueError):
            pass  # the client went away or the socket was shut down (stop/go_down)

    def _one(self) -> bool:
        rfile, owner = self.rfile, self.owner
        self.connection.settimeout(owner.keepalive_timeout_s)  # Node closes a connection idle this long
        line = rfile.readline(65537)
        while line in (b"\r\n", b"\n"):
            line = rfile.readline(65537)
        self.connection.settimeout(None)
        if not line:
            return False
        try:
            method, target, version = line.decode("latin-1").split()
        except ValueError:
            self._send(400, b"Bad Request", b"text/plain", b"", False)
            return False
        headers: dict[str, str] = {}
        while True:
            h = rfile.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        keep = headers.get("connection", "").lower() != "close" if version == "HTTP/1.1" else (
            headers.get("connection", "").lower() == "keep-alive"
        )
        if headers.get("expect", "").lower() == "100-continue":
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._body(headers)
        if body is None:
            return False
        with owner._stats_lock:
            owner.serving += 1
        try:
            return owner._serve(self, method, target, headers, body, keep)
        finally:
            with owner._stats_lock:
                owner.serving -= 1

    def _body(self, headers: dict[str, str]) -> bytes | None:
        rfile = self.rfile
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size_line = rfile.readline(1024)
                if not size_line:
                    return None
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(rfile.read(size))
                rfile.readline(3)
        n = int(headers.get("content-length") or 0)
        if not n:
            return b""
        body = rfile.read(n)
        return body if len(body) == n else None

    def _send(self, status: int, body: bytes, ctype: bytes, extra: bytes, keep: bool) -> None:
        head = b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n" % (
            status, _REASONS.get(status, "Unknown").encode(), email.utils.formatdate(usegmt=True).encode(),
            ctype, len(body), extra,
            b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n",
        )
        self.connection.sendall(head + body)

    def _reset(self) -> None:
        """Close with RST: no response at all."""
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.wfile.close()
        sock.close()

    def _hold(self, seconds: float) -> None:
        """Wait up to `seconds`, returning early when the client hangs up or the server stops."""
        deadline = time.monotonic() + seconds
        while not self.owner._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.connection], [], [], min(left, 0.25))
            if ready:
                return


class CitadelServer:
    """The stand-in. `start()` serves on a background thread; `stop()` ends it (context manager)."""

    def __init__(
        self,
        db_path: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        *,
        unstable_ties: bool = False,
        latency_s: float = 0.0,
        keepalive_timeout_s: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ):
        self.db_path = Path(db_path)
        self.host, self.port, self.api_key = host, port, api_key
        self.unstable_ties = unstable_ties  # order ties anew for each LIMIT/OFFSET, like PostgreSQL (`_order`)
        self.tie_salt = 0  # which orders those are
        self.latency_s = latency_s  # added to every request (a hosted CRM)
        self.keepalive_timeout_s = keepalive_timeout_s  # an idle connection is closed (Node's default: 5 s)
        self.tls = tls  # serve HTTPS with this context's certificate
        self.redirect_to: str | None = None  # every request answered 301 to this base URL (the API moved there)
        self.redirect_keeps_path = True  # False: every redirect goes to `redirect_to` itself (an SSO login page)
        self.faults = Faults()
        self.reject_interactions_at: set[str] = set()  # UTC days whose interaction POSTs get a 422
        self.reject_contact_values: set[str] = set()  # field values a contact POST or PUT gets a 422 for
        self.stats: Counter[tuple[str, str, int | str]] = Counter()  # (method, route, status|fault)
        self.timeline: list[tuple[float, str, str, int | str]] | None = None  # set to [] to log each answer
        self.contact_listings: list[dict[str, str]] = []  # the query of each GET /api/contacts, in order
        self.connections_accepted = 0
        self.serving = 0  # requests received and not yet answered (a slow CRM still working on them)
        self.last_headers: dict[str, str] = {}  # the most recent request's headers (lower-case keys)
        self.errors: list[str] = []  # unexpected exceptions in the stand-in itself (should stay empty)
        self._lock = threading.Lock()  # guards the one SQLite connection
        self._stats_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._tcp: _TCPServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._auth = f"Bearer {api_key}" if api_key else None
        with self._lock:
            self._db()

    def require_key(self, api_key: str | None) -> None:
        """From now on, accept only this API key (None: any request), as after the owner rotates it."""
        self.api_key, self._auth = api_key, f"Bearer {api_key}" if api_key else None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> CitadelServer:
        self._stopping.clear()
        self._listen()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._unlisten()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def go_down(self) -> None:
        """A real outage: stop listening and drop open connections (new ones are refused)."""
        self._unlisten()

    def come_up(self) -> None:
        """Listen again on the same port, with the same data."""
        self._listen()

    def __enter__(self) -> CitadelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        if self._tcp is not None:
            return
        tcp = _TCPServer((self.host, self.port), self)
        self.port = tcp.server_address[1]
        self._tcp = tcp
        self._thread = threading.Thread(
            target=tcp.serve_forever, kwargs={"poll_interval": 0.02}, name=f"citadel:{self.port}", daemon=True
        )
        self._thread.start()

    def _unlisten(self) -> None:
        tcp, self._tcp = self._tcp, None
        if tcp is None:
            return
        tcp.shutdown()
        tcp.server_close()
        with self._stats_lock:
            open_sockets, self._sockets = list(self._sockets), set()
        for sock in open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def open_connections(self) -> int:
        with self._stats_lock:
            return len(self._sockets)

    def _track(self, sock: socket.socket, opened: bool) -> None:
        with self._stats_lock:
            if opened:
                self._sockets.add(sock)
                self.connections_accepted += 1
            else:
                self._sockets.discard(sock)

    def _record_error(self) -> None:
        text = traceback.format_exc()
        self.errors.append(text)
        print(text, file=sys.stderr)

    # -- database ------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """The shared connection (call with self._lock held); reopened lazily after stop()."""
        if self._conn is None:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # a test double: survives process kills, not power loss
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    # -- request handling ----------------------------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[str, Callable[..., tuple[int, Any]] | None, str | None]:
        """(route template, handler or None, :id). Like Express: a trailing slash is ignored."""
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        parts = path.split("/")
        n = len(parts)
        if n >= 3 and parts[0] == "" and parts[1] == "api":
            p2 = parts[2]
            if n == 3:
                if p2 == "health" and method == "GET":
                    return "/api/health", self._health, None
                if p2 == "contacts":
                    if method == "GET":
                        return "/api/contacts", self._list_contacts, None
                    if method == "POST":
                        return "/api/contacts", self._create_contact, None
            elif n == 4:
                if p2 == "contacts":
                    fn = {"GET": self._get_contact, "PUT": self._update_contact, "DELETE": self._delete_contact}
                    if method in fn:
                        return "/api/contacts/:id", fn[method], parts[3]
                elif p2 == "import" and method == "POST":
                    if parts[3] == "contacts":
                        return "/api/import/contacts", self._import_contacts, None
                    if parts[3] == "interactions":
                        return "/api/import/interactions", self._import_interactions, None
            elif n == 5 and p2 == "contacts" and parts[4] == "interactions":
                if method == "GET":
                    return "/api/contacts/:id/interactions", self._list_interactions, parts[3]
                if method == "POST":
                    return "/api/contacts/:id/interactions", self._create_interaction, parts[3]
        return "*", None, None

    def _serve(self, h: _Handler, method: str, target: str, headers: dict[str, str], body: bytes, keep: bool) -> bool:
        """Answer one request on handler `h`; False closes the connection."""
        self.last_headers = headers
        if self.redirect_to is not None:
            h._send(301, b"", b"text/plain", b"Location: %s%s\r\n" % (self.redirect_to.encode(), target.encode() if self.redirect_keeps_path else b""), keep)
            return keep
        if self.latency_s:
            self._stopping.wait(self.latency_s)
        path, _, query = target.partition("?")
        route, fn, ident = self._route(method, path)
        fault = self.faults.pick(method, route) if fn is not None else None
        extra = b""
        if fault is None or fault in ("slow", "500-after-write", "504-after-write", "truncate",
                                      "500-after-write-truncated", *_ODD_2XX):
            if fault == "slow":
                self._stopping.wait(self.faults.slow_s)
            status, out, ctype = self._answer(method, path, query, headers, body, fn, ident)
            if fault in ("500-after-write", "500-after-write-truncated"):
                status, out = 500, _internal().body()
            elif fault == "504-after-write":
                status, out, ctype = 504, _REASONS[504].encode(), b"text/plain; charset=utf-8"
            elif fault in _ODD_2XX and 200 <= status < 300:
                out = _dumps({"data": _ODD_2XX[fault](json.loads(out)["data"])}).encode()
        elif fault in _LATE_WRITES:
            status, out, ctype = int(fault[:3]), _REASONS[int(fault[:3])].encode(), b"text/plain; charset=utf-8"
            with self._stats_lock:
                self.serving += 1
            threading.Thread(target=self._write_late, args=(method, path, query, headers, body, fn, ident),
                             daemon=True).start()
        elif fault in ("timeout", "reset"):
            if fault == "timeout":
                h._hold(self.faults.hold_s)
            self._count(method, route, fault)
            if fault == "reset":
                h._reset()
            return False
        elif fault == "500-before-write":
            status, out, ctype = 500, _internal().body(), _JSON_CT
        elif fault == "500-page":
            status, out, ctype = 500, _html_page("500 Internal Server Error"), _HTML_CT
        else:  # 429 / 502 / 503 / 504 / 524 / 400 / 405 / 413, as a proxy or rate limiter would answer
            status, ctype = int(fault), _JSON_CT
            if status == 429:
                if self.faults.retry_after is not None:
                    extra = b"Retry-After: %s\r\n" % self.faults.retry_after.encode()
                out = _Fail(429, "RATE_LIMITED", "Too many requests").body()
            elif status < 500:
                out, ctype = _html_page(f"{status} {_REASONS[status]}"), _HTML_CT
            else:
                out, ctype = _REASONS[status].encode(), b"text/plain; charset=utf-8"
        self._count(method, route, status)
        if fault in ("truncate", "500-after-write-truncated"):
            head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
                status, _REASONS.get(status, "Unknown").encode(), ctype, len(out))
            h.connection.sendall(head + out[: len(out) // 2])
            return False
        h._send(status, out, ctype, extra, keep)
        return keep

    def _write_late(self, *request: Any) -> None:
        """A request a proxy has answered for: the CRM makes its write `late_s` later (unless it stops),
        counted in `serving` meanwhile."""
        try:
            if not self._stopping.wait(self.faults.late_s):
                self._answer(*request)
        finally:
            with self._stats_lock:
                self.serving -= 1

    def _count(self, method: str, route: str, status: int | str) -> None:
        key = (method, route, status)
        with self._stats_lock:
            self.stats[key] += 1
            if self.timeline is not None:
                self.timeline.append((time.monotonic(), *key))

    def _answer(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
        fn: Callable[..., tuple[int, Any]] | None, ident: str | None,
    ) -> tuple[int, bytes, bytes]:
        if fn is None:
            return 404, _html_404(method, path), _HTML_CT
        try:
            if self._auth is not None and headers.get("authorization") != self._auth:
                raise _Fail(401, "UNAUTHORIZED", "Missing or invalid API key")
            if "origin" in headers:
                raise _internal()  # the CORS middleware's "not allowed" error becomes a 500
            if len(body) > MAX_BODY:
                raise _internal()  # the body parser's 413 becomes a 500
            status, document = fn(ident, query, body)
            return status, _dumps(document).encode(), _JSON_CT
        except _Fail as fail:
            return fail.status, fail.body(), _JSON_CT
        except Exception:
            self._record_error()
            return 500, _internal().body(), _JSON_CT

    @staticmethod
    def _id(ident: str | None) -> int:
        """Prisma with a NaN or out-of-range id fails: a 500, not a 404."""
        if ident is None or not ident.isdigit() or not ident.isascii():
            raise _internal()
        value = int(ident)
        if value > 2_147_483_647:
            raise _internal()
        return value

    # -- endpoints -----------------------------------------------------------------------------

    def _health(self, _ident: None, _query: str, _body: bytes) -> tuple[int, Any]:
        return 200, {"status": "ok"}

    def _list_contacts(self, _ident: None, query: str, _body: bytes) -> tuple[int, Any]:
        q = dict(parse_qsl(query)) if query else {}
        self.contact_listings.append(q)
        page = _int_param(q, "page", 1)
        limit = min(_int_param(q, "limit", 25), MAX_LIMIT)
        where, params = "", []
        words = q.get("search", "").lower().split()
        if words:
            where = " WHERE " + " AND ".join(["instr(search, ?) > 0"] * len(words))
            params = list(words)
        sort = q.get("sort") if q.get("sort") in _ORDERS else "name_asc"
        order, order_params = self._order(*_ORDERS[sort], sort, limit, page)
        with self._lock:
            db = self._db()
            total = db.execute("SELECT COUNT(*) FROM contacts" + where, params).fetchone()[0]
            rows = db.execute(
                f"SELECT {_C_COLS} FROM contacts{where} ORDER BY {order} LIMIT ? OFFSET ?",
                params + order_params + [limit, (page - 1) * limit],
            ).fetchall()
        meta = {"page": page, "limit": limit, "total": total, "totalPages": -(-total // limit)}
        return 200, {"data": [_contact_json(r) for r in rows], "meta": meta}

    def _order(self, keys: str, stable: str, *query: object) -> tuple[str, list[Any]]:
        """ORDER BY `keys`, then ties by `stable` or (`unstable_ties`) in an order of their own for each
        query: PostgreSQL's sort may order equal rows differently for another LIMIT/OFFSET, and alike
        when the same query comes again, so a repeated listing can miss the same row again."""
        if not self.unstable_ties:
            return f"{keys}, {stable}", []
        spread = zlib.crc32(repr((self.tie_salt, *query)).encode())
        return f"{keys}, (id * ?) % {_PRIME}", [1 + spread % (_PRIME - 1)]

    def _contact_row(self, db: sqlite3.Connection, contact_id: int) -> tuple:
        row = db.execute(f"SELECT {_C_COLS} FROM contacts WHERE id = ?", (contact_id,)).fetchone()
        if row is None:
            raise _not_found()
        return row

    def _get_contact(self, ident: str, _query: str, _body: bytes) -> tuple[int, Any]:
        contact_id = self._id(ident)
        with self._lock:
            row = self._contact_row(self._db(), contact_id)
        return 200, {"data": _contact_json(row)}

    def _insert_contact(self, db: sqlite3.Connection, cols: dict[str, Any], now: int) -> int:
        first, last = cols.get("first_name", ""), cols.get("last_name", "")
        cur = db.execute(
            "INSERT INTO contacts (first_name, last_name, phone, email, organization, title, location, notes,"
            " created_at, updated_at, search) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (first, last, cols.get("phone"), cols.get("email"), cols.get("organization"), cols.get("title"),
             cols.get("location"), cols.get("notes"), now, now,
             _blob(first, last, cols.get("email"), cols.get("phone"), cols.get("organization"))),
        )
        return cur.lastrowid  # type: ignore[return-value]

    def _create_contact(self, _ident: None, _query: str, body: bytes) -> tuple[int, Any]:
        cols = self._refuse_values(_check_contact(_parse_body(body), partial=False))
        with self._lock:
            db = self._db()
            contact_id = self._insert_contact(db, cols, _now_ms())
            row = self._contact_row(db, contact_id)
        return 201, {"data": _contact_json(row)}

    def _update_contact(self, ident: str, _query: str, body: bytes) -> tuple[int, Any]:
        contact_id = self._id(ident)
        parsed = _parse_body(body)
        with self._lock:
            db = self._db()
            self._contact_row(db, contact_id)  # 404 before 422, like a findUnique-then-validate handler
        cols = self._refuse_values(_check_contact(parsed, partial=True))
        with self._lock:
            db = self._db()
            row = self._write_contact(db, contact_id, cols)
        return 200, {"data": _contact_json(row)}

    def _refuse_values(self, cols: dict[str, Any]) -> dict[str, Any]:
        """A test's stand-in for a CRM stricter than Zod: a 422 naming each field whose value is in
        `reject_contact_values`."""
        refused = {name: [f"Invalid {name}"] for name, col in _CONTACT_FIELDS.items()
                   if cols.get(col) is not None and cols[col] in self.reject_contact_values}
        if refused:
            raise _invalid(refused)
        return cols

    def _write_contact(self, db: sqlite3.Connection, contact_id: int, cols: dict[str, Any]) -> tuple:
        """Apply column updates (keeping the search text current); the updated row."""
        row = self._contact_row(db, contact_id)
        merged = dict(zip(("first_name", "last_name", "phone", "email", "organization"), row[1:6]))
        merged.update({k: v for k, v in cols.items() if k in merged})
        cols = {**cols, "updated_at": cols.get("updated_at", _now_ms()),
                "search": _blob(merged["first_name"], merged["last_name"], merged["email"], merged["phone"],
                                merged["organization"])}
        sets = ", ".join(f"{k} = ?" for k in cols)
        db.execute(f"UPDATE contacts SET {sets} WHERE id = ?", (*cols.values(), contact_id))
        return self._contact_row(db, contact_id)

    def _delete_contact(self, ident: str, _query: str, _body: bytes) -> tuple[int, Any]:
        contact_id = self._id(ident)
        with self._lock:
            if not self._delete(self._db(), contact_id):
                raise _not_found()
        return 200, {"data": {"deleted": True}}

    @staticmethod
    def _delete(db: sqlite3.Connection, contact_id: int) -> bool:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM interactions WHERE contact_id = ?", (contact_id,))
            gone = db.execute("DELETE FROM contacts WHERE id = ?", (contact_id,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return gone > 0

    def _list_interactions(self, ident: str, query: str, _body: bytes) -> tuple[int, Any]:
        contact_id = self._id(ident)
        q = dict(parse_qsl(query)) if query else {}
        page = _int_param(q, "page", 1)
        limit = min(_int_param(q, "limit", 20), MAX_LIMIT)
        where, params = "contact_id = ?", [contact_id]
        day = q.get("date")
        if day is not None:
            m = _DAY.fullmatch(day)
            try:
                start = calendar.timegm(date(int(m[1]), int(m[2]), int(m[3])).timetuple()) * 1000  # type: ignore[index]
            except (TypeError, ValueError):
                raise _internal() from None  # new Date("garbage") reaches Prisma as Invalid Date
            where += " AND occurred_at >= ? AND occurred_at < ?"
            params += [start, start + _DAY_MS]
        order, order_params = self._order("occurred_at DESC", "id DESC", "interactions", limit, page)
        with self._lock:
            db = self._db()
            total = db.execute(f"SELECT COUNT(*) FROM interactions WHERE {where}", params).fetchone()[0]
            rows = db.execute(
                f"SELECT {_I_COLS} FROM interactions WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                params + order_params + [limit, (page - 1) * limit],
            ).fetchall()
        meta = {"page": page, "limit": limit, "total": total, "totalPages": -(-total // limit)}
        return 200, {"data": [_interaction_json(r) for r in rows], "meta": meta}

    def _create_interaction(self, ident: str, _query: str, body: bytes) -> tuple[int, Any]:
        contact_id = self._id(ident)
        kind, occurred, source, content, duration = _check_interaction(_parse_body(body))
        if iso_ms(occurred)[:10] in self.reject_interactions_at:  # a test's stand-in for any 422
            raise _invalid({"occurredAt": ["Rejected by the test's stand-in"]})
        now = _now_ms()
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                contact = db.execute("SELECT cadence_days FROM contacts WHERE id = ?", (contact_id,)).fetchone()
                if contact is None:
                    raise _not_found()
                new_id = db.execute(_INSERT_INTERACTION,
                                    (contact_id, kind, content, duration, occurred, source, now, kind in OUTBOUND),
                                    ).lastrowid
                last = db.execute(  # a full recompute: bulk-imported rows count from now on too
                    "SELECT MAX(occurred_at) FROM interactions WHERE contact_id = ? AND outbound = 1", (contact_id,)
                ).fetchone()[0]
                due = last + contact[0] * _DAY_MS if last is not None and contact[0] is not None else None
                db.execute(
                    "UPDATE contacts SET last_contacted_at = ?, contact_due_at = ?, updated_at = ? WHERE id = ?",
                    (last, due, now, contact_id),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return 201, {"data": _interaction_json((new_id, contact_id, kind, content, duration, occurred, source, now))}

    def _import_contacts(self, _ident: None, _query: str, body: bytes) -> tuple[int, Any]:
        rows = _parse_rows(body)
        imported, errors = 0, []
        now = _now_ms()
        with self._lock:
            db = self._db()
            for n, row in enumerate(rows, start=1):
                if not isinstance(row, dict):
                    errors.append({"row": n, "field": "row", "message": "Expected object"})
                    continue
                text = {k: v.strip() for k, v in row.items() if isinstance(v, str)}
                first = text.get("firstName") or text.get("first_name") or ""
                last = text.get("lastName") or text.get("last_name") or ""
                org = text.get("organization") or None
                if not last:
                    if not org:
                        errors.append({"row": n, "field": "lastName", "message": "Last name or organization is required"})
                        continue
                    last = org
                cols = {"first_name": first, "last_name": last, "organization": org}
                for name in ("phone", "email", "title", "notes"):
                    cols[name] = text.get(name) or None
                self._insert_contact(db, cols, now)
                imported += 1
        return 200, {"data": {"imported": imported, "skipped": len(rows) - imported, "errors": errors}}

    def _import_interactions(self, _ident: None, _query: str, body: bytes) -> tuple[int, Any]:
        rows = _parse_rows(body)
        imported, errors = 0, []
        now = _now_ms()
        with self._lock:
            db = self._db()
            for n, row in enumerate(rows, start=1):
                try:
                    values = self._lax_interaction(db, row, now)
                except ValueError as exc:
                    field_name, _, message = str(exc).partition(": ")
                    errors.append({"row": n, "field": field_name, "message": message})
                    continue
                db.execute(_INSERT_INTERACTION, values)
                imported += 1
        return 200, {"data": {"imported": imported, "skipped": len(rows) - imported, "errors": errors}}

    @staticmethod
    def _lax_interaction(db: sqlite3.Connection, row: Any, now: int) -> tuple:
        """One bulk row -> insert values; ValueError("field: message") when the row is skipped."""
        if not isinstance(row, dict):
            raise ValueError("row: Expected object")
        email = row.get("email") or row.get("contact_email")
        found = db.execute("SELECT id FROM contacts WHERE email = ? ORDER BY id LIMIT 1", (email,)).fetchone() \
            if isinstance(email, str) else None
        if found is None:
            raise ValueError("email: No contact with this email")
        kind = str(row.get("type") or "").upper()
        if kind not in TYPES:
            raise ValueError(f"type: Invalid type '{row.get('type')}'")
        source = str(row.get("source") or "MANUAL").upper()
        if source not in SOURCES:
            raise ValueError(f"source: Invalid source '{row.get('source')}'")
        when = row.get("occurred_at", row.get("occurredAt"))
        occurred = parse_instant(when) if isinstance(when, str) else None
        if occurred is None:
            raise ValueError("occurred_at: Invalid date")
        duration = row.get("duration_seconds")
        try:
            duration = int(duration) if duration not in (None, "") and not isinstance(duration, bool) else None
        except (TypeError, ValueError):
            duration = None
        content = row.get("content")
        content = content if isinstance(content, str) else None
        return (found[0], kind, content, duration or None, occurred, source, now, kind in OUTBOUND)

    # -- test helpers: the database, directly ----------------------------------------------------

    def contacts(self) -> list[dict[str, Any]]:
        """Every contact as the API would return it, by id."""
        with self._lock:
            rows = self._db().execute(f"SELECT {_C_COLS} FROM contacts ORDER BY id").fetchall()
        return [_contact_json(r) for r in rows]

    def interactions(self, contact_id: int | None = None) -> list[dict[str, Any]]:
        """Interactions (of one contact, or all) as the API would return them, by id."""
        sql, params = f"SELECT {_I_COLS} FROM interactions", ()
        if contact_id is not None:
            sql, params = sql + " WHERE contact_id = ?", (contact_id,)
        with self._lock:
            rows = self._db().execute(sql + " ORDER BY id", params).fetchall()
        return [_interaction_json(r) for r in rows]

    def interactions_of(self, phone: str) -> list[dict[str, Any]]:
        """Interactions of every contact whose phone is exactly `phone`, by contact, then by id."""
        return [i for c in self.contacts() if c["phone"] == phone for i in self.interactions(c["id"])]

    def add_contact(self, **fields: Any) -> int:
        """Seed a contact as if the owner typed it (no validation: any phone format). Keys are API
        names (firstName, phone, cadenceDays, lastContactedAt as epoch ms, ...) or column names."""
        cols = self._seed_cols(fields)
        now = _now_ms()
        with self._lock:
            db = self._db()
            contact_id = self._insert_contact(db, cols, cols.get("created_at", now))
            extra = {k: v for k, v in cols.items() if k in ("cadence_days", "last_contacted_at", "contact_due_at", "updated_at")}
            if extra:
                self._write_contact(db, contact_id, extra)
        return contact_id

    def update_contact(self, contact_id: int, **fields: Any) -> None:
        """Edit a contact as the owner would in Citadel's UI (no validation)."""
        cols = self._seed_cols(fields)
        with self._lock:
            db = self._db()
            try:
                self._write_contact(db, contact_id, cols)
            except _Fail:
                raise KeyError(contact_id) from None

    def backup(self) -> sqlite3.Connection:
        """A copy of the whole database, as the owner's backup (`restore` puts it back)."""
        copy = sqlite3.connect(":memory:", check_same_thread=False)
        with self._lock:
            self._db().backup(copy)
        return copy

    def restore(self, backup: sqlite3.Connection) -> None:
        """Put a backup back, its id sequences too: ids handed out since it was taken are handed out again."""
        with self._lock:
            backup.backup(self._db())

    def delete_contact(self, contact_id: int) -> None:
        """Delete a contact and its interactions, as the owner would in Citadel's UI."""
        with self._lock:
            if not self._delete(self._db(), contact_id):
                raise KeyError(contact_id)

    @staticmethod
    def _seed_cols(fields: dict[str, Any]) -> dict[str, Any]:
        unknown = set(fields) - set(_SEED_FIELDS)
        if unknown:
            raise TypeError(f"unknown contact fields: {sorted(unknown)}")
        return {_SEED_FIELDS[k]: v for k, v in fields.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.citadel", description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--unstable-ties", action="store_true")
    args = parser.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server = CitadelServer(args.db, args.host, args.port, args.api_key, unstable_ties=args.unstable_ties,
                           latency_s=args.latency_ms / 1000).start()
    print(f"listening on {server.url}", flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
