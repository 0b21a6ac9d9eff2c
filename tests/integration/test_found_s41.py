"""Defects found by trying the platform as a customer, an operator and an attacker would (session 41).

Each test holds what someone relies on, and its docstring says what happened before its fix. The services
run in-process on a real nats-server (the `chain` fixture: collector, identity and profile; orchestration
beside them when a test needs it), and cdpctl runs as an operator runs it, as a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import sys
import time
from pathlib import Path

import grpc
import nats
import numpy as np
import orjson
from aiohttp import web
from google.protobuf import json_format
from onnx import TensorProto, helper, numpy_helper

from cdp.collector.v1 import collector_pb2
from cdp.events.v1 import events_pb2
from cdp.orchestration.v1 import orchestration_pb2 as opb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.service import serving
from cdp_orchestration.__main__ import setup as orchestration_setup
from cdp_orchestration.settings import OrchestrationSettings
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings
from cdp_scoring.__main__ import setup as scoring_setup
from cdp_scoring.settings import ScoringSettings
from cdp_testing.onnx_models import METADATA_KEY, logistic_model
from cdp_testing.waiting import until

from .conftest import dead_letters

CDPCTL = str(Path(sys.executable).parent / "cdpctl")
LONG_NAME = "Personalised offers from our partners in the travel, hotel and car rental business"


async def _consent_when(chain, user_id: str, ready, timeout: float = 15.0) -> dict[str, bool]:
    """The person's consent (key -> granted) once `ready(consent)` holds; the last one read otherwise."""
    deadline = time.monotonic() + timeout
    consent: dict[str, bool] = {}
    while time.monotonic() < deadline:
        profile = await chain.profile_of("user_id", user_id)
        if profile is not None:
            consent = {key: state.granted for key, state in profile.consent.items()}
            if ready(consent):
                return consent
        await asyncio.sleep(0.1)
    return consent


async def test_consent_under_any_category_name_an_sdk_sends_reaches_the_profile(chain):
    """Segment's consent context names categories as the workspace does ("Marketing Emails"), and a
    journey's action may name such a purpose. The collector stored the event (200), and the profile
    dropped every decision whose name had a space or a ':' or passed 64 characters, without a word: a
    journey under "Marketing Emails" answered "no consent" to a person who had granted it, and a later
    withdrawal would have been lost the same way."""
    status, answer = await chain.post(
        {
            "type": "identify",
            "userId": "s41-consent",
            "traits": {"email": "s41-consent@example.org"},
            "context": {
                "consent": {
                    "categoryPreferences": {
                        "Marketing Emails": True,
                        "Ads:Partner": False,
                        LONG_NAME: True,
                        "Analytics": True,
                    },
                    "channelPreferences": {"push notifications": False},
                }
            },
        }
    )
    assert (status, answer["accepted"]) == (200, 1), answer
    consent = await _consent_when(chain, "s41-consent", lambda c: "purpose:Analytics" in c)
    assert consent == {
        "purpose:Marketing Emails": True,
        "purpose:Ads:Partner": False,
        f"purpose:{LONG_NAME}": True,
        "purpose:Analytics": True,
        "channel:push notifications": False,
    }

    # The person withdraws it later: the later decision wins, as for any purpose.
    status, answer = await chain.post(
        {
            "type": "track",
            "userId": "s41-consent",
            "event": "Preferences Saved",
            "context": {"consent": {"categoryPreferences": {"Marketing Emails": False}}},
        }
    )
    assert (status, answer["accepted"]) == (200, 1), answer
    consent = await _consent_when(chain, "s41-consent", lambda c: c.get("purpose:Marketing Emails") is False)
    assert consent["purpose:Marketing Emails"] is False

    # The back office can record the same purpose (UpdateTraits' consent), as an event can.
    person = (await chain.profile_of("user_id", "s41-consent")).person_id
    await chain.profile.UpdateTraits(
        profile_pb2.UpdateTraitsRequest(
            person_id=person, consent={"purpose:Marketing Emails": True}, request_id="s41-back-office"
        )
    )
    consent = await _consent_when(chain, "s41-consent", lambda c: c.get("purpose:Marketing Emails") is True)
    assert consent["purpose:Marketing Emails"] is True
    assert await chain.dead_letters() == []


