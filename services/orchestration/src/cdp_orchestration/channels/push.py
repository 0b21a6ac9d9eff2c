"""Mobile push through Firebase Cloud Messaging HTTP v1.

Auth is OAuth2 with a service account (RFC 7523): a JWT ``{iss: client_email, scope: firebase.messaging,
aud: token_uri, iat, exp: iat + 1h}`` signed RS256 with the account's private key (header ``kid`` = its
private_key_id) is exchanged at the key's ``token_uri`` for a bearer token. The token is cached until a
minute before it expires and fetched by one request at a time however many sends wait for it; a 401 from
FCM drops it and the send is tried once more with a fresh one.

Each send is ``POST {api}/v1/projects/{project}/messages:send`` with ``{"message": {"token", "notification":
{"title", "body"}, "data"}}``. FCM has no idempotency key, so ``data.action_id`` carries the action id
and the app drops a notification it has already shown; ``data.url`` carries the click-through link.

Answers: 200 accepted (provider id = the message name); UNREGISTERED (404) and SENDER_ID_MISMATCH (403)
rejected (the token is dead or belongs to another app: forget it); QUOTA_EXCEEDED (429) is FCM asking
for time (`Outcome.later`: handed back without using an attempt); UNAVAILABLE (503) and INTERNAL (500)
failed, retryable, honouring Retry-After; INVALID_ARGUMENT and auth errors failed, not retryable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cdp_kit.settings import SettingsError
from cdp_orchestration.channels.base import Action, Channel, Outcome, log_fields, parse_retry_after, read_json
from cdp_orchestration.channels.settings import FcmSettings

log = logging.getLogger("cdp.orchestration.channels.push")

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_REFRESH_MARGIN = 60.0
_REJECTING = {"UNREGISTERED", "SENDER_ID_MISMATCH"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key_id: str
    private_key: rsa.RSAPrivateKey
    token_uri: str
    project_id: str

    @classmethod
    def load(cls, path: Path) -> ServiceAccount:
        """Read a Google service-account JSON key; problems name CDP_FCM_CREDENTIALS_FILE and the field
        (never the key material)."""
        where = f"CDP_FCM_CREDENTIALS_FILE={str(path)!r}"
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SettingsError([f"{where} is not a readable JSON key file ({type(exc).__name__})"]) from None
        if not isinstance(info, dict):
            raise SettingsError([f"{where} is not a service-account key: expected a JSON object"])
        missing = [f for f in ("client_email", "private_key_id", "private_key", "token_uri") if not info.get(f)]
        if info.get("type") != "service_account":
            missing.insert(0, "type (must be service_account)")
        if missing:
            raise SettingsError([f"{where} lacks {', '.join(missing)}"])
        try:
            key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        except (ValueError, TypeError):
            raise SettingsError([f"{where}: private_key is not a PEM private key"]) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SettingsError([f"{where}: private_key must be an RSA key"])
        return cls(info["client_email"], info["private_key_id"], key, info["token_uri"], info.get("project_id", ""))

    def assertion(self, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        header = {"alg": "RS256", "typ": "JWT", "kid": self.private_key_id}
        claims = {"iss": self.client_email, "scope": SCOPE, "aud": self.token_uri, "iat": issued, "exp": issued + 3600}
        signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
        signature = self.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"


class AccessTokens:
    """A cached OAuth2 access token for a service account, refreshed a minute before it expires."""

    def __init__(self, account: ServiceAccount) -> None:
        self._account = account
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self, session: aiohttp.ClientSession) -> str:
        async with self._lock:
            if self._token is None or time.time() >= self._expires_at - _REFRESH_MARGIN:
                form = {"grant_type": JWT_BEARER, "assertion": self._account.assertion()}
                async with session.post(self._account.token_uri, data=form) as response:
                    body = await read_json(response)
                    if response.status != 200 or not isinstance(body.get("access_token"), str):
                        raise TokenRefused(str(body.get("error", f"http_{response.status}")), response.status)
                self._token = body["access_token"]
                self._expires_at = time.time() + float(body.get("expires_in", 3600))
            return self._token

    def drop(self) -> None:
        self._token = None


class TokenRefused(Exception):
    def __init__(self, error: str, status: int) -> None:
        super().__init__(error)
        self.error = error
        self.status = status


class FcmChannel(Channel):
    name = "push"

    def __init__(self, settings: FcmSettings, *, session: aiohttp.ClientSession | None = None) -> None:
        self._settings = settings
        self._account = ServiceAccount.load(settings.credentials_file)
        project = settings.project_id or self._account.project_id
        if not project:
            raise SettingsError(["CDP_FCM_PROJECT_ID is required: the key file names no project_id"])
        self._url = f"{settings.api_url.rstrip('/')}/v1/projects/{project}/messages:send"
        self._tokens = AccessTokens(self._account)
        self._session = session
        self._owns_session = session is None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._settings.timeout))
        return self._session

    def message(self, action: Action) -> dict[str, Any]:
        content = action.content
        data = {**content.data, "action_id": action.action_id}
        if content.url:
            data["url"] = content.url
        message: dict[str, Any] = {"token": action.address, "data": data}
        notification = {k: v for k, v in (("title", content.heading), ("body", content.body)) if v}
        if notification:
            message["notification"] = notification
        return {"message": message}

    async def send(self, action: Action) -> Outcome:
        if not action.address or any(c.isspace() for c in action.address):
            outcome = Outcome.rejected("invalid_address")
        else:
            try:
                outcome = await self._post(action, retry_auth=True)
            except TokenRefused as exc:
                outcome = Outcome.failed(f"oauth_{exc.error}", retryable=exc.status >= 500 or exc.status == 429)
            except TimeoutError:
                outcome = Outcome.failed("timeout", retryable=True)
            except aiohttp.ClientError:
                outcome = Outcome.failed("connect", retryable=True)
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "push %s", outcome.status, extra=log_fields(action, reason=outcome.reason))
        return outcome

    async def _post(self, action: Action, *, retry_auth: bool) -> Outcome:
        session = self._client()
        token = await self._tokens.get(session)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        async with session.post(self._url, data=orjson.dumps(self.message(action)), headers=headers) as response:
            body = await read_json(response)
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 200:
            return Outcome.accepted(provider_id=body.get("name"))
        if status == 401 and retry_auth:
            self._tokens.drop()
            return await self._post(action, retry_auth=False)
        code = _fcm_error_code(body) or f"http_{status}"
        if code in _REJECTING:
            return Outcome.rejected(code)
        if status == 429:
            return Outcome.later(code, retry_after=retry_after)
        if status >= 500:
            return Outcome.failed(code, retryable=True, retry_after=retry_after)
        return Outcome.failed(code, retryable=False)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None


def _fcm_error_code(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("@type", "").endswith("google.firebase.fcm.v1.FcmError"):
            return str(detail.get("errorCode"))
    return str(error.get("status")) if error.get("status") else None
