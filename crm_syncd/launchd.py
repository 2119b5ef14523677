"""The launchd user agent that keeps `crm-syncd run` alive: render, install, uninstall, inspect.

The plist template ships inside the package (`crm_syncd/launchd_template.plist`, identical to
`launchd/com.citadel.crm-syncd.plist` in the repository), so it is found from any kind of install.
"""

from __future__ import annotations

import math
import os
import plistlib
import re
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from crm_syncd import macos
from crm_syncd.settings import CONFIG_ENV, ENV_PREFIX, Settings, names_setting, ready_folder

LABEL = "com.citadel.crm-syncd"
TEMPLATE = "launchd_template.plist"
SYSTEM_PATH = ("/usr/local/bin", "/opt/homebrew/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
FDA_WARNING = ("Full Disk Access belongs to that exact binary: upgrading or reinstalling Python "
               "(or recreating the venv from another Python) revokes it. Grant it again and re-run "
               "`crm-syncd install` after such a change.")
STOP_MARGIN_S = 10  # beyond the daemon's own shutdown deadline: for its last writes, and for launchd to see it gone
SECRET_ENV = ENV_PREFIX + "API_KEY"  # never written into the plist, which others may read

Command = tuple[str, ...]


class LaunchdError(RuntimeError):
    """launchctl refused to do what was asked."""


@dataclass(frozen=True)
class InstallResult:
    """What install/uninstall did (or, with dry_run, would do)."""

    action: Literal["install", "uninstall"]
    plist_path: Path
    plist: str  # the agent definition written (install); "" for uninstall
    commands: tuple[Command, ...]  # launchctl invocations that changed something (or would)
    dry_run: bool
    changed: bool  # uninstall: something was booted out or removed; install: always True unless dry
    fda_binary: Path  # what to add under Privacy & Security → Full Disk Access
    fda_warning: str = FDA_WARNING


@dataclass(frozen=True)
class AgentState:
    """The agent as launchd sees it (`launchctl print gui/<uid>/<label>`)."""

    installed: bool  # the plist exists in ~/Library/LaunchAgents
    loaded: bool  # launchd knows the service
    pid: int | None  # running process, if any
    last_exit: int | None  # last exit code, if it ever exited
    raw: str  # launchctl's own words, for `status --verbose`


def plist_path(home: Path | None = None) -> Path:
    return Path(home if home is not None else Path.home()) / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def _target() -> str:
    return f"{macos.gui_domain()}/{LABEL}"


def _substitute(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, str) and node.startswith("@") and node.endswith("@") and len(node) > 2:
        if node not in values:
            raise ValueError(f"launchd template has an unknown placeholder {node}")
        return values[node]
    return node


def render_plist(settings: Settings, python: str | None = None) -> bytes:
    """The agent's plist for `settings`, running `python -m crm_syncd run` (default: this interpreter)."""
    python = python or sys.executable
    if not python or not os.path.isabs(python):
        raise ValueError(f"the agent needs an absolute interpreter path, got {python!r}")
    path_dirs = dict.fromkeys((str(Path(python).parent), *SYSTEM_PATH))
    values = {
        "@PYTHON@": python,
        "@PATH@": ":".join(path_dirs),
        "@STATE_DIR@": str(settings.state_dir),
        "@STDOUT_LOG@": str(settings.log_dir / "launchd.stdout.log"),
        "@STDERR_LOG@": str(settings.log_dir / "launchd.stderr.log"),
    }
    template = resources.files("crm_syncd").joinpath(TEMPLATE).read_bytes()
    agent = _substitute(plistlib.loads(template), values)
    # SIGTERM to SIGKILL: launchd's default (20 s) would cut short a longer shutdown deadline
    agent["ExitTimeOut"] = math.ceil(settings.shutdown_deadline_s) + STOP_MARGIN_S
    environment = agent["EnvironmentVariables"]
    for name, value in sorted(os.environ.items()):  # the agent runs with the settings install was given
        if names_setting(name) and name.upper() != SECRET_ENV:  # the settings read names in any case
            environment[name] = value
    if os.environ.get(CONFIG_ENV) and settings.config_file is not None:
        environment[CONFIG_ENV] = str(settings.config_file.absolute())
    data = plistlib.dumps(agent, fmt=plistlib.FMT_XML, sort_keys=False)
    plistlib.loads(data)  # what launchd will parse must parse
    return data


def _is_loaded() -> bool:
    return macos.launchctl("print", _target()).returncode == 0


def _not_loaded(result) -> bool:
    text = f"{result.stdout}\n{result.stderr}".lower()
    return result.returncode in (3, 113) or any(
        s in text for s in ("no such process", "could not find", "not loaded"))


def _run(command: Command) -> None:
    result = macos.launchctl(*command[1:])
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
        raise LaunchdError(f"{' '.join(command)} failed: {detail}")


def _bootout(command: Command, settings: Settings) -> None:
    """Unload the agent (a no-op if launchd already forgot it) and wait until it is gone: the daemon
    may take its whole shutdown deadline to hand in-flight requests back."""
    result = macos.launchctl(*command[1:])
    if result.returncode != 0 and not _not_loaded(result):
        detail = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
        raise LaunchdError(f"{' '.join(command)} failed: {detail}")
    deadline = time.monotonic() + settings.shutdown_deadline_s + STOP_MARGIN_S
    while _is_loaded() and time.monotonic() < deadline:  # bootout returns before launchd is done
        time.sleep(0.1)


def _write_plist(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _result(action, path, plist, commands, dry_run, changed, python=None) -> InstallResult:
    return InstallResult(action=action, plist_path=path, plist=plist, commands=tuple(commands),
                         dry_run=dry_run, changed=changed, fda_binary=macos.fda_binary(python))


def install(settings: Settings, dry_run: bool = False) -> InstallResult:
    """Write the agent's plist and (re)load it; safe to repeat, replaces an older agent."""
    path = plist_path()
    data = render_plist(settings)
    bootout: Command = ("launchctl", "bootout", _target())
    bootstrap: Command = ("launchctl", "bootstrap", macos.gui_domain(), str(path))
    if dry_run:
        return _result("install", path, data.decode(), [bootout, bootstrap], True, False)
    loaded = _is_loaded()  # also fails early, before writing anything, where there is no launchctl
    ready_folder(settings, "state_dir")  # WorkingDirectory must exist or launchd cannot spawn us
    ready_folder(settings, "log_dir")
    _write_plist(path, data)
    ran: list[Command] = []
    if loaded:
        ran.append(bootout)
        _bootout(bootout, settings)
    ran.append(bootstrap)
    _run(bootstrap)
    return _result("install", path, data.decode(), ran, False, True)


def uninstall(settings: Settings, dry_run: bool = False) -> InstallResult:
    """Unload the agent and delete its plist; safe to repeat."""
    path = plist_path()
    bootout: Command = ("launchctl", "bootout", _target())
    if dry_run:
        return _result("uninstall", path, "", [bootout], True, False)
    ran: list[Command] = []
    if _is_loaded():
        ran.append(bootout)
        _bootout(bootout, settings)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return _result("uninstall", path, "", ran, False, bool(ran) or existed)


_PID = re.compile(r"^\s*pid = (\d+)\s*$", re.MULTILINE)
_LAST_EXIT = re.compile(r"^\s*last exit code = (-?\d+)", re.MULTILINE)


def agent_state(home: Path | None = None) -> AgentState:
    """Whether the agent is installed, loaded and running, from `launchctl print`."""
    result = macos.launchctl("print", _target())
    loaded = result.returncode == 0
    raw = result.stdout if loaded else (result.stdout + result.stderr)
    pid = _PID.search(raw) if loaded else None
    last_exit = _LAST_EXIT.search(raw) if loaded else None
    return AgentState(
        installed=plist_path(home).exists(),
        loaded=loaded,
        pid=int(pid.group(1)) if pid else None,
        last_exit=int(last_exit.group(1)) if last_exit else None,
        raw=raw,
    )
