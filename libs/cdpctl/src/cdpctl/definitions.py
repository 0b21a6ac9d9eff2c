"""A second copy of what people define: `cdpctl definitions export` and `cdpctl definitions import`.

    cdpctl definitions export [--out FILE]              one document (JSON; YAML for a .yaml/.yml FILE)
    cdpctl definitions import FILE [--dry-run] [--replace] [--json]

A store file lost (docs/architecture.md, "a store file damaged or deleted") takes with it what people
defined there, which nothing on the bus rebuilds: computed traits, segments, journeys (every published
version, and the draft being edited), which model version is live. `export` reads them from the running services' gRPC APIs (the
document: definitions_document.py; what is read and what is left out: definitions_read.py); `import`
puts them back into a platform through the same APIs (definitions_apply.py), definition by definition:
created, unchanged, conflicting (same name, other content; never overwritten without --replace),
replaced, manual (no RPC can do it: the report says what to do) or failed (the service's refusal, with
the field it named). Importing twice changes nothing; --dry-run writes nothing and says what it would
do. A line per kind reports progress on stderr as it goes. Exit code 1 when any definition is
conflicting, manual or failed. The whole document is checked before any platform is asked anything
(definitions_document.check): a document with one wrong field changes nothing, dry run or not. Then every
definition is checked against the platform (a dry run: segments parsed here and the computed traits and
segments they read found on the platform or in the document, journeys validated by orchestration,
computed traits read as the profile service's type) before any is applied: one that fails applies
nothing, and the report names each failure (the dry run reports the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cdpctl import tls
from cdpctl.common import bearer, console, emit, out, rpc_error, service_address
from cdpctl.definitions_document import KINDS, DocumentError, document, dumps, loads, read
from cdpctl.platform import Workspace, write_private

T = TypeVar("T")


@click.group()
def definitions() -> None:
    """Export what people defined (segments, journeys, computed traits, models' roles, CRM connections)
    to one document, and import it into a platform."""


async def _with_services(ws: Workspace, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(Services)` with a channel to every service the document has a kind for."""
    from cdp.crm.v1 import crm_pb2_grpc
    from cdp.identity.v1 import identity_pb2_grpc
    from cdp.orchestration.v1 import orchestration_pb2_grpc
    from cdp.profile.v1 import profile_pb2_grpc
    from cdp.scoring.v1 import scoring_pb2_grpc
    from cdp.segmentation.v1 import segmentation_pb2_grpc
    from cdpctl.definitions_read import Services

    stub_classes = {
        "profile": profile_pb2_grpc.ProfileServiceStub,
        "segmentation": segmentation_pb2_grpc.SegmentationServiceStub,
        "scoring": scoring_pb2_grpc.ScoringServiceStub,
        "orchestration": orchestration_pb2_grpc.OrchestrationServiceStub,
        "identity": identity_pb2_grpc.IdentityServiceStub,
        "crm": crm_pb2_grpc.CrmServiceStub,
    }
    services = (ws.read_run() or {}).get("services", {})
    missing = [name for name in stub_classes if not (services.get(name) or {}).get("grpc")]
    if missing:
        raise click.ClickException(
            f"no running platform with {', '.join(missing)} found ({ws.run_file}): definitions are read from and "
            "written to profile, segmentation, scoring, orchestration, identity and crm; start it with `make up`, "
            "or name its folder with --home"
        )
    async with contextlib.AsyncExitStack() as stack:
        stubs = {}
        for service, stub_class in stub_classes.items():
            channel = await stack.enter_async_context(tls.aio_channel(service_address(ws, service, None)))
            stubs[service] = stub_class(channel)
        return await work(Services(stubs, bearer(ws)))


async def _read_all(services, progress: Callable[[str], None], what: str) -> dict[str, Any]:
    """Every section, kind by kind (a line each as it goes); a service's refusal names the kind."""
    import grpc

    from cdpctl.definitions_read import LABELS, READERS, SERVICES

    sections: dict[str, Any] = {}
    for kind, reader in READERS.items():
        try:
            sections[kind] = await reader(services)
        except grpc.aio.AioRpcError as exc:
            failed = rpc_error(exc)
            raise click.ClickException(
                f"{LABELS[kind]}: could not read them from {SERVICES[kind]}: {failed.message}"
            ) from None
        count = sections[kind] if isinstance(sections[kind], list) else [v for v in sections[kind].values() if v]
        progress(f"{LABELS[kind]}: {len(count)} {what}")
    return sections


def _progress(quiet: bool) -> Callable[[str], None]:
    return (lambda line: None) if quiet else (lambda line: console.print(line, highlight=False))


@definitions.command("export")
@click.option("--out", "out_file", type=click.Path(path_type=Path), help="write it here, owner-only (default: stdout)")
@click.pass_obj
def export(ws: Workspace, out_file: Path | None) -> None:
    """Write every definition of the running platform as one document (JSON; YAML when FILE ends in
    .yaml or .yml). No customer data, no secret; deterministic: the same definitions give the same bytes."""

    async def work(services) -> dict[str, Any]:
        sections = await _read_all(services, _progress(False), "exported")
        return document(sections, services.not_included)

    doc = asyncio.run(_with_services(ws, work))
    for gap in doc["not_included"]:
        where = f" {gap['name']}" if gap.get("name") else ""
        console.print(
            f"[yellow]not included[/] {gap['kind']}{where}: {gap['what']} ({gap['missing']})", highlight=False
        )
    text = dumps(doc, out_file)
    if out_file is None:
        sys.stdout.write(text)
        return
    write_private(out_file, text)
    console.print(f"wrote {out_file}", highlight=False)


@definitions.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="change nothing: say what would be created, replaced or left")
@click.option("--replace", is_flag=True, help="change definitions that exist here with other content (conflicting)")
@click.option("--json", "as_json", is_flag=True, help="the report as JSON on stdout")
@click.pass_obj
def import_(ws: Workspace, file: Path, dry_run: bool, replace: bool, as_json: bool) -> None:
    """Create the document's definitions that this platform lacks; report each definition as created,
    unchanged, conflicting (not overwritten without --replace), replaced, manual or failed."""
    from cdpctl.definitions_apply import FAILED, TROUBLE, Apply
    from cdpctl.definitions_read import LABELS

    try:
        doc = loads(read(file), str(file))
    except OSError as exc:
        raise click.BadParameter(f"cannot read {file}: {exc.strerror}", param_hint="FILE") from None
    except DocumentError as exc:
        raise click.ClickException(str(exc)) from None
    progress = _progress(as_json)

    async def work(services) -> tuple[list, bool]:
        present = await _read_all(services, lambda line: None, "read")
        known = {
            "traits": frozenset(
                [t["name"] for t in [*present["computed_traits"], *doc.get("computed_traits", [])]]
                + list(services.model_traits)
            ),
            "segment_ids": frozenset(s["id"] for s in [*present["segments"], *doc.get("segments", [])]),
        }

        async def run(apply) -> list:
            outcomes = []
            for kind in KINDS:
                wanted = doc.get(kind, {} if kind == "identity" else [])
                done = await getattr(apply, kind)(wanted, present[kind])
                outcomes += done
                counts: dict[str, int] = {}
                for outcome in done:
                    counts[outcome.status] = counts.get(outcome.status, 0) + 1
                summary = ", ".join(f"{n} {status}" for status, n in counts.items()) or "none in the document"
                apply.progress(f"{LABELS[kind]}: {summary}{' (dry run)' if apply.dry_run else ''}")
            return outcomes

        # Every definition is checked (a dry run) before any is applied: one that fails applies nothing.
        checked = await run(
            Apply(services, dry_run=True, replace=replace, progress=progress if dry_run else _quiet, **known)
        )
        if dry_run or any(o.status == FAILED for o in checked):
            return checked, False
        return await run(Apply(services, dry_run=False, replace=replace, progress=progress, **known)), True

    outcomes, applied = asyncio.run(_with_services(ws, work))
    failed = sum(o.status == FAILED for o in outcomes)
    stopped = not dry_run and not applied
    if as_json:
        emit({"dry_run": dry_run, "applied": applied, "definitions": [o.as_dict() for o in outcomes]})
    else:
        _report(outcomes, dry_run, stopped)
    if stopped:
        console.print(
            f"[red]nothing changed[/]: {failed} definition{'s' if failed > 1 else ''} failed the check "
            "(above); correct the document and import again",
            highlight=False,
        )
    if any(o.status in TROUBLE for o in outcomes):
        raise SystemExit(1)


def _quiet(line: str) -> None:
    pass


def _report(outcomes: list, dry_run: bool, stopped: bool = False) -> None:
    from rich.table import Table

    colours = {"created": "green", "replaced": "yellow", "conflicting": "red", "failed": "red", "manual": "yellow"}
    title = (
        " (dry run: nothing changed)"
        if dry_run
        else " (checked: a definition failed, nothing changed)"
        if stopped
        else ""
    )
    table = Table(title="definitions import" + title)
    for column in ("kind", "definition", "status", "detail"):
        table.add_column(column)
    for o in outcomes:
        colour = colours.get(o.status)
        table.add_row(o.kind, o.name, f"[{colour}]{o.status}[/]" if colour else o.status, o.detail)
    out.print(table)
