"""A customer with hundreds of live journeys: what publishing one more, or listing them, costs grows with the
journeys no faster than their number, and listing them changes nothing when nothing changed.

In process, over a memory store (test_entry_index's service: `Journeys` and the engine's apply stage, no bus).
Work is counted, not timed: the journeys parsed (`parse_journey` spied on) and the Python lines `_index` runs
(a trace function), which are deterministic.
"""

from __future__ import annotations

import sys
from typing import Any

import cdp_orchestration.journeys as journeys_module
from cdp_kit.storage import open_store
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.journeys import Journeys

from .test_entry_index import Service, journey


def with_draft(journey_id: str, event: str) -> dict[str, Any]:
    return {**journey(journey_id, {"event": event}, version=2), "name": f"{journey_id} (editing)"}


async def test_listing_the_journeys_again_parses_none_of_those_unchanged_and_keeps_the_fields_read(monkeypatch):
    # ListJourneys takes every stored journey in (those changed through other replicas too). Taking each in
    # again parsed every draft and rebuilt the index, whose new generation made the next batch compute the
    # fields read again: 0.75 s per ListJourneys at 500 journeys with drafts.
    async with open_store("memory://") as store:
        service = Service(store)
        for n in range(30):
            await service.publish(journey(f"j{n}", {"event": f"E{n}"}))
            await service.journeys.save(
                lifecycle.save_draft(service.journeys.get(f"j{n}"), parse_journey(with_draft(f"j{n}", f"E{n}")))
            )
        await service.journeys.load()
        parsed: list[str] = []

        def counting(document, *args, **kwargs):
            parsed.append(document["id"])
            return parse_journey(document, *args, **kwargs)

        monkeypatch.setattr(journeys_module, "parse_journey", counting)
        generation = service.journeys.generation
        await service.journeys.load()
        assert (parsed, service.journeys.generation) == ([], generation)
        assert len(service.journeys.live()) == 30

        # Another replica publishes j7's draft: this one takes that journey in, and only it, at the next list.
        other = Journeys(store)
        await other.load()
        await other.save(lifecycle.publish(other.get("j7")))
        parsed.clear()  # (the other replica's own)
        await service.journeys.load()
        assert parsed == ["j7"] and service.journeys.generation == generation + 1
        assert service.journeys.get("j7").live.version == 2
        await service.event("ada", "E7")  # the new version takes the entry
        assert [i.version for i in service.logic.hot[0].persons["ada"].live.values()] == [2]


def lines_run(call) -> int:
    """The Python lines `call()` runs in journeys.py."""
    count = 0
    target = journeys_module.__file__

    def trace(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != target:
            return None
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


async def test_indexing_the_live_journeys_is_linear_in_their_number():
    # Rebuilt on every publish, pause, resume and archive: finding each journey's place in live() once per
    # event name made it quadratic (70 ms of a publish's 97 ms at 500 journeys).
    async def index_lines(count: int) -> int:
        async with open_store("memory://") as store:
            service = Service(store)
            for n in range(count):
                await service.publish(journey(f"j{n}", {"event": f"E{n}"}))
            return lines_run(service.journeys._index)

    small, large = await index_lines(150), await index_lines(600)
    assert large < 4.5 * small, (small, large)  # quadratic: about 16 times
