"""A person's access request answered by every service: `cdpctl export` on the platform as `make up` runs it.

Ada browses anonymously, signs in on another device, then the visitor identifies as Ada (identity merges
the two persons); she is on the VIP plan, so she enters a segment. Bob goes the same way. The operator
exports Ada as the README shows (`cdpctl export user_id ... -o FILE`): one owner-only file holding each
service's part - identity's graph with both identifiers and the merge, profile's record, the segment
membership, scoring's held fields, orchestration's part (with the answer to an Enroll whose idempotency
key the caller made of her email) and the CRM connector's - nothing missing, and nothing of Bob.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_testing.platform_run import CDPCTL, RunningPlatform

ADA, ADA_VISITOR, ADA_EMAIL = "u-export-ada-3f1", "anon-export-ada-3f1", "ada.export-3f1@example.org"
BOB, BOB_VISITOR, BOB_EMAIL = "u-export-bob-9c2", "anon-export-bob-9c2", "bob.export-9c2@example.org"
EVERY_SERVICE = {"identity", "profile", "segmentation", "scoring", "orchestration", "crm"}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    running = RunningPlatform(tmp_path_factory.mktemp("export"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def cdpctl(platform: RunningPlatform, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CDPCTL, *args], env=platform.env, capture_output=True, text=True, timeout=120)


def send(platform: RunningPlatform, *events: dict) -> None:
    url = platform.service("collector")["http"].rstrip("/") + "/v1/batch"
    auth = "Basic " + base64.b64encode(f"{platform.write_key}:".encode()).decode()
    body = json.dumps({"batch": list(events)}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", "Authorization": auth})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def until(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except grpc.RpcError:
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.3)


def test_an_export_holds_every_services_part_of_the_person_and_nothing_of_anyone_else(platform, tmp_path):
    auth = platform.admin_metadata
    with grpc.insecure_channel(platform.grpc_address("segmentation")) as channel:
        segmentation_pb2_grpc.SegmentationServiceStub(channel).CreateSegment(
            segmentation_pb2.CreateSegmentRequest(
                id="export-vip", definition=segmentation_pb2.Definition(text='traits.plan = "vip"'), wait=True
            ),
            metadata=auth,
            timeout=60,
        )
    profile_channel = grpc.insecure_channel(platform.grpc_address("profile"))

    def person_of(kind: str, value: str) -> str:
        lookup = profile_pb2.LookupProfileRequest(identifier_type=kind, identifier_value=value)
        return (
            profile_pb2_grpc.ProfileServiceStub(profile_channel)
            .LookupProfile(lookup, metadata=auth, timeout=10)
            .person_id
        )

    for user, visitor, email in ((ADA, ADA_VISITOR, ADA_EMAIL), (BOB, BOB_VISITOR, BOB_EMAIL)):
        send(
            platform,
            {"type": "page", "anonymousId": visitor, "name": "Pricing", "messageId": f"{user}-page"},
            {"type": "track", "userId": user, "event": "Signed In", "messageId": f"{user}-in"},
        )
        # Two persons first: the identify below merges them. The page goes to the anonymous id's partition,
        # the track and the identify to the user id's, and identity reads its partitions side by side: an
        # identify applied before the page would give the visitor to the user's person, and no merge
        # happens. The profile has the visitor's person once identity applied the page.
        until(lambda visitor=visitor: person_of("anonymous_id", visitor), f"{user}'s visitor as a person")
        until(lambda user=user: person_of("user_id", user), f"{user} as a person")
        send(
            platform,
            {
                "type": "identify",
                "userId": user,
                "anonymousId": visitor,
                "traits": {"plan": "vip", "email": email},
                "messageId": f"{user}-id",
            },
        )
    profile_channel.close()
    with grpc.insecure_channel(platform.grpc_address("profile")) as channel:
        profiles = profile_pb2_grpc.ProfileServiceStub(channel)
        lookup = profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value=ADA)
        until(lambda: profiles.LookupProfile(lookup, metadata=auth, timeout=10).merged_from, "Ada's merge")
        persons = {
            user: profiles.LookupProfile(
                profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value=user),
                metadata=auth,
                timeout=10,
            ).person_id
            for user in (ADA, BOB)
        }
    # Both enrolled through the API, under idempotency keys made of their emails (the caller's choice).
    welcome = {
        "id": "export-welcome",
        "entry": {"api": True},
        "nodes": [{"id": "later", "type": "delay", "duration": "1h"}],
    }
    with grpc.insecure_channel(platform.grpc_address("orchestration")) as channel:
        journeys = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
        definition = orchestration_pb2.JourneyDefinition(json=json.dumps(welcome))
        journeys.CreateJourney(orchestration_pb2.CreateJourneyRequest(definition=definition), metadata=auth, timeout=30)
        journeys.PublishJourney(
            orchestration_pb2.PublishJourneyRequest(journey_id="export-welcome"), metadata=auth, timeout=30
        )
        for user, email in ((ADA, ADA_EMAIL), (BOB, BOB_EMAIL)):
            enroll = orchestration_pb2.EnrollRequest(
                journey_id="export-welcome", person_id=persons[user], idempotency_key=f"signup-{email}"
            )
            assert journeys.Enroll(enroll, metadata=auth, timeout=60).entered

    exported = tmp_path / "ada.json"
    seen: list = []  # the last attempt: what cdpctl said and which services answered, for the failure text

    def export() -> dict | None:
        result = cdpctl(platform, "export", "user_id", ADA, "-o", str(exported))
        document = json.loads(exported.read_text()) if exported.exists() else {}
        parts = document.get("services", {})
        seen[:] = [result.returncode, result.stderr[-500:], document.get("missing"), sorted(parts)]
        # Segmentation and scoring follow profile's changes: the export is retried until they hold Ada's.
        ready = "export-vip" in str(parts.get("segmentation")) and "traits.email" in str(parts.get("scoring"))
        return {"result": result, "document": document} if ready and result.returncode == 0 else None

    try:
        found = until(export, "every service's part of Ada", timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last attempt: {seen}") from None
    document, result = found["document"], found["result"]
    assert f"exported to {exported}" in result.stdout + result.stderr
    assert Path(exported).stat().st_mode & 0o077 == 0
    assert document["missing"] == [] and set(document["services"]) == EVERY_SERVICE
    assert document["exported_at"].endswith("Z")
    person_id, merged = document["person_id"], document["merged_person_ids"]
    assert len(merged) == 1 and merged[0] != person_id

    parts = document["services"]
    [graph] = parts["identity"]["persons"]
    assert graph["person_id"] == person_id
    assert {(i["type"], i["value"]) for i in graph["identifiers"]} >= {
        ("user_id", ADA),
        ("anonymous_id", ADA_VISITOR),
        ("email", ADA_EMAIL),
    }
    assert [m["loser"] for m in graph["merges"]] == merged
    assert parts["profile"]["person_id"] == person_id and parts["profile"]["merged_from"] == merged
    assert parts["profile"]["traits"]["plan"]["current"]["value"] == "vip"
    [membership] = [m for p in parts["segmentation"]["persons"] for m in p["memberships"]]
    assert membership["segment_id"] == "export-vip"
    scoring = {p["person_id"]: p for p in parts["scoring"]["persons"]}
    assert scoring[person_id]["fields"]["traits.email"] == ADA_EMAIL
    assert isinstance(parts["crm"], dict)
    [enrolled] = parts["orchestration"]["enrollments"]
    assert (enrolled["journey_id"], enrolled["idempotency_key"]) == ("export-welcome", f"signup-{ADA_EMAIL}")
    assert enrolled["person_id"] == person_id and enrolled["entered"] is True

    text = exported.read_text()
    for value in (BOB, BOB_VISITOR, BOB_EMAIL):
        assert value not in text, f"Bob's {value!r} is in Ada's export"
