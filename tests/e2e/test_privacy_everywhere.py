"""A privacy deletion leaves nothing of the person readable anywhere the platform writes.

The whole platform runs as `make up` runs it (`cdpctl up` in a temporary workspace: every service on its
embedded SQLite store under the workspace's `data/`, nats-server's store under `nats/`, the local channel
servers and CRM emulators beside them). One person, with identifiers and a trait no one else has, goes
through every service: a profile, scores, a segment, a journey that emails them, leaves an in-app
message and opens a CRM task, and a contact in the local HubSpot and Salesforce. A HubSpot user then
corrects their last name on that contact: the correction comes back through the connector's inbound side
(an `identify` from HubSpot, under the anonymous id `hubspot:<account>:<contact id>`) into identity and the
profile, and the connector writes it on to Salesforce - so a value that entered the platform from a CRM
is scanned for like the others. A second person goes the same way and must be untouched (and shows that
the scan below does find what is there).

Then the operator deletes the first person as the README documents (`cdpctl delete user_id ... --yes`),
with `--wait`: it answers once the deletion is reported complete, every durable consumer of
`privacy.deleted` having acknowledged it (each acknowledges only once its purge is durable and its store
erased). Afterwards:

- every file under the workspace that a service writes (the SQLite stores with their -wal/-shm files,
  anything else in `data/`, the scoring model store) is read byte by byte for each of the person's
  values in the encodings a store may keep them in (UTF-8, lower-cased, UTF-16, JSON-escaped): none;
- every CRM emulator's records and request log, and the in-app inbox, hold nothing of the person; the
  CRM records are anonymised under the default policy; every service answers NOT_FOUND or nothing;
- every log line of every service holds neither the person's values nor a secret of the workspace
  (write keys, tokens, NATS passwords);
- every JetStream stream the platform created keeps messages at most 30 days, unless docs/privacy.md
  says why it keeps them longer; in nats-server's files, ACTIONS and those two streams hold no value of
  the person (the other streams do until their age limit, as docs/privacy.md says).

What is deliberately not scanned: the rest of `nats/` (streams keep events until their retention),
`mail/` (the email went out: it is the recipient's mailbox, not the platform's) and the emulators' own
snapshot files (they stand for the CRMs and are checked through their APIs).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from stories import orchestration_caught_up

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_testing.platform_run import CDPCTL, RunningPlatform
from cdp_testing.store_files import row_bytes

ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400

# The person deleted: every value is one no other test or fixture uses.
USER = "u-priv-7d3e91"
ANON = "anon-priv-c0ffee42"
EMAIL = "Quinn.Erasable-5k2@Example.ORG"  # identity keeps it lower-cased
PHONE = "+44 7700 900871"
FIRST_NAME = "Zoëquartz"  # not ASCII: a JSON writer may escape it
LAST_NAME = "Erasabelle-4471"
NOTE = "priv-note-b1e5d0"  # an event property
CRM_LAST_NAME = "Erasabelle-CRM-93c1"  # what a HubSpot user corrects the last name to
HUBSPOT_TOKEN = "pat-local-hubspot"  # the local HubSpot's private-app token

# The person kept.
KEEP_USER = "u-priv-keep-51aa"
KEEP_EMAIL = "keep.me-51aa@example.org"

CONSENT = {"consent": {"categoryPreferences": {"Marketing": True}}}

JOURNEY = {
    "id": "priv-welcome",
    "version": 1,
    "name": "Welcome (privacy test)",
    "priority": 10,
    "category": "onboarding",
    "timezone": "UTC",
    "entry": {"segment": "priv-vip", "on": "entered"},
    "reentry": "never",
    "nodes": [
        {
            "id": "mail",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "template": {"subject": "Hello {{ traits.first_name }}", "body": "Dear {{ traits.last_name }}"},
            "next": "inbox",
        },
        {
            "id": "inbox",
            "type": "action",
            "channel": "inapp",
            "purpose": "Marketing",
            "template": {"title": "For {{ traits.first_name }}", "body": "{{ traits.last_name }}, welcome"},
            "next": "task",
        },
        {
            "id": "task",
            "type": "action",
            "channel": "crm",
            "purpose": "Marketing",
            "template": {"kind": "task", "subject": "Call {{ traits.first_name }}", "body": "{{ traits.email }}"},
        },
    ],
}


def encodings(value: str) -> set[bytes]:
    """The byte strings a store or a log may hold `value` as."""
    forms = {value, value.lower()}
    out: set[bytes] = set()
    for form in forms:
        escaped = json.dumps(form)[1:-1]  # ensure_ascii: "Zo\u00ebquartz"
        out |= {form.encode(), escaped.encode(), escaped.upper().replace("\\U", "\\u").encode()}
        out |= {form.encode("utf-16-le"), form.encode("utf-16-be")}
    return out


def markers() -> dict[bytes, str]:
    """Every encoding of every value of the deleted person -> which value it is (for the failure text)."""
    values = {
        "user id": USER,
        "anonymous id": ANON,
        "email": EMAIL,
        "phone": PHONE,
        "phone digits": re.sub(r"\D", "", PHONE),
        "first name": FIRST_NAME,
        "last name": LAST_NAME,
        "event property": NOTE,
        "last name from the CRM": CRM_LAST_NAME,
    }
    found: dict[bytes, str] = {}
    for name, value in values.items():
        for form in encodings(value):
            found[form] = name
    return found


def holding(paths: list[Path], wanted: dict[bytes, str]) -> dict[str, list[str]]:
    """file -> the values (by name) found in it."""
    found: dict[str, set[str]] = {}
    for path in paths:
        try:
            data = path.read_bytes()
            if data[:16] == b"SQLite format 3\x00":
                # And every row as SQLite reads it: a value of a row larger than a page can be split across
                # two overflow pages, found by no scan of the file (store_files.row_bytes).
                data += b"\n" + row_bytes(path.parent, path.name)
        except (FileNotFoundError, IsADirectoryError):
            continue  # a -wal file truncated away, a temp file renamed
        for form, name in wanted.items():
            if form in data:
                found.setdefault(str(path), set()).add(name)
    return {path: sorted(names) for path, names in sorted(found.items())}


def eventually(check: Callable[[], Any], timeout: float, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (grpc.RpcError, OSError, LookupError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s; last: {last!r}")
        time.sleep(every)


def http_json(url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read()
    return json.loads(text) if text else None


class Workspace:
    """The running platform as its user and operator reach it."""

    def __init__(self, platform: RunningPlatform) -> None:
        self.platform = platform
        self.auth = platform.admin_metadata
        self.channels = {name: grpc.insecure_channel(platform.grpc_address(name)) for name in platform.run["services"]}
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channels["identity"])
        self.profiles = profile_pb2_grpc.ProfileServiceStub(self.channels["profile"])
        self.segments = segmentation_pb2_grpc.SegmentationServiceStub(self.channels["segmentation"])
        self.journeys = orchestration_pb2_grpc.OrchestrationServiceStub(self.channels["orchestration"])
        self.crm = crm_pb2_grpc.CrmServiceStub(self.channels["crm"])

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def send(self, *events: dict[str, Any]) -> None:
        url = self.platform.service("collector")["http"].rstrip("/") + "/v1/batch"
        auth = "Basic " + base64.b64encode(f"{self.platform.write_key}:".encode()).decode()
        eventually(lambda: http_json(url, {"batch": list(events)}, {"Authorization": auth}) is not None, 30)

    def profile(self, user_id: str) -> profile_pb2.Profile:
        return self.profiles.LookupProfile(
            profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value=user_id),
            metadata=self.auth,
            timeout=10,
        )

    def memberships(self, person_id: str) -> set[str]:
        request = segmentation_pb2.GetMembershipRequest(person_id=person_id)
        return {m.segment_id for m in self.segments.GetMembership(request, metadata=self.auth, timeout=10).segments}

    def inbox(self, person_id: str) -> list[orchestration_pb2.InboxMessage]:
        request = orchestration_pb2.ListInboxRequest(person_id=person_id, page_size=100)
        return list(self.journeys.ListInbox(request, metadata=self.auth, timeout=10).messages)

    def crm_records(self, person_id: str) -> list[crm_pb2.RecordStatus]:
        request = crm_pb2.GetRecordStatusRequest(person_id=person_id)
        return list(self.crm.GetRecordStatus(request, metadata=self.auth, timeout=10).records)

    def emulator(self, name: str, path: str) -> Any:
        return http_json(self.platform.companion(name)["urls"]["api"] + path)

    def mail_to(self, address: str) -> list[Path]:
        maildir = self.platform.home / "mail"
        return [p for p in maildir.glob("*/*") if p.is_file() and address.lower().encode() in p.read_bytes().lower()]

    def store_files(self) -> list[Path]:
        """Every file a service writes, besides nats-server's store and the logs (see the module docstring)."""
        skip = {"nats", "mail", "crm", "logs", "secrets", "channels"}
        home = self.platform.home
        return [
            path
            for path in sorted(home.rglob("*"))
            if path.is_file() and path.relative_to(home).parts[0] not in skip and path.parent != home
        ]


