"""Every person the `privacy.deleted` notices in PRIVACY name: what a service applies again at start, so a
store file restored from before a deletion does not bring the person back.

PRIVACY keeps its notices without an age limit (`privacy_stream()`), so the stream is the record of who
was deleted. It is read message by message, by sequence, in windows of parallel gets (the way the
collector loads its suppression list), not through a consumer: a service needs no consumer of its own
for it, and reads it whole in about a second for 10,000 notices.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js.errors import NotFoundError

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus.subjects import PRIVACY, PRIVACY_DELETED

log = logging.getLogger("cdp.privacy")

#: Messages of PRIVACY asked for at once (each a small get by sequence).
READ_WINDOW = 256


async def read_notices(js) -> dict[str, str]:
    """Every person a `privacy.deleted` notice in PRIVACY names (the person and those merged into it),
    with the request id of the notice naming it last. Empty when there is no stream."""
    try:
        state = (await js.stream_info(PRIVACY)).state
    except NotFoundError:
        return {}
    first, last = state.first_seq or 0, state.last_seq or 0
    named: dict[str, str] = {}

    async def get(seq: int) -> bytes | None:
        try:
            message = await js.get_msg(PRIVACY, seq=seq)
        except NotFoundError:  # purged by an operator
            return None
        return message.data if message.subject == PRIVACY_DELETED else None

    seq = max(first, 1)
    while first and seq <= last:
        window = range(seq, min(last, seq + READ_WINDOW - 1) + 1)
        for number, data in zip(window, await asyncio.gather(*(get(s) for s in window)), strict=True):
            if data is None:
                continue
            try:
                notice = privacy_pb2.PrivacyDeleted.FromString(data)
            except Exception:
                log.error("privacy.deleted message %d is not a PrivacyDeleted and was skipped", number)
                continue
            for person in (notice.person_id, *notice.merged_person_ids):
                if person:
                    named[person] = notice.request_id
        seq = window.stop
    return named
