"""Processes the benchmark starts: the stand-in Citadel and crm-syncd; /proc readings."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (/proc/<pid>/stat fields 14 and 15; 10-ms clock ticks,
    includes threads that have exited)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """On-CPU nanoseconds of each live thread (/proc/<pid>/task/<tid>/schedstat, first field)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return out


class CPUSample:
    """CPU time of a process at one instant: clock ticks (all threads, ever) and per-thread ns."""

    def __init__(self, pid: int) -> None:
        self.ticks_s = cpu_s(pid)
        self.threads = thread_cpu_ns(pid)
        self.at = time.monotonic()

    def since(self, before: CPUSample) -> dict:
        """CPU seconds between two samples: ns-precise when no thread exited in between (threads
        that started in between count in full), else the 10-ms tick count."""
        exited = set(before.threads) - set(self.threads)
        ns = sum(t - before.threads.get(tid, 0) for tid, t in self.threads.items())
        ticks = self.ticks_s - before.ticks_s
        return {"cpu_s": ticks if exited else ns / 1e9, "ticks_s": round(ticks, 2),
                "precise": not exited, "seconds": self.at - before.at}


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set size so far (VmHWM), kB."""
    return _status_kb(pid, "VmHWM:")


def vm_rss_kb(pid: int) -> int | None:
    """Resident set size now (VmRSS), kB."""
    return _status_kb(pid, "VmRSS:")


class Citadel:
    """`python -m tests.harness.citadel` as its own process, on loopback.

    `down()` ends the process (a real outage: connections are refused); `up()` starts it again on
    the same port and database.
    """

    def __init__(self, db: Path, latency_ms: float = 0.0) -> None:
        self.db = db
        self.latency_ms = latency_ms
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        self._reader: sqlite3.Connection | None = None
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._spawn()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.citadel", "--db", str(self.db), "--port", str(self.port),
             "--latency-ms", str(self.latency_ms)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"stand-in did not start: {line!r}")
        self.url = line.removeprefix("listening on ")
        self.port = int(self.url.rsplit(":", 1)[1])

    def down(self) -> float:
        """End the stand-in process (data kept); wall-clock ms when it had exited."""
        self.stop()
        return time.time() * 1000

    def up(self, attempts: int = 50) -> float:
        """Start it again on the same port and database; wall-clock ms when it was listening."""
        for attempt in range(attempts):
            try:
                self._spawn()
                return time.time() * 1000
            except RuntimeError:  # the port may not be free yet
                if attempt == attempts - 1:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def reader(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None)
        return self._reader

    def interactions(self) -> int:
        try:
            return self.reader().execute("SELECT count(*) FROM interactions").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def max_id(self) -> int:
        try:
            return self.reader().execute("SELECT coalesce(max(id), 0) FROM interactions").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def count_since(self, skip: int) -> int:
        try:
            return self.reader().execute("SELECT count(*) FROM interactions WHERE id > ?", (skip,)).fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def created_span(self, skip: int = 0) -> tuple[int, int, int]:
        """(count, first created_at ms, last created_at ms) of interactions with id > skip."""
        row = self.reader().execute("SELECT count(*), min(created_at), max(created_at) FROM interactions "
                                    "WHERE id > ?", (skip,)).fetchone()
        return row[0], row[1] or 0, row[2] or 0

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Citadel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def crm_env(home: Path, url: str, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_SYNCD_")}
    env.update(HOME=str(home), CRM_SYNCD_API_URL=url)
    env.update({f"CRM_SYNCD_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def crm_syncd(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "crm_syncd", *args], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
