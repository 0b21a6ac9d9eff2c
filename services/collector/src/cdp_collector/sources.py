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

A key refused is a `KeyRefused` saying why (`missing_key`, `unknown_key`, `source_disabled`) and, for a
disabled source, which: the front doors count and log it by that (key_refusals.py), so an operator can tell
a source turned off from a client with a wrong key. Each time the file is read its changes are logged at
INFO by source id (added, removed, disabled, enabled, keys added or removed, limits and settings changed):
never a key or a secret, which are compared, not shown.

An enabled client source without `identity_secret` is open to a claimed identity (docs/security.md): its
key is public, so anyone can send `identify` with another person's user id or email and be attached to that
person. It is said at WARNING by its id, one line a source, when the file is first read and each time it is
read changed (not again while it is unchanged), and counted in the gauge `cdp.collector.sources.unverified`,
so an alert can fire until every such source has a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cdp.events.v1 import events_pb2
from cdp_collector.domain.rate import SourceLimits, parse_source_limits
from cdp_kit.errors import Unauthenticated
from cdp_kit.telemetry import Telemetry, observe_on
from cdp_kit.watched import WatchedJsonFile

log = logging.getLogger("cdp.collector.sources")


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


MISSING_KEY = "missing_key"
UNKNOWN_KEY = "unknown_key"
SOURCE_DISABLED = "source_disabled"


class KeyRefused(Unauthenticated):
    """A request refused for its write key. `reason` says why (MISSING_KEY, UNKNOWN_KEY, SOURCE_DISABLED;
    also the gRPC ErrorInfo reason); `source_id` names a disabled source, None otherwise: an unknown key
    belongs to no source, and the key itself is never kept."""

    def __init__(self, message: str, *, reason: str, source_id: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.source_id = source_id


def _describe_limits(limits: SourceLimits | None) -> str:
    if limits is None:
        return "none"
    said = []
    if limits.events_per_second is not None:
        said.append(limits.describe_rate())
    if limits.max_batch is not None:
        said.append(f"max_batch {limits.max_batch}")
    return ", ".join(said) or "none"


def _by_source(by_key: dict[str, Source]) -> dict[str, tuple[Source, dict[str, bool]]]:
    """Source id -> (one of its entries, {write key: enabled}) — keys only to compare two versions."""
    out: dict[str, tuple[Source, dict[str, bool]]] = {}
    for key, source in by_key.items():
        out.setdefault(source.id, (source, {}))[1][key] = source.enabled
    return out


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what.replace('key', 'keys')}"


def describe_changes(old: dict[str, Source], new: dict[str, Source]) -> tuple[list[str], dict[str, list[str]]]:
    """What changed from `old` to `new` (parsed sources files): sentences by source id, and the ids by kind
    of change. Keys and secrets are compared, never said: a key is "1 key added", a secret "changed"."""
    before, after = _by_source(old), _by_source(new)
    said: list[str] = []
    changes: dict[str, list[str]] = {
        "added": [],
        "removed": [],
        "disabled": [],
        "enabled": [],
        "keys_changed": [],
        "settings_changed": [],
    }
    for source_id in sorted(before.keys() | after.keys()):
        if source_id not in after:
            changes["removed"].append(source_id)
            said.append(f"source {source_id!r} removed")
            continue
        source, keys = after[source_id]
        if source_id not in before:
            changes["added"].append(source_id)
            enabled = sum(keys.values())
            state = "" if enabled == len(keys) else f", {_count(len(keys) - enabled, 'key')} of them disabled"
            said.append(f"source {source_id!r} added ({_count(len(keys), 'key')}{state})")
            continue
        was, was_keys = before[source_id]
        flipped = any(was_keys.values()) != any(keys.values())
        if flipped and not any(keys.values()):
            changes["disabled"].append(source_id)
            said.append(f"source {source_id!r} disabled: every key of it is refused now")
        elif flipped:
            changes["enabled"].append(source_id)
            said.append(f"source {source_id!r} enabled")
        kept = was_keys.keys() & keys.keys()
        key_changes = [
            (len(keys.keys() - was_keys.keys()), "key added"),
            (len(was_keys.keys() - keys.keys()), "key removed"),
        ]
        if not flipped:  # a source disabled or enabled as a whole is said so above, not key by key
            key_changes += [
                (sum(1 for k in kept if was_keys[k] and not keys[k]), "key disabled"),
                (sum(1 for k in kept if keys[k] and not was_keys[k]), "key enabled"),
            ]
        if any(n for n, _ in key_changes):
            changes["keys_changed"].append(source_id)
            said.append(f"source {source_id!r}: " + ", ".join(_count(n, what) for n, what in key_changes if n))
        settings = []
        if was.limits != source.limits:
            settings.append(f"limits changed from {_describe_limits(was.limits)} to {_describe_limits(source.limits)}")
        if was.kind != source.kind:
            settings.append(f"kind changed from {was.kind} to {source.kind}")
        if was.identity_secret != source.identity_secret:
            if was.identity_secret is None:
                settings.append("identity_secret set")
            elif source.identity_secret is None:
                settings.append("identity_secret removed")
            else:
                settings.append("identity_secret changed")
        if was.name != source.name:
            settings.append("name changed")
        if settings:
            changes["settings_changed"].append(source_id)
            said.append(f"source {source_id!r} " + ", ".join(settings))
    return said, changes


