"""Running real crm-syncd processes in tests: the CLI, a running daemon, polling with a deadline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
CLOCK_HARNESS = Path(__file__).parent / "clock"  # a sitecustomize that sets the wall clock wrong


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class CLI:
    """Runs `crm-syncd` with a HOME and environment of the test's choosing."""

    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 120) -> Result:
        return self.run_with_prefix([], *args, timeout=timeout)

    def run_with_prefix(self, prefix: list[str], *args: str, timeout: float = 120) -> Result:
        """Run the CLI under a wrapper command (e.g. one that drops privileges)."""
        done = subprocess.run([*prefix, sys.executable, "-m", "crm_syncd", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
        return Result(done.returncode, done.stdout, done.stderr)

    def set_clock(self, offset_file: Path, seconds: float) -> None:
        """Set the wall clock of the processes this CLI starts `seconds` off (tests/harness/clock), from
        `offset_file`, which a test writes anew to move it."""
        offset_file.write_text(str(seconds))
        self.env.update(CRM_TEST_CLOCK_OFFSET_FILE=str(offset_file),
                        PYTHONPATH=os.pathsep.join([str(CLOCK_HARNESS), self.env.get("PYTHONPATH", "")]))

    def popen(self, *args: str, prefix: Sequence[str] = (), **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*prefix, sys.executable, "-m", "crm_syncd", *args], env=self.env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def sigint_handled() -> None:
    """Undo an inherited "ignore SIGINT", which every subprocess would inherit in turn.

    A suite started in the background by a shell without job control (`cmd &` in a script) gets
    SIGINT ignored, and so would each CLI it starts: the tests and the bench that stop a sync with
    SIGINT, as Ctrl-C does, would then see it run on to the end.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for a CLI run: no CRM_SYNCD_* variables, nor SUDO_UID (in a suite run under sudo,
    crm-syncd would judge its files for the user who ran sudo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_SYNCD_") and k != "SUDO_UID"}
    env.update(HOME=str(home), NO_COLOR="1", COLUMNS="200", PYTHONPATH=str(REPO), **extra)
    return env


def in_process_home(tmp_path: Path, monkeypatch) -> Path:
    """A fresh HOME for code run inside the test process: set in os.environ, no CRM_SYNCD_* variables nor
    SUDO_UID (what `clean_env` does for a subprocess)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SUDO_UID", raising=False)
    for name in list(os.environ):
        if name.upper().startswith("CRM_SYNCD_"):
            monkeypatch.delenv(name)
    return home


def unprivileged() -> list[str]:
    """A command prefix that makes root a plain user: denied what a file's mode forbids (the Linux stand-in
    for a macOS TCC refusal, too: the file exists, opening it is denied), and a chmod of another user's file."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


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
    def __init__(self, cli: CLI, home: Path, *, verbose: bool = False, prefix: Sequence[str] = ()) -> None:
        self.cli = cli
        self.log = home / "Library" / "Logs" / "crm-syncd" / "crm-syncd.log"
        self.proc = cli.popen("run", *(["-v"] if verbose else []), prefix=prefix)
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


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` without blocking an event loop the test shares with the daemon; fail naming `what`
    after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def daemon_in_process(settings, crm):
    """A Daemon inside the test process, its store and engine set up as `run` does and a first contacts pass
    made: for tests that drive its timers themselves."""
    from crm_syncd.daemon import Daemon
    from crm_syncd.engine import Engine
    from crm_syncd.store import Store

    daemon = Daemon(settings)
    daemon.store = Store(settings.state_db)
    daemon.engine = Engine(settings, daemon.store, crm)
    await daemon.engine.sync_contacts()
    return daemon
