"""Outgoing gRPC channels that present the renewed client certificate, and trust the renewed CA, without a
restart.

With TLS on, a service calls its peers with its own CDP_TLS_CERT_FILE / CDP_TLS_KEY_FILE and trusts
CDP_TLS_CLIENT_CA_FILE. cert-manager renews those files in the mounted Secret at two thirds of the
certificate's life; a channel built once from them would present the old certificate until it expired,
and every new connection would fail from then on, until a restart.

`FollowingChannel` is what `cdp_kit.service.client_channel` returns when TLS is on. It stands where a
`grpc.aio.Channel` does (stubs are built on it once) and holds a real secure channel underneath:

- At each call it asks the process's `ClientCertificates` for the current set. That stats the three files
  (following symlinks: mtime, inode, size, as `cdp_kit.tls_reload` does) at most once every CHECK_SECONDS,
  for every channel of the process together; between stats a call costs a clock read.
- When the files changed and make a set (the key is the certificate's, the CA parses: the server side's
  checks), new calls go over a new secure channel built from them. Calls already started stay on the
  channel they started on; that channel is closed once its last call ended, or RETIRE_SECONDS after the
  swap at the latest (what is still running then is cancelled).
- A set that does not hold together (a key of another certificate, a file missing) keeps the last good one,
  with ONE warning per change for the whole process naming the variables, never the contents; the next
  change is looked at again.

The multicallables a stub holds dispatch to the current channel at call time, so a stub built before a
renewal calls with the new certificate after it; the channel's interceptors (the outbound bearer token)
are those of every channel underneath. `cdp.tls.certificate.not_after` with `side` "client" is when the
certificate outgoing calls present expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from time import monotonic
from typing import Any

import grpc
from opentelemetry import metrics

from cdp_kit.tls_reload import CertificateFiles

log = logging.getLogger("cdp.service.tls")

# How often the files are stat'ed, at most, for all the channels of a process.
CHECK_SECONDS = 1.0
# How long a channel replaced by a renewal may keep the calls it carries before it is closed regardless.
RETIRE_SECONDS = 60.0

# The sets of the process, by service and files: every channel built on the same files shares one, so the
# files are stat'ed once a second in all and a refused change is warned about once. A process has one.
_SHARED: dict[tuple[str, Path, Path, Path | None], ClientCertificates] = {}
_SHARED_LOCK = threading.Lock()


class ClientCertificates(CertificateFiles):
    """The set outgoing calls present and trust: one per process and set of files (`for_files`), shared by
    every channel, so a refused change is warned about once."""

    side = "client"
    using = "presenting to peers"

    def __init__(self, cert_file: Path, key_file: Path, ca_file: Path | None, service_name: str) -> None:
        super().__init__(cert_file, key_file, ca_file, service_name)
        self.generation = 0  # moves on with every set taken
        self.credentials = self._credentials(self._first_set("presented to peers"))
        self._checked_at = monotonic()

    def current(self) -> tuple[int, grpc.ChannelCredentials]:
        """The generation and credentials of the last good set, looked at again when CHECK_SECONDS passed."""
        now = monotonic()
        if now - self._checked_at >= CHECK_SECONDS:
            self._checked_at = now
            try:
                files = self._changed_set()
            except Exception:  # a call must not fail for it: the last good set is kept
                log.exception("TLS reload failed: still presenting the previous certificate")
                files = None
            if files is not None:
                self.credentials = self._credentials(files)
                self.generation += 1
        return self.generation, self.credentials

    def _credentials(self, files: list[bytes]) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=files[2] if self.client_ca_file is not None else None,  # else the system's CAs
            private_key=files[1],
            certificate_chain=files[0],
        )

    @classmethod
    def for_files(
        cls, cert_file: Path, key_file: Path, ca_file: Path | None, service_name: str, meter: metrics.Meter
    ) -> ClientCertificates:
        """The process's set for these files, read (and a CertificateSetError when they make none) the first
        time."""
        key = (service_name, cert_file, key_file, ca_file)
        with _SHARED_LOCK:
            found = _SHARED.get(key)
            if found is None:
                found = _SHARED[key] = cls(cert_file, key_file, ca_file, service_name)
                found.instrument(meter)
            return found


class _Underlying:
    """One secure channel under a FollowingChannel, with the calls it carries."""

    __slots__ = ("calls", "channel", "generation", "idle")

    def __init__(self, channel: grpc.aio.Channel, generation: int) -> None:
        self.channel = channel
        self.generation = generation
        self.calls = 0
        self.idle: asyncio.Event | None = None  # made when the channel is retired

    def started(self, call: Any) -> Any:
        self.calls += 1
        call.add_done_callback(self._ended)
        return call

    def _ended(self, _call: Any) -> None:
        self.calls -= 1
        if self.calls == 0 and self.idle is not None:
            self.idle.set()


class FollowingChannel(grpc.aio.Channel):
    """A grpc.aio.Channel over a secure channel built from the current certificate set (module docstring)."""

    def __init__(
        self,
        address: str,
        certificates: ClientCertificates,
        *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        self._address = address
        self._certificates = certificates
        self._interceptors = interceptors
        generation, credentials = certificates.current()
        self._live = self._open(generation, credentials)
        self._retiring: dict[_Underlying, asyncio.Task | None] = {}
        self._closed = False

    def _open(self, generation: int, credentials: grpc.ChannelCredentials) -> _Underlying:
        channel = grpc.aio.secure_channel(self._address, credentials, interceptors=self._interceptors)
        return _Underlying(channel, generation)

    def _current(self) -> _Underlying:
        generation, credentials = self._certificates.current()
        if generation != self._live.generation and not self._closed:
            old, self._live = self._live, self._open(generation, credentials)
            self._retire(old)
        return self._live

    def _retire(self, old: _Underlying) -> None:
        old.idle = asyncio.Event()
        if old.calls == 0:
            old.idle.set()
        try:
            task = asyncio.get_running_loop().create_task(self._close_when_idle(old), name="tls-channel-retire")
        except RuntimeError:  # no loop running here: closed with the channel
            task = None
        self._retiring[old] = task

    async def _close_when_idle(self, old: _Underlying) -> None:
        assert old.idle is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(old.idle.wait(), RETIRE_SECONDS)
        await old.channel.close()
        self._retiring.pop(old, None)

    @property
    def retiring(self) -> int:
        """How many channels replaced by a renewal are not closed yet (they still carry calls)."""
        return len(self._retiring)

    async def retired(self) -> None:
        """Until the channels replaced by a renewal so far are closed."""
        await asyncio.gather(*(task for task in list(self._retiring.values()) if task is not None))

    # grpc.aio.Channel

    def unary_unary(
        self, method: str, request_serializer=None, response_deserializer=None, _registered_method=False
    ) -> grpc.aio.UnaryUnaryMultiCallable:
        return _UnaryUnary(self, method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(
        self, method: str, request_serializer=None, response_deserializer=None, _registered_method=False
    ) -> grpc.aio.UnaryStreamMultiCallable:
        return _UnaryStream(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(
        self, method: str, request_serializer=None, response_deserializer=None, _registered_method=False
    ) -> grpc.aio.StreamUnaryMultiCallable:
        return _StreamUnary(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(
        self, method: str, request_serializer=None, response_deserializer=None, _registered_method=False
    ) -> grpc.aio.StreamStreamMultiCallable:
        return _StreamStream(self, method, request_serializer, response_deserializer, _registered_method)

    async def close(self, grace: float | None = None) -> None:
        self._closed = True
        for task in self._retiring.values():
            if task is not None:
                task.cancel()
        channels = [self._live, *self._retiring]
        self._retiring.clear()
        await asyncio.gather(*(underlying.channel.close(grace) for underlying in channels))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._current().channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._current().channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._current().channel.channel_ready()

    async def __aenter__(self) -> FollowingChannel:
        return self

    async def __aexit__(self, exc_type, exc_val, exc_tb) -> None:
        await self.close(None)


class _Following:
    """A multicallable that makes its call on the channel current at call time (made again on a new one)."""

    kind = ""  # the grpc.aio.Channel method that makes it: unary_unary ...

    def __init__(self, owner: FollowingChannel, *made_with: Any) -> None:
        self._owner = owner
        self._made_with = made_with
        self._on: _Underlying | None = None
        self._made: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        underlying = self._owner._current()
        if self._on is not underlying:
            self._made = getattr(underlying.channel, self.kind)(*self._made_with)
            self._on = underlying
        return underlying.started(self._made(*args, **kwargs))


class _UnaryUnary(_Following, grpc.aio.UnaryUnaryMultiCallable):
    kind = "unary_unary"
    __call__ = _Following.__call__


class _UnaryStream(_Following, grpc.aio.UnaryStreamMultiCallable):
    kind = "unary_stream"
    __call__ = _Following.__call__


class _StreamUnary(_Following, grpc.aio.StreamUnaryMultiCallable):
    kind = "stream_unary"
    __call__ = _Following.__call__


class _StreamStream(_Following, grpc.aio.StreamStreamMultiCallable):
    kind = "stream_stream"
    __call__ = _Following.__call__
