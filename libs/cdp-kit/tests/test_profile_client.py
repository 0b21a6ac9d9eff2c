"""ProfileClient: computed-trait definitions reach the profile service whole and normalised, and its
refusals become errors naming the caller's field."""

from __future__ import annotations

import grpc
import pytest

from cdp.profile.v1 import profile_pb2
from cdp_kit.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from cdp_kit.profile_client import ProfileClient, definition_message


class Stub:
    """The profile service's stub: records definitions, or refuses them with `code`."""

    def __init__(self, code: grpc.StatusCode | None = None) -> None:
        self.code = code
        self.defined: list[profile_pb2.ComputedTraitDefinition] = []

    async def DefineComputedTrait(self, request, **_kwargs):
        if self.code is not None:
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "no such op")
        self.defined.append(request.definition)


def client(stub: Stub) -> ProfileClient:
    c = ProfileClient.__new__(ProfileClient)
    c.stub, c.metadata = stub, ()
    return c


MISMATCH = {
    "name": "country_mismatch_30d",
    "op": "mismatch_count",
    "event_names": ["Order Completed"],
    "property": "shipping.country",
    "compare": "billing.country",
    "window": 2_592_000,
    "where": {"total": {"$gt": 50}},
}


async def test_a_definition_reaches_the_profile_service_whole_and_normalised():
    stub = Stub()
    await client(stub).define([MISMATCH, {"name": "orders", "op": "count", "event_names": ["Order Completed"]}])
    mismatch, orders = stub.defined
    assert mismatch.compare == "billing.country"  # the part one of the two former clients dropped
    assert mismatch.window == "2592000s"  # seconds, as a model spec may give them, written out in full
    assert mismatch.where["total"]["$gt"] == 50
    assert (orders.window, orders.compare, orders.property) == ("", "", "")


@pytest.mark.parametrize(
    ("field", "named"),
    [("definition", "definition"), ("spec.computed_traits.{name}", "spec.computed_traits.country_mismatch_30d")],
)
async def test_a_refusal_names_the_callers_field(field, named):
    with pytest.raises(InvalidArgument) as caught:
        await client(Stub(grpc.StatusCode.INVALID_ARGUMENT)).define([MISMATCH], field=field)
    assert caught.value.field == named
    assert "refuses" in caught.value.message


async def test_a_definition_that_cannot_be_one_is_bad_input_before_any_call():
    stub = Stub()
    with pytest.raises(InvalidArgument) as caught:
        await client(stub).define([{"name": "x", "op": "count", "where": "not an object"}], field="traits.{name}")
    assert caught.value.field == "traits.x"
    assert stub.defined == []


async def test_a_full_or_unreachable_profile_service_is_not_bad_input():
    with pytest.raises(ResourceExhausted):
        await client(Stub(grpc.StatusCode.RESOURCE_EXHAUSTED)).define([MISMATCH])
    with pytest.raises(FailedPrecondition):
        await client(Stub(grpc.StatusCode.UNAVAILABLE)).define([MISMATCH])


def test_definition_message_keeps_a_textual_window():
    assert definition_message({"name": "x", "op": "count", "window": "30d"}).window == "30d"
