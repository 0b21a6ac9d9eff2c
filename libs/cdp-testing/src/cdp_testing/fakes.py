"""Stand-ins for the two things engine tests need to control: the clock and a delivered message.

    clock = Clock(T0)                                     # engine = Engine(..., clock=clock)
    clock.advance(3600)                                   # an hour later, no sleeping
    await engine.apply([Delivery(batch, subjects.profiles_changed(0), seq=1)])

`Delivery` has the surface of `cdp_kit.bus.Delivery` (a test in cdp-testing keeps the two in step) and
records the outcome a handler chose the same way. A rejection is usually a bug in the test or the
engine, so by default it fails the test on the spot, naming the reason; pass `allow_reject=True` where
rejecting is the behaviour under test, then look at `outcome`, `reason` and `detail`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from cdp_kit.telemetry import extract_context

#: An instant in 2026 the engine tests of several services start from (float epoch seconds).
T0 = 1_790_000_000.0


class Clock:
    """Float epoch seconds, like `time.time`, that move only when the test moves them."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class _Serializable(Protocol):
    def SerializeToString(self) -> bytes: ...


class Delivery:
    """One message as the kit's consumer hands it to a handler, without NATS.

    `data` may be bytes or a protobuf message (serialized here, as the publisher would)."""

    def __init__(
        self,
        data: bytes | _Serializable,
        subject: str,
        seq: int,
        *,
        delivered: int = 1,
        headers: Mapping[str, str] | None = None,
        allow_reject: bool = False,
    ) -> None:
        self.data = data if isinstance(data, bytes) else data.SerializeToString()
        self.subject = subject
        self.stream_seq = seq
        self.num_delivered = delivered
        self.headers = dict(headers or {})
        self.allow_reject = allow_reject
        self.outcome = "ack"
        self.reason = ""
        self.detail = ""
        self.delay: float | None = None
        self.parts: dict[int, tuple[bytes, str, str]] | None = None

    @property
    def msg_id(self) -> str | None:
        return self.headers.get("Nats-Msg-Id")

    def trace_context(self):
        return extract_context(self.headers)

    def retry(self, reason: str, delay: float | None = None) -> None:
        self.outcome, self.reason, self.delay = "retry", reason, delay

    def reject(self, reason: str, detail: str = "") -> None:
        if not self.allow_reject:
            raise AssertionError(f"message {self.stream_seq} on {self.subject} rejected: {reason} {detail}")
        self.outcome, self.reason, self.detail = "reject", reason, detail

    def reject_part(self, index: int, data: bytes, reason: str, detail: str = "") -> None:
        if not self.allow_reject:
            raise AssertionError(f"part {index} of message {self.stream_seq} on {self.subject} rejected: {reason}")
        if self.parts is None:
            self.parts = {}
        self.parts[index] = (data, reason, detail)
