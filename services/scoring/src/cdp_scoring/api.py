"""gRPC ScoringService: protobuf in, engine and registry calls, protobuf out."""

from __future__ import annotations

import math

import numpy as np
from google.protobuf import json_format

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_kit.interceptors import current_caller
from cdp_kit.storage.port import check_key
from cdp_kit.timestamps import set_seconds
from cdp_scoring.domain.registry import CANARY, INACTIVE, LIVE, SHADOW, ModelEntry, Version
from cdp_scoring.drift import DriftReport
from cdp_scoring.engine import ScoreResult, ScoringEngine
from cdp_scoring.explain import Explainer

#: What a caller of `Score` for a person needs besides scoring:read to get the person's feature vector.
PERSON_FEATURES_SCOPE = "profile:read"

SCOPES = {
    "Score": "scoring:read",
    "ScoreBatch": "scoring:read",
    "ListModels": "scoring:read",
    "GetModel": "scoring:read",
    "ScoreAll": "scoring:admin",
    "DeployModel": "scoring:admin",
    "Promote": "scoring:admin",
    "Rollback": "scoring:admin",
    "TrainModel": "scoring:admin",
    "GetDrift": "scoring:read",
    "GetModelQuality": "scoring:read",
    # Which features moved a person's score and by how much, never their values: a reader's question.
    "ExplainScore": "scoring:read",
}

ROLE_TO_PB = {
    LIVE: scoring_pb2.ROLE_LIVE,
    SHADOW: scoring_pb2.ROLE_SHADOW,
    CANARY: scoring_pb2.ROLE_CANARY,
    INACTIVE: scoring_pb2.ROLE_INACTIVE,
}
PB_TO_ROLE = {v: k for k, v in ROLE_TO_PB.items()}
MAX_ROWS = 100_000
MAX_PERSONS = 1000
MAX_MODEL_BYTES = 64 * 1024 * 1024


def spec_message(version: Version) -> scoring_pb2.ModelSpec:
    spec = version.spec
    message = scoring_pb2.ModelSpec(
        name=spec.name, version=spec.version, owner=spec.owner, description=spec.description, input=spec.input
    )
    for feature in spec.features:
        item = message.features.add(
            name=feature.name, path=feature.path, transform=feature.transform, categories=feature.categories
        )
        if feature.default is None:
            item.default.null_value = 0
        elif isinstance(feature.default, str):
            item.default.string_value = feature.default
        else:
            item.default.number_value = feature.default
    for output in spec.outputs:
        message.outputs.add(score=output.score, output=output.output, index=output.index, meaning=output.meaning)
    for trait in spec.computed_traits:
        json_format.ParseDict(dict(trait), message.computed_traits.add())
    json_format.ParseDict(dict(spec.training), message.training)
    json_format.ParseDict(dict(spec.quality), message.quality)
    return message


def model_message(engine: ScoringEngine, entry: ModelEntry) -> scoring_pb2.Model:
    live = entry.live
    message = scoring_pb2.Model(name=entry.name, live_version=live.version if live else "")
    for version in entry.newest_first():
        stats = engine.stats.get((entry.name, version.version))
        item = message.versions.add(
            spec=spec_message(version),
            role=ROLE_TO_PB[version.role],
            canary_percent=version.canary_percent,
            sha256=version.sha256,
            size_bytes=version.size_bytes,
            rows_scored=stats.rows if stats else 0,
            mean_abs_diff_to_live=stats.mean_abs_diff if stats else 0.0,
        )
        set_seconds(item.deployed_at, version.deployed_at)
    return message


def result_message(result: ScoreResult, *, features: bool = True) -> scoring_pb2.ModelScores:
    message = scoring_pb2.ModelScores(
        model=result.model,
        version=result.version,
        role=ROLE_TO_PB[result.role],
        features=result.features if features else (),
    )
    message.scores.update(result.scores)
    return message


def drift_message(report: DriftReport) -> scoring_pb2.ModelDrift:
    message = scoring_pb2.ModelDrift(
        model=report.model,
        version=report.version,
        role=ROLE_TO_PB[report.role],
        status=report.status,
        threshold=report.threshold,
        rows=report.rows,
        pending_rows=report.pending,
        reference_rows=report.reference_rows,
    )
    if report.since:
        set_seconds(message.since, report.since)
    if report.checked_at:
        set_seconds(message.checked_at, report.checked_at)
    aged = set(report.aged)
    for name, kind, value in report.values:
        message.values.add(name=name, kind=kind, psi=value, aged=f"{kind}:{name}" in aged)
    return message


def alert_message(report: DriftReport, retrain_started: bool) -> scoring_pb2.DriftAlert:
    """The payload of `models.drift`."""
    message = scoring_pb2.DriftAlert(
        drift=drift_message(report), retrain_started=retrain_started, newly_drifted=report.newly_drifted
    )
    aged = set(report.aged)
    for name, kind, value in sorted(report.over, key=lambda v: -v[2]):
        message.over.add(name=name, kind=kind, psi=value, aged=f"{kind}:{name}" in aged)
    return message


