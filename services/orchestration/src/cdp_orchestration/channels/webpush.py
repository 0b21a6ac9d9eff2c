"""Web Push (RFC 8030) to a browser's push subscription, encrypted (RFC 8291) and VAPID-signed (RFC 8292).

The address is the ``PushSubscription`` JSON the browser handed the web app: ``{"endpoint", "keys":
{"p256dh", "auth"}}``. The payload, ``{"action_id", "title", "body", "url", "data"}`` as JSON for the
service worker to show, is encrypted with ``aes128gcm`` under a fresh P-256 key and salt per message and
the subscription's keys (http_ece). Headers: ``TTL`` (CDP_WEBPUSH_TTL), ``Urgency: normal``, ``Topic``
derived from the action id - a push service replaces an undelivered message with the same topic, so a
redelivered action that has not reached the device yet is shown once - and ``Authorization: vapid
t=<JWT>, k=<public key>`` with an ES256 JWT ``{aud: the endpoint's origin, exp: now + 12h, sub:
CDP_VAPID_SUBJECT}`` signed by the key the web app subscribed with.

Answers: 201 (or any 2xx) accepted; 404 and 410 rejected (the subscription is gone: forget it); 413
failed, not retryable; 429 the push service asking for time (`Outcome.later`: handed back without using
an attempt) and 5xx failed, retryable, both honouring Retry-After; other 4xx (a VAPID or encryption
problem) failed, not retryable.

The endpoint is not the operator's: a subscription is written by the person's browser or app, and anyone
who can write to a profile can write one. So it is guarded as a webhook URL is (`destinations`), and a
refusal is final (rejected, never retried):

- an endpoint whose host is, or resolves to, a loopback, private, link-local, multicast, unspecified or
  reserved address (the metadata service at 169.254.169.254 among them) is rejected with
  ``destination_not_allowed`` unless the host is listed in CDP_WEBPUSH_ALLOWED_HOSTS; the connection goes
  to the address that was checked. The list only exempts: public push services need no listing (the
  browser picks its push service, so there is no fixed set of them to name);
- redirects are not followed: a 3xx is the push service's answer, a failure for good (``http_307``);
- at most RESPONSE_LIMIT bytes of an answer are read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import http_ece
import orjson
from aiohttp.abc import AbstractResolver
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from yarl import URL

from cdp_kit.settings import SettingsError
from cdp_orchestration.channels.base import Action, Channel, Outcome, log_fields, parse_retry_after
from cdp_orchestration.channels.destinations import (
    DestinationRefused,
    GuardedResolver,
    literal,
    normal_host,
    parse_url,
    read_at_most,
    refusal,
)
from cdp_orchestration.channels.settings import WebPushSettings

log = logging.getLogger("cdp.orchestration.channels.webpush")

MAX_RECORD = 4096
#: bytes of a push service's answer read at most: the status and headers are the answer
RESPONSE_LIMIT = 64 * 1024
#: the variable that lists the hosts exempt from the destination check
ALLOWED_HOSTS = "CDP_WEBPUSH_ALLOWED_HOSTS"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def topic_for(action_id: str) -> str:
    """RFC 8030 Topic: at most 32 characters of the URL-safe base64 alphabet."""
    return b64url(hashlib.sha256(action_id.encode()).digest())[:32]


class InvalidSubscription(ValueError):
    pass


def parse_subscription(address: str) -> tuple[str, bytes, bytes]:
    """(endpoint, p256dh public key bytes, auth secret) from PushSubscription JSON."""
    try:
        info = json.loads(address)
        endpoint, keys = info["endpoint"], info["keys"]
        public, auth = b64url_decode(keys["p256dh"]), b64url_decode(keys["auth"])
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public)
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise InvalidSubscription(type(exc).__name__) from None
    # Read by the parser aiohttp connects with, so the host checked is the host connected to.
    url = parse_url(endpoint) if isinstance(endpoint, str) else None
    if url is None or url.scheme not in ("https", "http") or not normal_host(url.raw_host) or len(auth) != 16:
        raise InvalidSubscription("endpoint or auth")
    return endpoint, public, auth


class WebPushChannel(Channel):
    name = "webpush"

    def __init__(self, settings: WebPushSettings, *, resolver: AbstractResolver | None = None) -> None:
        """`resolver` answers for host names (tests stand in for DNS with it); whatever it answers passes
        the destination check. The channel owns its session, so every connection passes that check."""
        self._settings = settings
        self._allowed = {normal_host(host) for host in settings.allowed_hosts}
        self._names = resolver
        self._resolver: GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None
        try:
            key = serialization.load_pem_private_key(settings.vapid_private_key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            raise SettingsError(
                [f"CDP_VAPID_PRIVATE_KEY_FILE={str(settings.vapid_private_key_file)!r} is not a PEM private key"]
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SettingsError(["CDP_VAPID_PRIVATE_KEY_FILE must hold a P-256 (prime256v1) EC key"])
        self._vapid_key = key
        self.application_server_key = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._resolver = GuardedResolver(self._settings.allowed_hosts, self._names, variable=ALLOWED_HOSTS)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=self._resolver),
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            )
        return self._session

    def vapid_header(self, endpoint: str, now: float | None = None) -> str:
        parts = urlsplit(endpoint)
        claims = {
            "aud": f"{parts.scheme}://{parts.netloc}",
            "exp": int(time.time() if now is None else now) + 12 * 3600,
            "sub": self._settings.vapid_subject,
        }
        signing_input = f"{b64url(orjson.dumps({'typ': 'JWT', 'alg': 'ES256'}))}.{b64url(orjson.dumps(claims))}"
        r, s = decode_dss_signature(self._vapid_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"vapid t={signing_input}.{b64url(signature)}, k={b64url(self.application_server_key)}"

    def payload(self, action: Action) -> bytes:
        content = action.content
        return orjson.dumps(
            {
                "action_id": action.action_id,
                "title": content.heading,
                "body": content.body,
                "url": content.url,
                "data": dict(content.data),
            }
        )

    def destination(self, action: Action) -> str:
        # Each browser's push service (FCM, Mozilla, Apple) keeps its own limits.
        try:
            endpoint, _, _ = parse_subscription(action.address)
        except InvalidSubscription:
            return ""
        url = parse_url(endpoint)
        return normal_host(url.raw_host) if url is not None else ""

    async def send(self, action: Action) -> Outcome:
        refused = None
        try:
            endpoint, public, auth = parse_subscription(action.address)
        except InvalidSubscription:
            outcome = Outcome.rejected("invalid_address")
        else:
            url = URL(endpoint)  # parse_subscription parsed it
            host = normal_host(url.raw_host)
            address = literal(host)
            if address is not None and host not in self._allowed and (refused := refusal(address)):
                # aiohttp connects to an IP literal without resolving it: the resolver's check is made here.
                outcome = Outcome.rejected("destination_not_allowed")
            else:
                outcome = await self._encrypt_and_post(url, endpoint, public, auth, action)
        level = logging.INFO if outcome.ok else logging.WARNING
        extra = log_fields(action, reason=outcome.reason)
        if refused is not None:
            extra["refused"] = refused
        log.log(level, "webpush %s", outcome.status, extra=extra)
        return outcome

    async def _encrypt_and_post(self, url: URL, endpoint: str, public: bytes, auth: bytes, action: Action) -> Outcome:
        body = http_ece.encrypt(
            self.payload(action),
            salt=os.urandom(16),
            private_key=ec.generate_private_key(ec.SECP256R1()),
            dh=public,
            auth_secret=auth,
            version="aes128gcm",
        )
        if len(body) > MAX_RECORD:
            return Outcome.failed("payload_too_large", retryable=False)
        return await self._post(url, endpoint, body, action)

    async def _post(self, url: URL, endpoint: str, body: bytes, action: Action) -> Outcome:
        headers: dict[str, Any] = {
            "TTL": str(self._settings.ttl),
            "Urgency": "normal",
            "Topic": topic_for(action.action_id),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self.vapid_header(endpoint),
        }
        try:
            # A redirect is not followed: the check above holds for the endpoint the subscription names,
            # and whatever answers there could otherwise point the request anywhere (the metadata service).
            async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                location = response.headers.get("Location")
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await read_at_most(response, RESPONSE_LIMIT)
        except TimeoutError:
            return Outcome.failed("timeout", retryable=True)
        except aiohttp.InvalidUrlClientError:  # a host aiohttp will not connect to as written ("127.1")
            return Outcome.rejected("invalid_address")
        except aiohttp.ClientConnectorError as error:
            if isinstance(error.os_error, DestinationRefused):
                log.warning("webpush destination refused", extra=log_fields(action, refused=error.os_error.kind))
                return Outcome.rejected("destination_not_allowed")
            return Outcome.failed("connect", retryable=True)
        except aiohttp.ClientError:
            return Outcome.failed("connect", retryable=True)
        if 200 <= status < 300:
            return Outcome.accepted(provider_id=location)
        reason = f"http_{status}"
        if status in (404, 410):
            return Outcome.rejected(reason)
        if status == 429:
            return Outcome.later(reason, retry_after=retry_after)
        if status >= 500:
            return Outcome.failed(reason, retryable=True, retry_after=retry_after)
        return Outcome.failed(reason, retryable=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()  # the connector closes only a resolver it made itself
        self._session = self._resolver = None