def unverified_sources(by_key: dict[str, Source]) -> list[str]:
    """The ids of the enabled client sources (any key of them enabled) without identity_secret, sorted."""
    return sorted(
        source_id
        for source_id, (source, keys) in _by_source(by_key).items()
        if source.kind == "client" and source.identity_secret is None and any(keys.values())
    )


# Said once a source, by its id: what is open and what closes it. Never its key or anything it sent.
_UNVERIFIED = (
    "source %r is a client source without identity_secret: its write key is public, so anyone can send "
    "identify with another person's user id or email and be attached to that person (and grant a consent the "
    "person withdrew). Set identity_secret for it in CDP_COLLECTOR_SOURCES_FILE and have the app's server send "
    "context.userHash, the hex HMAC-SHA256(identity_secret, userId), with the browser's calls"
)


class SourceRegistry:
    def __init__(self, path: Path, telemetry: Telemetry | None = None) -> None:
        self._known: dict[str, Source] | None = None
        self.unverified: list[str] = []  # enabled client sources without identity_secret, as last read
        if telemetry is not None:
            meter = telemetry.meter
            observe_on(
                meter,
                "cdp.collector.sources.unverified",
                self,
                SourceRegistry._observe_unverified,
                lambda callback: meter.create_observable_gauge(
                    "cdp.collector.sources.unverified",
                    callbacks=[callback],
                    unit="{source}",
                    description='enabled client sources ("kind": "client") without identity_secret in '
                    "CDP_COLLECTOR_SOURCES_FILE, as last read: anyone with their public write key can claim "
                    "another person's identity",
                ),
            )
        self._sources = WatchedJsonFile(path, self._parse, variable="CDP_COLLECTOR_SOURCES_FILE")

    def _observe_unverified(self):
        from opentelemetry.metrics import Observation

        return [Observation(len(self.unverified))]

    def _parse(self, document: dict) -> dict[str, Source]:
        """Parse a version of the file and log what it changes (WatchedJsonFile keeps what this returns; a
        malformed version raises before anything is said, and WatchedJsonFile says that once)."""
        sources = _parse_sources(document)
        if self._known is None:
            by_source = _by_source(sources)
            disabled = sorted(i for i, (_, keys) in by_source.items() if not any(keys.values()))
            log.info(
                "sources file read: %d sources, %d of them disabled",
                len(by_source),
                len(disabled),
                extra={"sources": sorted(by_source), "disabled": disabled},
            )
        else:
            said, changes = describe_changes(self._known, sources)
            if said:
                log.info("sources file changed: %s", "; ".join(said), extra={"changes": changes})
            else:
                log.debug("sources file re-read: nothing changed")
        changed = sources != self._known
        self._known = sources
        self.unverified = unverified_sources(sources)
        if changed:  # at start, and each version that differs: not again while the file says the same
            for source_id in self.unverified:
                log.warning(_UNVERIFIED, source_id, extra={"source": source_id})
        return sources

    def authenticate(self, write_key: str | None) -> Source:
        if not write_key:
            raise KeyRefused(f"missing write key: {_WHERE_KEYS_ARE}", reason=MISSING_KEY)
        source = self._sources.value.get(write_key)
        if source is None:
            raise KeyRefused(f"unknown write key: no source has the key sent; {_WHERE_KEYS_ARE}", reason=UNKNOWN_KEY)
        if not source.enabled:
            raise KeyRefused(f"source {source.id!r} is disabled", reason=SOURCE_DISABLED, source_id=source.id)
        return source

    def __len__(self) -> int:
        return len(self._sources.value)
