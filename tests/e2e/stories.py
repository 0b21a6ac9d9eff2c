"""What the story tests share: the platform as `make up` runs it, and the ways a customer's app, an
operator and a CRM user reach it.

`Story` wraps a `RunningPlatform` (`cdpctl up` in a temporary workspace: every service, the local channel
servers and the CRM emulators) and speaks to it only through what the platform offers its users:

- events go in through the collector's Segment HTTP API (`/v1/batch`, the dev source's write key), with
  stable messageIds and the batch sent again until it is accepted, as an SDK does;
- segments and journeys are defined through the segmentation and orchestration gRPC APIs with the admin
  token; profiles, decisions and instances are read back the same way;
- what a customer or a CRM user sees is read where they would see it: the local mailbox (a maildir), the
  webhook receiver's list of deliveries, the CRM emulators' own HTTP APIs.

Every identifier a story sends (user and anonymous ids, emails, phone numbers, device ids, IP addresses)
is kept in `Story.identifiers`; `register` adds values sent some other way. When a story module ends,
conftest.py reads every log line its platform wrote and fails on any of them, or on any secret of the
workspace (write keys, tokens, NATS passwords, the CRMs' credentials).

Time: the platform runs on the real clock. Stories that need a person's 2 a.m. pick the person's time
zone (a `traits.timezone`) in which it is 2 a.m. now, and history is sent with past event timestamps.
"""

from __future__ import annotations

import asyncio
import base64
import email
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import nats.js.errors
import yaml

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_testing.platform_run import PlatformError, RunningPlatform

SALESFORCE_API = "/services/data/v62.0"


def start_platform(workdir: Path, env: dict[str, str] | None = None) -> RunningPlatform:
    """`cdpctl up` in `workdir`, started again once if a port it picked was taken before a service bound
    it (other processes on a shared machine pick ports too; `cdpctl up` then stops at start-up)."""
    for attempt in (1, 2):
        platform = RunningPlatform(workdir / f"attempt-{attempt}", env=env)
        try:
            return platform.start()
        except PlatformError as exc:
            if attempt == 2 or "Address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


