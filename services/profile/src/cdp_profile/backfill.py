"""The computed traits a deployment holds, and the backfill that gives a new one its values.

A definition is stored (`profile_computed_traits`) with its backfill progress. Defining one starts a
backfill: the retained timelines of the hot profiles are replayed into it, in chunks of profiles, each
chunk a group commit of its own (with the progress) and its changes published with cause "backfill";
the stream path runs between chunks. A backfill interrupted by a restart starts again from the first
profile (replaying a profile into a definition sets its value, it does not add to it). Redefining a
name drops the old values first (a person the new definition gives no value is published as having none);
deleting one drops its values from every profile, and that is published too (cause "backfill"): readers
of profiles.changed hold a copy of every value.

At most `max_held` definitions are held: every one costs every matching event a contribution and every
profile a value.

A definition belongs to the caller that defined it (`defined_by`, its token's name): scoring,
segmentation and orchestration define the traits their models and conditions read, with `profile:admin`,
and one must not redefine or delete another's (or the operator's). An admin (`*`) may change any, and
the trait stays its owner's. A definition stored before owners were kept has none: the next caller that
changes it becomes its owner.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdp_kit.auth import Caller
from cdp_kit.errors import NotFound, PermissionDenied, ResourceExhausted
from cdp_kit.storage import Delete, Put, Store
from cdp_profile.domain import ComputedTrait, ComputedTraits, ProfileChange
from cdp_profile.records import DEFINITIONS

if TYPE_CHECKING:
    from cdp_profile.engine import ProfileEngine

log = logging.getLogger("cdp.profile.backfill")


@dataclass(slots=True)
class Backfill:
    trait: ComputedTrait
    defined_at: float
    state: str = "backfilling"
    done: int = 0
    total: int = 0
    # Persons who had a value of the definition this one replaced: one the new definition gives no value
    # is published as gone. In memory only: a backfill started again after a restart has none.
    dropped: set[str] = field(default_factory=set)
    defined_by: str = ""  # the caller (token name) that owns it; "" for one stored before owners were kept

    def doc(self) -> dict[str, Any]:
        return {
            # One JSON string: `where` keys and operators start with '$', which document stores reserve.
            "definition": json.dumps(self.trait.to_dict(), separators=(",", ":")),
            "defined_at": self.defined_at,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "defined_by": self.defined_by,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Backfill:
        definition = doc["definition"]
        if isinstance(definition, str):
            definition = json.loads(definition)  # else an object, as written before operators existed
        return cls(
            trait=ComputedTrait.from_dict(definition),
            defined_at=doc["defined_at"],
            state=doc.get("state", "ready"),
            done=doc.get("done", 0),
            total=doc.get("total", 0),
            defined_by=doc.get("defined_by", ""),
        )


def _name(caller: Caller | None) -> str:
    return caller.name if caller is not None else "internal"


def _owner_after(known: Backfill | None, caller: Caller | None, doing: str) -> str:
    """Who owns a definition once `caller` has changed it; PermissionDenied when `caller` may not. An admin
    (`*`, or no caller: the service itself) may change any and leaves its owner in place."""
    if caller is None or "*" in caller.scopes:
        return known.defined_by if known is not None and known.defined_by else _name(caller)
    if known is not None and known.defined_by and known.defined_by != caller.name:
        raise PermissionDenied(
            f"computed trait {known.trait.name!r} was defined by {known.defined_by!r}; only it or an admin "
            f"may {doing} it",
            reason="not_the_owner",
        )
    return caller.name


def check_owner(known: Backfill, caller: Caller | None, doing: str) -> None:
    """PermissionDenied when `caller` may not `doing` ("delete") the definition (see `_owner_after`)."""
    _owner_after(known, caller, doing)


class ComputedTraitCatalogue:
    """The held definitions (`backfills`, by name) and their compiled form (`defs`)."""

    def __init__(self, engine: ProfileEngine, *, max_held: int) -> None:
        self._engine = engine
        self.max_held = max_held
        self.backfills: dict[str, Backfill] = {}
        self.defs = ComputedTraits([])

    async def load(self, store: Store) -> None:
        async for record in store.scan_all(DEFINITIONS):
            backfill = Backfill.from_doc(record.doc)
            self.backfills[backfill.trait.name] = backfill
        self._compile()

    def resume(self) -> None:
        """Start again the backfills a restart interrupted."""
        for backfill in self.backfills.values():
            if backfill.state == "backfilling":
                self._start(backfill)

    def _compile(self) -> None:
        self.defs = ComputedTraits([b.trait for b in self.backfills.values()])

    def _start(self, backfill: Backfill) -> None:
        self._engine.spawn(self._backfill(backfill), f"backfill {backfill.trait.name}")

    async def define(self, trait: ComputedTrait, caller: Caller | None = None) -> Backfill:
        """Define (or redefine) a computed trait and backfill it; ResourceExhausted past `max_held`
        (delete one first). Redefining a held name is allowed to its owner and to admins (PermissionDenied
        to others); the same definition again is a no-op."""
        known = self.backfills.get(trait.name)
        if known is not None and known.trait == trait:
            return known
        owner = _owner_after(known, caller, "redefine")
        if known is None and len(self.backfills) >= self.max_held:
            raise ResourceExhausted(
                f"{len(self.backfills)} computed traits are defined, the most this deployment holds "
                f"(CDP_PROFILE_MAX_COMPUTED_TRAITS={self.max_held}); delete one first",
                retry_after=60.0,
                reason="computed_traits_exhausted",
            )
        engine = self._engine
        backfill = Backfill(trait=trait, defined_at=engine.clock(), defined_by=owner)
        if known is not None:
            backfill.dropped = {
                person for person, profile in engine.hot.profiles.items() if profile.drop_computed(trait.name)
            }
        self.backfills[trait.name] = backfill
        self._compile()
        await engine.commit({}, ops=[Put(DEFINITIONS, trait.name, backfill.doc())])
        log.info(
            "computed trait %s %s", trait.name, "redefined" if known else "defined", extra={"caller": _name(caller)}
        )
        self._start(backfill)
        return backfill

    async def undefine(self, name: str, caller: Caller | None = None) -> None:
        known = self.backfills.get(name)
        if known is None:
            raise NotFound(f"no computed trait named {name!r}", reason="unknown_trait")
        _owner_after(known, caller, "delete")
        del self.backfills[name]
        log.info("computed trait %s deleted", name, extra={"caller": _name(caller)})
        self._compile()
        engine = self._engine
        profiles = engine.hot.profiles
        # Published: segmentation and orchestration hold a copy of the value and must drop it too.
        changes = {person: change for person, profile in profiles.items() if (change := profile.drop_computed(name))}
        await engine.write(
            changes, cause="backfill", now=engine.clock(), ops=[Delete(DEFINITIONS, name)], dirty=profiles
        )

    async def _backfill(self, backfill: Backfill, *, chunk: int = 500) -> None:
        """Replay the retained timelines into a new definition, reporting progress as it goes."""
        engine = self._engine
        hot = engine.hot
        persons = sorted(hot.profiles)
        backfill.total, backfill.done = len(persons), 0
        name = backfill.trait.name
        for start in range(0, len(persons), chunk):
            if self.backfills.get(name) is not backfill:
                return  # replaced or removed meanwhile
            now = engine.clock()
            changes: dict[str, ProfileChange] = {}
            touched: list[str] = []
            for person in persons[start : start + chunk]:
                profile = hot.profiles.get(person)
                if profile is not None:
                    change = profile.backfill(backfill.trait, now=now)
                    if person in backfill.dropped and name not in change.computed:
                        change.computed[name] = None  # it had a value under the definition replaced
                    if change:
                        changes[person] = change
                    # Written even when nothing visible changed: the definition's state is stored too.
                    touched.append(person)
                    hot.expiries.schedule(profile)
            backfill.done = min(backfill.total, start + chunk)
            await engine.write(
                changes, cause="backfill", now=now, ops=[Put(DEFINITIONS, name, backfill.doc())], dirty=touched
            )
            await asyncio.sleep(0)  # let the stream path run between chunks
        if self.backfills.get(name) is backfill:
            backfill.state = "ready"
            backfill.done = backfill.total
            await engine.commit({}, ops=[Put(DEFINITIONS, name, backfill.doc())])
            log.info("computed trait %s backfilled over %d profiles", name, backfill.total)
