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

A journey's `draft` is its unpublished edits (the version after its last published one), or null. A draft
absent from a document (null, or no field: a document of an older cdpctl, whose export left out the draft
of a published journey) means the document holds none, never "discard the platform's": import names a
draft the platform has and the document lacks, and leaves it (`cdpctl journey discard-draft` discards one).

Deterministic: lists in a fixed order (by name or id, segments after what they refer to, versions in
order), keys sorted inside every definition, no time of export; two exports of the same definitions are
the same bytes. No customer data (no person, identifier, trait value or member) and no secret: a CRM
credential is the name of the environment variable holding it, `{"env": "HUBSPOT_TOKEN"}`. No YAML
anchor or alias either: a shared value is written out each time it is used.

What import reads is checked whole before anything is applied (`read`, `loads`, `check`): at most
MAX_DOCUMENT_BYTES of UTF-8; YAML without aliases or a key written twice, nested at most MAX_DEPTH
deep (cdp_kit.yamltext); plain data only (text, numbers, true/false, null, lists, mappings with text
keys: YAML's dates, sets and binary are refused where they are); every field the import passes to a
service of the type the service takes. A refusal names the definition and the field, and how to fix it.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

from cdp_kit.yamltext import MAX_DEPTH, YAMLError, load_yaml

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
# Optional fields the import passes to a service as text: when present, they are strings.
STRINGS = {
    "computed_traits": ("name", "op"),
    "segments": ("id", "name", "description"),  # `definition`: _check_entry
    "models": ("name", "live_version"),
    "journeys": ("id", "state"),
    "crm": ("id", "kind", "account", "url"),
}
MAX_DOCUMENT_BYTES = 64 * 2**20  # far more than any platform's definitions; a bound on what import reads
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
    """JSON, or YAML when the file's name ends in .yaml or .yml (no anchors or aliases: import refuses them)."""
    if path is not None and path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        class Dumper(yaml.SafeDumper):
            def ignore_aliases(self, data: Any) -> bool:
                return True

        return yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def read(path: Path) -> str:
    """The document's text: at most MAX_DOCUMENT_BYTES of UTF-8 (an endless file such as /dev/zero is read
    that far and refused). OSError as it comes."""
    with path.open("rb") as file:
        data = file.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        bound = f"{MAX_DOCUMENT_BYTES // 2**20} MB" if MAX_DOCUMENT_BYTES >= 2**20 else f"{MAX_DOCUMENT_BYTES} bytes"
        raise DocumentError(
            f"{path} is larger than {bound}, more than a definitions document holds: "
            "import the file `cdpctl definitions export` wrote"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"{path} is not UTF-8 text (byte {exc.start}): a definitions document is JSON or YAML"
        ) from None


def loads(text: str, where: str) -> dict[str, Any]:
    try:
        doc = load_yaml(text, aliases=False)  # YAML 1.2 booleans; JSON is YAML too; export writes no alias
    except YAMLError as exc:
        raise DocumentError(f"{where} is not JSON or YAML a definitions document can hold: {exc}") from None
    except RecursionError:  # the reader bounds the nesting; this is the last line, never a traceback
        raise DocumentError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
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
            model = doc.get(kind, {}).get("matching_model")
            if model is not None and not isinstance(model, dict):
                raise DocumentError(f"{where}: field `identity.matching_model` must be a mapping or null")
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
            for field in STRINGS[kind]:
                if field in entry and not isinstance(entry[field], str):
                    raise DocumentError(f"{where}: {label}: field `{field}` must be a string{_reads_as(entry[field])}")
            if not isinstance(name, str):
                raise DocumentError(f"{where}: {label}: field `{KEYS[kind]}` must be a string")
            if name in seen:
                raise DocumentError(f"{where}: {label}: {KEYS[kind]} {name!r} appears twice")
            seen.add(name)
            _check_entry(kind, entry, f"{where}: {label}")
            _check_plain(entry, f"{where}: {label}")
            if kind == "computed_traits":
                _check_computed_trait(entry, f"{where}: {label}")
    _check_plain({key: value for key, value in doc.items() if key not in KINDS or key == "identity"}, where)


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
            percent = version.get("canary_percent")
            if percent is not None and (isinstance(percent, bool) or not isinstance(percent, int | float)):
                raise DocumentError(f"{label}: field `versions[{index}].canary_percent` must be a number")
            if version["role"] not in MODEL_ROLES:
                raise DocumentError(
                    f"{label}: field `versions[{index}].role` is {version['role']!r}; one of {', '.join(MODEL_ROLES)}"
                )
    if kind == "crm":
        credentials = entry.get("credentials")
        if credentials is not None and not isinstance(credentials, dict):
            raise DocumentError(
                f"{label}: field `credentials` must be a mapping of each credential to the environment variable "
                'holding it ({"token": {"env": "HUBSPOT_TOKEN"}})'
            )
        mappings = entry.get("mappings")
        if mappings is not None and (not isinstance(mappings, list) or not all(isinstance(m, dict) for m in mappings)):
            raise DocumentError(f"{label}: field `mappings` must be a list of mappings")
        for credential, source in (credentials or {}).items():
            if not isinstance(source, dict) or not isinstance(source.get("env"), str):
                raise DocumentError(
                    f"{label}: field `credentials.{credential}` must name its environment variable "
                    '({"env": "NAME"}); a document never holds a secret'
                )


def _reads_as(value: Any) -> str:
    """What YAML made of a value written where text belongs, and the fix."""
    if isinstance(value, datetime.date):
        return f": it reads as the date {value.isoformat()} (quote it to keep it as text)"
    if isinstance(value, bool | int | float):
        return f": it reads as {json.dumps(value)} (quote it to keep it as text)"
    return f", not {_kind_of(value)}"


def _kind_of(value: Any) -> str:
    kinds = {dict: "a mapping", list: "a list", bytes: "binary data", set: "a set", type(None): "null"}
    return next((name for cls, name in kinds.items() if isinstance(value, cls)), type(value).__name__)


def _check_plain(value: Any, label: str) -> None:
    """Refuse what is not JSON's data (YAML's dates, sets, binary; keys other than text) or is nested
    deeper than MAX_DEPTH, naming the field: the import compares, prints and sends every value."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        where = f"field `{path}`" if path else "it"
        if depth > MAX_DEPTH:
            raise DocumentError(f"{label}: {where} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    raise DocumentError(
                        f"{label}: {where} has the key {key!r}: keys are text (quote it: '{key}')"
                        if isinstance(key, int | float | bool | datetime.date)
                        else f"{label}: {where} has a key that is {_kind_of(key)}: keys are text"
                    )
                stack.append((inner, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(item, list):
            stack.extend((inner, f"{path}[{index}]", depth + 1) for index, inner in enumerate(item))
        elif not (item is None or isinstance(item, str | bool | int | float)):
            reads = _reads_as(item) if isinstance(item, datetime.date) else f", not {_kind_of(item)}"
            raise DocumentError(
                f"{label}: {where} must be text, a number, true/false, null, a list or a mapping{reads}"
            )


def _check_computed_trait(entry: dict[str, Any], label: str) -> None:
    """Each field profile's ComputedTraitDefinition has, of the type it takes (a field it lacks is left to
    the import, which reports the definition failed: a newer platform's field, or a typo)."""
    from google.protobuf import json_format

    from cdp.profile.v1 import profile_pb2

    try:
        json_format.ParseDict(entry, profile_pb2.ComputedTraitDefinition(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        found = re.match(r"Failed to parse (\w+) field: (.*)", str(exc))
        raise DocumentError(
            f"{label}: field `{found[1]}`: {found[2]}" if found else f"{label}: not a computed-trait definition: {exc}"
        ) from None


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
