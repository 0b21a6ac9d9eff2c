"""The NATS roles, read as a whole: no service's user may publish what another's may (a publish permission
is a claim to speak for that subject's owner), nor subscribe to more than its own inbox, the announcements
its role follows and its own consumers' advisories. Spelled out as `cdpctl up` renders them (2 partitions, 2
replicas), so a wildcard or a name shared by accident shows. Complements libs/cdp-kit/tests/test_natsauth.py,
which tries each role against a real nats-server."""

from __future__ import annotations

from cdp_kit.bus import subjects
from cdp_kit.natsauth import PROVISIONER, ROLES, expand, inbox_prefix, permissions, provisioner_permissions

# JetStream API subjects several roles may use: lookups and single reads of a stream, which change nothing.
SHARED_READS = ("$JS.API.INFO", "$JS.API.STREAM.INFO.", "$JS.API.STREAM.MSG.GET.", "$JS.API.STREAM.NAMES")


def rendered() -> dict[str, dict[str, list[str]]]:
    out = {name: expand(permissions(role), partitions=2, replicas=2) for name, role in ROLES.items()}
    out[PROVISIONER] = provisioner_permissions()
    return {name: {d: rules[d]["allow"] for d in ("publish", "subscribe")} for name, rules in out.items()}


def overlaps(a: str, b: str) -> bool:
    """Whether some subject matches both NATS patterns (`*` one token, `>` the rest)."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right, strict=False):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(left) == len(right)


def test_no_two_services_may_publish_the_same_subject():
    roles = rendered()
    shared = []
    names = sorted(roles)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            for a in roles[first]["publish"]:
                if a.startswith(SHARED_READS):
                    continue
                shared += [(first, a, second, b) for b in roles[second]["publish"] if overlaps(a, b)]
    assert shared == []


def test_no_role_publishes_a_wildcard_over_anything_but_its_own_subjects():
    for name, rules in rendered().items():
        for subject in rules["publish"]:
            tokens = subject.split(".")
            assert tokens[0] not in (">", "*", "_INBOX"), (name, subject)
            assert not subject.startswith(("$JS.API.>", "$JS.API.*", "$JS.ACK.>", "$KV.>", "$O.>")), (name, subject)
            if ">" in tokens or "*" in tokens:
                assert tokens.index(">" if ">" in tokens else "*") >= 1, (name, subject)


def test_each_role_subscribes_to_its_inbox_its_announcements_and_its_own_advisories_only():
    for name, rules in rendered().items():
        role = ROLES.get(name)
        follows = set(role.subscribes) if role else set()
        for subject in rules["subscribe"]:
            if subject == f"{inbox_prefix(name)}.>" or subject in follows:
                continue
            prefix = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES."
            assert subject.startswith(prefix), (name, subject)
            stream, _, consumer = subject.removeprefix(prefix).partition(".")
            granted = {(c.stream, c.name) for c in role.consumers} if role else set()
            assert any(stream == s and (consumer == n or "{" in n) for s, n in granted), (name, subject)


def test_every_announcement_has_one_publisher():
    """A core subject others act on (reload a segment, a journey, a model; forget a deleted person at the
    edge) is published by the one service that owns it."""
    roles = rendered()
    for subject in (
        subjects.PRIVACY_DELETED,
        subjects.SCORING_MODELS_CHANGED,
        subjects.SEGMENTATION_SEGMENTS_CHANGED,
        subjects.ORCHESTRATION_JOURNEYS_CHANGED,
        subjects.MODELS_DRIFT,
    ):
        publishers = sorted(n for n, rules in roles.items() if any(overlaps(subject, p) for p in rules["publish"]))
        assert len(publishers) == 1, (subject, publishers)
