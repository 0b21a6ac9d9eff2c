"""cdpctl models promote | rollback | explain: change which version of a model is live, as scoring's
`Promote` and `Rollback` do; explain a person's score with `ExplainScore`.

    cdpctl models                          # every model: its live version, the others and their roles
    cdpctl models promote churn_risk 1.2.0 # make 1.2.0 live; the version it replaces is kept for rollback
    cdpctl models rollback churn_risk      # the version live before the last promotion is live again
    cdpctl models explain churn_risk user_id u1   # why the person's score is what it is, feature by feature

`Promote` takes a model and a version and makes that version live (the API has no other role to promote
to: shadow and canary are given when a version is deployed). `Rollback` makes the version that was live
before the last promotion live again; the one it replaces becomes inactive. Both print what is live now
and what was, then every version with its role; `--json` prints the same as one object. A refusal is
printed as the service gives it (`NOT_FOUND: model 'churn_risk' has no version '9.9.9' (versions: ...)`,
`FAILED_PRECONDITION: ... no earlier live version to roll back to`), with the field it names.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdpctl.common import call_service, emit, enum_name, person_key, resolve_person, service_options
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


# ------------------------------------------------------------------------------------------------ explain

TOP = 10  # features listed per direction
BAR = 24  # characters of the widest bar


def _baseline_words(features: list[scoring_pb2.FeatureContribution]) -> str:
    medians = sum(1 for f in features if f.baseline == "training_median")
    if medians == len(features):
        return "every feature at its training median"
    if medians == 0:
        return "every feature at its default (no training reference)"
    return f"{medians} features at their training median, {len(features) - medians} at their default"


def explanation_lines(explained: scoring_pb2.ExplainedScore) -> list[str]:
    """One score: its value, the baseline's, then the features pushing it up and down (the largest first,
    TOP each) with a bar scaled to the largest contribution shown; features without a value are marked."""
    features = list(explained.features)
    lines = [
        f"{explained.score}: {explained.value:.4g}",
        f"  baseline {explained.baseline_value:.4g} ({_baseline_words(features)})",
    ]
    up = [f for f in features if f.contribution > 0][:TOP]
    down = [f for f in features if f.contribution < 0][:TOP]
    largest = max((abs(f.contribution) for f in up + down), default=0.0)
    width = max((len(f.name) for f in up + down), default=0)
    for title, shown in (("pushing it up", up), ("pushing it down", down)):
        lines.append(f"  {title}:" if shown else f"  {title}: none")
        for f in shown:
            bar = "█" * max(1, round(abs(f.contribution) / largest * BAR)) if largest else ""
            mark = "  (no value: default used)" if f.missing else ""
            lines.append(f"    {f.name:<{width}}  {f.contribution:+.4f}  {bar:<{BAR}}{mark}".rstrip())
    missing = [f.name for f in features if f.missing]
    if missing:
        lines.append(f"  no value (default used): {', '.join(missing)}")
    return lines


@click.command()
@click.argument("name")
@click.argument("person", nargs=-1, required=True)
@click.option("--version", default="", help="the version to explain (default: the one scoring the person now)")
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@service_options("scoring")
@click.pass_obj
def explain(ws: Workspace, name: str, person, version: str, identity_address, as_json: bool, address) -> None:
    """Why a person (PERSON_ID, or TYPE VALUE) has the score model NAME gives them: each score, the score of
    a typical person (every feature at its baseline: the training median), then the features pushing it up
    and down, each by how much the score moves when that feature alone is set to its baseline. Features
    whose field the person has no value in are marked. Never the person's values."""
    from google.protobuf import json_format

    key = person_key(person)
    person_id = key[0] if len(key) == 1 else asyncio.run(resolve_person(ws, identity_address, key))

    async def work(stub, metadata):
        request = scoring_pb2.ExplainScoreRequest(model=name, person_id=person_id, version=version)
        return await stub.ExplainScore(request, metadata=metadata, timeout=30)

    reply = call_service(ws, "scoring", scoring_pb2_grpc.ScoringServiceStub, address, as_json, work)
    if as_json:
        emit(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True))
        return
    role = enum_name(scoring_pb2.Role.Name(reply.role), "ROLE_")
    click.echo(f"{reply.model} {reply.version} ({role}) for {reply.person_id}")
    for explained in reply.scores:
        for line in explanation_lines(explained):
            click.echo(line)
