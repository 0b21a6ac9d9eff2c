"""Consent asked again at send time: the arbiter checks it when it lets an action through, and a consent
withdrawn afterwards - while the action waits in ACTIONS, or between its attempts - must stop it too.

`SendConsent.refused(action)` answers as the arbiter does (`arbiter.consent_refused`), from the same
fields: orchestration's copy of the person's profile, kept from the profile's changes in their record
(`orchestration_persons`, `fields`; written with the batch that applied the change). One store read an
attempt: the person's record (and, for a person merged into another since, the survivor's). The action's
purpose is its journey node's (`Journeys.version`, in memory: versions are kept as long as instances run
on them); its category travels on the message, and the rules' exempt categories need no purpose granted.
A person without a record here (never seen by this store) is not refused: the arbiter granted the send
on fields it had, and nothing says they changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdp_kit.storage import Store
from cdp_orchestration.channels import Action
from cdp_orchestration.domain.arbiter import consent_refused
from cdp_orchestration.domain.journey import Action as ActionNode
from cdp_orchestration.domain.records import user_data_from
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.domain.view import PersonView
from cdp_orchestration.state import PERSONS

if TYPE_CHECKING:
    from cdp_orchestration.journeys import Journeys


class SendConsent:
    def __init__(self, store: Store, journeys: Journeys, rules: Rules) -> None:
        self.store = store
        self.journeys = journeys
        self.rules = rules

    def purpose(self, action: Action) -> str | None:
        """The consent purpose the action is sent under (its journey node's); None when the version is not
        known here."""
        attributes = action.attributes
        journey = self.journeys.version(
            str(attributes.get("journey_id", "")), int(attributes.get("journey_version", 0))
        )
        node = journey.nodes.get(str(attributes.get("node_id", ""))) if journey is not None else None
        return node.purpose if isinstance(node, ActionNode) else None

    async def refused(self, action: Action) -> tuple[str, str] | None:
        """("purpose", P) or ("channel", C) when the person's consent no longer allows the action; else None."""
        stored = await self.store.get(PERSONS, action.person_id)
        if stored is not None and stored.doc.get("merged_into"):
            stored = await self.store.get(PERSONS, stored.doc["merged_into"]) or stored
        if stored is None:
            return None
        view = PersonView(action.person_id, fields=user_data_from(stored.doc.get("fields")))
        exempt = action.attributes.get("category") in self.rules.exempt_categories
        return consent_refused(view, self.purpose(action), action.channel, exempt=exempt)
