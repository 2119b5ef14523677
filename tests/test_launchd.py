"""The launchd agent: its plist, and install/uninstall/status driven through a stand-in launchctl."""

from __future__ import annotations

import json
import os
import plistlib
import re
import sys
from pathlib import Path

import pytest

from crm_syncd import macos
from crm_syncd.launchd import LABEL, LaunchdError, agent_state, install, plist_path, render_plist, uninstall
from crm_syncd.settings import Settings
from tests.harness.processes import in_process_home

REPO = Path(__file__).resolve().parents[1]
UID = os.getuid()
DOMAIN = f"gui/{UID}"
TARGET = f"{DOMAIN}/{LABEL}"

FAKE_LAUNCHCTL = r'''#!{python}
"""Stand-in for launchctl: records each call and keeps 'loaded' as a file, like launchd would."""
import json, pathlib, plistlib, sys, time
state = pathlib.Path({state!r})
args = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")
loaded = state / "loaded"
cmd = args[0] if args else ""
stopping = state / "stopping-until"  # a bootout takes effect once the daemon has stopped
if stopping.exists() and float(stopping.read_text()) <= time.time():
    stopping.unlink()
    loaded.unlink()
if cmd == "print":
    if loaded.exists():
        sys.stdout.write((state / "print.txt").read_text())
        sys.exit(0)
    sys.stderr.write('Bad request.\nCould not find service "com.citadel.crm-syncd" in domain for user gui: 501\n')
    sys.exit(113)
if cmd == "bootstrap":
    if loaded.exists() or (state / "refuse-bootstrap").exists():
        sys.stderr.write("Bootstrap failed: 5: Input/output error\n")
        sys.exit(5)
    plistlib.loads(pathlib.Path(args[2]).read_bytes())  # launchd parses the plist it is given
    loaded.write_text(args[2])
    sys.exit(0)
if cmd == "bootout":
    if not loaded.exists():
        sys.stderr.write("Boot-out failed: 3: No such process\n")
        sys.exit(3)
    if (state / "stop-takes").exists():
        stopping.write_text(str(time.time() + float((state / "stop-takes").read_text())))
    else:
        loaded.unlink()
    sys.exit(0)
sys.stderr.write("Unrecognized subcommand\n")
sys.exit(64)
'''

PRINT_RUNNING = f"""{TARGET} = {{
	active count = 1
	path = /Users/u/Library/LaunchAgents/{LABEL}.plist
	type = LaunchAgent
	state = running

	program = /Users/u/crm/.venv/bin/python
	arguments = {{
		/Users/u/crm/.venv/bin/python
		-m
		crm_syncd
		run
	}}

	working directory = /Users/u/Library/Application Support/crm-syncd
	environment = {{
		PATH => /usr/bin:/bin:/usr/sbin:/sbin
		XPC_SERVICE_NAME => {LABEL}
	}}

	domain = {DOMAIN} [100005]
	minimum runtime = 30
	runs = 2
	pid = 4242
	immediate reason = speculative
	forks = 0
	execs = 1
	last exit code = 1

	spawn type = background (4)
}}
"""

PRINT_WAITING = f"""{TARGET} = {{
	active count = 0
	path = /Users/u/Library/LaunchAgents/{LABEL}.plist
	type = LaunchAgent
	state = not running

	runs = 3
	last exit code = 78: EX_CONFIG
}}
"""


class FakeLaunchctl:
    def __init__(self, state: Path) -> None:
        self.state = state

    def calls(self) -> list[list[str]]:
        path = self.state / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def changes(self) -> list[list[str]]:
        """The calls that change launchd's state (print only looks)."""
        return [c for c in self.calls() if c[0] != "print"]

    def forget_calls(self) -> None:
        (self.state / "calls.jsonl").unlink(missing_ok=True)

    @property
    def loaded(self) -> bool:
        return (self.state / "loaded").exists()

    def answer_print(self, text: str) -> None:
        (self.state / "print.txt").write_text(text)
        (self.state / "loaded").write_text("loaded by the test")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    return in_process_home(tmp_path, monkeypatch)


