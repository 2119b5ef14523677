"""The `crm-syncd` command line: a thin layer over the engine, the daemon and the store.

Exit codes: 0 success, 1 something failed or is degraded, 2 the owner must fix something
(configuration, Full Disk Access, the state database, an API key the CRM refuses), 3 (status) the daemon is
not running.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from crm_syncd import __version__, crm as crmlib, logs
from crm_syncd.engine import SOURCES, ContactsReport, Engine, PlaceholdersReport, PushReport, SourceReport
from crm_syncd.settings import (ConfigError, Settings, api_key_places, config_file_to_edit, config_warnings,
                                load_settings, ready_folder, where_set)
from crm_syncd.sources.sqlite import NeedsFullDiskAccess, SourceError
from crm_syncd.store import SCHEMA_VERSION, Store, StoreError, state_exists

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAILED, EXIT_FIX, EXIT_NOT_RUNNING = 0, 1, 2, 3
MESSAGE_TYPES = ("TEXT_INBOUND", "TEXT_OUTBOUND")
CALL_TYPES = ("CALL_INBOUND", "CALL_OUTBOUND", "CALL_MISSED")


class Abort(Exception):
    """Stop with a clear one-line message and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FIX) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def owner_errors() -> Iterator[None]:
    """Turn what the owner must fix into one clear line and exit code 2."""
    try:
        yield
    except (ConfigError, StoreError, NeedsFullDiskAccess, logs.LogFileError) as exc:
        raise Abort(str(exc)) from exc


def verbose_option(fn):
    return click.option("-v", "--verbose", is_flag=True, help="Debug output.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crm-syncd")
def main() -> None:
    """Keep Citadel CRM up to date with the people this Mac talks to (metadata only)."""


def _settings(*, folders: tuple[str, ...] = (), **overrides) -> Settings:
    """The settings, with the folders the setting names in `folders` made ready for writing."""
    with owner_errors():
        settings = load_settings(**overrides)
        for field in folders:
            ready_folder(settings, field)
    for warning in config_warnings(settings):
        err.print(f"[yellow]warning:[/] {warning}")
    return settings


def _run(fn, *args, **kwargs) -> None:
    """Run a command body, mapping Abort to its message and exit code."""
    # What start-up made (modules, classes, settings) lives as long as the process: full
    # collections skip it from now on. In a 1M-message extraction they took 0.6 s, then 0.03 s.
    gc.freeze()
    try:
        code = fn(*args, **kwargs)
    except Abort as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(exc.code)
    sys.exit(code or EXIT_OK)


# -- sync ---------------------------------------------------------------------------------


@main.command()
@click.option("--contacts-only", is_flag=True, help="Only contacts, no messages or calls.")
@click.option("--interactions-only", is_flag=True, help="Only messages and calls, no address book.")
@click.option("--dry-run", is_flag=True, help="Show what would be created; write nothing, not even state.")
@click.option("--known-only", is_flag=True, help="No placeholder contacts: hold interactions with unknown people.")
@click.option("--days", type=click.IntRange(min=0), help="Read messages and calls of the last N days.")
@click.option("--full", is_flag=True, help="Re-read everything; what was delivered is still not sent twice.")
@click.option("--reconcile", is_flag=True,
              help="Like --full, but look in the CRM before creating anything (after losing crm-syncd's state).")
@verbose_option
def sync(contacts_only: bool, interactions_only: bool, dry_run: bool, known_only: bool,
         days: int | None, full: bool, reconcile: bool, verbose: bool) -> None:
    """One pass: contacts, then messages and calls, delivered to the CRM."""
    if contacts_only and interactions_only:
        raise click.UsageError("--contacts-only and --interactions-only exclude each other")
    _run(_sync, contacts_only=contacts_only, interactions_only=interactions_only, dry_run=dry_run,
         known_only=known_only, days=days, full=full or reconcile, reconcile=reconcile, verbose=verbose,
         overrides={"dedupe_against_crm": "on"} if reconcile else {})


