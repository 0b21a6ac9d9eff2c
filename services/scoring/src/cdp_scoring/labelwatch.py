"""Which resolved events are labels of a live model: what makes its realised quality stale.

A model's label definition (its spec's `training.label`, or the default its figures were computed with,
`realised.label`) lists the events that decide a row's label: a chargeback or a case closed as fraud,
an order for conversion, an answer for next best channel. When one of them reaches the platform
(`events.resolved`), the live version's figures on the latest closed window may change, so they are
recomputed soon (quality.py debounces). Matching is the training code's (`cdp_training.labels`): an
event name (a track's `event`, a page's or screen's `name`), an optional type, and `where`: properties
that must hold the given values.

`no_activity` labels (churn) have no label event: any event is activity, and a churn label is known only
once its window closes, which happens at a day boundary (quality.py's window check), not on arrival.

Most events are not labels, and every resolved event passes here: a message is decoded only when the
bytes of some label event's name occur in it (a protobuf string is its UTF-8 bytes), so the common
message costs one substring search per name.

The events come from a durable JetStream consumer on `events.resolved` (`follow`, durable
`scoring-quality-labels`), which every replica fetches from, so each message reaches one of them, and
which is acknowledged once the message has marked its models stale. A label that arrives while every
replica is down waits in it: the first replica back marks the model stale. The consumer is created
delivering what arrives from then on (the stream's days of history are not read again at the first start);
later starts resume where it stopped. A stale mark lives in the replica's memory: one lost with a replica
that dies before computing is caught by the next day boundary or the schedule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from nats.js import api
from nats.js.errors import NotFoundError

from cdp.events.v1 import events_pb2
from cdp_kit.bus import Bus, ConsumerSpec, Delivery, subjects
from cdp_kit.bus.consumer import describe_error
from cdp_kit.bus.setup import answered

log = logging.getLogger("cdp.scoring.quality")

# The durable consumer the replicas' label watch shares (each message reaches one replica).
DURABLE = "scoring-quality-labels"

# The Segment call types by their wire value, named from the proto's own enum (EVENT_TYPE_TRACK -> "track").
TYPES = {v: n.removeprefix("EVENT_TYPE_").lower() for n, v in events_pb2.EventType.items() if v}
# Label kinds whose events are labels arriving (no_activity's events are activity, not labels).
ARRIVING = frozenset({"goal_event", "label_event", "orders_and_value", "channel_answered"})


@dataclass(frozen=True, slots=True)
class Match:
    name: str | None
    type: str | None
    where: tuple[tuple[str, Any], ...]

    def matches(self, kind: str, name: str, properties: Mapping[str, Any]) -> bool:
        if self.name is not None and name != self.name:
            return False
        if self.type is not None and kind != self.type:
            return False
        return all(properties.get(key) == value for key, value in self.where)


def matches_of(label: Mapping[str, Any] | None) -> tuple[Match, ...]:
    """The label events of a label definition (none for churn's no_activity, or a definition not read)."""
    if not isinstance(label, Mapping) or label.get("kind") not in ARRIVING:
        return ()
    out = []
    for item in label.get("events") or ():
        if isinstance(item, Mapping):
            where = item.get("where") if isinstance(item.get("where"), Mapping) else {}
            out.append(Match(item.get("name"), item.get("type"), tuple(sorted(where.items()))))
    return tuple(out)


class LabelWatch:
    """The live models' label events, and which models a `ResolvedEventBatch` labels."""

    def __init__(self, labels: Mapping[str, Mapping[str, Any] | None] | None = None) -> None:
        self.models: dict[str, tuple[Match, ...]] = {}
        # Bytes that must occur in a message for it to label anything; None: some match has no name.
        self.needles: tuple[bytes, ...] | None = ()
        self.update(labels or {})

    def update(self, labels: Mapping[str, Mapping[str, Any] | None]) -> None:
        """model -> its live version's label definition (None: unknown yet)."""
        self.models = {model: found for model, label in labels.items() if (found := matches_of(label))}
        names = [m.name for matches in self.models.values() for m in matches]
        self.needles = None if any(n is None for n in names) else tuple({n.encode() for n in names if n})

    def labelled(self, data: bytes) -> dict[str, str]:
        """model -> the name of the first of its label events in the message `data` (a
        ResolvedEventBatch); empty when the message labels nothing."""
        if not self.models or (self.needles is not None and not any(n in data for n in self.needles)):
            return {}
        return self.labelled_by(events_pb2.ResolvedEventBatch.FromString(data).events)

    def labelled_by(self, events: Iterable[events_pb2.ResolvedEvent]) -> dict[str, str]:
        out: dict[str, str] = {}
        for resolved in events:
            event = resolved.event
            kind = TYPES.get(event.type, "track")
            name = event.event if kind == "track" else event.name if kind in ("page", "screen") else ""
            properties: dict[str, Any] | None = None
            for model, matches in self.models.items():
                if model in out:
                    continue
                for match in matches:
                    if match.name is not None and match.name != name:
                        continue
                    if properties is None:
                        properties = json_format.MessageToDict(event.properties) if event.HasField("properties") else {}
                    if match.matches(kind, name, properties):
                        out[model] = name or kind
                        break
        return out


def consumer_spec() -> ConsumerSpec:
    return ConsumerSpec(
        stream=subjects.EVENTS_RESOLVED,
        durable=DURABLE,
        filter_subjects=(subjects.every_partition(subjects.EVENTS_RESOLVED_PREFIX),),
        batch_size=512,
        # Every resolved event of the platform comes here, and fetches that follow the stream hand them
        # over a message (a few events) at a time: a pull or two, a span and metric records each. A label
        # makes figures stale that are computed CDP_SCORING_QUALITY_SETTLE_SECONDS later at the soonest,
        # so a quarter of a second between fetches costs nothing and makes each fetch take what came.
        linger=0.25,
        description="scoring: label events that make realised quality stale",
    )


async def _create_delivering_new(bus: Bus, spec: ConsumerSpec) -> None:
    """Create the consumer, when it does not exist, at the stream's end (the kit's runner then finds it and
    keeps where it starts)."""
    what = f"consumer {spec.durable} of stream {spec.stream}"  # asked again while a stalled server is silent
    try:
        await answered(bus.js, what, lambda: bus.js.consumer_info(spec.stream, spec.durable))
    except NotFoundError:
        config = spec.config()
        config.deliver_policy = api.DeliverPolicy.NEW
        await answered(bus.js, what, lambda: bus.js.add_consumer(spec.stream, config))


async def follow(bus: Bus, on_resolved: Callable[[bytes], None]) -> None:
    """Hand every `events.resolved` message this replica receives to `on_resolved` (which marks models
    stale), acknowledged after it returned; runs until cancelled, waiting out NATS outages."""
    spec = consumer_spec()
    delay = 0.5
    while True:
        try:
            await _create_delivering_new(bus, spec)
            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS or the stream not there yet: try again
            log.warning("label consumer not ready", extra={"consumer": DURABLE, "error": describe_error(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def handle(batch: Sequence[Delivery]) -> None:
        for delivery in batch:
            try:
                on_resolved(delivery.data)
            except Exception as exc:  # an unreadable message labels nothing; it must not hold the others
                log.warning(
                    "resolved event not read for labels",
                    extra={"stream_seq": delivery.stream_seq, "error": describe_error(exc)},
                )

    await bus.consumer(spec, handle).run()
