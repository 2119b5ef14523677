"""What `crm-syncd status` and `crm-syncd doctor` report, gathered without the daemon's help.

The daemon leaves a heartbeat in the state database; everything else (marks, outbox, Apple's
newest rows, the CRM's health, the launchd agent) is read directly.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crm_syncd import crm as crmlib, launchd
from crm_syncd.daemon import HEARTBEAT_S, Lock, troubled
from crm_syncd.engine import CONTACTS_PROBLEMS, CONTACTS_SYNCED
from crm_syncd.logs import mask_key
from crm_syncd.settings import (Settings, api_key_places, config_file_to_edit, file_refusal, folder_problem,
                                space_problem, where_set)
from crm_syncd.sources import AHEAD, contacts as contacts_source
from crm_syncd.sources.calls import CallsReader
from crm_syncd.sources.messages import MessagesReader
from crm_syncd.sources.sqlite import NeedsFullDiskAccess, NoRoomBeside, SourceError, SourceMissing
from crm_syncd.store import LOOK_FIRST, Store, db_files, now_ms, state_exists

HEALTHY, DEGRADED, NOT_RUNNING = 0, 1, 3
STALL_MS = 180_000  # rows waiting and the mark unmoved this long: the lag is growing
STALE_BEAT_MS = 3 * HEARTBEAT_S * 1000  # a running daemon that missed three beats is hung
MISSING = "database not found"  # the feature is unused on this Mac: a problem for nobody


def _iso(ms: int | None) -> str | None:
    return None if ms is None else crmlib.occurred_iso(ms)


def _latest(*times_ms: int | None) -> str | None:
    """The latest of these times (the daemon's, a one-shot `sync`'s), or None if there is none."""
    return _iso(max((ms for ms in times_ms if ms), default=None))


def _newest(reader) -> tuple[int | None, str | None]:
    try:
        return reader.newest_rowid(), None
    except SourceMissing:
        return None, MISSING
    except SourceError as exc:
        return None, str(exc)


def _rows(reader) -> int | None:
    try:
        return reader.row_count()
    except SourceError:
        return None


def _waiting_since(reader, mark: dict) -> int:
    """Since when rows past the mark have waited: the mark's last move, or the first such row's date
    if later (a row that came after a quiet spell has not waited all of it; one dated ahead of the
    clock, which holds the mark until its date, has not waited at all)."""
    try:
        batch = reader.read(mark["rowid"], limit=1)
    except SourceError:
        return mark["updated_ms"]
    if batch.skipped[AHEAD]:
        return now_ms()
    return max(mark["updated_ms"], min((a.occurred_ms for a in batch.activities), default=0))


def _agent() -> dict[str, Any]:
    try:
        state = launchd.agent_state()
    except Exception as exc:  # launchctl missing (not a Mac) or unreadable: say so, do not fail
        return {"installed": launchd.plist_path().exists(), "loaded": None, "error": str(exc)}
    return {"installed": state.installed, "loaded": state.loaded, "pid": state.pid, "last_exit": state.last_exit}


def _client(settings: Settings) -> crmlib.CitadelClient:
    return crmlib.CitadelClient(settings.api_url, settings.api_key_value, timeout=3)


def _uptime_s(beat: dict, now: int) -> int | None:
    """The daemon's uptime: its own count at its last beat, plus that beat's age (a clock set back since
    the start does not make it negative; a daemon from before this count, by the wall clock)."""
    age = max(0, now - beat.get("beat_ms", now))
    if isinstance(uptime := beat.get("uptime_ms"), int):
        return round((uptime + age) / 1000)
    started = beat.get("started_ms")
    return round(max(0, now - started) / 1000) if isinstance(started, int) else None


@dataclass
class CRMHealth:
    """What the CRM's health check (`CitadelClient.check_health`) found; `problem` None: all is well."""

    reachable: bool  # an HTTP answer came from api_url
    problem: str | None = None
    fix: str | None = None
    owner_fix: bool = False  # the API key, api_url redirecting: exit 2 in `doctor`


async def _check_health(settings: Settings) -> None:
    async with _client(settings) as client:
        await client.check_health()


def check_crm(settings: Settings) -> CRMHealth:
    """The health check `doctor` and `status` share, in words that say what is wrong and the fix."""
    api_url_fix = f"set api_url in {where_set('api_url', config_file_to_edit())}"
    try:
        asyncio.run(_check_health(settings))
    except crmlib.Unauthorized as exc:
        return CRMHealth(True, f"reachable, but it refused crm-syncd's API key ({exc.message})",
                         f"set api_key in {where_set('api_key', api_key_places())}", owner_fix=True)
    except crmlib.Redirected as exc:  # only the owner can point api_url at the API: exit 2, as for the key
        return CRMHealth(True, exc.message, api_url_fix, owner_fix=True)
    except crmlib.Untrusted as exc:
        return CRMHealth(False, f"unreachable: {exc.message}", "renew the CRM's certificate, or "
                         f"{api_url_fix} with the host name its certificate names")
    except crmlib.Unreachable as exc:
        return CRMHealth(False, f"unreachable: {exc.message}", f"start Citadel, or {api_url_fix}")
    except crmlib.Transient as exc:  # a 429, a 503, a proxy's 502
        return CRMHealth(True, f"reachable, but unwell ({exc.message})", "see the CRM's own log")
    except crmlib.CRMError as exc:
        return CRMHealth(True, f"answers, but not as Citadel does ({exc.message})",
                         f"see the CRM's own log; if api_url is not Citadel's address, {api_url_fix}")
    except Exception as exc:  # noqa: BLE001 - whatever it is, the check fails with it
        return CRMHealth(False, f"unreachable: {exc}", f"start Citadel, or {api_url_fix}")
    return CRMHealth(True)