def eventually(check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """`check()` until it returns something true (which is returned); its last answer in the failure."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (grpc.RpcError, OSError, LookupError, ValueError) as exc:  # not there yet
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s; last: {last!r}")
        time.sleep(every)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def http_json(url: str, body: Any = None, *, method: str | None = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}, method=method or ("POST" if data else "GET")
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read()
    return json.loads(text) if text else None


# Every Story made, in order: conftest.py audits the logs of those a module made when it ends.
OPENED: list[Story] = []

# Where a Segment event carries an identifier of a person (dotted paths).
IDENTIFIER_PATHS = (
    "userId", "anonymousId", "previousId",
    "traits.email", "traits.phone", "context.traits.email", "context.traits.phone",
    "context.device.id", "context.ip",
)  # fmt: skip


def _at(event: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        event = event.get(part) if isinstance(event, dict) else None
    return event


def orchestration_caught_up(platform: RunningPlatform, timeout: float = 30) -> None:
    """Until orchestration has applied everything the streams it reads held when this was called, and its
    dispatchers have worked through what it published: ORCHESTRATION holds the last message of each
    subject it sources (`sourced`), then orchestration's engine consumers, then its dispatchers, hold
    nothing unread or unacknowledged. Each step is waited for after the one before. A test waits for
    this, not a fixed time, before reading what orchestration knows or asserting it sent nothing."""
    eventually(lambda: sourced(platform, "ORCHESTRATION"), timeout)
    eventually(lambda: drained(platform, "ORCHESTRATION", r"orchestration-p\d+"), timeout)
    eventually(lambda: drained(platform, "ACTIONS", r"orchestration-dispatch-.+", required=False), timeout)


def sourced(platform: RunningPlatform, stream: str) -> bool:
    """Whether `stream` holds, of each subject its sources take (their subject transforms' `src`), the
    last message the source stream holds (read from its `Nats-Stream-Source` headers, newest first)."""

    async def look() -> bool:
        nc = await platform.connect_nats()
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            wanted: dict[str, int] = {}  # source stream -> the last sequence it holds of what is sourced
            for source in info.config.sources or []:
                for transform in source.subject_transforms or []:
                    held = await js.stream_info(source.name, subjects_filter=transform.src)
                    for subject in held.state.subjects or {}:
                        last = (await js.get_last_msg(source.name, subject)).seq
                        wanted[source.name] = max(wanted.get(source.name, 0), last)
            seen: dict[str, int] = {}
            seq = info.state.last_seq
            while seq >= info.state.first_seq and any(seen.get(n, 0) < last for n, last in wanted.items()):
                try:
                    message = await js.get_msg(stream, seq)
                except nats.js.errors.NotFoundError:  # deleted
                    seq -= 1
                    continue
                name, _, rest = ((message.headers or {}).get("Nats-Stream-Source") or "").partition(" ")
                if name:
                    seen[name] = max(seen.get(name, 0), int(rest.split(" ")[0]))
                seq -= 1
            return all(seen.get(name, 0) >= last for name, last in wanted.items())
        finally:
            await nc.close()

    return asyncio.run(look())


def drained(platform: RunningPlatform, stream: str, consumers: str, *, required: bool = True) -> bool:
    """Whether the durable consumers of `stream` named like `consumers` (one at least, when `required`)
    hold nothing unread or unacknowledged."""

    async def look() -> bool:
        nc = await platform.connect_nats()
        try:
            found = [c for c in await nc.jetstream().consumers_info(stream) if re.fullmatch(consumers, c.name)]
        finally:
            await nc.close()
        return (bool(found) or not required) and all(c.num_pending == 0 and c.num_ack_pending == 0 for c in found)

    return asyncio.run(look())


class Story:
    """One platform and the people in one story module."""

    def __init__(self, platform: RunningPlatform) -> None:
        self.platform = platform
        self.identifiers: set[str] = set()
        OPENED.append(self)
        self.metadata = platform.admin_metadata
        self._channels = {name: grpc.insecure_channel(platform.grpc_address(name)) for name in platform.run["services"]}
        self.profiles = profile_pb2_grpc.ProfileServiceStub(self._channels["profile"])
        self.segments = segmentation_pb2_grpc.SegmentationServiceStub(self._channels["segmentation"])
        self.journeys = orchestration_pb2_grpc.OrchestrationServiceStub(self._channels["orchestration"])
        self.crm = crm_pb2_grpc.CrmServiceStub(self._channels["crm"])
        self._collector = platform.service("collector")["http"].rstrip("/") + "/v1/batch"
        self._auth = "Basic " + base64.b64encode(f"{platform.write_key}:".encode()).decode()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # ---------------------------------------------------------------------------------- the customer's app

    def send(self, *events: dict[str, Any]) -> None:
        """One Segment batch, sent again (unchanged) until the collector accepts it."""
        batch = [{"messageId": str(uuid.uuid4()), **event} for event in events]
        for event in batch:
            self.register(*(_at(event, path) for path in IDENTIFIER_PATHS))
        body = json.dumps({"batch": batch}).encode()
        request = urllib.request.Request(
            self._collector, body, {"Content-Type": "application/json", "Authorization": self._auth}, method="POST"
        )
        for _ in range(50):
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    if 200 <= answer.status < 300:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code not in (429, 503):
                    raise AssertionError(f"the collector refused the batch: {exc.code} {exc.read()[:300]!r}") from exc
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the collector did not accept the batch")

    def register(self, *values: Any) -> None:
        """Identifier values no log line may hold (strings; anything else is ignored)."""
        self.identifiers.update(v for v in values if isinstance(v, str) and v)

    def send_many(self, events: list[dict[str, Any]], size: int = 200) -> None:
        for start in range(0, len(events), size):
            self.send(*events[start : start + size])

    # ---------------------------------------------------------------------------------- the operator

    def create_segment(self, segment_id: str, text: str, name: str = "") -> None:
        self.segments.CreateSegment(
            segmentation_pb2.CreateSegmentRequest(
                id=segment_id, name=name or segment_id, definition=segmentation_pb2.Definition(text=text), wait=True
            ),
            metadata=self.metadata,
            timeout=60,
        )

    def publish_journey(self, document: dict[str, Any]) -> None:
        definition = orchestration_pb2.JourneyDefinition(json=json.dumps(document))
        created = self.journeys.CreateJourney(
            orchestration_pb2.CreateJourneyRequest(definition=definition), metadata=self.metadata, timeout=30
        )
        self.journeys.PublishJourney(
            orchestration_pb2.PublishJourneyRequest(journey_id=created.id), metadata=self.metadata, timeout=60
        )

    def person_id(self, user_id: str) -> str:
        return self.profile(user_id).person_id

    def profile(self, user_id: str, identifier_type: str = "user_id") -> profile_pb2.Profile:
        return self.profiles.LookupProfile(
            profile_pb2.LookupProfileRequest(identifier_type=identifier_type, identifier_value=user_id),
            metadata=self.metadata,
            timeout=10,
        )

    def wait_profile(self, user_id: str, check: Callable[[profile_pb2.Profile], Any], timeout: float = 30) -> Any:
        def ready() -> Any:
            profile = self.profile(user_id)
            return profile if check(profile) else None

        return eventually(ready, timeout)

    def wait_scored(self, timeout: float = 60) -> None:
        """Until the profile holds the scores of every change its events made so far (call it once the
        profiles show those events). Each step is the durable consumers of one stream holding nothing
        unread or unacknowledged. The kit's engine acknowledges a batch once what it made is committed
        (in its outbox) and then publishes it, the acknowledgements and the messages in one socket write;
        only a publish JetStream refused and the engine tries again comes later (a test that must see a
        message, not its absence, waits for the message itself): profile's events consumers (its changes are on PROFILES), then scoring's (the scores
        of those changes are on SCORES), then profile's scores consumers (it stored them). Each step is
        waited for after the one before, so it covers everything the earlier one published."""
        for stream, consumers in (
            ("EVENTS_RESOLVED", r"profile-p\d+"),
            ("PROFILES", r"scoring-p\d+"),
            ("SCORES", r"profile-scores-p\d+"),
        ):
            eventually(lambda stream=stream, consumers=consumers: self._drained(stream, consumers), timeout)

    def _drained(self, stream: str, consumers: str) -> bool:
        return drained(self.platform, stream, consumers)

    def orchestration_caught_up(self, timeout: float = 30) -> None:
        """`orchestration_caught_up` on this story's platform."""
        orchestration_caught_up(self.platform, timeout)

    def timeline(self, person_id: str) -> list[profile_pb2.TimelineEvent]:
        events, token = [], ""
        while True:
            page = self.profiles.ListEvents(
                profile_pb2.ListEventsRequest(person_id=person_id, page_size=1000, page_token=token),
                metadata=self.metadata,
                timeout=10,
            )
            events.extend(page.events)
            token = page.next_page_token
            if not token:
                return events

    def members(self, segment_id: str) -> set[str]:
        page = self.segments.ListMembers(
            segmentation_pb2.ListMembersRequest(segment_id=segment_id, page_size=1000),
            metadata=self.metadata,
            timeout=10,
        )
        return {m.person_id for m in page.members}

    def decisions(self, person_id: str, journey_id: str = "") -> list[orchestration_pb2.Decision]:
        return list(
            self.journeys.ListDecisions(
                orchestration_pb2.ListDecisionsRequest(person_id=person_id, journey_id=journey_id, page_size=100),
                metadata=self.metadata,
                timeout=10,
            ).decisions
        )

    def decided(self, person_id: str, journey_id: str = "") -> list[orchestration_pb2.Decision]:
        """The person's decisions without the actions held for the profile (listed first while they wait)."""
        return [d for d in self.decisions(person_id, journey_id) if d.rule != "profile_wait"]

    def instances(self, person_id: str) -> list[orchestration_pb2.Instance]:
        return list(
            self.journeys.ListInstances(
                orchestration_pb2.ListInstancesRequest(person_id=person_id, page_size=100),
                metadata=self.metadata,
                timeout=10,
            ).instances
        )

    def crm_record(self, person_id: str) -> crm_pb2.GetRecordStatusResponse:
        return self.crm.GetRecordStatus(
            crm_pb2.GetRecordStatusRequest(person_id=person_id), metadata=self.metadata, timeout=10
        )

    # ---------------------------------------------------------------------------------- the CRM connector

    def configure_crm(self, document: dict[str, Any]) -> None:
        """Give the connector these connections, as an operator would: the document written where `make up`
        keeps it, the connector restarted (by the supervisor, after a SIGKILL) and serving again."""
        path = Path(self.platform.home) / "crm" / "connections.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        self.platform.wait_restarted("crm", self.platform.kill("crm"))
        self.platform.refresh()
        self._channels["crm"].close()
        self._channels["crm"] = grpc.insecure_channel(self.platform.grpc_address("crm"))
        self.crm = crm_pb2_grpc.CrmServiceStub(self._channels["crm"])

    # ---------------------------------------------------------------------------------- what people see

    def companion_url(self, name: str, listener: str = "api") -> str:
        return self.platform.companion(name)["urls"][listener]

    def mail(self) -> list[email.message.Message]:
        maildir = Path(self.platform.home) / "mail"
        messages = []
        for folder in ("new", "cur"):
            for path in sorted((maildir / folder).glob("*")) if (maildir / folder).is_dir() else ():
                messages.append(email.message_from_bytes(path.read_bytes()))
        return messages

    def webhooks(self) -> list[dict[str, Any]]:
        """What the local webhook receiver accepted, oldest first."""
        base = self.companion_url("channels", "webhook").rsplit("/hooks/", 1)[0]
        return http_json(f"{base}/_deliveries")

    def hubspot(self, path: str, body: Any = None, method: str | None = None) -> Any:
        return http_json(
            self.companion_url("crm-hubspot") + path,
            body,
            method=method,
            headers={"Authorization": "Bearer pat-local-hubspot"},
        )

    def salesforce(self, path: str, body: Any = None, method: str | None = None) -> Any:
        """Salesforce's REST API as a user's tool reaches it (OAuth client credentials, then a bearer token)."""
        base = self.companion_url("crm-salesforce")
        if not hasattr(self, "_sf_token"):
            form = urllib.parse.urlencode(
                {
                    "grant_type": "client_credentials",
                    "client_id": "local-consumer-key",
                    "client_secret": "local-consumer-secret",
                }
            ).encode()
            request = urllib.request.Request(f"{base}/services/oauth2/token", form, method="POST")
            with urllib.request.urlopen(request, timeout=10) as answer:
                self._sf_token = json.loads(answer.read())["access_token"]
        return http_json(
            base + SALESFORCE_API + path, body, method=method, headers={"Authorization": f"Bearer {self._sf_token}"}
        )

    def soql(self, query: str) -> list[dict[str, Any]]:
        return self.salesforce("/query?q=" + urllib.parse.quote(query))["records"]


def kind(decision: orchestration_pb2.Decision) -> str:
    """A decision's kind as `cdpctl decisions` prints it: sent, deferred, suppressed, withdrawn, ..."""
    return orchestration_pb2.DecisionKind.Name(decision.kind).removeprefix("DECISION_KIND_").lower()


def days_ago(days: float, *, hour: int = 12) -> datetime:
    now = datetime.now(UTC)
    return (now - timedelta(days=days)).replace(hour=hour, minute=0, second=0, microsecond=0) if days >= 1 else now
