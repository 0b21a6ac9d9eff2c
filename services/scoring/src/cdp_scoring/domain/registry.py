"""The model registry: every version of every model, and what each version is used for.

Roles per model:
- live: its scores are published and written to profiles; at most one version;
- shadow: scored beside live and compared, never published (any number);
- canary: scores a stable share of persons in place of live (at most one; the share is chosen by a hash
  of person and model, so a person stays on the same side while the share stays the same);
- inactive: kept, not scored (earlier live versions, versions deployed for later).

Promote makes a version live and remembers the version it replaced; Rollback makes that one live again.
Score names are global (they become profile fields): two models may not produce the same score, and a
model may not read, through other models' scores, its own output (no cycles).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cdp_scoring.domain.spec import ModelSpec

LIVE, SHADOW, CANARY, INACTIVE = "live", "shadow", "canary", "inactive"
ROLES = (LIVE, SHADOW, CANARY, INACTIVE)
ACTIVE_ROLES = frozenset({LIVE, SHADOW, CANARY})


@dataclass(slots=True)
class Version:
    spec: ModelSpec
    role: str
    sha256: str
    size_bytes: int
    deployed_at: float
    canary_percent: float = 0.0

    @property
    def version(self) -> str:
        return self.spec.version

    def to_doc(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "role": self.role,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "deployed_at": self.deployed_at,
            "canary_percent": self.canary_percent,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Version:
        return cls(
            spec=ModelSpec.from_dict(doc["spec"]),
            role=doc["role"],
            sha256=doc["sha256"],
            size_bytes=doc["size_bytes"],
            deployed_at=doc["deployed_at"],
            canary_percent=doc.get("canary_percent", 0.0),
        )


@dataclass(slots=True)
class ModelEntry:
    name: str
    versions: dict[str, Version] = field(default_factory=dict)
    # Versions that were live before the current one, most recent last (what Rollback goes back to).
    previous: list[str] = field(default_factory=list)

    @property
    def live(self) -> Version | None:
        return next((v for v in self.versions.values() if v.role == LIVE), None)

    @property
    def canary(self) -> Version | None:
        return next((v for v in self.versions.values() if v.role == CANARY), None)

    def shadows(self) -> list[Version]:
        return [v for v in self.versions.values() if v.role == SHADOW]

    def newest_first(self) -> list[Version]:
        return sorted(self.versions.values(), key=lambda v: (v.deployed_at, v.version), reverse=True)

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [v.to_doc() for v in self.versions.values()], "previous": self.previous}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ModelEntry:
        versions = [Version.from_doc(v) for v in doc.get("versions", [])]
        return cls(name=doc["name"], versions={v.version: v for v in versions}, previous=list(doc.get("previous", [])))


def canary_bucket(person_id: str, model: str) -> float:
    """A stable number in [0, 100) for a person and a model: below the canary share means canary."""
    digest = hashlib.blake2b(f"{model}\x00{person_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 / 100.0


class Registry:
    def __init__(self, entries: Iterable[ModelEntry] = ()) -> None:
        self.models: dict[str, ModelEntry] = {e.name: e for e in entries}

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.models.values())

    def get(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none deployed"
            raise NotFound(f"no model named {name!r} (models: {known})", reason="unknown_model")
        return entry

    def version(self, name: str, version: str) -> Version:
        entry = self.get(name)
        found = entry.versions.get(version)
        if found is None:
            raise NotFound(
                f"model {name!r} has no version {version!r} (versions: {', '.join(sorted(entry.versions))})",
                reason="unknown_version",
            )
        return found

    # --- changes ----------------------------------------------------------------------------------

    def deploy(
        self, spec: ModelSpec, *, sha256: str, size_bytes: int, role: str | None, canary_percent: float, now: float
    ) -> tuple[Version, bool]:
        """Add a version. Returns (version, created); the same file deployed again changes nothing."""
        existing, role = self.check_deploy(spec, sha256=sha256, role=role, canary_percent=canary_percent)
        if existing is not None:
            return existing, False
        entry = self.models.get(spec.name)
        if entry is None:
            entry = self.models[spec.name] = ModelEntry(spec.name)
        version = Version(
            spec=spec,
            role=role,
            sha256=sha256,
            size_bytes=size_bytes,
            deployed_at=now,
            canary_percent=canary_percent if role == CANARY else 0.0,
        )
        if role == LIVE:
            self._retire_live(entry)
        elif role == CANARY and (replaced := entry.canary) is not None:
            replaced.role = INACTIVE
            replaced.canary_percent = 0.0
        entry.versions[spec.version] = version
        return version, True

    def check_deploy(
        self, spec: ModelSpec, *, sha256: str, role: str | None, canary_percent: float
    ) -> tuple[Version | None, str]:
        """What `deploy` would do, changing nothing: (the version already registered with this file, or None;
        the role a new version gets). Refuses what `deploy` refuses."""
        entry = self.models.get(spec.name)
        existing = entry.versions.get(spec.version) if entry else None
        if existing is not None:
            if existing.sha256 == sha256:
                return existing, existing.role
            raise AlreadyExists(
                f"model {spec.name!r} already has a version {spec.version!r} with different contents "
                f"(sha256 {existing.sha256[:12]}…); give the new file a new version",
                reason="version_exists",
            )
        if role is None:
            role = LIVE if entry is None or entry.live is None else INACTIVE
        if role not in ROLES:
            raise InvalidArgument("role", f"{role!r} is not one of {', '.join(ROLES)}")
        if role == CANARY and not 0 < canary_percent < 100:
            raise InvalidArgument("canary_percent", f"{canary_percent!r} must be above 0 and below 100 for a canary")
        if role in (SHADOW, CANARY) and (entry is None or entry.live is None):
            raise FailedPrecondition(
                f"model {spec.name!r} has no live version to {'shadow' if role == SHADOW else 'share persons with'}; "
                "deploy it live first",
                reason="no_live_version",
            )
        self._check_scores(spec)
        self._check_cycles(spec)
        return None, role

    def promote(self, name: str, version: str) -> Version:
        target = self.version(name, version)
        entry = self.models[name]
        if target.role == LIVE:
            return target
        # The promoted version's inputs may differ from the live one's: check the graph again.
        self._check_cycles(target.spec)
        self._retire_live(entry)
        target.role = LIVE
        target.canary_percent = 0.0
        return target

    def rollback(self, name: str) -> Version:
        entry = self.get(name)
        while entry.previous:
            candidate = entry.versions.get(entry.previous.pop())
            if candidate is not None:
                current = entry.live
                if current is not None:
                    current.role = INACTIVE
                candidate.role = LIVE
                candidate.canary_percent = 0.0
                return candidate
        raise FailedPrecondition(f"model {name!r} has no earlier live version to roll back to", reason="no_previous")

    def _retire_live(self, entry: ModelEntry) -> None:
        current = entry.live
        if current is not None:
            current.role = INACTIVE
            entry.previous.append(current.version)
            del entry.previous[:-20]  # a long enough memory for rollbacks

    def _check_scores(self, spec: ModelSpec) -> None:
        for other in self.models.values():
            if other.name == spec.name:
                continue
            produced = {s for v in other.versions.values() for s in v.spec.score_names}
            clash = sorted(produced & set(spec.score_names))
            if clash:
                raise InvalidArgument(
                    "spec.outputs",
                    f"score {clash[0]!r} is already produced by model {other.name!r}: score names are profile fields "
                    "and must be unique across models",
                )

    def _check_cycles(self, spec: ModelSpec) -> None:
        """Refuse a model whose inputs depend, through other models' scores, on its own scores."""
        producers: dict[str, str] = {}
        reads: dict[str, set[str]] = {}
        for entry in self.models.values():
            if entry.name == spec.name:
                continue
            for v in entry.versions.values():
                for score in v.spec.score_names:
                    producers[score] = entry.name
                reads.setdefault(entry.name, set()).update(
                    f.path.split(".", 1)[1] for f in v.spec.features if f.root == "scores"
                )
        for score in spec.score_names:
            producers[score] = spec.name
        reads[spec.name] = {f.path.split(".", 1)[1] for f in spec.features if f.root == "scores"}
        # Depth-first from the new model along "reads a score produced by".
        stack, seen = [(spec.name, [spec.name])], set()
        while stack:
            model, path = stack.pop()
            for score in reads.get(model, ()):
                producer = producers.get(score)
                if producer is None:
                    continue
                if producer == spec.name:
                    raise InvalidArgument(
                        "spec.features",
                        f"reading score {score!r} makes a cycle: {' -> '.join([*path, producer])}",
                    )
                if producer not in seen:
                    seen.add(producer)
                    stack.append((producer, [*path, producer]))

    # --- reading ----------------------------------------------------------------------------------

    def active(self) -> list[Version]:
        """Every version that is scored: live, canary and shadow."""
        return [v for e in self.models.values() for v in e.versions.values() if v.role in ACTIVE_ROLES]

    def route(self, entry: ModelEntry, person_id: str) -> Version | None:
        """The version whose scores are published for this person: the canary for its share, else live."""
        canary = entry.canary
        if canary is not None and canary_bucket(person_id, entry.name) < canary.canary_percent:
            return canary
        return entry.live
