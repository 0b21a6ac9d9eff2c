"""Operator commands on identity's record matching: the model it scores with, as a data steward reads it.

    cdpctl identity model show           where the model comes from (fitted on the pool, a file, the shipped
                                         default), EM's iterations and whether it converged, λ, each
                                         comparison level's m, u and weight, term frequencies summarised
    cdpctl identity model export FILE    the model as the JSON document CDP_IDENTITY_MATCHING_FILE loads

Both take --json (show: the GetMatchingModel answer as JSON; a refused call becomes
{"error": {"code", "message", "fields"}} on stdout, exit code 1) and --address (default: the identity
`cdpctl up` runs). There is no import: identity reads CDP_IDENTITY_MATCHING_FILE at start, and weights
loaded from it are used as they are, never refitted. Term frequencies are shown as counts and shares
only, never value by value (a list of surnames is personal data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdpctl.common import as_dict, call_service, emit, out, service_options
from cdpctl.platform import Workspace

_options = service_options("identity")

ORIGINS = {
    "fitted": "fitted by EM on this identity's match pool",
    "file": "loaded from CDP_IDENTITY_MATCHING_FILE at start (never refitted)",
    "default": "the shipped parameters (until the pool is big enough to fit its own)",
    "unfitted": "no parameters yet (the pool is too small to fit)",
}


def _model(ws: Workspace, address: str | None, as_json: bool) -> identity_pb2.GetMatchingModelResponse:
    async def work(stub, md):
        return await stub.GetMatchingModel(identity_pb2.GetMatchingModelRequest(), metadata=md, timeout=30)

    return call_service(ws, "identity", identity_pb2_grpc.IdentityServiceStub, address, as_json, work)


@click.group()
def identity() -> None:
    """Identity's record matching."""


@identity.group()
def model() -> None:
    """The matching model: show it, export it.

    Identity reads its model from CDP_IDENTITY_MATCHING_FILE at start (there is no import while it runs):
    export the fitted model to a file, point CDP_IDENTITY_MATCHING_FILE at it and restart identity to
    score with exactly these weights."""


@model.command("show")
@_options
@click.pass_obj
def model_show(ws: Workspace, as_json: bool, address: str | None) -> None:
    """λ, each comparison level's m, u and weight, EM's iterations and convergence, term frequencies."""
    reply = _model(ws, address, as_json)
    if as_json:
        document = as_dict(reply)
        document.pop("modelJson", None)  # `export` writes it; here the same numbers are laid out
        emit(document)
        return
    _show(reply)


@model.command("export")
@click.argument("file", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@_options
@click.pass_obj
def model_export(ws: Workspace, file: Path, as_json: bool, address: str | None) -> None:
    """Write the model to FILE as CDP_IDENTITY_MATCHING_FILE loads it (format, config, fitted weights)."""
    reply = _model(ws, address, as_json)
    document = json.loads(reply.model_json)
    try:
        file.write_text(json.dumps(document, indent=1) + "\n")
    except OSError as exc:
        raise click.ClickException(f"cannot write {file}: {exc.strerror}") from None
    summary = {"file": str(file), "origin": reply.origin, "fitted": document.get("parameters") is not None}
    if as_json:
        emit(summary)
    elif summary["fitted"]:
        out.print(f"model ({reply.origin}) written to {file}; start identity with CDP_IDENTITY_MATCHING_FILE={file}")
    else:
        out.print(f"configuration written to {file} (no fitted weights yet: identity fits them on its pool)")


def _show(reply: identity_pb2.GetMatchingModelResponse) -> None:
    lines = [f"origin      {reply.origin}: {ORIGINS.get(reply.origin, '')}"]
    if reply.origin == "fitted":
        state = "converged" if reply.em_converged else "[yellow]did not converge[/]"
        lines.append(f"EM          {state} after {reply.em_iterations} iterations on {reply.fitted_on_records} records")
    if not reply.levels:
        out.print("\n".join(lines))
        return
    lines.append(f"λ           {reply.random_match_probability:.4g} (two records drawn at random are one person)")
    out.print("\n".join(lines))
    table = Table(title="comparison levels (weight = log2 m/u)")
    for column, justify in (("comparison", "left"), ("level", "left"), ("m", "right"), ("u", "right"),
                            ("weight", "right")):  # fmt: skip
        table.add_column(column, justify=justify)
    previous = ""
    for level in reply.levels:
        table.add_row(
            level.comparison if level.comparison != previous else "",
            level.level,
            f"{level.m:.4f}",
            f"{level.u:.3e}",
            _weight(level.weight),
        )
        previous = level.comparison
    out.print(table)
    if reply.term_frequencies:
        table = Table(title="term frequencies (exact agreement against strangers weighs more on a rare value)")
        for column in ("comparison", "records", "distinct", "most common", "median", "weight: most common",
                       "weight: rarest"):  # fmt: skip
            table.add_column(column, justify="left" if column == "comparison" else "right")
        for summary in reply.term_frequencies:
            table.add_row(
                summary.comparison,
                str(summary.records),
                str(summary.distinct_values),
                f"{summary.most_common_share:.2%}",
                f"{summary.median_share:.3%}",
                _weight(summary.weight_most_common),
                _weight(summary.weight_rarest),
            )
        out.print(table)


def _weight(value: float) -> str:
    colour: Any = "green" if value > 0 else "red" if value < 0 else "white"
    return f"[{colour}]{value:+.2f}[/]"


COMMANDS = (identity,)
