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

from cdp_kit.bus import streams as kit_streams
from cdp_kit.bus.streams import SOURCE_HEADER, ensure_created, source_of
from cdp_kit.streamtable import crm_input_stream as input_stream  # the provisioner's table: one definition

__all__ = ["SOURCE_HEADER", "actions_stream", "ensure_streams", "input_stream", "source_of"]

DAY = 86_400.0


def actions_stream(*, max_age: float = 7 * DAY) -> api.StreamConfig:
    """ACTIONS as orchestration creates it (whichever service starts first creates it)."""
    return kit_streams.actions_stream(max_age=max_age).config()


async def ensure_streams(js: JetStreamContext, *, retention: float = 7 * DAY) -> None:
    """Create ACTIONS and the input stream when missing. An existing stream is left as it is: its sources'
    start positions must not move."""
    await ensure_created(js, actions_stream(max_age=retention), input_stream(max_age=retention))
