"""What profile publishes on `profiles.changed.<p(person)>`: one `ProfileChangedBatch` per partition.

Message ids are derived from the content, so the same changes published twice (a retry after a lost
acknowledgement, leftovers published again at start-up) are stored once by JetStream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import OutMessage
from cdp_kit.bus.subjects import profiles_changed
from cdp_kit.timestamps import from_seconds
from cdp_profile.domain import ProfileChange
from cdp_profile.events import python_to_value


def change_messages(
    changes: Mapping[str, ProfileChange], *, cause: str, now: float, partition_of: Callable[[str], int]
) -> list[OutMessage]:
    """The changes worth publishing (`ProfileChange.publishable`: something changed, or a duplicate event is
    listed again) as messages, one per partition of the persons they are about."""
    grouped: dict[int, profile_pb2.ProfileChangedBatch] = {}
    stamp = from_seconds(now)
    seconds, nanos = stamp.seconds, stamp.nanos
    for person, change in changes.items():
        if not change.publishable:
            continue
        partition = partition_of(person)
        batch = grouped.get(partition)
        if batch is None:
            batch = grouped[partition] = profile_pb2.ProfileChangedBatch()
        # Fields set one by one: `add(person_id=..., cause=..., at=stamp)` cost three times as much (a
        # keyword call, and the Timestamp copied in as a message).
        message = batch.changes.add()
        message.person_id = person
        message.cause = cause
        at = message.at
        at.seconds = seconds
        at.nanos = nanos
        for name, value in change.traits.items():
            python_to_value(value, message.traits[name])
        for group, value in change.groups.items():
            python_to_value(value, message.groups[group])
        if change.computed:
            computed = message.computed
            for name, value in change.computed.items():
                kind = type(value)
                # Most computed values are numbers: set them without python_to_value's dispatch (about a
                # fifth of the cost per value). A bool's type is bool, so it still takes the general path.
                if kind is float or kind is int:
                    computed[name].number_value = value
                else:
                    python_to_value(value, computed[name])
        # None: the decision or score left with the other side of a split; it is absent from now on.
        # Most changes carry no consent (and an event's no scores): nothing to visit then.
        if change.consent:
            consent = message.consent
            for key, granted in change.consent.items():
                if granted is not None:
                    consent[key] = granted
        if change.scores:
            scores = message.scores
            for name, score in change.scores.items():
                if score is not None:
                    scores[name] = score
        if change.relisted:
            # A duplicate's id, listed again with nothing changed (`ProfileChange.relisted`), among the applied
            # ones in the order the profile met them: a reader waiting for the profile to cover the person's
            # latest event finds it here.
            message.event_ids.extend(change.listed())
        elif change.event_ids:
            message.event_ids.extend(change.event_ids)
        if change.merged:
            message.merged.extend(change.merged)
        if change.split_from:
            message.split_from = change.split_from
        if change.merged_into or change.removed:
            message.removed = True
        elif change.created:
            message.created = True
    out = []
    for partition, batch in grouped.items():
        payload = batch.SerializeToString()
        out.append(
            OutMessage(
                subject=profiles_changed(partition),
                payload=payload,
                msg_id="pc_" + hashlib.blake2b(payload, digest_size=16).hexdigest(),
            )
        )
    return out
