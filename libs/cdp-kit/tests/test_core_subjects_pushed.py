"""A core subject's receivers take only what was published on it (`subjects.published_on`).

identity may not publish on segmentation.segments.changed, yet a push consumer of its own on PRIVACY with
that deliver subject made nats-server publish PRIVACY's messages there for it: the permission to create a
consumer does not look at the deliver subject in the request's body. What arrives that way keeps its
stream subject, which is how a receiver tells it from a publish. Real nats-server, the platform's users."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from cdp_kit.bus import subjects
from cdp_kit.natsauth import ROLES, authorization_config, new_password
from cdp_kit.natsserver import NatsServer
from cdp_kit.provision import as_operator
from cdp_testing.waiting import eventually


@pytest.fixture
def server(tmp_path):
    passwords = {name: new_password() for name in ROLES}
    operator = new_password()
    nats_server = NatsServer(
        store_dir=tmp_path / "nats", config=authorization_config(passwords, operator_password=operator)
    )
    with nats_server:
        asyncio.run(as_operator(nats_server.url, operator))
        yield nats_server, passwords, operator


def as_user(url: str, user: str, password: str) -> str:
    return url.replace("nats://", f"nats://{user}:{password}@")


async def test_a_message_pushed_onto_a_core_subject_by_another_users_consumer_is_told_from_a_publish(server):
    nats_server, passwords, operator = server
    op = await nats.connect(as_user(nats_server.url, "cdpctl", operator))
    await op.jetstream().publish(subjects.PRIVACY_DELETED, b'{"person_id": "p_x"}')
    segmentation = await nats.connect(
        as_user(nats_server.url, "segmentation", passwords["segmentation"]), inbox_prefix=b"_INBOX.segmentation"
    )
    identity = await nats.connect(
        as_user(nats_server.url, "identity", passwords["identity"]), inbox_prefix=b"_INBOX.identity"
    )
    got: list = []

    async def received(msg):
        got.append(msg)

    try:
        await segmentation.subscribe(subjects.SEGMENTATION_SEGMENTS_CHANGED, cb=received)
        await segmentation.flush()
        name = "identity-privacy-0"
        config = {"durable_name": name, "deliver_subject": subjects.SEGMENTATION_SEGMENTS_CHANGED, "ack_policy": "none"}
        await identity.request(
            f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.PRIVACY}.{name}",
            json.dumps({"stream_name": subjects.PRIVACY, "config": config}).encode(),
            timeout=5,
        )
        [pushed] = await eventually(lambda: got, 10)  # nats-server delivers it (what permissions allow)
        assert not subjects.published_on(pushed, subjects.SEGMENTATION_SEGMENTS_CHANGED)
        got.clear()
        await segmentation.publish(subjects.SEGMENTATION_SEGMENTS_CHANGED, b"vip")  # segmentation's own
        [published] = await eventually(lambda: got, 10)
        assert subjects.published_on(published, subjects.SEGMENTATION_SEGMENTS_CHANGED)
    finally:
        for client in (identity, segmentation, op):
            await client.close()
