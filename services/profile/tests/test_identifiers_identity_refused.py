"""Through the real collector, identity and profile on a real nats-server: a profile lists exactly the
identifiers identity resolves to its person. One identity refused on an event (an alias's previous user
id, an email another user holds) is not listed on the person the event went to, and so is not in the
suppression a deletion of that person publishes; everything identity attached is listed."""

from __future__ import annotations

import base64
import functools
import json

import aiohttp
import grpc
import nats
import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_kit.service import serving
from cdp_testing.waiting import eventually

WRITE_KEY = "wk-web-0001"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}


class Platform:
    def __init__(self, collector_url: str, profiles: profile_pb2_grpc.ProfileServiceStub, nats_url: str) -> None:
        self.collector_url = collector_url
        self.profiles = profiles
        self.nats_url = nats_url

    async def send(self, kind: str, body: dict) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.collector_url}/v1/{kind}", json=body, headers=AUTH) as r,
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
    sources.write_text(json.dumps({"sources": [{"id": "web", "write_key": WRITE_KEY}]}))
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


async def test_an_alias_from_a_known_user_id_leaves_the_old_user_id_on_its_own_person(platform):
    await platform.send("track", {"userId": "old-r6", "event": "Bought", "properties": {"total": 1}})
    old = await platform.profile_of("user_id", "old-r6", 1)
    await platform.send("alias", {"previousId": "old-r6", "userId": "new-r6"})
    await platform.send("track", {"userId": "new-r6", "event": "Bought", "properties": {"total": 2}})
    new = await platform.profile_of("user_id", "new-r6", 2)
    assert new.person_id != old.person_id, "one user id per person: the old history stays apart"
    assert sorted(new.identifiers) == ["user_id:new-r6"], "identity refused old-r6 for the new person"
    again = await platform.lookup("user_id", "old-r6")
    assert again.person_id == old.person_id and sorted(again.identifiers) == ["user_id:old-r6"]


async def test_an_email_another_user_holds_is_listed_on_its_holder_only(platform):
    await platform.send("identify", {"userId": "ada", "traits": {"email": "shared@example.com"}})
    ada = await platform.profile_of("user_id", "ada", 1)
    await platform.send("identify", {"userId": "bob", "traits": {"email": "shared@example.com"}})
    bob = await platform.profile_of("user_id", "bob", 1)
    assert bob.person_id != ada.person_id
    assert sorted(bob.identifiers) == ["user_id:bob"], "identity left the email out of bob's linking"
    assert sorted(ada.identifiers) == ["email:shared@example.com", "user_id:ada"]
    assert (await platform.lookup("email", "shared@example.com")).person_id == ada.person_id

    # Deleting bob with suppression names bob's own identifiers only: ada's email is not suppressed.
    nc = await nats.connect(platform.nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe("privacy.deleted", ordered_consumer=True)
        deleted = await platform.profiles.Delete(
            profile_pb2.DeleteRequest(person_id=bob.person_id, mode=profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE)
        )
        assert deleted.identifiers == 1
        notice = privacy_pb2.PrivacyDeleted.FromString((await sub.next_msg(timeout=30)).data)
    finally:
        await nc.close()
    key = IdentifierHashKeys.for_development().current
    assert notice.person_id == bob.person_id and notice.suppress
    assert sorted(notice.identifier_hashes) == [key.hash("user_id:bob")]


async def test_every_identifier_identity_attached_is_listed(platform):
    """Two devices' anonymous histories and the sign-ins that join them: one person, all of it listed."""
    await platform.send("track", {"anonymousId": "phone-r6", "event": "Viewed"})
    await platform.send("track", {"anonymousId": "laptop-r6", "event": "Viewed"})
    await platform.send("identify", {"userId": "u-r6", "anonymousId": "phone-r6", "traits": {"email": "u@example.com"}})
    await platform.send("identify", {"userId": "u-r6", "anonymousId": "laptop-r6"})
    person = await platform.profile_of("user_id", "u-r6", 4)
    assert sorted(person.identifiers) == [
        "anonymous_id:laptop-r6",
        "anonymous_id:phone-r6",
        "email:u@example.com",
        "user_id:u-r6",
    ]
    for kind, value in (("anonymous_id", "phone-r6"), ("anonymous_id", "laptop-r6"), ("email", "u@example.com")):
        assert (await platform.lookup(kind, value)).person_id == person.person_id


_eventually = functools.partial(eventually, timeout=30.0, every=0.1)
