"""File-system hints and debouncing.

The observer watches the *directories* of Apple's databases, never the files: SQLite and
Messages recreate `-wal` with a new inode, and a watch on the old file goes deaf for good.
A folder reached through a symbolic link is watched where it is. FSEvents on macOS, inotify on
Linux, through the same watchdog API. A write a watch reports is read; for hints without one (the
safety probe) a `Probe` (size, mtime, inode of the database and its `-wal`) decides whether
anything changed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from crm_syncd.logs import get_logger
from crm_syncd.settings import existing_ancestor
from crm_syncd.sources import sqlite

log = get_logger("crm_syncd.watch")


class Probe:
    """Cheap change detection for one database: a couple of stats, no SQLite."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: str | None = None

    def changed(self) -> bool:
        """True when the database or its -wal differ from the last call (and on the first)."""
        current = sqlite.signature(self.path)
        if current == self._seen:
            return False
        self._seen = current
        return True

    def forget(self) -> None:
        """Make the next `changed()` true: what the last one saw was never read."""
        self._seen = None

    @property
    def forgotten(self) -> bool:
        """Whether the next `changed()` is true whatever the files say (forgotten, or never looked)."""
        return self._seen is None


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set or `timeout` passes; True if it was set.

    Unlike `asyncio.wait_for` on Python 3.11, this never swallows a cancellation of the caller
    that races with the event (a daemon that ignores SIGTERM now and then).
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


class Debouncer:
    """Coalesces hints into runs of `action`.

    A run starts after `quiet` seconds without hints, but never later than `max_wait` after the
    first hint of a burst. Runs never overlap; hints during a run schedule exactly one more.
    """

    def __init__(self, action: Callable[[], Awaitable[None]], quiet: float, max_wait: float) -> None:
        self.action = action
        self.quiet = quiet
        self.max_wait = max(max_wait, quiet)
        self._hinted = asyncio.Event()
        self._first: float | None = None
        self._last = 0.0

    def poke(self) -> None:
        """Register a hint (call from the event loop's thread)."""
        now = asyncio.get_running_loop().time()
        if self._first is None:
            self._first = now
        self._last = now
        self._hinted.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._hinted.wait()
            while (delay := min(self._last + self.quiet, self._first + self.max_wait) - loop.time()) > 0:
                self._hinted.clear()
                await wait_event(self._hinted, delay)
            self._first = None
            self._hinted.clear()
            await self.action()


WRITES = frozenset({"created", "modified", "moved", "deleted"})  # a file's content changed: read it
# Other events are hints a Probe weighs: `closed` (SQLite opens a -wal read-write even to read from it,
# so crm-syncd's own reads close one), `attrib` (a chmod giving access back; SQLite's fchown under root).
NOT_WRITES = frozenset({"opened", "closed_no_write"})  # a file opened or read: no database changed


class _Handler(FileSystemEventHandler):
    def __init__(self, directory: Path, names: dict[str, str], notify: Callable[[str, bool], None],
                 lost: Callable[[Path], None]) -> None:
        self.directory = directory
        self.real = directory.resolve()  # what is watched, and what its events name (a linked folder too)
        self.names = names  # file name -> source
        self.notify = notify
        self.lost = lost

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in NOT_WRITES:  # crm-syncd's own reads among them
            return
        if event.event_type in ("deleted", "moved") and Path(os.fsdecode(event.src_path)) == self.real:
            self.lost(self.directory)  # the watch ends with its folder (inotify and FSEvents alike)
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            source = self.names.get(os.path.basename(os.fsdecode(path))) if path else None
            if source:
                self.notify(source, event.event_type in WRITES)


class _Lookout(FileSystemEventHandler):
    def __init__(self, notify: Callable[[], None]) -> None:
        self.notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in NOT_WRITES:
            self.notify()


