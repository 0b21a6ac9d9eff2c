"""The part of PrivacyService/ExportPerson every service shares: the request's checks (a person is
required, an id no store can hold as a key is refused naming its field, merged ids are deduplicated
and never the person again) and the answer as plain JSON
(tuples and sets as lists, numpy numbers as floats, a non-finite number by its name, times RFC 3339)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf import json_format

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.errors import InvalidArgument
from cdp_kit.person_export import EXPORT_SCOPE, SCOPES, PersonExport, document_struct, rfc3339


def test_every_rpc_needs_the_export_scope():
    assert SCOPES == {"ExportPerson": EXPORT_SCOPE} and EXPORT_SCOPE == "privacy:export"


def test_the_document_is_plain_json():
    struct = document_struct(
        {"at": (1, 2), "tags": {"b", "a"}, "score": np.float32(0.5), "n": np.int64(3), "bad": math.inf, "x": None}
    )
    assert json_format.MessageToDict(struct) == {
        "at": [1.0, 2.0],
        "tags": ["a", "b"],
        "score": 0.5,
        "n": 3.0,
        "bad": "inf",
        "x": None,
    }
    assert rfc3339(0) == "1970-01-01T00:00:00Z" and rfc3339(None) is None


async def test_the_servicer_checks_the_request_and_passes_the_persons_once():
    asked = []

    async def export(person_id, merged, context):
        asked.append((person_id, list(merged)))
        return {"person_id": person_id}

    servicer = PersonExport("test", export)
    request = privacy_pb2.ExportPersonRequest(person_id="p1", merged_person_ids=["p0", "p1", "p0"])
    answer = await servicer.ExportPerson(request, None)
    assert answer.service == "test" and json_format.MessageToDict(answer.document) == {"person_id": "p1"}
    assert asked == [("p1", ["p0"])]
    with pytest.raises(InvalidArgument) as caught:
        await servicer.ExportPerson(privacy_pb2.ExportPersonRequest(), None)
    assert caught.value.field == "person_id"
    with pytest.raises(InvalidArgument) as caught:
        await servicer.ExportPerson(privacy_pb2.ExportPersonRequest(person_id="p1", merged_person_ids=[""]), None)
    assert caught.value.field == "merged_person_ids[0]"


async def test_an_id_no_store_can_hold_is_refused_by_the_servicer_before_the_service_is_asked():
    asked = []

    async def export(person_id, merged, context):
        asked.append(person_id)
        return {}

    servicer = PersonExport("test", export)
    for request, field in (
        (privacy_pb2.ExportPersonRequest(person_id="a\x00b"), "person_id"),
        (privacy_pb2.ExportPersonRequest(person_id="p" * 1025), "person_id"),
        (privacy_pb2.ExportPersonRequest(person_id="p1", merged_person_ids=["p0", "x" * 5000]), "merged_person_ids[1]"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            await servicer.ExportPerson(request, None)
        assert caught.value.field == field
    assert asked == []