# Streams whose age limit the operator sets through their owner's variable.
SHORTER = {
    "EVENTS_RAW": "CDP_EVENTS_RETENTION_DAYS",
    "PROFILES": "CDP_PROFILE_CHANGES_RETENTION_DAYS",
    "SCORES": "CDP_SCORING_SCORES_RETENTION_DAYS",
    "SEGMENTS": "CDP_SEGMENTATION_RETENTION_DAYS",
    "ACTIONS": "CDP_ORCHESTRATION_RETENTION_DAYS",
    "CRM": "CDP_CRM_RETENTION_DAYS",
}

# CRM emulator objects the connector may write for a person (each emulator answers [] for one it has not).
EMULATOR_OBJECTS = {
    "crm-hubspot": ("contacts", "tasks", "tickets", "notes"),
    "crm-salesforce": ("Contact", "Task", "Case", "Lead"),
    "crm-dynamics": ("contacts", "tasks", "incidents"),
    "crm-zoho": ("Contacts", "Tasks", "Cases"),
}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    # DEBUG: the log test reads every line the services can write, not only what INFO lets through.
    # Shorter retentions than the defaults: the streams' owners apply them (checked below).
    env = {"CDP_LOG_LEVEL": "DEBUG", **{variable: "3" for variable in SHORTER.values()}}
    running = RunningPlatform(tmp_path_factory.mktemp("privacy-everywhere"), env=env)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def deleted(platform):
    """The story up to a completed deletion; what was seen before it, for the tests to compare."""
    ws = Workspace(platform)
    try:
        yield _story(ws)
    finally:
        ws.close()