class Watcher:
    """Calls `on_hint(source, written)` on the event loop when a watched database or its -wal is written
    (`written`), or may have changed.

    A directory not there yet (no call history on this Mac so far) is looked out for from its
    nearest existing ancestor, non-recursively, and from its target's when it is a symbolic link
    (~/Library/Messages moved to a volume not mounted yet); once it appears it is watched and its sources hinted.
    A watched directory that is deleted or replaced (a watch follows the folder, not its path) is
    looked out for again: at once when its watch reports it, else at the next `refresh`.
    """

    def __init__(self, databases: dict[str, Path], on_hint: Callable[[str, bool], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.observer = Observer()
        self.on_hint = on_hint
        self._notify = lambda source, written: loop.call_soon_threadsafe(on_hint, source, written)
        self._refresh_soon = lambda: loop.call_soon_threadsafe(self.refresh)
        self._lost_soon = lambda directory: loop.call_soon_threadsafe(self.refresh, directory)
        self._missing: dict[Path, dict[str, str]] = {}  # directory not there yet -> its names
        self._names: dict[Path, dict[str, str]] = {}  # watched database directory -> its names
        self._lookouts: set[Path] = set()  # existing ancestors watched for them
        self._watches: dict[Path, tuple[ObservedWatch, tuple[int, int] | None]] = {}  # every watch: it, (device, inode)
        by_dir: dict[Path, dict[str, str]] = {}
        for source, db in databases.items():
            names = by_dir.setdefault(Path(db).parent, {})
            names[db.name] = names[db.name + "-wal"] = source
        for directory, names in by_dir.items():
            if not (directory.is_dir() and self._watch(directory, names)):
                self._missing[directory] = names

    def start(self) -> None:
        self.observer.start()
        self.refresh()

    @property
    def watched(self) -> list[Path]:
        """The database directories watched now."""
        return list(self._names)

    def stop(self) -> None:
        if self.observer.is_alive():  # not when stopped before it started
            self.observer.stop()
            self.observer.join(timeout=5)

    def refresh(self, *lost: Path) -> None:
        """Drop the watches whose directory is `lost` (its watch said so), gone or replaced, move the
        lookouts down to what exists now, then watch the missing directories that appeared and hint
        their sources (their files may predate the watch). On the loop's thread; the daemon's safety
        probe calls it too."""
        for directory in [d for d, (watch, identity) in self._watches.items()
                          if d in lost or _identity(d) != identity or not self._alive(watch)]:
            self._lose(directory)
        self._look_out()  # first: what appears from here on is heard of
        failed: set[Path] = set()  # could not be watched: stay missing, tried again at the next refresh
        while appeared := [d for d in self._missing if d not in failed and d.is_dir()]:
            for directory in appeared:
                if not self._watch(directory, self._missing[directory]):
                    failed.add(directory)
                    continue
                names = self._missing.pop(directory)
                log.info("watch.appeared", directory=str(directory))
                for source in set(names.values()):
                    self.on_hint(source, False)
            self._look_out()

    def renew(self, database: Path) -> None:
        """Watch a database's folder anew: the safety probe found a write no event reported. A volume
        unmounted and mounted again leaves a watch that hears nothing and still looks alive."""
        directory = database.parent
        if directory not in self._names or not directory.is_dir():  # not watched, or gone: `refresh`'s to see
            return
        log.info("watch.renewed", directory=str(directory), reason="a write no event reported")
        watch, _ = self._watches.pop(directory)
        self.observer.unschedule(watch)
        self._lookouts.discard(directory)  # a lookout on the same folder went with it: made anew below
        if not self._watch(directory, self._names[directory]):
            self._missing[directory] = self._names.pop(directory)  # looked out for, as a folder not there yet
        self._look_out()

    def _watch(self, directory: Path, names: dict[str, str]) -> bool:
        if not self._schedule(_Handler(directory, names, self._notify, self._lost_soon), directory):
            return False
        self._names[directory] = names
        return True

    def _schedule(self, handler: FileSystemEventHandler, directory: Path) -> bool:
        """Watch `directory`; False, said in the log, when it cannot be watched now (deleted again since
        it was seen, unreadable, past inotify's limit on watches): the caller's next `refresh` tries again."""
        identity = _identity(directory)
        try:
            # the folder itself, not a symbolic link to it (~/Library/Messages moved to another volume and
            # linked back): inotify would watch the link, and hear of nothing written in the folder
            watch = self.observer.schedule(handler, str(directory.resolve()), recursive=False)
        except OSError as exc:
            log.warning("watch.failed", directory=str(directory), error=str(exc))
            return False
        self._watches[directory] = (watch, identity)
        return True

    def _alive(self, watch: ObservedWatch) -> bool:
        """Whether the watch still reports (an inotify watch stops when its folder is deleted)."""
        if not self.observer.is_alive():  # before `start` no watch runs yet
            return True
        return any(e.watch == watch and e.is_alive() for e in self.observer.emitters)

    def _lose(self, directory: Path) -> None:
        """Stop watching a directory that is gone or replaced; a database directory is looked out for again.

        Unscheduling removes every handler on that path, a lookout's too: both are scheduled anew.
        """
        watch, _ = self._watches.pop(directory)
        self.observer.unschedule(watch)
        self._lookouts.discard(directory)
        if (names := self._names.pop(directory, None)) is not None:
            self._missing[directory] = names
            log.warning("watch.lost", directory=str(directory))

    def _look_out(self) -> None:
        """Watch the nearest existing ancestor of each missing directory for its next step down.

        Any event there counts: FSEvents reports a directory created in a non-recursive watch only
        as a change of the watched directory itself (inotify names the new one). A lookout stays
        (a few cheap no-op refreshes): unscheduling it could end a database watch on the same directory.
        """
        for ancestor in {place for d in self._missing for place in _lookouts_for(d)} - self._lookouts:
            if self._schedule(_Lookout(self._refresh_soon), ancestor):
                self._lookouts.add(ancestor)


def _lookouts_for(directory: Path) -> set[Path]:
    """Where a missing directory's next step down shows: its nearest existing ancestor, and its
    target's when it is a symbolic link (a volume mounted under /Volumes shows there, not next to the link)."""
    places = {existing_ancestor(directory.parent)}
    if directory.is_symlink():
        places.add(existing_ancestor(directory.resolve().parent))
    return places


def _identity(directory: Path) -> tuple[int, int] | None:
    try:
        st = directory.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino
