"""The feedback loop from actions: what the platform did and how people answered, as training data.

Orchestration posts every outcome of an action it sent as a Segment track event through the collector
(`cdp_orchestration.channels.outcomes.EVENT_NAMES`: Message Sent, Delivered, Bounced, Failed, Opened,
Clicked, Converted; `properties.channel` is the channel it went by, `journey_id`, `node_id` and `action_id`
say which send), and the CRM connector posts what happens to CRM records (`cdp_crm.inbound.news.event_name`:
CRM Task Completed, CRM Case Closed, CRM Deal Won ...). Identity puts them on the person's profile like any
event, so labels read them (`labels.py`):

- next best channel (`learn.TRAINABLE["next_best_channel"]`) counts Message Opened / Clicked / Converted
  as answers beside the Segment response events, the channel read from `properties.channel`; orchestration
  names its channels "inapp" and "webpush" where the model's classes say "in_app" and "push", so the
  label maps them (`CHANNEL_ALIASES`). Delivered, Sent, Bounced and Failed are not answers.
- uplift data (`uplift_rows`): a journey's split with a control group is a randomised experiment (the
  variant is a hash of person, journey and node, `cdp_orchestration.domain.instance.split_point`). Each
  person who passed the split is a row: treated (any variant but the control) or not, when they were
  assigned, and the outcome: the journey's own goal (the instance's `converted_at`) or, with `outcome`,
  a qualifying event on their profile within a window after the assignment. A row whose outcome cannot
  be known yet (the goal window still open, or the outcome window past the last event the store holds)
  is left out and counted, so open windows never read as "no".

The export reads orchestration's store (journeys and instances, read only; the collection names and record
fields are orchestration's `journeys.JOURNEYS`, `state.INSTANCES` and `domain.records.instance_record`,
spelled here because training does not install the service) and, for profile outcomes or features, the
profile store.

    python -m cdp_training uplift-data --orchestration-store URL --journey ID [--node SPLIT]
        [--store URL --outcome '{"events": [{"name": "Order Completed"}], "window": "7d"}'] [--model F.onnx]
        [--out rows.csv]
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from cdp_kit.storage import Store
from cdp_profile.domain import ComputedTraits
from cdp_scoring.domain import FeatureAssembler, ModelSpec
from cdp_training.labels import GOAL_EVENT, LabelSpec
from cdp_training.pointintime import StoredProfile, fields_at_cutoff, observed_until
from cdp_training.simulator import Kind

# Outcome events orchestration posts (cdp_orchestration.channels.outcomes.EVENT_NAMES)
MESSAGE_OUTCOMES = (
    "Message Sent",
    "Message Delivered",
    "Message Bounced",
    "Message Failed",
    "Message Opened",
    "Message Clicked",
    "Message Converted",
)
# The ones in which the person answered
MESSAGE_ANSWERS = ("Message Opened", "Message Clicked", "Message Converted")
# What the CRM connector posts when a task or a case a person's record holds is closed (cdp_crm.inbound)
CRM_OUTCOMES = ("CRM Task Completed", "CRM Case Closed", "CRM Ticket Closed", "CRM Deal Won", "CRM Deal Lost")
# orchestration's channel names -> the next-best-channel classes they are
CHANNEL_ALIASES = {"inapp": "in_app", "webpush": "push"}
# What a person answers: the simulator's (and a Segment source's) response events, and orchestration's
# answers to the messages it sent; all carry the channel in `channel`.
ANSWERS: list[dict[str, Any]] = [
    *({"name": name} for name in Kind.RESPONSE_NAMES),
    *({"name": name} for name in MESSAGE_ANSWERS),
]

JOURNEYS = "orchestration_journeys"
INSTANCES = "orchestration_instances"


@dataclass(frozen=True, slots=True)
class Split:
    node: str
    control: str
    variants: tuple[str, ...]


@dataclass(slots=True)
class UpliftRow:
    person_id: str
    instance_id: str
    journey_id: str
    version: int
    node: str
    variant: str
    treatment: int  # 1: any variant but the control group
    assigned_at: float
    outcome: int
    features: list[float] = field(default_factory=list)


@dataclass(slots=True)
class UpliftData:
    journey_id: str
    split: Split
    outcome: str  # "goal" or the outcome label's text
    rows: list[UpliftRow]
    feature_names: list[str]
    skipped: dict[str, int]

    def summary(self) -> dict[str, Any]:
        arms: dict[str, dict[str, Any]] = {}
        for name, treated in (("treatment", 1), ("control", 0)):
            rows = [r for r in self.rows if r.treatment == treated]
            converted = sum(r.outcome for r in rows)
            arms[name] = {
                "rows": len(rows),
                "outcomes": converted,
                "rate": round(converted / len(rows), 4) if rows else None,
            }
        rates = [arms[a]["rate"] for a in ("treatment", "control")]
        uplift = None if None in rates else round(rates[0] - rates[1], 4)
        return {
            "journey": self.journey_id,
            "split": self.split.node,
            "control": self.split.control,
            "outcome": self.outcome,
            "arms": arms,
            "uplift": uplift,
            "skipped": dict(self.skipped),
        }

    def table(self) -> list[dict[str, Any]]:
        """One dict a row (CSV columns): ids, arm, assignment time, outcome, then the features."""
        out = []
        for r in self.rows:
            row = {
                "person_id": r.person_id,
                "instance_id": r.instance_id,
                "journey_id": r.journey_id,
                "version": r.version,
                "split": r.node,
                "variant": r.variant,
                "treatment": r.treatment,
                "assigned_at": r.assigned_at,
                "outcome": r.outcome,
            }
            row.update(zip(self.feature_names, r.features, strict=True))
            out.append(row)
        return out


def splits_with_control(journey: Mapping[str, Any]) -> dict[str, Split]:
    """Every split node with a control group, over all published versions of a stored journey."""
    found: dict[str, Split] = {}
    for document in (journey.get("versions") or {}).values():
        for node in document.get("nodes", []):
            if node.get("type") != "split":
                continue
            variants = node.get("variants", [])
            control = next((v["name"] for v in variants if v.get("control")), None)
            if control is not None:
                found[node["id"]] = Split(node["id"], control, tuple(v["name"] for v in variants))
    return found


def _assigned_at(doc: Mapping[str, Any], node: str, variant: str) -> float | None:
    for step_node, at, outcome in doc.get("steps", []):
        if step_node == node and outcome == f"variant:{variant}":
            return float(at)
    entered = doc.get("entered_at")
    return float(entered) if entered is not None else None


async def uplift_rows(
    orchestration: Store,
    journey_id: str,
    *,
    node: str | None = None,
    outcome: Mapping[str, Any] | None = None,
    profiles: Sequence[StoredProfile] | None = None,
    features: ModelSpec | None = None,
    now: float | None = None,
) -> UpliftData:
    """The persons who passed a split with a control group of `journey_id` (see the module docstring)."""
    stored = await orchestration.get(JOURNEYS, journey_id)
    if stored is None:
        raise NotFound(f"journey {journey_id!r} is not in the orchestration store", reason="journey_not_found")
    splits = splits_with_control(stored.doc)
    if node is None:
        if len(splits) != 1:
            raise InvalidArgument(
                "node",
                f"journey {journey_id!r} has {len(splits)} splits with a control group "
                f"({', '.join(sorted(splits)) or 'none'}): name one",
            )
        split = next(iter(splits.values()))
    elif node in splits:
        split = splits[node]
    else:
        raise InvalidArgument("node", f"{node!r} is not a split with a control group in journey {journey_id!r}")
    label = None
    if outcome is not None:
        if not isinstance(outcome, Mapping):
            raise InvalidArgument("outcome", "must be an object with 'events' and 'window'")
        label = LabelSpec.from_dict({"kind": GOAL_EVENT, **outcome}, "outcome")
    by_person = {p.person_id: p for p in profiles} if profiles is not None else None
    if (label is not None or features is not None) and by_person is None:
        raise InvalidArgument("store", "profile outcomes and features are read from the profile store: give it")
    end = observed_until(by_person.values()) if by_person is not None else math.inf
    now = time.time() if now is None else now
    defs = ComputedTraits.from_dicts(list(features.computed_traits)) if features is not None else None
    assembler = FeatureAssembler(features) if features is not None else None
    rows: list[UpliftRow] = []
    skipped = {"outcome_not_yet_known": 0, "no_profile": 0}
    async for record in orchestration.scan_all(INSTANCES):
        doc = record.doc
        if doc.get("journey_id") != journey_id:
            continue
        variant = (doc.get("variants") or {}).get(split.node)
        if variant is None:
            continue
        assigned = _assigned_at(doc, split.node, variant)
        if assigned is None:
            continue
        person = by_person.get(doc["person_id"]) if by_person is not None else None
        if by_person is not None and person is None and (label is not None or features is not None):
            skipped["no_profile"] += 1  # merged into another person, or deleted
            continue
        if label is None:
            converted = doc.get("converted_at") is not None
            goal_until = doc.get("goal_until")
            if not converted and goal_until is not None and goal_until > now:
                skipped["outcome_not_yet_known"] += 1
                continue
            result = int(converted)
        else:
            assert person is not None
            if assigned + label.horizon > end:
                skipped["outcome_not_yet_known"] += 1
                continue
            value = label.label((e for e in person.timeline if e.at > assigned), assigned)
            result = int(value is not None and value[0] > 0)
        values: list[float] = []
        if assembler is not None and defs is not None and person is not None:
            values = [float(v) for v in assembler.row(fields_at_cutoff(person, defs, assigned), assigned)]
        rows.append(
            UpliftRow(
                doc["person_id"],
                doc["id"],
                journey_id,
                int(doc["version"]),
                split.node,
                variant,
                0 if variant == split.control else 1,
                assigned,
                result,
                values,
            )
        )
    if not rows:
        raise FailedPrecondition(
            f"no person of journey {journey_id!r} has passed split {split.node!r} with a known outcome yet",
            reason="no_rows",
        )
    rows.sort(key=lambda r: (r.assigned_at, r.instance_id))
    names = [f.name for f in features.features] if features is not None else []
    text = "goal" if label is None else f"{label.to_dict()}"
    return UpliftData(journey_id, split, text, rows, names, skipped)


async def export(
    orchestration_url: str,
    journey_id: str,
    *,
    store_url: str | None = None,
    node: str | None = None,
    outcome: Mapping[str, Any] | None = None,
    features: ModelSpec | None = None,
) -> UpliftData:
    """`uplift_rows` over the stores at these URLs (read only)."""
    from cdp_kit.storage import open_store
    from cdp_training.pointintime import read_profiles

    profiles = None
    if store_url is not None:
        async with open_store(store_url) as store:
            profiles = await read_profiles(store)
    async with open_store(orchestration_url) as orchestration:
        return await uplift_rows(
            orchestration, journey_id, node=node, outcome=outcome, profiles=profiles, features=features
        )
