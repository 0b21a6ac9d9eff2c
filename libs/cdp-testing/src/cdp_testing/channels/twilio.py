"""A local Twilio Messages API (``/2010-04-01/Accounts/{AccountSid}/Messages.json``) and its status callbacks.

It enforces what Twilio documents, with Twilio's error bodies (``{"code", "message", "more_info",
"status"}``): HTTP Basic auth with the account SID and auth token (401, code 20003); `To` required (21604)
and E.164 (21211); `From` or `MessagingServiceSid` (21603) and E.164 `From` (21212); `Body` or `MediaUrl`
(21602) of at most 1600 characters (21617); recipients in `unsubscribed` refused (21610); and 429 (code
20429) when `fail_next_429` is set or more than `messages_per_second` arrive within a second.

The official `twilio` client talks to it unchanged: pass ``http_client=fake.http_client()`` to
``twilio.rest.Client`` - Twilio's documented hook for a custom HTTP client - and its requests to
``https://api.twilio.com`` go here instead.

`advance(sid, "sent", "delivered")` posts the status callbacks Twilio would, form-encoded and signed with
``X-Twilio-Signature`` (HMAC-SHA1 of the URL and the sorted parameters, keyed by the auth token).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
from aiohttp import web

from cdp_testing.channels._http import HttpFake

E164 = re.compile(r"\+[1-9][0-9]{1,14}")
TWILIO_API = "https://api.twilio.com"


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's request signature: base64(HMAC-SHA1(token, url + key1 + value1 + key2 + value2 ...))."""
    payload = url + "".join(key + params[key] for key in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@dataclass
class SentMessage:
    sid: str
    to: str
    sender: str | None
    messaging_service_sid: str | None
    body: str
    status_callback: str | None
    status: str = "queued"
    form: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


class LocalTwilio(HttpFake):
    def __init__(
        self, account_sid: str, auth_token: str, *, clock: Callable[[], float] = time.monotonic, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.clock = clock
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.messages: list[SentMessage] = []
        self.unsubscribed: set[str] = set()
        self.fail_next_429 = 0
        self.messages_per_second: int | None = None
        self.callbacks_answered: list[int] = []
        self._window: list[float] = []
        base = "/2010-04-01/Accounts/{account}"
        self.app.router.add_post(base + "/Messages.json", self._create)
        self.app.router.add_get(base + "/Messages/{sid}.json", self._fetch)

    def http_client(self) -> Any:
        """A `twilio.http.HttpClient` sending the official client's requests here."""
        from twilio.http.http_client import TwilioHttpClient

        local = self.base_url

        class LocalHttpClient(TwilioHttpClient):
            def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
                if url.startswith(TWILIO_API):
                    url = local + url[len(TWILIO_API) :]
                return super().request(method, url, *args, **kwargs)

        return LocalHttpClient()

    # --- the API ---------------------------------------------------------------------------------------

    def _error(self, http_status: int, code: int, message: str) -> web.Response:
        return web.json_response(
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": http_status,
            },
            status=http_status,
        )

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return (
            hmac.compare_digest(user, self.account_sid)
            and hmac.compare_digest(password, self.auth_token)
            and request.match_info["account"] == self.account_sid
        )

    def _rate_limited(self) -> bool:
        if self.fail_next_429 > 0:
            self.fail_next_429 -= 1
            return True
        if self.messages_per_second is None:
            return False
        now = self.clock()
        self._window = [t for t in self._window if now - t < 1.0]
        if len(self._window) >= self.messages_per_second:
            return True
        self._window.append(now)
        return False

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        if self._rate_limited():
            return self._error(429, 20429, "Too Many Requests")
        form = {key: value for key, value in (await request.post()).items() if isinstance(value, str)}
        to, sender, service = form.get("To"), form.get("From"), form.get("MessagingServiceSid")
        body, media = form.get("Body"), form.get("MediaUrl")
        if not to:
            return self._error(400, 21604, "A 'To' phone number is required.")
        if not E164.fullmatch(to):
            return self._error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not sender and not service:
            return self._error(400, 21603, "A 'From' phone number is required.")
        if sender and not E164.fullmatch(sender):
            return self._error(400, 21212, f"Invalid 'From' Phone Number: {sender}")
        if not body and not media:
            return self._error(400, 21602, "Message body is required.")
        if body and len(body) > 1600:
            return self._error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
        if to in self.unsubscribed:
            return self._error(400, 21610, "Attempt to send to unsubscribed recipient")
        message = SentMessage(
            sid="SM" + secrets.token_hex(16),
            to=to,
            sender=sender,
            messaging_service_sid=service,
            body=body or "",
            status_callback=form.get("StatusCallback"),
            form=form,
        )
        self.messages.append(message)
        return web.json_response(self._resource(message), status=201)

    async def _fetch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        for message in self.messages:
            if message.sid == request.match_info["sid"]:
                return web.json_response(self._resource(message))
        return self._error(404, 20404, f"The requested resource {request.path} was not found")

    def _resource(self, message: SentMessage) -> dict[str, Any]:
        created = formatdate(message.created, usegmt=False).replace("-0000", "+0000")
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{message.sid}.json"
        return {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": message.body,
            "date_created": created,
            "date_sent": None,
            "date_updated": created,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": message.sender,
            "messaging_service_sid": message.messaging_service_sid,
            "num_media": "0",
            "num_segments": str(max(1, -(-len(message.body) // 153))),
            "price": None,
            "price_unit": "USD",
            "sid": message.sid,
            "status": message.status,
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": message.to,
            "uri": uri,
        }

    # --- status callbacks ------------------------------------------------------------------------------

    async def advance(self, sid: str, *statuses: str, error_code: str | None = None) -> None:
        """Move message `sid` through `statuses`, posting each to its StatusCallback as Twilio does."""
        message = next(m for m in self.messages if m.sid == sid)
        async with aiohttp.ClientSession() as session:
            for status in statuses:
                message.status = status
                if not message.status_callback:
                    continue
                params = {
                    "AccountSid": self.account_sid,
                    "ApiVersion": "2010-04-01",
                    "From": message.sender or "",
                    "MessageSid": sid,
                    "MessageStatus": status,
                    "SmsSid": sid,
                    "SmsStatus": status,
                    "To": message.to,
                }
                if error_code is not None and status in ("failed", "undelivered"):
                    params["ErrorCode"] = error_code
                headers = {"X-Twilio-Signature": twilio_signature(self.auth_token, message.status_callback, params)}
                async with session.post(message.status_callback, data=params, headers=headers) as response:
                    self.callbacks_answered.append(response.status)
