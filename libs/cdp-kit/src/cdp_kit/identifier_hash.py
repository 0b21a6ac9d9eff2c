"""How a deletion notice names a person's identifiers: keyed hashes, never the values.

`privacy.deleted` (stream PRIVACY, kept without an age limit) carries, for a suppressed person, one hash
per identifier key `"type:value"` (normalised as identity stores it), so the collector can drop their later
events. A plain SHA-256 of such a key can be reversed by anyone who reads the stream, a store file or a
backup: hash a list of emails or phone numbers and compare. So the hash is HMAC-SHA-256 under a secret
that only profile (which writes the notices) and the collector (which matches them) hold:
`CDP_PRIVACY_HASH_KEY_FILE`, one key per line, the current key first.

- A notice names the key it was made with by its id (`PrivacyDeleted.identifier_hash_key_id`): a digest
  of the key, which tells nothing about it. A notice without one was made before keyed hashes, with plain
  SHA-256; the collector still matches those.
- Rotation: put the new key on the first line and keep the old ones below it. New notices use the first;
  notices made with a key that is no longer in the file can no longer be matched (their persons' events
  are collected again), so keep a key for as long as its notices must hold - for ever, since PRIVACY
  keeps them for ever.
- With `CDP_AUTH_MODE=none` (development, tests) and no file, a built-in development key is used. It is
  printed here, so it is no secret: notices made with it are as reversible as plain SHA-256. With
  `CDP_AUTH_MODE=tokens` a missing file stops the service at start.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from cdp_kit.settings import env

SETTING = "CDP_PRIVACY_HASH_KEY_FILE"
#: The shortest key accepted, in characters (`openssl rand -hex 32` writes 64).
MIN_KEY_CHARS = 32
#: The key used without a key file under CDP_AUTH_MODE=none. Public, so not a secret.
DEVELOPMENT_KEY = b"cdp development identifier hash key - published, not a secret"
_KEY_ID_LABEL = b"cdp privacy.deleted identifier hash key id"


def plain_identifier_hash(identifier_key: str) -> str:
    """The hash of notices made before keyed hashes (they carry no key id): lowercase hex SHA-256."""
    return hashlib.sha256(identifier_key.encode()).hexdigest()


@dataclass(frozen=True)
class HashKey:
    """One HMAC-SHA-256 key, known by its id (16 hex digits, a one-way digest of the key)."""

    secret: bytes = field(repr=False)
    id: str = field(init=False)
    _base: hmac.HMAC = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", hmac.new(self.secret, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16])
        object.__setattr__(self, "_base", hmac.new(self.secret, digestmod=hashlib.sha256))

    def digest(self, identifier_key: str) -> bytes:
        """The raw HMAC-SHA-256 of the key (the collector's hot path: the key's pads are computed once)."""
        mac = self._base.copy()
        mac.update(identifier_key.encode())
        return mac.digest()

    def hash(self, identifier_key: str) -> str:
        """What `PrivacyDeleted.identifier_hashes` carries: lowercase hex HMAC-SHA-256."""
        return self.digest(identifier_key).hex()


@dataclass(frozen=True)
class IdentifierHashKeys:
    """The keys a service holds, the current one (which new notices use) first."""

    keys: tuple[HashKey, ...]
    #: True for the published development key: nothing secret about its hashes.
    development: bool = False

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("at least one identifier hash key is needed")

    @classmethod
    def of(cls, *secrets: bytes | str) -> IdentifierHashKeys:
        return cls(tuple(HashKey(s.encode() if isinstance(s, str) else s) for s in secrets))

    @classmethod
    def for_development(cls) -> IdentifierHashKeys:
        return cls((HashKey(DEVELOPMENT_KEY),), development=True)

    @property
    def current(self) -> HashKey:
        return self.keys[0]

    def by_id(self, key_id: str) -> HashKey | None:
        return next((key for key in self.keys if key.id == key_id), None)


def read_key_file(path: Path) -> IdentifierHashKeys:
    """The keys in `path`: one per line, current first; blank lines are skipped.

    Raises ValueError naming the setting, the file and what is wrong (never a key's text)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{SETTING}={str(path)!r} is not a readable text file ({type(exc).__name__})") from None
    lines = [line.strip() for line in text.splitlines()]
    secrets = [line for line in lines if line]
    if not secrets:
        raise ValueError(
            f"{SETTING}={str(path)!r} holds no key: write one secret of at least {MIN_KEY_CHARS} characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    for number, line in enumerate(lines, start=1):
        if line and len(line) < MIN_KEY_CHARS:
            raise ValueError(
                f"{SETTING}={str(path)!r}: the key on line {number} has {len(line)} characters, fewer than "
                f"{MIN_KEY_CHARS}; use a random one (e.g. `openssl rand -hex 32`)"
            )
    if len(set(secrets)) != len(secrets):
        raise ValueError(f"{SETTING}={str(path)!r} lists a key twice")
    return IdentifierHashKeys.of(*secrets)


@dataclass(frozen=True, kw_only=True)
class IdentifierHashSettings:
    """The key variable; profile and the collector add it to their settings class (with ServiceSettings,
    whose `auth_mode` says whether a key file is required) and call `validate` from theirs."""

    privacy_hash_key_file: Path | None = env(
        SETTING,
        None,
        help="file with the secret key(s) privacy.deleted hashes identifiers with (HMAC-SHA-256), one per "
        f"line, the current first (at least {MIN_KEY_CHARS} characters each; keep old ones below it); the same "
        "file for profile and the collector. Required when CDP_AUTH_MODE=tokens; with none, a published "
        "development key is used",
    )

    def validate(self) -> list[str]:
        if self.privacy_hash_key_file is None:
            if getattr(self, "auth_mode", "tokens") == "tokens":
                return [
                    f"{SETTING} is required when CDP_AUTH_MODE=tokens: a file holding the secret key deletion "
                    "notices hash identifiers with, the same for profile and the collector (e.g. "
                    f"`openssl rand -hex 32 > privacy-hash.key`; `cdpctl up` and the chart make one)"
                ]
            return []
        try:
            read_key_file(self.privacy_hash_key_file)
        except ValueError as exc:
            return [str(exc)]
        return []

    def identifier_hash_keys(self) -> IdentifierHashKeys:
        """The keys from the file; the development key when none is set (validate refuses that under tokens)."""
        if self.privacy_hash_key_file is None:
            return IdentifierHashKeys.for_development()
        return read_key_file(self.privacy_hash_key_file)
