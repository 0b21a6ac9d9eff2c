"""The definitions document `cdpctl definitions export` writes and `import` reads: its format, its order,
and the checks that name the definition and field a damaged or hand-edited document gets wrong.

    format: cdp-definitions
    version: 1
    computed_traits: [...]     profile: computed-trait definitions people declared (by name)
    segments: [...]            segmentation: id, name, description, definition (the canonical text),
                               a segment after every segment it refers to
    models: [...]              scoring: each model's versions (version, sha256 of the ONNX file, role)
    journeys: [...]            orchestration: id, state, every published version's definition, the draft
    identity: {...}            identity: the matching model when it is not the shipped default
    crm: [...]                 crm: connections and their mappings; credentials as the variables holding them
    not_included: [...]        what the services' APIs could not give, with the service and RPC missing

Deterministic: lists in a fixed order (by name or id, segments after what they refer to, versions in
order), keys sorted inside every definition, no time of export; two exports of the same definitions are
the same bytes. No customer data (no person, identifier, trait value or member) and no secret: a CRM
credential is the name of the environment variable holding it, `{"env": "HUBSPOT_TOKEN"}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT = "cdp-definitions"
VERSION = 1
KINDS = ("computed_traits", "segments", "models", "journeys", "identity", "crm")
# The field that names a definition of each kind (identity is one section, not a list).
KEYS = {"computed_traits": "name", "segments": "id", "models": "name", "journeys": "id", "crm": "id"}
REQUIRED = {
    "computed_traits": ("name", "op"),
    "segments": ("id", "definition"),
    "models": ("name", "versions"),
    "journeys": ("id", "state", "versions"),
    "crm": ("id", "kind"),
}
JOURNEY_STATES = ("draft", "active", "paused", "archived")
MODEL_ROLES = ("live", "shadow", "canary", "inactive")


class DocumentError(ValueError):
    """A document that cannot be imported; the message names the definition and the field."""


def plain(value: Any) -> Any:
    """JSON data with keys sorted and whole floats as integers (protobuf's Struct holds every number as a
    double: a journey's `version: 1` comes back as 1.0, and must compare and print as 1)."""
    if isinstance(value, dict):
        return {key: plain(value[key]) for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def ordered_segments(segments: list[dict[str, Any]], depends_on: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Segments by id, each after every segment it refers to (so an import creates what it reads first)."""
    by_id = {s["id"]: s for s in segments}
    done: list[dict[str, Any]] = []
    placed: set[str] = set()

    def place(segment_id: str, path: tuple[str, ...]) -> None:
        if segment_id in placed or segment_id not in by_id or segment_id in path:
            return
        for other in sorted(depends_on.get(segment_id, ())):
            place(other, (*path, segment_id))
        placed.add(segment_id)
        done.append(by_id[segment_id])

    for segment_id in sorted(by_id):
        place(segment_id, ())
    return done


def document(sections: dict[str, Any], not_included: list[dict[str, str]]) -> dict[str, Any]:
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    for kind in KINDS:
        doc[kind] = sections[kind]
    doc["not_included"] = sorted(not_included, key=lambda n: (n["kind"], n.get("name", ""), n["what"]))
    return doc


def dumps(doc: dict[str, Any], path: Path | None) -> str:
    """JSON, or YAML when the file's name ends in .yaml or .yml."""
    if path is not None and path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def loads(text: str, where: str) -> dict[str, Any]:
    from cdp_kit.yamltext import YAMLError, load_yaml

    try:
        doc = load_yaml(text)  # YAML 1.2 booleans; JSON is YAML too
    except YAMLError as exc:
        raise DocumentError(f"{where} is not JSON or YAML: {exc}") from None
    check(doc, where)
    return doc


def check(doc: Any, where: str) -> None:
    """Refuse a document this cdpctl cannot read, naming the definition and field that is wrong."""
    if not isinstance(doc, dict):
        raise DocumentError(f"{where}: a definitions document is a mapping (format, version, {', '.join(KINDS)})")
    if doc.get("format") != FORMAT:
        raise DocumentError(f"{where}: field `format` must be {FORMAT!r} (a `cdpctl definitions export` document)")
    if doc.get("version") != VERSION:
        raise DocumentError(
            f"{where}: field `version` is {doc.get('version')!r}; this cdpctl reads version {VERSION}: "
            "use the cdpctl that exported it, or a newer one"
        )
    for kind in KINDS:
        if kind == "identity":
            if not isinstance(doc.get(kind, {}), dict):
                raise DocumentError(f"{where}: field `identity` must be a mapping")
            continue
        entries = doc.get(kind, [])
        if not isinstance(entries, list):
            raise DocumentError(f"{where}: field `{kind}` must be a list")
        seen: set[str] = set()
        for index, entry in enumerate(entries):
            name = entry.get(KEYS[kind]) if isinstance(entry, dict) else None
            label = f"{kind}[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")
            if not isinstance(entry, dict):
                raise DocumentError(f"{where}: {label} must be a mapping")
            for field in REQUIRED[kind]:
                if entry.get(field) in (None, ""):
                    raise DocumentError(f"{where}: {label}: field `{field}` is missing")
            if not isinstance(name, str):
                raise DocumentError(f"{where}: {label}: field `{KEYS[kind]}` must be a string")
            if name in seen:
                raise DocumentError(f"{where}: {label}: {KEYS[kind]} {name!r} appears twice")
            seen.add(name)
            _check_entry(kind, entry, f"{where}: {label}")


def _check_entry(kind: str, entry: dict[str, Any], label: str) -> None:
    if kind == "segments" and not isinstance(entry["definition"], str):
        raise DocumentError(f"{label}: field `definition` must be the segment's text")
    if kind == "journeys":
        if entry["state"] not in JOURNEY_STATES:
            raise DocumentError(f"{label}: field `state` is {entry['state']!r}; one of {', '.join(JOURNEY_STATES)}")
        versions = entry["versions"]
        if not isinstance(versions, list) or not all(isinstance(v, dict) for v in versions):
            raise DocumentError(f"{label}: field `versions` must be a list of journey definitions")
        for number, version in enumerate(versions, start=1):
            if version.get("version") != number or version.get("id") != entry["id"]:
                raise DocumentError(
                    f"{label}: field `versions[{number - 1}]` must be version {number} of journey {entry['id']} "
                    f"(its `id` and `version` say {version.get('id')!r} v{version.get('version')!r})"
                )
        draft = entry.get("draft")
        if draft is not None and (not isinstance(draft, dict) or draft.get("version") != len(versions) + 1):
            raise DocumentError(f"{label}: field `draft` must be version {len(versions) + 1} of the journey, or null")
        if entry["state"] == "draft" and versions:
            raise DocumentError(f"{label}: field `state` is draft but it has published versions")
    if kind == "models":
        versions = entry["versions"]
        if not isinstance(versions, list):
            raise DocumentError(f"{label}: field `versions` must be a list")
        for index, version in enumerate(versions):
            for field in ("version", "sha256", "role"):
                if not isinstance(version, dict) or not isinstance(version.get(field), str):
                    raise DocumentError(f"{label}: field `versions[{index}].{field}` is missing")
            if version["role"] not in MODEL_ROLES:
                raise DocumentError(
                    f"{label}: field `versions[{index}].role` is {version['role']!r}; one of {', '.join(MODEL_ROLES)}"
                )
    if kind == "crm":
        for credential, source in (entry.get("credentials") or {}).items():
            if not isinstance(source, dict) or not isinstance(source.get("env"), str):
                raise DocumentError(
                    f"{label}: field `credentials.{credential}` must name its environment variable "
                    '({"env": "NAME"}); a document never holds a secret'
                )


def differences(wanted: Any, present: Any, prefix: str = "") -> list[str]:
    """The fields (dot paths) where two definitions differ, for a report that names them."""
    if isinstance(wanted, dict) and isinstance(present, dict):
        found: list[str] = []
        for key in sorted(set(wanted) | set(present)):
            found += differences(wanted.get(key), present.get(key), f"{prefix}.{key}" if prefix else str(key))
        return found
    if isinstance(wanted, list) and isinstance(present, list) and len(wanted) == len(present):
        found = []
        for index, (a, b) in enumerate(zip(wanted, present, strict=True)):
            found += differences(a, b, f"{prefix}[{index}]")
        return found
    return [] if plain(wanted) == plain(present) else [prefix or "(all)"]
