"""What the connector reads: the inputs of a batch decoded from PROFILES, SEGMENTS and ACTIONS (`decode`),
the person as the connector follows it (`View`) and what an action mapping reads (`action_source`).
Re-exported by `cdp_crm.engine`."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp.orchestration.v1 import orchestration_pb2
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_crm.domain import projection as proj
from cdp_crm.state import PERSONS
from cdp_kit.bus import subjects
from cdp_kit.engine import Reject
from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import change_fields, value_to_python
from cdp_kit.storage.checks import check_document, check_key


@dataclass(frozen=True, slots=True)
class Input:
    kind: str  # profile | segment | action | merge (data: the persons merged into `person_id`)
    person_id: str
    stamp: int  # the stream position: later is newer
    data: Any


class MappedPaths:
    """The profile fields the mappings read, by part of the change that carries them: a change's updates of
    those fields only, looked up by name (a change carries dozens of computed traits; a mapping reads a
    few fields), with no other value decoded."""

    def __init__(self, reads: Iterable[str]) -> None:
        self.parts: dict[str, list[tuple[str, str]]] = {"traits": [], "computed": [], "consent": [], "scores": []}
        for path in sorted(reads):
            root, _, name = path.partition(".")
            if root in self.parts and name:
                self.parts[root].append((name, path))

    def updates(self, change: profile_pb2.ProfileChanged) -> dict[str, Any]:
        return storable(self._updates(change))

    def _updates(self, change: profile_pb2.ProfileChanged) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part, values in (("traits", change.traits), ("computed", change.computed)):
            for name, path in self.parts[part]:
                if name in values:
                    value = values[name]
                    kind = value.WhichOneof("kind")
                    out[path] = (
                        value.number_value if kind == "number_value"
                        else value.string_value if kind == "string_value"
                        else value_to_python(value)
                    )  # fmt: skip
        for part, values in (("consent", change.consent), ("scores", change.scores)):
            for name, path in self.parts[part]:
                if name in values:
                    out[path] = values[name]
        return out


def storable(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with each value the connector's store cannot keep read as gone (None), as a value a transform
    cannot handle counts as missing: a profile value is kept in the person's view, and once projected in the
    record, its queued change or dead letter. A score of NaN or an infinity (a double on the bus), or a trait
    holding an object with a `$` or NUL key (`{"$oid": ...}`, which the collector and profile take), failed
    the batch at its commit, again at every redelivery, until its message was dead-lettered with every other
    person's change in it. Text and finite numbers, nearly every value, are taken at once."""
    for name, value in fields.items():
        kind = type(value)
        if kind is str or value is None or kind is bool:
            continue
        if kind is float:
            if not math.isfinite(value):
                fields[name] = None
            continue
        try:
            check_document("crm_persons", "view", {"v": value})
        except InvalidArgument:
            fields[name] = None
    return fields


RejectPart = Callable[[int, bytes, str, str], None]
PERSON_ID_PROBLEM = "not a person id the store can key (1-1,024 characters, no NUL)"


def keyable(person_id: str) -> bool:
    """Whether the store can key a document by this person id. One it cannot (empty, over 1,024 characters,
    a NUL) - a message no service of the platform sends, but one a NATS publisher can - failed every batch
    holding it at its first read or write, and the partition retried the batch, every other person's changes
    held behind it, until the kit dead-lettered the message after its redeliveries."""
    try:
        check_key(PERSONS, person_id, field="person_id")
    except InvalidArgument:
        return False
    return True


def _left_out(batch: Any, items: Any, name: str, persons: Callable[[Any], tuple[str, ...]], reject: Any) -> None:
    """Remove from `items` (a repeated field of `batch`) those naming a person the store cannot key, each
    handed to `reject` with its index in the message as sent."""
    bad = [i for i, item in enumerate(items) if not all(map(keyable, persons(item)))]
    for i in reversed(bad):
        if reject is not None:
            reject(i, items[i].SerializeToString(), "invalid_person_id", f"{name}[{i}].person_id: {PERSON_ID_PROBLEM}")
        del items[i]


