"""A deletion survives a whole home restored from before it, through the deletion ledger.

The platform runs as `make up` runs it. A person (with identifiers and a name no one else has) and a
second person go in through the collector; the operator copies the home while the platform is stopped
(operations.md's consistent copy) and starts it again. Then the first person is deleted with
`cdpctl delete --suppress --wait`, and the operator exports the deletion ledger (`cdpctl privacy ledger
export`), which holds no identifier value. The platform is stopped and the whole home (every store and
`nats/`) restored from the copy: started again, the person is back (the stores and PRIVACY are older than
the deletion). `cdpctl privacy ledger replay --restart` publishes the notice PRIVACY lacks and restarts
the services with a store (`cdpctl restart`: no crash counted), and then no store file holds the person, the
second person is still there, and an event carrying the person's identifiers is suppressed, not put on a
profile. A second replay publishes nothing.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from stories import Story, eventually
from test_privacy_everywhere import encodings, holding

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_scoring.modelstore import shipped_models
from cdp_testing.platform_run import RunningPlatform
from cdpctl.ledger import WITH_STORE

USER, ANON, EMAIL = "u-restore-del-8b2c", "anon-restore-del-8b2c", "Rosa.Restored-8b2c@Example.org"
FIRST_NAME = "Rosalindquist"
KEEP_USER, KEEP_EMAIL = "u-restore-keep-41d0", "keep.restored-41d0@example.org"
REQUEST = "restore-del-1"


def cdpctl(platform: RunningPlatform, *args: str) -> subprocess.CompletedProcess:
    return platform.cdpctl(*args)


def person_forms() -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    for name, value in (("user id", USER), ("anonymous id", ANON), ("email", EMAIL), ("first name", FIRST_NAME)):
        for form in encodings(value):
            found[form] = name
    return found


def store_files(home: Path) -> list[Path]:
    """The services' stores (SQLite files with their -wal and -shm)."""
    return sorted(p for p in (home / "data").rglob("*") if p.is_file())


def holders(home: Path, wanted: dict[bytes, str]) -> set[str]:
    """The services whose store files hold one of `wanted`."""
    return {Path(path).name.split(".db")[0] for path in holding(store_files(home), wanted)}


