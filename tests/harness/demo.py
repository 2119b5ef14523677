"""`make demo`: a synthetic ~/Library, the stand-in Citadel, and one real `crm-syncd sync`.

Works on any OS with Python: nothing of the real Mac is read or written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.harness.citadel import CitadelServer
from tests.harness.library import Library, ago

console = Console(highlight=False)


def build(lib: Library) -> None:
    """A few people the owner talks to, in the shapes a real Mac has."""
    lib.card(first="Jane", last="Doe", phones=[("+1 (613) 555-0111", "Mobile")], emails=["jane@example.com"],
             note="Met at the climbing gym")
    lib.card(source=1, first="Jane", last="Doe", phones=["613-555-0111"])  # the same person in iCloud
    lib.card(source=2, first="Bob", last="Roe", phones=[("+1 902 555 0122", "iPhone")], job_title="Carpenter")
    lib.card(organization="Acme Plumbing", company=True, phones=["+1 613 555 0144"])
    lib.card(first="Owner", last="Self", phones=["+1 613 555 0100"], me=True)
    start = ago(days=6)
    for n in range(12):
        lib.text("+16135550111", from_me=n % 3 == 0, at=start + timedelta(hours=7 * n))
    lib.text("+16135550111", at=start + timedelta(hours=1), associated_type=2001)  # a tapback: not counted
    lib.group_text(["+16135550111", "+19025550122"], sender="+19025550122", at=ago(days=2))
    lib.group_text(["+16135550111", "+19025550122"], at=ago(days=2, minutes=-5))
    lib.text("+19055551234", at=ago(days=1))  # nobody's card: a placeholder
    lib.text("88202", service="SMS", at=ago(hours=20))  # a short code: skipped
    lib.call("+16135550111", originated=True, duration=312, at=ago(days=3))
    lib.call("+19025550122", answered=False, at=ago(days=1, hours=3))  # missed
    lib.call("jane@example.com", answered=True, duration=95, call_type=8, service_provider="com.apple.FaceTime",
             at=ago(hours=5))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="crm-syncd-demo-") as tmp:
        home = Path(tmp) / "home"
        lib = Library.create(home)
        build(lib)
        server = CitadelServer(Path(tmp) / "citadel.sqlite").start()
        try:
            console.rule("[bold]crm-syncd sync[/] against a stand-in Citadel at " + server.url)
            env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_SYNCD_")}
            env.update(HOME=str(home), CRM_SYNCD_API_URL=server.url)
            done = subprocess.run([sys.executable, "-m", "crm_syncd", "sync"], env=env)
            console.rule("[bold]What the CRM holds now")
            show(server)
            console.rule("[bold]A second run creates nothing")
            subprocess.run([sys.executable, "-m", "crm_syncd", "sync"], env=env)
        finally:
            server.stop()
            lib.close()
        return done.returncode


def show(server: CitadelServer) -> None:
    table = Table("id", "name", "phone", "email", "interactions")
    for contact in server.contacts():
        kinds: dict[str, int] = {}
        for interaction in server.interactions(contact["id"]):
            kinds[interaction["type"]] = kinds.get(interaction["type"], 0) + 1
        table.add_row(str(contact["id"]), f"{contact['firstName']} {contact['lastName']}", contact["phone"] or "",
                      contact["email"] or "", ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
