"""Every JetStream stream cdp runs on, with the configuration it must have: one table for the provisioner
(`cdp_kit.provision`, which creates and updates them with an operator identity) and for the services
(which, as their own NATS users, may not create or update a stream and verify these instead).

Each entry names the stream, the service whose settings shape it (its retention variables, read from the
same environment the service gets: `cdpctl up` passes its own, the chart gives the provisioning Job the
values the components get) and how its configuration is built. The services build the same
configurations from the same functions (`cdp_kit.bus.streams`; the sourced input streams of
orchestration and the CRM connector here), and a test holds each service's own copy to this table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from nats.js import api

from cdp_kit.bus import streams as kit
from cdp_kit.bus import subjects
from cdp_kit.natsroles import ROLES

DAY = 86_400.0


@dataclass(frozen=True)
class Knob:
    """A service setting that shapes a stream: its environment variable and the service's default."""

    variable: str
    default: float

    def read(self, environ: Mapping[str, str]) -> float:
        raw = environ.get(self.variable, "")
        if raw.strip() == "":
            return self.default
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{self.variable}={raw!r} is invalid: must be a number") from None
        if value < 0:
            raise ValueError(f"{self.variable}={raw!r} is invalid: must be 0 or more")
        return value


# The services' settings (each service's settings.py declares the same variable with the same default;
# tests/test_streamtable.py holds them together).
EVENTS_RETENTION_DAYS = Knob("CDP_EVENTS_RETENTION_DAYS", 7.0)  # collector (EVENTS_RAW), identity (RESOLVED)
EVENTS_DEDUP_WINDOW = Knob("CDP_EVENTS_DEDUP_WINDOW", 600.0)  # collector
PROFILE_CHANGES_RETENTION_DAYS = Knob("CDP_PROFILE_CHANGES_RETENTION_DAYS", 7.0)
SCORES_RETENTION_DAYS = Knob("CDP_SCORING_SCORES_RETENTION_DAYS", 7.0)
SEGMENTS_RETENTION_DAYS = Knob("CDP_SEGMENTATION_RETENTION_DAYS", 7.0)
ORCHESTRATION_RETENTION_DAYS = Knob("CDP_ORCHESTRATION_RETENTION_DAYS", 7.0)  # ORCHESTRATION and ACTIONS
CRM_RETENTION_DAYS = Knob("CDP_CRM_RETENTION_DAYS", 7.0)
KNOBS = (
    EVENTS_RETENTION_DAYS,
    EVENTS_DEDUP_WINDOW,
    PROFILE_CHANGES_RETENTION_DAYS,
    SCORES_RETENTION_DAYS,
    SEGMENTS_RETENTION_DAYS,
    ORCHESTRATION_RETENTION_DAYS,
    CRM_RETENTION_DAYS,
)
# Where scoring keeps its models: `nats://<bucket>` is a JetStream object store the provisioner makes.
MODEL_STORE_VARIABLE = "CDP_SCORING_MODEL_STORE"


# --- the sourced input streams (orchestration's and the CRM connector's; see their streams.py) ----------


def orchestration_timers_stream(*, duplicate_window: float = 600.0) -> api.StreamConfig:
    """Orchestration's durable timers (message schedules): no age limit, rollups and per-message TTLs."""
    return api.StreamConfig(
        name=subjects.ORCHESTRATION_TIMERS,
        description="orchestration's durable timers (message schedules) and what they fire",
        subjects=list(subjects.STREAM_SUBJECTS[subjects.ORCHESTRATION_TIMERS]),
        retention=api.RetentionPolicy.LIMITS,
        max_age=0,
        duplicate_window=duplicate_window,
        storage=api.StorageType.FILE,
        allow_direct=True,
        allow_msg_schedules=True,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
    )


def orchestration_input_stream(*, max_age: float = 7 * DAY, duplicate_window: float = 600.0) -> api.StreamConfig:
    return kit.sourced_input_stream(
        subjects.ORCHESTRATION,
        into_prefix=subjects.ORCHESTRATION_IN_PREFIX,
        sources={
            subjects.EVENTS_RESOLVED: (subjects.EVENTS_RESOLVED_PREFIX,),
            subjects.SEGMENTS: (subjects.SEGMENTS_ENTERED_PREFIX, subjects.SEGMENTS_EXITED_PREFIX),
            subjects.PROFILES: (subjects.PROFILES_CHANGED_PREFIX,),
            subjects.ORCHESTRATION_TIMERS: (subjects.ORCHESTRATION_FIRED_PREFIX,),
        },
        description="orchestration's input per person partition: API commands, and sourced events, segment "
        "and profile changes and fired timers",
        max_age=max_age,
        duplicate_window=duplicate_window,
    )


