"""`cdpctl journey …`, `approvals`, `decisions` and `inbox` as an operator uses them, against an in-process
gRPC server implementing cdp.orchestration.v1 (a small fake: what the CLI itself does — arguments,
output, paging, progress, how a refused call reads — not what orchestration decides)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import grpc
import orjson
import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from grpc_status import rpc_status

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp_kit.errors import InvalidArgument, NotFound
from cdp_kit.interceptors import status_for
from cdpctl.cli import main
from cdpctl.platform import Workspace

CART = {
    "id": "abandoned-cart",
    "name": "Abandoned cart",
    "priority": 50,
    "entry": {"event": "Cart Abandoned"},
    "nodes": [{"id": "remind", "type": "action", "channel": "email"}],
}


def token(offset: int) -> str:
    return base64.urlsafe_b64encode(str(offset).encode()).decode()


def page(items: list, request) -> tuple[list, str]:
    start = int(base64.urlsafe_b64decode(request.page_token).decode()) if request.page_token else 0
    size = request.page_size or 100
    return items[start : start + size], token(start + size) if start + size < len(items) else ""


class FakeOrchestration(orchestration_pb2_grpc.OrchestrationServiceServicer):
    """Journeys in a dict; lists served in pages of the size asked for (capped at 2, so paging shows)."""

    def __init__(self) -> None:
        self.journeys: dict[str, pb.Journey] = {}
        self.requests: list = []
        self.draining = 0  # running instances an archive has yet to end, one per GetJourney
        self.instances = [
            pb.Instance(id=f"i{n}", journey_id="abandoned-cart", person_id="p1", state=pb.INSTANCE_STATE_ENDED)
            for n in range(5)
        ]
        self.approvals = [pb.Approval(action_id="a1", journey_id="welcome", person_id="p1", channel="inapp", value=250)]

    async def _refuse(self, context, error) -> None:
        await context.abort_with_status(rpc_status.to_status(status_for(error)))

    def _document(self, definition: pb.JourneyDefinition) -> dict:
        import yaml

        return yaml.safe_load(definition.yaml) if definition.yaml else orjson.loads(definition.json)

    async def ValidateJourney(self, request, context):
        document = self._document(request.definition)
        problems = []
        if not document.get("nodes"):
            problems.append(pb.Problem(node="", field="nodes", message="is required: at least one node"))
        for node in document.get("nodes", []):
            if node.get("type") == "delay" and "duration" not in node:
                problems.append(pb.Problem(node=node["id"], field="duration", message="is required for a delay"))
        return pb.ValidateJourneyResponse(problems=problems)

    async def CreateJourney(self, request, context):
        self.requests.append(request)
        document = self._document(request.definition)
        if not document.get("nodes"):
            # As the service says it: the message, and the field in the BadRequest details.
            await self._refuse(context, InvalidArgument("nodes", "is required: at least one node"))
        journey = pb.Journey(
            id=document["id"],
            name=document.get("name", ""),
            state=pb.JOURNEY_STATE_DRAFT,
            draft_version=1,
            priority=document.get("priority", 0),
        )
        journey.definition.update(document)
        self.journeys[journey.id] = journey
        return journey

    async def UpdateJourney(self, request, context):
        self.requests.append(request)
        journey = await self._journey(request.journey_id, context)
        journey.draft_version = journey.version + 1
        journey.definition.Clear()
        journey.definition.update(self._document(request.definition))
        return journey

    async def _journey(self, journey_id: str, context) -> pb.Journey:
        if journey_id not in self.journeys:
            await self._refuse(context, NotFound(f"journey {journey_id} does not exist"))
        return self.journeys[journey_id]

    async def PublishJourney(self, request, context):
        self.requests.append(request)
        journey = await self._journey(request.journey_id, context)
        journey.version, journey.draft_version, journey.state = journey.draft_version, 0, pb.JOURNEY_STATE_ACTIVE
        return journey

    async def PauseJourney(self, request, context):
        journey = await self._journey(request.journey_id, context)
        journey.state = pb.JOURNEY_STATE_PAUSED
        return journey

    async def ResumeJourney(self, request, context):
        journey = await self._journey(request.journey_id, context)
        journey.state = pb.JOURNEY_STATE_ACTIVE
        return journey

    async def ArchiveJourney(self, request, context):
        journey = await self._journey(request.journey_id, context)
        journey.state = pb.JOURNEY_STATE_ARCHIVED
        journey.active_instances = self.draining
        return journey

    async def GetJourney(self, request, context):
        journey = await self._journey(request.journey_id, context)
        self.draining = max(0, self.draining - 1)
        journey.active_instances = self.draining
        return journey

    async def ListJourneys(self, request, context):
        wanted = set(request.states) or {pb.JOURNEY_STATE_DRAFT, pb.JOURNEY_STATE_ACTIVE, pb.JOURNEY_STATE_PAUSED}
        items, next_token = page([j for j in self.journeys.values() if j.state in wanted], request)
        return pb.ListJourneysResponse(journeys=items, next_page_token=next_token)

    async def Enroll(self, request, context):
        self.requests.append(request)
        if request.journey_id == "paused-one":
            return pb.EnrollResponse(entered=False, reason="paused")
        return pb.EnrollResponse(entered=True, instance_id="i-new")

    async def ExitInstance(self, request, context):
        self.requests.append(request)
        return pb.Instance(id=request.instance_id, state=pb.INSTANCE_STATE_ENDED, end_reason=f"api:{request.reason}")

    async def ListInstances(self, request, context):
        self.requests.append(request)
        if not request.person_id and not request.journey_id:
            await self._refuse(context, InvalidArgument("person_id", "name a person or a journey"))
        request.page_size = min(request.page_size, 2)
        items, next_token = page(self.instances, request)
        return pb.ListInstancesResponse(instances=items, next_page_token=next_token)

    async def ListApprovals(self, request, context):
        return pb.ListApprovalsResponse(approvals=self.approvals)

    async def ApproveAction(self, request, context):
        self.requests.append(request)
        if request.action_id != "a1":
            await self._refuse(context, NotFound(f"no approval for action {request.action_id}"))
        return pb.Approval(action_id="a1", state=pb.APPROVAL_STATE_APPROVED, decided_by=request.decided_by)

    async def RejectAction(self, request, context):
        return pb.Approval(action_id=request.action_id, state=pb.APPROVAL_STATE_REJECTED)

    async def GetJourneyStats(self, request, context):
        stats = pb.JourneyStats(journey_id=request.journey_id, entered=200, active=3, converted=31)
        stats.ended["completed"] = 150
        stats.ended["exit_rule:purchased"] = 47
        stats.decisions["sent"] = 140
        stats.variants.extend(
            [
                pb.VariantStats(split_node="split", variant="control", control=True, entered=100, converted=10),
                pb.VariantStats(
                    split_node="split", variant="email", entered=100, converted=21, uplift=0.11, p_value=0.031
                ),
            ]
        )
        return stats

    async def ListDecisions(self, request, context):
        self.requests.append(request)
        if request.person_id == "p-deleted":
            # What orchestration answers for a person a privacy deletion forgot (api_reads._refuse_deleted).
            why = (
                "person p-deleted was deleted (privacy request req-7, received 2026-12-06T09:00:00Z): "
                "orchestration keeps no decisions, nor anything else, about them"
            )
            await self._refuse(context, NotFound(why, reason="person_deleted"))
        if request.person_id == "p-held":
            # What orchestration lists first for an action waiting for the profile (no decision yet).
            held = pb.Decision(
                action_id="act-3",
                journey_id="abandoned-cart",
                person_id=request.person_id,
                channel="email",
                kind=pb.DECISION_KIND_DEFERRED,
                reason="held: waiting for the profile to apply the person's latest event (no decision yet)",
                rule="profile_wait",
            )
            held.until.FromSeconds(1_790_000_600)
            held.decided_at.FromSeconds(1_790_000_000)
            return pb.ListDecisionsResponse(decisions=[held])
        if request.person_id == "p-kept-out":
            # What orchestration lists for a trigger the journey's entry rules turned away (no action).
            kept = pb.Decision(
                journey_id="winback",
                person_id=request.person_id,
                kind=pb.DECISION_KIND_NOT_ENTERED,
                reason="not entered: re-entry allowed once every 30 days, last entered 2026-12-01 10:00:00 UTC",
                rule="cooldown",
            )
            kept.decided_at.FromSeconds(1_790_000_000)
            return pb.ListDecisionsResponse(decisions=[kept])
        if request.person_id == "p-none":
            return pb.ListDecisionsResponse()
        decided = pb.Decision(
            action_id="act-2",
            journey_id="renewal",
            person_id=request.person_id,
            channel="email",
            kind=pb.DECISION_KIND_SUPPRESSED,
            reason="suppressed by rule no-offers-after-ticket",
            rule="no-offers-after-ticket",
        )
        sent = pb.Decision(action_id="act-1", journey_id="abandoned-cart", kind=pb.DECISION_KIND_SENT, reason="sent")
        return pb.ListDecisionsResponse(decisions=[decided, sent])

    async def ListInbox(self, request, context):
        message = pb.InboxMessage(message_id="m1", person_id=request.person_id, title="A bonus for you", body="250")
        return pb.ListInboxResponse(messages=[message])


@pytest.fixture
async def orchestration(tmp_path):
    server = grpc.aio.server()
    fake = FakeOrchestration()
    orchestration_pb2_grpc.add_OrchestrationServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    ws.write_run(
        {"pid": os.getpid(), "nats": "nats://127.0.0.1:1", "services": {"orchestration": {"grpc": f"127.0.0.1:{port}"}}}
    )
    yield fake, ws.root
    await server.stop(0)


async def cdpctl(home: Path, *args: str, stdin: str | None = None):
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, main, ["--home", str(home), *args], input=stdin)


def journey_file(tmp_path: Path, document: dict, suffix: str = ".json") -> str:
    path = tmp_path / f"journey{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(document))
    else:
        import yaml

        path.write_text(yaml.safe_dump(document))
    return str(path)


async def test_validate_lists_every_problem_with_its_node_and_field(orchestration, tmp_path):
    _fake, home = orchestration
    broken = {**CART, "nodes": [{"id": "wait", "type": "delay"}, {"id": "later", "type": "delay"}]}
    result = await cdpctl(home, "journey", "validate", journey_file(tmp_path, broken))
    assert result.exit_code == 1
    assert "2 problems" in result.output
    assert result.output.count("duration") == 2 and "wait" in result.output and "later" in result.output

    result = await cdpctl(home, "journey", "validate", journey_file(tmp_path, broken, ".yaml"), "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["problems"] == [
        {"node": "wait", "field": "duration", "message": "is required for a delay"},
        {"node": "later", "field": "duration", "message": "is required for a delay"},
    ]
    result = await cdpctl(home, "journey", "validate", journey_file(tmp_path, CART))
    assert result.exit_code == 0 and "valid" in result.output


async def test_a_refused_journey_names_the_field_on_the_terminal_and_in_json(orchestration, tmp_path):
    _fake, home = orchestration
    empty = {**CART, "nodes": []}
    result = await cdpctl(home, "journey", "create", journey_file(tmp_path, empty))
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT: nodes: is required: at least one node" in result.output
    result = await cdpctl(home, "journey", "create", journey_file(tmp_path, empty), "--json")
    assert result.exit_code == 1
    assert json.loads(result.output) == {
        "error": {
            "code": "INVALID_ARGUMENT",
            "message": "nodes: is required: at least one node",
            "fields": [{"field": "nodes", "description": "is required: at least one node"}],
        }
    }
    result = await cdpctl(home, "journey", "publish", "nowhere")
    assert result.exit_code == 1 and "NOT_FOUND: journey nowhere does not exist" in result.output
    result = await cdpctl(home, "journey", "create", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "cannot read" in result.output
    utf16 = tmp_path / "utf16.json"
    utf16.write_text('{"id": "welcome"}', encoding="utf-16")  # an editor's "Unicode": a traceback before
    result = await cdpctl(home, "journey", "create", str(utf16))
    assert result.exit_code == 2 and "not UTF-8 text" in result.output


async def test_a_journey_from_file_to_archived(orchestration, tmp_path):
    fake, home = orchestration
    result = await cdpctl(home, "journey", "create", journey_file(tmp_path, CART, ".yaml"), "--publish")
    assert result.exit_code == 0, result.output
    assert "journey abandoned-cart (Abandoned cart): active, live v1" in result.output
    assert fake.requests[0].definition.yaml, "a YAML file goes as YAML: the service parses it and names the node"

    # A new draft: the journey's id comes from the file.
    changed = {**CART, "name": "Abandoned cart, v2"}
    result = await cdpctl(home, "journey", "update", journey_file(tmp_path, changed))
    assert result.exit_code == 0, result.output
    assert fake.requests[-1].journey_id == "abandoned-cart"
    assert "live v1, draft v2" in result.output
    result = await cdpctl(home, "journey", "publish", "abandoned-cart", "--map-by-node-id")
    assert result.exit_code == 0 and "live v2" in result.output
    assert fake.requests[-1].migration == pb.MIGRATION_MAP_BY_NODE_ID

    assert "paused" in (await cdpctl(home, "journey", "pause", "abandoned-cart")).output
    assert "active" in (await cdpctl(home, "journey", "resume", "abandoned-cart")).output
    listed = json.loads((await cdpctl(home, "journey", "list", "--json")).output)
    assert [(j["id"], j["state"]) for j in listed] == [("abandoned-cart", "JOURNEY_STATE_ACTIVE")]
    document = json.loads((await cdpctl(home, "journey", "get", "abandoned-cart", "--json")).output)
    assert document["definition"]["name"] == "Abandoned cart, v2"

    # Archiving waits until the running instances have ended.
    fake.draining = 3
    result = await cdpctl(home, "journey", "archive", "abandoned-cart")
    assert result.exit_code == 0, result.output
    assert "archived" in result.output and fake.draining == 0
    assert (await cdpctl(home, "journey", "list", "--json")).output.strip() == "[]"
    archived = json.loads((await cdpctl(home, "journey", "list", "--state", "archived", "--json")).output)
    assert [j["id"] for j in archived] == ["abandoned-cart"]


async def test_update_needs_a_file_that_names_its_journey(orchestration, tmp_path):
    _fake, home = orchestration
    nameless = {k: v for k, v in CART.items() if k != "id"}
    result = await cdpctl(home, "journey", "update", journey_file(tmp_path, nameless, ".yaml"))
    assert result.exit_code == 2 and "`id` field is missing" in result.output


async def test_enroll_exit_and_instances_page_after_page(orchestration):
    fake, home = orchestration
    result = await cdpctl(home, "journey", "enroll", "welcome", "p1", "--properties", '{"amount": 250}')
    assert result.exit_code == 0 and "entered: instance i-new" in result.output
    assert json_format.MessageToDict(fake.requests[-1].properties) == {"amount": 250}
    result = await cdpctl(home, "journey", "enroll", "paused-one", "p1")
    assert result.exit_code == 1 and "not entered: paused" in result.output
    result = await cdpctl(home, "journey", "enroll", "welcome", "p1", "--properties", "[1]")
    assert result.exit_code == 2 and "--properties" in result.output

    result = await cdpctl(home, "journey", "exit", "i-new", "--reason", "complaint")
    assert result.exit_code == 0 and "ended (api:complaint)" in result.output

    # The service answers two at a time: every page is followed.
    listed = json.loads((await cdpctl(home, "journey", "instances", "--person", "p1", "--json")).output)
    assert [i["id"] for i in listed] == ["i0", "i1", "i2", "i3", "i4"]
    limited = json.loads(
        (await cdpctl(home, "journey", "instances", "--journey", "x", "--limit", "3", "--json")).output
    )
    assert [i["id"] for i in limited] == ["i0", "i1", "i2"]
    result = await cdpctl(home, "journey", "instances")
    assert result.exit_code == 2 and "exactly one of --person and --journey" in result.output


async def test_approvals_decisions_stats_and_inbox(orchestration):
    fake, home = orchestration
    result = await cdpctl(home, "approvals")
    assert result.exit_code == 0 and "a1" in result.output and "250" in result.output
    result = await cdpctl(home, "approvals", "approve", "a1", "--note", "loyal customer", "--by", "ops-anna")
    assert result.exit_code == 0 and "action a1: approved" in result.output
    assert (fake.requests[-1].decided_by, fake.requests[-1].note) == ("ops-anna", "loyal customer")
    result = await cdpctl(home, "approvals", "approve", "a9")
    assert result.exit_code == 1 and "NOT_FOUND" in result.output
    assert "rejected" in (await cdpctl(home, "approvals", "reject", "a1")).output

    # Why didn't p1 get the renewal offer: the rule that suppressed it, by name.
    result = await cdpctl(home, "decisions", "p1")
    assert result.exit_code == 0
    assert "suppressed" in result.output and "no-offers-after-ticket" in result.output
    decided = json.loads((await cdpctl(home, "decisions", "p1", "--journey", "renewal", "--json")).output)
    assert decided[0]["kind"] == "DECISION_KIND_SUPPRESSED" and fake.requests[-1].journey_id == "renewal"

    result = await cdpctl(home, "journey", "stats", "abandoned-cart")
    assert result.exit_code == 0
    assert "200 entered" in result.output and "31 converted" in result.output
    assert "+11.00%" in result.output and "0.031" in result.output
    stats = json.loads((await cdpctl(home, "journey", "stats", "abandoned-cart", "--json")).output)
    assert stats["ended"] == {"completed": "150", "exit_rule:purchased": "47"}

    inbox = json.loads((await cdpctl(home, "inbox", "p1", "--json")).output)
    assert inbox[0]["title"] == "A bonus for you"


async def test_without_a_running_platform_it_says_how_to_point_at_one(tmp_path):
    result = await cdpctl(tmp_path / "nowhere", "journey", "list")
    assert result.exit_code == 2 and "--address" in result.output


async def test_the_instances_table_shows_whole_ids(orchestration):
    # The ids an operator copies into `journey exit INSTANCE_ID` or `decisions PERSON_ID` were cut to
    # "i69529039e53c523f…" in a 160-column table, as the README's walkthrough shows them.
    fake, home = orchestration
    instance, person = "i69529039e53c523fd06b4780d3f432c0", "p_7f3bf83c9ef5970e60142b03"
    fake.instances = [
        pb.Instance(
            id=instance,
            journey_id="abandoned-cart",
            journey_version=1,
            person_id=person,
            state=pb.INSTANCE_STATE_ENDED,
            node_id="wait",
            end_reason="exit_rule:purchased",
            converted=True,
        )
    ]
    result = await cdpctl(home, "journey", "instances", "--journey", "abandoned-cart")
    assert result.exit_code == 0, result.output
    assert instance in result.output and person in result.output, result.output
    assert "exit_rule:purchased" in result.output.replace("\n", "").replace("│", "").replace(" ", ""), result.output


async def test_decisions_show_an_action_held_for_the_profile_as_held_with_its_latest_time(orchestration):
    _fake, home = orchestration
    result = await cdpctl(home, "decisions", "p-held")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "held" in output and "waiting for the profile" in output and "profile_wait" in output
    assert "act-3" in output and "deferred" not in output
    assert "decided by" in output and "at the latest" in output


async def test_decisions_show_an_entry_the_journeys_rules_turned_away(orchestration):
    # "Why didn't Ada get it" when no action was ever proposed: the journey, the rule and when, not "no
    # journey has tried to reach them".
    _fake, home = orchestration
    result = await cdpctl(home, "decisions", "p-kept-out")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.replace("│", " ").split())
    assert "not_entered" in output and "winback" in output and "cooldown" in output
    assert "no journey has tried" not in output
    result = await cdpctl(home, "decisions", "p-none")
    output = " ".join(result.output.split())
    assert "no journey has tried to reach them or turned them away at its entry" in output


async def test_decisions_of_a_deleted_person_say_they_were_deleted_not_that_no_journey_reached_them(orchestration):
    # A support trial read "no journey has tried to reach them" for a person deleted an hour before.
    _fake, home = orchestration
    result = await cdpctl(home, "decisions", "p-deleted")
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "NOT_FOUND: person p-deleted was deleted (privacy request req-7" in output
    assert "no journey has tried" not in output
    answer = json.loads((await cdpctl(home, "decisions", "p-deleted", "--json")).output)
    assert answer["error"]["code"] == "NOT_FOUND" and "was deleted" in answer["error"]["message"]


def test_journey_list_says_which_versions_no_longer_validate_and_how_to_fix_it():
    from cdpctl.journeys import _journey_line

    fine = {"id": "cart", "name": "Cart", "state": "JOURNEY_STATE_ACTIVE", "version": "2"}
    assert _journey_line(fine) == "journey cart (Cart): active, live v2"
    refused = {**fine, "invalid": "v2: JourneyInvalid (field nodes.remind.template.body)"}
    line = _journey_line(refused)
    assert "NO LONGER VALIDATES: v2: JourneyInvalid (field nodes.remind.template.body)" in line
    assert "publish a fixed version" in line


def test_journey_list_says_when_a_live_journeys_segment_was_deleted():
    from cdpctl.journeys import _journey_line

    gone = "enters on segment 'vip', which does not exist any more (deleted in segmentation): nobody enters"
    journey = {"id": "vip", "name": "VIP", "state": "JOURNEY_STATE_ACTIVE", "version": "1", "warnings": [gone]}
    assert _journey_line(journey) == f"journey vip (VIP): active, live v1 - WARNING: {gone}"
