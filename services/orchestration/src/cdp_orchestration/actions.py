"""The arbiter's rulings, carried out: decisions recorded, approvals kept, sent actions published.

`record_ruling` takes one `arbiter.Ruling` for a person and, for each decision in it:

- writes the decision to `orchestration_decisions` under the person (`state.decision_key`), with its
  reason; a send whose template cannot be rendered for this person is recorded as "failed" with the
  field it lacks, never sent with a blank;
- keeps the approval list (`orchestration_approvals`): a record when an action starts waiting, closed by
  the approver's answer or the expiry;
- publishes a sent action as `actions.<channel>.<p>` (message id = action id, so a batch applied again
  publishes a JetStream duplicate), rendered from the action's own journey version, with the address
  read from the profile (`ADDRESS_FIELDS`) and the identifier outcome events go back in under; a `crm`
  action also carries the person's top signals (`signals.top_signals`), the context of its task or case
  (a node naming none: the person's top scores; where orchestration does not keep every score, those it
  holds, marked `signals_from_profile`: the CRM connector reads the person's from the profile service when
  it takes the task, so no read holds the batch's other actions back);
- tells the instance the outcome of its action (`ActionOutcome`), which may step it on.

Outcomes of sends made before the person had an identifier: an action carries the identifier outcome
events go back in under (the userId, else an anonymous id, `wire.IDENTITY_KEYS`); a person enrolled
through the API before any event of theirs has neither, and their dispatcher records the outcome without
posting it ("unattributed": under the person id, identity would make a new visitor of it). When such a
person's first identifier arrives, `attribute_sends` publishes, for each send still in their arbiter
history (the last week and a day, `arbiter.Sent`), an attribution message on the action's own subject:
an `ActionMessage` with the action id and the identifier only, header `Cdp-Attribution`, message id
`attribute:<action id>`. Its dispatcher sends nothing for it: it posts the recorded outcome under that
identifier (`dispatch.py`). Not for `crm` actions: the CRM connector takes every `actions.crm` message as
a task, and their outcomes are not orchestration's to post. Older unattributed outcomes stay recorded
only.

Logs name action ids and fields, never the values rendered, the signals or the address; decisions record
neither.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import OutMessage, subjects
from cdp_kit.timestamps import from_seconds
from cdp_orchestration.channels.wire import ANONYMOUS_ID, USER_ID
from cdp_orchestration.domain.arbiter import PROFILE_UNAVAILABLE, Decision, Kind, ProposedAction, Ruling
from cdp_orchestration.domain.instance import ActionOutcome
from cdp_orchestration.domain.journey import Action
from cdp_orchestration.domain.signals import top_signals
from cdp_orchestration.domain.templates import MissingField, TemplateFailed, TemplateTooCostly
from cdp_orchestration.state import APPROVALS, DECISIONS, Batch, Partition, Person, decision_key

if TYPE_CHECKING:
    from cdp_orchestration.apply import Applier

log = logging.getLogger("cdp.orchestration")

# Where an action's address is read from, per channel (the `address` map of ActionMessage).
ADDRESS_FIELDS = {
    "email": ("email", "traits.email"),
    "sms": ("phone", "traits.phone"),
    "push": ("push_token", "traits.push_token"),
    "webpush": ("webpush_subscription", "traits.webpush_subscription"),
    "webhook": ("webhook_url", "traits.webhook_url"),
}


# Channels whose address field may be absent: the webhook channel has a default URL of its own.
OPTIONAL_ADDRESS = frozenset({"webhook"})

ATTRIBUTION_HEADER = "Cdp-Attribution"  # an attribution message: post this action's outcome, send nothing
UNATTRIBUTED_CHANNELS = frozenset({"crm"})  # channels orchestration posts no outcome for


def named(person: Person) -> bool:
    """Whether the person has an identifier outcome events can go in under."""
    return bool(person.ids.get(USER_ID) or person.ids.get(ANONYMOUS_ID))


def attribute_sends(batch: Batch, person: Person) -> None:
    """The person has an identifier for the first time: an attribution message for each of their recent
    sends (see the module docstring)."""
    if person.state is None:
        return
    for sent in person.state.sent:
        # An exempt (transactional) send is kept without its channel, so that no cap counts it: there is
        # no actions.<channel> subject to attribute it on, and a message to `actions..<p>` no stream takes
        # stalled the partition for good. Its outcomes stay unattributed.
        if not sent.channel or sent.channel in UNATTRIBUTED_CHANNELS:
            continue
        message = pb.ActionMessage(action_id=sent.action_id, person_id=person.person_id, channel=sent.channel)
        _identify(message, person)
        batch.messages.append(
            OutMessage(
                subject=subjects.actions(sent.channel, batch.partition),
                payload=message.SerializeToString(),
                msg_id=f"attribute:{sent.action_id}",
                headers={ATTRIBUTION_HEADER: "1"},
            )
        )


def _identify(message: pb.ActionMessage, person: Person) -> None:
    """Who the person is to identity, for the outcome events (`wire.IDENTITY_KEYS`): the userId when one is
    known, else an anonymous id; neither for a person no event has named yet."""
    if person.ids.get(USER_ID):
        message.address[USER_ID] = person.ids[USER_ID]
    elif person.ids.get(ANONYMOUS_ID):
        message.address[ANONYMOUS_ID] = person.ids[ANONYMOUS_ID]


async def record_ruling(
    applier: Applier,
    hot: Partition,
    batch: Batch,
    person: Person,
    ruling: Ruling,
    now: float,
    *,
    answer: tuple[str, str, str] | None = None,
    proposed: ProposedAction | None = None,
) -> None:
    """Record the ruling's decisions, publish what was sent, and tell each instance about its action.
    `answer`: (action id, decided by, note) of an approver's call; `proposed`: the action just proposed."""
    # Each action is rendered from its own journey version (an instance migrated meanwhile keeps it).
    held = (*person.state.deferred, *person.state.awaiting) if person.state is not None else ()
    versions = {h.action.action_id: h.action.journey_version for h in held}
    if proposed is not None:
        versions[proposed.action_id] = proposed.journey_version
    if ruling.state is not person.state:
        person.state = ruling.state
        person.dirty = True
    for index, decision in enumerate(ruling.decisions):
        kind, reason = decision.kind.value, decision.reason
        if decision.kind is Kind.SENT:
            failure = await _send(applier, batch, person, decision, versions.get(decision.action_id))
            if failure is not None:
                kind, reason = "failed", failure
        doc = {
            "action_id": decision.action_id,
            "journey_id": decision.journey_id,
            "instance_id": decision.instance_id,
            "person_id": decision.person_id,
            "node_id": decision.node_id,
            "channel": decision.channel,
            "category": decision.category,
            "kind": kind,
            "reason": reason,
            "rule": decision.by or "",
            "until": decision.until,
            "at": decision.at,
        }
        batch.put(DECISIONS, decision_key(person.person_id, decision, index), doc)
        applier.m_decisions.add(1, {"kind": kind})
        if PROFILE_UNAVAILABLE in decision.reason:
            applier.m_held_expired.add(1, {"kind": kind})
        await _approval(applier, batch, person, decision, answer)
        instance = person.live.get(decision.instance_id)
        # An instance that ended in this batch (its pending action withdrawn) is no longer live.
        known = instance or person.changed.get(decision.instance_id)

        def counted(stats: dict, k: str = kind) -> None:
            stats["decisions"][k] = stats["decisions"].get(k, 0) + 1

        if known is not None:
            applier.count(hot, batch, decision.journey_id, known.version, counted)
        if instance is not None:
            await applier.step(hot, batch, person, instance, ActionOutcome(decision.action_id, decision.kind), now)


