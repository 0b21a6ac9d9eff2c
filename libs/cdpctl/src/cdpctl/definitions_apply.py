"""Applying a definitions document to a platform, definition by definition, through the services' gRPC
APIs: each is `created` (absent there), `unchanged` (there with the same content), `conflicting` (there,
same name, other content: left as it is and the differing fields named), `replaced` (conflicting, and
--replace changed it), `manual` (the services have no RPC that can make it so: what to do instead) or
`failed` (a service refused it: its code and the field it named; or cdpctl could not send it).
Importing a document twice changes nothing the second time. With dry_run nothing is written and each outcome says what would happen.

Order: computed traits, then segments (each after the segments it refers to), models, journeys (their
conditions may read segments and computed traits), identity, CRM connections. A new journey is
published version after version and paused after its first, so no one enters a version that is not
its last; it is resumed at the end when it was active. Its draft is saved last; a journey here with a
draft the document lacks is conflicting, the draft named and kept (a document without one never discards
it), and a draft in the document that is not here is conflicting until --replace saves it. Segments are created without waiting and their
whole-population builds are waited for together at the end of their kind.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from cdpctl.definitions_document import KEYS, differences
from cdpctl.definitions_read import Services

CREATED, UNCHANGED, CONFLICTING, REPLACED, MANUAL, FAILED = (
    "created",
    "unchanged",
    "conflicting",
    "replaced",
    "manual",
    "failed",
)
TROUBLE = (CONFLICTING, MANUAL, FAILED)


def _warnings(warnings) -> str:
    """Segmentation's warnings about a definition it accepted (a type or a name no profile holds), for an
    outcome's detail."""
    return "; ".join(f"warning: {warning}" for warning in warnings)


@dataclass
class Outcome:
    kind: str
    name: str
    status: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "status": self.status, "detail": self.detail}


