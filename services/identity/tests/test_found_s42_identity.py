"""Defects found by trying the platform as a customer, an operator and an attacker would (session 42): the
identity service's side."""

from __future__ import annotations

import orjson

from cdp_identity.domain.graph import IdentityGraph
from cdp_identity.domain.normalize import Normalizer
from cdp_identity.domain.rules import MergeRules
from cdp_kit.storage.model import MAX_DOCUMENT_BYTES

MINUTE = 60_000
MAX_IDENTIFIERS = 2000  # cdp_identity.domain.graph's (named here so the test runs against code without it)


def test_a_user_with_an_anonymous_id_per_event_stays_within_what_the_store_keeps():
    """A server integration that makes up an anonymous id for every call (analytics-node users do) gives one
    user id a new anonymous id per event; a visitor's page views before each sign-in make a person of their
    own, merged at the sign-in. anonymous_id has no limit, and the person's record lists every identifier it
    holds and every merge: past some 27,000 such events with 256-character ids it was over the store's
    8 MiB, and every later write of the partition failed (InvalidArgument ops[..].doc): it reloaded its
    cache and retried the batch for ever, resolving no one else. Now a person holds at most
    MAX_IDENTIFIERS; the events still resolve to the user, the identifiers past it are left out and say so."""
    rules = MergeRules.from_dict({})
    normalizer = Normalizer(rules)
    graph = IdentityGraph(rules)
    pad = "v" * 240
    now = 0
    user = None
    for n in range(MAX_IDENTIFIERS + 500):
        now += MINUTE
        anonymous = f"anonymous_id:{pad}{n:08d}"
        if n % 2:  # a visit first, then the sign-in that merges it
            (visit,), _ = normalizer.normalize([tuple(anonymous.split(":", 1))])
            graph.resolve([visit], event_id=f"v{n}", at=now)
            now += MINUTE
        identifiers, _ = normalizer.normalize([("user_id", "s42-server"), tuple(anonymous.split(":", 1))])
        resolution = graph.resolve(identifiers, event_id=f"e{n}", at=now)
        user = user or resolution.person
        assert resolution.person == user
    root = graph.persons[user]
    assert len(root.ids) <= MAX_IDENTIFIERS
    assert len(orjson.dumps(root.to_doc())) < MAX_DOCUMENT_BYTES // 2
    assert {d.reason for d in resolution.drops} == {"limit:identifiers"}
