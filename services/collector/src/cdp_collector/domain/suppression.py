"""Suppression: events about a person who asked to be deleted *and* suppressed are not collected.

Profile publishes `privacy.deleted` with a hash of each of the person's identifier keys `"type:value"`,
normalised as identity normalises them: HMAC-SHA-256 under the identifier hash key profile and the
collector share (`cdp_kit.identifier_hash`, `CDP_PRIVACY_HASH_KEY_FILE`), named by the notice's
`identifier_hash_key_id`; a notice published before keyed hashes has no key id and plain SHA-256 digests.
The collector keeps the digests of notices with `suppress=true` in a SuppressionList, one set per form
(each key of its key file, plain SHA-256), and, before storing an event, builds the same keys from what it
can see on the event, hashes each in every form it holds digests of and looks it up. A match drops the
event with an answer that says so (gRPC EVENT_STATUS_SUPPRESSED, HTTP `"suppressed": n`); nothing is ever
dropped silently. A suppressed phone is the one exception: people share phones, so it drops an event only
when nothing else on the event (a user id, an email, a CRM or external id) names a person who is not
suppressed. A notice made with a key the collector does not hold cannot be matched
(`UnknownHashKey`): the follower logs it as an error naming the key id and the variable.

The keys follow identity's default rules (`cdp_identity.domain.rules`, `normalize`), written out here
because the edge must not depend on identity:

| type | looked for in | normalised |
|---|---|---|
| user_id | `user_id`; an alias's `previous_id` | trimmed |
| anonymous_id | `anonymous_id`; an alias's `previous_id` | trimmed |
| device_id | `context.device.id` | trimmed |
| email | `traits.email`, `context.traits.email` | trimmed, lower-cased |
| phone | `traits.phone`, `context.traits.phone` | only when written in E.164 (see below) |
| salesforce_id, hubspot_id, dynamics_id, zoho_id | `traits.<type>`, `context.traits.<type>` | trimmed |
| any `context.externalIds[].type` | `context.externalIds[].id` | as its type above, else trimmed |

An alias's `previous_id` is checked as both user_id and anonymous_id: identity links it as whichever it
turns out to be. A phone written as `+` and digits (spaces, dashes, dots and brackets ignored) is the
E.164 form identity would store and is checked as it is. One written any other way (`15550001111`,
`(555) 000-1111`) identity formats with libphonenumber and its default region; so does the edge, with
the same region (`phone_region`, CDP_COLLECTOR_PHONE_REGION: identity's `default_phone_region`), loading
libphonenumber only once a phone is suppressed: a privacy trial's suppressed `+15550001111` came back as
`15550001111`. Identifier types added in identity's rules
file, and types it stores hashed (`"hash": true`), are not checked here.

When nothing is suppressed, `match` returns at once without building or hashing a single key: the ingest
hot path pays nothing for the feature until someone uses it; with suppressions, it hashes each key once per
form that holds any (one key, plus plain SHA-256 while old notices remain, is the usual).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator

from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp_kit.identifier_hash import HashKey, IdentifierHashKeys, plain_identifier_hash

#: What a client is told about a suppressed event. It carries no identifier value (gRPC's `error.field`
#: says where the match was): answers, like logs, must not repeat what the person asked to have erased.
SUPPRESSED_MESSAGE = (
    "not stored: the person this event is about asked to be deleted and suppressed (a privacy request), "
    "so events carrying their identifiers are dropped; do not retry"
)

#: Identifier types people share that a suppression still names: a phone is how a person is reached (and
#: identity quarantines one seen on several people). A suppressed one drops an event only when the event
#: names no one else.
SHARED_TYPES = frozenset({"phone"})

#: Types that name a browser or a device, not a person: they never vouch for an event carrying a suppressed
#: phone (profile leaves them out of suppressions; see cdp_profile.privacy).
UNNAMING_TYPES = frozenset({"anonymous_id", "device_id"})

_ALIAS = events_pb2.EVENT_TYPE_ALIAS
_TRAIT_TYPES = ("email", "phone", "salesforce_id", "hubspot_id", "dynamics_id", "zoho_id")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_PHONE_SEPARATORS = str.maketrans("", "", " \u00a0-.()")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def identifier_key(kind: str, raw: str, phone_region: str | None = None) -> str | None:
    """The normalised key `"type:value"` identity would store for `raw`, or None when there is none.
    `phone_region`: the region a phone not written in E.164 is read in, as identity's default region (None:
    such a phone has no key)."""
    value = raw.strip()
    if kind == "email":
        value = value.lower()
    elif kind == "phone":
        compact = value.translate(_PHONE_SEPARATORS)
        if _E164.fullmatch(compact):
            value = compact
        elif phone_region is None or (value := _e164(value, phone_region)) is None:
            return None
    return f"{kind}:{value}" if value else None


def _e164(value: str, region: str) -> str | None:
    """`value` as identity formats a phone (libphonenumber, `region` for a number without its country code)."""
    import phonenumbers  # only once a phone is suppressed and one arrives written otherwise than E.164

    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


#: What `PrivacyDeleted.identifier_hashes` carried for a key before keyed hashes (a notice without
#: `identifier_hash_key_id`): lowercase hex SHA-256.
identifier_hash = plain_identifier_hash


def identifier_keys(event: events_pb2.Event, phone_region: str | None = None) -> Iterator[tuple[str, str]]:
    """(field path, key) for every identifier the collector can see on `event`, most common first and
    lazily, so a match stops the walk. Reads only: the event is stored as it came when nothing matches."""
    candidates = [("user_id", "user_id", event.user_id), ("anonymous_id", "anonymous_id", event.anonymous_id)]
    if event.type == _ALIAS and event.previous_id:
        candidates += [
            ("previous_id", "user_id", event.previous_id),
            ("previous_id", "anonymous_id", event.previous_id),
        ]
    for path, kind, raw in candidates:
        if raw and (key := identifier_key(kind, raw)):
            yield path, key
    has_context = event.HasField("context")
    context = event.context  # reading an absent message field does not set it
    if has_context and context.HasField("device") and (key := identifier_key("device_id", context.device.id)):
        yield "context.device.id", key
    structs = []
    if event.HasField("traits"):
        structs.append(("traits", event.traits))
    if has_context and context.HasField("traits"):
        structs.append(("context.traits", context.traits))
    for path, struct in structs:
        fields = struct.fields
        for kind in _TRAIT_TYPES:
            # `in` first: indexing a missing key of a protobuf map would add it to the event.
            if (
                kind in fields
                and (raw := _scalar(fields[kind])) is not None
                and (key := identifier_key(kind, raw, phone_region))
            ):
                yield f"{path}.{kind}", key
    if has_context and context.HasField("extra") and "externalIds" in context.extra.fields:
        for index, item in enumerate(context.extra.fields["externalIds"].list_value.values):
            entry = item.struct_value.fields
            if "type" not in entry or "id" not in entry:
                continue
            kind = entry["type"].string_value
            if kind and (raw := _scalar(entry["id"])) is not None and (key := identifier_key(kind, raw, phone_region)):
                yield f"context.externalIds[{index}].id", key


def _scalar(value: struct_pb2.Value) -> str | None:
    """A trait as identity reads it: a string as is, a whole number without its `.0`."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return str(int(number)) if number.is_integer() else repr(number)
    return None