@dataclass
class Apply:
    services: Services
    dry_run: bool
    replace: bool
    progress: Callable[[str], None] = lambda line: None
    # What a segment may read: the computed traits and segments on the platform or in the document (the
    # import's check refuses a segment naming any other before anything is applied).
    traits: frozenset[str] = frozenset()
    segment_ids: frozenset[str] = frozenset()

    async def call(self, service: str, rpc: str, request) -> Any:
        return await self.services.call(service, rpc, request)

    async def each(
        self,
        kind: str,
        wanted: list[dict[str, Any]],
        present: list[dict[str, Any]],
        create: Callable[[dict[str, Any]], Awaitable[str]],
        replace: Callable[[dict[str, Any], dict[str, Any], list[str]], Awaitable[Outcome]] | None,
        check: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        fixed: Callable[[dict[str, Any], dict[str, Any], list[str]], str | None] | None = None,
    ) -> list[Outcome]:
        """Compare each wanted definition with the platform's; create the absent, replace on request. A dry
        run still checks what it would create, when it can without storing (`check`). `fixed` says why
        --replace cannot change a conflicting one (None: it can)."""
        key = KEYS[kind]
        there = {entry[key]: entry for entry in present}
        outcomes = []
        for entry in wanted:
            name = entry[key]
            current = there.get(name)
            try:
                if current is None:
                    if self.dry_run and check is not None:
                        await check(entry)
                    detail = "" if self.dry_run else await create(entry)
                    outcomes.append(
                        Outcome(kind, name, CREATED, detail or ("would be created" if self.dry_run else ""))
                    )
                    continue
                fields = differences(entry, current)
                why = fixed(entry, current, fields) if fields and fixed is not None else None
                if not fields:
                    outcomes.append(Outcome(kind, name, UNCHANGED))
                elif why:
                    outcomes.append(Outcome(kind, name, CONFLICTING, why))
                elif self.replace and replace is not None:
                    outcomes.append(await replace(entry, current, fields))
                else:
                    hint = "; --replace changes it" if replace is not None else ""
                    outcomes.append(Outcome(kind, name, CONFLICTING, f"differs in {', '.join(fields)}{hint}"))
            except grpc.aio.AioRpcError as exc:
                outcomes.append(Outcome(kind, name, FAILED, _refusal(exc)))
            except _Refused as refused:
                outcomes.append(Outcome(kind, name, FAILED, str(refused)))
            except (TypeError, ValueError) as exc:  # a value check() let through: reported, the rest goes on
                outcomes.append(Outcome(kind, name, FAILED, _unsendable(exc)))
        return outcomes

    # --- computed traits -----------------------------------------------------------------------------

    async def computed_traits(self, wanted, present) -> list[Outcome]:
        from cdp.profile.v1 import profile_pb2

        def parsed(entry) -> profile_pb2.ComputedTraitDefinition:
            try:
                return json_format.ParseDict(entry, profile_pb2.ComputedTraitDefinition())
            except json_format.ParseError as exc:
                raise _Refused(f"not a computed-trait definition: {exc}") from None

        async def check(entry) -> None:
            parsed(entry)

        async def define(entry) -> str:
            definition = parsed(entry)
            await self.call(
                "profile", "DefineComputedTrait", profile_pb2.DefineComputedTraitRequest(definition=definition)
            )
            return "backfilling from the retained timelines"

        async def replace(entry, current, fields) -> Outcome:
            if self.dry_run:
                parsed(entry)
                return Outcome("computed_traits", entry["name"], REPLACED, f"would change {', '.join(fields)}")
            await define(entry)
            return Outcome("computed_traits", entry["name"], REPLACED, f"{', '.join(fields)} changed; backfilling")

        # A model deployed here reads a trait of that name: scoring defines it again at every start, so a
        # definition from the document would not last (and would change what the model reads meanwhile).
        owned = [e["name"] for e in wanted if e["name"] in self.services.model_traits]
        why = (
            "a model deployed here reads computed.{} and scoring defines it at every start: rename it in the "
            "document (and what reads it), or leave the name to the model"
        )
        outcomes = [Outcome("computed_traits", name, CONFLICTING, why.format(name)) for name in owned]
        rest = [e for e in wanted if e["name"] not in self.services.model_traits]
        return outcomes + await self.each("computed_traits", rest, present, define, replace, check)

    # --- segments --------------------------------------------------------------------------------------

    async def segments(self, wanted, present) -> list[Outcome]:
        from cdp.segmentation.v1 import segmentation_pb2 as pb

        building: list[str] = []

        async def check(entry) -> None:
            self._check_segment(entry)

        async def create(entry) -> str:
            self._check_segment(entry)
            reply = await self.call(
                "segmentation",
                "CreateSegment",
                pb.CreateSegmentRequest(
                    id=entry["id"],
                    name=entry.get("name", ""),
                    description=entry.get("description", ""),
                    definition=pb.Definition(text=entry["definition"]),
                ),
            )
            building.append(entry["id"])
            return _warnings(reply.warnings)

        async def replace(entry, current, fields) -> Outcome:
            if "definition" in fields:
                self._check_segment(entry)
            if not self.dry_run:
                request = pb.UpdateSegmentRequest(
                    id=entry["id"], name=entry.get("name", ""), description=entry.get("description", "")
                )
                if "definition" in fields:
                    request.definition.text = entry["definition"]
                reply = await self.call("segmentation", "UpdateSegment", request)
                building.append(entry["id"])
                moved = f"{reply.entered} entered, {reply.exited} exited"
                detail = f"{', '.join(fields)} changed; {moved}"
                if reply.segment.warnings:
                    detail += "; " + _warnings(reply.segment.warnings)
                return Outcome("segments", entry["id"], REPLACED, detail)
            return Outcome("segments", entry["id"], REPLACED, f"would change {', '.join(fields)}")

        outcomes = await self.each("segments", wanted, present, create, replace, check)
        failed = await self._wait_built(building)
        return [
            Outcome(o.kind, o.name, FAILED, f"its build failed: {failed[o.name]}") if o.name in failed else o
            for o in outcomes
        ]

    def _check_segment(self, entry: dict[str, Any]) -> None:
        """What segmentation would refuse, checked here without asking it: the text parses, and the computed
        traits and segments it reads are on the platform or in the document (created before it)."""
        from cdp_kit.errors import InvalidArgument
        from cdp_kit.profile_fields import COMPUTED, split_key
        from cdp_lang import parse
        from cdp_lang.compiler import compile_segment

        try:
            compiled = compile_segment(parse(entry["definition"], "definition"))
        except InvalidArgument as exc:
            raise _Refused(f"{exc}; nothing was stored") from None
        own = {t["name"] for t in compiled.computed_traits}
        read = sorted(split_key(key)[1] for key in compiled.fields if split_key(key)[0] == COMPUTED)
        problems = [
            f"reads computed.{name}, which is neither on the platform nor in the document's computed_traits"
            for name in read
            if name not in own and name not in self.traits
        ]
        problems += [
            f'in_segment("{other}"): no segment {other} on the platform or in the document'
            for other in sorted(compiled.segments - self.segment_ids - {entry["id"]})
        ]
        if problems:
            raise _Refused(f"definition: {'; '.join(problems)}; nothing was stored")

    async def _wait_built(self, ids: list[str]) -> dict[str, str]:
        """Wait for the whole-population builds; the segments whose build failed, with the error."""
        from cdp.segmentation.v1 import segmentation_pb2 as pb

        failed, waiting = {}, list(ids)
        if waiting:
            self.progress(
                f"segments: waiting for {len(waiting)} whole-population build{'s' if len(waiting) > 1 else ''} …"
            )
        while waiting:
            still = []
            for segment_id in waiting:
                segment = await self.call("segmentation", "GetSegment", pb.GetSegmentRequest(id=segment_id))
                if segment.state == pb.SEGMENT_STATE_BUILDING:
                    still.append(segment_id)
                elif segment.state == pb.SEGMENT_STATE_FAILED:
                    failed[segment_id] = segment.error
            waiting = still
            if waiting:
                await asyncio.sleep(0.25)
        return failed

    # --- models ----------------------------------------------------------------------------------------

    async def models(self, wanted, present) -> list[Outcome]:
        there = {m["name"]: m for m in present}
        outcomes = []
        for model in wanted:
            try:
                outcomes.append(await self._model(model, there.get(model["name"])))
            except grpc.aio.AioRpcError as exc:
                outcomes.append(Outcome("models", model["name"], FAILED, _refusal(exc)))
            except (TypeError, ValueError) as exc:
                outcomes.append(Outcome("models", model["name"], FAILED, _unsendable(exc)))
        return outcomes

    async def _model(self, model: dict[str, Any], current: dict[str, Any] | None) -> Outcome:
        from cdp.scoring.v1 import scoring_pb2

        name = model["name"]
        if current is None:
            versions = ", ".join(f"{v['version']} (sha256 {v['sha256'][:12]}…)" for v in model["versions"])
            return Outcome(
                "models", name, MANUAL, f"not deployed here: deploy its ONNX files ({versions}), then import again"
            )
        if not differences(model, current):
            return Outcome("models", name, UNCHANGED)
        held = {v["version"]: v for v in current["versions"]}
        notes, conflicts = [], []
        for version in model["versions"]:
            mine = held.get(version["version"])
            if mine is None:
                notes.append(
                    f"version {version['version']} is not deployed here: deploy its file (sha256 {version['sha256'][:12]}…)"
                )
            elif mine["sha256"] != version["sha256"]:
                conflicts.append(f"versions[{version['version']}].sha256")
        live = model.get("live_version", "")
        promote = (
            bool(live)
            and live != current.get("live_version")
            and held.get(live, {}).get("sha256")
            == next((v["sha256"] for v in model["versions"] if v["version"] == live), None)
        )
        if promote and not self.replace:
            conflicts.append(f"live_version (here {current.get('live_version') or 'none'}; --replace promotes {live})")
        for version in model["versions"]:
            mine = held.get(version["version"])
            same_file = mine is not None and mine["sha256"] == version["sha256"]
            if same_file and version["role"] not in ("live", "inactive") and mine["role"] != version["role"]:
                notes.append(
                    f"version {version['version']} is {mine['role']} here, {version['role']} in the document: "
                    "scoring has no RPC to give a deployed version that role"
                )
        if conflicts:
            return Outcome("models", name, CONFLICTING, "differs in " + "; ".join(conflicts + notes))
        if promote:
            if not self.dry_run:
                await self.call("scoring", "Promote", scoring_pb2.PromoteRequest(name=name, version=live))
            detail = f"{'would promote' if self.dry_run else 'promoted'} {live} to live"
            return Outcome("models", name, REPLACED, "; ".join([detail, *notes]))
        return Outcome("models", name, MANUAL if notes else UNCHANGED, "; ".join(notes))

    # --- journeys ------------------------------------------------------------------------------------

    async def journeys(self, wanted, present) -> list[Outcome]:
        async def check(entry) -> None:
            await self._validate(entry["id"], [*entry["versions"], *([entry["draft"]] if entry.get("draft") else [])])

        # A document without a draft says nothing about the platform's (an older export, one taken before the
        # edit): it never discards it. Compared without it, and named in the outcome (`_name_draft`).
        asked = {entry["id"]: entry for entry in wanted}
        there = {entry["id"]: entry for entry in present}
        kept = {i for i, j in there.items() if j.get("draft") is not None and i in asked and not asked[i].get("draft")}
        compared = [{**j, "draft": None} if j["id"] in kept else j for j in present]
        outcomes = await self.each(
            "journeys", wanted, compared, self._create_journey, self._replace_journey, check, self._unreplaceable
        )
        return [self._name_draft(o, asked[o.name], there.get(o.name)) for o in outcomes]

    def _name_draft(self, outcome: Outcome, entry: dict[str, Any], current: dict[str, Any] | None) -> Outcome:
        """The outcome naming a draft the document and the platform do not both have (both ways)."""
        if current is None or outcome.status == FAILED:
            return outcome
        mine, theirs = entry.get("draft"), current.get("draft")
        number = theirs.get("version") if theirs is not None else None
        if isinstance(number, int) and outcome.status == REPLACED and len(entry["versions"]) >= number:
            replaced = "would be replaced" if self.dry_run else "was replaced"
            outcome.detail += f"; the draft v{number} here {replaced} by the document's published v{number}"
            return outcome
        if mine is not None and theirs is None and outcome.status == CONFLICTING:
            outcome.detail = f"draft v{mine['version']} in the document, not on the platform; {outcome.detail}"
        if mine is not None or theirs is None:
            return outcome
        note = (
            f"draft v{number} on the platform, not in the document: import leaves it (a document without a "
            f"draft never discards one); `cdpctl journey discard-draft {entry['id']}` discards it"
        )
        if outcome.status == UNCHANGED:
            return Outcome(outcome.kind, outcome.name, CONFLICTING, note)
        outcome.detail = f"{outcome.detail}; {note}" if outcome.detail else note
        return outcome

    async def _journey(self, rpc: str, journey_id: str, definition: dict[str, Any] | None = None) -> str:
        """One lifecycle call; the journey's state after it. Each call is made on the journey as this import
        read it (its revision), then as this import's previous call left it: an edit someone else saved in
        between stops the import of this journey, never overwritten."""
        from cdp.orchestration.v1 import orchestration_pb2 as pb

        expected = self.services.revisions.get(journey_id, 0)  # 0: not checked (created by this import)
        text = pb.JourneyDefinition(json=json.dumps(definition)) if definition is not None else None
        request = {
            "CreateJourney": lambda: pb.CreateJourneyRequest(definition=text),
            "UpdateJourney": lambda: pb.UpdateJourneyRequest(
                journey_id=journey_id, definition=text, expected_revision=expected
            ),
            "PublishJourney": lambda: pb.PublishJourneyRequest(journey_id=journey_id, expected_revision=expected),
        }.get(rpc, lambda: pb.JourneyRef(journey_id=journey_id))()
        step = f"{rpc} of v{definition.get('version')}" if definition is not None else rpc
        try:
            reply = await self.call("orchestration", rpc, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED and expected:
                raise _Refused(_changed_meanwhile(step, journey_id, expected)) from None
            raise _Refused(
                f"{step} refused: {_refusal(exc)}; what was stored before stays (cdpctl journey get {journey_id}): "
                "fix it and import again with --replace"
            ) from None
        # Pause, resume and archive take no revision: one that was not the only change since says so after.
        if expected and reply.revision and rpc not in CHECKED_BY_SERVICE and reply.revision != expected + 1:
            raise _Refused(_changed_meanwhile(step, journey_id, expected, done=True))
        if reply.revision:
            self.services.revisions[journey_id] = reply.revision
        return pb.JourneyState.Name(reply.state).removeprefix("JOURNEY_STATE_").lower()

    async def _publish(self, journey_id: str, state: str, versions: list[dict[str, Any]], *, first: bool) -> str:
        """Publish `versions` in order (the first through CreateJourney when `first`); a journey taking
        entries is paused while more than its last version is published."""
        for index, version in enumerate(versions):
            state = await self._journey(
                "CreateJourney" if first and index == 0 else "UpdateJourney", journey_id, version
            )
            state = await self._journey("PublishJourney", journey_id)
            if state == "active" and index < len(versions) - 1:
                state = await self._journey("PauseJourney", journey_id)
        return state

    async def _settle(self, journey_id: str, state: str, wanted: str) -> None:
        if state == wanted:
            return
        if wanted == "active" and state == "paused":
            await self._journey("ResumeJourney", journey_id)
        elif wanted == "paused" and state == "active":
            await self._journey("PauseJourney", journey_id)
        elif wanted == "archived":
            await self._journey("ArchiveJourney", journey_id)

    async def _validate(self, journey_id: str, definitions: list[dict[str, Any]]) -> None:
        """Check every version before storing any: a refused one leaves nothing half-made."""
        from cdp.orchestration.v1 import orchestration_pb2 as pb

        for definition in definitions:
            request = pb.ValidateJourneyRequest(definition=pb.JourneyDefinition(json=json.dumps(definition)))
            reply = await self.call("orchestration", "ValidateJourney", request)
            # Orchestration checks segments against segmentation's: one the document creates is not there yet
            # when every definition is checked first (and never in a dry run), but is before any journey is.
            coming = {f"{segment_id!r} is not a known segment" for segment_id in self.segment_ids}
            problems = [p for p in reply.problems if p.message not in coming]
            if problems:
                problem = problems[0]
                where = ".".join(p for p in ("nodes" if problem.node else "", problem.node, problem.field) if p)
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise _Refused(f"v{definition.get('version')}: {where}: {problem.message}{more}; nothing was stored")

    async def _create_journey(self, entry: dict[str, Any]) -> str:
        journey_id, versions, draft = entry["id"], entry["versions"], entry.get("draft")
        await self._validate(journey_id, [*versions, *([draft] if draft is not None else [])])
        # Paused from its first version on, unless active is where it ends with one version: nobody
        # enters a version that is not the journey's last.
        state = "draft"
        if versions:
            state = await self._publish(journey_id, "draft", versions[:1], first=True)
            if state == "active" and (len(versions) > 1 or entry["state"] != "active"):
                state = await self._journey("PauseJourney", journey_id)
            state = await self._publish(journey_id, state, versions[1:], first=False)
        if draft is not None:
            state = await self._journey("UpdateJourney" if versions else "CreateJourney", journey_id, draft)
        await self._settle(journey_id, state, entry["state"])
        return f"{len(versions)} published version{'' if len(versions) == 1 else 's'}" + (", a draft" if draft else "")

    @staticmethod
    def _unreplaceable(entry: dict[str, Any], current: dict[str, Any], fields: list[str]) -> str | None:
        """Why --replace cannot make the platform's journey the document's (None: it can)."""
        wanted, held = entry["versions"], current["versions"]
        changed = [n for n, (a, b) in enumerate(zip(wanted, held, strict=False), start=1) if differences(a, b)]
        if changed or len(held) > len(wanted):
            which = f"version {changed[0]}" if changed else f"versions after {len(wanted)}"
            return (
                f"differs in {', '.join(fields)}: {which} differs here, and published versions never change, "
                "--replace neither (archive it, or import it under another id)"
            )
        if current["state"] == "archived":
            return f"archived here, which is final (--replace cannot change it); differs in {', '.join(fields)}"
        return None

    async def _replace_journey(self, entry: dict[str, Any], current: dict[str, Any], fields: list[str]) -> Outcome:
        journey_id, wanted, held = entry["id"], entry["versions"], current["versions"]
        if why := self._unreplaceable(entry, current, fields):
            return Outcome("journeys", journey_id, CONFLICTING, why)
        new = wanted[len(held) :]
        draft = entry.get("draft")
        steps = [f"publish v{v['version']}" for v in new]
        if draft is not None and differences(draft, current.get("draft")):
            steps.append(f"save draft v{draft['version']}")
        if entry["state"] != current["state"]:
            steps.append(f"make it {entry['state']}")
        await self._validate(journey_id, [*new, *([draft] if draft is not None else [])])
        if self.dry_run:
            return Outcome("journeys", journey_id, REPLACED, "would " + ", ".join(steps))
        state = current["state"]
        if new and state == "active" and len(new) > 1:
            state = await self._journey("PauseJourney", journey_id)
        state = await self._publish(journey_id, state, new, first=False)
        if draft is not None and differences(draft, current.get("draft")):
            state = await self._journey("UpdateJourney", journey_id, draft)
        await self._settle(journey_id, state, entry["state"])
        done = (
            ", ".join(steps).replace("publish ", "published ").replace("save ", "saved ").replace("make it", "made it")
        )
        return Outcome("journeys", journey_id, REPLACED, done)

    # --- identity and CRM: read from files at start, nothing to write them with ------------------------

    async def identity(self, wanted: dict[str, Any], present: dict[str, Any]) -> list[Outcome]:
        model = wanted.get("matching_model")
        if model is None:
            return []
        if not differences(model, present.get("matching_model")):
            return [Outcome("identity", "matching_model", UNCHANGED)]
        return [
            Outcome(
                "identity",
                "matching_model",
                MANUAL,
                "identity reads it from CDP_IDENTITY_MATCHING_FILE at start (no RPC sets it): save the document's "
                "identity.matching_model.model to a file, point CDP_IDENTITY_MATCHING_FILE at it and restart identity",
            )
        ]

    async def crm(self, wanted, present) -> list[Outcome]:
        async def absent(entry) -> str:
            raise _Manual(
                "the connector reads its connections from CDP_CRM_CONNECTIONS_FILE at start (no RPC adds one): "
                "add it there, with its credentials' variables set, and restart crm"
            )

        outcomes = []
        for outcome in await self._each_manual("crm", wanted, present, absent):
            if outcome.status == CONFLICTING:
                outcome.detail += "; change it in CDP_CRM_CONNECTIONS_FILE (no RPC changes a connection)"
            outcomes.append(outcome)
        return outcomes

    async def _each_manual(self, kind, wanted, present, absent) -> list[Outcome]:
        there = {entry[KEYS[kind]]: entry for entry in present}
        outcomes = []
        for entry in wanted:
            name = entry[KEYS[kind]]
            if name not in there:
                try:
                    await absent(entry)
                except _Manual as manual:
                    outcomes.append(Outcome(kind, name, MANUAL, str(manual)))
                continue
            fields = differences(entry, there[name])
            outcomes.append(
                Outcome(kind, name, CONFLICTING, f"differs in {', '.join(fields)}")
                if fields
                else Outcome(kind, name, UNCHANGED)
            )
        return outcomes


class _Manual(Exception):
    pass


class _Refused(Exception):
    """A definition the service's own check refused before anything was stored; the message names it."""


CHECKED_BY_SERVICE = ("CreateJourney", "UpdateJourney", "PublishJourney")  # checked by the service itself


def _changed_meanwhile(step: str, journey_id: str, revision: int, done: bool = False) -> str:
    made = f"{step} was made, and the import of this journey stopped" if done else f"{step} was not made"
    return (
        f"changed on the platform since this import read it (at revision {revision}): {made}; see what changed "
        f"(cdpctl journey get {journey_id}) and import again"
    )


def _unsendable(exc: Exception) -> str:
    return f"cdpctl could not send it ({type(exc).__name__}: {exc}): correct its fields and import again"


def _refusal(exc: grpc.aio.AioRpcError) -> str:
    from cdpctl.common import field_violations

    fields = [f"{field}: {why}" for field, why in field_violations(exc) if f"{field}: {why}" != exc.details()]
    return "; ".join([f"{exc.code().name}: {exc.details()}", *fields])
