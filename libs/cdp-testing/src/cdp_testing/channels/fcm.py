"""A local Firebase Cloud Messaging HTTP v1 API and the Google OAuth2 token endpoint it trusts.

    async with LocalFcm("shop-app") as fcm:
        key_file = fcm.service_account(tmp_path / "sa.json")   # a key this server will recognise

The token endpoint (``POST /token``, RFC 7523 JWT bearer grant) accepts ``grant_type=
urn:ietf:params:oauth:grant-type:jwt-bearer`` with an ``assertion`` it verifies as Google does: RS256
signed by the service account's key (``kid`` = its private_key_id), ``iss`` the account's email, ``aud``
this endpoint, a ``scope`` including firebase.messaging, ``iat`` not in the future and ``exp`` at most an
hour after it and not past. It answers ``{"access_token", "expires_in", "token_type": "Bearer"}`` or 400
``{"error": "invalid_grant", ...}``.

``POST /v1/projects/{project}/messages:send`` needs a live bearer token for that project (401
UNAUTHENTICATED / 403 PERMISSION_DENIED) and checks the message shape: ``{"message": {...},
"validate_only"?}``, exactly one of token / topic / condition, known fields only, ``data`` a map of
strings without reserved keys (``from``, ``gcm``, ``google.*``) and at most 4096 bytes (400
INVALID_ARGUMENT with a google.rpc.BadRequest naming the field). Tokens in `unregistered` get 404
UNREGISTERED; `fail_next(n, status)` answers 503 UNAVAILABLE or 429 QUOTA_EXCEEDED (with Retry-After).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cdp_testing.channels._http import HttpFake

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MESSAGE_FIELDS = {
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "token",
    "topic",
    "condition",
}
NOTIFICATION_FIELDS = {"title", "body", "image"}
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_FCM_CODE = {404: "UNREGISTERED", 429: "QUOTA_EXCEEDED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass
class Delivered:
    project: str
    message: dict[str, Any]
    name: str


class LocalFcm(HttpFake):
    def __init__(self, project_id: str, *, token_lifetime: int = 3599, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.project_id = project_id
        self.token_lifetime = token_lifetime
        self.delivered: list[Delivered] = []
        self.unregistered: set[str] = set()
        self.tokens_issued = 0
        self.grant_errors: list[str] = []
        self._keys: dict[str, tuple[str, rsa.RSAPublicKey]] = {}  # client_email -> (kid, key)
        self._tokens: dict[str, float] = {}  # access token -> expiry (epoch seconds)
        self._failures: list[tuple[int, str | None]] = []
        self.app.router.add_post("/token", self._token)
        self.app.router.add_post("/v1/projects/{project}/messages:send", self._send)

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def service_account(self, path: Path, *, email: str = "cdp@shop-app.iam.gserviceaccount.com") -> Path:
        """Write a service-account key file this server trusts (call after start: it names the token URI)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = secrets.token_hex(20)
        self._keys[email] = (kid, key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": self.project_id,
                    "private_key_id": kid,
                    "private_key": pem.decode(),
                    "client_email": email,
                    "client_id": "1" * 21,
                    "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                    "token_uri": self.token_uri,
                }
            )
        )
        return path

    def fail_next(self, n: int = 1, *, status: int = 503, retry_after: str | None = None) -> None:
        self._failures.extend([(status, retry_after)] * n)

    def expire_tokens(self) -> None:
        """Every access token issued so far stops working (as after a key rotation)."""
        self._tokens.clear()

    # --- OAuth2 token endpoint ---------------------------------------------------------------------------

    def _grant_error(self, description: str, error: str = "invalid_grant") -> web.Response:
        self.grant_errors.append(description)
        return web.json_response({"error": error, "error_description": description}, status=400)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return self._grant_error("Invalid grant_type", "unsupported_grant_type")
        assertion = str(form.get("assertion", ""))
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64decode(header_b64))
            claims = json.loads(_b64decode(claims_b64))
            signature = _b64decode(signature_b64)
        except ValueError:
            return self._grant_error("Invalid JWT: malformed")
        if header.get("alg") != "RS256":
            return self._grant_error("Invalid JWT: alg must be RS256")
        known = self._keys.get(claims.get("iss", ""))
        if known is None or header.get("kid") != known[0]:
            return self._grant_error("Invalid JWT Signature.")
        try:
            known[1].verify(signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return self._grant_error("Invalid JWT Signature.")
        now = time.time()
        if claims.get("aud") != self.token_uri:
            return self._grant_error("Invalid JWT: aud is not the token endpoint")
        if SCOPE not in str(claims.get("scope", "")).split():
            return self._grant_error("Invalid JWT: scope must include firebase.messaging", "invalid_scope")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or iat > now + 60 or exp <= now or exp - iat > 3600:
            return self._grant_error(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
            )
        token = "ya29.local-" + secrets.token_urlsafe(24)
        self._tokens[token] = now + self.token_lifetime
        self.tokens_issued += 1
        return web.json_response({"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"})

    # --- messages:send -------------------------------------------------------------------------------

    def _error(
        self,
        status: int,
        message: str,
        *,
        fcm: str | None = None,
        field: str | None = None,
        retry_after: str | None = None,
    ) -> web.Response:
        details: list[dict[str, Any]] = []
        if fcm is not None:
            details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm})
        if field is not None:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": field, "description": message}],
                }
            )
        body = {
            "error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN"), "details": details}
        }
        headers = {"Retry-After": retry_after} if retry_after else {}
        return web.json_response(body, status=status, headers=headers)

    def _invalid(self, message: dict[str, Any]) -> tuple[str, str] | None:
        unknown = set(message) - MESSAGE_FIELDS
        if unknown:
            name = sorted(unknown)[0]
            return (
                f"message.{name}",
                f"Invalid JSON payload received. Unknown name \"{name}\" at 'message': Cannot find field.",
            )
        targets = [t for t in ("token", "topic", "condition") if message.get(t)]
        if len(targets) != 1:
            return "message", "Exactly one of token, topic or condition must be given."
        notification = message.get("notification", {})
        if not isinstance(notification, dict) or set(notification) - NOTIFICATION_FIELDS:
            return "message.notification", "Invalid notification: only title, body and image are allowed."
        for name in ("title", "body"):
            if name in notification and not isinstance(notification[name], str):
                return f"message.notification.{name}", f"Invalid value at 'message.notification.{name}' (TYPE_STRING)"
        data = message.get("data", {})
        if not isinstance(data, dict):
            return "message.data", "Invalid value at 'message.data' (Map)"
        for index, (key, value) in enumerate(data.items()):
            if not isinstance(value, str):
                return (
                    f"message.data[{index}].value",
                    f"Invalid value at 'message.data[{index}].value' (TYPE_STRING), {value}",
                )
            if key in ("from", "gcm") or key.startswith("google"):
                return f"message.data[{index}].key", f"Invalid data message key: {key} is reserved"
        if sum(len(k.encode()) + len(v.encode()) for k, v in data.items()) > 4096:
            return "message.data", "Message is too big: data over 4096 bytes"
        return None

    async def _send(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        if self._tokens.get(token, 0) <= time.time():
            return self._error(401, "Request had invalid authentication credentials. Expected OAuth 2 access token.")
        if request.match_info["project"] != self.project_id:
            return self._error(
                403, "Permission 'cloudmessaging.messages.create' denied on resource", fcm="SENDER_ID_MISMATCH"
            )
        if self._failures:
            status, retry_after = self._failures.pop(0)
            return self._error(
                status, "The service is currently unavailable.", fcm=_FCM_CODE.get(status), retry_after=retry_after
            )
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "Invalid JSON payload received.", fcm="INVALID_ARGUMENT")
        if (
            not isinstance(body, dict)
            or set(body) - {"message", "validate_only"}
            or not isinstance(body.get("message"), dict)
        ):
            return self._error(
                400,
                'Invalid JSON payload received: expected {"message": {...}}',
                fcm="INVALID_ARGUMENT",
                field="message",
            )
        message = body["message"]
        problem = self._invalid(message)
        if problem is not None:
            field, text = problem
            return self._error(400, text, fcm="INVALID_ARGUMENT", field=field)
        if message.get("token") in self.unregistered:
            return self._error(404, "Requested entity was not found.", fcm="UNREGISTERED")
        name = f"projects/{self.project_id}/messages/0:{secrets.randbelow(10**16)}"
        if not body.get("validate_only"):
            self.delivered.append(Delivered(self.project_id, message, name))
        return web.json_response({"name": name})