@pytest.fixture
def fake(tmp_path, monkeypatch, home) -> FakeLaunchctl:
    bin_dir, state = tmp_path / "bin", tmp_path / "launchd-state"
    bin_dir.mkdir()
    state.mkdir()
    exe = bin_dir / "launchctl"
    exe.write_text(FAKE_LAUNCHCTL.format(python=sys.executable, state=str(state)))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    (state / "print.txt").write_text(PRINT_RUNNING)
    return FakeLaunchctl(state)


@pytest.fixture
def settings(home) -> Settings:
    return Settings()


# --- the plist ------------------------------------------------------------------------------------

def test_packaged_template_is_identical_to_the_one_in_the_repository():
    packaged = REPO / "crm_syncd" / "launchd_template.plist"
    assert packaged.read_bytes() == (REPO / "launchd" / "com.citadel.crm-syncd.plist").read_bytes()


def test_rendered_plist_runs_this_interpreter_as_a_background_agent(settings):
    agent = plistlib.loads(render_plist(settings))
    assert agent["Label"] == LABEL == "com.citadel.crm-syncd"
    assert agent["ProgramArguments"] == [sys.executable, "-m", "crm_syncd", "run"]
    assert os.path.isabs(agent["ProgramArguments"][0])
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["ThrottleInterval"] == 30
    assert agent["ProcessType"] == "Background"
    assert agent["LowPriorityIO"] is True
    path = agent["EnvironmentVariables"]["PATH"].split(":")
    assert "/usr/bin" in path and "/bin" in path and all(os.path.isabs(p) for p in path)
    assert "HOME" not in agent["EnvironmentVariables"]
    assert agent["WorkingDirectory"] == str(settings.state_dir)
    assert agent["StandardOutPath"] == str(settings.log_dir / "launchd.stdout.log")
    assert agent["StandardErrorPath"] == str(settings.log_dir / "launchd.stderr.log")
    assert not re.search(r"@[A-Z_]+@", render_plist(settings).decode())  # no placeholder left


@pytest.mark.parametrize(("deadline", "kill_after"), [(10, 20), (45.5, 56)])
def test_launchd_gives_the_daemon_its_whole_shutdown_deadline_and_then_some_before_killing_it(
        home, deadline, kill_after):
    settings = Settings(shutdown_deadline_s=deadline)

    agent = plistlib.loads(render_plist(settings))

    assert agent["ExitTimeOut"] == kill_after


def test_rendered_plist_escapes_odd_paths_and_takes_a_given_interpreter(home):
    s = Settings(state_dir=home / "a & <b>")
    agent = plistlib.loads(render_plist(s, python="/opt/py 3/bin/python3"))
    assert agent["ProgramArguments"][0] == "/opt/py 3/bin/python3"
    assert agent["WorkingDirectory"] == str(home / "a & <b>")
    assert agent["EnvironmentVariables"]["PATH"].startswith("/opt/py 3/bin:")


def test_relative_interpreter_is_refused(settings):
    with pytest.raises(ValueError, match="absolute"):
        render_plist(settings, python="python3")


def test_a_moved_config_file_is_passed_on_to_the_agent(home, monkeypatch, tmp_path):
    config = tmp_path / "crm.toml"
    config.write_text("batch_size = 10\n")
    monkeypatch.setenv("CRM_SYNCD_CONFIG", str(config))
    monkeypatch.setattr(macos, "keychain_api_key", lambda: None)
    from crm_syncd.settings import load_settings
    agent = plistlib.loads(render_plist(load_settings()))
    assert agent["EnvironmentVariables"]["CRM_SYNCD_CONFIG"] == str(config)