def gather(settings: Settings) -> dict[str, Any]:
    """The daemon's state as a plain dict (the `status --json` document)."""
    present = state_exists(settings.state_db)  # first: a state folder one may not enter is named as `sync` names it
    holder = Lock(settings.lock_path).held_by_other()  # the daemon, or a one-shot `sync`
    running = holder is not None and holder[1] == "run"
    store = Store.for_reading(settings.state_db) if present else None
    try:
        beat = (store.get("daemon") if store else None) or {}
        marks = {s: store.mark_details(s) if store else None for s in ("messages", "calls")}
        counts = store.counts() if store else {}
        failures = store.failures() if store else []
        held = store.held_by_reason() if store else {}
        duplicates = store.get("duplicates", []) if store else []
        contacts_synced = store.get(CONTACTS_SYNCED) if store else None
        contacts_problems = (store.get(CONTACTS_PROBLEMS) if store else None) or {}
        looking = store.get(LOOK_FIRST) if store else None
    finally:
        if store:
            store.close()
    now = now_ms()
    sources: dict[str, Any] = {}
    daemon_sources = beat.get("sources") or {}
    readers = {"messages": MessagesReader(settings.messages_db), "calls": CallsReader(settings.calls_db)}
    for name, reader in readers.items():
        newest, problem = _newest(reader)
        mark = marks[name]
        theirs = daemon_sources.get(name) or {}
        # never read: every row is past the mark, and none has waited for it yet (the first read comes first)
        lag = None if newest is None else max(0, newest - mark["rowid"]) if mark else _rows(reader)
        stalled_ms = max(0, now - _waiting_since(reader, mark)) if mark and lag else 0
        sources[name] = {
            "last_sync_at": _latest(theirs.get("last_sync_ms"), (mark or {}).get("updated_ms")),  # daemon or `sync`
            "mark": mark["rowid"] if mark else None, "newest": newest, "lag_rows": lag,
            "first_read_days": None if mark else settings.initial_lookback_days,  # not read yet: what it takes
            "lag_seconds": round(stalled_ms / 1000) if lag else 0,
            # the daemon's own failure first: it may lack Full Disk Access that this Terminal has
            "problem": (theirs.get("error") if running else None) or problem,
        }
    contacts = daemon_sources.get("contacts") or {}
    sources["contacts"] = {"last_sync_at": _latest(contacts.get("last_sync_ms"), contacts_synced), "lag_rows": 0,
                           "stores": len(contacts_source.store_paths(Path(settings.addressbook_dir))),
                           "problem": contacts.get("error") if running else None,
                           # the last contacts pass's people the CRM would not take (their messages wait in
                           # placeholders), and those written without an address it refused; names masked
                           "failed": contacts_problems.get("failed", []),
                           "left_out": contacts_problems.get("left_out", [])}
    crm = check_crm(settings)
    started = beat.get("started_ms") if running else None
    beat_age = now - beat["beat_ms"] if running and beat.get("beat_ms") else None
    doc = {
        "running": running,
        "pid": beat.get("pid") if running else None,
        "sync_pid": holder[0] if holder and not running else None,  # a one-shot `sync` holds the lock
        "started_at": _iso(started),
        "uptime_s": _uptime_s(beat, now) if running else None,
        "last_beat_at": _iso(beat.get("beat_ms")),
        "last_beat_age_s": round(beat_age / 1000) if beat_age is not None else None,
        "responding": beat_age <= STALE_BEAT_MS if beat_age is not None else None,
        "agent": _agent(),
        "sources": sources,
        "outbox": {"pending": counts.get("pending", 0) + counts.get("sending", 0), "held": counts.get("held", 0),
                   "held_by_reason": held, "failed": counts.get("failed", 0), "delivered": counts.get("delivered", 0),
                   "failures": [{"key": mask_key(k), "type": t, "reason": r} for k, t, r in failures]},
        # /api/health answers "ok" whatever its database does; the daemon knows whether its requests got through
        "crm": {"url": settings.api_url, "reachable": crm.reachable, "problem": crm.problem, "fix": crm.fix,
                "daemon_reachable": beat.get("crm_reachable") if running else None,
                "daemon_failure": beat.get("crm_failure") if running else None},
        "duplicates": duplicates,  # CRM contacts that look like one person but were left alone
        # after a restored (or unstamped) state: the sources still to be read to their end, [] once all
        # were; None when every item goes out without a look in the CRM first (the usual)
        "looking_up_before_sending": looking,
        "last_error": beat.get("last_error"),  # the latest, even if since overcome: see its age
        "last_error_age_s": round((now - beat["last_error_ms"]) / 1000) if beat.get("last_error_ms") else None,
    }
    lag_growing = any(s.get("lag_seconds", 0) * 1000 > STALL_MS for s in sources.values())
    troubles = troubled(failed=doc["outbox"]["failed"], refused=sources["contacts"]["failed"],
                        problems=[s.get("problem") for s in sources.values() if s.get("problem") != MISSING],
                        takes_requests=doc["crm"]["daemon_reachable"])
    doc["health"] = ("not running" if not running else
                     "degraded" if troubles or crm.problem or lag_growing or doc["responding"] is False
                     else "healthy")
    return doc