def collect(platform: RunningPlatform, *events: dict) -> dict:
    """One batch through the collector's HTTP API; its answer (accepted, suppressed, ...)."""
    url = platform.service("collector")["http"].rstrip("/") + "/v1/batch"
    auth = "Basic " + base64.b64encode(f"{platform.write_key}:".encode()).decode()
    body = json.dumps({"batch": list(events)}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", "Authorization": auth})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def shipped_models_score(platform: RunningPlatform) -> bool:
    """Whether every shipped model has a live version that scores (its session loaded). On a first start
    scoring deploys them in the background once it serves, and a change it scores before a model is loaded
    gets no score from it, nor later: a deploy does not score the persons already held."""
    with grpc.insecure_channel(platform.grpc_address("scoring")) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        listed = stub.ListModels(scoring_pb2.ListModelsRequest(), metadata=platform.admin_metadata, timeout=10)
        models = {model.name: model for model in listed.models}
        for name in (path.stem for path in shipped_models()):
            model = models.get(name)
            if model is None or not model.live_version:
                return False
            [live] = [v for v in model.versions if v.spec.version == model.live_version]
            request = scoring_pb2.ScoreRequest(model=name, named_features={live.spec.features[0].name: 0.0})
            stub.Score(request, metadata=platform.admin_metadata, timeout=10)  # FAILED_PRECONDITION: not loaded
    return True


def not_found(story: Story, user_id: str) -> bool:
    try:
        story.profile(user_id)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    return False


@pytest.mark.timeout(600)
def test_a_ledger_replayed_after_a_whole_home_restore_deletes_and_suppresses_the_person_again(tmp_path):
    platform = RunningPlatform(tmp_path / "platform")
    home = platform.home
    backup = tmp_path / "backup"
    ledger = tmp_path / "deletions.json"  # kept beside the backups, not in the home
    started = time.monotonic()
    try:
        platform.start()
        story = Story(platform)
        # The person is scored (the premise that scoring's store held them too): only once the models are.
        eventually(lambda: shipped_models_score(platform), 60)
        story.create_segment("restore-vip", 'traits.plan = "vip"')
        for user, anon, traits in (
            (USER, ANON, {"email": EMAIL, "first_name": FIRST_NAME, "plan": "vip"}),
            (KEEP_USER, "anon-restore-keep-41d0", {"email": KEEP_EMAIL, "first_name": "Keeper", "plan": "vip"}),
        ):
            story.send(
                {"type": "page", "anonymousId": anon, "name": "Pricing"},
                {"type": "identify", "userId": user, "anonymousId": anon, "traits": traits},
                {"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": 42}},
            )
        person_id = story.wait_profile(USER, lambda p: p.event_count >= 3 and p.scores).person_id
        story.wait_profile(KEEP_USER, lambda p: p.event_count >= 3)
        eventually(lambda: person_id in story.members("restore-vip"), 30)
        # The person is in the stores of identity, profile and the CRM connector (which synced the contact).
        before = eventually(lambda: (h := holders(home, person_forms())) >= {"identity", "profile", "crm"} and h, 60)
        story.close()

        # The consistent copy: stopped, copied whole, started again.
        platform.stop()
        shutil.copytree(home, backup, symlinks=True)
        platform.start()
        story = Story(platform)

        deleted = cdpctl(platform, "delete", "user_id", USER, "--suppress", "--yes", "--request-id", REQUEST,
                         "--wait", "--timeout", "90")  # fmt: skip
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        assert json.loads(deleted.stdout)["personId"] == person_id
        exported = cdpctl(platform, "privacy", "ledger", "export", "--out", str(ledger))
        assert exported.returncode == 0, exported.stdout + exported.stderr
        assert "exported 1 deletion notices" in exported.stdout, exported.stdout
        raw = ledger.read_bytes()
        assert {name for form, name in person_forms().items() if form in raw} == set()
        assert json.loads(raw)["notices"][0]["request_id"] == REQUEST
        story.close()

        # The whole home restored from before the deletion: the person is back (the defect the ledger mends).
        platform.stop()
        shutil.rmtree(home)
        shutil.copytree(backup, home, symlinks=True)
        platform.start()
        story = Story(platform)
        assert story.profile(USER).person_id == person_id
        assert holders(home, person_forms()) >= {"identity", "profile", "crm"}

        pids = {name: platform.service(name)["pid"] for name in WITH_STORE}
        story.close()
        # The replay restarts the services with a store of the running platform (`cdpctl restart`).
        replayed = cdpctl(platform, "privacy", "ledger", "replay", str(ledger), "--restart")
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert "PRIVACY holds 0, lacks 1" in replayed.stdout and f"published 1: {REQUEST}" in replayed.stdout
        assert "restart every service with a store" in replayed.stdout, replayed.stdout
        assert "every service with a store restarted" in replayed.stdout, replayed.stdout
        platform.refresh()
        assert all(platform.service(name)["pid"] != pid for name, pid in pids.items()), pids
        story = Story(platform)
        story.register(USER, ANON, EMAIL)  # the module's log audit: no log line may hold them
        # Gone from every store (scoring and segmentation erase at start too, and at their next snapshot).
        eventually(lambda: not holders(home, person_forms()), 90)  # a guard: snapshots come late on a loaded machine
        assert holders(home, {KEEP_EMAIL.encode(): "kept email"}) >= {"identity", "profile", "crm"}, before
        assert not_found(story, USER)
        assert story.profile(KEEP_USER).event_count >= 3

        # Suppressed again: events carrying their user id are dropped, not put on a profile (a suppression
        # leaves anonymous ids out: a browser's id may be another person's next).
        answer = collect(
            platform,
            {"type": "identify", "userId": USER, "traits": {"email": EMAIL}, "messageId": "restore-after-1"},
            {"type": "track", "userId": USER, "event": "Signed In", "messageId": "restore-after-2"},
        )
        assert (answer["accepted"], answer["suppressed"]) == (0, 2), answer
        story.wait_scored()  # anything accepted would have reached the profile by now
        assert not_found(story, USER)

        again = cdpctl(platform, "privacy", "ledger", "replay", str(ledger))
        assert again.returncode == 0 and "PRIVACY holds 1, lacks 0" in again.stdout and "published 0" in again.stdout
        story.close()
    finally:
        platform.stop()
        print(f"restore-deletions e2e: {time.monotonic() - started:.0f} s")
