"""Read-only access to Apple's SQLite stores, and what their failures mean.

Every read opens the database with a percent-encoded `mode=ro` URI (so rows still in the
`-wal` are seen and nothing is ever written) and runs inside one short transaction, so that no
read transaction pins Apple's WAL between reads. A `SourceReader.session()` (one extraction)
keeps its connection and what it probed between reads; a lone read closes it again.
"""

from __future__ import annotations

import copy
import errno
import gc
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from crm_syncd import macos
from crm_syncd.settings import folder_closed
from crm_syncd.sources import BEFORE_WINDOW, Batch

BUSY_TIMEOUT_MS = 2_000
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)

T = TypeVar("T")
Trace = Callable[[str], None]


class SourceError(Exception):
    """A problem with one of Apple's databases."""


class SourceMissing(SourceError):
    """The database does not exist: the feature is unused or the Mac is not signed in."""


class SourceBusy(SourceError):
    """The database stayed locked by its writer through every retry."""


class Undecodable(SourceError):
    """A text value is not UTF-8 (a damaged row, a foreign writer): Python's sqlite3 fails the whole read
    on it, so `Database.run` reads again leniently."""


UNDECODABLE = "Could not decode to UTF-8"  # how Python's sqlite3 says so (with the column and the text)


class NoRoomBeside(SourceError):
    """SQLite may not make the -wal and -shm it needs beside the database, even to read it: `fix` says why."""

    def __init__(self, path: Path, fix: str) -> None:
        self.detail = (f"cannot read {path}: SQLite makes {path.name}-wal and {path.name}-shm beside a database "
                       "in WAL mode even to read it")
        self.fix = fix
        super().__init__(f"{self.detail}, and {fix}")


class NeedsFullDiskAccess(SourceError):
    """macOS refused the read: the running binary lacks Full Disk Access."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        app = macos.fda_terminal_app()
        grantee = (f"{app}, the app this command runs in (the background agent needs its own grant: "
                   "`crm-syncd install` names the binary), then run the command again" if app else
                   f"{macos.fda_binary()} (press ⌘⇧G to type the path), then restart crm-syncd")
        super().__init__(f"cannot read {path} ({detail}). Grant Full Disk Access: System Settings → "
                         f"Privacy & Security → Full Disk Access → + → add {grantee}.")


def signature(path: Path) -> str:
    """Size, mtime and inode of a database and its `-wal`: two stats, no SQLite.

    A missing file signs "-", and so does an empty `-wal`: reading a database its writer has
    closed creates one, and it holds nothing (a commit grows it; a checkpoint that empties it
    writes the database, whose own stat then changes).
    """
    parts = []
    for f in (path, path.with_name(path.name + "-wal")):
        try:
            st = stat(f)
        except NeedsFullDiskAccess:  # a change too: the read it sets off names the fix
            parts.append("denied")
            continue
        parts.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" if st and st.st_size else "-")
    return "|".join(parts)


def stat(path: Path) -> os.stat_result | None:
    """`path`'s stat, None when it does not exist. macOS refuses even a look at a protected folder's
    files to a binary without Full Disk Access: that raises NeedsFullDiskAccess, as a refused open does."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as exc:
        raise NeedsFullDiskAccess(path, exc.strerror or "permission denied") from exc


def readonly_uri(path: Path) -> str:
    """A `file:` URI that keeps `mode=ro` whatever the path holds (spaces, '#', '?')."""
    return Path(path).absolute().as_uri() + "?mode=ro"


