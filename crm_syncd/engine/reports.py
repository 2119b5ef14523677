"""What each step of the pipeline reports: the CLI prints them, the daemon logs them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SourceReport:
    source: str
    rows: int = 0
    added: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    missing: bool = False
    rebuilt: bool = False
    held: bool = False  # the mark waits before rows a later read must see (a message still being sent)
    error: str | None = None  # the database could not be read (damaged, locked past every retry)


@dataclass
class ContactsReport:
    cards: int = 0
    created: list[str] = field(default_factory=list)
    existing: int = 0
    promoted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    owner_edits: list[str] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (kept, possible duplicate) left alone
    merged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (name, the fields the CRM refused and why)
    skipped: Counter[str] = field(default_factory=Counter)
    store_errors: dict[str, str] = field(default_factory=dict)
    missing: bool = False


@dataclass
class PlaceholdersReport:
    created: list[str] = field(default_factory=list)  # names
    refused: list[tuple[str, str]] = field(default_factory=list)  # (name, why): their interactions failed
    unclear: list[tuple[str, str]] = field(default_factory=list)  # (name, why): no clear answer; tried again next time


@dataclass
class PushReport:
    delivered: int = 0
    adopted: int = 0
    twins: int = 0  # items whose interaction is another's: one group row, one contact, two of their addresses
    retried: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    delivered_by_type: Counter[str] = field(default_factory=Counter)
    unreachable: str | None = None  # why delivery stopped early, if it did
    throttled: float | None = None  # a one-shot delivery ended early: the CRM asked to wait this long (s)
    refused: str | None = None  # the CRM refused the API key (401/403): the owner must fix it
