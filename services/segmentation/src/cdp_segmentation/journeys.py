"""What live journeys read, as orchestration lists them: so a segment or a computed trait a live journey
uses is not deleted from under it in silence.

A journey is live while it is active or paused (published; a paused one resumes on its live version). Its
live version's document (`ListJourneys`, orchestration:read) is read here, not orchestration's code:

- the segments it uses: the segment it enters on (`entry.segment`) or is scheduled over
  (`entry.schedule.segment`), and those its conditions read (`in_segment("vip")`);
- the computed traits it reads: `computed.<name>` wherever the document names one (conditions,
  templates, a crm action's signals, `rank_by`), and those its conditions' event conditions compile to
  (`count(event = "Order Completed", within 30d) >= 1` reads `computed.seg_<hash>`, the trait a segment
  with the same condition shares).

Conditions are compiled with the language (`cdp_lang`), as orchestration compiles them (the entry's
fields under `entry.` too). A condition that does not compile (never one of a published version) is read
by its words only: `computed.<name>` and `in_segment("<id>")` in its text.

`live_journeys(channel, token)` asks orchestration; a call that fails raises `Unavailable`: the callers
refuse rather than delete blindly.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp_kit.errors import CdpError, Unavailable
from cdp_kit.profile_fields import COMPUTED, ROOTS
from cdp_lang import compile_condition

# The root a journey's conditions read the instance's entry fields under (orchestration's `entry.<name>`).
ENTRY = "entry"
# A computed trait named anywhere in a text: `computed.<name>` as a field (names: profile's NAME_RE).
_COMPUTED_NAME = re.compile(r"(?<![A-Za-z0-9_.])computed\.([a-z][a-z0-9_]{0,63})(?![a-z0-9_])")
_IN_SEGMENT = re.compile(r"in_segment\(\s*\"([a-z][a-z0-9_-]{0,63})\"\s*\)")
LIVE_STATES = (orchestration_pb2.JOURNEY_STATE_ACTIVE, orchestration_pb2.JOURNEY_STATE_PAUSED)
PAGE = 200


@dataclass(frozen=True, slots=True)
class LiveJourney:
    id: str
    name: str
    segments: frozenset[str]
    computed: frozenset[str]  # computed trait names


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _conditions(document: Mapping[str, Any]) -> Iterator[Any]:
    """The conditions of a journey document: the event entry's `if`, each exit's and wait's `condition`,
    each branch's `if`."""
    entry = document.get("entry")
    if isinstance(entry, Mapping) and "if" in entry:
        yield entry["if"]
    exits = document.get("exit")
    for rule in exits if isinstance(exits, list) else ():
        if isinstance(rule, Mapping) and "condition" in rule:
            yield rule["condition"]
    nodes = document.get("nodes")
    for node in nodes if isinstance(nodes, list) else ():
        if not isinstance(node, Mapping):
            continue
        if "condition" in node:
            yield node["condition"]
        branches = node.get("branches")
        for branch in branches if isinstance(branches, list) else ():
            if isinstance(branch, Mapping) and "if" in branch:
                yield branch["if"]


def journey_reads(document: Mapping[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """(segments, computed trait names) a journey document uses; see the module's docstring."""
    segments: set[str] = set()
    computed: set[str] = set()
    entry = document.get("entry")
    if isinstance(entry, Mapping):
        if isinstance(entry.get("segment"), str):
            segments.add(entry["segment"])
        schedule = entry.get("schedule")
        if isinstance(schedule, Mapping) and isinstance(schedule.get("segment"), str):
            segments.add(schedule["segment"])
    for text in _strings(document):
        computed.update(_COMPUTED_NAME.findall(text))
    prefix = f"{COMPUTED}."
    for source in _conditions(document):
        try:
            compiled = compile_condition(source, "condition", roots=(*ROOTS, ENTRY))
        except (CdpError, ValueError, TypeError, RecursionError):
            for text in _strings(source):
                segments.update(_IN_SEGMENT.findall(text))
            continue
        segments |= compiled.reads.segments
        computed.update(key[len(prefix) :].partition(".")[0] for key in compiled.reads.fields if key.startswith(prefix))
        computed.update(t["name"] for t in compiled.computed_traits if isinstance(t.get("name"), str))
    return frozenset(segments), frozenset(computed)


LiveJourneys = Callable[[], Awaitable[list[LiveJourney]]]


def live_journeys(channel: grpc.aio.Channel, token: str, *, timeout: float = 5.0) -> LiveJourneys:
    """The active and paused journeys orchestration has, each with what its live version uses; Unavailable
    when orchestration cannot be asked."""
    stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def listed() -> list[LiveJourney]:
        found: list[LiveJourney] = []
        page_token = ""
        try:
            while True:
                answer = await stub.ListJourneys(
                    orchestration_pb2.ListJourneysRequest(states=LIVE_STATES, page_size=PAGE, page_token=page_token),
                    metadata=metadata,
                    timeout=timeout,
                )
                found.extend(_live(answer.journeys))
                page_token = answer.next_page_token
                if not page_token:
                    return found
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"the orchestration service could not be asked which live journeys use it ({exc.code().name})",
                retry_after=5.0,
                reason="orchestration_unavailable",
            ) from None

    return listed


def _live(journeys: Iterable[orchestration_pb2.Journey]) -> Iterator[LiveJourney]:
    for journey in journeys:
        if journey.state not in LIVE_STATES:
            continue
        segments, computed = journey_reads(json_format.MessageToDict(journey.definition))
        yield LiveJourney(journey.id, journey.name, segments, computed)


def named(items: Iterable[tuple[str, str]]) -> str:
    """`'vip' (VIP customers), 'churn'`: ids with their names where they have one (never values)."""
    return ", ".join(f"{i!r} ({n})" if n and n != i else repr(i) for i, n in sorted(items))


__all__ = ["LiveJourney", "LiveJourneys", "journey_reads", "live_journeys", "named"]