def crm_input_stream(*, max_age: float = 7 * DAY, duplicate_window: float = 600.0) -> api.StreamConfig:
    return kit.sourced_input_stream(
        subjects.CRM,
        into_prefix=subjects.CRM_IN_PREFIX,
        sources={
            subjects.PROFILES: (subjects.PROFILES_CHANGED_PREFIX,),
            subjects.SEGMENTS: (subjects.SEGMENTS_ENTERED_PREFIX, subjects.SEGMENTS_EXITED_PREFIX),
            subjects.ACTIONS: (f"{subjects.ACTIONS_PREFIX}.{subjects.CRM_CHANNEL}",),
        },
        description="the CRM connector's input per person partition: sourced profile changes, segment "
        "entries and exits, and CRM actions",
        max_age=max_age,
        duplicate_window=duplicate_window,
    )


# --- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioned:
    """One stream: its name, the service whose settings shape it, and its configuration from an environment."""

    name: str
    owner: str
    build: Callable[[Mapping[str, str]], api.StreamConfig]


def _days(knob: Knob, environ: Mapping[str, str]) -> float:
    return knob.read(environ) * DAY


# In creation order: a sourced stream after the streams it sources.
STREAMS: tuple[Provisioned, ...] = (
    Provisioned(
        subjects.EVENTS_RAW,
        "collector",
        lambda e: kit.events_raw_stream(
            max_age=_days(EVENTS_RETENTION_DAYS, e), duplicate_window=EVENTS_DEDUP_WINDOW.read(e)
        ).config(),
    ),
    Provisioned(
        subjects.EVENTS_RESOLVED,
        "identity",
        lambda e: kit.events_resolved_stream(max_age=_days(EVENTS_RETENTION_DAYS, e)).config(),
    ),
    Provisioned(subjects.IDENTITY, "identity", lambda e: kit.identity_stream().config()),
    Provisioned(subjects.DLQ, "identity", lambda e: kit.dead_letter_stream().config()),
    Provisioned(
        subjects.PROFILES,
        "profile",
        lambda e: kit.profiles_stream(max_age=_days(PROFILE_CHANGES_RETENTION_DAYS, e)).config(),
    ),
    Provisioned(subjects.PRIVACY, "profile", lambda e: kit.privacy_stream().config()),
    Provisioned(
        subjects.SCORES, "scoring", lambda e: kit.scores_stream(max_age=_days(SCORES_RETENTION_DAYS, e)).config()
    ),
    Provisioned(
        subjects.SEGMENTS,
        "segmentation",
        lambda e: kit.segments_stream(max_age=_days(SEGMENTS_RETENTION_DAYS, e)).config(),
    ),
    Provisioned(subjects.ORCHESTRATION_TIMERS, "orchestration", lambda e: orchestration_timers_stream()),
    Provisioned(
        subjects.ACTIONS,
        "orchestration",
        lambda e: kit.actions_stream(max_age=_days(ORCHESTRATION_RETENTION_DAYS, e)).config(),
    ),
    Provisioned(
        subjects.ORCHESTRATION,
        "orchestration",
        lambda e: orchestration_input_stream(max_age=_days(ORCHESTRATION_RETENTION_DAYS, e)),
    ),
    Provisioned(subjects.CRM, "crm", lambda e: crm_input_stream(max_age=_days(CRM_RETENTION_DAYS, e))),
)
BY_NAME = {entry.name: entry for entry in STREAMS}


def needed(services: Iterable[str] | None = None) -> list[str]:
    """The streams `services` (every role when None) use, with the streams those source, in creation order."""
    wanted: set[str] = set()
    for name in ROLES if services is None else services:
        role = ROLES.get(name)
        if role is None:
            raise ValueError(f"{name!r} is not a cdp service (one of {', '.join(sorted(ROLES))})")
        wanted.update(role.configures, role.creates, role.consumes, role.reads)
    for entry in reversed(STREAMS):  # a sourced stream comes after its sources: walk back once
        if entry.name in wanted:
            wanted.update(s.name for s in entry.build({}).sources or [])
    return [entry.name for entry in STREAMS if entry.name in wanted]


def stream_config(name: str, environ: Mapping[str, str] | None = None) -> api.StreamConfig:
    """The configuration of stream `name` under `environ` (the process environment when None)."""
    return BY_NAME[name].build(os.environ if environ is None else environ)


def stream_configs(
    environ: Mapping[str, str] | None = None, services: Iterable[str] | None = None
) -> list[api.StreamConfig]:
    """Every stream `services` need (all of them when None), in creation order."""
    environ = os.environ if environ is None else environ
    return [BY_NAME[name].build(environ) for name in needed(services)]


def model_bucket(environ: Mapping[str, str] | None = None) -> str | None:
    """The object store scoring keeps its models in, when CDP_SCORING_MODEL_STORE names one (nats://<bucket>)."""
    value = (os.environ if environ is None else environ).get(MODEL_STORE_VARIABLE, "")
    if not value.startswith("nats://"):
        return None
    return value.removeprefix("nats://").strip("/") or None
