"""Read-only access to Apple's SQLite stores, and what their failures mean.

Every read opens the database with a percent-encoded `mode=ro` URI (so rows still in the
`-wal` are seen and nothing is ever written), runs inside one short transaction, and closes
again so that no read transaction pins Apple's WAL between reads.
"""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from crm_syncd import macos

BUSY_TIMEOUT_MS = 2_000
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


class SourceError(Exception):
    """A problem with one of Apple's databases."""


class SourceMissing(SourceError):
    """The database does not exist: the feature is unused or the Mac is not signed in."""


class SourceBusy(SourceError):
    """The database stayed locked by its writer through every retry."""


class NeedsFullDiskAccess(SourceError):
    """macOS refused the read: the running binary lacks Full Disk Access."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"cannot read {path} ({detail}). Grant Full Disk Access: System Settings → "
            f"Privacy & Security → Full Disk Access → + → add {macos.fda_binary()} "
            "(press ⌘⇧G to type the path), then restart crm-syncd."
        )


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
    # "unable to open database file" on a file that exists is how TCC refusals often look.
    return "unable to open database file" in message and path.exists()


@contextmanager
def read(path: Path, *, trace: Callable[[str], None] | None = None) -> Iterator[sqlite3.Connection]:
    """Open `path` read-only for one consistent read; close it afterwards.

    Raises SourceMissing, NeedsFullDiskAccess or SourceBusy with a clear message.
    Locked/busy errors raised inside the block are retried by `retrying`, not here.
    `trace`, if given, receives every SQL statement run on the connection (a test seam).
    """
    path = Path(path)
    if not path.exists():
        raise SourceMissing(f"{path} does not exist")
    try:
        conn = sqlite3.connect(readonly_uri(path), uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)
    except (sqlite3.Error, OSError) as exc:
        raise _classify(exc, path) from exc
    if trace is not None:
        conn.set_trace_callback(trace)
    try:
        conn.execute("BEGIN")  # one snapshot for the whole read
        yield conn
    except (sqlite3.Error, OSError) as exc:
        raise _classify(exc, path) from exc
    finally:
        try:
            conn.execute("ROLLBACK") if conn.in_transaction else None
        finally:
            conn.close()


def _classify(exc: BaseException, path: Path) -> BaseException:
    if _is_denied(exc, path):
        return NeedsFullDiskAccess(path, str(exc) or type(exc).__name__)
    if isinstance(exc, sqlite3.Error) and _is_busy(exc):
        return SourceBusy(f"{path} is locked: {exc}")
    if isinstance(exc, sqlite3.Error):
        return SourceError(f"{path}: {exc}")
    return exc


def retrying(fn, *args, delays: tuple[float, ...] = RETRY_DELAYS, **kwargs):
    """Call `fn`, retrying with backoff while the database is busy or locked."""
    for delay in delays:
        try:
            return fn(*args, **kwargs)
        except SourceBusy:
            time.sleep(delay)
    return fn(*args, **kwargs)


def columns(conn: sqlite3.Connection, table: str) -> frozenset[str]:
    """The column names `table` has on this machine (empty if the table is absent)."""
    return frozenset(row[1] for row in conn.execute(f'PRAGMA table_info("{table}")'))


def tables(conn: sqlite3.Connection) -> frozenset[str]:
    return frozenset(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
