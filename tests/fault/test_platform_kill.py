"""The whole platform under load, each service SIGKILLed in turn and nats-server restarted once, counted
at the end where a user would look.

The platform runs as `make up` runs it (`cdpctl up`: every service, the local channel servers and CRM
emulators, under its supervisor). A segment ("pro": `traits.plan = "pro"`) and a journey (entering it
sends one email, then after a delay calls a webhook) are set up through the services' APIs. Then people are sent through the collector's
Segment HTTP API as an SDK sends them - batches with stable messageIds, the same batch sent again until
it is accepted - while collector, identity, profile, scoring, segmentation, orchestration and the CRM
connector are each SIGKILLed and nats-server is killed once; the supervisor starts each again. At the end:

- every accepted event is on its person's profile timeline exactly once, and the profile holds the
  latest traits;
- every person entered "pro" exactly once and never left it (the segments stream);
- every person got one email action (the local SMTP server's maildir, by recipient and action id; a
  copy sent again under the same Message-ID only in SMTP's documented window, which each send in flight
  has: at most IN_FLIGHT per kill of orchestration) and exactly one webhook call (the local receiver's
  list of what it accepted);
- every person is one HubSpot contact with their latest first name and segment, and the account's limit
  was never exceeded (the emulator's own counters), and one Salesforce contact with the latest first name;
- what an on-call engineer looks at afterwards shows no alarm: every durable consumer has handled
  everything (`cdpctl lag`), nothing is dead-lettered (`cdpctl dlq`), no service logged an ERROR or a
  traceback. Each kill is one the platform recovers from by design; an alarm there is either a loss the
  counts above missed or a false one.

`make test` runs a bounded form (one kill each); `make soak` a longer one: CDP_SOAK_SECONDS of load with
the kills cycling every CDP_SOAK_KILL_EVERY seconds.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_testing.platform_run import RunningPlatform

from .platform_counts import (
    consumers_behind,
    dead_letters,
    error_lines,
    mail_by_recipient,
    person_ids,
    segment_transitions,
    timeline_counts,
    traits_of,
)

SERVICES = ("collector", "identity", "profile", "scoring", "segmentation", "orchestration", "crm")
SOAK_SECONDS = float(os.environ.get("CDP_SOAK_SECONDS", "0"))  # 0: the bounded form
KILL_EVERY = float(os.environ.get("CDP_SOAK_KILL_EVERY", "10"))
PEOPLE = int(os.environ.get("CDP_SOAK_PEOPLE", "24" if not SOAK_SECONDS else "200"))
VIEWS = 4  # page views per person between the two identifies
# The dispatcher's sends in flight at once (CDP_ORCHESTRATION_DISPATCH_CONCURRENCY, 16 by default): a kill of
# orchestration sends each again at most once. More than one, so the kill finds concurrent sends as a
# deployment's would; fewer than the default, so the bound on repeated emails still says something.
IN_FLIGHT = 4

JOURNEY = {
    "id": "welcome-pro",
    "version": 1,
    "name": "Welcome to pro",
    "priority": 10,
    "category": "onboarding",
    "timezone": "UTC",
    "entry": {"segment": "pro", "on": "entered"},
    "reentry": "never",
    "nodes": [
        {
            "id": "welcome",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "template": {"subject": "Welcome to pro, {{ traits.first_name }}", "body": "enjoy"},
            "next": "later",
        },
        # A timer pending across the kills, then a call to the local webhook receiver.
        {"id": "later", "type": "delay", "duration": "2s", "next": "notify"},
        {
            "id": "notify",
            "type": "action",
            "channel": "webhook",
            "purpose": "Marketing",
            "template": {"title": "pro", "body": "a new pro customer"},
        },
    ],
}


def person_script(i: int) -> list[list[dict]]:
    """One person's batches, in order: identify (basic plan), page views, identify as pro (the segment
    entry, the welcome email, the CRM's segment field), more views, identify with a new first name (the
    CRM contact's latest value)."""
    user = f"kt-{i:04d}"
    consent = {"consent": {"categoryPreferences": {"Marketing": True}}}

    def identify(n: int, traits: dict) -> dict:
        return {"type": "identify", "userId": user, "messageId": f"{user}-identify-{n}", "traits": traits,
                "context": consent}  # fmt: skip

    views = [
        {
            "type": "track",
            "userId": user,
            "event": "Page Viewed",
            "messageId": f"{user}-view-{k}",
            "properties": {"path": f"/p/{k}"},
        }
        for k in range(VIEWS)
    ]
    return [
        [identify(1, {"email": f"{user}@example.com", "first_name": f"First{i}", "plan": "basic"})],
        views[: VIEWS // 2],
        [identify(2, {"plan": "pro"})],
        views[VIEWS // 2 :],
        [identify(3, {"first_name": f"Final{i}"})],
    ]


class Sender(threading.Thread):
    """Sends batches at a steady pace as an SDK does: a batch not accepted (refused connection, 5xx,
    429) is sent again, unchanged, until it is. Records the messageIds the collector accepted."""

    def __init__(self, url: str, write_key: str, batches: list[list[dict]], pace: float) -> None:
        super().__init__(daemon=True)
        self.url = url.rstrip("/") + "/v1/batch"
        self.auth = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
        self.batches = batches
        self.pace = pace
        self.accepted: list[str] = []
        self.retries = 0
        self.refusals: collections.Counter = collections.Counter()
        self.stop = threading.Event()
        self.sent = 0  # batches done (accepted, or refused for good)
        self.released = 0
        self.released_changed = threading.Condition()

    def post(self, batch: list[dict]) -> int:
        body = json.dumps({"batch": batch}).encode()
        request = urllib.request.Request(
            self.url, body, {"Content-Type": "application/json", "Authorization": self.auth}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, urllib.error.URLError):
            return 0

    def release(self, count: int) -> None:
        """Let the first `count` batches go (the bounded form hands the load out kill by kill)."""
        with self.released_changed:
            self.released = max(self.released, min(count, len(self.batches)))
            self.released_changed.notify_all()

    def run(self) -> None:
        for index, batch in enumerate(self.batches):
            with self.released_changed:
                self.released_changed.wait_for(lambda i=index: i < self.released or self.stop.is_set())
            started = time.monotonic()
            while not self.stop.is_set():
                status = self.post(batch)
                if 200 <= status < 300:
                    self.accepted.extend(m["messageId"] for m in batch)
                    break
                # 4xx other than 429 would be a refusal of a valid batch: kept to fail the test.
                if 400 <= status < 500 and status != 429:
                    self.refusals[status] += 1
                    break
                self.retries += 1
                time.sleep(0.2)
            self.sent += 1
            time.sleep(max(0.0, self.pace - (time.monotonic() - started)))


def records(emulator: str, obj: str) -> list[dict]:
    """Every record of `obj` a CRM emulator holds (its inspection route)."""
    found = get_json(f"{emulator}/_emulator/records/{obj}")
    return found.get("records", found) if isinstance(found, dict) else found


def eventually(check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {last}")


def crm_queued(platform: RunningPlatform) -> dict[str, int]:
    """CRM connection -> its writes queued for the retrier (the connector's stream run, `pending_retry`)."""
    with grpc.insecure_channel(platform.grpc_address("crm")) as channel:
        stub = crm_pb2_grpc.CrmServiceStub(channel)
        md = platform.admin_metadata
        connections = stub.ListConnections(crm_pb2.ListConnectionsRequest(), metadata=md, timeout=10).connections
        return {
            c.id: stub.GetRun(crm_pb2.GetRunRequest(run_id=f"stream-{c.id}"), metadata=md, timeout=10).pending_retry
            for c in connections
        }


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    running = RunningPlatform(
        tmp_path_factory.mktemp("platform-kill"),
        restart_limit=20,
        env={"CDP_ORCHESTRATION_DISPATCH_CONCURRENCY": str(IN_FLIGHT)},
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def set_up_segment_and_journey(platform: RunningPlatform) -> None:
    md = platform.admin_metadata
    with grpc.insecure_channel(platform.grpc_address("segmentation")) as channel:
        segmentation_pb2_grpc.SegmentationServiceStub(channel).CreateSegment(
            segmentation_pb2.CreateSegmentRequest(
                id="pro", name="Pro plan", definition=segmentation_pb2.Definition(text='traits.plan = "pro"'), wait=True
            ),
            metadata=md,
            timeout=60,
        )
    with grpc.insecure_channel(platform.grpc_address("orchestration")) as channel:
        stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
        definition = orchestration_pb2.JourneyDefinition(json=json.dumps(JOURNEY))
        created = stub.CreateJourney(
            orchestration_pb2.CreateJourneyRequest(definition=definition), metadata=md, timeout=30
        )
        stub.PublishJourney(orchestration_pb2.PublishJourneyRequest(journey_id=created.id), metadata=md, timeout=30)


def interleaved(people: int) -> list[list[dict]]:
    """Everyone's batches, each person's in order, the people staggered (person i's step s comes with
    person i + s * stagger's first) so that every kind of step - segment entries, emails, CRM updates -
    is under way throughout the run, whichever service is being killed."""
    stagger = max(1, people // 3)
    keyed = [(i + step * stagger, i, batch) for i in range(people) for step, batch in enumerate(person_script(i))]
    return [batch for _key, _i, batch in sorted(keyed, key=lambda k: (k[0], k[1]))]


def kill_in_turn(platform: RunningPlatform, sender: Sender, kills: list[str], under_load: list[bool]) -> None:
    """SIGKILL each service (and nats-server once, after scoring) and wait for the supervisor to bring it
    back, with batches being sent meanwhile.

    Bounded form: the load is handed out in equal parts, one part just before each kill, so every kill
    lands while batches are being sent (and retried while the collector or nats-server is down). Soak:
    the load runs at its own pace and the kills cycle, one every CDP_SOAK_KILL_EVERY seconds, until
    CDP_SOAK_SECONDS have passed."""
    targets = [*SERVICES[:4], "nats-server", *SERVICES[4:]]
    total = len(sender.batches)
    if SOAK_SECONDS:
        sender.release(total)
    started = time.monotonic()
    round_ = 0
    while True:
        for k, name in enumerate(targets):
            if name == "nats-server" and round_ > 0:
                continue  # once per run: it stops every service's streams for a while
            if SOAK_SECONDS and (time.monotonic() - started > SOAK_SECONDS or sender.sent >= total):
                return  # the load is over: a kill now would find nothing in flight
            if not SOAK_SECONDS:
                sender.release(total * (k + 1) // (len(targets) + 1))
                time.sleep(0.5)  # a few batches in flight
            under_load.append(sender.sent < sender.released)  # batches still to send as it dies
            if name == "nats-server":
                platform.wait_nats_restarted(platform.kill_nats())
            else:
                platform.wait_restarted(name, platform.kill(name))
            kills.append(name)
            if SOAK_SECONDS:
                time.sleep(KILL_EVERY)
        round_ += 1
        if not SOAK_SECONDS:
            sender.release(total)
            return


@pytest.mark.timeout(600 + int(SOAK_SECONDS * 2))
def test_every_service_killed_in_turn_under_load_loses_and_duplicates_nothing(platform):
    set_up_segment_and_journey(platform)
    users = [f"kt-{i:04d}" for i in range(PEOPLE)]
    batches = interleaved(PEOPLE)
    # Bounded: a part of the load with each kill, four batches a second; soak: spread over CDP_SOAK_SECONDS.
    pace = SOAK_SECONDS / len(batches) if SOAK_SECONDS else 0.25
    sender = Sender(platform.service("collector")["http"], platform.write_key, batches, pace)
    sender.start()
    kills: list[str] = []
    under_load: list[bool] = []  # whether batches were being sent when each kill began
    kill_in_turn(platform, sender, kills, under_load)
    sender.join(timeout=SOAK_SECONDS + 120)
    assert not sender.is_alive(), f"the load did not finish: {len(sender.accepted)} accepted"
    assert all(under_load), f"a kill without load: {list(zip(kills, under_load, strict=True))}"
    assert sender.retries > 0, "batches were sent again while the collector or nats-server was down"
    assert not sender.refusals, f"valid batches refused: {dict(sender.refusals)}"
    expected = collections.Counter(sender.accepted)
    assert len(expected) == PEOPLE * (VIEWS + 3)
    hubspot = platform.companion("crm-hubspot")["urls"]["api"]
    salesforce = platform.companion("crm-salesforce")["urls"]["api"]
    maildir = platform.home / "mail"

    def timelines_complete():
        counts = timeline_counts(platform, users)
        short = {u: VIEWS + 3 - len(c) for u, c in counts.items() if len(c) < VIEWS + 3}
        return True if not short else f"events missing on profiles: {short}"

    eventually(timelines_complete, timeout=120)

    def mailed_everyone():
        recipients, _ = mail_by_recipient(maildir)
        missing = [u for u in users if not recipients.get(u)]
        return True if not missing else f"not mailed: {missing[:5]} ({len(missing)})"

    eventually(mailed_everyone, timeout=90)
    receiver = platform.companion("channels")["urls"]["webhook"].removesuffix("/hooks/cdp")

    def called_for_everyone():
        called = {d["json"]["person_id"] for d in get_json(f"{receiver}/_deliveries")}
        return True if len(called) >= PEOPLE else f"webhook called for {len(called)} of {PEOPLE}"

    eventually(called_for_everyone, timeout=90)

    def crm_latest():
        wanted = {f"Final{i}" for i in range(PEOPLE)}
        final = {
            c["properties"].get("firstname") for c in records(hubspot, "contacts") if c["properties"].get("cdp_id")
        }
        sf_final = {c.get("FirstName") for c in records(salesforce, "Contact") if c.get("CDP_Id__c")}
        behind = {"HubSpot": len(wanted - final), "Salesforce": len(wanted - sf_final)}
        return True if not any(behind.values()) else f"CRM contacts not latest yet, behind: {behind}"

    eventually(crm_latest, timeout=90)

    # Anything sent twice after a restart has landed before the counts: every durable consumer has handled
    # everything (a message whose handling a kill cut short is redelivered until it is acknowledged; the
    # dispatchers record a send before they acknowledge it, the CRM connector its writes), and the CRM
    # connector holds no write queued for its retrier (a queued write leaves the queue once answered).
    def caught_up():
        behind = consumers_behind(platform.nats_url)
        return True if not behind else f"consumers with work left (pending, ack pending): {behind}"

    eventually(caught_up, timeout=60)

    def crm_nothing_queued():
        queued = crm_queued(platform)
        return True if not any(queued.values()) else f"CRM writes queued for a retry: {queued}"

    eventually(crm_nothing_queued, timeout=60)

    # Every accepted event on its person's timeline exactly once.
    counts = timeline_counts(platform, users)
    on_profiles = collections.Counter()
    for c in counts.values():
        on_profiles.update(c)
    assert set(on_profiles) == set(expected), "every accepted event on a profile"
    assert {k: v for k, v in on_profiles.items() if v != 1} == {}, "no event twice on a timeline"
    # ... and the profile holds each person's latest traits (the third identify's name, the second's plan).
    latest = traits_of(platform, users, ("first_name", "plan"))
    assert latest == {f"kt-{i:04d}": (f"Final{i}", "pro") for i in range(PEOPLE)}, "latest traits on profiles"

    # Every segment transition once: each person entered "pro" once and never left.
    persons = person_ids(platform, users)
    assert len(set(persons.values())) == PEOPLE, "one person per user"
    transitions = segment_transitions(platform.nats_url)
    pro = {key: n for key, n in transitions.items() if key[1] == "pro"}
    assert pro == {(p, "pro", True): 1 for p in persons.values()}, "every person entered pro exactly once"

    # Every journey action sent once: one welcome email action per person. SMTP has no idempotency key:
    # a kill between the server's 250 and orchestration's record of a send mails that message again under
    # the same Message-ID (what mail clients deduplicate by). Each send in flight has that window: at most
    # IN_FLIGHT copies per kill (the orchestration kill test saw one kill catch two), one at most of each.
    recipients, copies = mail_by_recipient(maildir)
    assert {u: len(recipients.get(u, ())) for u in users} == dict.fromkeys(users, 1), "one welcome email each"
    repeats = sum(n - 1 for n in copies.values())
    assert repeats <= kills.count("orchestration") * IN_FLIGHT and set(copies.values()) <= {1, 2}, (
        f"mailed again: {repeats}"
    )

    deliveries = get_json(f"{receiver}/_deliveries")
    called = collections.Counter(d["json"]["person_id"] for d in deliveries)
    assert called == dict.fromkeys(persons.values(), 1), "one webhook call each (after the pending delay)"
    assert len({d["idempotency_key"] for d in deliveries}) == len(deliveries), "no action delivered twice"

    # Every CRM record once, with its latest values; the account's limit never exceeded.
    ours = [c for c in records(hubspot, "contacts") if c["properties"].get("cdp_id") in set(persons.values())]
    by_person = collections.Counter(c["properties"]["cdp_id"] for c in ours)
    assert by_person == dict.fromkeys(persons.values(), 1), "one HubSpot contact per person"
    names = {c["properties"]["cdp_id"]: c["properties"].get("firstname") for c in ours}
    assert names == {persons[f"kt-{i:04d}"]: f"Final{i}" for i in range(PEOPLE)}
    assert all("pro" in (c["properties"].get("cdp_segments") or "").split(";") for c in ours)
    budget = get_json(f"{hubspot}/_emulator/budget")
    assert budget.get("over_budget", 0) == 0, budget
    sf_ours = [c for c in records(salesforce, "Contact") if c.get("CDP_Id__c") in set(persons.values())]
    by_person = collections.Counter(c["CDP_Id__c"] for c in sf_ours)
    assert by_person == dict.fromkeys(persons.values(), 1), "one Salesforce contact per person"
    names = {c["CDP_Id__c"]: c.get("FirstName") for c in sf_ours}
    assert names == {persons[f"kt-{i:04d}"]: f"Final{i}" for i in range(PEOPLE)}
    assert kills == [*SERVICES[:4], "nats-server", *SERVICES[4:]] or SOAK_SECONDS

    # What on-call sees afterwards: nothing left behind, nothing dead-lettered, no error in any log. Every
    # kill is one the platform recovers from by design, so a consumer with work left (`cdpctl lag`), a dead
    # letter (`cdpctl dlq`) or an ERROR line would be an alarm for a loss that did not happen - or a real one.
    eventually(caught_up, timeout=60)
    assert dead_letters(platform.nats_url) == {}, "nothing dead-lettered (stream, consumer, reason)"
    assert error_lines(platform) == [], "no ERROR record or traceback in a service's log"
