"""Every gRPC method of every service, fuzzed on the whole running platform (`cdpctl up`, real processes).

The methods are found, not listed: every service descriptor in the generated stubs (libs/cdp-protos), so a
new RPC or a new service is fuzzed the day it is added. Each method gets hostile but well-typed requests
built from its input descriptor (`cdp_testing.fuzz.messages`): nasty strings (NUL, right-to-left marks,
64 KiB), integers at the edges of their type, NaN and infinities, Timestamps outside years 1..9999, enum
numbers nobody declared, Structs deeper than the parser allows. Where a field holds a language, it gets
that language: segment-language text and JSON trees for segment definitions, journey documents (JSON,
YAML, Struct) whose conditions are random segment-language text. Every unary method also gets random
bytes as its body.

What must hold for every answer:
  - never INTERNAL, UNKNOWN or DATA_LOSS: those mean an exception escaped the code that should have named
    the bad field;
  - never DEADLINE_EXCEEDED (a hang), except on the subscription streams (Subscribe*), which are open-ended
    (methods that start real work in a worker process get minutes: LONG_RUNNING);
  - INVALID_ARGUMENT carries a google.rpc BadRequest naming the field at fault.
Calls are made with the admin token, so they reach past authorization into the code behind it.

Then one seeded session calls every method of every service interleaved, sharing the ids answers name,
so calls reach past "unknown id"; and afterwards nothing any service consumed was dead-lettered.

A failure is shrunk by hypothesis to the smallest request that still fails and printed with the method.
Defects found and not fixed yet would be listed in KNOWN, each with a strict xfail test (none now: the ones found
were fixed, and their tests are plain regression tests).
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import math
import random
import time
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import message_factory, struct_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

import cdp
from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp_testing.fuzz import (
    FAILURES,
    LONG,
    SCALE,
    Fuzzer,
    bad_request_fields,
    budget,
    dead_letters,
    harvest,
    messages,
    nasty_text,
    segment_text,
    segment_tree,
    show,
    time_limit,
)

SEED = 20261204
EXAMPLES = 5  # per method in `make test` (~90 methods); `make fuzz` multiplies it
TIMEOUT = 15.0  # a hang, on a machine shared with the rest of the suite
# Methods that may start real work in a worker process (a training run, a realised-quality check, scoring
# everyone): answered within minutes, not seconds, on a busy machine.
LONG_RUNNING = {"TrainModel": 180.0, "GetModelQuality": 180.0, "ScoreAll": 120.0, "MatchRecordsBulk": 60.0}


# gRPC services that several platform services serve (not cdp.<name>.v1's own): every one of them is fuzzed.
SHARED = {"cdp.privacy.v1.PrivacyService": ("identity", "profile", "scoring", "segmentation", "orchestration", "crm")}


def every_service() -> list[tuple[str, ServiceDescriptor]]:
    """(platform service name, descriptor) for every service in the generated stubs: cdp.<name>.v1, or each
    platform service that serves it (SHARED)."""
    found = []
    for root in map(Path, cdp.__path__):  # a namespace package: pkgutil does not walk into it
        for stub in sorted(root.glob("*/v*/*_pb2.py")):
            module = importlib.import_module(".".join(("cdp", *stub.relative_to(root).with_suffix("").parts)))
            for service in module.DESCRIPTOR.services_by_name.values():
                for host in SHARED.get(service.full_name, (service.full_name.split(".")[1],)):
                    found.append((host, service))
    return sorted(found, key=lambda item: (item[1].full_name, item[0]))


METHODS = [(name, method) for name, service in every_service() for method in service.methods]


def method_id(name: str, method) -> str:
    """The test id of a method: Service.Method, and the platform service for a shared one."""
    shared = method.containing_service.full_name in SHARED
    return f"{method.containing_service.name}.{method.name}" + (f"@{name}" if shared else "")


def test_every_service_is_found():
    assert {name for name, _ in METHODS} >= {
        "collector",
        "identity",
        "profile",
        "scoring",
        "segmentation",
        "orchestration",
        "crm",
    }


# --------------------------------------------------------------------------------------------- languages

# A journey that parses (see cdp_orchestration.domain.document), which the fuzz then bends out of shape.
JOURNEY = {
    "id": "fz-cart",
    "version": 1,
    "name": "Abandoned cart",
    "priority": 50,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned", "where": "properties.total > 0", "if": 'traits.country = "DE"'},
    "reentry": {"cooldown": "7d"},
    "exit": [{"id": "purchased", "event": "Order Completed"}, {"condition": "traits.unsubscribed = true"}],
    "goal": {"event": "Order Completed", "within": "3d"},
    "nodes": [
        {"id": "wait", "type": "delay", "duration": "1h", "next": "remind"},
        {
            "id": "remind",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "template": {"subject": "{{ traits.first_name }}, your cart", "body": "{{ entry.total }}"},
            "next": "check",
        },
        {"id": "check", "type": "wait", "event": "Order Completed", "timeout": "2d", "next": "done",
         "timeout_next": "branch"},
        {"id": "branch", "type": "branch", "branches": [{"if": "scores.churn_risk > 0.8", "next": "split"}],
         "else": "done"},
        {"id": "split", "type": "split", "variants": [{"name": "a", "weight": 50, "next": "done"},
                                                     {"name": "control", "weight": 50, "control": True}]},
        {"id": "done", "type": "exit"},
    ],
}  # fmt: skip

# Places in the document that hold segment-language text.
CONDITION_PATHS = (
    ("entry", "if"),
    ("entry", "where"),
    ("exit", 1, "condition"),
    ("nodes", 3, "branches", 0, "if"),
)


def _json_values() -> st.SearchStrategy:
    text = nasty_text()
    return st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), text),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
        max_leaves=6,
    )


def _paths(document, prefix=()):
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, (*prefix, index))


_ALL_PATHS = [path for path in _paths(JOURNEY) if path]


def _set(document, path, value):
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


@st.composite
def journey_documents(draw) -> dict:
    """The valid journey with a few changes: segment-language text in its conditions, hostile JSON at
    random places, keys removed."""
    document = json.loads(json.dumps(JOURNEY))
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(("condition", "value", "drop")))
        path = draw(st.sampled_from(CONDITION_PATHS if action == "condition" else _ALL_PATHS))
        try:
            if action == "condition":
                _set(document, path, draw(segment_text()))
            elif action == "value":
                _set(document, path, draw(_json_values()))
            else:
                target = document
                for step in path[:-1]:
                    target = target[step]
                del target[path[-1]]
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed or replaced what this path led to
    return document


def _struct(value: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


OVERRIDES = {
    "cdp.segmentation.v1.Definition.text": segment_text(),
    "cdp.segmentation.v1.Definition.tree": segment_tree().filter(lambda t: isinstance(t, dict)).map(_struct),
    "cdp.segmentation.v1.CreateSegmentRequest.id": st.one_of(st.sampled_from(("fz_a", "fz-b")), nasty_text()),
    "cdp.segmentation.v1.UpdateSegmentRequest.id": st.one_of(st.sampled_from(("fz_a", "fz-b")), nasty_text()),
    "cdp.orchestration.v1.JourneyDefinition.json": journey_documents().map(json.dumps),
    "cdp.orchestration.v1.JourneyDefinition.yaml": journey_documents().map(yaml.safe_dump),
    "cdp.orchestration.v1.JourneyDefinition.tree": journey_documents().map(_struct),
}


# --------------------------------------------------------------------------------------------- verdicts


# Known, reported and not fixed yet: a predicate on the (service, method, request) and why, each with a
# strict xfail test that turns red once it is fixed (then delete it here and drop the xfail). None now.
KNOWN: dict = {}
# Dead letters of known defects.
KNOWN_DEAD: tuple[str, ...] = ()


def verdict(name: str, method: MethodDescriptor, request: Message | bytes, error: grpc.RpcError | None) -> str | None:
    """Why this answer is wrong, or None."""
    if error is None:
        return None
    code = error.code()
    wrong = None
    if code in FAILURES:
        wrong = f"{code.name}: {error.details()!r}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and not method.name.startswith("Subscribe"):
        wrong = f"no answer within {LONG_RUNNING.get(method.name, TIMEOUT):g} s"
    elif code == grpc.StatusCode.INVALID_ARGUMENT and not bad_request_fields(error):
        wrong = f"INVALID_ARGUMENT without a BadRequest naming the field: {error.details()!r}"
    if wrong and isinstance(request, Message) and any(known(name, method, request) for known in KNOWN.values()):
        return None
    return wrong


def call(channel: grpc.Channel, method: MethodDescriptor, request, metadata, *, raw: bool = False):
    path = f"/{method.containing_service.full_name}/{method.name}"
    if raw:
        serialize = deserialize = None
    else:
        serialize = message_factory.GetMessageClass(method.input_type).SerializeToString
        deserialize = message_factory.GetMessageClass(method.output_type).FromString
    timeout = 1.0 if method.name.startswith("Subscribe") else LONG_RUNNING.get(method.name, TIMEOUT)
    if method.client_streaming:
        make = channel.stream_stream if method.server_streaming else channel.stream_unary
        answer = make(path, serialize, deserialize)(iter([request]), timeout=timeout, metadata=metadata)
    else:
        make = channel.unary_stream if method.server_streaming else channel.unary_unary
        answer = make(path, serialize, deserialize)(request, timeout=timeout, metadata=metadata)
    return list(answer) if method.server_streaming else answer


@pytest.fixture(scope="module")
def channels(platform):
    opened = {name: grpc.insecure_channel(platform.grpc_address(name)) for name in platform.run["services"]}
    yield opened
    for channel in opened.values():
        channel.close()


# --------------------------------------------------------------------------------------------- the fuzz


@pytest.mark.timeout(time_limit(600))
@pytest.mark.parametrize(("name", "method"), METHODS, ids=[method_id(name, method) for name, method in METHODS])
def test_no_method_fails_on_hostile_requests(platform, channels, name, method):
    strategy = messages(method.input_type, pool=("u-1", "fz_a", "fz-cart", "churn_risk"), overrides=OVERRIDES)

    @budget(EXAMPLES)
    @given(request=strategy, right_key=st.booleans())
    def fuzz(request, right_key):
        if method.input_type.full_name == "cdp.collector.v1.CollectRequest" and right_key:
            request.write_key = platform.write_key  # past the door, into validating and storing events
        try:
            call(channels[name], method, request, platform.admin_metadata)
            error = None
        except grpc.RpcError as exc:
            error = exc
        wrong = verdict(name, method, request, error)
        assert wrong is None, f"{method.full_name}: {wrong}\nrequest: {show(request)}"

    fuzz()


UNARY = [(name, method) for name, method in METHODS if not method.client_streaming]


@pytest.mark.timeout(time_limit(300))
@pytest.mark.parametrize(("name", "method"), UNARY, ids=[method_id(name, method) for name, method in UNARY])
def test_random_bytes_as_a_body_are_invalid_argument_naming_the_request(platform, channels, name, method):
    @budget(3)
    @given(body=st.one_of(st.binary(min_size=1, max_size=256), st.just(b"\xff\xff\xff\xff\x0f\x01")))
    def fuzz(body):
        try:
            call(channels[name], method, body, platform.admin_metadata, raw=True)
            return  # some bytes are a valid message (unknown fields are skipped)
        except grpc.RpcError as exc:
            wrong = verdict(name, method, body, exc)
            assert wrong is None, f"{method.full_name}: {wrong}\nbody: {show(body)}"

    fuzz()


# A journey any person can be enrolled in through the API, for the session below to publish and enroll into.
API_JOURNEY = {
    "id": "fz-api",
    "version": 1,
    "name": "Enrolled by the fuzz",
    "entry": {"api": True},
    "nodes": [
        {"id": "wait", "type": "delay", "duration": "1d", "next": "check"},
        {"id": "check", "type": "branch", "branches": [{"if": "entry.total > 10", "next": "done"}], "else": "done"},
        {"id": "done", "type": "exit"},
    ],
}
SEGMENT_TEXTS = (
    'traits.plan = "pro"',
    "traits.age >= 18 and not traits.plan exists",
    'count("Viewed", within 30d) >= 1',
)
SESSION_CALLS = 3  # per method in `make test`; `make fuzz` multiplies it


@pytest.mark.timeout(time_limit(600))
def test_a_session_across_every_service_reaches_past_unknown_ids(platform, channels):
    """One seeded session of calls to every method of every service, interleaved, sharing what they learn:
    ids the answers name (persons, journeys, instances, runs, reviews) join the pool later requests draw
    from, and some requests are made plausible (a valid segment, a journey published for API entry, the
    write key), so calls get past "unknown id" into the code behind it: enrolling a person the identity
    service made into a journey that was just published, with hostile properties."""
    pool = ["u-1", "fz_a", "fz-api", "churn_risk", "salesforce", "hubspot", "p_0000000000000000"]
    fuzzer = Fuzzer(SEED if not LONG else random.randrange(2**32), pool)
    methods = [(name, method) for name, method in METHODS]
    order = [item for item in methods for _ in range(max(1, round(SESSION_CALLS * SCALE)))]
    fuzzer.rng.shuffle(order)
    failures: list[str] = []
    codes: collections.Counter = collections.Counter()

    def adjust(method: MethodDescriptor, request: Message) -> None:
        rng = fuzzer.rng
        plausible = rng.random() < 0.5
        fields = method.input_type.fields_by_name
        if method.input_type.full_name == "cdp.collector.v1.CollectRequest" and rng.random() < 0.85:
            request.write_key = platform.write_key
        if not plausible:
            return
        if "definition" in fields and method.containing_service.name == "SegmentationService":
            request.definition.text = rng.choice(SEGMENT_TEXTS)
            if "id" in fields:
                request.id = rng.choice(("fz_a", "fz_b"))
        if "definition" in fields and method.containing_service.name == "OrchestrationService":
            request.definition.json = json.dumps(API_JOURNEY)
        if "journey_id" in fields:
            request.journey_id = "fz-api"
        if "person_id" in fields and pool:
            persons = [item for item in pool if item.startswith("p_")]
            if persons:
                request.person_id = rng.choice(persons)

    for number, (name, method) in enumerate(order):
        request = fuzzer.fill(message_factory.GetMessageClass(method.input_type)())
        adjust(method, request)
        try:
            answer = call(channels[name], method, request, platform.admin_metadata)
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
            if (wrong := verdict(name, method, request, exc)) is not None:
                failures.append(f"{method.full_name} (call {number}): {wrong}\n  {show(request)}")
            continue
        codes["OK"] += 1
        for response in answer if method.server_streaming else [answer]:
            harvest(response, pool)
    assert not failures, f"{len(failures)} calls failed ({dict(codes)}):\n" + "\n".join(failures[:10])
    assert codes["OK"] > len(methods) // 2, dict(codes)


def test_nothing_the_fuzzed_calls_stored_was_dead_lettered_downstream(platform):
    """What Collect, UpdateTraits, Enroll, ... accepted, every service downstream could read: no consumer
    gave up on a message (runs after the fuzz; the dead letters carry their reason)."""
    time.sleep(3)  # the last accepted events are still on their way through identity and profile
    dead = [line for line in asyncio.run(dead_letters(platform.nats_url)) if not any(k in line for k in KNOWN_DEAD)]
    assert not dead, "dead-lettered:\n" + "\n".join(dead[:20])


# --------------------------------------------------------------------------------------------- known, reported


def test_a_journey_tree_holding_nan_is_invalid_argument_naming_the_field(platform, channels):
    """What the fuzz found first (fixed in orchestration): a Struct holding NaN failed as INTERNAL."""
    definition = orchestration_pb2.JourneyDefinition(tree=_struct(JOURNEY))
    definition.tree.fields["priority"].number_value = math.nan
    stub = orchestration_pb2_grpc.OrchestrationServiceStub(channels["orchestration"])
    try:
        stub.ValidateJourney(
            orchestration_pb2.ValidateJourneyRequest(definition=definition),
            metadata=platform.admin_metadata,
            timeout=TIMEOUT,
        )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        assert bad_request_fields(exc)


@pytest.fixture(scope="module")
def enrollable(platform, channels) -> str:
    """A journey published for API entry (the session may have made it already)."""
    stub = orchestration_pb2_grpc.OrchestrationServiceStub(channels["orchestration"])
    definition = orchestration_pb2.JourneyDefinition(json=json.dumps({**API_JOURNEY, "id": "fz-enroll"}))
    try:
        stub.CreateJourney(
            orchestration_pb2.CreateJourneyRequest(definition=definition), metadata=platform.admin_metadata
        )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc.details()
    stub.PublishJourney(
        orchestration_pb2.PublishJourneyRequest(journey_id="fz-enroll"), metadata=platform.admin_metadata
    )
    return "fz-enroll"


def enroll(platform, channels, request: orchestration_pb2.EnrollRequest) -> grpc.RpcError | None:
    stub = orchestration_pb2_grpc.OrchestrationServiceStub(channels["orchestration"])
    try:
        stub.Enroll(request, metadata=platform.admin_metadata, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc
    return None


@pytest.fixture(scope="module")
def someone(platform, channels) -> str:
    """The person id of someone the platform knows (Enroll answers NOT_FOUND for a person without a profile)."""
    from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
    from cdp.events.v1 import events_pb2
    from cdp.profile.v1 import profile_pb2, profile_pb2_grpc

    event = events_pb2.Event(message_id="fz-enroll-someone", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="fz-enroll")
    collector_pb2_grpc.CollectorServiceStub(channels["collector"]).Collect(
        collector_pb2.CollectRequest(write_key=platform.write_key, events=[event]), timeout=TIMEOUT
    )
    profiles = profile_pb2_grpc.ProfileServiceStub(channels["profile"])
    lookup = profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value="fz-enroll")
    deadline = time.monotonic() + 60
    while True:
        try:
            return profiles.LookupProfile(lookup, metadata=platform.admin_metadata, timeout=TIMEOUT).person_id
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_enroll_properties_with_a_whole_number_past_64_bits_are_refused_naming_the_field(
    platform, channels, enrollable, someone
):
    request = orchestration_pb2.EnrollRequest(journey_id=enrollable, person_id=someone, idempotency_key="big")
    request.properties.update({"total": 1e20})  # whole, so made an int, which the command's JSON cannot hold
    error = enroll(platform, channels, request)
    assert error is None or (error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error)), (
        f"{error.code().name}: {error.details()}"
    )


def test_enroll_with_a_nul_in_the_person_id_is_answered_naming_the_field(platform, channels, enrollable):
    request = orchestration_pb2.EnrollRequest(journey_id=enrollable, person_id="p_\x00", idempotency_key="nul")
    error = enroll(platform, channels, request)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, (
        error and f"{error.code().name}: {error.details()}"
    )
    assert bad_request_fields(error) == ["person_id"]