async def _approval(
    applier: Applier, batch: Batch, person: Person, decision: Decision, answer: tuple[str, str, str] | None
) -> None:
    """Keep the approval list: a record when an action starts waiting, closed by the answer or expiry."""
    if decision.kind is Kind.AWAITING_APPROVAL:
        held = next((h for h in person.state.awaiting if h.action.action_id == decision.action_id), None)  # type: ignore[union-attr]
        if held is None:
            return
        action = held.action
        batch.put(
            APPROVALS,
            action.action_id,
            {
                "action_id": action.action_id,
                "journey_id": action.journey_id,
                "instance_id": action.instance_id,
                "person_id": action.person_id,
                "channel": action.channel,
                "category": action.category,
                "value": action.value or 0.0,
                "state": "pending",
                "requested_at": decision.at,
                "expires_at": held.until,
                "decided_at": None,
                "decided_by": "",
                "note": "",
            },
        )
        return
    answered = answer is not None and answer[0] == decision.action_id
    state = {Kind.REJECTED: "rejected", Kind.EXPIRED: "expired"}.get(decision.kind)
    if state is None and answered:
        state = "approved"
    if state is None:
        return
    doc = batch.writes.get((APPROVALS, decision.action_id))
    if doc is None:
        stored = await applier.store.get(APPROVALS, decision.action_id)
        if stored is None:
            return  # it never waited for approval (a deferred action expiring, say)
        doc = stored.doc
    if doc["state"] != "pending":
        return
    decided_by, note = (answer[1], answer[2]) if answered and answer is not None else ("", "")
    batch.put(
        APPROVALS,
        decision.action_id,
        {**doc, "state": state, "decided_at": decision.at, "decided_by": decided_by, "note": note},
    )


