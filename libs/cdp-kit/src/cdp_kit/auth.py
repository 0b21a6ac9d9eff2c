"""Caller authentication: bearer tokens with scopes.

The tokens file (CDP_AUTH_TOKENS_FILE, mounted from a Kubernetes Secret) holds only SHA-256 digests of
tokens, never the tokens themselves:

    {"tokens": [{"name": "crm-sync", "sha256": "<hex digest>", "scopes": ["collector:write", "profile:read"]}]}

A scope is `<service>:<verb>` (e.g. `profile:read`); `<service>:*` grants every verb of one service and
`*` grants everything. The file is re-read when it changes, so a rotated Secret takes effect without a
restart.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from cdp_kit.errors import PermissionDenied, Unauthenticated
from cdp_kit.watched import WatchedJsonFile


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        if "*" in self.scopes or scope in self.scopes:
            return True
        service, _, _verb = scope.partition(":")
        return f"{service}:*" in self.scopes


ANONYMOUS = Caller("anonymous", frozenset({"*"}))


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "cdp_" + secrets.token_urlsafe(32)


def write_tokens_file(path: Path, entries: list[tuple[str, str, list[str]]]) -> None:
    """Write a tokens file from (name, plaintext token, scopes); only digests are stored."""
    document = {"tokens": [{"name": n, "sha256": token_digest(t), "scopes": s} for n, t, s in entries]}
    path.write_text(json.dumps(document, indent=2))
    path.chmod(0o600)


def _parse_tokens(document: dict) -> dict[str, Caller]:
    by_digest: dict[str, Caller] = {}
    for index, entry in enumerate(document["tokens"]):
        digest = str(entry["sha256"]).lower()
        if len(digest) != 64:
            raise ValueError(f"tokens[{index}].sha256 must be a 64-character hex SHA-256 digest")
        by_digest[digest] = Caller(str(entry["name"]), frozenset(entry.get("scopes", [])))
    return by_digest


class TokenAuthenticator:
    def __init__(self, path: Path) -> None:
        self._tokens = WatchedJsonFile(path, _parse_tokens, variable="CDP_AUTH_TOKENS_FILE")

    def authenticate(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        caller = self._tokens.value.get(token_digest(token.strip()))
        if caller is None:
            raise Unauthenticated("unknown or revoked token")
        return caller

    @staticmethod
    def authorize(caller: Caller, scope: str, method: str) -> None:
        if not caller.allows(scope):
            raise PermissionDenied(f"caller {caller.name!r} lacks scope {scope!r} required by {method}")
