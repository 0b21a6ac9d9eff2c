"""The story tests share `stories.py` (the platform and the ways its users reach it).

Every module that opens a `Story` ends with an audit of the logs its platform wrote: each line of every
service's and companion's log (the workspace's `logs/`, and nats-server's) is read after the platform has
stopped, and none may hold a secret of the workspace (a source's write key, a bearer token, a NATS
password, a dev signing secret, a TLS private key, a CRM credential) or an identifier the story sent
(`Story.identifiers`: user and anonymous ids, emails, phone numbers, device ids, IP addresses). A finding
fails the module's teardown, naming the file, the line number and what kind of value it holds (never the
value itself).

cdpctl up's own console (`cdpctl-up.log`, beside the workspace) is not audited: it prints the dev write
key and the admin token's path to the operator on purpose.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

# --import-mode=importlib keeps test directories off sys.path.
sys.path.insert(0, str(Path(__file__).parent))

import stories

from cdpctl.platform import SERVICES


def workspace_secrets(home: Path) -> dict[str, str]:
    """value -> what it is, for every secret `cdpctl up` made or handed out in this workspace."""
    folder = home / "secrets"
    found: dict[str, str] = {}
    try:
        for source in json.loads((folder / "sources.json").read_text())["sources"]:
            found[source["write_key"]] = f"write key of source {source['id']}"
    except (OSError, ValueError, KeyError):
        pass
    for path in folder.glob("*.token"):
        found[path.read_text().strip()] = f"bearer token {path.name}"
    for path in folder.glob("dev-*.secret"):
        found[path.read_text().strip()] = f"dev secret {path.name}"
    for path in (folder / "nats").glob("*.json"):
        found[json.loads(path.read_text())["password"]] = f"NATS password of {path.stem}"
    for path in (folder / "tls").glob("*.key"):
        # The key's base64 body, line by line: any of its lines in a log is a leak.
        for line in path.read_text().splitlines():
            if not line.startswith("-----") and len(line) >= 16:
                found[line] = f"TLS private key {path.name}"
    for svc in SERVICES:
        for companion, variables in svc.companion_env.items():
            for variable, value in variables.items():
                if any(word in variable for word in ("TOKEN", "SECRET", "KEY", "PASSWORD")) and "{" not in value:
                    found[value] = f"credential {variable} ({companion})"
    return {value: what for value, what in found.items() if value}


def _pattern(value: str) -> re.Pattern[str]:
    # Whole values only: a user id "ada" is not found inside "metadata".
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(value)}(?![A-Za-z0-9_])", re.IGNORECASE)


def audit_logs(home: Path, identifiers: set[str]) -> list[str]:
    """Every (file:line, what) where a log line of the workspace holds a secret or an identifier."""
    wanted = {value: what for value, what in workspace_secrets(home).items()}
    wanted.update({value: "identifier the story sent" for value in identifiers})
    patterns = [(_pattern(value), what) for value, what in wanted.items()]
    findings = []
    for log in sorted([*(home / "logs").glob("*.log"), *(home / "nats").glob("*.log")]):
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            for pattern, what in patterns:
                if pattern.search(line):
                    findings.append(f"{log.relative_to(home)}:{number}: {what}")
    return findings


@pytest.fixture(scope="module", autouse=True)
def logs_hold_no_secret_or_identifier():
    """After the module (its platform stopped by then: this fixture is set up first, torn down last)."""
    first = len(stories.OPENED)
    yield
    opened = stories.OPENED[first:]
    findings = []
    for story in opened:
        findings += audit_logs(Path(story.platform.home), story.identifiers)
    if findings:
        shown = "\n".join(findings[:40]) + (f"\n… {len(findings) - 40} more" if len(findings) > 40 else "")
        pytest.fail(f"log lines holding a secret or an identifier ({len(findings)}):\n{shown}", pytrace=False)
