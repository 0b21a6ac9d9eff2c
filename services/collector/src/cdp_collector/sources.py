"""Sources and their write keys.

A source is one producer of events (a website, an app, a back end, a CRM). Clients authenticate with
the source's write key, exactly as with Segment: HTTP Basic with the key as user name and an empty
password, or `write_key` in a gRPC CollectRequest. The file is a Kubernetes Secret; it is re-read when
it changes so keys can be added or revoked, and limits changed, without a restart.

    {"sources": [{"id": "web", "name": "Website", "write_key": "wk_…",
                  "limits": {"events_per_second": 50, "burst": 500, "max_batch": 100}}]}

`limits` is optional (domain/rate.py says what each does). A source may have several keys (one entry
each, the same id: a key being rotated); its limits are one, so its entries must give the same ones.

`kind` says whether the key is secret: "server" (the default: a back end, a CRM) or "client" (a browser or
mobile app, whose key anyone can read from the page). Identity never takes a CRM id type from a client
source's event. `identity_secret` (client sources only, at least 16 characters; never logged) turns on
identity verification, as Intercom's: the app's server computes HMAC-SHA256(identity_secret, userId) in
hex and the browser sends it as `context.userHash`; an event whose hash verifies links as a server's, one
without a valid hash may not take over a user id, email or phone another person holds (see `trust_of`).
A source's kind and secret are one, like its limits.

    {"id": "web", "write_key": "wk_…", "kind": "client", "identity_secret": "…"}
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from cdp.events.v1 import events_pb2
from cdp_collector.domain.rate import SourceLimits, parse_source_limits
from cdp_kit.errors import Unauthenticated
from cdp_kit.watched import WatchedJsonFile


@dataclass(frozen=True)
class Source:
    id: str
    name: str
    enabled: bool = True
    limits: SourceLimits | None = None  # None: only the limits every source has
    kind: str = "server"  # "server" (a secret key) or "client" (a browser or mobile app: a public key)
    # HMAC-SHA256 key of context.userHash (client sources); None: no identity verification. Never logged.
    identity_secret: bytes | None = field(default=None, repr=False)


KINDS = ("server", "client")
USER_HASH_KEY = "userHash"  # context.userHash: hex HMAC-SHA256(identity_secret, userId)
MIN_SECRET_CHARS = 16

SERVER = events_pb2.SOURCE_TRUST_SERVER
CLIENT = events_pb2.SOURCE_TRUST_CLIENT
CLIENT_UNVERIFIED = events_pb2.SOURCE_TRUST_CLIENT_UNVERIFIED
CLIENT_VERIFIED = events_pb2.SOURCE_TRUST_CLIENT_VERIFIED


def user_hash(secret: bytes, user_id: str) -> str:
    """What the app's server computes and its browser sends as context.userHash."""
    return hmac.new(secret, user_id.encode(), hashlib.sha256).hexdigest()


def trust_of(source: Source, event: events_pb2.Event) -> int:
    """Stamp `event.source_trust` for identity, take context.userHash out of it (a credential for its user
    id: never stored), and return the trust.

    A server source: SERVER. A client source without identity_secret: CLIENT. With one: CLIENT_VERIFIED when
    the event has a user id and context.userHash is its HMAC (compared in constant time), else
    CLIENT_UNVERIFIED. A wrong or missing hash is not refused: the event is kept, as a visitor's (the
    browser cannot fix it, and an SDK would retry a 400 never). Identity then links no user id, email or
    phone that another person holds."""
    sent = None
    if event.HasField("context") and event.context.HasField("extra"):
        fields = event.context.extra.fields
        if USER_HASH_KEY in fields:
            value = fields[USER_HASH_KEY]
            sent = value.string_value if value.WhichOneof("kind") == "string_value" else ""
            del fields[USER_HASH_KEY]
    if source.kind != "client":
        trust = SERVER
    elif source.identity_secret is None:
        trust = CLIENT
    elif (
        sent
        and event.user_id
        and hmac.compare_digest(
            sent.strip().lower().encode(), user_hash(source.identity_secret, event.user_id).encode()
        )
    ):
        trust = CLIENT_VERIFIED
    else:
        trust = CLIENT_UNVERIFIED
    event.source_trust = trust
    return trust


def _parse_trust(entry: dict, index: int) -> tuple[str, bytes | None]:
    kind = entry.get("kind", "server")
    if kind not in KINDS:
        raise ValueError(f'sources[{index}].kind must be "server" or "client" (a browser or mobile app\'s key)')
    secret = entry.get("identity_secret")
    if secret is None:
        return kind, None
    if kind != "client":
        raise ValueError(
            f'sources[{index}].identity_secret is for a "client" source: a server source\'s events are trusted'
        )
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"sources[{index}].identity_secret must be a string of at least {MIN_SECRET_CHARS} characters")
    return kind, secret.encode()


def _parse_sources(document: dict) -> dict[str, Source]:
    by_key: dict[str, Source] = {}
    limits_by_id: dict[str, SourceLimits | None] = {}
    trust_by_id: dict[str, tuple[str, bytes | None]] = {}
    for index, entry in enumerate(document["sources"]):
        key = entry["write_key"]
        if not isinstance(key, str) or len(key) < 8:
            raise ValueError(f"sources[{index}].write_key must be a string of at least 8 characters")
        if key in by_key:
            raise ValueError(f"sources[{index}].write_key is used by source {by_key[key].id!r} too")
        source_id = str(entry["id"])
        limits = parse_source_limits(entry.get("limits"), f"sources[{index}].limits")
        if limits_by_id.setdefault(source_id, limits) != limits:
            raise ValueError(
                f"sources[{index}].limits differ from those of another entry of source {source_id!r}: a source's "
                "limits are one, whichever of its keys is sent; give every entry of it the same limits"
            )
        kind, secret = _parse_trust(entry, index)
        if trust_by_id.setdefault(source_id, (kind, secret)) != (kind, secret):
            raise ValueError(
                f"sources[{index}].kind or identity_secret differ from those of another entry of source "
                f"{source_id!r}: give every entry of it the same"
            )
        by_key[key] = Source(
            source_id,
            str(entry.get("name", entry["id"])),
            bool(entry.get("enabled", True)),
            limits,
            kind,
            secret,
        )
    return by_key


# How a client that is refused for its key finds the right one and sends it. Never the key it sent: a wrong
# key is often a real one of another source or platform, and answers end up in logs.
_WHERE_KEYS_ARE = (
    "the sources and their write keys are in the collector's CDP_COLLECTOR_SOURCES_FILE (under `make up`: "
    "the dev source's key is write_key in .cdp/run.json). Send the key as the HTTP Basic user name with an "
    'empty password (or as "writeKey" in the body), or as write_key in a gRPC CollectRequest'
)


class SourceRegistry:
    def __init__(self, path: Path) -> None:
        self._sources = WatchedJsonFile(path, _parse_sources, variable="CDP_COLLECTOR_SOURCES_FILE")

    def authenticate(self, write_key: str | None) -> Source:
        if not write_key:
            raise Unauthenticated(f"missing write key: {_WHERE_KEYS_ARE}")
        source = self._sources.value.get(write_key)
        if source is None:
            raise Unauthenticated(f"unknown write key: no source has the key sent; {_WHERE_KEYS_ARE}")
        if not source.enabled:
            raise Unauthenticated(f"source {source.id!r} is disabled")
        return source

    def __len__(self) -> int:
        return len(self._sources.value)
