"""CDP_NATS_STREAM_REPLICAS: the provisioner makes every stream with that many copies, so a clustered
nats-server that loses a node loses no stream (PRIVACY's notices are kept for ever) - against a real
three-node JetStream cluster; a bad value is refused naming the variable; a single server refuses copies
it cannot keep, naming the stream."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js.errors import APIError

from cdp_kit.bus import subjects
from cdp_kit.natsserver import NatsServer, free_port
from cdp_kit.provision import provision, stream_replicas
from cdp_kit.streamtable import STREAMS


def test_the_setting_is_read_and_a_bad_value_named():
    assert stream_replicas({}) == 1 and stream_replicas({"CDP_NATS_STREAM_REPLICAS": " 3 "}) == 3
    for bad in ("0", "6", "three", "2.5"):
        with pytest.raises(ValueError, match="CDP_NATS_STREAM_REPLICAS"):
            stream_replicas({"CDP_NATS_STREAM_REPLICAS": bad})


async def test_a_single_server_refuses_copies_it_cannot_keep(nats_client):
    with pytest.raises(APIError) as refused:
        await provision(nats_client.jetstream(), {"CDP_NATS_STREAM_REPLICAS": "3"})
    assert "replicas" in str(refused.value).lower()


@pytest.fixture
def cluster(tmp_path):
    routes = [free_port() for _ in range(3)]
    servers = []
    for i in range(3):
        others = ", ".join(f"nats-route://127.0.0.1:{port}" for j, port in enumerate(routes) if j != i)
        server = NatsServer(store_dir=tmp_path / f"n{i}")
        server.config = (
            f"server_name: n{i}\ncluster {{ name: cdp, listen: 127.0.0.1:{routes[i]}, routes: [{others}] }}\n"
        )
        servers.append(server)
    for server in servers:
        server.start()
    try:
        yield servers
    finally:
        for server in servers:
            server.close()


async def until_provisioned(js, environ) -> None:
    """The cluster elects its JetStream meta leader a moment after the nodes meet: until then, no API."""
    for _ in range(300):
        try:
            await provision(js, environ)
            return
        except nats.errors.Error:  # APIError, timeouts, no responders: JetStream not ready yet
            await asyncio.sleep(0.1)
    await provision(js, environ)


@pytest.mark.timeout(120)
async def test_every_stream_is_kept_on_three_nodes_and_survives_one_lost(cluster):
    nc = await nats.connect([s.url for s in cluster])
    try:
        js = nc.jetstream(timeout=10)
        await until_provisioned(js, {"CDP_NATS_STREAM_REPLICAS": "3", "CDP_PARTITIONS": "2"})
        for entry in STREAMS:
            info = await js.stream_info(entry.name)
            assert info.config.num_replicas == 3, entry.name
            assert len(info.cluster.replicas or []) == 2, entry.name  # the leader and two more copies
        leader = (await js.stream_info(subjects.PRIVACY)).cluster.leader
        lost = next(server for i, server in enumerate(cluster) if f"n{i}" == leader)
        await js.publish(subjects.PRIVACY_DELETED, b"before", stream=subjects.PRIVACY)
        lost.stop()  # the node leading PRIVACY: the two left elect another and keep every message
        for _ in range(300):
            try:
                await js.publish(subjects.PRIVACY_DELETED, b"after", stream=subjects.PRIVACY, timeout=2)
                break
            except nats.errors.Error:  # while the two left elect a leader: no responders, no stream response
                await asyncio.sleep(0.1)
        assert (await js.stream_info(subjects.PRIVACY)).state.messages == 2
    finally:
        await nc.close()
