"""cdpctl models train MODEL: retrain a model on the running platform's own customers and register it.

    cdpctl models train churn_risk --cutoff 2025-03-01        # shadow beside live; promoted only on evidence

The run is `cdp_training.learn` (see its docstring): a point-in-time training set read from the profile
service's store (the workspace's `data/profile.db`, or --store), the candidate and the live version judged
on a later slice, then, through the scoring service's API, `DeployModel` in shadow and `Promote` when the
candidate beats live by --margin. The decision and its reason are printed and kept in the version's spec
(`cdpctl models --json` shows them).

Training needs the `cdp-training` workspace package (LightGBM, scikit-learn): it is installed with the
workspace (`make env`), never in the image; cdpctl imports it only for this command.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
import grpc

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdpctl.common import console, service_address
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
        self.channel = grpc.insecure_channel(address)
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
@click.option("--cutoff", required=True, help="train on what was known at this time (2025-03-01 or an ISO time)")
@click.option("--evaluate-at", help="the later slice's cut-off [default: cutoff + the label window]")
@click.option("--label", type=click.Path(exists=True, path_type=Path), help="a JSON label spec [default: the model's]")
@click.option("--margin", type=float, default=None, help="AUC gain over live needed to promote [default: 0.005]")
@click.option("--store", help="the profile service's store URL [default: the workspace's data/profile.db]")
@click.option("--out", type=click.Path(path_type=Path), help="also write the file and its record here")
@click.option("--address", help="scoring gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def train(ws: Workspace, model: str, cutoff: str, evaluate_at, label, margin, store, out, address) -> None:
    """Retrain MODEL on this platform's customers; register it in shadow, promote it only on evidence."""
    try:
        from cdp_kit.errors import CdpError
        from cdp_training import learn
    except ImportError:
        raise click.ClickException(
            "training needs the cdp-training workspace package (LightGBM, scikit-learn): run `make env`"
        ) from None
    address = service_address(ws, "scoring", address)
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
    result = learn.train_run(
        model,
        profiles,
        cutoff=learn.parse_time(cutoff, "cutoff"),
        evaluate_at=learn.parse_time(evaluate_at, "evaluate_at") if evaluate_at else None,
        label=json.loads(label.read_text()) if label else None,
        live=live,
        margin=learn.DEFAULT_MARGIN if margin is None else margin,
        log=console.print,
    )
    role = await learn.register(registry, result, had_live=live is not None)
    return result, role
