"""What a CRM change becomes, and when it is news: the change -> events rule the poller (core.py) applies.

Events: a change becomes a `track` (its name from `event_name`, the table in the service README) with the
CRM ids and, when the record is linked to a contact (or is one), the contact's email in `context.traits`
(an identifier identity resolves) under the anonymous id `<kind>:<account>:<contact id>`; the CDP person
id the connector wrote rides along as `properties.cdp_person_id`, never as a userId. A contact's change
also becomes an `identify` whose traits and `context.consent` are the contact's fields that a record
mapping fills from `traits.*` or `consent.*` (`backwards`: the mapping read backwards; fields whose
transform is not value-preserving are left out) and that a CRM user changed: a three-way comparison per
field against the last value both sides agreed on - what the connector wrote there, or what the last read
of the record found (the memo's digest per field) -, so a field the CDP changed meanwhile is not sent back
stamped with the record's newer modification time (`News._identify`). An event's `messageId` (`event_id`) derives from the
connection, object, record id and modification stamp only, so a page read again is posted with the same
ids.

News: what a record was when last read (the memo, `crm_cursors/<connection>:<object>:<id>`: the watched
field and a digest of the reported fields, `News._memo`) tells a stage change from any other edit and
keeps an edit of fields nobody reads from becoming an event; a contact's field holding what the connector
last wrote there (`crm_records`, `News._written`) counts as unchanged (`News._only_written`), so the CDP's
own writes do not come back as news, nor do the contacts the connector created (holding the CDP id), nor
anything about a person the connector erased. What the connector wrote is what the CRM confirmed last
(the record's `fields`) or a value it sent since without hearing the answer (`sent`: a write queued after
a timeout or a dropped connection, which the CRM may well have applied): such a value read back is the
CDP's own write too, not a CRM user's edit.

A record a CRM user merged others into (HubSpot's UI "merge": the survivor lists the retired ids in
`hs_merged_object_ids`, and HubSpot answers for a retired id with the survivor; Salesforce's, whose losers
are deleted naming their master in `MasterRecordId`; Dataverse's, whose subordinate is deactivated naming its
target in `masterid` - each reader gives the survivor's change the retired ids, `Change.merged`) is followed,
not undone (`News._relink`): a `crm_records` document naming a retired id is linked to the survivor, by a
compare-and-set on the version it was read at (`Poller._relinked` reads again when another write came
first). Where the survivor holds that record's match key (a contact a HubSpot user made takes the
merged-away one's `cdp_id` in the merge, lacking one), the person's writes go there. Where it holds another's - another person's record -
the two are one contact in the CRM and two persons in the CDP: the merged-away person's record reads
`merged` (`merged_into`: the survivor's record, `merged_in_crm`) and is written no more, so no contact is
made again for them, and the CRM's claim that they are one is posted as identity links: a `CRM Contact
Merged` event per email, each under the survivor's anonymous id (`<kind>:<account>:<survivor id>`), the
survivor's email and the one the connector wrote on the merged-away record; identity merges the persons
and the connector follows that merge as any other (engine.py `_merge`).

`News` is the poller's half that decides this; it reads `store`, `connection`, `traits` (`backwards`) and
`placeholders` of the poller it is part of. Log lines name the connection, object and record id; never
record values or emails.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import TYPE_CHECKING, Any

import orjson

from cdp_crm.domain.mapping import Connection
from cdp_crm.inbound.sizes import fit
from cdp_crm.state import ERASED, MERGED, RECORDS, TOMBSTONES
from cdp_kit.storage import Put, Store

if TYPE_CHECKING:
    from cdp_crm.inbound.core import Change

log = logging.getLogger("cdp.crm.inbound")

# Transforms that keep a value as it is (up to case and spaces): a field mapped through one of them can be
# read back as the trait; a rounded score or a joined list cannot.
REVERSIBLE = frozenset({"string", "trim", "lower", "upper", "boolean"})


def event_id(connection: str, obj: str, record_id: str, stamp: str, part: str = "") -> str:
    """Stable for one change of one record: the same on every replica and after any restart. `part` tells
    the two events of one contact change apart (the track and the identify)."""
    fields = ("crm", connection, obj, record_id, stamp, *((part,) if part else ()))
    return "crm-" + hashlib.sha256("\x00".join(fields).encode()).hexdigest()[:32]


def field_digest(connection: str, obj: str, record_id: str, crm_field: str, value: Any) -> str:
    """The memo's digest of one field's value as read (`News._memo`): salted with the connection, object,
    record and field, so no value can be told from it. The outbound side compares a record's first write
    against it too (engine.py `claim`)."""
    dumped = orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str)
    salt = "\x00".join((connection, obj, record_id, crm_field)).encode()
    return hashlib.sha256(salt + b"\x00" + dumped).hexdigest()[:16]


def instant(stamp: str) -> dt.datetime:
    """A CRM's modification stamp as an aware datetime (ISO 8601 with Z, +00:00 or Salesforce's +0000)."""
    text = stamp.strip().replace("Z", "+00:00")
    if len(text) > 5 and text[-5] in "+-" and text[-4:].isdigit():
        text = text[:-2] + ":" + text[-2:]
    parsed = dt.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class News:
    """Whether a change read from the CRM is news, and the events it becomes (mixed into `Poller`)."""

    store: Store
    connection: Connection
    traits: dict[str, dict[str, str]]  # per CRM object (lower case): CRM field -> traits.<name> / consent.<key>
    placeholders: dict[str, dict[str, Any]]  # per CRM object (lower case): CRM field -> a mapping's default

    async def _tombstoned(self, changes: list[Change]) -> set[str]:
        """The CDP ids, among those `changes` carry, of persons a privacy erasure tombstoned (one read)."""
        ids = {change.person.cdp_id for change in changes if change.person is not None and change.person.cdp_id}
        return set(await self.store.get_many(TOMBSTONES, sorted(ids))) if ids else set()

    async def _written(self, change: Change, tombstoned: set[str] | None = None) -> tuple[dict[str, list[Any]], bool]:
        """What the connector wrote to this contact, if it did - per CRM field, the value the CRM confirmed
        last (its `crm_records` document's `fields`) and those sent since whose answer never came
        (`sent`) -, and whether the change is about a person the connector erased: the record itself
        erased (its anonymisation or deletion is the connector's own write), or - a ticket, task, case or
        deal - the contact it is linked to erased, or the CDP id it carries a deleted person's (tombstone).
        Such a change is never news: its events would bring the deleted person back into the CDP (keyed by
        the contact's anonymous id, carrying their CDP id). `tombstoned`: the tombstoned CDP ids among the
        page's, read already (`_tombstoned`); None: read here."""
        written: dict[str, list[Any]] = {}
        erased = found = False
        contact = change.kind in ("contact", "lead") and not change.deleted
        for record in await self.store.find(RECORDS, "crm_id", change.record_id, limit=20):
            doc = record.doc
            if self._same_object(doc, change):
                found = True
                if contact:
                    _wrote_there(written, doc)
                erased = erased or doc.get("state") in ERASED
        person = change.person
        if contact and not found and person is not None and person.cdp_id:
            # A contact whose creating write was sent and never answered: the connector does not know its
            # CRM id yet, but the contact holds the CDP id that write upserted by.
            for record in await self.store.find(RECORDS, "person_id", person.cdp_id, limit=20):
                doc = record.doc
                if self._same_object(doc, change) and not doc.get("crm_id") and doc.get("sent"):
                    _wrote_there(written, doc)
        if not erased and person is not None and change.kind not in ("contact", "lead"):
            for record in await self.store.find(RECORDS, "crm_id", person.id, limit=20):
                if record.doc.get("connection") == self.connection.id and record.doc.get("state") in ERASED:
                    erased = True
        if not erased and person is not None and person.cdp_id:
            if tombstoned is not None:
                erased = person.cdp_id in tombstoned
            else:
                erased = await self.store.get(TOMBSTONES, person.cdp_id) is not None
        return written, erased

    async def _relink(self, change: Change, now: float) -> tuple[list[dict[str, Any]], list[Put]]:
        """A record CRM users merged others into (`change.merged`: the retired ids): the `crm_records` documents
        naming a retired id linked to it (module docstring), and the CRM's claim that the persons are one
        as events. Returns (events, store writes); nothing when the connector wrote none of the retired.
        Each write expects the version its document was read at: another replica following the same merge,
        or the engine writing the person's record meanwhile (a change written, an erasure), makes it fail
        rather than be overwritten with what was read before (core.Poller._relinked reads again)."""
        survivor = change.record_id
        relinked: list[tuple[str, dict[str, Any]]] = []
        versions: dict[str, int] = {}  # the version each was read at: its write is a compare-and-set
        for retired in change.merged:
            for record in await self.store.find(RECORDS, "crm_id", retired, limit=20):
                doc = record.doc
                if self._same_object(doc, change) and doc.get("state") not in (*ERASED, MERGED):
                    relinked.append((record.key, doc))
                    versions[record.key] = record.version
        if not relinked:
            return [], []
        owners = [
            record
            for record in await self.store.find(RECORDS, "crm_id", survivor, limit=20)
            if self._same_object(record.doc, change) and record.doc.get("state") not in (*ERASED, MERGED)
        ]
        # Whose key the survivor holds: a record relinked here whose key it holds owns it as well (HubSpot's
        # merge of contacts makes a new record - both ids retired - holding the primary's values).
        holders = [(r.key, r.doc) for r in owners] + [(k, d) for k, d in relinked if self._holds(change, d)]
        puts: list[Put] = []
        emails: dict[str, None] = {}
        for key, doc in relinked:
            others = [(k, d) for k, d in holders if d.get("person_id") != doc.get("person_id")]
            owner = next((k for k, d in others if d.get("mapping") == doc.get("mapping")), None)
            someone_else = owner is not None or self._holds(change, doc) is False
            if someone_else:
                # Two persons, one contact: this one's writes would make their contact again (their key is
                # not the survivor's). Merged into the survivor's record; identity is told (the claims below).
                puts.append(Put(RECORDS, key, {
                    **doc, "crm_id": survivor, "state": MERGED, "merged_into": owner or "",
                    "kept": False, "merged_in_crm": True, "updated_at": now,
                }, expected_version=versions[key]))  # fmt: skip
            else:
                puts.append(
                    Put(RECORDS, key, {**doc, "crm_id": survivor, "updated_at": now}, expected_version=versions[key])
                )
            email = self._email_written(doc)
            if email:
                emails[email] = None
            log.info(
                "crm record merged in the crm followed",
                extra={"connection": self.connection.id, "object": change.obj, "crm_id": survivor,
                       "merged": someone_else},
            )  # fmt: skip
        if change.kind not in ("contact", "lead"):
            return [], puts  # a deal or ticket merged: relinked, no claim about persons
        person = change.person
        if person is not None and person.email:
            emails = {person.email: None, **emails}
        return self._merge_claims(change, list(emails)), puts

    @staticmethod
    def _holds(change: Change, doc: dict[str, Any]) -> bool | None:
        """Whether the record read holds `doc`'s match key: True, False (another value), None (no value, or
        a key of several fields or of a field not read)."""
        mine = doc.get("key") or []
        if len(mine) != 1:
            return None
        held = change.record.get(mine[0][0])
        if held in (None, ""):
            return None
        return str(held).lower() == str(mine[0][1]).lower()

    def _email_written(self, doc: dict[str, Any]) -> str | None:
        """The email the connector wrote on a record (its field mapped from `traits.email`), if any."""
        fields = doc.get("fields") or {}
        for crm_field, target in self.traits.get(str(doc.get("object", "")).lower(), {}).items():
            if target == "traits.email" and fields.get(crm_field):
                return str(fields[crm_field])
        return None

    def _merge_claims(self, change: Change, emails: list[str]) -> list[dict[str, Any]]:
        """`CRM Contact Merged`, one per email, each under the survivor's anonymous id: identity links each email's
        person to that id, so persons the CRM holds as one become one. Stable ids: a read again posts the
        same events (which the collector takes once)."""
        kind, conn = self.connection.kind, self.connection.id
        survivor = change.record_id
        merged = sorted(change.merged)
        properties: dict[str, Any] = {
            "crm": kind, "connection": conn, "object": change.obj, "crm_id": survivor, "crm_contact_id": survivor,
            "merged_crm_ids": merged,
        }  # fmt: skip
        if change.person is not None and change.person.cdp_id:
            properties["cdp_person_id"] = change.person.cdp_id
        timestamp = _iso(change.stamp)
        claims = []
        for email in emails:
            claim: dict[str, Any] = {
                "type": "track",
                "event": "CRM Contact Merged",
                "messageId": event_id(conn, change.obj, survivor, ";".join(merged), "merged:" + email.lower()),
                "properties": dict(properties),
                "context": {"source": {"crm": kind, "connection": conn}, "traits": {"email": email}},
                "anonymousId": f"{kind}:{self.connection.account}:{survivor}",
            }
            if timestamp:
                claim["timestamp"] = timestamp
            claims.append(claim)
        return claims

    def _same_object(self, doc: dict[str, Any], change: Change) -> bool:
        """A `crm_records` document of this connection and of the change's object."""
        return doc.get("connection") == self.connection.id and str(doc.get("object", "")).lower() == change.obj.lower()

    def _reported(self, change: Change) -> dict[str, Any]:
        """The fields the events report of a record: its reported properties and those read back as traits."""
        return {**change.properties, **{f: change.record.get(f) for f in self.traits.get(change.obj.lower(), {})}}

    def _only_written(self, change: Change, written: dict[str, list[Any]]) -> bool:
        """Every field the events would report holds what the connector itself wrote there, the CDP person
        id it matches on, or nothing."""
        fields = self._reported(change)
        cdp_id = change.person.cdp_id if change.person is not None else None
        return all(
            value in (None, "") or _by_connector(written, name, value) or (cdp_id and value == cdp_id)
            for name, value in fields.items()
        )

    def _memo(self, change: Change, written: dict[str, list[Any]]) -> dict[str, Any]:
        """What the events report of a record: the watched field, and a digest of the reported fields and
        of the fields read back as traits or consent. A field holding what the connector itself wrote
        there counts as the connector's, whatever its value: the CDP's own write coming back is no news."""
        fields = self._reported(change)
        for name, value in fields.items():
            if _by_connector(written, name, value):
                fields[name] = "<written by the connector>"
        reported = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS, default=str)
        memo: dict[str, Any] = {"watched": change.watched, "digest": hashlib.sha256(reported).hexdigest()[:24]}
        if change.kind in ("contact", "lead") and not change.deleted:
            # Per field read back as a trait or consent, a digest of the value read (the base of the next
            # read's three-way comparison, `_identify`): salted with the record and field, no value kept.
            read = {
                f: self._field_digest(change, f) for f in self.traits.get(change.obj.lower(), {}) if f in change.record
            }
            memo["fields"] = read
        return memo

    def _field_digest(self, change: Change, crm_field: str) -> str:
        return field_digest(self.connection.id, change.obj, change.record_id, crm_field, change.record.get(crm_field))

    # --- a change as events ---------------------------------------------------------------------

    def events(
        self,
        change: Change,
        before: dict[str, Any] | None,
        memo: dict[str, Any],
        written: dict[str, list[Any]] | None = None,
    ) -> list[dict[str, Any]]:
        if change.own or _connector_created_person(change):
            return []  # the CDP's own action coming back is not news (its later outcome is)
        if written and self._only_written(change, written):
            # All it holds is what the connector wrote: its own record coming back, not news. First seen
            # (created and written again before this read, so no longer "created"), or seen before the
            # connector's record of its write was committed (the memo then held the raw values, so it
            # differs from this one, which counts them as the connector's).
            return []
        if before is not None and _same_memo(before, memo) and not change.deleted:
            return []  # nothing the events report changed (an edit of fields nobody reads, a repeat)
        name = event_name(change, before)
        kind, conn = self.connection.kind, self.connection.id
        properties = {k: v for k, v in change.properties.items() if v not in (None, "")}
        properties.update(crm=kind, connection=conn, object=change.obj, crm_id=change.record_id)
        previous = before.get("watched") if before is not None else None
        if previous is not None and change.watched is not None and previous != change.watched:
            properties["previous_" + ("stage" if change.kind == "deal" else "status")] = before["watched"]
        context: dict[str, Any] = {"source": {"crm": kind, "connection": conn}}
        person = change.person
        if person is not None:
            properties["crm_contact_id"] = person.id
            if person.email:
                # Identity links the event to the person through the email (an identifier it resolves);
                # the CDP person id is a reference, never a userId (identity would take it for a new user).
                context["traits"] = {"email": person.email}
            if person.cdp_id:
                properties["cdp_person_id"] = person.cdp_id
        anonymous = f"{kind}:{self.connection.account}:{person.id if person else change.record_id}"
        timestamp = _iso(change.at or change.stamp) if not change.deleted else None
        track: dict[str, Any] = {
            "type": "track",
            "event": name,
            "messageId": event_id(conn, change.obj, change.record_id, change.stamp),
            "properties": properties,
            "context": context,
            "anonymousId": anonymous,
        }
        if timestamp:
            track["timestamp"] = timestamp
        events = [track]
        if change.kind in ("contact", "lead") and not change.deleted:
            identify = self._identify(change, context, anonymous, timestamp, written or {}, before)
            if identify is not None:
                events.append(identify)
        fitting = [f for e in events if (f := fit(e)) is not None]
        if len(fitting) < len(events):
            log.warning(
                "crm change too large for an event",
                extra={"connection": conn, "object": change.obj, "crm_id": change.record_id},
            )
        return fitting

    def _identify(
        self,
        change: Change,
        context: dict[str, Any],
        anonymous: str,
        timestamp: str | None,
        written: dict[str, list[Any]],
        before: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """The contact's traits and consent as a CRM user changed them: a three-way comparison per field
        against the last value both sides agreed on. A field holding what the connector wrote there, or the
        placeholder a mapping's `default` puts in, is the CDP's own value, not news; a field holding what
        the last read of the record found (`before["fields"]`, its digest) is unchanged in the CRM since,
        whatever the CDP did with it meanwhile - sent again here, stamped with the record's newer
        modification time, it would take the place of a newer CDP change of that field in the profile (the
        profile keeps per trait the newest value by event time). What is left changed in the CRM only, or
        on both sides: there the later change wins, the CRM's dated by the record's modification stamp.
        The email the contact is linked by goes in `context.traits` unless it is a changed trait itself:
        identity reads it there, and the profile does not take it as a trait. None when nothing is left
        (the track event links the contact by its email anyway)."""
        traits: dict[str, Any] = {}
        purposes: dict[str, bool] = {}
        channels: dict[str, bool] = {}
        placeholders = self.placeholders.get(change.obj.lower(), {})
        read_before = (before or {}).get("fields") or {}
        for crm_field, target in self.traits.get(change.obj.lower(), {}).items():
            if crm_field not in change.record:
                continue
            value = change.record[crm_field]
            if _by_connector(written, crm_field, value):
                continue
            if read_before.get(crm_field) == self._field_digest(change, crm_field):
                continue  # as read last: the CRM did not change it since
            if crm_field in placeholders and _same(value, placeholders[crm_field]):
                continue
            if target.startswith("traits."):
                if value not in (None, ""):
                    traits[target.removeprefix("traits.")] = value
            elif (granted := _bool(value)) is not None:
                key = target.removeprefix("consent.")
                if key.startswith("purpose:"):
                    purposes[key.removeprefix("purpose:")] = granted
                elif key.startswith("channel:"):
                    channels[key.removeprefix("channel:")] = granted
        if not (traits or purposes or channels):
            return None
        ctx: dict[str, Any] = {"source": context["source"]}
        if change.person is not None and change.person.email and "email" not in traits:
            ctx["traits"] = {"email": change.person.email}  # what identity links the contact to the person by
        if purposes or channels:
            ctx["consent"] = {
                **({"categoryPreferences": purposes} if purposes else {}),
                **({"channelPreferences": channels} if channels else {}),
            }
        identify: dict[str, Any] = {
            "type": "identify",
            "messageId": event_id(self.connection.id, change.obj, change.record_id, change.stamp, "identify"),
            "anonymousId": anonymous,
            "traits": traits,
            "context": ctx,
        }
        if timestamp:
            identify["timestamp"] = timestamp
        return identify

    async def _timed(
        self, obj: str, events: list[dict[str, Any]], changes: dict[str, Change], sent: dict[str, str], times_of
    ) -> list[dict[str, Any]]:
        """A page's events with each `identify` carrying traits stamped per field, where the reader can say
        when each field took its value (`times_of(obj, record ids)` -> record id -> CRM field -> time:
        HubSpot's property history, `HubSpotReader.field_times`). Asked only for the records whose identify
        carries traits - a CRM user's edits, never the connector's own writes read back. `sent` (message id
        -> record id) gains the split events' ids."""
        traited = [sent[e["messageId"]] for e in events if e["type"] == "identify" and e.get("traits")]
        if not traited:
            return events
        times = await times_of(obj, list(dict.fromkeys(traited)))
        fields = {
            target.removeprefix("traits."): crm
            for crm, target in self.traits.get(obj.lower(), {}).items()
            if target.startswith("traits.")
        }
        timed: list[dict[str, Any]] = []
        for event in events:
            record_id = sent.get(event["messageId"])
            known = times.get(record_id or "")
            if event["type"] != "identify" or not event.get("traits") or not known:
                timed.append(event)
                continue
            at = {trait: known[fields[trait]] for trait in event["traits"] if fields.get(trait) in known}
            for split in self._by_field_time(event, changes[record_id], at):
                sent[split["messageId"]] = record_id
                timed.append(split)
        return timed

    def _by_field_time(self, identify: dict[str, Any], change: Change, at: dict[str, str]) -> list[dict[str, Any]]:
        """`identify` as one event per time its traits took their values (`at`: trait -> time; a trait
        without one, or with one not before the record's stamp, keeps the stamp). The event at the record's
        stamp keeps its id and the consent; each earlier one gets an id of its own from the record, stamp
        and time (the same at every read of this change), and the link email in `context.traits` unless
        it carries the email itself. The profile keeps per trait the newest value by event time: a field a
        CRM user changed before the CDP did, with another field edited after, no longer takes the CDP's
        newer value's place."""
        when = identify.get("timestamp")
        if not when:
            return [identify]
        stamp = instant(when)
        groups: dict[str, dict[str, Any]] = {}
        for trait, value in identify["traits"].items():
            moment = when
            if trait in at and (own := _iso(at[trait])) is not None and instant(own) < stamp:
                moment = own
            groups.setdefault(moment, {})[trait] = value
        if list(groups) == [when]:
            return [identify]
        link = change.person.email if change.person is not None else None
        context = {k: v for k, v in identify["context"].items() if k not in ("consent", "traits")}
        split: list[dict[str, Any]] = []
        for moment, traits in sorted(groups.items(), key=lambda item: instant(item[0])):
            if moment == when:
                split.append({**identify, "traits": traits})
                continue
            part = f"identify@{moment}"
            ctx = {**context, **({"traits": {"email": link}} if link and "email" not in traits else {})}
            split.append({
                **identify, "traits": traits, "timestamp": moment, "context": ctx,
                "messageId": event_id(self.connection.id, change.obj, change.record_id, change.stamp, part),
            })  # fmt: skip
        if when not in groups and identify["context"].get("consent"):
            split.append({**identify, "traits": {}})  # the consent alone, at the record's stamp
        return split


def backwards(connection: Connection) -> dict[str, dict[str, str]]:
    """Per CRM object (lower case): CRM field -> `traits.<name>` or `consent.<key>`, from the connection's
    record mappings whose transforms keep the value as it is."""
    out: dict[str, dict[str, str]] = {}
    for mapping in connection.mappings:
        if mapping.kind != "record":
            continue
        for fm in (*mapping.match, *mapping.fields):
            source = fm.source or ""
            if not source.startswith(("traits.", "consent.")) or fm.translate:
                continue
            if any(t.name not in REVERSIBLE for t in fm.transforms):
                continue
            out.setdefault(mapping.object.lower(), {})[fm.crm_field] = source
    return out


def placeholders(connection: Connection) -> dict[str, dict[str, Any]]:
    """Per CRM object (lower case): CRM field -> the `default` its record mapping writes when the CDP has
    no value (Salesforce's required LastName: "(unknown)")."""
    out: dict[str, dict[str, Any]] = {}
    for mapping in connection.mappings:
        if mapping.kind != "record":
            continue
        for fm in mapping.fields:
            if fm.default is not None:
                out.setdefault(mapping.object.lower(), {})[fm.crm_field] = fm.default
    return out


def event_name(change: Change, before: dict[str, Any] | None) -> str:
    """The event a change becomes (the table in the service README)."""
    kind = change.kind
    noun = {
        "contact": "Contact",
        "lead": "Lead",
        "case": "Case",
        "ticket": "Ticket",
        "task": "Task",
        "deal": "Deal",
        "campaign_member": "Campaign Member",
    }[kind]
    if change.deleted:
        return f"CRM {noun} Deleted"
    moved = before is None or before.get("watched") != change.watched
    if kind in ("contact", "lead"):
        return f"CRM {noun} Created" if change.created else f"CRM {noun} Updated"
    if kind in ("case", "ticket"):
        if change.created:
            return f"CRM {noun} Opened"
        return f"CRM {noun} Closed" if change.closed and moved else f"CRM {noun} Updated"
    if kind == "task":
        if change.closed and (moved or change.created):
            return "CRM Task Completed"
        return "CRM Task Created" if change.created else "CRM Task Updated"
    if kind == "deal":
        if change.created and not change.closed:
            return "CRM Deal Created"
        if change.closed and (moved or change.created):
            return "CRM Deal Won" if change.won else "CRM Deal Lost"
        return "CRM Deal Stage Changed" if moved and before is not None else "CRM Deal Updated"
    # campaign members: added to the campaign, then their engagement (the member status) changing
    if change.created:
        return "CRM Campaign Member Added"
    return "CRM Campaign Engagement" if moved else "CRM Campaign Member Updated"


def _connector_created_person(change: Change) -> bool:
    """A contact or lead created already holding the CDP person id: the connector's upsert made it."""
    person = change.person
    return change.kind in ("contact", "lead") and change.created and person is not None and bool(person.cdp_id)


def _before(stored: dict[str, Any] | None, stamp: str) -> dict[str, Any] | None:
    """What the record was before this change: the stored memo, or - when this very change was read
    before (a page read again) - what that read compared with, so the same events come out again."""
    if stored is None:
        return None
    if stored.get("stamp") == stamp:
        return stored.get("before")
    return {"watched": stored.get("watched"), "digest": stored.get("digest"), "fields": stored.get("fields")}


def _same_memo(before: dict[str, Any], memo: dict[str, Any]) -> bool:
    """Nothing the events report changed: the watched field and the reported fields' digest (the per-field
    digests are the identify's base, and a memo written before they were kept has none)."""
    return before.get("watched") == memo.get("watched") and before.get("digest") == memo.get("digest")


def _iso(stamp: str) -> str | None:
    try:
        return instant(stamp).isoformat().replace("+00:00", "Z")
    except ValueError:
        return None  # a version number (Dataverse): the collector stamps the time it received it


def _wrote_there(written: dict[str, list[Any]], doc: dict[str, Any]) -> None:
    """Add a `crm_records` document's values to `written`: what the CRM confirmed, and what was sent since
    without an answer (`writes.unconfirmed`)."""
    for name, value in (doc.get("fields") or {}).items():
        written.setdefault(name, []).append(value)
    for name, values in (doc.get("sent") or {}).items():
        written.setdefault(name, []).extend(values)


def _by_connector(written: dict[str, list[Any]], name: str, value: Any) -> bool:
    """Whether a CRM field's value is one the connector wrote there (confirmed, or sent and unanswered)."""
    return any(_same(value, mine) for mine in written.get(name, ()))


def _same(crm: Any, written: Any) -> bool:
    """A CRM's value and the one the connector wrote, as the CRM may give it back (HubSpot: text). A list
    written comes back as a list or as ``;``-joined text (HubSpot's and Salesforce's multi-select values,
    the form the HubSpot adapter writes one in), its options in any order; an object, or a list holding
    more than text and numbers, as JSON text."""
    if crm == written:
        return True
    if isinstance(written, list | tuple | dict):
        return _same_structure(crm, written)
    if isinstance(written, bool) or isinstance(crm, bool):
        return _bool(crm) is not None and _bool(crm) == _bool(written)
    if isinstance(written, int | float) and not isinstance(written, bool):
        try:
            return float(crm) == float(written)
        except (TypeError, ValueError):
            return False
    return crm is not None and written is not None and str(crm) == str(written)


def _same_structure(crm: Any, written: list | tuple | dict) -> bool:
    if isinstance(crm, str) and isinstance(written, list | tuple) and all(_scalar(w) for w in written):
        crm = crm.split(";") if crm else []
    elif isinstance(crm, str):
        try:
            crm = orjson.loads(crm)
        except ValueError:
            return False
    if isinstance(written, dict) or not isinstance(crm, list | tuple):
        return crm == written
    if len(crm) != len(written):
        return False
    left = list(crm)
    for mine in written:  # each option written matches one read back, in whatever order the CRM keeps them
        found = next((i for i, theirs in enumerate(left) if _same(theirs, mine)), None)
        if found is None:
            return False
        left.pop(found)
    return True


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float)


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None
