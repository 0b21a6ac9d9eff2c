"""What a service gives the partitioned engine: its domain logic, and nothing about the bus or the
store's bookkeeping (the contract and its invariants: `cdp_kit.engine`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cdp_kit.bus import Delivery, OutMessage
from cdp_kit.storage import WriteOp


class Reject(Exception):
    """`decode` raises this for one message that can never be applied: it is dead-lettered alone with
    `reason` (a code) and the detail "<field>: <problem>". Neither may quote the message's values."""

    def __init__(self, reason: str, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.reason = reason
        self.field = field
        self.problem = problem


class Many(list):
    """What `decode` returns for one message that carries several items (a batch on the wire,
    `cdp_kit.bus.rawevents`): the items, in order, each applied as if it had come alone. A part that can
    never be applied is left out and rejected on its own (`Delivery.reject_part`); `Reject` still rejects
    the whole message."""

    __slots__ = ()


@dataclass(slots=True)
class Effects:
    """What applying a batch changed: the store writes (committed in one `bulk_write` with the stream
    checkpoint and `messages`), and the messages to publish once they are durable. Each message's
    `msg_id` must be stable: the same change always yields the same id, so a re-publication is a
    JetStream duplicate."""

    writes: list[WriteOp] = field(default_factory=list)
    messages: list[OutMessage] = field(default_factory=list)


@runtime_checkable
class Logic(Protocol):
    """A service's domain logic.

    - `decode(delivery)`: one message to the service's item, or `Reject`. Pure: no I/O, no state. A
      message that carries several items decodes to `Many(items)`.
    - `apply(partition, items)`: apply the items (decoded, in stream order, none applied before) to hot
      state and return what must become durable. The engine calls it for the next batch while earlier
      batches' effects are still being written, so hot state runs ahead of the store; it never calls
      it twice at once for one partition. It may take the service's own lock (state shared across
      partitions). Raising fails the batch (the engine recovers, then isolates the message).
    - `recover(partition)`: a commit of this partition failed (or `apply` raised). Drop whatever hot
      state may hold changes the store does not have, so the batches redelivered from the checkpoint
      are applied on fresh state. Called after every write submitted before the failure has settled.

    Optional: `async snapshot(positions: Mapping[int, int])`, for a service that holds state without
    writing it per change; called every `EngineSpec.snapshot_every` seconds at a quiescent point
    (nothing being applied, every applied batch durable and acknowledged), with each partition's
    checkpoint. On start it replays what came after its snapshot (`cdp_kit.bus.delivered_since`).
    """

    def decode(self, delivery: Delivery) -> Any: ...

    async def apply(self, partition: int, items: list[Any]) -> Effects: ...

    async def recover(self, partition: int) -> None: ...


class Snapshotting(Protocol):
    async def snapshot(self, positions: Mapping[int, int]) -> None: ...
