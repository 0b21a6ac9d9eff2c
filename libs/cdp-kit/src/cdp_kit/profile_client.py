"""What the services that follow profiles (scoring, segmentation) ask the profile service: a person's
flat fields, and the computed traits their definitions need (defined, waited for until backfilled,
deleted when nothing reads them).

A computed-trait definition is given in the profile's JSON form (as a model spec or a compiled segment
holds it) and normalised here once: a numeric `window` becomes seconds ("86400s"), absent optional
parts become empty, `compare` and `where` are carried. A definition that cannot be one, or that the
profile service refuses, is an `InvalidArgument` naming the caller's field; a profile service that
cannot be reached is `FailedPrecondition` / `Unavailable`, never bad input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from cdp_kit.profile_fields import profile_fields


def definition_message(definition: Mapping[str, Any]) -> profile_pb2.ComputedTraitDefinition:
    """A computed-trait definition in the profile's JSON form -> its protobuf (TypeError, ValueError or
    json_format.ParseError when it cannot be one)."""
    window = definition.get("window")
    if isinstance(window, int | float) and not isinstance(window, bool):
        # Whole seconds written out in full: "%g" would make 30 days "2.592e+06s".
        window = f"{int(window)}s" if float(window).is_integer() else f"{window}s"
    message = profile_pb2.ComputedTraitDefinition(
        name=definition["name"],
        op=definition.get("op") or "",
        event_type=definition.get("event_type") or "",
        event_names=list(definition.get("event_names") or ()),
        property=definition.get("property") or "",
        window=window or "",
        compare=definition.get("compare") or "",
    )
    if definition.get("where"):
        json_format.ParseDict(dict(definition["where"]), message.where)
    return message


class ProfileClient:
    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.stub = profile_pb2_grpc.ProfileServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def fields(self, person_id: str) -> dict[str, Any] | None:
        """The person's flat fields ("traits.plan" -> "pro"); None when the profile service has no such person."""
        try:
            profile = await self.stub.GetProfile(
                profile_pb2.GetProfileRequest(person_id=person_id), metadata=self.metadata, timeout=5.0
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise Unavailable(f"profile service: {exc.code().name} {exc.details()}", retry_after=1.0) from None
        return profile_fields(profile)

    async def define(self, definitions: Sequence[Mapping[str, Any]], *, field: str = "definition") -> None:
        """Define computed traits on the profile service (idempotent there). `field` names what a refusal
        is about in the caller's API; "{name}" in it becomes the trait's name."""
        for definition in definitions:
            name = str(definition.get("name", "?"))
            where = field.format(name=name)
            try:
                message = definition_message(definition)
            except (KeyError, TypeError, ValueError, json_format.ParseError) as exc:
                raise InvalidArgument(where, f"not a profile computed trait: {exc}") from None
            try:
                await self.stub.DefineComputedTrait(
                    profile_pb2.DefineComputedTraitRequest(definition=message), metadata=self.metadata, timeout=10.0
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(
                        where, f"a computed trait the profile service refuses: {exc.details()}"
                    ) from None
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise ResourceExhausted(
                        f"the profile service holds no more computed traits: {exc.details()}",
                        retry_after=60.0,
                        reason="computed_traits_exhausted",
                    ) from None
                raise FailedPrecondition(
                    f"could not define computed trait {name!r} on the profile service: "
                    f"{exc.code().name} {exc.details()}",
                    reason="profile_unavailable",
                ) from None

    async def undefine(self, names: Sequence[str]) -> None:
        """Delete computed traits on the profile service (one already gone is fine)."""
        for name in names:
            try:
                await self.stub.DeleteComputedTrait(
                    profile_pb2.DeleteComputedTraitRequest(name=name), metadata=self.metadata, timeout=10.0
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise Unavailable(f"profile service: {exc.code().name} {exc.details()}") from None

    async def ready(self, names: Sequence[str], timeout: float = 600.0) -> None:
        """Wait until the profile service has backfilled every named computed trait."""
        wanted = set(names)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                listed = await self.stub.ListComputedTraits(
                    profile_pb2.ListComputedTraitsRequest(), metadata=self.metadata, timeout=10.0
                )
            except grpc.aio.AioRpcError as exc:
                raise FailedPrecondition(
                    f"could not follow computed traits on the profile service: {exc.code().name} {exc.details()}",
                    reason="profile_unavailable",
                ) from None
            states = {t.definition.name: t.state for t in listed.traits}
            missing = wanted - states.keys()
            if missing:
                raise FailedPrecondition(
                    f"computed traits {', '.join(sorted(missing))} vanished from the profile service",
                    reason="trait_missing",
                )
            if all(states[name] == "ready" for name in wanted):
                return
            if loop.time() > deadline:
                raise Unavailable("the profile service is still backfilling the event conditions it was given")
            await asyncio.sleep(0.1)
