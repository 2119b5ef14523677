"""A stand-in for the `keyring` package (the macOS login Keychain) for CLI subprocesses: put this folder
on PYTHONPATH; it returns what the file named by $CRM_SYNCD_TEST_KEYCHAIN holds, exactly as stored,
for service crm-syncd / account api_key."""

import os


def get_password(service: str, user: str) -> str | None:
    path = os.environ.get("CRM_SYNCD_TEST_KEYCHAIN")
    if not path or (service, user) != ("crm-syncd", "api_key"):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()
