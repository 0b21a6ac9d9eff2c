"""Channel adapters: one interface (`base.Channel.send(action) -> Outcome`), one module per channel.

| channel (`actions.<channel>`) | module       | provider protocol                                      | idempotency handle          |
|-------------------------------|--------------|--------------------------------------------------------|-----------------------------|
| ``email``                     | `email`      | SMTP (STARTTLS / implicit TLS, AUTH as configured)     | Message-ID                  |
| ``sms``                       | `sms`        | Twilio Messages API (form-encoded, Basic auth)         | none; action id in the StatusCallback URL |
| ``push``                      | `push`       | FCM HTTP v1, OAuth2 service-account JWT                | ``data.action_id`` for the app |
| ``webpush``                   | `webpush`    | Web Push: RFC 8030 / 8291 (aes128gcm) / 8292 (VAPID)   | ``Topic`` header            |
| ``webhook``                   | `webhook`    | HTTPS POST, HMAC-SHA256 signed, Slack-compatible option | ``Idempotency-Key`` header |
| ``inapp``                     | `inapp`      | an inbox per person on the store, live subscriptions  | the inbox key (unique action id) |
| ``crm``                       | `crm`        | an `ActionMessage` on ``actions.crm`` for the CRM connector | ``Nats-Msg-Id``        |

Provider settings come from the environment (`settings`); a provider is enabled when its key variable
is set, and `open_channels` builds the enabled ones. `wire` converts the ``actions.<channel>`` payload
(`cdp.orchestration.v1.ActionMessage`) to an `Action`. Every adapter is tested against a local server
speaking the provider's protocol (`cdp_testing.channels`).

Outcome events (`outcomes`) go back in through the collector as Segment ``track`` calls with the action
id, ``messageId`` ``outcome:<action id>:<outcome>`` (so a repeated callback lands once) and the properties
``action_id``, ``channel``, ``person_id``, ``reason`` (when there is one), ``provider_id`` (when the provider
gave one) and what the journey attached (journey id, node id, category):

| event                 | when                                                                           |
|-----------------------|--------------------------------------------------------------------------------|
| ``Message Sent``      | the provider accepted the message (SMTP 250, Twilio 201 / ``sent``, FCM 200, push service 201, webhook 2xx, inbox stored, CRM message published) |
| ``Message Delivered`` | the provider confirmed delivery (Twilio ``delivered``)                         |
| ``Message Bounced``   | the address refused it for good (SMTP 5xx on the recipient, an RFC 3464 bounce, Twilio ``undelivered`` or 21211/21610/…, FCM UNREGISTERED, push 404/410, webhook 404/410) |
| ``Message Failed``    | it could not be sent and will not be retried (bad credentials, a message the provider refuses, retries exhausted, Twilio ``failed``) |
| ``Message Opened``    | the person opened it (Twilio ``read``, an in-app message marked read; opens recorded by the app or a tracking pixel) |
| ``Message Clicked``   | the person followed its link (one event per link: ``occurrence``)              |
| ``Message Converted`` | the journey's goal was reached after it                                        |

Logs from this package name the action id, the channel and a reason code; never an address, a phone
number, a token or the content.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from cdp_kit.settings import SettingsError, load_settings
from cdp_orchestration.channels.base import Action, Channel, Content, Outcome
from cdp_orchestration.channels.settings import PROVIDERS

__all__ = ["Action", "Channel", "Content", "Outcome", "configured", "open_channels"]


def configured(environ: Mapping[str, str]) -> dict[str, object]:
    """Settings of every provider whose key variable is set, by provider. Raises one SettingsError
    listing every missing or invalid variable of every enabled provider."""
    found: dict[str, object] = {}
    problems: list[str] = []
    for provider, (cls, key) in PROVIDERS.items():
        if not environ.get(key, "").strip():
            continue
        try:
            found[provider] = load_settings(cls, environ)
        except SettingsError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SettingsError(problems)
    return found


def open_channels(
    environ: Mapping[str, str],
    *,
    store: object | None = None,
    publish_crm: Callable[..., Awaitable[object]] | None = None,
) -> dict[str, Channel]:
    """The adapters for every configured provider, by channel name, plus in-app when a store is given
    and CRM when a publish function is. Close each when done."""
    from cdp_orchestration.channels.crm import CrmChannel
    from cdp_orchestration.channels.email import EmailChannel
    from cdp_orchestration.channels.inapp import InboxChannel
    from cdp_orchestration.channels.push import FcmChannel
    from cdp_orchestration.channels.sms import SmsChannel
    from cdp_orchestration.channels.webhook import WebhookChannel
    from cdp_orchestration.channels.webpush import WebPushChannel

    builders = {
        "email": EmailChannel,
        "sms": SmsChannel,
        "fcm": FcmChannel,
        "webpush": WebPushChannel,
        "webhook": WebhookChannel,
    }
    channels: dict[str, Channel] = {}
    for provider, settings in configured(environ).items():
        channel = builders[provider](settings)  # type: ignore[arg-type]
        channels[channel.name] = channel
    if store is not None:
        channels["inapp"] = InboxChannel(store)  # type: ignore[arg-type]
    if publish_crm is not None:
        channels["crm"] = CrmChannel(publish_crm)
    return channels
