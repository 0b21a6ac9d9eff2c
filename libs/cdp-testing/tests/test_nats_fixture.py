async def test_real_nats_server_with_jetstream(nats_client):
    js = nats_client.jetstream()
    await js.add_stream(name="T", subjects=["t.>"])
    ack = await js.publish("t.one", b"x")
    assert ack.stream == "T" and ack.seq == 1
