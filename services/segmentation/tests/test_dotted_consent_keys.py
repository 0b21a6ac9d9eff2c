"""A consent category whose name holds a dot ("ads.personalised": the collector accepts it, the profile keeps
it as the consent key `purpose:ads.personalised`) is a segment's field in both forms, through the API: the
text `` consent.`purpose:ads.personalised` ``, the tree `{"field": ["consent", "purpose:ads.personalised"]}`.
The segment shows both forms back (what `cdpctl segments` prints), each reading the same field, and
ExplainMembership names the field as the language writes it."""

from __future__ import annotations

import pytest
from google.protobuf import json_format, struct_pb2

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_segmentation.domain import from_json, parse
from cdp_segmentation.hints import definition_warnings

from .test_explain import ADMIN, TRUE, leaves, running


@pytest.fixture
async def service(nats_server, tmp_path):
    async with running(nats_server.url, tmp_path) as started:
        yield started


TEXT = "consent.`purpose:ads.personalised` = true"
TREE = {"field": ["consent", "purpose:ads.personalised"], "op": "=", "value": True}


def consented(person: str, **keys: bool) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    message.at.GetCurrentTime()
    for key, granted in keys.items():
        message.consent[key] = granted
    return message


async def test_a_consent_key_with_a_dot_makes_a_segment_in_both_forms(service):
    await service.feed(
        consented("p_ann", **{"purpose:ads.personalised": True, "purpose:ads": False}),
        consented("p_bob", **{"purpose:ads.personalised": False, "purpose:ads": True}),
    )
    by_text = await service.create("ads_text", TEXT)
    tree = json_format.ParseDict(TREE, struct_pb2.Struct())
    by_tree = await service.stub.CreateSegment(
        pb.CreateSegmentRequest(id="ads_tree", definition=pb.Definition(tree=tree), wait=True), metadata=ADMIN
    )
    for segment in (by_text, by_tree):
        # Shown back in both forms, each parsing to the same definition.
        assert segment.text == TEXT
        assert json_format.MessageToDict(segment.tree) == TREE
        assert parse(segment.text) == from_json(json_format.MessageToDict(segment.tree))
        assert service.engine.members[segment.id] == {"p_ann"}  # not Bob: his is the key purpose:ads

    answer = await service.explain("ads_text", "p_ann")
    assert answer.member and answer.tree.result == TRUE
    assert list(leaves(answer.tree)[TEXT].fields) == ["consent.`purpose:ads.personalised`"]
    assert parse(f"{answer.tree.fields[0]} exists") == parse("consent.`purpose:ads.personalised` exists")


async def test_a_warning_names_such_a_key_as_a_definition_writes_it():
    """The warnings for a definition name fields and suggest names that read back as those fields."""
    rows = [{"consent.purpose:ads.personalised": True}, {"consent.purpose:email": True}]
    [typo] = await definition_warnings(parse("consent.`purpose:ads.personalized` = true"), rows)
    assert typo == (
        "consent.`purpose:ads.personalized`: no profile has this consent key; "
        "did you mean consent.`purpose:ads.personalised`?"
    )
    [text] = await definition_warnings(parse('consent.`purpose:ads.personalised` = "yes"'), rows)
    assert text == "consent.`purpose:ads.personalised` is compared with text, but the profiles hold true/false there"
