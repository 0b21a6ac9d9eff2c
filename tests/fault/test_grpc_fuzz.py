"""Fuzzed gRPC calls: every RPC of the collector, identity and profile, in-process on a real nats-server,
gets random but well-typed requests (a few hundred per service), and none may answer INTERNAL or UNKNOWN.

Well-typed means the request parses as the RPC's message; everything inside it is hostile: strings with
NUL, control characters, lone combining marks and 64 KiB of text, integers at the edges of their type,
NaN and infinities, Timestamps outside years 1..9999, enum numbers nobody declared, Structs nested deeper
than the parser allows, empty fields everywhere. A service may refuse any of it (INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION, …) but must never fail on it: INTERNAL and UNKNOWN mean an exception
escaped the code that should have named the bad field.

The generator (`cdp_testing.fuzz.Fuzzer`; tests/fuzz/ drives every service with hypothesis) is seeded,
so a failure reproduces; the report names the RPC, the status and the request. Identifiers the services
hand back (person ids, merge ids, review ids) join the pool strings are drawn from, so later calls reach
past the "unknown id" answers into the code behind them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_collector.__main__ import setup as collector_setup
from cdp_collector.settings import CollectorSettings
from cdp_identity.__main__ import setup as identity_setup
from cdp_identity.settings import IdentitySettings
from cdp_kit.service import serving
from cdp_testing.fuzz import Fuzzer, harvest, show

SEED = 20240611
WRITE_KEY = "wk_fuzz_000000000001"
FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


async def fuzz_service(
    address: str,
    service: ServiceDescriptor,
    *,
    calls_per_rpc: int,
    pool: list[str],
    adjust: Callable[[str, Message, random.Random], None] = lambda _rpc, _request, _rng: None,
    seed: int = SEED,
) -> tuple[Counter, list[str]]:
    """Send `calls_per_rpc` fuzzed requests to every RPC of `service`; (status counts, failure reports)."""
    fuzzer = Fuzzer(seed, pool)
    codes: Counter = Counter()
    failures: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        calls = {}
        for method in service.methods:
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            path = f"/{service.full_name}/{method.name}"
            if method.server_streaming:
                call = channel.unary_stream(path, request_class.SerializeToString, response_class.FromString)
            else:
                call = channel.unary_unary(path, request_class.SerializeToString, response_class.FromString)
            calls[method.name] = (request_class, call, method.server_streaming)
        # RPCs interleaved, so a Merge may name the persons an earlier Resolve made.
        order = [name for name in calls for _ in range(calls_per_rpc)]
        fuzzer.rng.shuffle(order)
        for number, name in enumerate(order):
            request_class, call, streaming = calls[name]
            request = fuzzer.fill(request_class())
            adjust(name, request, fuzzer.rng)
            try:
                if streaming:
                    responses = [response async for response in call(request, timeout=10)]
                else:
                    responses = [await call(request, timeout=10)]
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() in FAILURES:
                    failures.append(f"{name} (call {number}): {exc.code().name} {exc.details()!r}\n  {show(request)}")
                continue
            codes["OK"] += 1
            for response in responses:
                harvest(response, pool)
    return codes, failures


def _assert_no_failures(codes: Counter, failures: Iterable[str]) -> None:
    failures = list(failures)
    assert not failures, f"{len(failures)} calls failed ({dict(codes)}):\n" + "\n".join(failures[:15])


@pytest.fixture
def common(nats_server):
    return dict(nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", shutdown_grace=1.0)


async def test_fuzzed_collect_calls_never_fail_inside_the_collector(common, tmp_path):
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"sources": [{"id": "fuzz", "write_key": WRITE_KEY}]}))
    settings = CollectorSettings(**common, sources_file=sources, http_host="127.0.0.1", http_port=0)

    def adjust(rpc: str, request: Message, rng: random.Random) -> None:
        # Mostly the right key: a wrong one stops every call at the door.
        if rng.random() < 0.85:
            request.write_key = WRITE_KEY

    async with serving(settings, collector_setup) as collector:
        # What the fuzz first found: a request-level sent_at beyond year 9999 failed the whole call.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc.port}") as channel:
            request = collector_pb2.CollectRequest(write_key=WRITE_KEY, events=[events_pb2.Event(user_id="u-1")])
            request.sent_at.seconds = 2**62
            reply = await collector_pb2_grpc.CollectorServiceStub(channel).Collect(request)
            assert reply.rejected == 1 and reply.results[0].error.field == "sent_at"
        codes, failures = await fuzz_service(
            f"127.0.0.1:{collector.grpc.port}",
            collector_pb2.DESCRIPTOR.services_by_name["CollectorService"],
            calls_per_rpc=300,
            pool=[WRITE_KEY],
            adjust=adjust,
        )
    _assert_no_failures(codes, failures)
    assert codes["OK"] > 50  # the fuzz reached past validation, into storing events


async def test_fuzzed_identity_calls_never_fail_inside_identity(common, tmp_path):
    settings = IdentitySettings(**common, store_url=f"sqlite:///{tmp_path / 'identity.db'}", partitions=2)
    plausible = {
        "user_id": ["u-1", "u-2", "u-3"],
        "email": ["alice@example.com", " ALICE@Example.com ", "bob@example.org"],
        "phone": ["+1 555 010 0001", "+44 20 7946 0958"],
        "anonymous_id": ["anon-1", "anon-2"],
        "device_id": ["dev-1"],
    }

    def real(ident: Message, rng: random.Random) -> None:
        ident.type = rng.choice(list(plausible))
        ident.value = rng.choice(plausible[ident.type])

    def adjust(rpc: str, request: Message, rng: random.Random) -> None:
        # Half the calls carry identifiers a person could have, so they get past validation into the graph
        # (and make the persons, merges and reviews later calls name).
        if rng.random() < 0.5:
            return
        if rpc in ("Resolve", "MatchRecords"):
            if rng.random() < 0.5:
                request.ClearField("identifiers" if rpc == "Resolve" else "records")
            holders = [request] if rpc == "Resolve" else [request.records.add() for _ in range(rng.randint(1, 3))]
            for holder in holders:
                if rpc == "MatchRecords":
                    holder.id, holder.source = f"r-{rng.randint(1, 5)}", "crm"
                for _ in range(rng.randint(1, 3)):
                    real(holder.identifiers.add(), rng)
        elif "identifier" in request.DESCRIPTOR.fields_by_name:
            real(request.identifier, rng)

    async with serving(settings, identity_setup) as identity:
        # What the fuzz first found: Resolve's `at` with nanos out of range failed the call.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{identity.grpc.port}") as channel:
            request = identity_pb2.ResolveRequest(identifiers=[identity_pb2.Identifier(type="user_id", value="u-1")])
            request.at.nanos = -1
            with pytest.raises(grpc.aio.AioRpcError) as bad_time:
                await identity_pb2_grpc.IdentityServiceStub(channel).Resolve(request)
            assert bad_time.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_time.value.details().startswith("at: ")
        codes, failures = await fuzz_service(
            f"127.0.0.1:{identity.grpc.port}",
            identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
            calls_per_rpc=80,
            pool=["user_id", "email", "p_0000000000000000"],
            adjust=adjust,
        )
    _assert_no_failures(codes, failures)
    assert codes["OK"] > 40


async def test_fuzzed_profile_calls_never_fail_inside_profile(common, tmp_path):
    from cdp.profile.v1 import profile_pb2
    from cdp_profile.__main__ import setup as profile_setup
    from cdp_profile.settings import ProfileSettings

    identity_settings = IdentitySettings(**common, store_url=f"sqlite:///{tmp_path / 'identity.db'}", partitions=2)
    async with serving(identity_settings, identity_setup) as identity:
        settings = ProfileSettings(
            **common,
            partitions=2,
            store_url=f"sqlite:///{tmp_path / 'profile.db'}",
            identity_address=f"127.0.0.1:{identity.grpc.port}",
        )
        async with serving(settings, profile_setup) as profile:
            codes, failures = await fuzz_service(
                f"127.0.0.1:{profile.grpc.port}",
                profile_pb2.DESCRIPTOR.services_by_name["ProfileService"],
                calls_per_rpc=40,
                pool=["user_id", "email", "u-1"],
            )
    _assert_no_failures(codes, failures)
