"""The engine's outbox: a batch's messages, written in the batch's commit, deleted once published.

One record per committed batch that produced messages, in `<service>_engine_outbox`, keyed
`<partition>:<last stream position, 20 digits>` so a partition's records scan in stream order. The
record is written in the same `bulk_write` as the batch's state and checkpoint, so a message exists
durably exactly when the change that produced it does; publishing it keeps its `Nats-Msg-Id`, so a
record published twice (a crash between publish and delete) is stored once by JetStream.
"""

from __future__ import annotations

import base64

from cdp_kit.bus import OutMessage
from cdp_kit.storage import Delete, Put, Record

POSITION_DIGITS = 20


def outbox_collection(service: str) -> str:
    return f"{service}_engine_outbox"


def partition_prefix(partition: int) -> str:
    return f"{partition}:"


def record_key(partition: int, position: int) -> str:
    return f"{partition}:{position:0{POSITION_DIGITS}d}"


def put_record(collection: str, partition: int, position: int, messages: list[OutMessage]) -> Put:
    return Put(
        collection,
        record_key(partition, position),
        {
            "messages": [
                {
                    "subject": m.subject,
                    "id": m.msg_id,
                    "payload": base64.b64encode(m.payload).decode(),
                    **({"headers": dict(m.headers)} if m.headers else {}),
                }
                for m in messages
            ]
        },
    )


def delete_record(collection: str, key: str) -> Delete:
    return Delete(collection, key)


def messages_of(record: Record) -> list[OutMessage]:
    return [
        OutMessage(
            subject=m["subject"], payload=base64.b64decode(m["payload"]), msg_id=m["id"], headers=m.get("headers")
        )
        for m in record.doc["messages"]
    ]
