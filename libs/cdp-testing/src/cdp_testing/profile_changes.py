"""Profile changes as profile publishes them, for tests of the services that consume `profiles.changed`.

seq = await publish_change(bus, change("p_ada", traits=...), partitions=2)
"""

from __future__ import annotations

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, partition_for, subjects


def change(person: str, **fields) -> profile_pb2.ProfileChanged:
    """A ProfileChanged of `person` with `fields`, made now."""
    message = profile_pb2.ProfileChanged(person_id=person, **fields)
    message.at.GetCurrentTime()
    return message


async def publish_change(bus: Bus, message: profile_pb2.ProfileChanged, *, partitions: int) -> int:
    """One change as a batch on its person's `profiles.changed.<p>`; the stream sequence it was stored at."""
    subject = subjects.profiles_changed(partition_for(message.person_id, partitions))
    ack = await bus.js.publish(subject, profile_pb2.ProfileChangedBatch(changes=[message]).SerializeToString())
    return ack.seq
