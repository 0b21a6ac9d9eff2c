"""HubSpot's v3 webhook request signature."""

from __future__ import annotations

import base64
import hashlib
import hmac


def webhook_signature_v3(secret: str, method: str, url: str, body: bytes, timestamp: str) -> str:
    """HubSpot's v3 request signature: base64(HMAC-SHA256(secret, method + uri + body + timestamp))."""
    message = method.encode() + url.encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()