def _sync(*, contacts_only: bool, interactions_only: bool, dry_run: bool, known_only: bool,
          days: int | None, full: bool, reconcile: bool, verbose: bool, overrides: dict) -> int:
    settings = _settings(folders=() if dry_run else ("state_dir",), **overrides)
    from crm_syncd.daemon import AlreadyRunning, Lock

    lock = Lock(settings.lock_path)
    if not dry_run:  # the daemon and a sync must not deliver the same outbox at once
        try:
            with owner_errors():
                lock.acquire("sync")
        except AlreadyRunning as exc:
            advice = ("it already syncs continuously (stop it to run a one-shot sync)" if exc.holder == "run"
                      else "wait for it to finish")
            raise Abort(f"{exc}; {advice}", EXIT_FAILED) from exc
    logs.configure(verbose=verbose, console=True)
    with owner_errors():
        store = _open_store(settings, dry_run)
    try:
        return asyncio.run(_sync_async(settings, store, contacts_only=contacts_only,
                                       interactions_only=interactions_only, dry_run=dry_run,
                                       known_only=known_only, days=days, full=full, rebuild=reconcile))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or a stop (SIGTERM, SIGHUP)
        err.print("[yellow]stopped:[/] what was not delivered stays queued for the next sync or the daemon")
        return EXIT_FAILED
    finally:
        store.close()
        lock.release()


def _open_store(settings: Settings, dry_run: bool) -> Store:
    if not dry_run:
        return Store(settings.state_db)
    return Store.copy_in_memory(settings.state_db) if state_exists(settings.state_db) else Store.memory()


async def _sync_async(settings: Settings, store: Store, *, contacts_only: bool, interactions_only: bool,
                      dry_run: bool, known_only: bool, days: int | None, full: bool, rebuild: bool) -> int:
    loop, this = asyncio.get_running_loop(), asyncio.current_task()
    for stop in (signal.SIGTERM, signal.SIGHUP):  # ends the run as Ctrl-C does: what was claimed is given back
        loop.add_signal_handler(stop, this.cancel)
    async with crmlib.CitadelClient(settings.api_url, settings.api_key_value, timeout=settings.request_timeout_s,
                                    max_connections=settings.push_concurrency) as client:
        crm = crmlib.DryRun(client) if dry_run else client
        engine = Engine(settings, store, crm, known_only=known_only)
        contacts: ContactsReport | None = None
        sources: list[SourceReport] = []
        push: PushReport | None = None
        placeholders = PlaceholdersReport()
        crm_error: crmlib.CRMError | None = None
        with owner_errors():
            engine.check_continuity(rebuild=rebuild)
            if not interactions_only:
                try:
                    contacts = await engine.sync_contacts()
                except crmlib.CRMError as exc:
                    crm_error = exc
            if not contacts_only:
                with _progress() as progress:
                    for source in SOURCES:
                        task = progress.add_task(f"reading {source}", total=None)
                        try:
                            sources.append(await asyncio.to_thread(
                                engine.extract, source, full=full, days=days,
                                progress=lambda n, t=task: progress.advance(t, n)))
                        except asyncio.CancelledError:  # Ctrl-C: the thread ends at its next batch or retry
                            engine.stopping.set()
                            raise
                        except NeedsFullDiskAccess:
                            raise
                        except SourceError as exc:  # damaged or locked: say so; the other source goes on
                            sources.append(SourceReport(source, error=str(exc)))
                if crm_error is None:
                    try:
                        placeholders = await engine.resolve()
                        push = await engine.push()
                    except crmlib.CRMError as exc:
                        crm_error = exc
        crm_down = f"{_trouble(crm_error)}:[/] {crm_error.message}" if crm_error else None
        refused = crm_error.message if isinstance(crm_error, crmlib.Unauthorized) else push and push.refused
        failed = bool(push and (push.failed or push.unreachable or push.throttled) or contacts and contacts.failed
                      or placeholders.refused or placeholders.unclear or crm_down
                      or any(report.error for report in sources))
        _summary(store, contacts, sources, placeholders, push, crm_down, refused, failed, dry_run, crm)
    return EXIT_FIX if refused else EXIT_FAILED if failed else EXIT_OK


def _trouble(exc: crmlib.CRMError) -> str:
    """What stopped a sync, in a word: the CRM down or busy, api_url pointing elsewhere, or an answer that
    is not Citadel's (a 2xx without the record, a proxy's page, a listing never complete)."""
    if isinstance(exc, crmlib.Transient):
        return "CRM unreachable"
    if isinstance(exc, crmlib.Redirected):
        return "api_url is not the CRM's API"
    return "the CRM's answer was unclear"


@contextmanager
def _progress() -> Iterator[Progress]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    with progress:
        yield progress


def _reasons(counter: Counter[str]) -> str:
    if not counter:
        return ""
    return " (" + ", ".join(f"{reason} {n}" for reason, n in counter.most_common()) + ")"


