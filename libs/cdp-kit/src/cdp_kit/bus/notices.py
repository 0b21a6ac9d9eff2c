"""Every person the `privacy.deleted` notices in PRIVACY name: what a service applies again at start, so a
store file restored from before a deletion does not bring the person back.

PRIVACY keeps its notices without an age limit (`privacy_stream()`), so the stream is the record of who
was deleted. It is read message by message, by sequence, in windows of parallel gets (the way the
collector loads its suppression list), not through a consumer: a service needs no consumer of its own
for it, and reads it whole in about a second for 10,000 notices.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Iterable

from nats.js.errors import NotFoundError

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus.subjects import PRIVACY, PRIVACY_DELETED
from cdp_kit.storage import Delete, Put

log = logging.getLogger("cdp.privacy")

#: Messages of PRIVACY asked for at once (each a small get by sequence).
READ_WINDOW = 256

#: Request ids a log line of erasures names (the rest counted).
LOGGED_REQUESTS = 50


async def read_deletions(js) -> list[privacy_pb2.PrivacyDeleted]:
    """Every `privacy.deleted` notice PRIVACY holds, in stream order (one that is not a PrivacyDeleted is
    logged and skipped). Empty when there is no stream."""
    try:
        state = (await js.stream_info(PRIVACY)).state
    except NotFoundError:
        return []
    first, last = state.first_seq or 0, state.last_seq or 0
    notices: list[privacy_pb2.PrivacyDeleted] = []

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
                notices.append(privacy_pb2.PrivacyDeleted.FromString(data))
            except Exception:
                log.error("privacy.deleted message %d is not a PrivacyDeleted and was skipped", number)
        seq = window.stop
    return notices


def named_persons(notices: Iterable[privacy_pb2.PrivacyDeleted]) -> dict[str, str]:
    """Every person the notices name (the person and those merged into it), with the request id of the
    notice naming it last."""
    named: dict[str, str] = {}
    for notice in notices:
        for person in (notice.person_id, *notice.merged_person_ids):
            if person:
                named[person] = notice.request_id
    return named


async def read_notices(js) -> dict[str, str]:
    """Every person a `privacy.deleted` notice in PRIVACY names (the person and those merged into it),
    with the request id of the notice naming it last. Empty when there is no stream."""
    return named_persons(await read_deletions(js))


def by_partition(named: dict[str, str], partitions: int) -> dict[int, dict[str, str]]:
    """The persons notices name (person -> request id), by partition: a partitioned service erases each
    partition's where it takes that partition."""
    from cdp_kit.bus import partition_for

    out: dict[int, dict[str, str]] = {}
    for person, request_id in named.items():
        out.setdefault(partition_for(person, partitions), {})[person] = request_id
    return out


def requests_named(request_ids: Iterable[str]) -> tuple[str, list[str]]:
    """What an erasure's log line says of its requests: "r1, r2 and 3 more" (sorted, at most
    LOGGED_REQUESTS named), and the ids named (its `request_ids` field)."""
    ids = sorted(set(request_ids))
    shown = ids[:LOGGED_REQUESTS]
    more = f" and {len(ids) - len(shown)} more" if len(ids) > len(shown) else ""
    return ", ".join(shown) + more, shown


async def scrub_outbox(
    store, outbox: str, rewrite: Callable[[str, bytes], tuple[bytes | None, set[str]] | None], *, prefix: str = ""
) -> list[tuple[Put | Delete, set[str]]]:
    """An engine outbox's records (those under `prefix`) rewritten without what deleted persons' messages
    carry: a store file copied while its service ran may hold messages not yet published, with the
    persons' values, which the service would publish when it starts. `rewrite(subject, payload)` answers
    None for a message it leaves as it is, else the payload without the persons (None: the message goes)
    and the persons it took out. The other messages stay, under the same message ids. Each write comes with
    the persons taken out of its record."""
    out: list[tuple[Put | Delete, set[str]]] = []
    async for record in store.scan_all(outbox, prefix=prefix):
        kept, taken = [], set()
        for message in record.doc.get("messages", []):
            rewritten = rewrite(message["subject"], base64.b64decode(message["payload"]))
            if rewritten is not None:
                payload, persons = rewritten
                taken |= persons
                if payload is None:
                    continue
                message = {**message, "payload": base64.b64encode(payload).decode()}
            kept.append(message)
        if taken:
            op = Put(outbox, record.key, {**record.doc, "messages": kept}) if kept else Delete(outbox, record.key)
            out.append((op, taken))
    return out


async def write_partition_erasure(
    store,
    ops: list[Put | Delete],
    found: set[str],
    scrubbed: list[tuple[Put | Delete, set[str]]],
    named: dict[str, str],
    partition: int,
    log: logging.Logger,
) -> int:
    """A partition's erasure of restored deleted persons made durable: `ops` (their records) and the outbox
    rewrites `scrubbed`, written together, the files erased, and one WARNING naming the requests (never
    the persons); the number of persons erased (`found`, held in memory, and those only the outbox had)."""
    ops = [*ops, *(op for op, _ in scrubbed)]
    if not found and not scrubbed:
        return 0
    if ops:
        await store.bulk_write(ops)
        await store.erase()
    persons = found | {p for _, taken in scrubbed for p in taken}
    requests = {named[p] for p in persons}
    text, shown = requests_named(requests)
    log.warning(
        "erased %d persons of partition %d a restored store still held although privacy.deleted notices "
        "name them (requests %s); nothing published again",
        len(persons),
        partition,
        text,
        extra={"partition": partition, "erased": len(persons), "requests": len(requests), "request_ids": shown},
    )
    return len(persons)
