"""The README's "records appear in a CRM" story, run as written: its cdpctl and curl lines against
collector → identity → profile → the CRM connector on a real nats-server, the connector configured as
`make up` configures it (the dev connections file, its dev credentials, the workspace's tokens) and
writing to the local HubSpot and Salesforce. The shell lines run in bash from a folder holding `.cdp`
(the workspace) and `.venv` (this one), so they read run.json as a newcomer's would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdpctl.platform import CRM, Workspace, service_environment, write_service_files

from .conftest import WRITE_KEY, Cli

ROOT = Path(__file__).resolve().parents[3]


def blocks() -> list[list[str]]:
    """The `sh` blocks of the README's CRM section, one command per line (continuations joined)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Records appear in a CRM", 1)[1].split("\n## ", 1)[0]
    found = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        text = block.replace("\\\n", " ")
        found.append([line for line in text.splitlines() if line.strip() and not line.startswith("#")])
    return found


@pytest.fixture
async def platform(people_cli, nats_server, tmp_path, monkeypatch):
    from cdp_crm.__main__ import setup
    from cdp_crm.settings import CrmSettings
    from cdp_kit.service import serving
    from cdp_kit.settings import load_settings

    async with HubSpotEmulator() as hubspot, SalesforceEmulator() as salesforce:
        ws = Workspace(tmp_path / ".cdp")
        ws.prepare(())
        ports = {
            "collector.http": 1,
            "crm.http": 0,
            "crm-hubspot.api": hubspot.port,
            "crm-salesforce.api": salesforce.port,
        }
        write_service_files(ws, CRM, ports)
        # The connector calls profile (a backfill reaches every person): the one people_cli runs.
        profile = json.loads((people_cli.home / "run.json").read_text())["services"]["profile"]["grpc"]
        env = service_environment(
            ws,
            CRM,
            nats_url=nats_server.url,
            grpc_port=0,
            metrics_port=0,
            http_port=None,
            named_ports=ports,
            peers={"profile": profile},
        )
        env["CDP_CRM_PROFILE_STORE_URL"] = f"sqlite:///{tmp_path / 'profile.db'}"  # people_cli's profile store
        for variable in [name for name in env if name.startswith("CDP_DEV_")]:  # the connections' credentials
            monkeypatch.setenv(variable, env[variable])
        env |= {"CDP_PARTITIONS": "2", "CDP_LOG_LEVEL": "WARNING"}  # as collector, identity and profile
        settings = replace(
            load_settings(CrmSettings, env),
            grpc_port=0,
            collector_url=people_cli.http,
            collector_write_key=WRITE_KEY,
            poll_seconds=0.5,
            shutdown_grace=1.0,
        )
        async with serving(settings, setup) as runtime:
            state = json.loads((people_cli.home / "run.json").read_text())
            state["services"]["crm"] = {"grpc": f"127.0.0.1:{runtime.grpc.port}"}
            state["services"]["collector"] = {"http": people_cli.http}
            state["admin_token_file"] = str(ws.admin_token_file)
            state["companions"] = {
                "crm-hubspot": {"urls": {"api": hubspot.base_url}},
                "crm-salesforce": {"urls": {"api": salesforce.base_url}},
            }
            ws.write_run(state)
            (tmp_path / ".venv").mkdir()
            (tmp_path / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
            yield Cli(ws.root, nats_server.url), tmp_path, hubspot


async def shell(line: str, cwd: Path, variables: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CDP_HOME"} | variables
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", line, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{line}\n{out.decode()}\n{err.decode()}"
    return out.decode()


async def eventually(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_the_readme_crm_story_runs_as_written(platform):
    cli, folder, hubspot = platform
    story, operations = blocks()
    variables: dict[str, str] = {}
    outputs: list[str] = []
    for line in story:
        if line.startswith(".venv/bin/cdpctl "):
            args = shlex.split(line, comments=True)[1:]
            if args[:2] == ["crm", "record"]:

                async def both_synced(args=args):
                    result = await cli.run(*args, "--json")
                    states = [r["state"] for r in json.loads(result.output)] if result.exit_code == 0 else []
                    return states == ["RECORD_STATE_SYNCED"] * 2

                assert await eventually(both_synced), "Ada's HubSpot and Salesforce contacts are synced"
            result = await cli.run(*args)
            assert result.exit_code == 0, f"{line}\n{result.output}"
            outputs.append(result.output)
        elif re.match(r"[A-Z_]+=", line):
            name, _, command = line.partition("=")
            variables[name] = (await shell(f"echo {command}", folder, variables)).strip()
            if name == "HUBSPOT":
                assert variables[name] == hubspot.base_url
            else:  # Ada's contact id, read from HubSpot as a reader would
                assert variables[name] == "1001", f"{line}\n{variables[name]}"
        elif line.startswith("curl -s -H") and "/contacts/" in line:
            # Within a second of the event: read until the contact holds what the profile holds.
            wanted = "Augusta Ada" if 'properties=firstname"' in line else '"lastname":"Lovelace"'

            async def contact(line=line, wanted=wanted):
                text = await shell(line, folder, variables)
                return text if wanted in text else None

            text = await eventually(contact)
            assert text, f"{line} never showed {wanted}"
            outputs.append(text)
        else:
            outputs.append(await shell(line, folder, variables))

    (contact,) = hubspot.records("contacts")  # one contact for Ada, updated in place
    assert contact["id"] == "1001" and contact["properties"]["firstname"] == "Augusta Ada"
    assert "hubspot" in outputs[-2] and "62515" in outputs[-2]  # crm status: connection and budget
    ticket = json.loads(outputs[-1])
    assert hubspot.associations("tickets", ticket["id"]) == [("contacts", "1001")]

    # The ticket comes back as an event on Ada's own profile: identity links the connector's anonymous id
    # for her HubSpot contact to her through the email the event carries.
    async def linked():
        result = await cli.run("profile", "user_id", "ada", "--wait", "5")
        assert result.exit_code == 0, result.output
        ids = json.loads(result.output)["identifiers"]
        return ids if any(i.startswith("anonymous_id:hubspot:") for i in ids) else None

    ids = await eventually(linked)
    assert ids, "the ticket's event did not reach Ada's profile"
    assert "email:ada@example.com" in ids

    assert any(" crm validate " in line for line in operations)
    for line in operations:
        args = [a.replace(".cdp/", f"{folder}/.cdp/") for a in shlex.split(line, comments=True)[1:]]
        result = await cli.run(*args)
        assert result.exit_code == 0, f"{line}\n{result.output}"
