"""Shared fixtures: a synthetic Library in a temporary HOME, the stand-in CRM, and the CLI.

The CLI runs as a real subprocess (`python -m crm_syncd ...`) against the stand-in Citadel over
real HTTP, exactly as an owner would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.citadel import CitadelServer
from tests.harness.library import Library

REPO = Path(__file__).resolve().parent.parent


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

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "crm_syncd", *args], env=self.env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_SYNCD_")}
    env.update(HOME=str(home), NO_COLOR="1", COLUMNS="200", PYTHONPATH=str(REPO), **extra)
    return env


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
