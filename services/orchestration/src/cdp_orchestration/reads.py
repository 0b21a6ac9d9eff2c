"""The profile fields orchestration keeps of each person: only those something here reads.

Every profile change reaches orchestration, and most move a computed trait or a score that no journey
reads; keeping them all made a person-record write of most changes (~2 KB each). With a profile service to
read a person from (`CDP_PROFILE_ADDRESS`), a change's computed traits and scores are kept only when read
(`Keep`): by a journey version (conditions, templates, CRM signals, `rank_by`: `Journey.fields_read`; a
template that reads a root other than as `root.name` reads the whole root) or by the arbiter's rules
(suppression conditions). A CRM action naming no signals carries the person's top scores: those are not
kept here (each score update of every person rewrote their record for a task a few of them get); the task
goes with the scores held here, marked (`Reads.scores_partial`, `ActionMessage.signals_from_profile`), and
the CRM connector reads the person's from the profile service when it takes the task. Read here, every
action of the batch waited for that read (the batch is committed and published whole): a webhook decided
beside such a task waited as long as the profile service's event loop was held. Traits and consent are always kept whole: small,
rarely changing, and read by the arbiter (time zone, consent), the channels (addresses) and the
dispatchers' consent check. Every published version read since the start counts, whatever its journey's
state (`Journeys.published`): an older version's running instances read what it reads.

The set is computed again when the journeys change (`Journeys.generation`), never per event. Each person
record carries the fingerprint of the set it was kept under (`reads`). A record kept under another set may
lack a field read now (a journey published since reads `computed.x`): before any input of theirs is
applied, the person is read again from the profile service (BatchGetProfiles, the persons of one batch in a
few calls) and their computed traits and scores taken from it (`Reads.bring_up`); until that answers, the
batch is not applied (it is retried), so no condition reads a field as missing that the person has. A
person the profile service does not have keeps what is held here and read now. A record without a fingerprint (written by an earlier build, or while no profile service was configured) kept
every field: it is complete, and only pruned. Without a profile service every field is kept, as before.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.errors import Unavailable
from cdp_kit.profile_fields import COMPUTED, SCORES, profile_fields
from cdp_orchestration.domain.journey import Action
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.domain.templates import whole_roots
from cdp_orchestration.journeys import Journeys

log = logging.getLogger("cdp.orchestration")

# Person id -> their flat fields (a person the profile service does not have is left out).
Fetch = Callable[[Sequence[str]], Awaitable[dict[str, dict[str, Any]]]]

FETCH_BATCH = 100  # persons per BatchGetProfiles call
_COMPUTED, _SCORES = COMPUTED + ".", SCORES + "."


class Keep:
    """Which computed traits and scores (bare names) are kept; None: all of that root."""

    __slots__ = ("computed", "fingerprint", "scores")

    def __init__(self, computed: frozenset[str] | None, scores: frozenset[str] | None) -> None:
        self.computed = computed
        self.scores = scores
        parts = [
            "computed:" + ("*" if computed is None else ",".join(sorted(computed))),
            "scores:" + ("*" if scores is None else ",".join(sorted(scores))),
        ]
        self.fingerprint = hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()

    def keeps(self, key: str) -> bool:
        if key.startswith(_COMPUTED):
            return self.computed is None or key[len(_COMPUTED) :] in self.computed
        if key.startswith(_SCORES):
            return self.scores is None or key[len(_SCORES) :] in self.scores
        return True

    def covers(self, other: Keep) -> bool:
        """Whether everything `other` keeps is kept here."""
        return _covers(self.computed, other.computed) and _covers(self.scores, other.scores)


def _covers(mine: frozenset[str] | None, theirs: frozenset[str] | None) -> bool:
    return mine is None or (theirs is not None and theirs <= mine)


def read_set(journeys: Journeys, rules: Rules) -> Keep:
    """What every published journey version and the arbiter's rules read of the computed traits and scores."""
    fields: set[str] = set(rules.fields)
    whole: set[str] = set()
    for journey in journeys.published():
        fields |= journey.fields_read
        for node in journey.nodes.values():
            if isinstance(node, Action):
                whole |= whole_roots(node.template)
                # A CRM action naming no signals: its task's top scores are read when it is sent (`Reads.scores`).
    computed = None if COMPUTED in whole else frozenset(f[len(_COMPUTED) :] for f in fields if f.startswith(_COMPUTED))
    scores = None if SCORES in whole else frozenset(f[len(_SCORES) :] for f in fields if f.startswith(_SCORES))
    return Keep(computed, scores)


