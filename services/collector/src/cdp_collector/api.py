"""gRPC CollectorService: protobuf in, per-event results out; the rules live in `domain`."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp_collector.domain import (
    SUPPRESSED_MESSAGE,
    Code,
    Limits,
    SuppressionList,
    check_event_count,
    check_request_bytes,
    prepare_grpc_event,
)
from cdp_collector.ingest import Ingestor
from cdp_collector.key_refusals import KeyRefusals
from cdp_collector.source_limits import SourceLimiter
from cdp_collector.sources import KeyRefused, SourceRegistry
from cdp_kit.errors import InvalidArgument, Unavailable

ACCEPTED = collector_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = collector_pb2.EVENT_STATUS_DUPLICATE
REJECTED = collector_pb2.EVENT_STATUS_REJECTED
SUPPRESSED = collector_pb2.EVENT_STATUS_SUPPRESSED

log = logging.getLogger("cdp.collector.api")


class CollectorApi(collector_pb2_grpc.CollectorServiceServicer):
    def __init__(
        self,
        sources: SourceRegistry,
        ingestor: Ingestor,
        limits: Limits,
        suppression: SuppressionList,
        limiter: SourceLimiter,
        key_refusals: KeyRefusals,
    ) -> None:
        self.sources = sources
        self.ingestor = ingestor
        self.limits = limits
        self.suppression = suppression
        self.limiter = limiter
        self.key_refusals = key_refusals

    async def Collect(self, request: collector_pb2.CollectRequest, context) -> collector_pb2.CollectResponse:
        try:
            source = self.sources.authenticate(request.write_key)
        except KeyRefused as exc:
            # Counted and, for a disabled source, said by its id; the interceptor's `grpc call rejected`
            # line carries exc.reason (`unknown_key`, `source_disabled`) as the gRPC ErrorInfo does.
            self.key_refusals(exc, transport="grpc")
            raise
        count = len(request.events)
        refusal = (
            check_event_count(count, self.limits, field="events")
            or check_request_bytes(request.ByteSize(), self.limits)
            or self.limiter.check_batch(source, count, field="events", transport="grpc")
        )
        if refusal is not None:
            raise InvalidArgument(refusal.field or "events", refusal.message, reason=str(refusal.code))
        # The source's rate: RESOURCE_EXHAUSTED with RetryInfo (SourceLimited) before any event is looked at.
        self.limiter.take(source, count, transport="grpc")
        received_at = datetime.now(UTC)
        # Handed over as the Timestamp: the domain checks it is one (years 0001..9999, nanos in range) and
        # rejects the events that need it on `sent_at`; converting it here raised on such values.
        batch_sent_at = request.sent_at if request.HasField("sent_at") else None
        response = collector_pb2.CollectResponse()
        # When nobody is suppressed (the common case) no event is even looked at.
        suppression = self.suppression if self.suppression else None
        valid, positions = [], []
        for index, event in enumerate(request.events):
            result = response.results.add(index=index)
            errors = prepare_grpc_event(
                event,
                received_at=received_at,
                batch_sent_at=batch_sent_at,
                source_id=source.id,
                limits=self.limits,
                index=index,
            )
            result.message_id = event.message_id
            if errors:
                first = errors[0]
                result.status = REJECTED
                result.error.code, result.error.field, result.error.message = (
                    str(first.code),
                    first.field,
                    first.message,
                )
                response.rejected += 1
            elif suppression is not None and (where := suppression.match(event)) is not None:
                result.status = SUPPRESSED
                result.error.code, result.error.field, result.error.message = (
                    str(Code.SUPPRESSED),
                    f"events[{index}].{where}",
                    SUPPRESSED_MESSAGE,
                )
                response.suppressed += 1
            else:
                valid.append(event)
                positions.append(result)
        try:
            stored = await self.ingestor.store(valid, source)
        except Unavailable:
            self.limiter.give_back(source, count)  # nothing confirmed stored: the retry is not charged twice
            raise
        for result, outcome in zip(positions, stored, strict=True):
            result.sequence = outcome.seq
            if outcome.duplicate:
                result.status = DUPLICATE
                response.duplicates += 1
            else:
                result.status = ACCEPTED
                response.accepted += 1
        self.ingestor.count(response.accepted, transport="grpc", source=source.id, outcome="accepted")
        self.ingestor.count(response.duplicates, transport="grpc", source=source.id, outcome="duplicate")
        self.ingestor.count(response.rejected, transport="grpc", source=source.id, outcome="rejected")
        self.ingestor.count(response.suppressed, transport="grpc", source=source.id, outcome="suppressed")
        if response.suppressed:
            log.info(
                "suppressed %d of %d events: their people asked to be deleted and suppressed",
                response.suppressed,
                len(request.events),
                extra={"transport": "grpc", "source": source.id},
            )
        return response