def progress_message(item: dict) -> scoring_pb2.TrainProgress:
    message = scoring_pb2.TrainProgress(
        phase=item.get("phase", ""),
        rows=item.get("rows", 0),
        percent=item.get("percent", 0.0),
        message=item.get("message", ""),
        elapsed_seconds=item.get("elapsed", 0.0),
        done=item.get("done", False),
        version=item.get("version", ""),
        role=ROLE_TO_PB.get(item.get("role", ""), scoring_pb2.ROLE_UNSPECIFIED),
        promoted=item.get("promoted", False),
        reason=item.get("reason", ""),
    )
    if "decision" in item:
        json_format.ParseDict(dict(item["decision"]), message.decision)
    return message


class ScoringApi(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(
        self,
        engine: ScoringEngine,
        *,
        check_drift=None,
        training=None,
        quality=None,
        explainer: Explainer | None = None,
    ) -> None:
        self.engine = engine
        # A person of another replica's partition is asked of that replica (explain.py); None: this engine
        # answers for the persons it holds.
        self.explainer = explainer if explainer is not None else Explainer(engine)
        self.check_drift = check_drift  # async (): a drift check now, alerting as the schedule does
        self.training = training  # training_runs.TrainingRuns
        self.quality = quality  # quality.RealisedQuality

    async def Score(self, request: scoring_pb2.ScoreRequest, context) -> scoring_pb2.ScoreResponse:
        engine = self.engine
        given = [bool(request.person_id), bool(request.features), bool(request.named_features)]
        if sum(given) != 1:
            raise InvalidArgument(
                "person_id", "give exactly one of person_id, features (a raw vector) or named_features"
            )
        features = True
        if request.person_id:
            results = await engine.score_person(request.person_id, model=request.model, version=request.version)
            # A person's feature vector is their profile's values (order counts, spend, days since signup):
            # returned to a caller that may read the profile, not to every holder of scoring:read.
            features = current_caller().allows(PERSON_FEATURES_SCOPE)
        else:
            _check_finite(request.features, "features")
            row = dict(request.named_features) if request.named_features else list(request.features)
            results = [await engine.score_vector(request.model, request.version, row)]
        return scoring_pb2.ScoreResponse(
            person_id=request.person_id, results=[result_message(r, features=features) for r in results]
        )

    async def ScoreBatch(self, request: scoring_pb2.ScoreBatchRequest, context) -> scoring_pb2.ScoreBatchResponse:
        engine = self.engine
        if not request.model:
            raise InvalidArgument("model", "is required")
        forms = [bool(request.rows), bool(request.packed_rows), bool(request.person_ids)]
        if sum(forms) != 1:
            raise InvalidArgument("rows", "give exactly one of rows, packed_rows or person_ids")
        missing: list[str] = []
        if request.person_ids:
            if len(request.person_ids) > MAX_PERSONS:
                raise InvalidArgument(
                    "person_ids", f"{len(request.person_ids)} persons; at most {MAX_PERSONS} per call"
                )
            version, scores, missing = await engine.score_persons(request.model, request.version, request.person_ids)
        else:
            target = engine.resolve_version(request.model, request.version, None)
            width = len(target.spec.features)
            if request.packed_rows:
                if len(request.packed_rows) % (4 * width):
                    raise InvalidArgument(
                        "packed_rows",
                        f"{len(request.packed_rows)} bytes is not a whole number of rows of {width} float32 values",
                    )
                matrix = np.frombuffer(request.packed_rows, dtype="<f4").reshape(-1, width)
            else:
                for i, row in enumerate(request.rows):
                    if len(row.values) != width:
                        raise InvalidArgument(
                            f"rows[{i}].values", f"{len(row.values)} values; {target.spec.key} takes {width}"
                        )
                matrix = np.asarray([row.values for row in request.rows], dtype=np.float32)
            if matrix.shape[0] > MAX_ROWS:
                raise InvalidArgument("rows", f"{matrix.shape[0]} rows; at most {MAX_ROWS} per call")
            version, scores = await engine.score_matrix(request.model, request.version, matrix)
        return scoring_pb2.ScoreBatchResponse(
            model=version.spec.name,
            version=version.version,
            scores=version.spec.score_names,
            values=scores.ravel().tolist(),
            missing=missing,
        )

    async def ScoreAll(self, request: scoring_pb2.ScoreAllRequest, context):
        async for progress in self.engine.score_all(request.model, publish=request.publish):
            yield scoring_pb2.ScoreAllProgress(
                persons_done=progress["done"],
                persons_total=progress["total"],
                scores_published=progress["published"],
                done=progress["finished"],
                elapsed_seconds=progress["elapsed"],
            )

    async def ListModels(self, request: scoring_pb2.ListModelsRequest, context) -> scoring_pb2.ListModelsResponse:
        entries = sorted(self.engine.registry, key=lambda e: e.name)
        return scoring_pb2.ListModelsResponse(models=[model_message(self.engine, e) for e in entries])

    async def GetModel(self, request: scoring_pb2.GetModelRequest, context) -> scoring_pb2.Model:
        if not request.name:
            raise InvalidArgument("name", "is required")
        return model_message(self.engine, self.engine.registry.get(request.name))

    async def DeployModel(self, request: scoring_pb2.DeployModelRequest, context) -> scoring_pb2.Model:
        if not request.onnx:
            raise InvalidArgument("onnx", "is required: the bytes of an .onnx file carrying its spec")
        if len(request.onnx) > MAX_MODEL_BYTES:
            raise InvalidArgument("onnx", f"{len(request.onnx)} bytes; at most {MAX_MODEL_BYTES} per model")
        role = None if request.role == scoring_pb2.ROLE_UNSPECIFIED else PB_TO_ROLE.get(request.role)
        if request.role != scoring_pb2.ROLE_UNSPECIFIED and role is None:
            raise InvalidArgument("role", f"{request.role} is not a role")
        version = await self.engine.deploy(request.onnx, role=role, canary_percent=request.canary_percent)
        return model_message(self.engine, self.engine.registry.get(version.spec.name))

    async def Promote(self, request: scoring_pb2.PromoteRequest, context) -> scoring_pb2.Model:
        if not request.name:
            raise InvalidArgument("name", "is required")
        if not request.version:
            raise InvalidArgument("version", "is required")
        return model_message(self.engine, await self.engine.promote(request.name, request.version))

    async def Rollback(self, request: scoring_pb2.RollbackRequest, context) -> scoring_pb2.Model:
        if not request.name:
            raise InvalidArgument("name", "is required")
        return model_message(self.engine, await self.engine.rollback(request.name))

    async def TrainModel(self, request: scoring_pb2.TrainModelRequest, context):
        if self.training is None:
            raise FailedPrecondition("training runs are not configured here", reason="training_unavailable")
        try:
            label = json_format.MessageToDict(request.label) if request.HasField("label") else None
        except ValueError:
            # A Struct can carry NaN and the infinities; JSON, and so a label spec, cannot.
            raise InvalidArgument("label", "holds a number that is not finite (NaN or an infinity)") from None
        margin = request.margin if request.HasField("margin") else None
        async for item in self.training.train(
            request.model, cutoff=request.cutoff, evaluate_at=request.evaluate_at, margin=margin, label=label
        ):
            yield progress_message(item)

    async def GetDrift(self, request: scoring_pb2.GetDriftRequest, context) -> scoring_pb2.GetDriftResponse:
        monitor = self.engine.drift
        if monitor is None:
            raise FailedPrecondition("drift is not watched here", reason="drift_unavailable")
        if request.model:
            self.engine.registry.get(request.model)  # NOT_FOUND for an unknown model
        if request.check_now and self.check_drift is not None:
            await self.check_drift()
        versions = [v for v in self.engine.registry.active() if not request.model or v.spec.name == request.model]
        versions.sort(key=lambda v: (v.spec.name, v.role != "live", v.version))
        return scoring_pb2.GetDriftResponse(models=[drift_message(monitor.status(v)) for v in versions])

    async def GetModelQuality(self, request: scoring_pb2.GetModelQualityRequest, context) -> scoring_pb2.ModelQuality:
        if not request.name:
            raise InvalidArgument("name", "is required")
        live = self.engine.registry.get(request.name).live
        if live is None:
            raise FailedPrecondition(f"model {request.name!r} has no live version", reason="no_live_version")
        message = scoring_pb2.ModelQuality(model=request.name, version=live.version)
        json_format.ParseDict(dict(live.spec.quality), message.training)
        if self.quality is not None:
            figures = await (self.quality.refresh if request.refresh else self.quality.get)(request.name)
            if figures is not None:
                json_format.ParseDict(figures["realised"], message.realised)
                set_seconds(message.computed_at, figures["computed_at"])
                message.trigger = figures.get("trigger", "")
                message.labelled_rows = int(figures["realised"].get("rows", 0))
            stale = self.quality.stale.get(request.name)
            if stale is not None:
                set_seconds(message.stale_since, stale["since"])
                message.stale_trigger = stale["trigger"]
        elif request.refresh:
            raise FailedPrecondition("realised quality is not computed here", reason="training_unavailable")
        return message

    async def ExplainScore(self, request: scoring_pb2.ExplainScoreRequest, context) -> scoring_pb2.ExplainScoreResponse:
        if not request.model:
            raise InvalidArgument("model", "is required")
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        check_key("persons", request.person_id, field="person_id")
        return await self.explainer.explain(request, context)


def _check_finite(values, field: str) -> None:
    for i, value in enumerate(values):
        if math.isinf(value):
            raise InvalidArgument(f"{field}[{i}]", f"{value} is not finite (NaN means missing; infinity is refused)")


__all__ = ["SCOPES", "ScoringApi"]
