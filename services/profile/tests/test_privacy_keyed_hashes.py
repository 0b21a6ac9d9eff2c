"""A deletion notice names a suppressed person's identifiers by keyed hashes: PRIVACY keeps it for ever, and
anyone who reads it (or a store file, or a backup) must not be able to test a list of emails or user ids
against it. Without the key the hashes match nothing; with it the collector drops the person's events; the
person's export is not changed by it."""

from __future__ import annotations

import hashlib
import hmac
import time

import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp_collector.domain import SuppressionList
from cdp_collector.domain.suppression import UnknownHashKey
from cdp_kit.identifier_hash import IdentifierHashKeys

KEY = "platform-identifier-hash-key-0123456789"
IDENTIFIERS = ["user_id:u-gone", "email:gone@example.com", "phone:+4915112345678"]


def resolved(message_id: str, person: str, identifiers: list[str]) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="E")
    event.timestamp.FromNanoseconds(int(time.time() * 1e9))
    event.received_at.CopyFrom(event.timestamp)
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=identifiers)


@pytest.fixture
async def engine(running_engine):
    """A profile engine whose deletions hash with KEY, fed by events.resolved.0."""
    async with running_engine("memory://", hash_key=KEY, name="keyed-hashes") as engine:
        yield engine


async def notices(nats_url: str) -> dict[str, privacy_pb2.PrivacyDeleted]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("PRIVACY")
        found = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            notice = privacy_pb2.PrivacyDeleted.FromString((await js.get_msg("PRIVACY", seq)).data)
            found[notice.request_id] = notice
        return found
    finally:
        await nc.close()


def track(user_id: str) -> events_pb2.Event:
    return events_pb2.Event(message_id="m-1", type=events_pb2.EVENT_TYPE_TRACK, user_id=user_id, event="E")


async def test_a_suppressed_persons_notice_carries_keyed_hashes_never_the_plain_sha256(engine, nats_server):
    await engine.feed(resolved("e-1", "p-gone", IDENTIFIERS))
    result = await engine.delete("p-gone", suppress=True, request_id="r-1")
    notice = (await notices(nats_server.url))["r-1"]
    assert result["identifiers"] == 3 and notice.suppress
    hashes = set(notice.identifier_hashes)
    assert hashes == {hmac.new(KEY.encode(), k.encode(), hashlib.sha256).hexdigest() for k in IDENTIFIERS}
    # A dictionary attack on the notice: the plain hash of a guessed identifier is not in it.
    assert not hashes & {hashlib.sha256(k.encode()).hexdigest() for k in IDENTIFIERS}
    assert notice.identifier_hash_key_id == IdentifierHashKeys.of(KEY).current.id
    assert KEY not in notice.SerializeToString().decode("latin-1")


async def test_the_collector_holding_the_key_drops_the_persons_events_and_one_with_another_key_cannot(
    engine, nats_server
):
    await engine.feed(resolved("e-1", "p-gone", IDENTIFIERS))
    await engine.delete("p-gone", suppress=True, request_id="r-1")
    notice = (await notices(nats_server.url))["r-1"]
    collector = SuppressionList(IdentifierHashKeys.of(KEY))
    collector.add(notice.identifier_hashes, key_id=notice.identifier_hash_key_id)
    assert collector.match(track("u-gone")) == "user_id" and collector.match(track("u-other")) is None
    stranger = SuppressionList(IdentifierHashKeys.of("another-deployments-key-0123456789"))
    with pytest.raises(UnknownHashKey):
        stranger.add(notice.identifier_hashes, key_id=notice.identifier_hash_key_id)
    assert stranger.match(track("u-gone")) is None


async def test_a_plain_deletion_carries_neither_hashes_nor_a_key_id(engine, nats_server):
    await engine.feed(resolved("e-1", "p-gone", IDENTIFIERS))
    await engine.delete("p-gone", suppress=False, request_id="r-1")
    notice = (await notices(nats_server.url))["r-1"]
    assert list(notice.identifier_hashes) == [] and notice.identifier_hash_key_id == ""


async def test_the_persons_export_still_gives_their_identifiers_as_they_are(engine):
    await engine.feed(resolved("e-1", "p-1", IDENTIFIERS))
    person, document = await engine.privacy.export("p-1")
    assert person == "p-1"
    assert set(IDENTIFIERS) <= set(map(str, document["identifiers"]))


def test_a_bad_key_file_stops_profile_at_start_naming_the_variable(tmp_path):
    from cdp_kit.settings import SettingsError, load_settings
    from cdp_profile.settings import ProfileSettings

    (tmp_path / "key").write_text("too-short\n")
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}
    with pytest.raises(SettingsError) as caught:
        load_settings(ProfileSettings, environ={**environ, "CDP_PRIVACY_HASH_KEY_FILE": str(tmp_path / "key")})
    (problem,) = caught.value.problems
    assert problem.startswith("CDP_PRIVACY_HASH_KEY_FILE=") and "line 1 has 9 characters" in problem
    (tmp_path / "key").write_text(KEY + "\n")
    settings = load_settings(ProfileSettings, environ={**environ, "CDP_PRIVACY_HASH_KEY_FILE": str(tmp_path / "key")})
    assert settings.identifier_hash_keys() == IdentifierHashKeys.of(KEY)


async def test_a_suppression_leaves_out_the_browser_and_device_ids_other_people_share(engine, nats_server):
    """A privacy trial deleted one of five people who had used one kiosk (its device id quarantined by
    identity) with --suppress: the other four's events from the kiosk were dropped at the edge from then on,
    and so was a visitor whose browser id identity had linked to the deleted person through that device."""
    shared = ["anonymous_id:a-kiosk-visit", "device_id:kiosk-7"]
    await engine.feed(resolved("e-1", "p-gone", [*IDENTIFIERS, *shared]))
    result = await engine.delete("p-gone", suppress=True, request_id="r-1")
    notice = (await notices(nats_server.url))["r-1"]
    assert result["identifiers"] == 5  # the deletion reaches every one of them
    key = IdentifierHashKeys.of(KEY).current
    assert set(notice.identifier_hashes) == {key.hash(k) for k in IDENTIFIERS}
    collector = SuppressionList(IdentifierHashKeys.of(KEY))
    collector.add(notice.identifier_hashes, key_id=notice.identifier_hash_key_id)
    other = events_pb2.Event(message_id="m-2", type=events_pb2.EVENT_TYPE_TRACK, user_id="u-other", event="E")
    other.anonymous_id = "a-kiosk-visit"
    other.context.device.id = "kiosk-7"
    assert collector.match(other) is None
    assert collector.match(track("u-gone")) == "user_id"
