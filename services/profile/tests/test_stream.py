"""Profile's partitioned inputs on the kit's engine: an upgrade from a release that kept change messages
in its checkpoints loses and replays nothing, and a malformed scores message is refused naming the field
(without quoting a value)."""

from __future__ import annotations

import math

import nats
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import Bus, OutMessage, profiles_stream
from cdp_kit.engine import Reject
from cdp_kit.storage import Put, open_store
from cdp_profile.apply import decode_scores
from cdp_profile.domain import Retention
from cdp_profile.engine import ProfileEngine
from cdp_profile.records import CHECKPOINTS, encode_checkpoint
from cdp_testing.fakes import T0, Clock, Delivery


async def test_an_upgrade_publishes_the_change_messages_an_older_checkpoint_kept_and_keeps_its_position(
    nats_server,
):
    kept = profile_pb2.ProfileChangedBatch()
    kept.changes.add(person_id="p1", cause="event")
    message = OutMessage(subject="profiles.changed.0", payload=kept.SerializeToString(), msg_id="pc_kept")
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="upgrade") as bus:
        await bus.ensure_streams(profiles_stream())
        # Written by the release before the partitioned engine: committed, never published.
        await store.bulk_write([Put(CHECKPOINTS, "events.resolved.0", encode_checkpoint(41, T0, [message]))])
        engine = ProfileEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            retention=Retention(max_events=10),
            telemetry=bus.telemetry,
            clock=Clock(T0),
        )
        await engine.start()
        await engine.stop()
        checkpoint = await store.get(CHECKPOINTS, "events.resolved.0")
    assert checkpoint.doc["stream_seq"] == 41 and "changes" not in checkpoint.doc
    nc = await nats.connect(nats_server.url)
    try:
        stored = await nc.jetstream().get_msg("PROFILES", 1)
    finally:
        await nc.close()
    assert profile_pb2.ProfileChangedBatch.FromString(stored.data).changes[0].person_id == "p1"


def scores(**fields) -> Delivery:
    message = scoring_pb2.ScoresUpdatedBatch(
        model="churn", version="1", scores=["churn"], person_ids=["p1"], values=[0.5], at_ms=[1]
    )
    for name, value in fields.items():
        message.ClearField(name)
        if isinstance(value, list):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return Delivery(message, "scores.updated.0", 1)


def test_scores_decode_by_person_and_a_malformed_message_is_refused_naming_the_field():
    [update] = decode_scores(scores(person_ids=["p1", "p2"], values=[0.5, 0.25], at_ms=[1000, 2000]))
    assert update.values == [{"churn": 0.5}, {"churn": 0.25}] and update.at == [1.0, 2.0]
    for fields, field in [
        ({"values": [0.5, 0.6]}, "values"),
        ({"values": [math.nan]}, "scores.churn"),
        ({"model": ""}, "model"),
        ({"scores": [""]}, "scores"),
    ]:
        with pytest.raises(Reject) as refused:
            decode_scores(scores(**fields))
        assert refused.value.field == field and "nan" not in str(refused.value).lower()
    with pytest.raises(Reject) as refused:
        decode_scores(Delivery(b"\xff\xff", "scores.updated.0", 1))
    assert refused.value.reason == "invalid_message"


def test_one_message_carries_every_model_of_a_round_and_a_malformed_one_inside_is_named():
    message = scoring_pb2.ScoresUpdatedBatch.FromString(
        scores(person_ids=["p1", "p2"], values=[0.5, 0.25], at_ms=[1000, 2000]).data
    )
    message.more.add(
        model="clv", version="3", scores=["clv", "clv_p90"], person_ids=["p2"], values=[120.0, 300.0], at_ms=[2000]
    )
    churn, clv = decode_scores(Delivery(message, "scores.updated.0", 1))
    assert (churn.model, churn.persons) == ("churn", ["p1", "p2"])
    assert (clv.model, clv.version, clv.persons, clv.values) == ("clv", "3", ["p2"], [{"clv": 120.0, "clv_p90": 300.0}])

    message.more[0].values.append(1.0)
    with pytest.raises(Reject) as refused:
        decode_scores(Delivery(message, "scores.updated.0", 1))
    assert refused.value.field == "more[0].values"
    del message.more[0].values[-1]
    message.more[0].more.add(model="x")
    with pytest.raises(Reject) as refused:
        decode_scores(Delivery(message, "scores.updated.0", 1))
    assert refused.value.field == "more[0].more"
