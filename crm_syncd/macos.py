"""Small seams around what only macOS has (launchctl, TCC, Keychain), so tests can drive them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

KEYCHAIN_SERVICE = "crm-syncd"
KEYCHAIN_USER = "api_key"
LAUNCHCTL_TIMEOUT_S = 30

_FRAMEWORK = re.compile(r"Python\d*\.framework")


class LaunchctlNotFound(RuntimeError):
    """There is no `launchctl` on PATH (not macOS, or a stripped PATH)."""


def fda_binary(executable: str | None = None) -> Path:
    """The binary macOS checks for Full Disk Access when this interpreter reads a file.

    A venv's python is a symlink; framework builds (python.org, Homebrew, Xcode's Python3.framework)
    re-exec into `.../Python.framework/Versions/X.Y/Resources/Python.app/Contents/MacOS/Python`.
    """
    real = Path(os.path.realpath(executable or sys.executable))
    for version_dir in real.parents:  # find .../PythonN.framework/Versions/X.Y
        versions = version_dir.parent
        if versions.name == "Versions" and _FRAMEWORK.fullmatch(versions.parent.name):
            return version_dir / "Resources" / "Python.app" / "Contents" / "MacOS" / "Python"
    return real


TERMINAL_APPS = {"Apple_Terminal": "Terminal", "iTerm.app": "iTerm", "vscode": "Visual Studio Code",
                 "WarpTerminal": "Warp", "ghostty": "Ghostty", "WezTerm": "WezTerm"}  # $TERM_PROGRAM -> app


def fda_terminal_app() -> str | None:
    """The terminal app this process runs in, if any: macOS holds it responsible for the process's
    file access, so it is the app that needs Full Disk Access (the daemon, under launchd, has none)."""
    program = os.environ.get("TERM_PROGRAM")
    return TERMINAL_APPS.get(program, program) if program else None


def launchctl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the `launchctl` found on PATH with `args`; never raises on a non-zero exit."""
    exe = shutil.which("launchctl")
    if exe is None:
        raise LaunchctlNotFound("launchctl not found on PATH: installing the background agent "
                                "needs macOS (use `crm-syncd sync` or `crm-syncd run` elsewhere)")
    return subprocess.run([exe, *args], capture_output=True, text=True, check=False,
                          timeout=LAUNCHCTL_TIMEOUT_S)


def gui_domain() -> str:
    """launchd's domain for the logged-in user's agents: `gui/<uid>`."""
    return f"gui/{os.getuid()}"


def keychain_api_key() -> str | None:
    """The API key stored in the login Keychain, or None (also when `keyring` isn't installed)."""
    try:
        import keyring  # optional: pip install 'crm-syncd[keychain]'
    except ImportError:
        return None
    try:
        key = keyring.get_password(KEYCHAIN_SERVICE, KEYCHAIN_USER)
    except Exception:  # noqa: BLE001 - no backend, locked keychain, denied prompt: not configured
        return None
    return key or None
