"""cdpctl models train | drift | quality: retrain a model on the running platform's own customers, and
watch the live ones.

    cdpctl models train churn_risk                     # on the platform: shadow beside live, promoted on evidence
    cdpctl models train churn_risk --cutoff 2025-03-01 --local   # the same run in this process
    cdpctl models drift [churn_risk] [--check-now]     # population stability of features and scores
    cdpctl models quality churn_risk [--refresh]       # realised quality beside the training figures

`train` asks the scoring service to run it (`TrainModel`: the service reads the profile store in a
worker process, registers the candidate and says why it was promoted or kept in shadow; its phases
show as they end). Where the service cannot (no `CDP_SCORING_TRAINING_STORE`, or the training package
is not beside it), with `--local`, `--store` or `--out`, the run is `cdp_training.learn` here (see its
docstring): a point-in-time training set read from the profile service's store (the workspace's
`data/profile.db`, or --store), the candidate and the live version judged on a later slice, then,
through the API, `DeployModel` in shadow and `Promote` when the candidate beats live by --margin. The
decision and its reason are printed and kept in the version's spec (`cdpctl models --json` shows them).
Without --cutoff a run trains at the latest UTC midnight whose label window and evaluation slice the
store has observed.

The local run needs the `cdp-training` workspace package (LightGBM, scikit-learn): it is installed with
the workspace (`make env`), never in the image; cdpctl imports it only then.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.table import Table

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdpctl import tls
from cdpctl.common import (
    as_dict,
    bearer,
    call_service,
    console,
    emit,
    enum_name,
    out,
    rpc_error,
    service_address,
    service_options,
    short_time,
)
from cdpctl.platform import Workspace

ROLES = {"live": scoring_pb2.ROLE_LIVE, "shadow": scoring_pb2.ROLE_SHADOW}
SCORE_CHUNK = 10_000  # rows per ScoreBatch call (the service takes up to 100,000)


def _spec_dict(spec: scoring_pb2.ModelSpec) -> dict[str, Any]:
    """A ModelSpec message as the document `cdp_scoring.domain.ModelSpec.from_dict` reads."""
    from google.protobuf import json_format

    document = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    for feature in document.get("features", []):
        feature.setdefault("default", None)
    for output in document.get("outputs", []):
        output.setdefault("index", 0)
    return document


class ScoringRegistry:
    """`cdp_training.learn.ModelRegistry` over the scoring service's gRPC API (a blocking channel: the
    training run scores live's rows from synchronous code)."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = tls.channel(address)
        self.stub = scoring_pb2_grpc.ScoringServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any, timeout: float = 60) -> Any:
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise click.ClickException(f"{method}: {exc.code().name}: {exc.details()}") from None

    async def live(self, name: str):
        from cdp_scoring.domain import ModelSpec
        from cdp_training.learn import LiveModel

        try:
            model = self.stub.GetModel(scoring_pb2.GetModelRequest(name=name), metadata=self.metadata, timeout=30)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise click.ClickException(f"GetModel: {exc.code().name}: {exc.details()}") from None
        version = next((v for v in model.versions if v.role == scoring_pb2.ROLE_LIVE), None)
        if version is None:
            return None
        import numpy as np  # with cdp-training: cdpctl itself does not need it

        spec = ModelSpec.from_dict(_spec_dict(version.spec))

        def scores(rows):
            out: list = []
            names: list[str] = []
            for start in range(0, len(rows), SCORE_CHUNK):
                chunk = np.ascontiguousarray(rows[start : start + SCORE_CHUNK], dtype=np.float32)
                request = scoring_pb2.ScoreBatchRequest(model=name, version=spec.version, packed_rows=chunk.tobytes())
                answer = self._call("ScoreBatch", request)
                names = list(answer.scores)
                out.append(np.asarray(answer.values, dtype=np.float64).reshape(len(chunk), len(names)))
            values = np.concatenate(out) if out else np.empty((0, len(spec.outputs)))
            return {score: values[:, j] for j, score in enumerate(names or [o.score for o in spec.outputs])}

        return LiveModel(spec.version, spec, scores)

    async def deploy(self, data: bytes, role: str) -> None:
        self._call("DeployModel", scoring_pb2.DeployModelRequest(onnx=data, role=ROLES[role]), timeout=120)

    async def promote(self, name: str, version: str) -> None:
        self._call("Promote", scoring_pb2.PromoteRequest(name=name, version=version))


