"""Through the real collector, identity and profile on a real nats-server: what a browser's public write key
may do to a person identity already knows.

A client source with an identity_secret (`web`): an anonymous visitor who sends another person's email
(the security trial's hijack) or user id is not attached to that person; what it sends lands on its own
anonymous person. A call whose context.userHash verifies its user id links as a server's; a wrong hash
does not. CRM id types from any client source (`web`, and `open`, one without a secret) are left out.
A server source (`app`), and an event stored before the collector stamped its trust, link as before."""

from __future__ import annotations

import hashlib
import hmac

import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_collector.domain import partition_key
from cdp_kit.bus import Partitioner, subjects
from cdp_testing.edge_platform import EdgePlatform, edge_platform

SECRET = "s3cret-identity-verification-key"
KEYS = {"app": "wk-app-server-01", "web": "wk-web-client-01", "open": "wk-web-open-0001"}
SOURCES = [
    {"id": "app", "write_key": KEYS["app"]},
    {"id": "web", "write_key": KEYS["web"], "kind": "client", "identity_secret": SECRET},
    {"id": "open", "write_key": KEYS["open"], "kind": "client"},
]


def user_hash(user_id: str) -> str:
    """What the app's server computes for its browser (Intercom's identity verification)."""
    return hmac.new(SECRET.encode(), user_id.encode(), hashlib.sha256).hexdigest()


class Platform:
    """The edge platform, with the sources' keys by source id."""

    def __init__(self, edge: EdgePlatform) -> None:
        self.edge = edge
        self.nats_url = edge.nats_url
        self.lookup, self.profile_of = edge.lookup, edge.profile_of

    async def send(self, source: str, kind: str, body: dict) -> None:
        await self.edge.send(KEYS[source], kind, body)


@pytest.fixture
async def platform(nats_server, tmp_path):
    async with edge_platform(nats_server.url, tmp_path, SOURCES) as edge:
        yield Platform(edge)


def _traits(profile) -> dict:
    return {name: trait.value.string_value for name, trait in profile.traits.items()}


async def _ada(platform) -> profile_pb2.Profile:
    """ada, known from the app's back end: her email, her webhook, Marketing refused."""
    await platform.send(
        "app",
        "identify",
        {
            "userId": "ada",
            "traits": {"email": "ada@example.com", "webhook_url": "https://ada.example/hook", "note": "VICTIM"},
            "context": {"consent": {"categoryPreferences": {"Marketing": False}}},
        },
    )
    return await platform.profile_of("user_id", "ada", 1)


async def test_a_visitor_sending_a_known_email_does_not_take_over_its_person(platform):
    ada = await _ada(platform)
    await platform.send(
        "web",
        "identify",
        {
            "anonymousId": "evil-anon-1",
            "traits": {"email": "ada@example.com", "webhook_url": "http://attacker.example/steal"},
            "context": {"consent": {"categoryPreferences": {"Marketing": True}}},
        },
    )
    await platform.send("web", "track", {"anonymousId": "evil-anon-1", "event": "Sec Poke"})
    await platform.send("web", "identify", {"anonymousId": "evil-anon-1", "traits": {"email": "mallory@evil.example"}})

    evil = await platform.profile_of("anonymous_id", "evil-anon-1", 3)
    assert evil.person_id != ada.person_id
    assert sorted(evil.identifiers) == ["anonymous_id:evil-anon-1", "email:mallory@evil.example"]
    assert _traits(evil)["webhook_url"] == "http://attacker.example/steal", "its traits are its own person's"
    assert evil.consent["purpose:Marketing"].granted

    after = await platform.lookup("user_id", "ada")
    assert after.person_id == ada.person_id and after.event_count == 1
    assert sorted(after.identifiers) == ["email:ada@example.com", "user_id:ada"]
    assert _traits(after) == {"email": "ada@example.com", "webhook_url": "https://ada.example/hook", "note": "VICTIM"}
    assert not after.consent["purpose:Marketing"].granted
    assert (await platform.lookup("email", "ada@example.com")).person_id == ada.person_id


async def test_a_visitor_sending_a_known_user_id_without_its_hash_is_not_linked(platform):
    ada = await _ada(platform)
    await platform.send("web", "identify", {"userId": "ada", "anonymousId": "evil-anon-2", "traits": {"x": "1"}})
    await platform.send(
        "web", "identify", {"userId": "ada", "anonymousId": "evil-anon-3", "context": {"userHash": "ab" * 32}}
    )
    for anonymous in ("evil-anon-2", "evil-anon-3"):
        evil = await platform.profile_of("anonymous_id", anonymous, 1)
        assert evil.person_id != ada.person_id
        assert list(evil.identifiers) == [f"anonymous_id:{anonymous}"]
    after = await platform.lookup("user_id", "ada")
    assert after.event_count == 1 and "x" not in after.traits