def _far_journey(journey_id: str, event: str, nodes: list[dict]) -> dict:
    return {
        "id": journey_id,
        "version": 1,
        "name": journey_id,
        "priority": 1,
        "category": "reminder",
        "timezone": "UTC",
        "entry": {"event": event},
        "reentry": "always",
        "nodes": nodes,
    }


# Past nats-server's last schedulable instant (2262-04-11: int64 nanoseconds), and past the year 9999.
FAR = {"s41-far-2300": "100000d", "s41-far-9999": "99999999d"}

FAR_JOURNEYS = [
    *(
        _far_journey(journey, f"S41 Delay {journey}", [{"id": "later", "type": "delay", "duration": duration}])
        for journey, duration in FAR.items()
    ),
    _far_journey(
        "s41-far-wait",
        "S41 Far Wait",
        [
            {
                "id": "wait",
                "type": "wait",
                "event": "S41 Never",
                "timeout": FAR["s41-far-9999"],
                "timeout_next": "done",
            },
            {"id": "done", "type": "exit"},
        ],
    ),
]
# Entered after the others: once its one-second delay has fired and ended it, a far timer that fired at
# once would have been applied too.
SENTINEL = _far_journey("s41-sentinel", "S41 Sentinel", [{"id": "soon", "type": "delay", "duration": "1s"}])