def _summary(store: Store, contacts: ContactsReport | None, sources: list[SourceReport],
             placeholders: PlaceholdersReport, push: PushReport | None, crm_down: str | None, refused: str | None,
             failed: bool, dry_run: bool, crm) -> None:
    verb, synced_verb = ("would create", "would sync") if dry_run else ("created", "synced")
    queued = "" if dry_run else f"; {'the rest' if push and push.failed else 'everything'} stays queued for the next run"
    if dry_run:
        out.print("[bold yellow]dry run:[/] nothing was written to the CRM or to crm-syncd's state")
    if contacts:
        line = (f"[bold]Contacts[/]  {verb} {len(contacts.created)} · existing {contacts.existing} · "
                f"promoted {len(contacts.promoted)} · updated {len(contacts.updated)} · merged {len(contacts.merged)}")
        out.print(line + (f" · [red]failed {len(contacts.failed)}[/]" if contacts.failed else ""))
        for name in contacts.created[:20] if dry_run else []:
            out.print(f"  + {logs.mask_text(name)}")
        for name, reason in contacts.failed[:5]:
            out.print(f"  [red]✗[/] {logs.mask_text(name)}: {reason}")
        for name, reason in contacts.left_out[:5]:
            out.print(f"  [yellow]![/] {logs.mask_text(name)}: {reason}")
        if contacts.missing:
            out.print("  [yellow]no AddressBook found; contacts skipped[/]")
        for kept, other in contacts.duplicates[:5]:
            out.print(f"  [yellow]possible duplicate:[/] CRM contact {other} looks like {kept} (left alone)")
        for store_name, problem in contacts.store_errors.items():
            out.print(f"  [yellow]skipped {store_name}: {problem}[/]")
    if placeholders.created or placeholders.refused or placeholders.unclear:
        out.print(f"[bold]Placeholders[/]  {verb} {len(placeholders.created)}"
                  + (f" · [red]refused {len(placeholders.refused)}[/]" if placeholders.refused else "")
                  + (f" · [yellow]unclear {len(placeholders.unclear)}[/]" if placeholders.unclear else ""))
        for name in placeholders.created[:20]:
            out.print(f"  ? {logs.mask_text(name)}")
        for name, reason in placeholders.refused[:5]:
            out.print(f"  [red]✗[/] {logs.mask_text(name)}: {reason} (its interactions are kept as failed)")
        for name, reason in placeholders.unclear[:5]:
            out.print(f"  [yellow]![/] {logs.mask_text(name)}: {reason} (looked for or made again by the next "
                      "sync; its interactions wait)")
    delivered = push.delivered_by_type if push else Counter()
    for report in sources:
        label = report.source.capitalize()
        if report.missing:
            out.print(f"[bold]{label}[/]  [yellow]database not found; skipped[/]")
            continue
        if report.error:
            out.print(f"[bold]{label}[/]  [red]✗ not read:[/] {report.error}")
            continue
        types = MESSAGE_TYPES if report.source == "messages" else CALL_TYPES
        synced = sum(delivered[t] for t in types)
        out.print(f"[bold]{label}[/]  {synced_verb} {synced} · new {report.added} · already known "
                  f"{report.duplicates} · skipped {sum(report.skipped.values())}{_reasons(report.skipped)}")
    counts = store.counts()
    held = store.held_by_reason()
    out.print(f"[bold]Outbox[/]  pending {counts.get('pending', 0) + counts.get('sending', 0)} · "
              f"held {counts.get('held', 0)}{_reasons(Counter(held))} · failed {counts.get('failed', 0)}")
    if push and push.failed:
        out.print(f"[red]✗ {len(push.failed)} interaction(s) failed[/] (kept; `crm-syncd retry-failed` resends):")
        for key, reason in push.failed[:5]:
            out.print(f"  {logs.mask_key(key)}: {reason}")
    if refused:
        out.print(f"[red]✗ the CRM refused crm-syncd's API key[/] ({refused}): "
                  f"set api_key in {where_set('api_key', api_key_places())}{queued}")
    elif push and push.throttled:
        waiting = counts.get("pending", 0) + counts.get("sending", 0)
        out.print(f"[red]✗ CRM busy:[/] the CRM asked to wait {push.throttled:.0f} s; "
                  f"{waiting} item{'' if waiting == 1 else 's'} stay{'s' if waiting == 1 else ''} queued "
                  "for the next sync or the daemon")
    elif crm_down or (push and push.unreachable):
        out.print(f"[red]✗ {crm_down or 'CRM unreachable:[/] ' + push.unreachable}{queued}")
    elif not failed:
        out.print("[green]✓ done[/]")