@click.command()
@click.argument("model")
@click.option("--cutoff", help="train on what was known at this time (2025-03-01 or an ISO time) [default: latest]")
@click.option("--evaluate-at", help="the later slice's cut-off [default: cutoff + the label window]")
@click.option("--label", type=click.Path(exists=True, path_type=Path), help="a JSON label spec [default: the model's]")
@click.option("--margin", type=float, default=None, help="AUC gain over live needed to promote [default: 0.005]")
@click.option("--store", help="the profile service's store URL [default: the workspace's data/profile.db]")
@click.option("--out", type=click.Path(path_type=Path), help="also write the file and its record here")
@click.option("--local", is_flag=True, help="run the training here, not in the scoring service")
@click.option("--address", help="scoring gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def train(ws: Workspace, model: str, cutoff, evaluate_at, label, margin, store, out, local, address) -> None:
    """Retrain MODEL on this platform's customers; register it in shadow, promote it only on evidence."""
    address = service_address(ws, "scoring", address)
    if not (local or store or out):
        outcome = asyncio.run(_train_on_service(address, bearer(ws), model, cutoff, evaluate_at, label, margin))
        if outcome is not None:
            console.print(f"{model} {outcome['version']}: {outcome['role']}. {outcome['decision']['reason']}")
            click.echo(json.dumps({"model": model, **outcome}))
            return
    try:
        from cdp_kit.errors import CdpError
        from cdp_training import learn
    except ImportError:
        raise click.ClickException(
            "training needs the cdp-training workspace package (LightGBM, scikit-learn): run `make env`"
        ) from None
    store = store or f"sqlite:///{ws.data_dir / 'profile.db'}"
    registry = ScoringRegistry(address, ws.admin_token())
    try:
        result, role = asyncio.run(_run(learn, registry, model, store, cutoff, evaluate_at, label, margin))
    except CdpError as error:
        raise click.ClickException(f"{error}") from None
    finally:
        registry.close()
    if out is not None:
        learn.write_run(result, out)
    decision = result.decision
    console.print(f"{model} {result.version}: {role}. {decision['reason']}")
    click.echo(json.dumps({"model": model, "version": result.version, "role": role, "decision": decision}))


async def _run(learn, registry: ScoringRegistry, model, store, cutoff, evaluate_at, label, margin):
    live = await registry.live(model)
    console.print(f"reading the profile store ({store.split('://', 1)[0]})")
    profiles = await learn.read_store(store)
    label = json.loads(label.read_text()) if label else None
    if not cutoff:
        spec_label = label or learn.label_for(model, live.spec if live else None)
        cutoff = learn.iso(learn.default_cutoff(profiles, spec_label))
    result = learn.train_run(
        model,
        profiles,
        cutoff=learn.parse_time(cutoff, "cutoff"),
        evaluate_at=learn.parse_time(evaluate_at, "evaluate_at") if evaluate_at else None,
        label=label,
        live=live,
        margin=learn.DEFAULT_MARGIN if margin is None else margin,
        log=console.print,
    )
    role = await learn.register(registry, result, had_live=live is not None)
    return result, role


# Where the service cannot train (the reason its FAILED_PRECONDITION carries): the run goes local.
UNAVAILABLE = "training_unavailable"


def _reason(exc: grpc.aio.AioRpcError) -> str:
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        return ""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def _train_on_service(address, metadata, model, cutoff, evaluate_at, label, margin) -> dict[str, Any] | None:
    """TrainModel, its phases printed as they end; the outcome, or None when the service cannot train."""
    from google.protobuf import json_format

    request = scoring_pb2.TrainModelRequest(model=model, cutoff=cutoff or "", evaluate_at=evaluate_at or "")
    if margin is not None:
        request.margin = margin
    if label is not None:
        json_format.ParseDict(json.loads(label.read_text()), request.label)
    async with tls.aio_channel(address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        try:
            last = None
            async for progress in stub.TrainModel(request, metadata=metadata):
                last = progress
                if not progress.done:
                    console.print(f"[{progress.elapsed_seconds:5.1f}s] {progress.phase}: {progress.message}")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED or (
                exc.code() == grpc.StatusCode.FAILED_PRECONDITION and _reason(exc) == UNAVAILABLE
            ):
                console.print(f"the scoring service does not train here ({exc.details()}): training locally")
                return None
            raise rpc_error(exc) from None
    if last is None or not last.done:
        raise click.ClickException("the training run ended without a decision")
    return {
        "version": last.version,
        "role": enum_name(scoring_pb2.Role.Name(last.role), "ROLE_"),
        "decision": json_format.MessageToDict(last.decision),
    }


@click.command()
@click.argument("model", required=False)
@click.option("--check-now", is_flag=True, help="check the rows counted so far instead of the last scheduled check")
@service_options("scoring")
@click.pass_obj
def drift(ws: Workspace, model, check_now: bool, as_json: bool, address) -> None:
    """Population stability of each model version's features and scores against its training reference."""

    async def work(stub, metadata):
        request = scoring_pb2.GetDriftRequest(model=model or "", check_now=check_now)
        return await stub.GetDrift(request, metadata=metadata, timeout=30)

    reply = call_service(ws, "scoring", scoring_pb2_grpc.ScoringServiceStub, address, as_json, work)
    if as_json:
        emit(as_dict(reply).get("models", []))
        return
    table = Table(title="drift (population stability index; above the threshold: drifted)")
    # aged: the values compared against the training reference aged by the time since it was taken (clock
    # features such as days since sign-up, and scores), where that gave the smaller PSI, which counts.
    for column in ("model", "version", "role", "status", "rows", "checked", "worst", "aged"):
        table.add_column(column)
    for item in reply.models:
        worst = sorted(item.values, key=lambda v: -v.psi)[:3]
        table.add_row(
            item.model,
            item.version,
            enum_name(scoring_pb2.Role.Name(item.role), "ROLE_"),
            item.status,
            f"{item.rows} (+{item.pending_rows})",
            short_time(item.checked_at.ToJsonString()) if item.HasField("checked_at") else "",
            ", ".join(f"{v.kind} {v.name} {v.psi:.3f}" + (" (aged)" if v.aged else "") for v in worst),
            ", ".join(v.name for v in item.values if v.aged),
        )
    out.print(table)


@click.command()
@click.argument("model")
@click.option("--refresh", is_flag=True, help="compute it now from the profile store (takes a while)")
@service_options("scoring")
@click.pass_obj
def quality(ws: Workspace, model: str, refresh: bool, as_json: bool, address) -> None:
    """MODEL's live version: its realised quality on the latest closed label window beside its training figures."""

    async def work(stub, metadata):
        request = scoring_pb2.GetModelQualityRequest(name=model, refresh=refresh)
        return await stub.GetModelQuality(request, metadata=metadata, timeout=600)

    reply = call_service(ws, "scoring", scoring_pb2_grpc.ScoringServiceStub, address, as_json, work)
    document = as_dict(reply)
    if as_json:
        emit(document)
        return
    training, realised = document.get("training", {}), document.get("realised", {})
    if not realised:
        console.print(f"{model} {reply.version}: no realised quality yet (cdpctl models quality {model} --refresh)")
    else:
        console.print(
            f"{model} {reply.version}: label {json.dumps(realised.get('label'))}, "
            f"rows at {realised.get('cutoff')} labelled until {realised.get('label_until')}: {realised.get('rows')}"
        )
    table = Table(title=f"{model} {reply.version}")
    for column in ("figure", "training (held-out)", "realised"):
        table.add_column(column)
    holdout = training.get("holdout", {}) if isinstance(training.get("holdout"), dict) else {}
    for key in ("auc", "brier", "ece_10_bins", "base_rate", "mean_prediction", "top1_accuracy"):
        trained = training.get(key, holdout.get(key))
        if trained is None and key not in realised:
            continue
        table.add_row(key, _figure(trained), _figure(realised.get(key)))
    # When and why the realised figures were computed, and whether newer labels wait for the next computation.
    if realised:
        table.add_row("labelled rows", _figure(training.get("holdout_rows")), str(reply.labelled_rows))
        table.add_row("computed (UTC)", "", short_time(reply.computed_at.ToJsonString()))
        table.add_row("trigger", "", reply.trigger)
    if reply.HasField("stale_since"):  # labels arrived, or a window closed, since: new figures are on their way
        table.add_row(
            "stale since (UTC)", "", f"{short_time(reply.stale_since.ToJsonString())} ({reply.stale_trigger})"
        )
    out.print(table)
    bins = realised.get("reliability", [])
    if bins:
        reliability = Table(title="reliability (realised)")
        for column in ("predicted", "rows", "mean predicted", "observed"):
            reliability.add_column(column)
        for b in bins:
            reliability.add_row(
                f"{b['from']:.1f}-{b['to']:.1f}",
                str(int(b["rows"])),
                _figure(b.get("meanPredicted", b.get("mean_predicted"))),
                _figure(b.get("observedRate", b.get("observed_rate"))),
            )
        out.print(reliability)


def _figure(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
