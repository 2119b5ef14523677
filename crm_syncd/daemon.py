"""`crm-syncd run`: the long-running daemon.

Start-up: take the lock, sync contacts, catch up messages and calls from their marks, then
watch. Afterwards everything is event-driven: file hints → debounced extraction → outbox →
pusher. Timers only cover what events cannot: a safety-net probe (dropped FSEvents, a watched
folder replaced, wake from sleep), the AddressBook rescan, and the heartbeat `status` reads.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from crm_syncd import __version__, crm as crmlib
from crm_syncd.engine import CONTACTS_PROBLEMS, SOURCES, Engine
from crm_syncd.logs import get_logger
from crm_syncd.settings import DISK_ERRNOS, Settings, file_refusal, folder_refusal, secure_dir
from crm_syncd.sources.sqlite import NeedsFullDiskAccess, SourceError
from crm_syncd.store import Store, StoreError, now_ms
from crm_syncd.watch import Debouncer, Probe, Watcher, wait_event

log = get_logger("crm_syncd.daemon")

HEARTBEAT_S = 5.0
SWEEP_MS = 86_400_000  # once a day, re-read a recent window: catches rows a rebuild renumbered below the mark
LAST_SWEEP = "last_sweep_ms"  # kv: when it last ran, by the wall clock (a Mac asleep or restarted keeps the day)
SWEEP_DAYS = 7
SWEEP_RETRY_MS = 3_600_000  # a sweep a source failed is made again an hour on
SLEEP_JUMP_S = 5.0  # wall clock ahead of the monotonic clock by this much: the Mac slept
TICK_S = 5.0  # how often the timers look at the clocks (each look costs a wake-up)
PING_TIMEOUT_S = 10.0  # a heartbeat_url request, whole
RETRY_S, RETRY_MAX_S = 2.0, 60.0  # a failed extraction is made again after 2, 4, 8 ... 60 s


class AlreadyRunning(Exception):
    """Another process holds the lock; `holder` is its command (`run`, the daemon, or `sync`)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class Lock:
    """An exclusive advisory lock on a file, held for the life of the process; the file names the
    holder (its pid and command: `run`, the daemon, or `sync`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, command: str = "run") -> None:
        secure_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # no room even for a new file
            raise self._unwritable(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, held_by = _holder(os.read(fd, 64))
            os.close(fd)
            raise AlreadyRunning(f"crm-syncd {held_by} is already running (pid {pid}); "
                                 "see `crm-syncd status`", held_by) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {command}".encode())
        except OSError as exc:  # a full disk (or over a size limit): say so, as the state database would
            os.close(fd)
            raise self._unwritable(exc) from exc
        self._fd = fd

    def _unwritable(self, exc: OSError) -> StoreError:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return self._not_yours(exc, "write")
        message = f"cannot write the lock file {self.path}: {exc.strerror}"
        if exc.errno in DISK_ERRNOS:
            message += (f"; free space on the disk holding {self.path.parent}. Nothing is lost: crm-syncd goes on "
                        "from where it stopped")
        return StoreError(message)

    def _not_yours(self, exc: OSError, doing: str) -> StoreError:
        """The lock file, or its folder, is another user's (a `sudo crm-syncd` made it): which, and the fix, in
        `doctor`'s words. The fix gives the file back rather than removing it: a root daemon still holding the
        lock keeps it, where a new file would let a second daemon start beside it."""
        folder = self.path.parent
        if not os.access(folder, os.X_OK) and (refusal := folder_refusal(folder)):
            return StoreError(f"cannot use the state folder {folder}: {refusal}")
        why = file_refusal(self.path) or (exc.strerror or str(exc),)
        return StoreError(f"cannot {doing} the lock file {self.path}: {'; '.join(why)}")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def held_by_other(self) -> tuple[str, str] | None:
        """(pid, command) of another process holding the lock, or None (used by `status`)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:  # another user's (a `sudo crm-syncd sync` made it), or a folder it may not enter
            raise self._not_yours(exc, "read") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(os.read(fd, 64))
        finally:
            os.close(fd)
        return None


class StateLost(Exception):
    """A file the daemon holds (its state database, its lock) was removed or replaced under it."""


