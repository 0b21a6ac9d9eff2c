"""`privacy.deleted` (stream PRIVACY) → the in-memory SuppressionList.

The list is rebuilt from the stream on every start, so nothing is stored. The collector reads the stream
message by message, by sequence (JetStream's get-message API), not through a consumer: it is the service
exposed to the internet, and its NATS user holds no consumer rights on PRIVACY. Those rights cannot be
limited to one's own consumers (a consumer is known by its name alone, and the create request may carry
any name), so with them the edge could rewrite, drain or delete identity's consumer of deletions
(`cdp_kit.natsauth`).

`load()` returns only once every message that was in the stream when it was called has been applied,
and the collector reports ready after that, so its first answer already honours every suppression made
before it started. Then it follows: a core-NATS subscription to privacy.deleted delivers each deletion as it
is published, and its suppression is applied at once (adding hashes to the list twice changes nothing);
a message another service's push consumer delivers onto the subject is dropped (`_on_signal`).
nats-server hands a published message to core subscribers before the stream has stored it, so a
follower that only read the stream on the signal could find nothing new yet and wait for its next look:
seconds in which a deleted person's events were accepted again (a CI run caught 5 s of them). The
signal also wakes the follower, which reads the stream in sequence order, each message once, and it
looks every `follow_every` seconds anyway, for what was published while its connection was down. The stream drops no message by age (`privacy_stream()`), and a
suppression lasts as long as its message does - and as long as the collector holds the key its hashes
were made with (`cdp_kit.identifier_hash`): one made with a key it does not hold is logged as an error
and suppresses no one.

A stop is never lost: nats-py waits for each JetStream reply with Python 3.11's `asyncio.wait_for`, which
returns the reply when the stop lands in the loop turn it does, and a collector stopped during start-up
would finish loading, start its follower and serve. After each request the task checks whether it was
asked to stop (`cdp_kit.stopping.raise_if_cancelling`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from cdp.privacy.v1 import privacy_pb2
from cdp_collector.domain import SuppressionList
from cdp_collector.domain.suppression import UnknownHashKey
from cdp_kit.bus.subjects import PRIVACY, PRIVACY_DELETED, published_on
from cdp_kit.errors import Unavailable
from cdp_kit.identifier_hash import SETTING
from cdp_kit.stopping import raise_if_cancelling

log = logging.getLogger("cdp.collector.privacy")

# Messages asked for at once while catching up: a long stream is read in windows of parallel requests.
READ_WINDOW = 256
# How often the follower looks without being woken (a deletion published while NATS was unreachable).
FOLLOW_EVERY = 5.0


class SuppressionFollower:
    def __init__(
        self, nc: NATS, js: JetStreamContext, suppression: SuppressionList, *, follow_every: float = FOLLOW_EVERY
    ) -> None:
        self.nc = nc
        self.js = js
        self.suppression = suppression
        self.follow_every = follow_every
        self._wake = asyncio.Event()
        self._signal: Subscription | None = None
        self._follower: asyncio.Task | None = None
        self._applied = 0  # the last sequence read (applied, or not a privacy.deleted)
        self._messages = 0
        self._loaded = False

    async def load(self, timeout: float) -> None:
        """Apply every privacy.deleted message in the stream, then keep following new ones.

        Raises Unavailable after `timeout` seconds: a collector that cannot know who is suppressed must
        not start taking events (the orchestrator restarts it)."""
        started = time.monotonic()
        # Subscribed before the stream is read, so a deletion published meanwhile wakes the follower.
        self._signal = await self.nc.subscribe(PRIVACY_DELETED, cb=self._on_signal)
        target = 0
        try:
            async with asyncio.timeout(timeout):
                first, target = await self._sequences()
                await self._read(first, target)
        except asyncio.CancelledError:
            await self.stop()  # stopped during start-up: no subscription left behind
            raise
        except TimeoutError:
            await self.stop()
            raise Unavailable(
                f"read privacy.deleted up to sequence {self._applied} of {target} in stream {PRIVACY} "
                f"within {timeout:g}s; raise CDP_COLLECTOR_SUPPRESSION_LOAD_TIMEOUT or check NATS"
            ) from None
        self._loaded = True
        log.info(
            "suppression list loaded: %d identifiers from %d privacy.deleted messages in %.2fs",
            len(self.suppression),
            self._messages,
            time.monotonic() - started,
        )
        self._follower = asyncio.create_task(self._follow(), name="privacy.deleted follower")

    async def stop(self) -> None:
        if self._follower is not None:
            follower, self._follower = self._follower, None
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        if self._signal is not None:
            signal, self._signal = self._signal, None
            # The connection may already be gone at shutdown.
            with contextlib.suppress(Exception):
                await signal.unsubscribe()

    async def _on_signal(self, msg: Msg) -> None:
        # Only what profile published on privacy.deleted. Any service keeping a consumer can make it a push
        # consumer delivering onto this subject (its permissions do not see the deliver subject), and
        # orchestration consumes a stream it writes itself: what that delivers would otherwise be applied
        # as a deletion, suppressing at the edge whoever its bytes name. It keeps its stream subject
        # (`subjects.published_on`). Nor does it wake the follower: the stream is read every look anyway.
        if not published_on(msg, PRIVACY_DELETED):
            return
        self._suppress(msg.data, "signal")
        self._wake.set()

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.follow_every):
                    await self._wake.wait()
            self._wake.clear()  # before reading: a deletion published while we read wakes us again
            try:
                await self._read(*await self._sequences())
            except Exception as exc:  # NATS away, a timeout: the next signal or look tries again
                log.warning("could not read privacy.deleted; trying again: %s", type(exc).__name__)

    async def _sequences(self) -> tuple[int, int]:
        """The first and last sequence the stream holds now; (0, 0) when there is no stream."""
        try:
            state = (await self.js.stream_info(PRIVACY)).state
        except NotFoundError:
            state = None
        raise_if_cancelling(asyncio.current_task())  # a stop the reply swallowed (module docstring)
        if state is None:
            return 0, 0
        return state.first_seq or 0, state.last_seq or 0

    async def _read(self, first: int, last: int) -> None:
        """Every message after the last one read, up to `last`; what an operator purged is not asked for. A
        stream whose last sequence is below the last one read was created again (deleted by hand, nats-server
        started on an empty store): its sequences start over, so it is read from its first message. A purge
        keeps the last sequence, so it never reads as this."""
        if last < self._applied:
            log.warning(
                "stream %s holds sequences up to %d, below the %d read already: it was created again; reading "
                "it from its first message",
                PRIVACY,
                last,
                self._applied,
            )
            self._applied = 0
        self._applied = max(self._applied, first - 1)
        while self._applied < last:
            window = range(self._applied + 1, min(last, self._applied + READ_WINDOW) + 1)
            messages = await asyncio.gather(*(self._get(seq) for seq in window))
            for seq, message in zip(window, messages, strict=True):
                if message is not None:
                    self._apply(seq, message)
                self._applied = seq

    async def _get(self, seq: int) -> bytes | None:
        """The payload of message `seq` if it is a privacy.deleted; None for a sequence no longer held."""
        try:
            message = await self.js.get_msg(PRIVACY, seq=seq)
        except NotFoundError:
            return None
        return message.data if message.subject == PRIVACY_DELETED else None

    def _apply(self, seq: int, data: bytes) -> None:
        self._messages += 1
        self._suppress(data, f"message {seq}")

    def _suppress(self, data: bytes, where: str) -> None:
        """Adds a suppressing deletion's hashes to the list; `where` names it in logs (a stream sequence,
        or the signal that arrived before the stream held it). A message's faults are logged when its
        stream copy is applied, once, not again for its signal."""
        report = where != "signal"
        try:
            deleted = privacy_pb2.PrivacyDeleted.FromString(data)
        except DecodeError as exc:
            if report:
                log.error("privacy.deleted %s is not a PrivacyDeleted and was skipped: %s", where, exc)
            return
        if not deleted.suppress:
            return
        try:
            added, malformed = self.suppression.add(deleted.identifier_hashes, key_id=deleted.identifier_hash_key_id)
        except UnknownHashKey as exc:
            # Not fatal: the collector serves everyone else. Nothing it could do would match these.
            if not report:
                return
            log.error(
                "privacy.deleted %s (request %s): its identifier hashes (%d) were made with key %s, which "
                "%s does not hold, so the person's events are not suppressed; add that key to the file (below "
                "the current one) and restart the collector",
                where,
                deleted.request_id,
                exc.hashes,
                exc.key_id,
                SETTING,
            )
            return
        if malformed and report:
            log.error(
                "privacy.deleted %s (request %s): %d identifier hashes are not hex SHA-256 and were skipped",
                where,
                deleted.request_id,
                malformed,
            )
        if self._loaded and added:  # the second copy of a deletion (signal, then stream) adds nothing
            log.info(
                "suppressing %d more identifiers (privacy request %s); %d in all",
                added,
                deleted.request_id,
                len(self.suppression),
            )