def exit_code(doc: dict[str, Any]) -> int:
    return {"healthy": HEALTHY, "degraded": DEGRADED}.get(doc["health"], NOT_RUNNING)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    owner_fix: bool = False  # a failure only the owner can fix (exit 2, as `sync` gives for the same cause)
    note: bool = False  # no failure, but worth knowing (a database this Mac has not made yet)


def doctor(settings: Settings) -> list[Check]:
    """Every precondition of a healthy daemon, each with the fix when it fails."""
    checks = [Check("configuration", True, f"read from {settings.config_file or 'defaults and environment'}")]
    readers = {"Messages (chat.db)": MessagesReader(settings.messages_db),
               "Call history": CallsReader(settings.calls_db)}
    for label, reader in readers.items():
        checks.append(_probe(label, reader.path, reader.newest_rowid))
    try:
        stores = contacts_source.store_paths(Path(settings.addressbook_dir))
    except NeedsFullDiskAccess as exc:
        checks.append(_denied("Contacts", exc))
    else:
        if not stores:
            checks.append(Check("Contacts", True, f"no AddressBook under {settings.addressbook_dir}: nothing to "
                                "read yet (Contacts never opened on this Mac, or addressbook_dir set elsewhere)",
                                note=True))
        checks += [_probe(f"Contacts ({db.parent.name})", db, lambda db=db: contacts_source.read_store(db, db.name))
                   for db in stores]
    crm = check_crm(settings)
    health = crm.problem or "answers and takes crm-syncd's requests"
    checks.append(Check("CRM", crm.problem is None, f"{settings.api_url}: {health}", crm.fix, owner_fix=crm.owner_fix))
    agent = _agent()
    checks.append(Check("launchd agent", bool(agent.get("loaded")),
                        "loaded" if agent.get("loaded") else "installed, not loaded" if agent.get("installed")
                        else "not installed", None if agent.get("loaded") else "run `crm-syncd install`"))
    checks += [_folder_check(label, settings, field) for label, field in (("state folder", "state_dir"),
                                                                          ("log folder", "log_dir"))]
    return checks + _files_checks(settings)


def _files_checks(settings: Settings) -> list[Check]:
    """crm-syncd's own files, each existing one the owner's to read and write (`sync` and `run` stop on one
    that is not): one failure for each that is not, else one pass."""
    files = [(file, settings.state_db) for file in db_files(settings.state_db)]
    files += [(settings.lock_path, None), (settings.log_file, None)]
    failed = [Check("state files", False, *refusal, owner_fix=True)
              for file, stem in files if (refusal := file_refusal(file, stem))]
    return failed or [Check("state files", True, "the state database, the lock file and the log are yours to "
                                                 "read and write (or not made yet)")]


def _folder_check(label: str, settings: Settings, field: str) -> Check:
    path = getattr(settings, field)
    problem = folder_problem(path)
    if problem is None and (full := space_problem(path)):
        return Check(label, False, f"{path}: {full}", f"free space on the disk holding {path}", owner_fix=True)
    if problem is None:
        return Check(label, True, f"{path} writable")
    return Check(label, False, f"{path}: {problem}", f"set {field} to a folder you can write in (or make this one so)",
                 owner_fix=True)


def _probe(label: str, path: Path, query) -> Check:
    try:
        query()
    except SourceMissing:
        return Check(label, True, f"{path} does not exist: nothing to read yet (feature unused on this Mac)",
                     note=True)
    except NeedsFullDiskAccess as exc:
        return _denied(label, exc)
    except NoRoomBeside as exc:
        return Check(label, False, exc.detail, exc.fix)  # exit 1, as `sync` gives: the other sources go on
    except SourceError as exc:
        return Check(label, False, str(exc), "retry later; if it persists, restart the Mac")
    return Check(label, True, f"{path} readable")


def _denied(label: str, exc: NeedsFullDiskAccess) -> Check:
    return Check(label, False, exc.detail, str(exc).split(". ", 1)[-1], owner_fix=True)