def test_the_agent_gets_the_settings_install_was_given_in_its_environment_but_never_the_api_key(
        home, monkeypatch, tmp_path):
    monkeypatch.setattr(macos, "keychain_api_key", lambda: None)
    monkeypatch.setenv("CRM_SYNCD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CRM_SYNCD_API_URL", "https://crm.example.com")
    monkeypatch.setenv("CRM_SYNCD_API_KEY", "s3cret-key")
    monkeypatch.setenv("CRM_SYNCD_LOOKBACK_DAYS", "30")  # a typo, warned about: not passed on
    monkeypatch.setenv("crm_syncd_api_key", "s3cret-key")  # read in any case, as the key in use
    from crm_syncd.settings import load_settings

    data = render_plist(load_settings())

    agent = plistlib.loads(data)
    assert "CRM_SYNCD_LOOKBACK_DAYS" not in agent["EnvironmentVariables"]
    assert agent["WorkingDirectory"] == str(tmp_path / "state")
    assert agent["EnvironmentVariables"]["CRM_SYNCD_STATE_DIR"] == str(tmp_path / "state")
    assert agent["EnvironmentVariables"]["CRM_SYNCD_API_URL"] == "https://crm.example.com"
    assert "CRM_SYNCD_API_KEY" not in agent["EnvironmentVariables"] and b"s3cret-key" not in data


def test_install_says_where_an_api_key_given_in_the_environment_belongs_instead(cli):
    cli.env["CRM_SYNCD_API_KEY"] = "s3cret-key"

    result = cli("install", "--dry-run")

    assert result.code == 0, result.output
    assert "CRM_SYNCD_API_KEY is not passed on to the agent" in result.stdout and "Keychain" in result.stdout
    assert "s3cret-key" not in result.output


# --- install / uninstall --------------------------------------------------------------------------

def test_install_writes_the_plist_and_bootstraps_it(fake, settings, home):
    result = install(settings)
    path = home / "Library/LaunchAgents/com.citadel.crm-syncd.plist"
    assert result.plist_path == path == plist_path(home)
    assert path.stat().st_mode & 0o777 == 0o644
    assert plistlib.loads(path.read_bytes())["ProgramArguments"][-2:] == ["crm_syncd", "run"]
    assert fake.changes() == [["bootstrap", DOMAIN, str(path)]]
    assert result.commands == (("launchctl", "bootstrap", DOMAIN, str(path)),)
    assert fake.loaded
    assert settings.state_dir.is_dir() and settings.log_dir.is_dir()  # launchd needs WorkingDirectory
    assert result.fda_binary == macos.fda_binary(sys.executable)
    assert "Python" in result.fda_warning and "revokes" in result.fda_warning


def test_installing_again_replaces_the_loaded_agent(fake, settings, home):
    install(settings)
    fake.forget_calls()
    result = install(settings)
    path = str(plist_path(home))
    assert fake.changes() == [["bootout", TARGET], ["bootstrap", DOMAIN, path]]
    assert [list(c[1:]) for c in result.commands] == fake.changes()
    assert fake.loaded


def test_installing_again_waits_for_a_daemon_that_takes_its_shutdown_deadline_to_stop(fake, settings, home):
    install(settings)
    (fake.state / "stop-takes").write_text("6")  # in-flight requests handed back: longer than a moment

    install(settings)

    assert fake.loaded and not (fake.state / "stopping-until").exists()


def test_install_when_launchd_refuses_says_why(fake, settings):
    (fake.state / "refuse-bootstrap").touch()
    with pytest.raises(LaunchdError, match="Input/output error"):
        install(settings)


def test_uninstall_boots_out_and_removes_and_is_idempotent(fake, settings, home):
    install(settings)
    fake.forget_calls()
    first = uninstall(settings)
    assert fake.changes() == [["bootout", TARGET]]
    assert not plist_path(home).exists() and not fake.loaded
    assert first.changed

    fake.forget_calls()
    second = uninstall(settings)
    assert fake.changes() == []
    assert not second.changed and second.commands == ()


