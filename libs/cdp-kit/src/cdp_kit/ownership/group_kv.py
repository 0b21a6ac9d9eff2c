"""The ownership bucket as one group sees it: its own keys, reached only through subjects that name them.

Every service keeps its leases in one bucket (`CDP_OWNERSHIP`), under keys `<group>.…`, and its NATS user
is granted only subjects that carry its group (`cdp_kit.natsauth.permissions`). nats.py's own ways of
listing keys cannot be granted that narrowly: `watch` and `keys` create a nameless consumer
(`$JS.API.CONSUMER.CREATE.<stream>`, its filter in the body, out of the server's sight), and a get on a
bucket without direct gets goes to `$JS.API.STREAM.MSG.GET.<stream>` with the key in the body. Either
would let one service read another's leases (and follow every heartbeat of another's replicas).

`GroupKv` is nats.py's `KeyValue` with those two replaced:

- `scan(pattern)`: the latest entry of each key matching `pattern` (a key or `<prefix>.>`, inside the
  group), from a short-lived push consumer created on `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`:
  the filter is in the subject, where the server's permissions see it, and the server refuses a body
  whose filter differs from the subject's. Delivery goes to the service's own inbox; the consumer goes
  away by itself a few seconds after the scan unsubscribes (`inactive_threshold`), so no delete right is
  needed (a delete on any name would let one service cut another's scan short). The scan ends once every
  key the stream holds for the pattern, asked once the consumer exists (`$JS.API.STREAM.INFO.<stream>`
  with the pattern as its subjects filter: the look-up `open` makes), has come, not when the consumer's
  own count says nothing is left: keys written during the scan made that count end it early, without them.
- `get(key)`: a direct get of that key's subject (`$JS.API.DIRECT.GET.<stream>.$KV.<bucket>.<key>`) on a
  bucket that allows direct gets (every bucket this module creates), else a `scan` of the key (a bucket
  made before, by a version that created it without direct gets: no upgrade step is needed).

Puts, creates, updates and deletes are nats.py's, published on the key's own subject. `watch` stays
nats.py's, for users without limits (cdpctl's operator, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

import nats.errors
import nats.js.errors
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from cdp_kit.bus.setup import answered
from cdp_kit.errors import Unavailable

# How long an abandoned scan consumer lives on the server (nanoseconds in the API).
SCAN_CONSUMER_LIFETIME = 5.0


class GroupKv(KeyValue):
    """One group's keys of a KV bucket (see the module docstring)."""

    def __init__(self, js, bucket: str, group: str, *, direct: bool) -> None:
        super().__init__(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=direct)
        self.group = group

    @classmethod
    async def open(cls, js, bucket: str, group: str, *, description: str = "") -> GroupKv:
        """The bucket, created when missing (with direct gets: one key is read by its own subject)."""
        stream = f"KV_{bucket}"
        try:
            # Asked again while a stalled server does not answer in time (a look-up: idempotent).
            info = await answered(js, f"stream {stream}", lambda: js.stream_info(stream))
            direct = bool(info.config.allow_direct)
        except nats.js.errors.NotFoundError:
            # Two members racing to create the bucket both succeed: the configuration is the same. Under a
            # service's own NATS user the server drops the request (the provisioner makes every bucket).
            try:
                created = await js.create_key_value(bucket=bucket, history=1, description=description, direct=True)
            except (nats.errors.TimeoutError, nats.js.errors.APIError) as exc:
                raise Unavailable(missing_bucket(bucket, exc)) from None
            direct = bool(created._direct)
        return cls(js, bucket, group, direct=direct)

    def _check(self, pattern: str) -> None:
        if not (pattern == self.group or pattern.startswith(f"{self.group}.")):
            raise ValueError(f"key {pattern!r} is not in group {self.group!r}: a group reads only its own keys")

    async def _get(self, key: str, revision: int | None = None) -> KeyValue.Entry:
        self._check(key)
        if self._direct or revision:
            return await super()._get(key, revision)
        entry = (await self.scan(key)).get(key)
        if entry is None:
            raise nats.js.errors.KeyNotFoundError
        if entry.operation in (KV_DEL, KV_PURGE):
            raise nats.js.errors.KeyDeletedError(entry, entry.operation)
        return entry

    async def scan(self, pattern: str, *, timeout: float = 5.0) -> dict[str, KeyValue.Entry]:
        """The latest entry of every key matching `pattern` (deleted ones too, with their `operation`)."""
        self._check(pattern)
        nc = self._js._nc
        inbox = nc.new_inbox()
        received: asyncio.Queue = asyncio.Queue()

        async def deliver(msg) -> None:
            received.put_nowait(msg)

        subscription = await nc.subscribe(inbox, cb=deliver)
        try:
            filter_subject = f"{self._pre}{pattern}"
            name = f"{self.group}-scan-{secrets.token_hex(8)}"
            config = {
                "name": name,
                "deliver_subject": inbox,
                "deliver_policy": "last_per_subject",
                "ack_policy": "none",
                "replay_policy": "instant",
                "filter_subject": filter_subject,
                "mem_storage": True,
                "num_replicas": 1,
                "inactive_threshold": int(SCAN_CONSUMER_LIFETIME * 1e9),
            }
            request = {"stream_name": self._stream, "config": config, "action": "create"}
            reply = await nc.request(
                f"$JS.API.CONSUMER.CREATE.{self._stream}.{name}.{filter_subject}",
                json.dumps(request).encode(),
                timeout=timeout,
            )
            info = json.loads(reply.data)
            if "error" in info:
                raise nats.js.errors.APIError.from_error(info["error"])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            present = await self._keys_present(filter_subject, timeout)
            entries: dict[str, KeyValue.Entry] = {}
            if not present:
                return entries  # nothing matches
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise nats.errors.TimeoutError
                msg = await asyncio.wait_for(received.get(), remaining)
                meta = msg.metadata
                key = msg.subject[len(self._pre) :]
                entries[key] = KeyValue.Entry(
                    bucket=self._name,
                    key=key,
                    value=msg.data,
                    revision=meta.sequence.stream,
                    delta=meta.num_pending,
                    created=None,
                    operation=(msg.headers or {}).get(KV_OP),
                )
                # Fresh as far as the consumer can tell, and every key there is listed: the consumer's count
                # alone is no end (see `_keys_present`).
                if meta.num_pending == 0 and present <= entries.keys():
                    return entries
        finally:
            # A closed connection took the inbox's interest with it. Raised here, its error replaced what
            # was on its way out: a cancellation (a member's round, stopped as its connection closed)
            # became an error the round logged, and the member's loop ran on.
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await subscription.unsubscribe()

    async def _keys_present(self, filter_subject: str, timeout: float) -> set[str]:
        """The keys matching `filter_subject` now, asked once the scan's consumer exists. The consumer
        delivers each one's latest message: the one it started with, or a write made after it started.
        Its count of messages left is no end marker: a key written again during the scan loses the
        message the consumer counted on, and the count can reach nothing left before the key's new
        message is counted, so a scan ending there missed the key (a member heartbeating at that moment
        was missing from another's members(), which then computed the assignment without it). A key
        removed from the stream altogether before it came (no KV operation does that) leaves the scan to
        its timeout."""
        reply = await self._js._nc.request(
            f"$JS.API.STREAM.INFO.{self._stream}",
            json.dumps({"subjects_filter": filter_subject}).encode(),
            timeout=timeout,
        )
        info = json.loads(reply.data)
        if "error" in info:
            raise nats.js.errors.APIError.from_error(info["error"])
        return {subject[len(self._pre) :] for subject in info.get("state", {}).get("subjects") or {}}


def missing_bucket(bucket: str, exc: BaseException) -> str:
    """Why a service could not make a bucket it needs: no service's NATS user may (docs/security.md)."""
    return (
        f"the {bucket} bucket does not exist and this service may not create it ({type(exc).__name__}): no "
        "service's NATS user may; the provisioner makes it (cdpctl up, or the chart's provisioning Job: "
        "python -m cdp_kit.provision)"
    )
