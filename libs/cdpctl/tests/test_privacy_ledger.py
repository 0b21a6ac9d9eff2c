"""`cdpctl privacy ledger export` and `replay` on real nats-servers: the notices profile published for a
deletion written to an owner-only file holding no identifier value, and published again, as stored, to a
PRIVACY that lacks them (a second nats-server standing for `nats/` restored from before the deletion)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
import time

import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import Bus, privacy_stream
from cdp_kit.natsserver import NatsServer

USER, EMAIL, ANON = "u-ledger-5e1f", "Ledger.Person-5e1f@Example.org", "anon-ledger-5e1f"


async def until_ok(cli, *args: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await cli.run(*args)
        if result.exit_code == 0 or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


async def privacy_messages(url: str) -> list:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        state = (await js.stream_info("PRIVACY")).state
        found = []
        for seq in range(max(state.first_seq, 1), state.last_seq + 1):
            try:
                found.append(await js.get_msg("PRIVACY", seq=seq))
            except Exception:  # removed
                continue
        return found
    finally:
        await nc.close()


@pytest.fixture
async def restored_nats(tmp_path):
    """A nats-server whose PRIVACY is empty: `nats/` restored from before the deletion."""
    server = NatsServer(store_dir=tmp_path / "restored-nats").start()
    try:
        async with Bus.connect(server.url, name="test", connect_timeout=5) as bus:
            await bus.ensure_streams(privacy_stream())
        yield server.url
    finally:
        server.close()


async def deleted_person(cli, tmp_path) -> tuple[str, object]:
    """A person with a user id, an anonymous id and an email, deleted with --suppress; the request id and
    the ledger exported after it."""
    await cli.send(
        {"type": "identify", "userId": USER, "anonymousId": ANON, "traits": {"email": EMAIL}, "messageId": "l1"}
    )
    assert (await until_ok(cli, "profile", "user_id", USER)).exit_code == 0
    result = await cli.run("delete", "user_id", USER, "--suppress", "--yes", "--request-id", "ledger-req-1", "--wait")
    assert result.exit_code == 0, result.output
    return "ledger-req-1", tmp_path / "deletions.json"


async def test_export_writes_every_notice_owner_only_with_no_identifier_value(people_cli, tmp_path):
    request_id, ledger = await deleted_person(people_cli, tmp_path)
    result = await people_cli.run("privacy", "ledger", "export", "--out", str(ledger))
    assert result.exit_code == 0, result.output
    assert f"exported 1 deletion notices (PRIVACY sequences 1 to 1) to {ledger}" in result.output, result.output

    assert stat.S_IMODE(os.stat(ledger).st_mode) == 0o600
    raw = ledger.read_bytes()
    for value in (USER, EMAIL, EMAIL.lower(), ANON):
        assert value.encode() not in raw, value
        assert base64.b64encode(value.encode()) not in raw, value
    document = json.loads(raw)
    assert document["count"] == 1 and document["checksum"].startswith("sha256:")
    (entry,) = document["notices"]
    assert (entry["seq"], entry["subject"], entry["request_id"]) == (1, "privacy.deleted", request_id)
    assert entry["headers"]["Nats-Msg-Id"] == f"privacy:{request_id}"
    notice = privacy_pb2.PrivacyDeleted.FromString(base64.b64decode(entry["data"]))
    assert notice.request_id == request_id and notice.suppress and len(notice.identifier_hashes) >= 2
    # The identifiers as keyed hashes only, not plain digests a list of values could be tested against.
    plain = {
        hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()
        for kind, value in (("user_id", USER), ("anonymous_id", ANON))
    }
    assert not plain & set(notice.identifier_hashes)

    # --since: only what was stored from then on.
    later = await people_cli.run(
        "privacy", "ledger", "export", "--out", str(tmp_path / "none.json"), "--since", "2999-01-01T00:00:00Z"
    )
    assert later.exit_code == 0 and "exported 0 deletion notices" in later.output, later.output

    # Never written through a symbolic link (one planted where the ledger goes would point it elsewhere).
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    refused = await people_cli.run("privacy", "ledger", "export", "--out", str(link))
    assert refused.exit_code == 1 and "is a symbolic link" in refused.output, refused.output
    assert target.read_text() == "keep"


async def test_replay_publishes_what_privacy_lacks_as_stored_once(people_cli, tmp_path, restored_nats):
    request_id, ledger = await deleted_person(people_cli, tmp_path)
    assert (await people_cli.run("privacy", "ledger", "export", "--out", str(ledger))).exit_code == 0
    (original,) = await privacy_messages(people_cli.nats_url)

    dry = await people_cli.run("privacy", "ledger", "replay", str(ledger), "--dry-run", "--nats", restored_nats)
    assert dry.exit_code == 0, dry.output
    assert (
        "1 deletion notices; PRIVACY holds 0, lacks 1" in dry.output and "would publish 1: ledger-req-1" in dry.output
    )
    assert await privacy_messages(restored_nats) == []

    done = await people_cli.run("privacy", "ledger", "replay", str(ledger), "--nats", restored_nats)
    assert done.exit_code == 0, done.output
    assert "published 1: ledger-req-1" in done.output, done.output
    assert (
        "restart every service with a store: profile, identity, scoring, segmentation, orchestration, crm"
        in done.output
    )
    (replayed,) = await privacy_messages(restored_nats)
    assert (replayed.subject, replayed.data) == (original.subject, original.data)
    assert replayed.headers["Nats-Msg-Id"] == original.headers["Nats-Msg-Id"] == f"privacy:{request_id}"

    # Idempotent: read from the stream, not left to its duplicate window.
    again = await people_cli.run("privacy", "ledger", "replay", str(ledger), "--nats", restored_nats)
    assert again.exit_code == 0 and "PRIVACY holds 1, lacks 0" in again.output and "published 0" in again.output
    assert len(await privacy_messages(restored_nats)) == 1

    # On the platform the notice came from, nothing is missing either.
    same = await people_cli.run("privacy", "ledger", "replay", str(ledger))
    assert same.exit_code == 0 and "published 0" in same.output, same.output


async def test_replay_leaves_out_a_notice_an_operator_removed_to_lift_a_suppression(people_cli, tmp_path):
    import nats

    _, ledger = await deleted_person(people_cli, tmp_path)
    assert (await people_cli.run("privacy", "ledger", "export", "--out", str(ledger))).exit_code == 0
    nc = await nats.connect(people_cli.nats_url)
    try:
        await nc.jetstream().delete_msg("PRIVACY", 1)  # privacy.md: purging a notice lifts its suppression
    finally:
        await nc.close()
    result = await people_cli.run("privacy", "ledger", "replay", str(ledger))
    assert result.exit_code == 0, result.output
    assert "left out 1 that an operator removed from PRIVACY" in result.output and "published 0" in result.output
    assert await privacy_messages(people_cli.nats_url) == []
    # --include-purged publishes it with its original message id, which JetStream drops as a duplicate
    # while its window (ten minutes) remembers the id: said, never reported as published.
    forced = await people_cli.run("privacy", "ledger", "replay", str(ledger), "--include-purged")
    assert forced.exit_code == 1, forced.output
    assert "PRIVACY did not store 1 of the 1 missing notices (requests ledger-req-1)" in forced.output, forced.output
    assert await privacy_messages(people_cli.nats_url) == []


async def test_replay_refuses_a_file_whose_checksum_does_not_match(bus_cli, tmp_path):
    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(privacy_stream())
        notice = privacy_pb2.PrivacyDeleted(request_id="r-1", person_id="p_1", suppress=True)
        await bus.js.publish("privacy.deleted", notice.SerializeToString(), headers={"Nats-Msg-Id": "privacy:r-1"})
    ledger = tmp_path / "deletions.json"
    assert (await bus_cli.run("privacy", "ledger", "export", "--out", str(ledger))).exit_code == 0
    document = json.loads(ledger.read_text())
    document["notices"][0]["data"] = base64.b64encode(
        privacy_pb2.PrivacyDeleted(request_id="r-1", person_id="p_other", suppress=True).SerializeToString()
    ).decode()
    ledger.write_text(json.dumps(document))
    result = await bus_cli.run("privacy", "ledger", "replay", str(ledger))
    assert result.exit_code == 1, result.output
    assert f"{ledger}: its checksum does not match" in result.output, result.output
    not_one = tmp_path / "other.json"
    not_one.write_text("{}")
    result = await bus_cli.run("privacy", "ledger", "replay", str(not_one))
    assert result.exit_code == 1 and f"{not_one} is not a deletion ledger" in result.output, result.output
