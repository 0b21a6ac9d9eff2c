"""`privacy.deleted` (stream PRIVACY) → the in-memory SuppressionList.

The list is rebuilt from the stream on every start, so there is no durable consumer and nothing to store:
an ordered push consumer delivers every message from the first one on, then keeps following. `load()`
returns only once every message that was in the stream when it was called has been applied, and the
collector reports ready after that — so its first answer already honours every suppression made before
it started. The stream keeps no message forever by age (`privacy_stream()`), and a suppression lasts as
long as its message does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from cdp.privacy.v1 import privacy_pb2
from cdp_collector.domain import SuppressionList
from cdp_kit.bus.subjects import PRIVACY, PRIVACY_DELETED
from cdp_kit.errors import Unavailable

log = logging.getLogger("cdp.collector.privacy")


class SuppressionFollower:
    def __init__(self, js: JetStreamContext, suppression: SuppressionList) -> None:
        self.js = js
        self.suppression = suppression
        self._subscription: JetStreamContext.PushSubscription | None = None
        self._target = 0  # the last privacy.deleted sequence when loading started
        self._applied = 0  # the last sequence applied
        self._messages = 0
        self._loaded = asyncio.Event()

    async def load(self, timeout: float) -> None:
        """Apply every privacy.deleted message in the stream, then keep following new ones.

        Raises Unavailable after `timeout` seconds: a collector that cannot know who is suppressed must
        not start taking events (the orchestrator restarts it)."""
        started = time.monotonic()
        try:
            self._target = (await self.js.get_last_msg(PRIVACY, PRIVACY_DELETED)).seq or 0
        except NotFoundError:
            self._target = 0
        if self._target == 0:
            self._loaded.set()
        self._subscription = await self.js.subscribe(
            PRIVACY_DELETED,
            stream=PRIVACY,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            await self.stop()
            raise Unavailable(
                f"read privacy.deleted up to sequence {self._applied} of {self._target} in stream {PRIVACY} "
                f"within {timeout:g}s; raise CDP_COLLECTOR_SUPPRESSION_LOAD_TIMEOUT or check NATS"
            ) from None
        log.info(
            "suppression list loaded: %d identifiers from %d privacy.deleted messages in %.2fs",
            len(self.suppression),
            self._messages,
            time.monotonic() - started,
        )

    async def stop(self) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            # The connection may already be gone at shutdown; the ephemeral consumer then expires by itself.
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        metadata = msg.metadata
        seq = metadata.sequence.stream
        self._messages += 1
        try:
            deleted = privacy_pb2.PrivacyDeleted.FromString(msg.data)
        except DecodeError as exc:
            log.error("privacy.deleted message %d is not a PrivacyDeleted and was skipped: %s", seq, exc)
        else:
            if deleted.suppress:
                added, malformed = self.suppression.add(deleted.identifier_hashes)
                if malformed:
                    log.error(
                        "privacy.deleted message %d (request %s): %d identifier hashes are not hex SHA-256 and "
                        "were skipped",
                        seq,
                        deleted.request_id,
                        malformed,
                    )
                if self._loaded.is_set():
                    log.info(
                        "suppressing %d more identifiers (privacy request %s); %d in all",
                        added,
                        deleted.request_id,
                        len(self.suppression),
                    )
        self._applied = seq
        if seq >= self._target or metadata.num_pending == 0:
            self._loaded.set()