async def _send(applier: Applier, batch: Batch, person: Person, decision: Decision, version: int | None) -> str | None:
    """Publish the sent action on actions.<channel>.<p>; the reason it could not be, or None."""
    instance = person.live.get(decision.instance_id)
    if version is None and instance is not None:
        version = instance.version
    journey = await applier.version(decision.journey_id, version) if version is not None else None
    node = journey.nodes.get(decision.node_id) if journey is not None else None
    if not isinstance(node, Action):
        invalid = applier.journeys.invalid.get((decision.journey_id, version)) if version is not None else None
        if invalid is not None:
            return (
                f"failed: journey {decision.journey_id} version {version} no longer validates ({invalid}); "
                "publish a fixed version"
            )
        return "failed: the action's journey version is not loaded"
    address = ADDRESS_FIELDS.get(decision.channel)
    to = person.fields.get(address[1]) if address is not None else None
    if address is not None and decision.channel not in OPTIONAL_ADDRESS and not (isinstance(to, str) and to):
        # The channel could only refuse it (invalid_address) while the decision said "sent".
        log.warning("action %s not sent: the person has no %s", decision.action_id, address[1])
        return f"failed: the person has no {address[1]}, the address {decision.channel} sends to"
    view = person.view()
    try:
        content = node.template.render(view, instance.entry if instance is not None else None)
    except MissingField as missing:
        log.warning(
            "action %s not sent: its template reads %s, which the person lacks", decision.action_id, missing.field
        )
        return f"failed: template part {missing.part!r} reads {missing.field}, which this person does not have"
    except (TemplateTooCostly, TemplateFailed) as refused:  # the message names the part, never a value
        log.warning("action %s not sent: %s", decision.action_id, refused)
        return f"failed: {refused}"
    message = pb.ActionMessage(
        action_id=decision.action_id,
        person_id=person.person_id,
        journey_id=decision.journey_id,
        journey_version=journey.version,  # type: ignore[union-attr]
        instance_id=decision.instance_id,
        node_id=decision.node_id,
        channel=decision.channel,
        category=decision.category,
        content=content,
        decided_at=from_seconds(decision.at),
    )
    if decision.channel == "crm":
        message.crm_kind = content.get("kind", "task")
        for name, value in top_signals(node, view):
            message.signals.add(name=name, value=value)
        if not node.signals and applier.scores_partial():
            # Its top scores, when not all of them are kept here: the CRM connector reads them from the
            # profile service when it takes the task. Read here, every action of the batch waited for them
            # (the batch is committed and published whole): at load most of segment -> action's p99.
            message.signals_from_profile = True
    if address is not None and isinstance(to, str) and to:
        message.address[address[0]] = to
    _identify(message, person)
    applier.m_actions.add(1, {"channel": decision.channel})
    batch.messages.append(
        OutMessage(
            subject=subjects.actions(decision.channel, batch.partition),
            payload=message.SerializeToString(),
            msg_id=decision.action_id,
        )
    )
    return None
