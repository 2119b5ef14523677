"""Helpers for tests that drive real crm-syncd processes: polling with a deadline, a running daemon."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import CLI


def eventually(check: Callable[[], object], timeout: float = 20.0, what: str = "condition"):
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.05)


class RunningDaemon:
    def __init__(self, cli: CLI, home: Path) -> None:
        self.cli = cli
        self.log = home / "Library" / "Logs" / "crm-syncd" / "crm-syncd.log"
        self.proc = cli.popen("run")
        eventually(lambda: self.events("daemon.watching") or self.proc.poll() is not None, what="daemon start")
        assert self.proc.poll() is None, self.proc.communicate()

    def events(self, name: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        rows = []
        for line in self.log.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line being written right now
                    continue
        return [r for r in rows if name is None or r.get("event") == name]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.communicate()
