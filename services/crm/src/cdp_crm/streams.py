"""The CRM connector's input stream, and how a message in it says where it came from.

`CRM` holds `crm.in.<p>`: everything the connector follows about a person reaches partition p there, in
one order, so one engine (engine.py) applies it: profile changes, segment entries and exits and the
arbiter's `actions.crm.<p>` are *sourced* into it by the server (stream sources with subject transforms
`<prefix>.<p>` -> `crm.in.<p>`), as orchestration does for its own input. A sourced message keeps its
payload and `Nats-Msg-Id`, and carries `Nats-Stream-Source: <stream> <seq> <filter> <transform>
<original subject> ...`, which `kind_of` reads. Sourcing starts at the beginning of each source stream: a
new deployment first catches up on what they still hold (the person views fill in; records whose mapped
fields changed are written).
"""

from __future__ import annotations

from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from cdp_kit.bus import subjects

DAY = 86_400.0
SOURCE_HEADER = "Nats-Stream-Source"


def _transform(prefix: str) -> api.SubjectTransform:
    return api.SubjectTransform(src=f"{prefix}.*", dest=f"{subjects.CRM_IN_PREFIX}.{{{{wildcard(1)}}}}")


def input_stream(*, max_age: float = 7 * DAY, duplicate_window: float = 600.0) -> api.StreamConfig:
    def source(name: str, *prefixes: str) -> api.StreamSource:
        return api.StreamSource(name=name, subject_transforms=[_transform(p) for p in prefixes])

    crm_actions = f"{subjects.ACTIONS_PREFIX}.{subjects.CRM_CHANNEL}"
    return api.StreamConfig(
        name=subjects.CRM,
        description="the CRM connector's input per person partition: sourced profile changes, segment "
        "entries and exits, and CRM actions",
        subjects=list(subjects.STREAM_SUBJECTS[subjects.CRM]),
        retention=api.RetentionPolicy.LIMITS,
        max_age=max_age,
        duplicate_window=duplicate_window,
        storage=api.StorageType.FILE,
        allow_direct=True,
        sources=[
            source(subjects.PROFILES, subjects.PROFILES_CHANGED_PREFIX),
            source(subjects.SEGMENTS, subjects.SEGMENTS_ENTERED_PREFIX, subjects.SEGMENTS_EXITED_PREFIX),
            source(subjects.ACTIONS, crm_actions),
        ],
    )


def actions_stream(*, max_age: float = 7 * DAY) -> api.StreamConfig:
    """ACTIONS as orchestration creates it (whichever service starts first creates it)."""
    return api.StreamConfig(
        name=subjects.ACTIONS,
        description="actions the arbiter let through, per channel and person partition",
        subjects=list(subjects.STREAM_SUBJECTS[subjects.ACTIONS]),
        retention=api.RetentionPolicy.LIMITS,
        max_age=max_age,
        duplicate_window=600.0,
        storage=api.StorageType.FILE,
        allow_direct=True,
    )


async def ensure_streams(js: JetStreamContext, *, retention: float = 7 * DAY) -> None:
    """Create ACTIONS and the input stream when missing. An existing stream is left as it is: its sources'
    start positions must not move."""
    for config in (actions_stream(max_age=retention), input_stream(max_age=retention)):
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except Exception:
                await js.stream_info(config.name)  # another replica created it in between


def source_of(headers: dict[str, str]) -> tuple[str, str]:
    """(stream, original subject) of a sourced message; ("", "") for anything else."""
    source = headers.get(SOURCE_HEADER)
    if not source:
        return "", ""
    parts = source.split(" ")
    return parts[0], parts[4] if len(parts) > 4 else ""
