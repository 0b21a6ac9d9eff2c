"""Defects found by trying the platform as a customer, an operator and an attacker would (session 42).

Each test holds what someone relies on, and its docstring says what happened before its fix. The services
run in-process on a real nats-server (the `chain` fixture: collector, identity and profile)."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import struct_pb2

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc


async def test_a_person_whose_trait_keeps_changing_is_kept_and_holds_up_no_one(chain):
    """A shop sends the cart as a trait of 30 KB on every identify (within the collector's 32 KB event
    limit). Each one added 30 KB of trait history to the person's record, which the store keeps up to
    8 MiB: past the 272nd, every write of the person was refused, their events failed the partition's
    batch again and again (its other persons waiting behind them) and were dead-lettered (InvalidArgument
    ops[..].doc), and the person's profile stopped at 272 events for good."""
    sent = 0
    for batch in range(22):
        events = []
        for _ in range(14):
            sent += 1
            cart = f"{sent:06d}" + "c" * 30_000
            events.append(
                {"type": "identify", "userId": "s42-cart", "messageId": f"s42-cart-{sent}", "traits": {"cart": cart}}
            )
        events.append({"type": "identify", "userId": f"s42-next-{batch}", "messageId": f"s42-next-{batch}"})
        status, answer = await chain.post(*events)
        assert status == 200, answer
    assert await chain.settled(timeout=60) is None
    found = await chain.profiles_when(["s42-cart"], lambda p: p.event_count == sent, timeout=15)
    assert found, "the person's events did not all reach the profile"
    assert found["s42-cart"].traits["cart"].value.string_value.startswith(f"{sent:06d}")
    others = await chain.profiles_when([f"s42-next-{b}" for b in range(22)], lambda p: True, timeout=15)
    assert len(others) == 22
    assert [str(letter) for letter in await chain.dead_letters()] == []


async def test_a_person_with_a_new_trait_name_on_every_identify_holds_up_no_one(chain):
    """An integration naming a trait after each order ({"order_8812": ...}, 30 KB an identify) added a
    current value per identify: past the 280th the person's record was over the store's 8 MiB and every
    later event of theirs failed the partition's batch. Now no new name is kept past the person's budget;
    every event is applied and the names already held keep changing."""
    sent = 0
    for batch in range(22):
        events = []
        for _ in range(14):
            sent += 1
            traits = {f"order_{sent}": "o" * 30_000, "orders": sent}
            events.append({"type": "identify", "userId": "s42-orders", "messageId": f"s42-o-{sent}", "traits": traits})
        events.append({"type": "identify", "userId": f"s42-beside-{batch}", "messageId": f"s42-beside-{batch}"})
        status, answer = await chain.post(*events)
        assert status == 200, answer
    assert await chain.settled(timeout=60) is None
    found = await chain.profiles_when(["s42-orders"], lambda p: p.event_count == sent, timeout=15)
    assert found, "the person's events did not all reach the profile"
    assert found["s42-orders"].traits["orders"].value.number_value == sent
    assert [str(letter) for letter in await chain.dead_letters()] == []


async def test_update_traits_too_big_for_the_store_is_refused_as_invalid_without_reloading_anything(chain, caplog):
    """A back-office or CRM write of a trait the store cannot keep (a 9 MiB note: the store keeps a profile
    document of at most 8 MiB) was answered UNAVAILABLE "profile write failed (InvalidArgument); retry", so
    a caller retried it for ever, and every attempt dropped the replica's whole cache and reloaded every
    profile it holds from the store, its partitions' events waiting meanwhile. Writes that each fit but
    together pass the store's limit failed the same way. Now both are INVALID_ARGUMENT naming the limit
    (for new names, the person's history budget, which the store's limit is well above)."""
    await chain.post({"type": "identify", "userId": "s42-notes", "traits": {"plan": "pro"}})
    person = (await chain.profiles_when(["s42-notes"], lambda p: True, timeout=15))["s42-notes"].person_id

    # The answer holds the profile: received as a caller would that writes such traits (16 MiB).
    address = f"127.0.0.1:{chain.profile_runtime.grpc.port}"
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    channel = grpc.aio.insecure_channel(address, options=options)
    profiles = profile_pb2_grpc.ProfileServiceStub(channel)

    async def update(**traits) -> str:
        struct = struct_pb2.Struct()
        struct.update(traits)
        request = profile_pb2.UpdateTraitsRequest(person_id=person, traits=struct, source="api")
        try:
            await profiles.UpdateTraits(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
            return exc.details()
        return "ok"

    caplog.set_level(logging.WARNING, logger="cdp.profile.engine")
    refused = await update(notes="n" * (9 * 1024 * 1024))
    assert "over the 1048576 bytes one UpdateTraits may set" in refused, refused
    # Under new names: kept while the person's histories are within their 2 MiB, then refused saying so.
    answers = [await update(**{f"notes_{n}": "n" * 1_000_000}) for n in range(9)]
    assert answers[:2] == ["ok", "ok"] and answers[-1] != "ok", answers
    assert all(answer == "ok" or "no new name is kept" in answer for answer in answers), answers
    assert await update(notes_0="changed " + "n" * 1_000_000) == "ok"
    assert "profile cache dropped" not in caplog.text
    try:
        profile = await profiles.GetProfile(profile_pb2.GetProfileRequest(person_id=person))
    finally:
        await channel.close()
    assert profile.traits["plan"].value.string_value == "pro"


async def test_a_person_s_event_history_pages_through_whatever_the_events_hold(chain):
    """ListEvents takes up to 1,000 events a page, and an event may hold 32 KB: 600 events of 30 KB made
    an 18 MB page, which profile built and then could not send (RESOURCE_EXHAUSTED: Sent message larger
    than max), so the person's history could not be read in pages of 1,000 at all. A page now ends early,
    with the token for the rest, once it passes 8 MiB."""
    blob = "x" * 30_000
    sent = 0
    for _batch in range(43):
        events = []
        for _ in range(14):
            sent += 1
            events.append(
                {"type": "track", "event": "Cart Viewed", "userId": "s42-pages", "messageId": f"s42-p-{sent}"}
                | {"properties": {"items": blob}}
            )
        status, answer = await chain.post(*events)
        assert status == 200, answer
    found = await chain.profiles_when(["s42-pages"], lambda p: p.event_count == sent, timeout=30)
    person = found["s42-pages"].person_id
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{chain.profile_runtime.grpc.port}", options=options) as channel:
        profiles = profile_pb2_grpc.ProfileServiceStub(channel)
        seen, token, pages = [], "", 0
        while True:
            request = profile_pb2.ListEventsRequest(person_id=person, page_size=1000, page_token=token)
            page = await profiles.ListEvents(request, timeout=30)
            pages += 1
            seen += [event.event_id for event in page.events]
            token = page.next_page_token
            if not token:
                break
    assert len(seen) == len(set(seen)) == sent and pages > 1
