"""Deleted persons stay deleted: the events identity drops because they carry a deleted person's identifier.

A deletion reaches identity on its own consumer of `privacy.deleted`, apart from the events. Identity may
lag behind the collector (load), and the collector may learn of a suppression a moment late, so events
carrying the person's identifiers can be resolved after the purge, and would make a new person with the
same user id or email. Once a deletion is applied, identity drops such an event (acknowledged, counted in
`cdp.identity.deleted.dropped`, never stored, never published; not a dead letter):

- **suppressed** (the notice's `suppress`): any event carrying an identifier the notice names, for as long
  as the notice is in PRIVACY. The notice names identifiers only as keyed hashes (`identifier_hashes`,
  HMAC-SHA-256 under the key `identifier_hash_key_id` names, `cdp_kit.identifier_hash`), so identity holds
  the key file profile and the collector hold (`CDP_PRIVACY_HASH_KEY_FILE`); a notice from before keyed
  hashes carries plain SHA-256. Profile leaves browser and device ids out of a suppression.
- **dated before the deletion** (every deletion, suppressed or not): an event carrying an identifier the
  purge removed, when it happened (its `timestamp`, which the collector corrects for the sender's clock
  skew and caps at its arrival; `Event.received_at` when it has none) at or before the notice's time
  (`PrivacyDeleted.at`, profile's clock when it committed the deletion). Such an event belonged to the
  person identity has just forgotten, whenever it arrives: one the collector received before the deletion
  and identity resolves after it (identity lagged), and as well one that arrives after it but happened
  before: a CRM change made before the deletion and read by the connector after (its events carry the
  record's modification time), a device's offline queue, a back-fill. One that happened after the
  deletion is a new arrival and makes a new person (unless suppressed). Identity hashes the purged
  identifier keys itself, under the current key, as it purges them, so it keeps no value, and stores
  those digests with the purge (`identity_forgotten`), so a restart before the backlog is resolved still
  drops them. An entry is kept while EVENTS_RAW can still hold an event received before it (the stream's
  age limit); an event dated before the deletion that arrives later than that makes a new person.

People share browsers, devices and phones: an identifier of those types (`SHARED_TYPES`) drops an event
only when nothing else on it names a person (a user id, an email, a CRM id that is nobody's deleted one),
as the collector's suppression does; the event is then the other person's.

Memory: one 32-byte digest per hashed identifier, about 100 bytes each in Python's sets and dicts (README,
Privacy: 28 MB for 100,000 suppressing notices of 3 identifiers). Time: an event is checked only once some
deletion is known, one HMAC per identifier (about 2 us each).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.identifier_hash import SETTING, HashKey, IdentifierHashKeys

log = logging.getLogger("cdp.identity")

#: Identifier types people share: a match on one drops an event only when nothing else on it names a person.
SHARED_TYPES = frozenset({"phone", "anonymous_id", "device_id"})

#: Why an event was dropped (the counter's `rule`).
SUPPRESSED = "suppressed"
BEFORE_DELETION = "before_deletion"

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _plain(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Forgotten:
    """The hashes of deleted persons' identifiers identity drops events by. `keys`: the identifier hash keys
    (default: the published development key, as profile and the collector use without a key file)."""

    def __init__(self, keys: IdentifierHashKeys | None = None) -> None:
        self.keys = keys or IdentifierHashKeys.for_development()
        # Suppressing notices' digests per form (a key, or None for plain SHA-256); only forms holding any.
        self._suppressed: dict[HashKey | None, set[bytes]] = {}
        self._forms: list[tuple[HashKey | None, Callable[[str], bytes], set[bytes]]] = []
        # Purged identifiers' digests under the current key -> the latest deletion time naming them (ms).
        self._before: dict[bytes, int] = {}

    def __bool__(self) -> bool:
        return bool(self._forms or self._before)

    def __len__(self) -> int:
        return sum(len(d) for d in self._suppressed.values()) + len(self._before)

    def suppress(self, notice: privacy_pb2.PrivacyDeleted) -> int:
        """Add a suppressing notice's hashes; the number new. A notice made with a key identity does not hold
        is logged as an error (its hashes match nothing here, as at the collector)."""
        if not notice.suppress or not notice.identifier_hashes:
            return 0
        form: HashKey | None = None
        if notice.identifier_hash_key_id:
            form = self.keys.by_id(notice.identifier_hash_key_id)
            if form is None:
                log.error(
                    "privacy.deleted request %s: its identifier hashes (%d) were made with key %s, which %s does "
                    "not hold, so identity cannot drop the person's events; add that key to the file (below the "
                    "current one) and restart identity",
                    notice.request_id,
                    len(notice.identifier_hashes),
                    notice.identifier_hash_key_id,
                    SETTING,
                )
                return 0
        added = {bytes.fromhex(h) for h in notice.identifier_hashes if _SHA256_HEX.fullmatch(h)}
        if not added:
            return 0
        digests = self._suppressed.get(form)
        if digests is None:
            digests = self._suppressed[form] = set()
            self._forms.append((form, _plain if form is None else form.digest, digests))
        before = len(digests)
        digests |= added
        return len(digests) - before

    def forget(self, deleted_at: Mapping[str, int]) -> dict | None:
        """Purged identifier keys -> the time of the deletion that purged them (epoch ms): events dated
        at or before it and carrying one are dropped. Only the keys' digests are kept. Returns them as the
        document the store keeps across restarts (`load`), or None for no keys."""
        digest = self.keys.current.digest
        entries = []
        for key, at in sorted(deleted_at.items(), key=lambda item: item[1]):
            hashed = digest(key)
            entries.append([hashed.hex(), at])
            if self._before.get(hashed, -1) < at:
                self._before[hashed] = at
        if not entries:
            return None
        entries.sort()  # by digest: the document tells nothing of the keys' order
        return {"key_id": self.keys.current.id, "entries": entries, "until": max(at for _, at in entries)}

    def load(self, doc: dict) -> bool:
        """A document `forget` returned, read back at start; False when it was made with a key no longer
        current (after a rotation: its digests cannot be compared, and it is dropped)."""
        if doc.get("key_id") != self.keys.current.id:
            return False
        for hexdigest, at in doc.get("entries", []):
            hashed = bytes.fromhex(hexdigest)
            if self._before.get(hashed, -1) < at:
                self._before[hashed] = at
        return True

    def expire(self, before_ms: int) -> int:
        """Forget the received-before entries of deletions older than `before_ms` (no event received before
        them is left to resolve); the number removed."""
        old = [digest for digest, at in self._before.items() if at < before_ms]
        for digest in old:
            del self._before[digest]
        return len(old)

    def dropped(self, keys: Iterable[str], at: int) -> str | None:
        """Why an event with identifier `keys`, dated `at` (epoch ms), is dropped (SUPPRESSED,
        BEFORE_DELETION), or None when it is resolved."""
        current = self.keys.current
        before = self._before
        shared: str | None = None
        vouched = False
        for key in keys:
            # Each form's digest once (an HMAC costs about 2 us): the current key's serves both lists.
            mine = None
            rule = None
            for form, digest, digests in self._forms:
                if form is current:
                    hashed = mine = current.digest(key)
                else:
                    hashed = digest(key)
                if hashed in digests:
                    rule = SUPPRESSED
                    break
            if rule is None and before and at <= before.get(mine or current.digest(key), -1):
                rule = BEFORE_DELETION
            if key.partition(":")[0] in SHARED_TYPES:
                if rule is not None and shared is None:
                    shared = rule
            elif rule is not None:
                return rule
            else:
                vouched = True
        return None if vouched else shared
