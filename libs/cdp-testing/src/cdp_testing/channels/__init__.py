"""Local servers that speak each channel provider's documented protocol, for tests and `make up`.

- `smtp.LocalSmtpServer`: SMTP (aiosmtpd) with a readable mailbox, optional AUTH/STARTTLS, maildir/mbox;
- `twilio.LocalTwilio`: Twilio's Messages API (the official `twilio` client talks to it unchanged through
  `LocalTwilio.http_client()`), with status callbacks signed like Twilio's;
- `fcm.LocalFcm`: FCM HTTP v1 and Google's OAuth2 token endpoint (service-account JWTs verified);
- `webpush.LocalPushService`: a Web Push service (RFC 8030) that checks VAPID (RFC 8292) and decrypts
  (RFC 8291) with the subscription's keys;
- `webhook.LocalWebhookReceiver`: verifies the HMAC signature, can fail on demand, Slack-compatible mode.

Each binds 127.0.0.1 on a free port, is an async context manager, and records what it accepted.
`python -m cdp_testing.channels` runs them all for `make up`; `logs` makes its log (and the CRM
emulators') JSON lines that name routes and statuses, never what a request carried.
"""