@contextlib.asynccontextmanager
async def _orchestration(chain, tmp_path, *, edge=None, profile_address: str = ""):
    """Orchestration beside the chain's services (or `edge` and the profile at `profile_address`)."""
    settings = OrchestrationSettings(
        **(edge or chain.edge).common,
        store_url=f"sqlite:///{tmp_path / 'orchestration.db'}",
        profile_address=profile_address or f"127.0.0.1:{chain.profile_runtime.grpc.port}",
        answer_timeout=15.0,
    )
    async with serving(settings, orchestration_setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield orchestration_pb2_grpc.OrchestrationServiceStub(channel), channel


async def _instances(journeys, journey_id: str) -> list[opb.Instance]:
    return list((await journeys.ListInstances(opb.ListInstancesRequest(journey_id=journey_id))).instances)


async def test_a_journey_whose_timers_reach_past_what_nats_can_schedule_waits_and_dead_letters_nothing(chain, tmp_path):
    """A journey's durations have no upper bound, and these validate and publish. nats-server counts a
    schedule's time in int64 nanoseconds: a delay of 100000d (the year 2300) fired at once, sending what
    was to wait; a delay or a wait's timeout of 99999999d (past the year 9999, which RFC 3339 cannot
    write) failed orchestration's batch for the person entering, held that partition's persons through
    redeliveries (some 25 s each) and then dead-lettered the event the collector had accepted."""
    async with _orchestration(chain, tmp_path) as (journeys, _):
        for document in [*FAR_JOURNEYS, SENTINEL]:
            definition = opb.JourneyDefinition(json=orjson.dumps(document).decode())
            await journeys.CreateJourney(opb.CreateJourneyRequest(definition=definition))
            await journeys.PublishJourney(opb.PublishJourneyRequest(journey_id=document["id"]))
        events = [
            {"type": "track", "userId": f"s41-far-{i}", "event": document["entry"]["event"]}
            for i, document in enumerate(FAR_JOURNEYS)
        ]
        status, answer = await chain.post(*events)
        assert (status, answer["accepted"]) == (200, len(events)), answer

        entered: dict[str, list[opb.Instance]] = {}
        deadline = time.monotonic() + 20.0
        while len(entered) < len(FAR_JOURNEYS) and time.monotonic() < deadline:
            for document in FAR_JOURNEYS:
                if found := await _instances(journeys, document["id"]):
                    entered[document["id"]] = found
            await asyncio.sleep(0.2)
        assert sorted(entered) == sorted(document["id"] for document in FAR_JOURNEYS)

        status, answer = await chain.post({"type": "track", "userId": "s41-sentinel", "event": "S41 Sentinel"})
        assert (status, answer["accepted"]) == (200, 1), answer
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            sentinel = await _instances(journeys, SENTINEL["id"])
            if sentinel and sentinel[0].state == opb.INSTANCE_STATE_ENDED:
                break
            await asyncio.sleep(0.2)
        assert [(i.state, i.end_reason) for i in sentinel] == [(opb.INSTANCE_STATE_ENDED, "completed")]
        assert await chain.settled(timeout=15.0, streams=("EVENTS_RAW", "EVENTS_RESOLVED", "ORCHESTRATION")) is None

        states = {document["id"]: await _instances(journeys, document["id"]) for document in FAR_JOURNEYS}
        assert {journey: [(i.state, i.node_id) for i in found] for journey, found in states.items()} == {
            "s41-far-2300": [(opb.INSTANCE_STATE_WAITING, "later")],
            "s41-far-9999": [(opb.INSTANCE_STATE_WAITING, "later")],
            "s41-far-wait": [(opb.INSTANCE_STATE_WAITING, "wait")],
        }
        assert [str(letter) for letter in await chain.dead_letters()] == []


async def test_a_dead_letter_orchestration_sourced_is_replayed_through_the_stream_it_came_from(chain, tmp_path):
    """`cdpctl dlq --replay` sends a dead letter back "on the subject it was first published on". What
    ORCHESTRATION holds it sourced from other streams, with nats-server's `Nats-Stream-Source` header; the
    replay published it on `orchestration.in.<p>` with that header, which nats-server refuses: the command
    ended in a traceback, replaying none of the dead letters after it."""
    async with _orchestration(chain, tmp_path):
        nc = await nats.connect(chain.nats_url)
        try:
            await nc.jetstream().publish("orchestration.fired.0", b"not a timer", headers={"Nats-Msg-Id": "s41-bad"})
        finally:
            await nc.close()
        [first] = await until(chain.dead_letters, "the bad timer dead-lettered", 20.0)
        assert (first.subject, first.original_subject) == ("dlq.ORCHESTRATION.orchestration-p0", "orchestration.in.0")

        cdpctl = await asyncio.create_subprocess_exec(
            CDPCTL,
            "--home",
            str(tmp_path / "cdp-home"),
            "dlq",
            "ORCHESTRATION",
            "--replay",
            "--nats",
            chain.nats_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(cdpctl.communicate(), 60.0)
        assert (cdpctl.returncode, stderr.decode().count("Traceback")) == (0, 0), stderr.decode()[-2000:]
        assert "replayed 1 of 1" in stdout.decode(), stdout.decode()

        # Sourced again from ORCHESTRATION_TIMERS (still not a timer): a new dead letter, the first one gone.
        [again] = await until(chain.dead_letters, "the replayed timer dead-lettered again", 20.0)
        assert again.data == b"not a timer"
        assert again.detail.startswith("ORCHESTRATION_TIMERS:"), again.detail


async def _cdpctl(home: Path, *args: str) -> tuple[int, str]:
    """cdpctl as an operator runs it: its exit code and everything it printed."""
    process = await asyncio.create_subprocess_exec(
        CDPCTL, "--home", str(home), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60.0)
    return process.returncode, output.decode()


async def test_cdpctl_send_refuses_counts_that_send_nothing_naming_the_option(tmp_path):
    """`--count 0` or `-5` sent nothing and answered "accepted 0" with exit 0; `--batch-size 0` ended in
    a traceback (a range step of zero), and a negative one sent nothing, exit 0."""
    target = ("--url", "http://127.0.0.1:9", "--write-key", "wk_s41_00000001")
    for option, value in (("--count", "0"), ("--count", "-5"), ("--batch-size", "0"), ("--batch-size", "-1")):
        code, output = await _cdpctl(tmp_path, "send", "track", "--user-id", "s41", option, value, *target)
        assert (code, "Traceback" in output) == (2, False), output
        assert f"Invalid value for '{option}'" in output, output


async def test_cdpctl_send_says_which_collector_it_could_not_reach_or_did_not_understand(tmp_path):
    """A collector that is down (or a wrong --url) ended `cdpctl send` in an aiohttp traceback; a proxy's
    HTML error page in front of it, in a JSONDecodeError traceback."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
        code, output = await _cdpctl(tmp_path, "send", "track", "--user-id", "s41", "--url", down, "--write-key", "k")
    assert (code, "Traceback" in output) == (1, False), output
    assert f"cannot reach the collector at {down}" in output, output

    async def bad_gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/batch", bad_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        proxy = f"http://127.0.0.1:{runner.addresses[0][1]}"
        code, output = await _cdpctl(tmp_path, "send", "track", "--user-id", "s41", "--url", proxy, "--write-key", "k")
    finally:
        await runner.cleanup()
    assert (code, "Traceback" in output) == (1, False), output
    assert '"status": 502' in output, output


@contextlib.asynccontextmanager
async def _profile(edge, store: Path):
    """The profile service on `store`: a stub to it and its address. Started again on the same store, it is a
    restart."""
    settings = ProfileSettings(
        **edge.common, store_url=f"sqlite:///{store}", identity_address=f"127.0.0.1:{edge.identity.grpc.port}"
    )
    async with serving(settings, profile_setup) as runtime:
        address = f"127.0.0.1:{runtime.grpc.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            yield profile_pb2_grpc.ProfileServiceStub(channel), address


async def _profile_when(profiles, user_id: str, ready, timeout: float = 20.0) -> profile_pb2.Profile:
    """The person's profile once `ready(profile, its computed traits' numbers)` holds."""

    async def read():
        try:
            found = await profiles.LookupProfile(
                profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value=user_id)
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            return None
        return found if ready(found, {name: value.number_value for name, value in found.computed.items()}) else None

    return await until(read, f"{user_id}'s profile as wanted", timeout)


async def test_sums_past_what_a_double_or_64_bits_hold_stay_readable_and_dead_letter_nothing(edge, tmp_path):
    """Every number here is one the collector accepts. Two 1.7e308 summed to infinity: `cdpctl profile`
    (any JSON reading of the profile) ended in a traceback, the store wrote the total as null, and after
    a restart of the profile service the person's next event failed its batch (TypeError), held the
    partition through redeliveries and was dead-lettered. 2,050 values of 2**53 summed past 64 bits,
    which the store cannot write: the batch failed the same way."""
    store = tmp_path / "profile.db"
    huge = [{"type": "track", "userId": "s41-huge", "event": "S41 Amount", "properties": {"x": 1.7e308}}] * 2
    many = [{"type": "track", "userId": "s41-many", "event": "S41 Amount", "properties": {"x": 2**53}}] * 2050
    async with _profile(edge, store) as (profiles, _):
        for name, op in (("s41_sum", "sum"), ("s41_avg", "avg")):
            definition = profile_pb2.ComputedTraitDefinition(
                name=name, op=op, event_names=["S41 Amount"], property="x", window="30d"
            )
            await profiles.DefineComputedTrait(profile_pb2.DefineComputedTraitRequest(definition=definition))
        # Each event its own message id (the SDKs give each one): the same twice would be a duplicate.
        answer = await edge.send(*({**event, "messageId": f"s41-huge-{i}"} for i, event in enumerate(huge)))
        assert answer["accepted"] == 2, answer
        answer = await edge.send(*({**event, "messageId": f"s41-many-{i}"} for i, event in enumerate(many)))
        assert answer["accepted"] == 2050, answer
        found = await _profile_when(profiles, "s41-huge", lambda p, c: c.get("s41_sum", 0) > 1e308)
        json.loads(json_format.MessageToJson(found))  # what `cdpctl profile` prints
        found = await _profile_when(profiles, "s41-many", lambda p, c: c.get("s41_sum", 0) > 1.8e19)
        assert found.computed["s41_sum"].number_value == float(2050 * 2**53)

    async with _profile(edge, store) as (profiles, _):  # a restart: every state read back from the store
        await edge.send({"type": "track", "userId": "s41-huge", "event": "S41 Amount", "properties": {"x": 1}})
        found = await _profile_when(profiles, "s41-huge", lambda p, c: p.event_count == 3)
        assert 1e308 < found.computed["s41_sum"].number_value < math.inf
    assert [str(letter) for letter in await dead_letters(edge.nats_url)] == []


UNTIL_NINE = _far_journey("s41-until-nine", "S41 Until Nine", [{"id": "nine", "type": "delay", "until": "09:00"}])
# What apps send as a time zone that is none: a region alone (a folder of the zone database) and a value
# longer than a file name may be.
NOT_ZONES = {"s41-tz-region": "Europe", "s41-tz-long": "Europe/" + "x" * 300}


async def test_a_time_zone_that_is_no_zone_falls_back_and_a_journey_naming_one_is_refused_by_field(chain, tmp_path):
    """A person's `traits.timezone` comes from any identify call. "Europe" (a folder of the zone database)
    or a name longer than a file name made ZoneInfo raise an OSError that orchestration did not expect: the
    batch of the person entering a journey that waits until 09:00 their time failed, held the partition
    through redeliveries and dead-lettered the event; a journey whose own `timezone` is "Europe" failed
    ValidateJourney with INTERNAL instead of a problem naming the field."""
    async with _orchestration(chain, tmp_path) as (journeys, channel):
        definition = opb.JourneyDefinition(json=orjson.dumps(UNTIL_NINE).decode())
        await journeys.CreateJourney(opb.CreateJourneyRequest(definition=definition))
        await journeys.PublishJourney(opb.PublishJourneyRequest(journey_id=UNTIL_NINE["id"]))
        exports = privacy_pb2_grpc.PrivacyServiceStub(channel)
        for user_id, timezone in NOT_ZONES.items():
            status, answer = await chain.post({"type": "identify", "userId": user_id, "traits": {"timezone": timezone}})
            assert (status, answer["accepted"]) == (200, 1), answer

        async def holds_the_zone(user_id: str):
            profile = await chain.profile_of("user_id", user_id)
            if profile is None:
                return None
            held = await exports.ExportPerson(privacy_pb2.ExportPersonRequest(person_id=profile.person_id))
            persons = json_format.MessageToDict(held.document).get("persons", [])
            return any("traits.timezone" in person.get("fields", {}) for person in persons)

        for user_id in NOT_ZONES:  # orchestration's copy of the person holds the zone before they enter
            await until(lambda user_id=user_id: holds_the_zone(user_id), f"{user_id}'s zone in orchestration", 20.0)
        status, answer = await chain.post(
            *({"type": "track", "userId": user_id, "event": "S41 Until Nine"} for user_id in NOT_ZONES)
        )
        assert (status, answer["accepted"]) == (200, 2), answer

        async def waiting():
            found = await _instances(journeys, UNTIL_NINE["id"])
            return found if len(found) == 2 else None

        instances = await until(waiting, "both persons in the journey", 20.0)
        assert [i.state for i in instances] == [opb.INSTANCE_STATE_WAITING] * 2
        assert await chain.settled(timeout=15.0, streams=("EVENTS_RAW", "EVENTS_RESOLVED", "ORCHESTRATION")) is None
        assert [str(letter) for letter in await chain.dead_letters()] == []

        document = {**UNTIL_NINE, "id": "s41-in-europe", "timezone": "Europe"}
        answer = await journeys.ValidateJourney(
            opb.ValidateJourneyRequest(definition=opb.JourneyDefinition(json=orjson.dumps(document).decode()))
        )
        assert [(p.node, p.field) for p in answer.problems] == [("", "timezone")]


ORDER_TRAITS = [
    {"name": "s41_revenue", "op": "sum", "event_names": ["S41 Order"], "property": "total", "window": "30d"},
    {"name": "s41_basket", "op": "avg", "event_names": ["S41 Order"], "property": "total", "window": "30d"},
]
ORDER_FEATURES = [
    {"name": "revenue", "path": "computed.s41_revenue", "default": 0},
    {"name": "basket", "path": "computed.s41_basket", "default": 0},
]


def _overflowing_model(name: str) -> bytes:
    """sigmoid(revenue * 1e30 - revenue * 1e30): 0.5 for every revenue float32 holds times 1e30, NaN past
    it (infinity minus infinity), as a model's arithmetic can overflow on a large input."""
    scale = numpy_helper.from_array(np.asarray([1e30], dtype=np.float32), "scale")
    nodes = [
        helper.make_node("Mul", ["features", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "scaled"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["n", 1])],
        initializer=[scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = {
        "name": name,
        "version": "1.0.0",
        "owner": "tests",
        "input": "features",
        "features": ORDER_FEATURES[:1],
        "outputs": [{"score": name, "output": "probability", "index": 0, "meaning": "test score"}],
        "computed_traits": ORDER_TRAITS,
    }
    helper.set_model_props(model, {METADATA_KEY: json.dumps(spec)})
    return model.SerializeToString()


async def test_scores_of_order_totals_past_float32_are_finite_or_left_out_and_the_others_arrive(edge, tmp_path):
    """An order total of 1e39 is a number the collector accepts and the profile sums; in the float32 that
    models read it was an infinity, and a model's score of it NaN. The profile refuses a scores message
    holding a NaN whole: the message was dead-lettered with every score of that round's partition in it.
    Now the feature is float32's largest (`balanced` below scores it), and a score that still comes out
    NaN (`steep`: the model's own arithmetic overflows) is published for no one."""
    async with _profile(edge, tmp_path / "profile.db") as (profiles, profile_address):
        settings = ScoringSettings(
            **edge.common,
            store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
            model_store=str(tmp_path / "models"),
            ship_models=False,
            profile_address=profile_address,
        )
        async with serving(settings, scoring_setup) as scoring:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{scoring.grpc.port}") as channel:
                models = scoring_pb2_grpc.ScoringServiceStub(channel)
                balanced = logistic_model(
                    "s41_balanced",
                    "1.0.0",
                    features=ORDER_FEATURES,
                    weights=[1.0, -1.0],
                    spec_overrides={"computed_traits": ORDER_TRAITS},
                )
                for onnx in (balanced, _overflowing_model("s41_steep")):
                    await models.DeployModel(scoring_pb2.DeployModelRequest(onnx=onnx))
                answer = await edge.send(
                    {"type": "track", "userId": "s41-whale", "event": "S41 Order", "properties": {"total": 1e39}},
                    {"type": "track", "userId": "s41-shopper", "event": "S41 Order", "properties": {"total": 10}},
                )
                assert answer["accepted"] == 2, answer
                whale = await _profile_when(profiles, "s41-whale", lambda p, c: "s41_balanced" in p.scores)
                shopper = await _profile_when(
                    profiles, "s41-shopper", lambda p, c: {"s41_balanced", "s41_steep"} <= set(p.scores)
                )
                whale = await _profile_when(profiles, "s41-whale", lambda p, c: True)  # as it is after both
        assert whale.scores["s41_balanced"].value == 0.5  # sigmoid(largest - largest)
        assert "s41_steep" not in whale.scores
        assert (shopper.scores["s41_balanced"].value, shopper.scores["s41_steep"].value) == (0.5, 0.5)
    assert [str(letter) for letter in await dead_letters(edge.nats_url)] == []


DOLLAR = _far_journey("s41-dollar", "S41 Dollar", [{"id": "later", "type": "delay", "duration": "1h"}])


async def test_keys_a_document_store_reserves_reach_journeys_and_survive_a_restart(chain, tmp_path):
    """Mixpanel-style keys ("$browser", a trait {"$set": ...}) are accepted by the collector and kept by the
    profile (as JSON text). Orchestration kept its copy of the person's fields and an instance's entry
    properties as documents, whose field names the store refuses when they start with '$': the batch of
    the person entering failed, held the partition through redeliveries and dead-lettered the event."""
    async with _orchestration(chain, tmp_path) as (journeys, channel):
        definition = opb.JourneyDefinition(json=orjson.dumps(DOLLAR).decode())
        await journeys.CreateJourney(opb.CreateJourneyRequest(definition=definition))
        await journeys.PublishJourney(opb.PublishJourneyRequest(journey_id=DOLLAR["id"]))
        properties = {"$browser": "Firefox", "cart": {"$currency": "EUR", "items": [{"$sku": "a-1"}]}}
        status, answer = await chain.post(
            {"type": "identify", "userId": "s41-dollar", "traits": {"plan": "pro", "$set": {"$inc": 1}}},
            {"type": "track", "userId": "s41-dollar", "event": "S41 Dollar", "properties": properties},
        )
        assert (status, answer["accepted"]) == (200, 2), answer
        person = (await until(lambda: chain.profile_of("user_id", "s41-dollar"), "the person's profile")).person_id
        exports = privacy_pb2_grpc.PrivacyServiceStub(channel)

        async def kept():
            held = await exports.ExportPerson(privacy_pb2.ExportPersonRequest(person_id=person))
            document = json_format.MessageToDict(held.document)
            fields = [p.get("fields", {}) for p in document.get("persons", [])]
            instances = document.get("instances", [])
            return (fields, instances) if fields and "traits.$set" in fields[0] and instances else None

        fields, instances = await until(kept, "the person and their instance in orchestration", 20.0)
        assert fields[0]["traits.$set"] == {"$inc": 1}
        assert [i["entry"] for i in instances] == [properties]
        assert await chain.settled(timeout=15.0, streams=("EVENTS_RAW", "EVENTS_RESOLVED", "ORCHESTRATION")) is None
        assert [str(letter) for letter in await chain.dead_letters()] == []

    async with _orchestration(chain, tmp_path) as (journeys, channel):  # read back from the store
        [instance] = await _instances(journeys, DOLLAR["id"])
        assert (instance.person_id, instance.state) == (person, opb.INSTANCE_STATE_WAITING)
        held = await privacy_pb2_grpc.PrivacyServiceStub(channel).ExportPerson(
            privacy_pb2.ExportPersonRequest(person_id=person)
        )
        document = json_format.MessageToDict(held.document)
        assert [i["entry"] for i in document["instances"]] == [properties]
        assert document["persons"][0]["fields"]["traits.$set"] == {"$inc": 1}


EXIT_WITHOUT_EMAIL = {
    **_far_journey("s41-exit-lag", "S41 Signed Up", [{"id": "later", "type": "delay", "duration": "1h"}]),
    "exit": [{"id": "no_email", "condition": "not traits.email exists"}],
}


async def test_an_exit_condition_at_entry_reads_what_the_events_before_the_entry_set(chain, tmp_path):
    """An SDK sends identify (the email) then track ("Signed Up") in one batch. Orchestration gets the
    track's resolved event before the profile's change for the identify, and checked the journey's exit
    condition `not traits.email exists` at entry on fields that lacked the email: every such person's
    instance ended at once (exit_rule:no_email, 3 of 3 on a running platform). A person without an email
    still leaves by the rule."""
    async with _orchestration(chain, tmp_path) as (journeys, _):
        definition = opb.JourneyDefinition(json=orjson.dumps(EXIT_WITHOUT_EMAIL).decode())
        await journeys.CreateJourney(opb.CreateJourneyRequest(definition=definition))
        await journeys.PublishJourney(opb.PublishJourneyRequest(journey_id=EXIT_WITHOUT_EMAIL["id"]))
        batch = []
        for i in range(3):
            batch.append({"type": "identify", "userId": f"s41-signup-{i}", "traits": {"email": f"s41-{i}@example.org"}})
            batch.append({"type": "track", "userId": f"s41-signup-{i}", "event": "S41 Signed Up"})
        batch.append({"type": "track", "userId": "s41-no-email", "event": "S41 Signed Up"})
        status, answer = await chain.post(*batch)
        assert (status, answer["accepted"]) == (200, 7), answer

        async def settled_instances():
            found = await _instances(journeys, EXIT_WITHOUT_EMAIL["id"])
            ended = [i for i in found if i.state == opb.INSTANCE_STATE_ENDED]
            return found if len(found) == 4 and ended else None

        instances = await until(settled_instances, "four instances, the one without an email ended", 20.0)
        assert await chain.settled(timeout=15.0, streams=("EVENTS_RAW", "EVENTS_RESOLVED", "ORCHESTRATION")) is None
        instances = await _instances(journeys, EXIT_WITHOUT_EMAIL["id"])
        no_email = (await chain.profile_of("user_id", "s41-no-email")).person_id
        assert sorted((i.person_id == no_email, i.state, i.end_reason) for i in instances) == [
            (False, opb.INSTANCE_STATE_WAITING, ""),
            (False, opb.INSTANCE_STATE_WAITING, ""),
            (False, opb.INSTANCE_STATE_WAITING, ""),
            (True, opb.INSTANCE_STATE_ENDED, "exit_rule:no_email"),
        ]


BRANCH_ON_PLAN = _far_journey(
    "s41-branch-lag",
    "S41 Upgraded",
    [
        {"id": "which", "type": "branch", "branches": [{"if": 'traits.plan = "pro"', "next": "pro"}], "else": "other"},
        {"id": "pro", "type": "delay", "duration": "1h"},
        {"id": "other", "type": "delay", "duration": "2h"},
    ],
)


async def test_a_branch_at_entry_reads_what_the_events_before_the_entry_set(edge, tmp_path):
    """identify (plan "pro") then track ("Upgraded") in one batch, as SDKs send them: the branch on
    `traits.plan = "pro"` right after the entry was decided on fields that did not have the plan yet
    whenever the track's resolved event reached orchestration before the identify's profile change, and
    every such person went the `else` way (3 of 3 on a running platform). Here the profile is stopped
    while they arrive, so the change comes later for certain. The branch now waits for it; a person
    whose plan is not "pro" still goes the other way."""
    store = tmp_path / "profile.db"
    async with _profile(edge, store) as (_, profile_address):
        pass  # its streams exist, and where orchestration reads profiles is known
    async with _orchestration(None, tmp_path, edge=edge, profile_address=profile_address) as (journeys, _):
        definition = opb.JourneyDefinition(json=orjson.dumps(BRANCH_ON_PLAN).decode())
        await journeys.CreateJourney(opb.CreateJourneyRequest(definition=definition))
        await journeys.PublishJourney(opb.PublishJourneyRequest(journey_id=BRANCH_ON_PLAN["id"]))
        batch = []
        for user_id, plan in (("s41-pro-0", "pro"), ("s41-pro-1", "pro"), ("s41-pro-2", "pro"), ("s41-free", "free")):
            batch.append({"type": "identify", "userId": user_id, "traits": {"plan": plan}})
            batch.append({"type": "track", "userId": user_id, "event": "S41 Upgraded"})
        answer = await edge.send(*batch)
        assert answer["accepted"] == 8, answer

        async def entered():
            found = await _instances(journeys, BRANCH_ON_PLAN["id"])
            return found if len(found) == 4 else None

        await until(entered, "four instances", 20.0)
        async with _profile(edge, store) as (profiles, _):  # the profile back: its changes follow

            async def decided():
                found = await _instances(journeys, BRANCH_ON_PLAN["id"])
                return found if all(i.node_id in ("pro", "other") for i in found) else None

            instances = await until(decided, "four instances past the branch", 20.0)
            free = (await _profile_when(profiles, "s41-free", lambda p, c: True)).person_id
        assert sorted((i.person_id == free, i.node_id) for i in instances) == [
            (False, "pro"),
            (False, "pro"),
            (False, "pro"),
            (True, "other"),
        ]
    assert [str(letter) for letter in await dead_letters(edge.nats_url)] == []


def _track(user_id: str, message_id: str, **properties) -> events_pb2.Event:
    event = events_pb2.Event(type=events_pb2.EVENT_TYPE_TRACK, user_id=user_id, event="S41 Measured")
    event.message_id = message_id
    event.properties.update(properties)
    return event


async def test_a_grpc_event_with_a_number_that_is_not_finite_is_refused_naming_the_field(chain, tmp_path):
    """JSON cannot carry NaN or an infinity, protobuf can: Collect answered such events ACCEPTED, and
    orchestration could not read the resolved event holding one (ValueError): each was dead-lettered
    there (3 of 3 on a running platform). They are refused now, each naming its field, and the finite
    ones beside them are stored."""
    located = _track("s41-grpc-3", "s41-grpc-3")
    located.context.location.latitude = math.nan
    nested = _track("s41-grpc-2", "s41-grpc-2", cart={"items": [-math.inf]})
    events = [_track("s41-grpc-0", "s41-grpc-0", x=math.inf), _track("s41-grpc-1", "s41-grpc-1", x=math.nan)]
    events += [nested, located, _track("s41-grpc-4", "s41-grpc-4", x=1e308)]
    async with _orchestration(chain, tmp_path) as (journeys, _):
        entering = _far_journey("s41-measured", "S41 Measured", [{"id": "later", "type": "delay", "duration": "1h"}])
        definition = opb.JourneyDefinition(json=orjson.dumps(entering).decode())
        await journeys.CreateJourney(opb.CreateJourneyRequest(definition=definition))
        await journeys.PublishJourney(opb.PublishJourneyRequest(journey_id=entering["id"]))
        answer = await chain.collect(*events)
        assert [(r.status, r.error.field) for r in answer.results] == [
            (collector_pb2.EVENT_STATUS_REJECTED, "events[0].properties.x"),
            (collector_pb2.EVENT_STATUS_REJECTED, "events[1].properties.x"),
            (collector_pb2.EVENT_STATUS_REJECTED, "events[2].properties.cart.items[0]"),
            (collector_pb2.EVENT_STATUS_REJECTED, "events[3].context.location.latitude"),
            (collector_pb2.EVENT_STATUS_ACCEPTED, ""),
        ]
        await until(lambda: _instances(journeys, entering["id"]), "the finite event's person in the journey", 20.0)
        assert await chain.settled(timeout=15.0, streams=("EVENTS_RAW", "EVENTS_RESOLVED", "ORCHESTRATION")) is None
        assert [str(letter) for letter in await chain.dead_letters()] == []