def _is_busy(exc: sqlite3.Error) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def _is_denied(exc: BaseException, path: Path) -> bool:
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (errno.EPERM, errno.EACCES):
        return True
    message = str(exc).lower()
    if "authorization denied" in message or "not authorized" in message:
        return True
    # "unable to open database file" on a file that exists is how TCC refusals often look; TCC refuses
    # a plain open too, which a file SQLite cannot open only for want of its -shm (`_no_room`) allows
    if "unable to open database file" not in message:
        return False
    try:
        with open(path, "rb"):
            return _no_room(path) is None
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _no_room(path: Path) -> str | None:
    """Why SQLite may not make the database's -wal and -shm files beside it (a read-only volume, a folder
    the owner may not write), with the fix, or None if it may."""
    folder, copy = path.parent, "copy the database (and its -wal, if any) to a folder you can write in"
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{folder} is on a read-only volume; {copy}"
    except OSError:
        return None
    if (closed := folder_closed(folder)) is None:
        return None
    doing, theirs = closed  # an Apple app's folder, or one the database was copied to: no `sudo crm-syncd` made it
    if theirs:
        return f"{folder} is another user's and you may not {doing} it; {copy}"
    return f"you may not {doing} {folder}; make it writable for you (`chmod u+rwx '{folder}'`), or {copy}"


