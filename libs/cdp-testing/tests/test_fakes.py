"""The fakes stand in for the real things: a fake Delivery reads and records like the kit's Delivery of
the same message, and the fake clock moves only when told."""

import pytest
from google.protobuf.struct_pb2 import Value
from opentelemetry import trace

from cdp_kit.bus import Delivery as RealDelivery
from cdp_kit.bus import subjects
from cdp_testing.fakes import T0, Clock, Delivery


async def real_delivery(nats_client, subject: str, data: bytes, headers: dict[str, str]) -> RealDelivery:
    js = nats_client.jetstream()
    await js.add_stream(name=subjects.PROFILES, subjects=list(subjects.STREAM_SUBJECTS[subjects.PROFILES]))
    await js.publish(subject, data, headers=headers)
    (msg,) = await (await js.pull_subscribe(subject, durable="t", stream=subjects.PROFILES)).fetch(1, timeout=2)
    return RealDelivery(msg)


async def test_a_fake_delivery_reads_like_the_real_one(nats_client):
    subject, payload = subjects.profiles_changed(2), Value(string_value="x")
    headers = {"Nats-Msg-Id": "m1", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    real = await real_delivery(nats_client, subject, payload.SerializeToString(), headers)
    fake = Delivery(payload, subject, seq=1, headers=headers)
    public = [name for name in dir(RealDelivery) if not name.startswith("_") and name != "msg"]
    missing = [name for name in public if not hasattr(fake, name)]
    assert not missing, f"cdp_testing.fakes.Delivery lacks {missing}"
    for name in ("data", "subject", "stream_seq", "num_delivered", "msg_id", "outcome", "reason", "delay"):
        assert getattr(fake, name) == getattr(real, name), name
    assert fake.headers.items() <= real.headers.items()
    span_context = [trace.get_current_span(d.trace_context()).get_span_context() for d in (fake, real)]
    assert span_context[0] == span_context[1] and span_context[0].is_valid


def test_outcomes_are_recorded_like_the_real_ones():
    fake = Delivery(b"x", subjects.profiles_changed(0), seq=7, allow_reject=True)
    fake.retry("store_unavailable", 0.5)
    assert (fake.outcome, fake.reason, fake.delay) == ("retry", "store_unavailable", 0.5)
    fake.reject("invalid_change", "person_id missing")
    assert (fake.outcome, fake.reason, fake.detail) == ("reject", "invalid_change", "person_id missing")


def test_an_unexpected_rejection_fails_the_test_with_its_reason():
    with pytest.raises(AssertionError, match=r"message 3 on profiles\.changed\.0 rejected: invalid_change"):
        Delivery(b"x", subjects.profiles_changed(0), seq=3).reject("invalid_change")


def test_the_clock_moves_only_when_told():
    clock = Clock()
    assert clock() == clock() == T0
    assert clock.advance(60) == T0 + 60 == clock()
