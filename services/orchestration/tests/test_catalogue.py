"""Journeys are validated against the catalogue when one is available: the configured file's events,
segments, purposes and field names per root, and the computed traits the profile service defines."""

from __future__ import annotations

import grpc
import orjson
import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.storage import open_store
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.catalogue import CatalogueError, Catalogues, parse_catalogue, read_catalogue
from cdp_orchestration.journeys import Journeys

JOURNEY = {
    "id": "vip",
    "entry": {"event": "Cart Abandoned"},
    "nodes": [
        {"id": "check", "type": "branch", "branches": [{"if": "computed.orders_90d > 2", "next": "offer"}]},
        {
            "id": "offer",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "rank_by": "scores.conversion",
            "template": {"body": "{{ traits.first_name }}, {{ scores.churn_risk }}"},
        },
    ],
}


def _definition() -> pb.JourneyDefinition:
    return pb.JourneyDefinition(json=orjson.dumps(JOURNEY).decode())


async def _problems(catalogues: Catalogues) -> list[tuple[str, str, str]]:
    async with open_store("memory://") as store:
        api = OrchestrationApi(
            journeys=Journeys(store),
            store=store,
            bus=None,  # type: ignore[arg-type]
            partitions=2,
            catalogues=catalogues,
        )
        answer = await api.ValidateJourney(pb.ValidateJourneyRequest(definition=_definition()), None)
    return [(p.node, p.field, p.message) for p in answer.problems]


async def test_an_unknown_field_under_a_catalogued_root_is_refused_naming_node_and_field(tmp_path):
    path = tmp_path / "catalogue.yaml"
    path.write_text("events: [Cart Abandoned]\npurposes: [Marketing]\nfields:\n  scores: [conversion]\n")

    async def computed() -> frozenset[str]:
        return frozenset({"orders_30d"})  # what the profile service defines: not orders_90d

    problems = await _problems(Catalogues(read_catalogue(str(path)), computed))
    assert problems == [
        ("check", "branches[0].if", "reads computed.orders_90d, which is not a known profile field"),
        ("offer", "template", "reads scores.churn_risk, which is not a known profile field"),
    ]
    # Traits are not catalogued: any trait may be read. With the names known, the journey is valid.

    async def all_known() -> frozenset[str]:
        return frozenset({"orders_90d"})

    known = parse_catalogue({"fields": {"scores": ["conversion", "churn_risk"]}})
    assert await _problems(Catalogues(known, all_known)) == []


async def test_without_a_catalogue_or_with_the_profile_service_down_nothing_more_is_checked():
    assert await _problems(Catalogues()) == []

    async def down() -> frozenset[str]:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    assert await _problems(Catalogues(None, down)) == []


def test_a_bad_catalogue_file_is_named():
    with pytest.raises(CatalogueError, match="unknown key 'event'"):
        parse_catalogue({"event": ["x"]})
    with pytest.raises(CatalogueError, match="fields must map roots"):
        parse_catalogue({"fields": {"trait": ["plan"]}})
