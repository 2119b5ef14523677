"""Shared fixtures: a synthetic Library in a temporary HOME, the stand-in CRM, and the CLI.

The CLI runs as a real subprocess (`python -m crm_syncd ...`) against the stand-in Citadel over
real HTTP, exactly as an owner would run it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.harness.citadel import CitadelServer
from tests.harness.library import Library
from tests.harness.processes import CLI, RunningDaemon, clean_env, sigint_handled  # noqa: F401 (tests import CLI, clean_env from here)

sigint_handled()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def library(home: Path):
    lib = Library.create(home)
    yield lib
    lib.close()


@pytest.fixture
def citadel(tmp_path: Path):
    server = CitadelServer(tmp_path / "citadel.sqlite").start()
    yield server
    server.stop()


@pytest.fixture
def cli(home: Path, citadel: CitadelServer) -> CLI:
    return CLI(clean_env(home, CRM_SYNCD_API_URL=citadel.url))


@pytest.fixture
def daemon_env(cli: CLI) -> CLI:
    """The CLI with a daemon tuned for tests: quick rescans and debounce, a relaxed safety probe."""
    cli.env.update(CRM_SYNCD_CONTACTS_RESCAN_S="0.5", CRM_SYNCD_SAFETY_PROBE_S="30",
                   CRM_SYNCD_DEBOUNCE_MS="100", CRM_SYNCD_MAX_WAIT_MS="500")
    return cli


@pytest.fixture
def daemon(library: Library, daemon_env: CLI, home: Path):
    """Starts `crm-syncd run` (call it); every daemon started is killed at the end of the test."""
    running: list[RunningDaemon] = []

    def start(**kwargs) -> RunningDaemon:
        running.append(RunningDaemon(daemon_env, home, **kwargs))
        return running[-1]

    yield start
    for d in running:
        d.stop(signal.SIGKILL)