class UnknownHashKey(Exception):
    """A notice's hashes were made with a key the collector's key file does not hold: they match nothing."""

    def __init__(self, key_id: str, hashes: int) -> None:
        self.key_id = key_id
        self.hashes = hashes
        super().__init__(f"identifier hashes made with key {key_id}, which the key file does not hold")


def _plain_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class SuppressionList:
    """The digests of every suppressed identifier key, per form they were made in, and which events they
    rule out. `keys`: the collector's identifier hash keys (default: the published development key)."""

    def __init__(self, keys: IdentifierHashKeys | None = None, *, phone_region: str | None = "US") -> None:
        self.keys = keys or IdentifierHashKeys.for_development()
        self.phone_region = phone_region
        # Form (a key, or None for plain SHA-256) -> digests. Only forms holding digests are listed, so
        # `match` hashes an event's keys in those forms only.
        self._digests: dict[HashKey | None, set[bytes]] = {}
        self._forms: list[tuple[Callable[[str], bytes], set[bytes]]] = []

    def __len__(self) -> int:
        return sum(len(digests) for digests in self._digests.values())

    def add(self, hashes: Iterable[str], *, key_id: str = "") -> tuple[int, int]:
        """Suppress the keys behind `hashes` (hex), made with the key `key_id` names (empty: plain SHA-256).
        Returns (newly added, malformed and skipped); raises UnknownHashKey for a key not held."""
        form: HashKey | None = None
        if key_id:
            form = self.keys.by_id(key_id)
            if form is None:
                raise UnknownHashKey(key_id, sum(1 for _ in hashes))
        added: set[bytes] = set()
        malformed = 0
        for value in hashes:
            if _SHA256_HEX.fullmatch(value):
                added.add(bytes.fromhex(value))
            else:
                malformed += 1
        if not added:
            return 0, malformed
        digests = self._digests.get(form)
        if digests is None:  # a form is listed once it holds a digest: `match` hashes in no empty one
            digests = self._digests[form] = set()
            self._forms.append((_plain_digest if form is None else form.digest, digests))
        before = len(digests)
        digests |= added
        return len(digests) - before, malformed

    def match(self, event: events_pb2.Event) -> str | None:
        """The field path of the suppressed identifier that rules `event` out (`traits.email`), or None.

        A suppressed phone rules an event out only when nothing else on it names a person: an event that
        also carries a user id, an email or a CRM id nobody suppressed is that other person's, who shares
        the phone (see SHARED_TYPES)."""
        forms = self._forms
        if not forms:
            return None
        shared: str | None = None
        vouched = False
        for path, key in identifier_keys(event, self.phone_region):
            kind = key.partition(":")[0]
            suppressed = any(digest(key) in digests for digest, digests in forms)
            if kind in SHARED_TYPES:
                if suppressed and shared is None:
                    shared = path
            elif suppressed:
                return path
            elif kind not in UNNAMING_TYPES:
                vouched = True
        return None if vouched else shared
