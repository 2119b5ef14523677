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
    """utime + stime of a process, seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class Citadel:
    """`python -m tests.harness.citadel` as its own process, on loopback."""

    def __init__(self, db: Path, latency_ms: float = 0.0) -> None:
        self.db = db
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.citadel", "--db", str(db), "--port", "0",
             "--latency-ms", str(latency_ms)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"stand-in did not start: {line!r}")
        self.url = line.removeprefix("listening on ")
        self._reader: sqlite3.Connection | None = None

    def reader(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None)
        return self._reader

    def interactions(self) -> int:
        try:
            return self.reader().execute("SELECT count(*) FROM interactions").fetchone()[0]
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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

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
