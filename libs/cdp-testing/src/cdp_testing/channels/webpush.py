"""A local Web Push service: RFC 8030 delivery, RFC 8292 VAPID checks, RFC 8291 decryption.

    async with LocalPushService() as push:
        subscription = push.subscribe(application_server_key=vapid_public_bytes)   # what a browser hands out
        ...send to subscription["endpoint"]...
        (message,) = push.pending(subscription)       # decrypted with the subscription's own keys

It plays both the push service and the browser: `subscribe` creates the P-256 key pair and 16-byte auth
secret a user agent would and returns the ``PushSubscription`` JSON (``endpoint``, ``keys.p256dh``,
``keys.auth``). A ``POST`` to the endpoint must carry a ``TTL`` header (else 400), ``Content-Encoding:
aes128gcm`` and a body of at most 4096 octets (413) that decrypts with the subscription's keys (400), and
``Authorization: vapid t=<JWT>, k=<key>``: absent 401; a JWT that is not ES256-signed by `k`, whose
``aud`` is not this service's origin, whose ``exp`` is past or more than 24 hours ahead, or without a
``sub``, 403; a subscription made with an application server key accepts only that `k` (403).
`unsubscribe` makes the endpoint answer 410 Gone. Messages with a ``Topic`` replace an undelivered message
with the same topic, as RFC 8030 §5.4 says. `fail_next(n, status, retry_after)` answers 429 or 5xx.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import http_ece
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cdp_testing.channels._http import HttpFake

MAX_BODY = 4096


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class PushMessage:
    payload: bytes
    ttl: int
    topic: str | None
    urgency: str | None
    vapid_subject: str

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class _Subscription:
    ua_key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: bytes | None
    active: bool = True
    messages: list[PushMessage] = field(default_factory=list)


class LocalPushService(HttpFake):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._subscriptions: dict[str, _Subscription] = {}
        self._failures: list[tuple[int, str | None]] = []
        self.refusals: list[tuple[int, str]] = []
        self.app.router.add_post("/push/{id}", self._push)

    def subscribe(self, *, application_server_key: bytes | None = None) -> dict[str, Any]:
        sub_id = secrets.token_urlsafe(16)
        subscription = _Subscription(ec.generate_private_key(ec.SECP256R1()), os.urandom(16), application_server_key)
        self._subscriptions[sub_id] = subscription
        public = subscription.ua_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "endpoint": f"{self.base_url}/push/{sub_id}",
            "expirationTime": None,
            "keys": {"p256dh": _b64encode(public), "auth": _b64encode(subscription.auth)},
        }

    def _find(self, subscription: dict[str, Any]) -> _Subscription:
        return self._subscriptions[subscription["endpoint"].rsplit("/", 1)[1]]

    def unsubscribe(self, subscription: dict[str, Any]) -> None:
        self._find(subscription).active = False

    def pending(self, subscription: dict[str, Any]) -> list[PushMessage]:
        return self._find(subscription).messages

    def fail_next(self, n: int = 1, *, status: int = 503, retry_after: str | None = None) -> None:
        self._failures.extend([(status, retry_after)] * n)

    def _refuse(self, status: int, reason: str) -> web.Response:
        self.refusals.append((status, reason))
        return web.Response(status=status, text=reason)

    def _vapid(self, header: str, subscription: _Subscription) -> tuple[str | None, web.Response | None]:
        """The JWT's subject, or the refusal (RFC 8292 §4: 401 without credentials, 403 when invalid)."""
        if not header.lower().startswith("vapid "):
            return None, self._refuse(401, "vapid authentication required")
        params = dict(part.strip().split("=", 1) for part in header[6:].split(",") if "=" in part)
        token, key = params.get("t", ""), params.get("k", "")
        try:
            public_bytes = _b64decode(key)
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_bytes)
            header_b64, claims_b64, signature_b64 = token.split(".")
            jwt_header = json.loads(_b64decode(header_b64))
            claims = json.loads(_b64decode(claims_b64))
            signature = _b64decode(signature_b64)
        except ValueError:
            return None, self._refuse(403, "malformed vapid credentials")
        if jwt_header.get("alg") != "ES256" or len(signature) != 64:
            return None, self._refuse(403, "vapid JWT must be ES256")
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        try:
            public.verify(der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return None, self._refuse(403, "vapid signature does not verify")
        now = time.time()
        if claims.get("aud") != self.base_url:
            return None, self._refuse(403, "vapid aud is not this push service's origin")
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= now or exp > now + 24 * 3600:
            return None, self._refuse(403, "vapid exp must be in the future and within 24 hours")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.startswith(("mailto:", "https:")):
            return None, self._refuse(403, "vapid sub must be a mailto: or https: URI")
        if subscription.application_server_key is not None and public_bytes != subscription.application_server_key:
            return None, self._refuse(403, "the subscription is restricted to another application server key")
        return subject, None

    async def _push(self, request: web.Request) -> web.Response:
        subscription = self._subscriptions.get(request.match_info["id"])
        if subscription is None:
            return self._refuse(404, "no such subscription")
        if not subscription.active:
            return self._refuse(410, "subscription expired")
        if self._failures:
            status, retry_after = self._failures.pop(0)
            return web.Response(status=status, headers={"Retry-After": retry_after} if retry_after else {})
        subject, refusal = self._vapid(request.headers.get("Authorization", ""), subscription)
        if refusal is not None:
            return refusal
        ttl = request.headers.get("TTL", "")
        if not ttl.isdigit():
            return self._refuse(400, "TTL header required")
        if request.headers.get("Content-Encoding", "").lower() != "aes128gcm":
            return self._refuse(415, "Content-Encoding must be aes128gcm")
        body = await request.read()
        if len(body) > MAX_BODY:
            return self._refuse(413, "payload too large")
        try:
            payload = http_ece.decrypt(
                body, private_key=subscription.ua_key, auth_secret=subscription.auth, version="aes128gcm"
            )
        except Exception:  # any decryption failure is the sender's fault: refuse the message
            return self._refuse(400, "payload does not decrypt with the subscription keys")
        topic = request.headers.get("Topic")
        if topic is not None:
            subscription.messages = [m for m in subscription.messages if m.topic != topic]
        subscription.messages.append(
            PushMessage(payload, int(ttl), topic, request.headers.get("Urgency"), subject or "")
        )
        return web.Response(status=201, headers={"Location": f"{self.base_url}/message/{secrets.token_urlsafe(12)}"})
