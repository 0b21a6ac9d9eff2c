"""Through the real collector, identity and profile on a real nats-server: what a browser's public write key
may do to a person identity already knows.

A client source with an identity_secret (`web`): an anonymous visitor who sends another person's email
(the security trial's hijack) or user id is not attached to that person; what it sends lands on its own
anonymous person. A call whose context.userHash verifies its user id links as a server's; a wrong hash
does not. CRM id types from any client source (`web`, and `open`, one without a secret) are left out.
A server source (`app`), and an event stored before the collector stamped its trust, link as before."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json

import aiohttp
import grpc
import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_collector.domain import partition_key
from cdp_kit.bus import Partitioner, subjects
from cdp_kit.service import serving
from cdp_testing.waiting import eventually

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
    def __init__(self, collector_url: str, profiles: profile_pb2_grpc.ProfileServiceStub, nats_url: str) -> None:
        self.collector_url = collector_url
        self.profiles = profiles
        self.nats_url = nats_url

    async def send(self, source: str, kind: str, body: dict) -> None:
        auth = {"Authorization": "Basic " + base64.b64encode(f"{KEYS[source]}:".encode()).decode()}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.collector_url}/v1/{kind}", json=body, headers=auth) as r,
        ):
            assert r.status == 200, await r.text()

    async def lookup(self, kind: str, value: str):
        try:
            return await self.profiles.LookupProfile(
                profile_pb2.LookupProfileRequest(identifier_type=kind, identifier_value=value)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def profile_of(self, kind: str, value: str, events: int):
        """The profile identity resolves the identifier to, once it has applied `events` events."""

        async def read():
            found = await self.lookup(kind, value)
            return found if found is not None and found.event_count >= events else None

        return await _eventually(read)


@pytest.fixture
async def platform(nats_server, tmp_path):
    from cdp_collector.__main__ import setup as collector_setup
    from cdp_collector.settings import CollectorSettings
    from cdp_identity.__main__ import setup as identity_setup
    from cdp_identity.settings import IdentitySettings
    from cdp_profile.__main__ import setup as profile_setup
    from cdp_profile.settings import ProfileSettings

    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"sources": SOURCES}))
    common = dict(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2, shutdown_grace=1.0
    )
    collector = CollectorSettings(**common, sources_file=sources, http_host="127.0.0.1", http_port=0)
    identity = IdentitySettings(**common, store_url=f"sqlite:///{tmp_path / 'identity.db'}", batch_size=100)
    async with serving(collector, collector_setup) as c, serving(identity, identity_setup) as i:
        profile = ProfileSettings(
            **common, store_url=f"sqlite:///{tmp_path / 'profile.db'}", identity_address=f"127.0.0.1:{i.grpc.port}"
        )
        async with serving(profile, profile_setup) as p, grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc.port}") as ch:
            yield Platform(
                f"http://127.0.0.1:{c.ports['http']}", profile_pb2_grpc.ProfileServiceStub(ch), nats_server.url
            )


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


_eventually = functools.partial(eventually, timeout=30.0, every=0.1)
