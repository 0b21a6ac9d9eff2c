"""The README's abandoned-cart story, run as written: its cdpctl lines against collector → identity →
profile → orchestration on a real nats-server, orchestration's email channel on the local SMTP server
with a maildir, as `make up` wires them. Only the journey's delay is shortened (30 s → 3 s), so the
test is quick; Bob still buys inside it."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
JOURNEY = "docs/journeys/abandoned-cart.yaml"


def story() -> list[str]:
    """The first `sh` block of the README's abandoned-cart section, one command per line."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A journey end to end: the abandoned cart", 1)[1]
    (block,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)[:1]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


@pytest.fixture
async def platform(people_cli, nats_server, tmp_path, monkeypatch):
    from cdp_kit.service import serving
    from cdp_orchestration.__main__ import setup
    from cdp_orchestration.settings import OrchestrationSettings
    from cdp_testing.channels.smtp import LocalSmtpServer

    maildir = people_cli.home / "mail"
    async with LocalSmtpServer(host="127.0.0.1", port=0, maildir=maildir) as smtp:
        for name, value in {
            "CDP_SMTP_HOST": "127.0.0.1",
            "CDP_SMTP_PORT": str(smtp.port),
            "CDP_SMTP_SECURITY": "none",
            "CDP_SMTP_FROM": "cdp local <journeys@cdp.local>",
        }.items():
            monkeypatch.setenv(name, value)  # orchestration reads its providers from the environment
        settings = OrchestrationSettings(
            nats_url=nats_server.url,
            grpc_host="127.0.0.1",
            grpc_port=0,
            auth_mode="none",
            partitions=2,  # as collector, identity and profile in people_cli
            shutdown_grace=1.0,
            store_url=f"sqlite:///{tmp_path / 'orchestration.db'}",
            answer_timeout=15.0,
        )
        async with serving(settings, setup) as runtime:
            run_file = people_cli.home / "run.json"
            state = json.loads(run_file.read_text())
            state["services"]["orchestration"] = {"grpc": f"127.0.0.1:{runtime.grpc.port}"}
            state["services"]["collector"] = {"http": people_cli.http}
            run_file.write_text(json.dumps(state))
            yield people_cli, maildir


async def eventually(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_the_readme_abandoned_cart_story_runs_as_written(platform, tmp_path):
    cli, maildir = platform
    quick = tmp_path / "abandoned-cart.yaml"
    document = (ROOT / JOURNEY).read_text()
    assert "duration: 30s" in document, "the README says 30 seconds"
    quick.write_text(document.replace("duration: 30s", "duration: 3s"))
    lines = story()
    assert any("journey create" in line for line in lines) and any(line.startswith("cat ") for line in lines)

    outputs = {}
    for line in lines:
        if line.startswith("cat .cdp/mail/new/"):
            # Half a minute later (here: the shortened delay): exactly one reminder, Ada's.
            async def mail():
                return list((maildir / "new").glob("*")) if (maildir / "new").is_dir() else []

            [message] = await eventually(mail)
            text = message.read_text()
            assert "To: ada@example.com" in text and "Subject: Ada, your cart is waiting" in text
            assert "https://shop.example/cart/ada" in text
            continue
        assert line.startswith(".venv/bin/cdpctl "), line
        if "Order Completed" in line:
            # At a person's typing pace: the purchase comes in a later batch than the entry. (The same
            # batch ends the instance by its exit rule too, but does not count the goal: reported.)
            await asyncio.sleep(1)
        args = [a.replace(JOURNEY, str(quick)) for a in shlex.split(line, comments=True)[1:]]
        if args[:2] == ["journey", "instances"]:

            async def both_ended(args=args):
                result = await cli.run(*args, "--json")
                found = json.loads(result.output)
                return found if len(found) == 2 and all(i["state"] == "INSTANCE_STATE_ENDED" for i in found) else None

            instances = await eventually(both_ended)
            assert instances, "both instances end: Ada's after the reminder, Bob's at his purchase"
            assert sorted(i["endReason"] for i in instances) == ["completed", "exit_rule:purchased"]
        if args[:2] == ["journey", "stats"]:

            async def counted(args=args):
                result = await cli.run(*args)
                return result if "1 converted" in result.output else None

            await eventually(counted, timeout=10)
        result = await cli.run(*args)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        outputs[" ".join(args[:2])] = result.output

    assert "accepted 1" in outputs["send track"]
    assert "sent" in outputs["decisions user_id"] or "no decisions" in outputs["decisions user_id"]
    stats = outputs["journey stats"]
    assert "2 entered" in stats and "1 converted" in stats, stats
    assert len(list((maildir / "new").glob("*"))) == 1, "nothing was ever sent to Bob"
