"""Defects found by trying the platform as a customer, an operator and an attacker would (session 42).

Each test holds what someone relies on, and its docstring says what happened before its fix. The services
run in-process on a real nats-server (the `chain` fixture: collector, identity and profile)."""

from __future__ import annotations


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
