"""Through the real collector, identity and profile on a real nats-server: a profile lists exactly the
identifiers identity resolves to its person. One identity refused on an event (an alias's previous user
id, an email another user holds) is not listed on the person the event went to, and so is not in the
suppression a deletion of that person publishes; everything identity attached is listed."""

from __future__ import annotations

import nats
import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_testing.edge_platform import EdgePlatform, edge_platform

WRITE_KEY = "wk-web-0001"


class Platform:
    """The edge platform, sending with the one source's key."""

    def __init__(self, edge: EdgePlatform) -> None:
        self.profiles, self.nats_url = edge.profiles, edge.nats_url
        self.lookup, self.profile_of = edge.lookup, edge.profile_of
        self._edge = edge

    async def send(self, kind: str, body: dict) -> None:
        await self._edge.send(WRITE_KEY, kind, body)


@pytest.fixture
async def platform(nats_server, tmp_path):
    async with edge_platform(nats_server.url, tmp_path, [{"id": "web", "write_key": WRITE_KEY}]) as edge:
        yield Platform(edge)


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