# -- retry-failed -------------------------------------------------------------------------


@main.command("retry-failed")
def retry_failed() -> None:
    """Send failed interactions again on the next sync or daemon pass, and the contact fields the CRM
    refused on the next contacts pass."""
    from crm_syncd.daemon import Lock

    def body() -> int:
        settings = _settings(folders=("state_dir",))
        with owner_errors():
            holder = Lock(settings.lock_path).held_by_other()
            store = Store(settings.state_db, migrate=holder is None)  # else the holder migrates its own
            if holder is not None and store.checked_version() < SCHEMA_VERSION:
                store.close()
                raise StoreError(f"an older crm-syncd ({holder[1]}, pid {holder[0]}) is still using "
                                 f"{settings.state_db}: run `crm-syncd install` to restart the daemon on this "
                                 "version (or let that sync end), then `crm-syncd retry-failed` again")
        count = store.retry_failed()
        fields = store.retry_left_out()
        store.close()
        out.print(f"{count} failed interaction(s) queued again")
        if fields:
            out.print(f"{fields} contact field(s) the CRM refused are sent again by the next contacts pass "
                      "(the next `sync`, or the running daemon's next rescan)")
        return EXIT_OK
    _run(body)


# -- run and status -----------------------------------------------------------------------


@main.command()
@verbose_option
def run(verbose: bool) -> None:
    """Run the daemon in the foreground (launchd starts it this way)."""
    from crm_syncd.daemon import AlreadyRunning, Daemon

    def body() -> int:
        settings = _settings(folders=("state_dir", "log_dir"))
        with owner_errors():
            logs.configure(verbose=verbose, log_file=settings.log_file)
        try:
            with owner_errors():
                return asyncio.run(Daemon(settings).run())
        except AlreadyRunning as exc:
            raise Abort(str(exc), EXIT_FAILED) from exc
    _run(body)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Is the daemon running and healthy? Exit 0 healthy, 1 degraded, 3 not running."""
    import json

    from crm_syncd.status import exit_code, gather

    def body() -> int:
        settings = _settings()
        with owner_errors():
            doc = gather(settings)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            _print_status(doc)
        return exit_code(doc)
    _run(body)


def _print_status(doc: dict) -> None:
    colour = {"healthy": "green", "degraded": "yellow"}.get(doc["health"], "red")
    head = f"[bold {colour}]{doc['health']}[/]"
    if doc["running"]:
        head += f" · pid {doc['pid']} · up {doc['uptime_s']}s"
    if doc["responding"] is False:
        head += f" · [red]not responding (last heartbeat {doc['last_beat_age_s']}s ago)[/]"
    if doc["sync_pid"]:
        head += f" · a one-shot sync is running (pid {doc['sync_pid']})"
    out.print(head)
    agent = doc["agent"]
    out.print(f"launchd agent: {'loaded' if agent.get('loaded') else 'installed' if agent.get('installed') else 'not installed'}")
    for name, src in doc["sources"].items():
        line = f"{name:9} last sync {src.get('last_sync_at') or 'never'}"
        if src.get("first_read_days") is not None and src.get("lag_rows"):
            line += f" · not read yet: {src['lag_rows']} rows (the first read takes the last {src['first_read_days']} days)"
        elif src.get("lag_rows"):
            line += f" · [yellow]{src['lag_rows']} rows behind ({src['lag_seconds']}s)[/]"
        if src.get("problem"):
            line += f" · [yellow]{src['problem']}[/]"
        out.print(line)
    box = doc["outbox"]
    out.print(f"outbox: pending {box['pending']} · held {box['held']}{_reasons(Counter(box['held_by_reason']))} · "
              f"delivered {box['delivered']} · "
              + (f"[red]failed {box['failed']}[/]" if box["failed"] else "failed 0"))
    for failure in box["failures"]:
        out.print(f"  {failure['key']}: {failure['reason']}")
    crm = doc["crm"]
    if crm["problem"]:  # the health check's words: what is wrong, then the fix
        crm_state = f"[red]{crm['problem']}[/]" + (f" · fix: {crm['fix']}" if crm["fix"] else "")
        if crm["daemon_failure"]:
            crm_state += f"\n  the daemon's requests fail: {crm['daemon_failure']}"
    elif crm["daemon_reachable"] is False:
        crm_state = f"[yellow]up, but the daemon's requests fail: {crm['daemon_failure'] or 'see the last error'}[/]"
    else:
        crm_state = "[green]reachable[/]"
    out.print(f"CRM {crm['url']}: {crm_state}")
    problems = doc["sources"]["contacts"]
    for failure in problems["failed"]:
        out.print(f"  [red]✗ contact not written:[/] {failure['name']}: {failure['reason']}")
    for note in problems["left_out"]:
        out.print(f"  [yellow]! contact[/] {note['name']}: {note['reason']}")
    for pair in doc["duplicates"][:5]:
        out.print(f"[yellow]possible duplicate:[/] CRM contact {pair['duplicate']} looks like {pair['kept']}")
    if (looking := doc["looking_up_before_sending"]) is not None:
        still = f"; still to be read to their end: {', '.join(looking)}" if looking else ""
        out.print("[yellow]after a restored state:[/] each item is looked for in the CRM before it is sent, "
                  f"until what the state lacked is delivered{still}")
    if doc["last_error"] and doc["health"] != "healthy":  # once healthy, whatever it was is overcome
        age = doc["last_error_age_s"]
        out.print(f"last error{'' if age is None else f' {age}s ago'}: {doc['last_error']}")


# -- install, uninstall, doctor -------------------------------------------------------------


@main.command()
@click.option("--dry-run", is_flag=True, help="Print the plist and the launchctl commands only.")
def install(dry_run: bool) -> None:
    """Install and load the LaunchAgent (idempotent)."""
    from crm_syncd import launchd

    def body() -> int:
        result = launchd.install(_settings(), dry_run=dry_run)
        _print_launchd(result)
        if any(name.upper() == launchd.SECRET_ENV and value for name, value in os.environ.items()):
            out.print(f"[yellow]{launchd.SECRET_ENV} is not passed on to the agent (its plist is readable by "
                      f"others): put api_key in {config_file_to_edit()} or in the Keychain.[/]")
        out.print(f"Grant Full Disk Access to: [bold]{result.fda_binary}[/]")
        out.print(f"[yellow]{result.fda_warning}[/]")
        return EXIT_OK
    _run(_launchd_errors, body)


@main.command()
@click.option("--dry-run", is_flag=True, help="Print the launchctl commands only.")
def uninstall(dry_run: bool) -> None:
    """Unload and remove the LaunchAgent (idempotent)."""
    from crm_syncd import launchd

    def body() -> int:
        _print_launchd(launchd.uninstall(_settings_or_defaults(), dry_run=dry_run))
        return EXIT_OK
    _run(_launchd_errors, body)


def _settings_or_defaults() -> Settings:
    """The settings, or the defaults (with a warning) when they are invalid: an agent that exits at
    every start on a broken config must still be removable."""
    try:
        return _settings()
    except Abort as exc:
        err.print(f"[yellow]warning:[/] {exc}; going on with the default settings")
        return Settings.model_construct()  # the defaults alone: no environment, no config file


def _launchd_errors(body) -> int:
    from crm_syncd import launchd, macos

    try:
        with owner_errors():  # a state or log folder install cannot make
            return body()
    except (launchd.LaunchdError, macos.LaunchctlNotFound) as exc:
        raise Abort(str(exc)) from exc


def _print_launchd(result) -> None:
    if result.dry_run and result.plist:
        click.echo(result.plist)
    for command in result.commands:
        out.print(("would run: " if result.dry_run else "ran: ") + " ".join(map(str, command)))
    if result.dry_run:
        out.print(f"would {result.action}: {result.plist_path}")
    else:
        out.print(f"{result.action}: {result.plist_path}" + ("" if result.changed else " (nothing to do)"))


@main.command()
def doctor() -> None:
    """Check every precondition and print the fix for each failure."""
    from crm_syncd.status import doctor as run_checks

    def body() -> int:
        checks = run_checks(_settings())
        for check in checks:
            mark = "[red]✗[/]" if not check.ok else "[yellow]![/]" if check.note else "[green]✓[/]"
            out.print(f"{mark} {check.name}: {check.detail}")
            if not check.ok and check.fix:
                out.print(f"    fix: {check.fix}")
        failed = [c for c in checks if not c.ok]
        return EXIT_FIX if any(c.owner_fix for c in failed) else EXIT_FAILED if failed else EXIT_OK
    _run(body)