class Database:
    """One of Apple's databases; each `read()` is one consistent snapshot.

    Without `keep` every read opens and closes its own connection. With `keep` the reads share
    one (opening one parses the whole schema) until `close()`, and `remembered` values live as
    long; between reads no transaction stays open, so Apple can still checkpoint its -wal.
    `trace`, if given, receives every SQL statement run (a test seam).
    """

    def __init__(self, path: Path, *, trace: Trace | None = None, keep: bool = False) -> None:
        self.path = Path(path)
        self._trace = trace
        self._keep = keep
        self._conn: sqlite3.Connection | None = None
        self._memo: dict[str, Any] = {}

    @contextmanager
    def read(self, *, lenient: bool = False) -> Iterator[sqlite3.Connection]:
        """One snapshot. Raises SourceMissing, NeedsFullDiskAccess or SourceBusy with a clear message.

        Locked/busy errors raised inside the block are retried by `retrying`, not here. `lenient` reads
        text that is not UTF-8 with U+FFFD for each bad byte, where a plain read raises `Undecodable`.
        """
        if stat(self.path) is None:  # also when kept: a deleted file must not be read on
            self.close()
            raise SourceMissing(f"{self.path} does not exist")
        conn = self._conn or self._connect()
        if lenient:
            conn.text_factory = _lenient_text
        clean = False
        try:
            conn.execute("BEGIN")
            yield conn
            clean = True
        except (sqlite3.Error, OSError) as exc:
            raise _classify(exc, self.path) from exc
        finally:
            conn.text_factory = str
            self._release(conn, keep=clean and self._keep)

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` in one snapshot (`read`). One text value that is not UTF-8 would fail this read and
        every read after it, and so the whole source: the read is made again leniently, and the row with
        it is judged (and skipped if need be) like any other. Text that is UTF-8 costs nothing more."""
        try:
            with self.read() as conn:
                return fn(conn)
        except Undecodable:
            with self.read(lenient=True) as conn:
                return fn(conn)

    def remembered(self, name: str, load: Callable[[], T], *, fresh: bool = False) -> T:
        """`load()`, computed once while the connection is kept (every time otherwise); `fresh` reloads."""
        if not self._keep:
            return load()
        if fresh or name not in self._memo:
            self._memo[name] = load()
        return self._memo[name]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._memo.clear()
        if conn is not None:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(readonly_uri(self.path), uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise _classify(exc, self.path) from exc
        if self._trace is not None:
            conn.set_trace_callback(self._trace)
        return conn

    def _release(self, conn: sqlite3.Connection, *, keep: bool) -> None:
        """End the read's transaction; keep the connection only after a clean read."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except BaseException:
            keep = False
            raise
        finally:
            if keep:
                self._conn = conn
            else:
                self._conn = None
                self._memo.clear()
                conn.close()


@contextmanager
def read(path: Path, *, trace: Trace | None = None) -> Iterator[sqlite3.Connection]:
    """Open `path` read-only for one consistent read; close it afterwards (see `Database.read`)."""
    with Database(path, trace=trace).read() as conn:
        yield conn


def run(path: Path, fn: Callable[[sqlite3.Connection], T], *, trace: Trace | None = None) -> T:
    """`fn(conn)` in one read of `path`, read again leniently if it holds text that is not UTF-8
    (see `Database.run`)."""
    return Database(path, trace=trace).run(fn)


def _lenient_text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class SourceReader:
    """Reads one of Apple's stores past a ROWID high-water mark (messages, calls).

    Subclasses name the table, its ROWID column, its anchor (the row's own id: guid, ZUNIQUE_ID,
    which tells a rebuilt database reusing a ROWID from the one a mark was taken in) and the query
    of the highest ROWID ever handed out, and implement `_read`.
    """

    TABLE: ClassVar[str]
    ROWID: ClassVar[str]
    ANCHOR: ClassVar[str]
    SEQUENCE: ClassVar[tuple[str, str]]  # (table, SELECT of the highest ROWID it has handed out)

    def __init__(self, path: Path, *, trace: Trace | None = None, stop: threading.Event | None = None) -> None:
        self.path = Path(path)
        self._trace = trace  # test seam: receives every SQL statement run
        self._stop = stop  # set when the process stops: a locked database is no longer waited out
        self._db: Database | None = None  # set on a session's copy

    @contextmanager
    def session(self) -> Iterator[Self]:
        """This reader for several reads in a row (one extraction).

        They share one connection and one probe of columns and lookup maps; no transaction stays
        open between them. Each session is its own copy: concurrent ones do not interfere.
        """
        bound = copy.copy(self)
        bound._db = Database(self.path, trace=self._trace, keep=True)
        try:
            yield bound
        finally:
            bound._db.close()

    def read(self, after_rowid: int = 0, limit: int = 5000, since_ms: int | None = None,
             window_until: int | None = None) -> Batch:
        """Rows past `after_rowid` (at most `limit` examined), as Activities.

        `since_ms` (Unix ms) drops rows dated earlier; they count as `before-window`, and the
        batch still advances `last_rowid` over them. With `window_until` it drops only rows at or
        below that ROWID: those above it are read whatever their date.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return retrying(self._reading, self._batch, after_rowid, limit, since_ms, window_until, stop=self._stop)

    def newest_rowid(self) -> int:
        """The highest ROWID (0 for an empty database)."""
        return retrying(self._reading, self._newest, stop=self._stop)

    def row_count(self) -> int:
        """How many rows the database holds (ROWIDs skip those deleted: none is handed out twice)."""
        return retrying(self._reading, self._count, stop=self._stop)

    def high_water(self) -> int:
        """The highest ROWID the database has handed out, to a row that is there or one since deleted.

        Deleting the newest rows lowers `newest_rowid` but not this, so a mark above it means
        another database, not the owner's deletion.
        """
        return retrying(self._reading, self._high_water, stop=self._stop)

    def anchor(self, rowid: int) -> str | None:
        """The anchor of the row at `rowid`; None when no row is there or the store keeps none."""
        return retrying(self._reading, self._anchor, rowid, stop=self._stop)

    def own_addresses(self) -> set[str]:
        """The owner's own addresses as this database names them (none unless it keeps them)."""
        return set()

    def people(self) -> list[tuple[str, str | None, str | None]]:
        """(address, person, country) of the addresses this database takes for one person with others
        (none unless it keeps that)."""
        return []

    def _read(self, db: Database, conn: sqlite3.Connection, after_rowid: int, limit: int,
              since_ms: int | None, window_until: int | None) -> tuple[Batch, bool]:
        """The batch of the rows the main SELECT returned, and whether it returned `limit` of them."""
        raise NotImplementedError

    def _reading(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(db, conn, *args)` inside one snapshot."""
        db = self._db or Database(self.path, trace=self._trace)
        return db.run(lambda conn: fn(db, conn, *args))

    def _batch(self, db: Database, conn: sqlite3.Connection, after_rowid: int, limit: int,
               since_ms: int | None, window_until: int | None) -> Batch:
        with _gc_paused():
            batch, full = self._read(db, conn, after_rowid, limit, since_ms, window_until)
        if since_ms is not None:  # rows the window dropped were examined too
            examined, highest = conn.execute(
                f"SELECT COUNT(*), MAX({self.ROWID}) FROM {self.TABLE} WHERE {self.ROWID} > ? AND {self.ROWID} <= ?",
                (after_rowid, batch.last_rowid if full else 2**63 - 1)).fetchone()
            if examined > batch.rows:
                batch.skipped[BEFORE_WINDOW] += examined - batch.rows
            batch.rows, batch.last_rowid = examined, max(batch.last_rowid, highest or 0)
        if batch.last_rowid > after_rowid:
            batch.anchor = self._anchor(db, conn, batch.last_rowid)
        return batch

    def _newest(self, db: Database, conn: sqlite3.Connection) -> int:
        return conn.execute(f"SELECT MAX({self.ROWID}) FROM {self.TABLE}").fetchone()[0] or 0

    def _count(self, db: Database, conn: sqlite3.Connection) -> int:
        return conn.execute(f"SELECT COUNT(*) FROM {self.TABLE}").fetchone()[0]

    def _high_water(self, db: Database, conn: sqlite3.Connection) -> int:
        table, sql = self.SEQUENCE
        handed_out = conn.execute(sql).fetchone() if table in db.remembered("tables", lambda: tables(conn)) else None
        return max(self._newest(db, conn), (handed_out and handed_out[0]) or 0)

    def _anchor(self, db: Database, conn: sqlite3.Connection, rowid: int) -> str | None:
        if self.ANCHOR not in self._columns(db, conn):
            return None
        row = conn.execute(f"SELECT {self.ANCHOR} FROM {self.TABLE} WHERE {self.ROWID} = ?", (rowid,)).fetchone()
        return row[0] if row else None

    def _columns(self, db: Database, conn: sqlite3.Connection) -> frozenset[str]:
        """The columns of the main table (probed once per session)."""
        return db.remembered("columns", lambda: columns(conn, self.TABLE))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold off the cyclic GC while a reader builds a batch of small tuples (none of them form cycles).

    Extracting the 1M bench history, GC took 1.1-1.2 s with the pause and 1.8-1.9 s without.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _classify(exc: BaseException, path: Path) -> BaseException:
    if isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(UNDECODABLE):  # first: its words hold
        column = str(exc).split("'")[1] if str(exc).count("'") >= 2 else "?"  # the text ("busy"?); never said
        return Undecodable(f"{path}: column {column} holds text that is not UTF-8")
    if _is_denied(exc, path):
        return NeedsFullDiskAccess(path, str(exc) or type(exc).__name__)
    if (getattr(exc, "sqlite_errorname", None) or "").startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY")) and (
            room := _no_room(path)):
        return NoRoomBeside(path, room)
    if isinstance(exc, sqlite3.Error) and _is_busy(exc):
        return SourceBusy(f"{path} is locked: {exc}")
    if isinstance(exc, sqlite3.Error):
        return SourceError(f"{path}: {exc}")
    return exc


def retrying(fn, *args, delays: tuple[float, ...] = RETRY_DELAYS, stop: threading.Event | None = None, **kwargs):
    """Call `fn`, retrying with backoff while the database is busy or locked; once `stop` is set (the
    process is stopping), the busy error is raised at once rather than waited out."""
    pause = stop.wait if stop is not None else time.sleep
    for delay in delays:
        try:
            return fn(*args, **kwargs)
        except SourceBusy:
            if pause(delay):
                raise
    return fn(*args, **kwargs)


def columns(conn: sqlite3.Connection, table: str) -> frozenset[str]:
    """The column names `table` has on this machine (empty if the table is absent)."""
    return frozenset(row[1] for row in conn.execute(f'PRAGMA table_info("{table}")'))


def tables(conn: sqlite3.Connection) -> frozenset[str]:
    return frozenset(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