def _story(ws: Workspace) -> dict[str, Any]:
    ws.segments.CreateSegment(
        segmentation_pb2.CreateSegmentRequest(
            id="priv-vip", name="VIP", definition=segmentation_pb2.Definition(text='traits.plan = "vip"'), wait=True
        ),
        metadata=ws.auth,
        timeout=60,
    )
    created = ws.journeys.CreateJourney(
        orchestration_pb2.CreateJourneyRequest(
            definition=orchestration_pb2.JourneyDefinition(json=json.dumps(JOURNEY))
        ),
        metadata=ws.auth,
        timeout=30,
    )
    ws.journeys.PublishJourney(
        orchestration_pb2.PublishJourneyRequest(journey_id=created.id), metadata=ws.auth, timeout=60
    )
    people = (
        (USER, ANON, {"email": EMAIL, "phone": PHONE, "first_name": FIRST_NAME, "last_name": LAST_NAME}, NOTE),
        (KEEP_USER, "anon-priv-keep-51aa", {"email": KEEP_EMAIL, "first_name": "Keeper", "last_name": "Kept"}, "n"),
    )
    # Consent first: orchestration's inputs interleave, and a segment entry that overtook the profile
    # change carrying the consent would be refused (no_consent), as it would be for a real customer.
    for user, anon, traits, _note in people:
        ws.send(
            {"type": "page", "anonymousId": anon, "name": "Pricing", "messageId": f"{user}-page"},
            {
                "type": "identify",
                "userId": user,
                "anonymousId": anon,
                "messageId": f"{user}-id",
                "traits": traits,
                "context": CONSENT,
            },
        )
    for user, *_ in people:
        eventually(lambda user=user: ws.profile(user).consent, 30)
    orchestration_caught_up(ws.platform)  # orchestration applied the consent's profile change before the entry
    for user, _anon, _traits, note in people:
        ws.send(
            {"type": "identify", "userId": user, "messageId": f"{user}-vip", "traits": {"plan": "vip"}},
            {
                "type": "track",
                "userId": user,
                "event": "Order Completed",
                "messageId": f"{user}-order",
                "properties": {"total": 42, "note": note},
            },
        )

    # The person reached every service.
    person = eventually(lambda: (p := ws.profile(USER)).event_count >= 4 and p.scores and p, 60)
    keep = eventually(lambda: ws.profile(KEEP_USER).person_id, 30)
    person_id = person.person_id
    eventually(lambda: "priv-vip" in ws.memberships(person_id), 30)
    eventually(lambda: ws.inbox(person_id), 30)
    eventually(lambda: ws.mail_to(EMAIL), 30)
    eventually(lambda: ws.mail_to(KEEP_EMAIL), 30)
    # Contacts in HubSpot and Salesforce, and the task in HubSpot.
    eventually(lambda: {(r.connection_id, r.mapping_id) for r in ws.crm_records(person_id) if r.crm_id}
               >= {("hubspot", "contacts"), ("salesforce", "contacts"), ("hubspot", "success-task")}, 60)  # fmt: skip
    eventually(lambda: any(EMAIL.lower() in json.dumps(c).lower() for c in ws.emulator("crm-hubspot",
               "/_emulator/records/contacts")), 30)  # fmt: skip
    eventually(lambda: any(KEEP_EMAIL in json.dumps(c) for c in ws.emulator("crm-hubspot",
               "/_emulator/records/contacts")), 30)  # fmt: skip
    # A HubSpot user corrects the last name on the person's contact: it comes back into the profile (with
    # the connector's own source) and the connector writes it on to Salesforce.
    (contact,) = [
        r.crm_id for r in ws.crm_records(person_id) if (r.connection_id, r.mapping_id) == ("hubspot", "contacts")
    ]
    hubspot = ws.platform.companion("crm-hubspot")["urls"]["api"]
    patch = urllib.request.Request(
        f"{hubspot}/crm/v3/objects/contacts/{contact}",
        json.dumps({"properties": {"lastname": CRM_LAST_NAME}}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {HUBSPOT_TOKEN}"},
        method="PATCH",
    )
    urllib.request.urlopen(patch, timeout=10).close()
    eventually(lambda: ws.profile(USER).traits["last_name"].value.string_value == CRM_LAST_NAME, 60)
    eventually(lambda: any(CRM_LAST_NAME in json.dumps(c) for c in ws.emulator("crm-salesforce",
               "/_emulator/records/Contact")), 60)  # fmt: skip
    before = holding(ws.store_files(), markers())

    # The deletion, as the README documents it; --wait: until every service that keeps people acknowledged it.
    done = subprocess.run(
        [CDPCTL, "delete", "user_id", USER, "--yes", "--request-id", "priv-erase-1", "--wait", "--timeout", "90"],
        env=ws.platform.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {
        "person_id": person_id, "keep_id": keep, "before": before, "result": json.loads(done.stdout), "ws": ws,
        "crm_anonymous_id": f"hubspot:62515:{contact}",
    }  # fmt: skip


def test_the_deletion_is_reported_done_by_every_service_that_keeps_the_person(deleted):
    assert deleted["result"]["requestId"] == "priv-erase-1"
    assert int(deleted["result"]["identifiers"]) >= 4  # user id, anonymous id, email, phone
    # Identity (one durable per replica), orchestration and the CRM connector each acknowledged it.
    assert deleted["result"]["acknowledged"] == {
        "crm-privacy": True,
        "identity-privacy-0": True,
        "orchestration-privacy": True,
    }


def left_in_store(ws: Workspace, service: str) -> dict[str, list[str]]:
    """What of the person is left in `service`'s store files, once its erasure had time to happen:
    scoring and segmentation forget on the profile's removal at their next snapshot (every few seconds)."""
    files = lambda: [p for p in ws.store_files() if p.name.split(".db")[0] == service]  # noqa: E731
    deadline = time.monotonic() + 20
    while (left := holding(files(), markers())) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.parametrize("service", ["identity", "profile", "scoring", "segmentation", "orchestration", "crm"])
def test_no_store_file_of_a_service_holds_the_person(deleted, service):
    ws: Workspace = deleted["ws"]
    assert left_in_store(ws, service) == {}


def test_the_scan_finds_what_is_there(deleted):
    """Before the deletion the person was in the stores of identity, profile, orchestration and the CRM
    connector, and the other person still is: the scan above is not blind."""
    before = {Path(p).name.split(".db")[0] for p in deleted["before"]}
    assert {"identity", "profile", "orchestration", "crm"} <= before, deleted["before"]
    kept = {Path(p).name.split(".db")[0] for p in holding(deleted["ws"].store_files(), {KEEP_EMAIL.encode(): "e"})}
    assert {"identity", "profile", "orchestration", "crm"} <= kept, kept


def test_no_other_file_the_services_write_holds_the_person(deleted):
    ws: Workspace = deleted["ws"]
    others = [p for p in ws.store_files() if ".db" not in p.name]
    assert holding(others, markers()) == {}


def test_services_answer_that_the_person_is_gone(deleted):
    ws: Workspace = deleted["ws"]
    person_id = deleted["person_id"]
    for kind, value in (
        ("user_id", USER), ("email", EMAIL.lower()), ("anonymous_id", ANON),
        ("anonymous_id", deleted["crm_anonymous_id"]),  # the contact's events from HubSpot came under it
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as lookup:
            found = ws.identity.Lookup(
                identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type=kind, value=value)),
                metadata=ws.auth,
                timeout=10,
            )
            # Named when it happens (seen once, in a loaded run): which identifier, and whether it is the
            # deleted person still or a person made again after the deletion (an event in flight).
            again = "the deleted person" if found.person_id == person_id else "a person made after the deletion"
            pytest.fail(f"{kind} still resolves, to {again}")
        assert lookup.value.code() == grpc.StatusCode.NOT_FOUND, kind
    with pytest.raises(grpc.RpcError) as profile:
        ws.profile(USER)
    assert profile.value.code() == grpc.StatusCode.NOT_FOUND
    try:
        assert "priv-vip" not in ws.memberships(person_id)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
    assert ws.inbox(person_id) == []
    instances = ws.journeys.ListInstances(
        orchestration_pb2.ListInstancesRequest(person_id=person_id, page_size=100), metadata=ws.auth, timeout=10
    ).instances
    assert list(instances) == []
    # Orchestration says the person was deleted (not "no decisions": cdpctl decisions read that as "no
    # journey has tried to reach them"), naming the request.
    with pytest.raises(grpc.RpcError) as decisions:
        ws.journeys.ListDecisions(
            orchestration_pb2.ListDecisionsRequest(person_id=person_id, page_size=100), metadata=ws.auth, timeout=10
        )
    assert decisions.value.code() == grpc.StatusCode.NOT_FOUND
    assert "was deleted" in decisions.value.details() and "priv-erase-1" in decisions.value.details()
    # The other person keeps everything.
    assert ws.profile(KEEP_USER).person_id == deleted["keep_id"]
    assert ws.inbox(deleted["keep_id"])


@pytest.mark.parametrize("emulator", ["crm-hubspot", "crm-salesforce", "crm-dynamics", "crm-zoho"])
def test_no_crm_holds_the_person(deleted, emulator):
    ws: Workspace = deleted["ws"]
    wanted = markers()
    for obj in EMULATOR_OBJECTS[emulator]:
        records = ws.emulator(emulator, f"/_emulator/records/{urllib.parse.quote(obj)}")
        text = json.dumps(records, ensure_ascii=False).encode()
        assert not {name for form, name in wanted.items() if form in text}, (emulator, obj)
    # The emulators log each request's path and query (a CRM's own access log): no identifier in them.
    requests = json.dumps(ws.emulator(emulator, "/_emulator/requests")).encode()
    assert not {name for form, name in wanted.items() if form in requests}, emulator


def test_the_other_person_is_still_in_the_crm(deleted):
    ws: Workspace = deleted["ws"]
    assert any(KEEP_EMAIL in json.dumps(c) for c in ws.emulator("crm-hubspot", "/_emulator/records/contacts"))


def test_the_connector_reports_every_record_anonymised(deleted):
    ws: Workspace = deleted["ws"]
    # The connector's own account (`cdpctl crm record`): under the default policy every record anonymised.
    states = {
        (r.connection_id, r.mapping_id): crm_pb2.RecordState.Name(r.state) for r in ws.crm_records(deleted["person_id"])
    }
    assert states and all(state == "RECORD_STATE_ANONYMISED" for state in states.values()), states


def secrets_of(ws: Workspace) -> dict[bytes, str]:
    """The workspace's secrets as a log line could carry them."""
    found: dict[bytes, str] = {}
    run = ws.platform.run
    found[run["write_key"].encode()] = "write key"
    for path in (ws.platform.home / "secrets").rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        # Token files and credentials: every long token-like word in them (digests are not secrets).
        for word in set(re.findall(r"[A-Za-z0-9_\-]{20,}", text)):
            if not re.fullmatch(r"[0-9a-f]{64}", word):
                found[word.encode()] = f"secret from {path.name}"
    # The credentials make up gives the CRM connector for the local CRMs (as a real account's would be).
    for credential in ("pat-local-hubspot", "hubspot-app-secret", "local-developer-key", "local-consumer-secret"):
        found[credential.encode()] = "CRM credential"
    if "@" in run["nats"]:
        password = urllib.parse.urlsplit(run["nats"]).password
        if password:
            found[password.encode()] = "nats operator password"
    return found


def test_no_log_line_holds_the_person_or_a_secret(deleted):
    ws: Workspace = deleted["ws"]
    logs = sorted(p for p in (ws.platform.home / "logs").rglob("*") if p.is_file())
    assert logs, "no service logs found"
    secrets = secrets_of(ws)
    # Both write keys, the admin and service tokens, every service's NATS password, the CRM credentials.
    assert len(secrets) >= 16, sorted(secrets.values())
    # These are the logs of this run: the services logged the deletion (by request id, no values).
    assert any(b"privacy deletion applied" in path.read_bytes() for path in logs)
    wanted = {**markers(), **secrets, KEEP_USER.encode(): "kept user id", KEEP_EMAIL.encode(): "kept email"}
    leaks: dict[str, set[str]] = {}
    for path in logs:
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            for form, name in wanted.items():
                if form in line:
                    leaks.setdefault(f"{path.name}:{number}", set()).add(name)
    assert leaks == {}, {k: sorted(v) for k, v in list(leaks.items())[:20]}


# Streams kept without an age limit on purpose, each explained in docs/privacy.md: PRIVACY holds person
# ids and the hashed identifiers of suppressed persons only (the suppression list is rebuilt from it),
# ORCHESTRATION_TIMERS only opaque person and timer ids (a timer may be weeks away; fired copies and
# cancellations expire within minutes).
UNLIMITED = {"PRIVACY": "hashed identifiers only", "ORCHESTRATION_TIMERS": "no personal data"}


def test_every_stream_with_personal_data_keeps_it_at_most_30_days(platform, deleted):
    ages = asyncio.run(stream_ages(platform.run["nats"]))
    assert {"EVENTS_RAW", "PROFILES", "ACTIONS", "PRIVACY", "ORCHESTRATION_TIMERS"} <= set(ages), ages
    too_long = {name: age / DAY for name, age in ages.items() if name not in UNLIMITED and not 0 < age <= 30 * DAY}
    assert too_long == {}, too_long
    # Every stream is in docs/privacy.md (what a deletion erases at once, what ages out and when), and
    # the unlimited ones say why.
    documented = (ROOT / "docs" / "privacy.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([A-Z_]+)` \|.*$", documented, flags=re.M)}
    assert set(ages) <= set(rows), set(ages) - set(rows)
    for name, why in UNLIMITED.items():
        assert why in rows[name], name


