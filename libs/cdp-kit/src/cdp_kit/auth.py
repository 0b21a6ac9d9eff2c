"""Caller authentication: bearer tokens with scopes.

The tokens file (CDP_AUTH_TOKENS_FILE, mounted from a Kubernetes Secret) holds only SHA-256 digests of
tokens, never the tokens themselves:

    {"tokens": [{"name": "crm-sync", "sha256": "<hex digest>", "scopes": ["collector:write", "profile:read"]}]}

A scope is `<service>:<verb>` (e.g. `profile:read`); `<service>:*` grants every verb of one service and
`*` grants everything. The file is re-read when it changes, so a rotated Secret takes effect without a
restart.

Outbound: the token a service presents to a peer it calls comes from `CDP_<PEER>_TOKEN_FILE` (a mounted
Secret holding the token alone), re-read when the file changes, so rotating it needs no restart either.
`cdp_kit.service.client_channel` puts it on every call to that peer (`BearerFromFile`); when the file is
set it is what is sent. `CDP_<PEER>_TOKEN` (the token in the environment) still works, for development.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cdp_kit.errors import PermissionDenied, Unauthenticated
from cdp_kit.watched import WatchedJsonFile

log = logging.getLogger("cdp.auth")


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


# ------------------------------------------------------------------------------------------ outbound


class TokenFile:
    """A bearer token alone in a file (a mounted Secret), re-read when the file changes. While the file
    is unreadable or empty (a Secret caught mid-rewrite) the last good token stays in force; at start a
    missing or empty file is an error naming `variable`."""

    def __init__(self, path: Path, *, variable: str) -> None:
        self.path = path
        self.variable = variable
        self._stamp: tuple[int, int] | None = None
        self._token = ""
        if not self._reload():
            raise ValueError(f"{variable}={str(path)!r} must be a readable file holding the token")

    def _reload(self) -> bool:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_ino)
            if stamp == self._stamp:
                return True
            token = self.path.read_text().strip()
        except OSError:
            return False
        if not token:
            return False
        self._stamp, self._token = stamp, token
        return True

    @property
    def value(self) -> str:
        if not self._reload():
            log.warning("token file unreadable; keeping the last good token", extra={"variable": self.variable})
        return self._token


def _with_bearer(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k.lower() != "authorization"]
    metadata.append(("authorization", f"Bearer {token}"))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
    )


class _Unary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: TokenFile) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request) -> Any:
        return await continuation(_with_bearer(client_call_details, self.token.value), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: TokenFile) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request) -> Any:
        return await continuation(_with_bearer(client_call_details, self.token.value), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: TokenFile) -> None:
        self.token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator) -> Any:
        return await continuation(_with_bearer(client_call_details, self.token.value), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: TokenFile) -> None:
        self.token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator) -> Any:
        return await continuation(_with_bearer(client_call_details, self.token.value), request_iterator)


def bearer_from_file(token: TokenFile) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors putting the file's current token on every call (replacing any other)."""
    return [_Unary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]


def token_file_variable(peer: str) -> str:
    """`profile` -> CDP_PROFILE_TOKEN_FILE: where the token presented to `peer` is kept."""
    return f"CDP_{peer.upper().replace('-', '_')}_TOKEN_FILE"
