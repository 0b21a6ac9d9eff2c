"""`cdpctl privacy ledger`: the deletion notices kept beside backups, so a whole home restored from before
a deletion does not bring the person back.

Restoring every store and `nats/` from a copy older than a deletion leaves nothing that knows of it: the
stores hold the person and `PRIVACY` lacks the notice, so the collector and identity no longer suppress
them and no service erases them again (operations.md, "Backup and restore"). The notices themselves hold
no identifier value (person ids, and keyed hashes of identifiers: cdp_kit.identifier_hash), so they can be
kept where the backups are kept:

    cdpctl privacy ledger export --out deletions.json [--since 2026-01-01T00:00:00Z]
    cdpctl privacy ledger replay deletions.json [--dry-run] [--restart]

`export` writes every `privacy.deleted` notice PRIVACY holds as stored (subject, headers, body in base64,
stream sequence, time), owner-only and never through a symbolic link, with their count and a SHA-256 of
the document (a check against a damaged or edited file, not a signature). `replay` refuses a file whose
checksum does not match, then publishes, in the file's order and with their original headers (the
`Nats-Msg-Id` included), the notices whose request id PRIVACY does not hold: read from the stream itself,
not left to JetStream's duplicate window (ten minutes). A notice missing from a stream that has gone past
its sequence and holds nothing there was removed by an operator (a lifted suppression: privacy.md) and is
left out unless `--include-purged`. A second replay publishes nothing.

Once PRIVACY holds the notices again, the collector (suppressions) and the services that follow PRIVACY
with a consumer (identity, orchestration, the CRM connector) apply them as they arrive; every service with
a store also erases, at its start, each person a notice names that its store still holds: `replay
--restart` then restarts those services of the running `cdpctl up` (`cdpctl restart`: each drains, starts
again at once and is waited for until it serves); without it, `replay` says which to restart, and how.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from cdpctl.common import nats_tls, nats_url, out, write_owner_only
from cdpctl.platform import Workspace
from cdpctl.restart import restart_services

KIND = "cdp.privacy.ledger"
VERSION = 1
# The services that keep people in a store and erase, at start, the persons PRIVACY's notices name.
WITH_STORE = ("profile", "identity", "scoring", "segmentation", "orchestration", "crm")
# Messages of PRIVACY asked for at once (each a small get by sequence), as cdp_kit.bus.notices reads it.
READ_WINDOW = 256
# Seconds a whole export or replay may take before the server counts as not answering.
WHOLE = 300.0
# Seconds `replay --restart` waits for the restarted services to serve again.
RESTART_WAIT = 180.0
# Request ids a line names (the rest counted).
NAMED = 20


@dataclass
class Held:
    """What PRIVACY holds of `privacy.deleted`: its messages as ledger entries, its first and last sequence
    and the sequences between them that hold no message (removed one by one)."""

    entries: list[dict[str, Any]]
    first_seq: int = 0
    last_seq: int = 0
    gaps: set[int] = field(default_factory=set)

    def removed(self, seq: int) -> bool:
        """Whether the stream went past `seq` and holds nothing there (removed by age, purge or by hand)."""
        return 0 < seq <= self.last_seq and (seq < self.first_seq or seq in self.gaps)

    @property
    def request_ids(self) -> set[str]:
        return {entry["request_id"] for entry in self.entries}


def request_id_of(data: bytes, headers: dict[str, str]) -> str:
    """What identifies a notice: its request id (profile publishes it under `Nats-Msg-Id: privacy:<id>`);
    a body that is not a PrivacyDeleted is known by its message id."""
    from cdp.privacy.v1 import privacy_pb2

    try:
        request_id = privacy_pb2.PrivacyDeleted.FromString(data).request_id
    except Exception:  # not a notice: named by its message id below
        request_id = ""
    return request_id or headers.get("Nats-Msg-Id", "").removeprefix("privacy:")


async def read_held(js, since: datetime | None = None) -> Held:
    """Every `privacy.deleted` message PRIVACY holds (stored at `since` or later), in stream order, as
    ledger entries."""
    from nats.js.errors import NotFoundError

    from cdp_kit.bus.subjects import PRIVACY, PRIVACY_DELETED

    try:
        state = (await js.stream_info(PRIVACY)).state
    except NotFoundError:
        return Held([])
    first, last = max(state.first_seq or 0, 1), state.last_seq or 0
    held = Held([], first, last)

    async def get(seq: int):
        try:
            return await js.get_msg(PRIVACY, seq=seq)
        except NotFoundError:
            held.gaps.add(seq)
            return None

    seq = first
    while seq <= last:
        window = range(seq, min(last, seq + READ_WINDOW - 1) + 1)
        for message in await asyncio.gather(*(get(s) for s in window)):
            if message is None or message.subject != PRIVACY_DELETED:
                continue
            if since is not None and message.time is not None and message.time < since:
                continue
            headers = dict(message.headers or {})
            data = message.data or b""
            held.entries.append(
                {
                    "seq": message.seq,
                    "time": message.time.isoformat().replace("+00:00", "Z") if message.time else None,
                    "subject": message.subject,
                    "headers": headers,
                    "data": base64.b64encode(data).decode(),
                    "request_id": request_id_of(data, headers),
                }
            )
        seq = window.stop
    return held


def checksum(document: dict[str, Any]) -> str:
    """SHA-256 of the document without its checksum, as canonical JSON."""
    body = {key: value for key, value in document.items() if key != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def ledger_document(entries: list[dict[str, Any]], since: datetime | None) -> dict[str, Any]:
    from cdp_kit.bus.subjects import PRIVACY

    document = {
        "kind": KIND,
        "version": VERSION,
        "stream": PRIVACY,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "since": since.isoformat().replace("+00:00", "Z") if since else None,
        "count": len(entries),
        "notices": entries,
    }
    document["checksum"] = checksum(document)
    return document


def load_ledger(path: Path) -> dict[str, Any]:
    """The ledger in `path`, refused (naming the file) when it is not one or its checksum does not match."""
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise click.ClickException(f"{path} is not a deletion ledger (not JSON)") from None
    if not isinstance(document, dict) or document.get("kind") != KIND or not isinstance(document.get("notices"), list):
        raise click.ClickException(f"{path} is not a deletion ledger (`cdpctl privacy ledger export` writes one)")
    if document.get("version") != VERSION:
        raise click.ClickException(
            f"{path} is a ledger of version {document.get('version')!r}; this cdpctl reads {VERSION}"
        )
    if document.get("checksum") != checksum(document) or document.get("count") != len(document["notices"]):
        raise click.ClickException(
            f"{path}: its checksum does not match its contents (damaged or edited); nothing was published"
        )
    return document


@dataclass
class Replay:
    total: int  # notices in the file (one per request id)
    held: int  # of them, PRIVACY holds
    missing: list[str]  # request ids PRIVACY lacks, to publish, in the file's order
    purged: list[str]  # request ids an operator removed from PRIVACY, left out
    published: list[str]  # request ids published


async def replay_ledger(js, document: dict[str, Any], *, dry_run: bool, include_purged: bool) -> Replay:
    """Publish the ledger's notices PRIVACY lacks (see the module docstring); what was found and done."""
    held = await read_held(js)
    in_stream = held.request_ids
    seen: set[str] = set()
    to_publish: list[dict[str, Any]] = []
    missing: list[str] = []
    purged: list[str] = []
    count_held = 0
    for entry in document["notices"]:
        data = base64.b64decode(entry["data"])
        request_id = request_id_of(data, entry.get("headers") or {})
        if request_id in seen:
            continue
        seen.add(request_id)
        if request_id in in_stream:
            count_held += 1
            continue
        seq = int(entry.get("seq") or 0)
        if not include_purged and held.removed(seq):
            purged.append(request_id)
            continue
        missing.append(request_id)
        to_publish.append(entry)
    published: list[str] = []
    if dry_run or not to_publish:
        return Replay(len(seen), count_held, missing, purged, published)
    failed: list[str] = []
    for entry, request_id in zip(to_publish, missing, strict=True):
        ack = await js.publish(entry["subject"], base64.b64decode(entry["data"]), headers=entry.get("headers") or None)
        (failed if ack.duplicate else published).append(request_id)
    # What counts is what the stream holds now, not what the acks said.
    now_held = (await read_held(js)).request_ids
    failed += [rid for rid in published if rid not in now_held]
    if failed:
        raise click.ClickException(
            f"PRIVACY did not store {len(failed)} of the {len(missing)} missing notices (requests "
            f"{_named(failed)}): JetStream took them for duplicates of messages within its duplicate window "
            "(ten minutes for PRIVACY). Run the replay again once it has passed"
        )
    return Replay(len(seen), count_held, missing, purged, published)