async def stream_ages(nats_url: str) -> dict[str, float]:
    import nats

    nc = await nats.connect(nats_url)
    try:
        return {info.config.name: info.config.max_age or 0.0 for info in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


def test_a_shorter_retention_the_operator_sets_is_the_one_each_stream_keeps(platform, deleted):
    ages = asyncio.run(stream_ages(platform.run["nats"]))
    assert {name: ages[name] / DAY for name in SHORTER} == dict.fromkeys(SHORTER, 3.0)


def test_streams_a_deletion_erases_or_keeps_for_ever_hold_no_value_of_the_person(platform, deleted):
    """What docs/privacy.md says, read in nats-server's own files: ACTIONS (the person's messages erased
    at once, by their dispatch or by the deletion) and the two streams kept for ever (PRIVACY has person
    ids only for a plain deletion, the timers opaque ids only) hold no value of the person. The other
    streams still do, until their age limit."""
    streams = next((platform.home / "nats").rglob("streams"))
    left = {
        name: found
        for name in ("ACTIONS", *UNLIMITED)
        if (found := holding(sorted(p for p in (streams / name).rglob("*") if p.is_file()), markers()))
    }
    assert left == {}
    aging = holding(sorted(p for p in (streams / "EVENTS_RAW").rglob("*") if p.is_file()), markers())
    assert aging, "the scan sees the events still in EVENTS_RAW"


def test_a_restart_of_the_crm_connector_keeps_the_retention_profile_and_segmentation_set(platform, deleted):
    """The CRM connector reads PROFILES and SEGMENTS; their owners configure them (it once put back its
    defaults at every start). Last in the module: it restarts the connector as a crash and the supervisor
    would."""
    platform.wait_restarted("crm", platform.kill("crm"))
    ages = asyncio.run(stream_ages(platform.run["nats"]))
    assert {"PROFILES": ages["PROFILES"] / DAY, "SEGMENTS": ages["SEGMENTS"] / DAY} == {"PROFILES": 3, "SEGMENTS": 3}
