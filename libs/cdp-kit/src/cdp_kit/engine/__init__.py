"""The partitioned engine: one ordered, pipelined, effectively-once consumer per owned partition.

A stateful service (identity, profile, scoring, segmentation, ...) gives its domain logic (`Logic`):

    class Counters:
        def decode(self, delivery) -> Item:                      # per message; Reject(reason, field, problem)
        async def apply(self, partition, items) -> Effects:      # mutate hot state, say what to write/publish
        async def recover(self, partition) -> None:              # a commit failed: drop hot state

    engine = PartitionedEngine(Counters(), EngineSpec(service="toy", stream=..., subject_prefix=..., partitions=8),
                               bus=bus, store=store)
    runtime.spawn(engine.run(ownership), "engine")               # StaticOwnership over all partitions by default

and the kit does the rest, per owned partition p (`pipeline`):

1. fetch a batch from the durable ordered consumer `<service>-p<p>` of `<prefix>.<p>`;
2. skip positions at or below the last one applied (redeliveries after a crash or a failed commit:
   the checkpoint, not the service, decides); `decode` each other message, a `Reject` dead-letters
   that message alone (reason and field, never a value); a message carrying several items decodes to
   `Many(items)`, and a part of it rejected alone (`Delivery.reject_part`) is dead-lettered alone;
3. `apply` the items in stream order to hot state; it returns `Effects(writes, messages)`;
4. submit one `bulk_write`: the writes, an outbox record holding the messages, and the checkpoint
   `Put(<service>_checkpoints, <prefix>.<p>, {"stream_seq": last position})` - then fetch and apply
   the next batch while it is written (up to `EngineSpec.in_flight` batches between apply and
   acknowledgement);
5. in the same order: wait for the commit, publish the messages (each with its stable
   `Nats-Msg-Id`, retried until JetStream stores it), acknowledge the batch: one acknowledgement,
   of its last message (the partition consumers are `AckPolicy.ALL`, so it covers every message
   before it; batches are settled in stream order). The published outbox record is deleted by a
   later commit.

Invariants:
- writes land in the order the batches were applied (`WriteChain`); a write never lands after an
  earlier one failed. Hence the stored checkpoint is always the end of a contiguous prefix of the
  stream whose effects are all durable, and nothing past it is;
- a message is acknowledged only after its batch's effects and its outbox record are durable;
- a message exists in the outbox iff the change that produced it is durable, and it is published
  before anything the partition produced later;
- on start (and after recovery), the outbox is published before the first batch is fetched.

What a crash at each step costs (a new owner starts from the store and the stream):
- before the commit lands: nothing of the batch is durable or acknowledged; it is redelivered and
  applied on hot state rebuilt from the store;
- after the commit, before publishing: the outbox record is published by the next owner at start;
  the redelivered messages are at or below the checkpoint and skipped;
- after publishing, before the acknowledgement or the outbox delete: the same, and the messages
  published again are JetStream duplicates (same id) - stored once.

A failed commit (or an `apply` that raises) stops the partition's applier; the batches after it fail
with it (`EarlierWriteFailed`) and nothing past the failure is acknowledged. Once the in-flight batches
have settled, `recover(p)` is called, the checkpoint and outbox are read back from the store (a commit
reported failed may have landed), the consumer restarts at its acknowledgement floor, and the next
batch goes through `ConsumerRunner`'s isolation (split in halves, down to one message): a message that
fails alone is dead-lettered with its reason, a store that fails everything dead-letters nothing.

The consumers' own state lives in nats-server's memory (`ConsumerSpec.memory_state`): the checkpoint is
the position that counts, and a file consumer's state file, rewritten after every round of deliveries, was
about a fifth of the server's CPU. A nats-server restart loses them; each is created again right after
its checkpoint when the partition binds it. Not for held state (a logic that snapshots, below): its
start replays what its consumer was given after the snapshot, which only a consumer kept can say.

A checkpoint past what the stream holds for the partition (a stream restored from a copy older than the
store - a home's nats/ copied before its stores, separate volume snapshots - or deleted and created
again): the stream numbers new messages at or below the checkpoint, and step 2 would skip them as
applied. When a partition binds (and when its consumer is found gone) the engine compares the
checkpoint with the last message of the partition's subject; past it (and the stream's sequences went
back: its last sequence is below the checkpoint, or another subject's message is at it), it resumes
after the last message of the subject stored before the checkpoint was written (none if the stream was
created since), writes that as the checkpoint, logs ERROR once (partition, checkpoint, the stream's last
sequence for it) and counts `cdp.engine.checkpoint.rewinds`. What the stream held was applied (it is
older than the store), and the positions in between never reached this stream: nothing twice. A stream
created after the checkpoint was written that already numbers as far (events taken before the partition
bound: nats-server back on an empty store, its streams made again) resumes from its start, said and
counted the same way: nothing in it was applied. Purged or aged-out messages (first sequence past the
checkpoint) are normal: sequences go on.

Ownership: `run(ownership)` takes partitions from a `cdp_kit.ownership.Ownership` (static by default);
`start_partition(p)` / `stop_partition(p)` are its acquire / release hooks (stop = stop fetching, drain
the commits in flight, acknowledge, return).

State shared across partitions (identity's graph): give every partition one `WriteChain` (and write the
service's own out-of-stream changes through it too), so every write lands in the order the changes
were made; `recover` then also settles and `reset()`s that chain after dropping its state.

Several inputs partitioned the same way (profile: events and scores): `PartitionedEngine(logic, spec,
..., also=[(other_logic, other_spec)])` reads them all in each partition's one pipeline. A round takes
what has arrived on every input, applies each input's items with its logic, submits each input's
writes (its state, outbox record and checkpoint, under its own `service`'s names) right after its
`apply`, one behind the other on the chain, which lands them in one write (unless the later `apply`
waited for something, e.g. the store, and the first write had started); then it publishes every
message and acknowledges every input's deliveries at once. Per input, every invariant above holds; one
round's fetch, commit, publish and acknowledgement serve them all instead of one batch per input.

Held state (scoring, segmentation): a logic with `async snapshot(positions)` and
`EngineSpec.snapshot_every` is called at a quiescent point (`PartitionedEngine.quiescent`: no batch
being applied, every applied batch durable and acknowledged) with each partition's checkpoint.

Metrics (attribute `service`; not per partition, which would multiply the /metrics page by the
partitions for little an operator reads): a batch's time stage by stage, in ms -
`cdp.engine.bus.wait.duration` (its oldest message stored by JetStream -> fetched),
`cdp.engine.slot.wait.duration` (fetched -> a pipeline slot free), `cdp.engine.decode.duration`,
`cdp.engine.batch.apply.duration`, `cdp.engine.commit.duration` (submitted -> durable),
`cdp.engine.publish.duration`, `cdp.engine.ack.duration` - and, with `partition` too,
`cdp.engine.recoveries`, `cdp.engine.checkpoint.rewinds` (above) and `cdp.engine.lag` (messages not
yet delivered). With several inputs, decode,
apply and lag are per input (its spec's `service`), the round's other stages under the engine's. A span per applied batch;
when it is sampled, it is linked to its messages' traces (the links are not read at all for a batch
whose span is not).
"""

from cdp_kit.engine.chain import EarlierWriteFailed, WriteChain
from cdp_kit.engine.engine import EngineSpec, PartitionedEngine
from cdp_kit.engine.logic import Effects, Logic, Many, Reject
from cdp_kit.engine.outbox import outbox_collection

__all__ = [
    "EarlierWriteFailed",
    "Effects",
    "EngineSpec",
    "Logic",
    "Many",
    "PartitionedEngine",
    "Reject",
    "WriteChain",
    "outbox_collection",
]
