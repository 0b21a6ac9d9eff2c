"""SMS through a Twilio-compatible Messages API: ``POST {api}/2010-04-01/Accounts/{sid}/Messages.json``,
form-encoded, HTTP Basic auth with the account SID and auth token.

The Messages API has no idempotency key, so the action id travels in the StatusCallback URL
(``…?action_id=<id>``): every delivery report Twilio posts back names the action, and
`outcomes.outcome_from_twilio_callback` turns it into an outcome event once `verify_twilio_signature`
has checked it came from Twilio. Because there is no idempotency key, a timeout after the request was
written is reported as failed/retryable with reason ``timeout``: the caller decides whether the risk
of a second text is worth a retry.

Answers: 201 accepted (provider id = the message SID); Twilio's address errors (21211 invalid number,
21610 unsubscribed, 21612/21408 unreachable region or carrier, 21614 not a mobile) rejected; other 4xx
failed, not retryable; 401/403 failed (fix the credentials); 5xx failed, retryable (honouring
Retry-After when sent); 429 (20429: more than the account's queue takes) is Twilio asking for time
(`Outcome.later`): the dispatcher hands the text back without using one of its attempts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from cdp_orchestration.channels.base import Action, Channel, Outcome, log_fields, parse_retry_after, read_json
from cdp_orchestration.channels.settings import E164, TwilioSettings

log = logging.getLogger("cdp.orchestration.channels.sms")

#: Twilio error codes that mean "this number will not take the message": the address is at fault.
ADDRESS_ERRORS = frozenset({21211, 21408, 21610, 21612, 21614})


def callback_url(base: str, action_id: str) -> str:
    """The StatusCallback URL for one action: the configured URL with ``action_id`` added to its query."""
    parts = urlsplit(base)
    query = [*parse_qsl(parts.query, keep_blank_values=True), ("action_id", action_id)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def verify_twilio_signature(auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
    """True when `signature` (the X-Twilio-Signature header) signs this callback: base64 HMAC-SHA1 of the
    full URL followed by each POST parameter's name and value in name order."""
    payload = url + "".join(key + params[key] for key in sorted(params))
    expected = base64.b64encode(hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()).decode()
    return hmac.compare_digest(expected, signature)


class SmsChannel(Channel):
    name = "sms"

    def __init__(self, settings: TwilioSettings, *, session: aiohttp.ClientSession | None = None) -> None:
        self._settings = settings
        self._session = session
        self._owns_session = session is None
        self._url = f"{settings.api_url.rstrip('/')}/2010-04-01/Accounts/{settings.account_sid}/Messages.json"
        # Per request, not on the session: a session the service shares between channels carries no auth.
        self._auth = {"Authorization": aiohttp.encode_basic_auth(settings.account_sid, settings.auth_token)}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._settings.timeout))
        return self._session

    def form(self, action: Action) -> dict[str, str]:
        s = self._settings
        form = {"To": action.address, "Body": action.content.body}
        if s.sender is not None:
            form["From"] = s.sender
        else:
            form["MessagingServiceSid"] = s.messaging_service_sid or ""
        if s.status_callback_url:
            form["StatusCallback"] = callback_url(s.status_callback_url, action.action_id)
        return form

    async def send(self, action: Action) -> Outcome:
        if not E164.fullmatch(action.address):
            outcome = Outcome.rejected("invalid_address")
        elif not action.content.body:
            outcome = Outcome.failed("empty_body", retryable=False)
        else:
            outcome = await self._post(action)
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "sms %s", outcome.status, extra=log_fields(action, reason=outcome.reason))
        return outcome

    async def _post(self, action: Action) -> Outcome:
        try:
            async with self._client().post(self._url, data=self.form(action), headers=self._auth) as response:
                body = await read_json(response)
                if 200 <= response.status < 300:
                    return Outcome.accepted(provider_id=body.get("sid"))
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                code = body.get("code") if isinstance(body.get("code"), int) else None
        except TimeoutError:
            return Outcome.failed("timeout", retryable=True)
        except aiohttp.ClientError:
            return Outcome.failed("connect", retryable=True)
        status = response.status
        reason = f"twilio_{code}" if code is not None else f"http_{status}"
        if status == 429:
            return Outcome.later(reason, retry_after=retry_after)
        if status >= 500:
            return Outcome.failed(reason, retryable=True, retry_after=retry_after)
        if code in ADDRESS_ERRORS:
            return Outcome.rejected(reason)
        return Outcome.failed(reason, retryable=False)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            # Let aiohttp's connector finish closing its transports before the loop moves on.
            await asyncio.sleep(0)
        self._session = None
