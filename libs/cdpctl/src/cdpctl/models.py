"""cdpctl models promote | rollback: change which version of a model is live, as scoring's `Promote` and
`Rollback` do.

    cdpctl models                          # every model: its live version, the others and their roles
    cdpctl models promote churn_risk 1.2.0 # make 1.2.0 live; the version it replaces is kept for rollback
    cdpctl models rollback churn_risk      # the version live before the last promotion is live again

`Promote` takes a model and a version and makes that version live (the API has no other role to promote
to: shadow and canary are given when a version is deployed). `Rollback` makes the version that was live
before the last promotion live again; the one it replaces becomes inactive. Both print what is live now
and what was, then every version with its role; `--json` prints the same as one object. A refusal is
printed as the service gives it (`NOT_FOUND: model 'churn_risk' has no version '9.9.9' (versions: ...)`,
`FAILED_PRECONDITION: ... no earlier live version to roll back to`), with the field it names.
"""

from __future__ import annotations

from typing import Any

import click

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdpctl.common import call_service, emit, enum_name, service_options
from cdpctl.platform import Workspace


def _roles(model: scoring_pb2.Model) -> list[dict[str, str]]:
    return [
        {"version": v.spec.version, "role": enum_name(scoring_pb2.Role.Name(v.role), "ROLE_")} for v in model.versions
    ]


def _change(ws: Workspace, address, as_json: bool, name: str, call) -> tuple[str, scoring_pb2.Model]:
    """(the version live before, the model after `call`): GetModel then the change, on one channel."""

    async def work(stub, metadata):
        before = await stub.GetModel(scoring_pb2.GetModelRequest(name=name), metadata=metadata, timeout=30)
        after = await call(stub, metadata)
        return before.live_version, after

    return call_service(ws, "scoring", scoring_pb2_grpc.ScoringServiceStub, address, as_json, work)


def _show(action: str, was: str, model: scoring_pb2.Model, as_json: bool) -> None:
    document: dict[str, Any] = {
        "model": model.name,
        "action": action,
        "live": model.live_version,
        "was": was,
        "changed": model.live_version != was,
        "versions": _roles(model),
    }
    if as_json:
        emit(document)
        return
    if model.live_version == was:
        click.echo(f"{model.name}: {model.live_version} was already live; nothing changed")
    else:
        click.echo(f"{model.name}: live {model.live_version or '(none)'} (was {was or '(none)'})")
    click.echo("versions: " + ", ".join(f"{v['version']} {v['role']}" for v in document["versions"]))


@click.command()
@click.argument("name")
@click.argument("version")
@service_options("scoring")
@click.pass_obj
def promote(ws: Workspace, name: str, version: str, as_json: bool, address) -> None:
    """Make VERSION of model NAME live; the version it replaces becomes inactive and is kept for rollback."""

    async def call(stub, metadata):
        request = scoring_pb2.PromoteRequest(name=name, version=version)
        return await stub.Promote(request, metadata=metadata, timeout=120)

    was, model = _change(ws, address, as_json, name, call)
    _show("promote", was, model, as_json)


@click.command()
@click.argument("name")
@service_options("scoring")
@click.pass_obj
def rollback(ws: Workspace, name: str, as_json: bool, address) -> None:
    """Make the version of model NAME that was live before the last promotion live again."""

    async def call(stub, metadata):
        return await stub.Rollback(scoring_pb2.RollbackRequest(name=name), metadata=metadata, timeout=120)

    was, model = _change(ws, address, as_json, name, call)
    _show("rollback", was, model, as_json)