class Reads:
    """The current `Keep` (computed again when the journeys change) and the persons brought up to it."""

    def __init__(self, journeys: Journeys, rules: Rules, fetch: Fetch) -> None:
        self.journeys = journeys
        self.rules = rules
        self.fetch = fetch
        self._generation = -1
        self._keep = Keep(frozenset(), frozenset())
        self.known: dict[str, Keep] = {}  # fingerprint -> the set, for the sets computed since the start

    def keep(self) -> Keep:
        generation = self.journeys.generation
        if generation != self._generation:
            keep = read_set(self.journeys, self.rules)
            if keep.fingerprint != self._keep.fingerprint:
                log.info(
                    "profile fields kept: %s computed traits, %s scores",
                    "all" if keep.computed is None else len(keep.computed),
                    "all" if keep.scores is None else len(keep.scores),
                )
            self._keep = self.known.setdefault(keep.fingerprint, keep)
            self._generation = generation
        return self._keep

    def scores_partial(self) -> bool:
        """Whether some score is not kept here: a CRM task naming no signals then goes with the top scores
        held, marked for the CRM connector to read the person's from the profile service
        (`ActionMessage.signals_from_profile`)."""
        return self.keep().scores is not None

    async def bring_up(self, persons: Iterable[Any], keep: Keep) -> None:
        """Each person kept under another set is brought to `keep` (see the module docstring): pruned when
        what they hold covers it, else read again from the profile service."""
        stale = []
        for person in persons:
            reads = person.reads
            if reads == keep.fingerprint or person.forgotten:
                continue
            held = self.known.get(reads) if reads is not None else None
            if reads is None or (held is not None and held.covers(keep)):
                _prune(person.fields, keep)
                person.reads, person.dirty = keep.fingerprint, True
            else:
                stale.append(person)
        if not stale:
            return
        fetched = await self.fetch([p.person_id for p in stale])
        missing = 0
        for person in stale:
            fields = person.fields
            found = fetched.get(person.person_id)
            if found is None:
                # The profile service does not have them (a store restored from an older copy, say): what is
                # held here and read now stays; a field read now that was not kept is not known.
                missing += 1
                _prune(fields, keep)
            else:
                for key in [k for k in fields if k.startswith((_COMPUTED, _SCORES))]:
                    del fields[key]
                for key, value in found.items():
                    if key.startswith((_COMPUTED, _SCORES)) and keep.keeps(key):
                        fields[key] = value
            person.reads, person.dirty = keep.fingerprint, True
        log.info(
            "persons read again from the profile service for the fields kept now: %d (%d it does not have: their "
            "fields held here kept)",
            len(stale),
            missing,
        )


def _prune(fields: dict[str, Any], keep: Keep) -> None:
    for key in [k for k in fields if not keep.keeps(k)]:
        del fields[key]


def profile_fetch(channel: grpc.aio.Channel, token: str, *, timeout: float = 10.0) -> Fetch:
    """`Fetch` through the profile service's BatchGetProfiles; `Unavailable` when it does not answer or
    refuses (the batch is applied again later)."""
    stub = profile_pb2_grpc.ProfileServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def get(person_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(person_ids), FETCH_BATCH):
            request = profile_pb2.BatchGetProfilesRequest(person_ids=list(person_ids[start : start + FETCH_BATCH]))
            try:
                answer = await stub.BatchGetProfiles(request, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(f"profile service: {exc.code().name}", retry_after=1.0) from None
            for profile in answer.profiles:
                found[profile.person_id] = profile_fields(profile)
        return found

    return get