def _file_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _lost(held: dict[Path, tuple[int, int]]) -> str | None:
    """What happened to the first of the `held` files that is no longer the one opened, if any
    (two stats: cheap enough for every heartbeat)."""
    for path, key in held.items():
        try:
            now = _file_key(path)
        except (FileNotFoundError, NotADirectoryError):
            return f"{path} was removed"
        if now != key:
            return f"{path} was replaced by another file"
    return None


def _holder(content: bytes) -> tuple[str, str]:
    """(pid, command) as a lock file names them; a file from before commands were named held `run`'s pid."""
    pid, _, command = content.decode(errors="replace").strip().partition(" ")
    return pid or "?", command or "run"


@dataclass
class SourceState:
    last_sync_ms: int | None = None
    failures: int = 0  # extractions failed in a row
    error: str | None = None  # why the last one failed (`status` shows it)


def troubled(*, failed: int, refused: list, problems: Iterable[str | None], takes_requests: bool | None) -> bool:
    """What makes crm-syncd degraded, in `status` and for the heartbeat ping alike: an item failed, the
    CRM refused a person's contact, a source cannot be read, or the CRM refuses the daemon's requests."""
    return bool(failed or refused or any(problems) or takes_requests is False)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.work = asyncio.Event()  # the outbox may have something deliverable
        self.sources = {s: SourceState() for s in SOURCES}
        self._extracting = {s: asyncio.Lock() for s in SOURCES}  # the daily sweep and a live extraction take turns
        self.last_error: str | None = None
        self.last_error_ms: int | None = None  # when it happened: `status` shows its age
        self.crm_reachable: bool | None = None
        self.contacts_synced = False
        self.started_ms = now_ms()
        self._started = time.monotonic()  # uptime: a clock set back or ahead meanwhile does not change it
        self._probes: dict[str, Probe] = {}
        self._debouncers: dict[str, Debouncer] = {}
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._held: dict[Path, tuple[int, int]] = {}  # the state database and the lock, as opened
        self._owner_error: StoreError | None = None  # why a task died, when the owner must fix it

    async def run(self) -> int:
        lock = Lock(self.settings.lock_path)
        lock.acquire()
        store = Store(self.settings.state_db)
        self._held = {path: _file_key(path) for path in (self.settings.state_db, self.settings.lock_path)}
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        try:
            async with crmlib.CitadelClient(self.settings.api_url, self.settings.api_key_value,
                                            timeout=self.settings.request_timeout_s,
                                            max_connections=self.settings.push_concurrency) as crm:
                self.engine = Engine(self.settings, store, crm)
                self.store = store
                self.engine.check_continuity()
                code = await self._serve(loop)
            if self._owner_error is not None:  # `run` ends with its one line and exit 2
                raise self._owner_error
            return code
        finally:
            try:
                self.beat(running=False)
            except (StoreError, sqlite3.Error) as exc:  # what stopped us (a full disk) was said once already
                log.debug("daemon.last_beat_lost", error=str(exc))
            store.close()
            lock.release()

    def _request_stop(self, sig: int) -> None:
        log.info("daemon.stopping", signal=signal.Signals(sig).name)
        self.stop.set()
        self.work.set()
        if engine := getattr(self, "engine", None):  # an extraction's thread ends at its next batch or retry
            engine.stopping.set()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> int:
        log.info("daemon.started", pid=os.getpid(), version=__version__)
        self.beat()
        self._debouncers = debouncers = {
            s: Debouncer(lambda s=s: self._extract(s), self.settings.debounce_ms / 1000,
                         self.settings.max_wait_ms / 1000) for s in SOURCES}
        self._probes = probes = {s: Probe(self.engine.readers[s].path) for s in SOURCES}

        def hint(source: str, written: bool = False) -> None:
            """Read `source` if it changed, by a stat, or if a watch reported a write to it, whatever a
            stat says (HFS+ keeps mtimes to the second, and a WAL reused from its start keeps its size)."""
            if probes[source].changed() or written:  # always probed: the safety probe looks for what no event reported
                debouncers[source].poke()

        watcher = Watcher({s: self.engine.readers[s].path for s in SOURCES}, hint, loop)

        def look_again() -> None:
            """The safety net: watches a lost folder took with it are made anew, every source is probed,
            and a watch that missed a write is made anew too."""
            watcher.refresh()
            for source in SOURCES:
                unheard = not probes[source].forgotten
                if probes[source].changed():
                    if unheard:
                        watcher.renew(self.engine.readers[source].path)
                    debouncers[source].poke()

        started = asyncio.Event()

        async def start_up() -> None:
            """Contacts first (they name the owner's own addresses), then each source from its mark, then watch."""
            await self._contacts(force=True)
            for source in SOURCES:
                probes[source].changed()  # the catch-up below covers the current state
                await self._extract(source)
            watcher.start()
            log.info("daemon.watching", directories=[str(d) for d in watcher.watched])
            for source in SOURCES:  # written during the catch-up, before the watch began: no event came
                hint(source)
            started.set()
            await self.stop.wait()  # like the other tasks, it ends with the stop

        async def after_start_up(work: Callable[[], Awaitable[None]]) -> None:
            await started.wait()
            await work()

        # the start-up is a task like the others: a stop during it is not kept waiting, and beats go on
        pusher = asyncio.create_task(after_start_up(self._pusher), name="pusher")
        tasks = [asyncio.create_task(start_up(), name="start-up"), pusher,
                 asyncio.create_task(self._heartbeats(), name="heartbeats"),
                 asyncio.create_task(after_start_up(lambda: self._timers(look_again)), name="timers")]
        tasks += [asyncio.create_task(after_start_up(d.run), name=f"extract {s}") for s, d in debouncers.items()]
        code = 0
        stopping = asyncio.create_task(self.stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            # a task may end with the stop (the pusher does), never on its own or on an error
            if died := [t for t in tasks if t in done and (t.exception() or not self.stop.is_set())]:
                code = self._died(died[0])
        finally:
            stopping.cancel()
            watcher.stop()
            others = [t for t in tasks if t is not pusher]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            started.set()  # a pusher still waiting for the start-up ends at once: the stop is set
            # the pusher finishes or abandons in-flight requests within the deadline
            done, _ = await asyncio.wait({pusher}, timeout=self.settings.shutdown_deadline_s + 1)
            if not done:
                pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)  # an error met while stopping is the stop's
        log.info("daemon.stopped", code=code)
        return code

    def _died(self, task: asyncio.Task) -> int:
        """A task ended on its own: stop with exit 1 rather than live on without it (launchd restarts us)."""
        exc = task.exception()
        if isinstance(exc, StateLost):
            self._remember(str(exc))
            log.error("daemon.state_lost", error=str(exc))
        elif isinstance(exc, StoreError):  # the owner's to fix (a full disk): their words, no traceback
            self._owner_error = exc
            log.error("daemon.failed", task=task.get_name(), error=str(exc))
        else:
            self._remember(f"{task.get_name()} stopped: {exc!r}")
            log.error("daemon.failed", task=task.get_name(), error=repr(exc), exc_info=exc)
        self.stop.set()
        self.work.set()
        return 1

    # -- work -----------------------------------------------------------------------------

    async def _extract(self, source: str, sweep: bool = False) -> bool:
        """Extract one source (the daily sweep: its last SWEEP_DAYS, behind the mark too); False if it
        could not be read (said, and made again after a back-off)."""
        try:
            async with self._extracting[source]:
                # a source with no mark yet (no call history at the start, a first read that failed) has nothing
                # behind one to sweep: its first read is a first sync's, over the lookback window
                swept = sweep and self.store.mark(source) is not None
                window = {"full": True, "days": SWEEP_DAYS} if swept else {}
                started = time.monotonic()
                report = await asyncio.to_thread(self.engine.extract, source, **window)
        except NeedsFullDiskAccess as exc:
            self._failed(source, str(exc), event="extract.denied")
            return False
        except SourceError as exc:
            self._failed(source, str(exc), event="extract.failed")
            return False
        state = self.sources[source]
        state.last_sync_ms = now_ms()
        state.failures, state.error = 0, None
        if report.held:  # the row it waits for may settle with no write (unsent 15 min on): the next probe reads
            self._probes[source].forget()
        if report.rows:
            log.info("extract.done", source=source, rows=report.rows, added=report.added,
                     duration_ms=round((time.monotonic() - started) * 1000, 1))
        if report.added:
            self.work.set()
        return True

    def _failed(self, source: str, message: str, *, event: str) -> None:
        """An extraction failed: make it again after a back-off, and at the next probe or wake-up.

        Nothing else would: its file event is spent, and the probe already saw the file as it is.
        """
        self._error(message, event=event, source=source)
        state = self.sources[source]
        state.failures += 1
        state.error = message
        self._probes[source].forget()
        if pending := self._retries.get(source):
            pending.cancel()
        delay = min(RETRY_S * 2 ** min(state.failures - 1, 5), RETRY_MAX_S)
        self._retries[source] = asyncio.get_running_loop().call_later(delay, self._debouncers[source].poke)

    async def _contacts(self, force: bool = False) -> None:
        if self.engine.backoff_left():
            return  # no sync knocks on a CRM we are backing off from
        try:
            if not (force or self.engine.contacts_changed()):
                return
            report = await self.engine.sync_contacts()
        except crmlib.CRMError as exc:
            self._error(f"contacts not synced: {exc.message}", event="contacts.deferred")
            self.crm_reachable = False
            self.engine.back_off(exc.retry_after)
            return
        except NeedsFullDiskAccess as exc:
            self._error(str(exc), event="contacts.denied")
            self.sources.setdefault("contacts", SourceState()).error = str(exc)  # `status` names it
            return
        finally:
            self.work.set()  # the pusher skips resolution while a sync runs: wake it either way
        self.crm_reachable = self.contacts_synced = True
        log.info("contacts.rescan", created=len(report.created), promoted=len(report.promoted),
                 updated=len(report.updated))
        state = self.sources.setdefault("contacts", SourceState())
        state.last_sync_ms, state.error = now_ms(), None

    async def _pusher(self) -> None:
        """Drain the outbox whenever there is work; retry forever through CRM outages."""
        while not self.stop.is_set():
            self.work.clear()
            try:
                if not self.contacts_synced:
                    await self._contacts(force=True)
                if not self.contacts_synced:  # resolving now would make placeholders for people with cards
                    await self._sleep(self.engine.backoff_left() or min(30.0, self.settings.safety_probe_s))
                    continue
                if not self.engine.contacts_busy:  # a rescan's sync is running: it sets `work` when done
                    await self.engine.resolve()
                report = await self.engine.push(stop=self.stop)
                if report.delivered:
                    self.crm_reachable = True
                    log.info("push.done", delivered=report.delivered, adopted=report.adopted, twins=report.twins)
                if report.unreachable:
                    self.crm_reachable = False
                    self._error(f"CRM unreachable: {report.unreachable}", event="push.deferred")
                    await self._sleep(self.engine.backoff_left() or 1.0)
                    continue
            except crmlib.CRMError as exc:
                self.crm_reachable = False
                self._error(f"CRM: {exc.message}", event="push.deferred")
                self.engine.back_off(exc.retry_after)
                await self._sleep(self.engine.backoff_left())
                continue
            # writes a previous process left unsure are looked up once they can no longer be on their way
            await self._wait_work(self.engine.recover_in() or self.settings.safety_probe_s)

    async def _timers(self, look_again: Callable[[], None]) -> None:
        """Safety-net probes, wake-from-sleep detection and the AddressBook rescan."""
        next_probe = next_rescan = time.monotonic()
        next_sweep_ms = self._last_sweep_ms() + SWEEP_MS
        offset = time.time() - time.monotonic()
        while not self.stop.is_set():
            await self._sleep(min(TICK_S, self.settings.contacts_rescan_s, self.settings.safety_probe_s))
            now = time.monotonic()
            woke = (time.time() - now) - offset > SLEEP_JUMP_S
            offset = time.time() - now
            if woke:
                log.info("daemon.woke")
            if woke or now >= next_probe + self.settings.safety_probe_s:
                next_probe = now
                look_again()
            if woke or now >= next_rescan + self.settings.contacts_rescan_s:
                next_rescan = now
                await self._contacts()
            if now_ms() < next_sweep_ms - SWEEP_MS:  # the clock was set back past the last sweep: a day from now
                next_sweep_ms = self._last_sweep_ms() + SWEEP_MS
            if now_ms() >= next_sweep_ms:
                if all([await self._extract(source, sweep=True) for source in SOURCES]):
                    self.store.put(LAST_SWEEP, now_ms())
                    next_sweep_ms = now_ms() + SWEEP_MS
                    log.info("daemon.swept", days=SWEEP_DAYS)
                else:  # its day is not counted: made again within the hour, or at the next start
                    next_sweep_ms = now_ms() + SWEEP_RETRY_MS
                    log.warning("daemon.sweep_failed", retry_in_s=SWEEP_RETRY_MS // 1000)

    def _last_sweep_ms(self) -> int:
        """When the daily sweep last ran; now if never (the first catch-up reads more) or if that lies ahead
        (the clock was set back)."""
        last, now = self.store.get(LAST_SWEEP), now_ms()
        if not isinstance(last, int) or last > now:
            last = now
            self.store.put(LAST_SWEEP, now)
        return last

    async def _heartbeats(self) -> None:
        """The beat `status` reads, every HEARTBEAT_S; and, while all is well, a GET of heartbeat_url
        on its own task (one at a time): an endpoint slow to answer never delays a beat. Each beat
        first checks that the state database and the lock are still the files opened (`StateLost`)."""
        last_ping, ping = 0.0, None
        async with httpx.AsyncClient(timeout=PING_TIMEOUT_S) as client:
            try:
                while not self.stop.is_set():
                    if lost := _lost(self._held):  # writes would go to a file no one sees, the lock guard nothing
                        raise StateLost(f"{lost} while the daemon ran; stopping (the next start rebuilds "
                                        "its state from the CRM)")
                    self.beat()
                    url = self.settings.heartbeat_url
                    due = url and time.monotonic() - last_ping >= self.settings.heartbeat_interval_s
                    if due and (ping is None or ping.done()) and self._all_well():
                        last_ping = time.monotonic()
                        ping = asyncio.create_task(_ping(client, url), name="heartbeat ping")
                    await self._sleep(HEARTBEAT_S)
            finally:
                if ping is not None:
                    ping.cancel()
                    await asyncio.gather(ping, return_exceptions=True)

    # -- helpers --------------------------------------------------------------------------

    def beat(self, running: bool = True) -> None:
        """Record the heartbeat `status` reads (every few seconds, idle or not: keep it cheap)."""
        store = getattr(self, "store", None)
        if store is None:
            return
        crm_reachable, crm_failure = self._crm_view()
        store.put("daemon", {
            "running": running, "pid": os.getpid(), "started_ms": self.started_ms, "beat_ms": now_ms(),
            "uptime_ms": round((time.monotonic() - self._started) * 1000),
            "version": __version__, "crm_reachable": crm_reachable, "crm_failure": crm_failure,
            "last_error": self.last_error, "last_error_ms": self.last_error_ms,
            "sources": {s: {"last_sync_ms": st.last_sync_ms, "error": st.error} for s, st in self.sources.items()},
        })

    def _all_well(self) -> bool:
        """Healthy, as far as the daemon can tell without reading Apple's databases (a lag growing
        with no error is for `status` to see): then, and only then, is heartbeat_url pinged."""
        return self._crm_view()[0] is True and not troubled(  # True: not merely unknown, as at start-up
            failed=self.store.failed_count(), refused=(self.store.get(CONTACTS_PROBLEMS) or {}).get("failed", []),
            problems=[state.error for state in self.sources.values()], takes_requests=True)

    def _crm_view(self) -> tuple[bool | None, str | None]:
        """Does the CRM take our requests, and if not why. A push retries inside its pass through an
        outage, so the engine's latest delivery failure is news before the pass returns."""
        failure = self.engine.crm_failure  # set before `store`, so before any beat
        return (False if failure else self.crm_reachable), failure

    def _error(self, message: str, *, event: str, **fields) -> None:
        self._remember(message)
        log.warning(event, error=message, **fields)

    def _remember(self, message: str) -> None:
        self.last_error, self.last_error_ms = message, now_ms()

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self.stop, seconds)

    async def _wait_work(self, seconds: float) -> None:
        await wait_event(self.work, seconds)


async def _ping(client: httpx.AsyncClient, url: str) -> None:
    """One GET of the heartbeat URL, bounded as a whole (httpx's timeout bounds each read, and a server
    that trickles its answer a byte at a time would never end it)."""
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            await client.get(url)
    except Exception as exc:  # any failure is only this ping's: said, and tried again at the next interval
        log.warning("heartbeat.failed", error=type(exc).__name__)