def _named(request_ids: list[str]) -> str:
    shown = ", ".join(request_ids[:NAMED])
    return shown + (f" and {len(request_ids) - NAMED} more" if len(request_ids) > NAMED else "")


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time (2026-01-31T00:00:00Z)", param_hint="--since"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _on_bus(ws: Workspace, url: str, work):
    """Run `work(js)` on one connection as cdpctl's user; a server that does not answer ends the command
    with an error naming it."""
    from cdpctl.bus import answered, connect

    async def run():
        nc = await connect(url, nats_tls(ws, url))
        try:
            return await work(nc.jetstream())
        finally:
            await nc.close()

    return answered(url, run(), WHOLE, ws)


@click.group()
def privacy() -> None:
    """Privacy records the operator keeps: `privacy ledger` (the deletions, to replay after a restore)."""


@privacy.group()
def ledger() -> None:
    """The deletion ledger: every privacy.deleted notice, kept beside backups and replayed after a whole
    home is restored from before a deletion (operations.md, "Backup and restore")."""


@ledger.command("export")
@click.option(
    "--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path), help="the file (owner-only)"
)
@click.option("--since", help="only notices stored at this ISO 8601 time or later")
@click.option("--nats", "nats_address", help="NATS URL (default: the one `cdpctl up` runs)")
@click.pass_obj
def export(ws: Workspace, out_file: Path, since: str | None, nats_address: str | None) -> None:
    """Write every privacy.deleted notice PRIVACY holds, as stored, to --out: person ids and hashed
    identifiers only, never their values, with their count and a checksum."""
    after = _since(since)
    url = nats_url(ws, nats_address)
    held: Held = _on_bus(ws, url, lambda js: read_held(js, after))
    document = ledger_document(held.entries, after)
    write_owner_only(out_file, json.dumps(document, indent=1) + "\n")
    seqs = [entry["seq"] for entry in held.entries]
    where = f" (PRIVACY sequences {seqs[0]} to {seqs[-1]})" if seqs else ""
    out.print(
        f"exported {document['count']} deletion notices{where} to {out_file}; checksum {document['checksum']}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@ledger.command("replay")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="say what is missing, publish nothing")
@click.option(
    "--include-purged",
    is_flag=True,
    help="also publish notices an operator removed from PRIVACY (a lifted suppression)",
)
@click.option(
    "--restart",
    "restart_after",
    is_flag=True,
    help="then restart every service with a store of the running `cdpctl up` (cdpctl restart), for the erasure to run",
)
@click.option("--nats", "nats_address", help="NATS URL (default: the one `cdpctl up` runs)")
@click.pass_obj
def replay(
    ws: Workspace, file: Path, dry_run: bool, include_purged: bool, restart_after: bool, nats_address: str | None
) -> None:
    """Publish to PRIVACY each notice of FILE it lacks (by request id), in the file's order, with its
    original headers; then restart the services with a store (--restart), or say which to restart, for the
    erasure to run."""
    document = load_ledger(file)
    url = nats_url(ws, nats_address)
    result: Replay = _on_bus(
        ws, url, lambda js: replay_ledger(js, document, dry_run=dry_run, include_purged=include_purged)
    )
    say = lambda text: out.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"{file}: {result.total} deletion notices; PRIVACY holds {result.held}, lacks {len(result.missing)}")
    if result.purged:
        say(
            f"left out {len(result.purged)} that an operator removed from PRIVACY (a lifted suppression): "
            f"{_named(result.purged)}; --include-purged publishes them too"
        )
    if dry_run:
        if result.missing:
            say(f"would publish {len(result.missing)}: {_named(result.missing)} (--dry-run: nothing published)")
        return
    if not result.published:
        say("published 0: nothing was missing")
        return
    say(f"published {len(result.published)}: {_named(result.published)}")
    say(
        "The collector and identity suppress these persons again now. For their erasure to run, restart "
        f"every service with a store: {', '.join(WITH_STORE)} (each erases, at start, the persons PRIVACY's "
        "notices name that its store holds)."
    )
    state = ws.running() or {}
    local = [name for name in WITH_STORE if name in (state.get("services") or {})]
    if restart_after:
        if state.get("nats") != url or not local:
            raise click.ClickException(
                "--restart restarts the services of the `cdpctl up` this home runs, and none runs on this NATS: "
                "restart them yourself (in Kubernetes: `kubectl rollout restart` of their deployments)"
            )
        say(f"restarting {', '.join(local)} …")
        late = restart_services(ws, local, RESTART_WAIT)
        if late:
            raise click.ClickException(
                f"not serving again within {RESTART_WAIT:.0f} s: {', '.join(late)} (`cdpctl status` shows where "
                "they are); each erases the persons at its start"
            )
        say("every service with a store restarted: each erased, at its start, the persons the notices name")
    elif state.get("nats") == url and local:
        say(f"Under `make up`: `cdpctl restart {' '.join(local)}` (or replay with --restart).")
    else:
        say(
            "Under `make up`: `cdpctl restart` those services. In Kubernetes: `kubectl rollout restart` their deployments."
        )
