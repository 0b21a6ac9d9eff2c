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
failed, not retryable; 429 and 5xx failed, retryable, honouring Retry-After; other 4xx (a VAPID or
encryption problem) failed, not retryable.
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cdp_kit.settings import SettingsError
from cdp_orchestration.channels.base import Action, Channel, Outcome, log_fields, parse_retry_after
from cdp_orchestration.channels.settings import WebPushSettings

log = logging.getLogger("cdp.orchestration.channels.webpush")

MAX_RECORD = 4096


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
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("https", "http") or not parts.netloc or len(auth) != 16:
        raise InvalidSubscription("endpoint or auth")
    return endpoint, public, auth


class WebPushChannel(Channel):
    name = "webpush"

    def __init__(self, settings: WebPushSettings, *, session: aiohttp.ClientSession | None = None) -> None:
        self._settings = settings
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
        self._session = session
        self._owns_session = session is None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._settings.timeout))
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
        return (urlsplit(endpoint).hostname or "").lower()

    async def send(self, action: Action) -> Outcome:
        try:
            endpoint, public, auth = parse_subscription(action.address)
        except InvalidSubscription:
            outcome = Outcome.rejected("invalid_address")
        else:
            body = http_ece.encrypt(
                self.payload(action),
                salt=os.urandom(16),
                private_key=ec.generate_private_key(ec.SECP256R1()),
                dh=public,
                auth_secret=auth,
                version="aes128gcm",
            )
            if len(body) > MAX_RECORD:
                outcome = Outcome.failed("payload_too_large", retryable=False)
            else:
                outcome = await self._post(endpoint, body, action)
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "webpush %s", outcome.status, extra=log_fields(action, reason=outcome.reason))
        return outcome

    async def _post(self, endpoint: str, body: bytes, action: Action) -> Outcome:
        headers: dict[str, Any] = {
            "TTL": str(self._settings.ttl),
            "Urgency": "normal",
            "Topic": topic_for(action.action_id),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self.vapid_header(endpoint),
        }
        try:
            async with self._client().post(endpoint, data=body, headers=headers) as response:
                status = response.status
                location = response.headers.get("Location")
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await response.read()
        except TimeoutError:
            return Outcome.failed("timeout", retryable=True)
        except aiohttp.ClientError:
            return Outcome.failed("connect", retryable=True)
        if 200 <= status < 300:
            return Outcome.accepted(provider_id=location)
        reason = f"http_{status}"
        if status in (404, 410):
            return Outcome.rejected(reason)
        if status == 429 or status >= 500:
            return Outcome.failed(reason, retryable=True, retry_after=retry_after)
        return Outcome.failed(reason, retryable=False)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None
