"""Provider settings, one frozen dataclass per provider, read from the environment by `load_settings`.

A channel is enabled when its key variable is set (`cdp_orchestration.channels.configured` reads them): CDP_SMTP_HOST for
email, CDP_TWILIO_ACCOUNT_SID for SMS, CDP_FCM_CREDENTIALS_FILE for FCM, CDP_VAPID_PRIVATE_KEY_FILE for Web
Push, CDP_WEBHOOK_SECRET for webhooks. Once enabled, every other required variable of that provider must be
there and valid, and a problem names the variable (secrets are never echoed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from cdp_kit.settings import env

_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def _http_url(name: str, value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{name}={value!r} is invalid: expected an http(s) URL such as https://host/path"
    return None


def _positive(name: str, value: float) -> str | None:
    return None if value > 0 else f"{name}={value} is invalid: must be positive"


def _readable(name: str, path: Path) -> str | None:
    return None if path.is_file() else f"{name}={str(path)!r} is not a readable file"


@dataclass(frozen=True, kw_only=True)
class SmtpSettings:
    host: str = env("CDP_SMTP_HOST", help="SMTP relay host (setting it enables the email channel)")
    port: int = env("CDP_SMTP_PORT", 587, help="SMTP port (587 submission with STARTTLS, 465 implicit TLS, 25)")
    security: Literal["starttls", "tls", "none"] = env(
        "CDP_SMTP_SECURITY", "starttls", help="starttls, tls (implicit, port 465) or none (local test servers only)"
    )
    username: str | None = env("CDP_SMTP_USERNAME", None, help="SMTP AUTH user (unset: no AUTH)")
    password: str | None = env("CDP_SMTP_PASSWORD", None, help="SMTP AUTH password", secret=True)
    sender: str = env("CDP_SMTP_FROM", help="From address of every email, e.g. 'Shop <hello@shop.example>'")
    message_id_domain: str = env(
        "CDP_SMTP_MESSAGE_ID_DOMAIN", "cdp.local", help="right-hand side of Message-ID <action-id@domain>"
    )
    ca_file: Path | None = env("CDP_SMTP_CA_FILE", None, help="CA bundle to verify the server (unset: system CAs)")
    connect_timeout: float = env(
        "CDP_SMTP_CONNECT_TIMEOUT",
        10.0,
        help="seconds for connecting and the server's greeting (a relay that accepts and says nothing: reason timeout)",
    )
    timeout: float = env("CDP_SMTP_TIMEOUT", 30.0, help="seconds for each SMTP command after the greeting")

    def validate(self) -> list[str]:
        problems = [
            p
            for p in (
                _positive("CDP_SMTP_CONNECT_TIMEOUT", self.connect_timeout),
                _positive("CDP_SMTP_TIMEOUT", self.timeout),
            )
            if p
        ]
        if (self.username is None) != (self.password is None):
            problems.append("CDP_SMTP_USERNAME and CDP_SMTP_PASSWORD must be set together")
        if self.username is not None and self.security == "none":
            problems.append(
                "CDP_SMTP_USERNAME with CDP_SMTP_SECURITY=none would send the password in clear text; "
                "use starttls or tls"
            )
        if not 0 < self.port < 65536:
            problems.append(f"CDP_SMTP_PORT={self.port} is invalid: must be 1-65535")
        if "@" not in self.sender:
            problems.append(f"CDP_SMTP_FROM={self.sender!r} is invalid: expected an address such as hello@shop.example")
        if self.ca_file is not None and (p := _readable("CDP_SMTP_CA_FILE", self.ca_file)):
            problems.append(p)
        return problems


@dataclass(frozen=True, kw_only=True)
class TwilioSettings:
    account_sid: str = env("CDP_TWILIO_ACCOUNT_SID", help="Account SID, AC… (setting it enables the SMS channel)")
    auth_token: str = env("CDP_TWILIO_AUTH_TOKEN", help="Auth token (also verifies status callbacks)", secret=True)
    sender: str | None = env("CDP_TWILIO_FROM", None, help="E.164 sender number (or set the messaging service)")
    messaging_service_sid: str | None = env(
        "CDP_TWILIO_MESSAGING_SERVICE_SID", None, help="MG… messaging service (instead of CDP_TWILIO_FROM)"
    )
    api_url: str = env("CDP_TWILIO_API_URL", "https://api.twilio.com", help="API base URL (a local server in tests)")
    status_callback_url: str | None = env(
        "CDP_TWILIO_STATUS_CALLBACK_URL", None, help="public URL Twilio posts delivery status to (unset: none)"
    )
    timeout: float = env("CDP_TWILIO_TIMEOUT", 10.0, help="seconds per API request")

    def validate(self) -> list[str]:
        problems = []
        if not _ACCOUNT_SID.fullmatch(self.account_sid):
            problems.append(f"CDP_TWILIO_ACCOUNT_SID={self.account_sid!r} is invalid: expected AC and 32 hex digits")
        if not self.auth_token:
            problems.append("CDP_TWILIO_AUTH_TOKEN is empty")
        if (self.sender is None) == (self.messaging_service_sid is None):
            problems.append("set exactly one of CDP_TWILIO_FROM and CDP_TWILIO_MESSAGING_SERVICE_SID")
        if self.sender is not None and not E164.fullmatch(self.sender):
            problems.append(f"CDP_TWILIO_FROM={self.sender!r} is invalid: expected E.164, e.g. +14155550100")
        if self.messaging_service_sid is not None and not _SERVICE_SID.fullmatch(self.messaging_service_sid):
            problems.append(
                f"CDP_TWILIO_MESSAGING_SERVICE_SID={self.messaging_service_sid!r} is invalid: expected MG and 32 hex digits"
            )
        for name, url in (
            ("CDP_TWILIO_API_URL", self.api_url),
            ("CDP_TWILIO_STATUS_CALLBACK_URL", self.status_callback_url),
        ):
            if url is not None and (p := _http_url(name, url)):
                problems.append(p)
        if p := _positive("CDP_TWILIO_TIMEOUT", self.timeout):
            problems.append(p)
        return problems


@dataclass(frozen=True, kw_only=True)
class FcmSettings:
    credentials_file: Path = env(
        "CDP_FCM_CREDENTIALS_FILE",
        help="Google service-account JSON key with the firebase.messaging scope (setting it enables FCM push)",
    )
    project_id: str | None = env("CDP_FCM_PROJECT_ID", None, help="Firebase project (unset: the key's project_id)")
    api_url: str = env("CDP_FCM_API_URL", "https://fcm.googleapis.com", help="FCM base URL (a local server in tests)")
    timeout: float = env("CDP_FCM_TIMEOUT", 10.0, help="seconds per request")

    def validate(self) -> list[str]:
        problems = [p for p in (_readable("CDP_FCM_CREDENTIALS_FILE", self.credentials_file),) if p]
        if p := _http_url("CDP_FCM_API_URL", self.api_url):
            problems.append(p)
        if p := _positive("CDP_FCM_TIMEOUT", self.timeout):
            problems.append(p)
        return problems


@dataclass(frozen=True, kw_only=True)
class WebPushSettings:
    vapid_private_key_file: Path = env(
        "CDP_VAPID_PRIVATE_KEY_FILE",
        help="PEM P-256 private key whose public half the web app subscribed with (enables Web Push)",
    )
    vapid_subject: str = env(
        "CDP_VAPID_SUBJECT", help="contact for push services: mailto:ops@shop.example or https://…"
    )
    ttl: int = env("CDP_WEBPUSH_TTL", 86400, help="seconds a push service keeps an undelivered message")
    timeout: float = env("CDP_WEBPUSH_TIMEOUT", 10.0, help="seconds per request")
    allowed_hosts: list[str] = env(
        "CDP_WEBPUSH_ALLOWED_HOSTS",
        [],
        help="comma-separated hosts a push endpoint may name although they are, or resolve to, loopback, "
        "private or other non-public addresses (a relay on the cluster network, localhost in development); "
        "endpoints come from profiles, and any other must be public. Public hosts are not limited: the "
        "browser picks its push service",
    )

    def validate(self) -> list[str]:
        problems = [p for p in (_readable("CDP_VAPID_PRIVATE_KEY_FILE", self.vapid_private_key_file),) if p]
        if not self.vapid_subject.startswith(("mailto:", "https://")):
            problems.append(f"CDP_VAPID_SUBJECT={self.vapid_subject!r} is invalid: expected mailto:… or https://…")
        if self.ttl < 0:
            problems.append(f"CDP_WEBPUSH_TTL={self.ttl} is invalid: must be 0 or more seconds")
        if p := _positive("CDP_WEBPUSH_TIMEOUT", self.timeout):
            problems.append(p)
        return problems


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    secret: str = env(
        "CDP_WEBHOOK_SECRET", help="HMAC-SHA256 signing secret (setting it enables webhooks)", secret=True
    )
    default_url: str | None = env("CDP_WEBHOOK_URL", None, help="URL for actions that name none")
    payload: Literal["json", "slack"] = env(
        "CDP_WEBHOOK_PAYLOAD", "json", help="json: the action as JSON; slack: a Slack incoming-webhook message"
    )
    allowed_hosts: list[str] = env(
        "CDP_WEBHOOK_ALLOWED_HOSTS",
        [],
        help="comma-separated hosts webhook URLs may name. A URL from a profile trait (webhook_url) may name "
        "only a listed host: empty, every such URL is refused and only CDP_WEBHOOK_URL is called (it may "
        "name any public host). A listed host may be private or loopback: only listed hosts may resolve to "
        "such addresses",
    )
    max_attempts: int = env("CDP_WEBHOOK_MAX_ATTEMPTS", 5, help="attempts per action before it fails (retryable)")
    backoff_base: float = env("CDP_WEBHOOK_BACKOFF_BASE", 0.5, help="seconds before the 2nd attempt; doubles after")
    backoff_max: float = env("CDP_WEBHOOK_BACKOFF_MAX", 30.0, help="cap on one wait, Retry-After included")
    timeout: float = env("CDP_WEBHOOK_TIMEOUT", 10.0, help="seconds per attempt")

    def validate(self) -> list[str]:
        problems = []
        if len(self.secret) < 16:
            problems.append("CDP_WEBHOOK_SECRET is too short: use at least 16 characters")
        if self.default_url is not None and (p := _http_url("CDP_WEBHOOK_URL", self.default_url)):
            problems.append(p)
        if self.max_attempts < 1:
            problems.append(f"CDP_WEBHOOK_MAX_ATTEMPTS={self.max_attempts} is invalid: must be at least 1")
        for name, value in (
            ("CDP_WEBHOOK_BACKOFF_BASE", self.backoff_base),
            ("CDP_WEBHOOK_BACKOFF_MAX", self.backoff_max),
            ("CDP_WEBHOOK_TIMEOUT", self.timeout),
        ):
            if p := _positive(name, value):
                problems.append(p)
        return problems


#: provider -> (its settings class, the variable whose presence enables it)
PROVIDERS: dict[str, tuple[type, str]] = {
    "email": (SmtpSettings, "CDP_SMTP_HOST"),
    "sms": (TwilioSettings, "CDP_TWILIO_ACCOUNT_SID"),
    "fcm": (FcmSettings, "CDP_FCM_CREDENTIALS_FILE"),
    "webpush": (WebPushSettings, "CDP_VAPID_PRIVATE_KEY_FILE"),
    "webhook": (WebhookSettings, "CDP_WEBHOOK_SECRET"),
}
