"""Salesforce's OAuth 2.0 token endpoint: client credentials and the JWT bearer flow.

The JWT bearer assertion must be RS256-signed by the key whose public half (PEM key or certificate) was
configured for the connected app, with ``iss`` = the consumer key, ``sub`` = a known username, ``aud`` =
the login URL (https://login.salesforce.com, https://test.salesforce.com or this emulator's base URL) and
``exp`` in the future. Failures answer 400 ``invalid_grant`` / ``invalid_client`` as Salesforce does.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


class GrantError(ValueError):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def load_public_key(pem: bytes | str) -> rsa.RSAPublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    if b"CERTIFICATE" in data:
        key = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the connected app's JWT key must be RSA")
    return key


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_assertion(
    assertion: str,
    *,
    key: rsa.RSAPublicKey | None,
    consumer_key: str,
    usernames: set[str] | None,
    audiences: set[str],
    now: float,
) -> dict[str, Any]:
    """The verified claims, or GrantError."""
    if key is None:
        raise GrantError("invalid_client", "no certificate is configured for this connected app")
    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = orjson.loads(_b64(header_b64))
        claims = orjson.loads(_b64(payload_b64))
        signature = _b64(signature_b64)
    except (ValueError, orjson.JSONDecodeError):
        raise GrantError("invalid_grant", "invalid assertion") from None
    if header.get("alg") != "RS256":
        raise GrantError("invalid_grant", "invalid assertion: alg must be RS256")
    try:
        key.verify(signature, f"{header_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise GrantError("invalid_grant", "invalid assertion: signature") from None
    if claims.get("iss") != consumer_key:
        raise GrantError("invalid_client_id", "client identifier invalid")
    if claims.get("aud") not in audiences:
        raise GrantError("invalid_grant", "audience is invalid")
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] < now:
        raise GrantError("invalid_grant", "expired authorization code")
    if usernames is not None and claims.get("sub") not in usernames:
        raise GrantError("invalid_grant", "user hasn't approved this consumer")
    return claims
