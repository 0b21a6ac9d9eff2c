"""gRPC OrchestrationService: protobuf in, journeys / commands / store reads, protobuf out.

The service is one class, `OrchestrationApi`, joined from its parts, each a module of its own:

    api_journeys.py   a journey's life: validate, create, update (its draft), publish, pause, resume,
                      archive, get, list
    drafts.py         the draft's calls: GetJourney's `draft`, DiscardDraft
    api_instances.py  enrol, exit, instances, and the approval gate (list, approve, reject)
    api_reads.py      a journey's stats and a person's decision history
    api_inbox.py      the in-app inbox: list, mark read, subscribe
    api_base.py       what they share: a journey read, changed and shown; commands to a person's engine

Journeys are written by the API (validated by the domain, stored, announced to the other replicas).
Everything that changes a person - Enroll, ExitInstance, ApproveAction, RejectAction - is a command
published to the person's partition (`orchestration.in.<p>`) and applied by the engine that owns it, the
one writer of that person's instances and arbiter state; the call then waits (`answer_timeout`) for the
engine's answer in the store. Reads (instances, decisions, approvals, stats) come from the store. Errors
name the request field.
"""

from __future__ import annotations

from cdp_orchestration.api_inbox import InboxCalls
from cdp_orchestration.api_instances import InstanceCalls
from cdp_orchestration.api_journeys import JourneyCalls
from cdp_orchestration.api_reads import ReadCalls

# A person's instances, decisions and held actions are their data: a token that reads journeys (another
# service's, to see which journeys use a segment or trait) does not read them.
PEOPLE = "orchestration:people"

SCOPES = {
    "ValidateJourney": "orchestration:read",
    "CreateJourney": "orchestration:admin",
    "UpdateJourney": "orchestration:admin",
    "PublishJourney": "orchestration:admin",
    "PauseJourney": "orchestration:admin",
    "ResumeJourney": "orchestration:admin",
    "ArchiveJourney": "orchestration:admin",
    "DiscardDraft": "orchestration:admin",  # as saving a draft (drafts.py)
    "GetJourney": "orchestration:read",
    "ListJourneys": "orchestration:read",
    "Enroll": "orchestration:write",
    "ExitInstance": "orchestration:write",
    "GetInstance": PEOPLE,
    "ListInstances": PEOPLE,
    "ListApprovals": PEOPLE,
    "ApproveAction": "orchestration:approve",
    "RejectAction": "orchestration:approve",
    "GetJourneyStats": "orchestration:read",
    "ListDecisions": PEOPLE,
    "ListInbox": "orchestration:inbox",
    "MarkInboxRead": "orchestration:inbox",
    "SubscribeInbox": "orchestration:inbox",
}


class OrchestrationApi(JourneyCalls, InstanceCalls, ReadCalls, InboxCalls):
    """Every RPC of OrchestrationService (constructed with `api_base.ApiBase`'s arguments)."""