def reads_fingerprint(reads: Iterable[str]) -> str:
    """Names the set of fields the mappings read: a view kept under another set is not complete."""
    return hashlib.blake2b("\n".join(sorted(reads)).encode(), digest_size=8).hexdigest()


def decode(
    stream: str, data: bytes, stamp: int, mapped: MappedPaths | None = None, reject: RejectPart | None = None
) -> list[Input]:
    """`mapped`: keep only the profile changes of fields the mappings read (and only those fields).
    `reject(index, bytes, reason, detail)`: a change or segment event naming a person the store cannot key
    (`keyable`) is left out and handed there (the delivery's `reject_part`: dead-lettered alone)."""
    try:
        if stream == subjects.PROFILES:
            batch = profile_pb2.ProfileChangedBatch.FromString(data)
            _left_out(batch, batch.changes, "changes", lambda c: (c.person_id, *c.merged), reject)
            # A survivor's change naming the persons merged into it: their CRM records are merged into its own
            # (engine.py `merge_pending`), after this change's writes.
            merges = [Input("merge", c.person_id, stamp, tuple(c.merged)) for c in batch.changes if c.merged]
            if mapped is None:
                changes = [
                    Input("profile", c.person_id, stamp, (storable(change_fields(c)), c.removed)) for c in batch.changes
                ]
                return changes + merges
            inputs = []
            for c in batch.changes:
                # A removed profile writes nothing here (privacy.deleted erases its records).
                updates = None if c.removed else mapped.updates(c)
                if updates:
                    inputs.append(Input("profile", c.person_id, stamp, (updates, False)))
            return inputs + merges
        if stream == subjects.SEGMENTS:
            batch = segmentation_pb2.SegmentEventBatch.FromString(data)
            _left_out(batch, batch.events, "events", lambda e: (e.person_id,), reject)
            return [Input("segment", e.person_id, stamp, (e.segment_id, e.entered)) for e in batch.events]
        if stream == subjects.ACTIONS:
            action = orchestration_pb2.ActionMessage.FromString(data)
            if not keyable(action.person_id):
                raise Reject("invalid_person_id", "person_id", PERSON_ID_PROBLEM)
            return [Input("action", action.person_id, stamp, action)]
    except Reject:
        raise
    except Exception as exc:  # a payload that is not what its stream carries can never be applied
        raise Reject("invalid_payload", stream, f"not a {stream} message: {type(exc).__name__}") from None
    raise Reject("unknown_input", "headers", "not sourced from PROFILES, SEGMENTS or ACTIONS")


@dataclass
class View:
    """A person as the connector follows it."""

    fields: dict[str, Any] = field(default_factory=dict)
    segments: set[str] = field(default_factory=set)
    stamp: int = 0
    dirty: bool = False
    # The fingerprint of the mapped fields this view keeps (None: it keeps every field).
    reads: str | None = None

    def source(self, person_id: str, action: Mapping[str, Any] | None = None) -> proj.Source:
        return proj.Source(person_id, self.fields, frozenset(self.segments), action)

    def to_doc(self) -> dict[str, Any]:
        doc = {"fields": self.fields, "segments": sorted(self.segments), "stamp": self.stamp}
        if self.reads is not None:
            doc["reads"] = self.reads
        return doc


def action_source(action: orchestration_pb2.ActionMessage) -> dict[str, Any]:
    """What an action mapping reads as `action.<field>` (the domain's contract). `signals` is the action's
    top signals as "name: value" lines, unless its template has a part of that name: the author's wins."""
    return {
        "signals": "\n".join(f"{s.name}: {s.value}" for s in action.signals),
        **dict(action.content),
        "id": action.action_id,
        "category": action.category,
        "journey_id": action.journey_id,
    }
