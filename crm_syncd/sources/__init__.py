"""Readers of Apple's databases. Each yields plain typed records and never writes.

- `messages`: chat.db rows -> `Activity` (one per message and counterpart)
- `calls`: CallHistory.storedata rows -> `Activity` (one per call and counterpart)
- `contacts`: AddressBook-v22.abcddb cards -> `Card`
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

APPLE_EPOCH = 978_307_200  # 2001-01-01T00:00:00Z in Unix seconds
BEFORE_WINDOW = "before-window"  # skip reason of rows dated before a read's `since_ms`
FUTURE_SLACK_MS = 86_400_000  # a date up to this far ahead of the wall clock is taken as it is
AHEAD_MAX_MS = 30 * 86_400_000  # further ahead, up to this: read again later (a clock behind, a send scheduled)
AHEAD, BAD_DATE = "ahead-of-clock", "bad-date"  # skip reasons: a row held (the mark waits before it), one dropped


class Activity(NamedTuple):
    """One interaction with one counterpart, as the Mac recorded it."""

    key: str  # stable delivery key: msg:<guid>[:<address>] or call:<unique id>[:<address>]
    address: str  # the counterpart as Apple stored it (phone, email, short code, ...)
    type: str  # CRM interaction type: TEXT_INBOUND, TEXT_OUTBOUND, CALL_INBOUND, CALL_OUTBOUND, CALL_MISSED
    occurred_ms: int  # Unix epoch milliseconds, UTC
    duration_s: int | None  # whole seconds for connected calls, else None
    person: str | None = None  # Apple's own "same person" hint (handle.person_centric_id)
    country: str | None = None  # ISO country (upper case) a number without its country code is from, if recorded


def row_key(key: str) -> str | None:
    """The key of the row an Activity's key continues when that row was fanned out to several parties
    (`<row key>:<party>`: a group message of the owner's, a group call), else None."""
    kind, _, rest = key.partition(":")
    own = 2 if kind == "call" and rest.startswith("pk:") else 1  # call:pk:<Z_PK> when it has no unique id
    parts = rest.split(":", own)
    return f"{kind}:{':'.join(parts[:own])}" if len(parts) > own else None


@dataclass
class Batch:
    """What one bounded read past a high-water mark produced."""

    activities: list[Activity] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows
    last_rowid: int = 0  # highest source row examined (the next mark), even if it was skipped
    rows: int = 0  # source rows examined
    anchor: str | None = None  # the own id (guid, ZUNIQUE_ID) of the row at last_rowid, if any
    unsettled: int | None = None  # the first row to read again later: a send under way, a date ahead of the clock
    # rows with several parties (a message sent to a group, a group call), one Activity each, keyed
    # `<shared>:<address>`: (shared, occurred_ms) per row
    fanned_out: list[tuple[str, int]] = field(default_factory=list)
    # (key, occurred_ms) of calls the phone screened out (blocked, or silenced as unknown): never a
    # reason to make a placeholder; delivered once their number has a contact
    screened: list[tuple[str, int]] = field(default_factory=list)


class Phone(NamedTuple):
    value: str  # as typed on the card
    label: str | None  # unwrapped label: Mobile, Home, Work, iPhone, or a custom one
    primary: bool
    country: str | None = None  # ZCOUNTRYCODE: the ISO country a number typed without one is from


class Email(NamedTuple):
    value: str
    label: str | None
    primary: bool


class Card(NamedTuple):
    """A person or company card from one AddressBook store."""

    store: str  # which AddressBook database (root or Sources/<UUID>), relative to the AddressBook dir
    unique_id: str  # ZUNIQUEID, stable within an account
    first: str | None = None
    last: str | None = None
    middle: str | None = None
    nickname: str | None = None
    organization: str | None = None
    job_title: str | None = None
    link_id: str | None = None  # ZLINKID: Contacts' own cross-account link
    company: bool = False  # ZDISPLAYFLAGS bit 0: shown by its organisation
    phones: tuple[Phone, ...] = ()  # ordered: primary first, then Apple's ordering index
    emails: tuple[Email, ...] = ()
    note: str | None = None
    modified: float | None = None  # ZMODIFICATIONDATE, Unix seconds
    preferred_name: bool = False  # ZPREFERREDFORLINKNAME: of linked cards, the one Contacts takes the name from
