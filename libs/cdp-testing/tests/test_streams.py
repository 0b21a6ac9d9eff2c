"""`stream_messages` returns what `get_msg` sequence by sequence would: every stored message, in order,
gaps skipped."""

from __future__ import annotations

from cdp_testing.streams import stream_messages


async def test_every_stored_message_in_stream_order_with_gaps_skipped(nats_client):
    js = nats_client.jetstream()
    await js.add_stream(name="READ", subjects=["read.>"])
    assert await stream_messages(js, "READ") == []
    for i in range(2500):  # more than one fetch
        await js.publish(f"read.{i % 3}", str(i).encode(), headers={"n": str(i)} if i == 7 else None)
    await js.delete_msg("READ", 11)  # a gap
    messages = await stream_messages(js, "READ")
    expected = [str(i).encode() for i in range(2500) if i != 10]
    assert [m.data for m in messages] == expected
    assert messages[7].headers == {"n": "7"}
    # Read again after more arrive: the consumer of the first read is gone, the new one starts at the start.
    await js.publish("read.0", b"later")
    assert [m.data for m in await stream_messages(js, "READ")] == [*expected, b"later"]
    assert (await js.stream_info("READ")).state.consumer_count == 0