def test_uninstall_removes_an_agent_that_crash_loops_on_a_broken_config_saying_it_uses_the_defaults(
        fake, cli, home):
    cli.env["PATH"] = os.environ["PATH"]  # the fake launchctl first
    assert cli("install").code == 0 and fake.loaded
    config = home / ".config/crm-syncd/config.toml"  # the agent now exits 2 at every start
    config.parent.mkdir(parents=True)
    config.write_text("lookback_days = 30\n")
    config.chmod(0o600)

    result = cli("uninstall")

    assert result.code == 0, result.output
    assert not plist_path(home).exists() and not fake.loaded
    assert "warning: unknown setting 'lookback_days'" in result.stderr and "default settings" in result.stderr


def test_dry_runs_change_nothing(fake, settings, home):
    result = install(settings, dry_run=True)
    assert fake.calls() == []
    assert not plist_path(home).exists()
    assert not settings.state_dir.exists()
    assert plistlib.loads(result.plist.encode())["Label"] == LABEL
    assert result.commands == (("launchctl", "bootout", TARGET),
                               ("launchctl", "bootstrap", DOMAIN, str(plist_path(home))))
    assert result.dry_run

    install(settings)
    fake.forget_calls()
    result = uninstall(settings, dry_run=True)
    assert fake.calls() == []
    assert plist_path(home).exists() and fake.loaded
    assert result.commands == (("launchctl", "bootout", TARGET),)


@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_a_dry_run_on_a_fresh_mac_says_what_it_would_do_not_that_there_is_nothing_to_do(cli, home, command):
    result = cli(command, "--dry-run")

    assert result.code == 0, result.output
    assert "would run: launchctl bootout" in result.stdout
    assert f"would {command}: {plist_path(home)}" in result.stdout and "nothing to do" not in result.stdout
    assert not plist_path(home).exists()


def test_without_launchctl_install_fails_clearly_before_writing(settings, home, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(macos.LaunchctlNotFound, match="launchctl not found on PATH"):
        install(settings)
    assert not plist_path(home).exists()


# --- status -----------------------------------------------------------------------------------------

def test_agent_state_of_a_running_agent(fake, settings):
    install(settings)
    fake.answer_print(PRINT_RUNNING)
    state = agent_state()
    assert (state.installed, state.loaded, state.pid, state.last_exit) == (True, True, 4242, 1)
    assert "state = running" in state.raw
    assert fake.calls()[-1] == ["print", TARGET]


def test_agent_state_of_a_loaded_agent_waiting_to_be_restarted(fake):
    fake.answer_print(PRINT_WAITING)
    state = agent_state()
    assert (state.installed, state.loaded, state.pid, state.last_exit) == (False, True, None, 78)


def test_agent_state_when_not_loaded(fake):
    state = agent_state()
    assert (state.installed, state.loaded, state.pid, state.last_exit) == (False, False, None, None)
    assert "Could not find service" in state.raw


# --- the binary that needs Full Disk Access --------------------------------------------------------

def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


@pytest.mark.parametrize("framework", ["Python.framework", "Python3.framework"])
def test_fda_binary_of_a_venv_on_a_framework_python_is_python_app(tmp_path, framework):
    versions = tmp_path / "Library/Frameworks" / framework / "Versions"
    real = _touch(versions / "3.12/bin/python3.12")
    (versions / "Current").symlink_to("3.12")
    venv_python = tmp_path / "venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(versions / "Current/bin/python3.12")
    app = versions / "3.12/Resources/Python.app/Contents/MacOS/Python"
    assert macos.fda_binary(str(venv_python)) == app
    assert macos.fda_binary(str(real)) == app
    assert macos.fda_binary(str(_touch(app))) == app


def test_fda_binary_of_a_plain_build_is_the_real_executable(tmp_path):
    real = _touch(tmp_path / "usr/local/bin/python3.12")
    link = tmp_path / "venv/bin/python"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    assert macos.fda_binary(str(link)) == real


def test_gui_domain_is_the_users_uid():
    assert macos.gui_domain() == DOMAIN