async def test_a_verified_sign_in_links_the_browser_to_its_user(platform):
    ada = await _ada(platform)
    await platform.send("web", "track", {"anonymousId": "ada-browser", "event": "Viewed"})
    await platform.send(
        "web",
        "identify",
        {
            "userId": "ada",
            "anonymousId": "ada-browser",
            "traits": {"email": "ada@example.com", "plan": "pro"},
            "context": {"userHash": user_hash("ada")},
        },
    )
    after = await platform.profile_of("user_id", "ada", 3)
    assert after.person_id == ada.person_id
    assert sorted(after.identifiers) == ["anonymous_id:ada-browser", "email:ada@example.com", "user_id:ada"]
    assert _traits(after)["plan"] == "pro"
    # Once linked, the browser's own events are hers without a hash: the anonymous id is her person's, and
    # her own email on it is no claim on another person.
    await platform.send(
        "web", "identify", {"anonymousId": "ada-browser", "traits": {"theme": "dark", "email": "ada@example.com"}}
    )
    after = await platform.profile_of("user_id", "ada", 4)
    assert _traits(after)["theme"] == "dark"
    assert sorted(after.identifiers) == ["anonymous_id:ada-browser", "email:ada@example.com", "user_id:ada"]


async def test_an_unverified_alias_from_a_known_user_id_is_not_linked(platform):
    ada = await _ada(platform)
    await platform.send("web", "alias", {"previousId": "ada", "userId": "evil-user", "anonymousId": "evil-anon-4"})
    evil = await platform.profile_of("user_id", "evil-user", 1)
    assert evil.person_id != ada.person_id
    assert sorted(evil.identifiers) == ["anonymous_id:evil-anon-4", "user_id:evil-user"]
    assert (await platform.lookup("user_id", "ada")).event_count == 1


async def test_crm_ids_from_a_browser_are_left_out(platform):
    await platform.send(
        "app", "identify", {"userId": "vic2", "traits": {"salesforce_id": "SF-0001", "hubspot_id": "HS-0001"}}
    )
    vic = await platform.profile_of("user_id", "vic2", 1)
    external = [{"id": "SF-0001", "type": "salesforce_id", "collection": "users", "encoding": "none"}]
    for source in ("web", "open"):
        await platform.send(
            source, "track", {"anonymousId": f"crm-{source}-1", "event": "E", "context": {"externalIds": external}}
        )
        await platform.send(source, "identify", {"anonymousId": f"crm-{source}-2", "traits": {"hubspot_id": "HS-0001"}})
    for source in ("web", "open"):
        for n in (1, 2):
            evil = await platform.profile_of("anonymous_id", f"crm-{source}-{n}", 1)
            assert evil.person_id != vic.person_id
            assert list(evil.identifiers) == [f"anonymous_id:crm-{source}-{n}"]
    after = await platform.lookup("user_id", "vic2")
    assert after.event_count == 1
    assert sorted(after.identifiers) == ["hubspot_id:HS-0001", "salesforce_id:SF-0001", "user_id:vic2"]


async def test_a_client_source_without_a_secret_links_sign_ins_as_segment_does(platform):
    ada = await _ada(platform)
    await platform.send("open", "track", {"anonymousId": "open-browser", "event": "Viewed"})
    await platform.send("open", "identify", {"userId": "ada", "anonymousId": "open-browser"})
    after = await platform.profile_of("anonymous_id", "open-browser", 3)
    assert after.person_id == ada.person_id


async def test_a_server_source_links_a_known_email_as_before(platform):
    ada = await _ada(platform)
    await platform.send("app", "identify", {"anonymousId": "server-anon", "traits": {"email": "ada@example.com"}})
    after = await platform.profile_of("anonymous_id", "server-anon", 2)
    assert after.person_id == ada.person_id


async def test_an_event_stored_without_a_trust_resolves_as_before(platform):
    """A message from before the collector stamped source_trust reads SERVER: it links as it did."""
    ada = await _ada(platform)
    event = events_pb2.Event(message_id="old-1", type=events_pb2.EVENT_TYPE_IDENTIFY, anonymous_id="old-anon")
    event.traits.update({"email": "ada@example.com"})
    event.source_id = "web"
    event.received_at.GetCurrentTime()
    event.timestamp.GetCurrentTime()
    assert not event.HasField("context") and b"\xa0\x01" not in event.SerializeToString()
    nc = await nats.connect(platform.nats_url)
    try:
        subject = subjects.events_raw(Partitioner(2)(partition_key(event)))
        await nc.jetstream().publish(subject, event.SerializeToString(), headers={"Nats-Msg-Id": "web:old-1"})
    finally:
        await nc.close()
    after = await platform.profile_of("anonymous_id", "old-anon", 2)
    assert after.person_id == ada.person_id
