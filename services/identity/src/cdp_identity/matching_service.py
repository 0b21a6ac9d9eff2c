"""MatchRecords and the review queue: probabilistic matching wired to the graph.

Each submitted record is first resolved through its own identifiers (a CRM contact id, an email) to a
person, then kept in the match pool. Records are scored against the pool with the Fellegi-Sunter model
(`cdp_identity.matching`), whose m/u weights are re-estimated by EM whenever the pool has grown by a
quarter. Pairs of different persons above the upper threshold merge (lineage rule `match`); pairs between
the thresholds wait in the review queue until someone decides.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cdp.identity.v1 import identity_pb2
from cdp_identity.codec import merge_record, timestamp
from cdp_identity.domain.graph import Purged, stable_id
from cdp_identity.engine import IdentityEngine
from cdp_identity.matching import DEFAULT_PERSON_CONFIG, MatchConfig, Matcher
from cdp_identity.matching.matcher import OLD_FORMATS
from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from cdp_kit.storage import Delete, Put, Store, WriteOp
from cdp_kit.storage.port import MAX_FIND_LIMIT

log = logging.getLogger("cdp.identity")

RECORDS = "identity_match_records"
MODEL = "identity_match_model"
REVIEWS = "identity_reviews"
MAX_RECORDS_PER_CALL = 5_000
REFIT_GROWTH = 1.25
MIN_RECORDS_TO_FIT = 50
# Regenerate with: Matcher(DEFAULT_PERSON_CONFIG).fit(generate_population(10_000, seed=2026)[0]).to_dict()
# (cdp_testing.people); services/identity/tests/test_default_model.py checks it still matches.
DEFAULT_MODEL = Path(__file__).parent / "matching" / "default_model.json"


def load_match_config(path: Path | None) -> MatchConfig:
    if path is None:
        return DEFAULT_PERSON_CONFIG
    try:
        document = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidArgument("CDP_IDENTITY_MATCHING_FILE", f"{path} is not JSON: {exc}") from None
    return MatchConfig.from_dict(document)


class MatchingService:
    def __init__(self, engine: IdentityEngine, store: Store, config: MatchConfig) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        self.matcher = Matcher(config)
        self.field_names = frozenset(config.normalisers())
        self.pool: dict[str, dict[str, Any]] = {}  # record key -> {"id", fields..., "_person"}
        self.fitted_on = 0

    async def start(self) -> None:
        await self.store.ensure_index(RECORDS, "_person")
        async for record in self.store.scan_all(RECORDS, page_size=5_000):
            self.pool[record.key] = record.doc
        model = await self.store.get(MODEL, "current")
        if model is not None and model.doc["matcher"].get("format") in OLD_FORMATS:
            # Fitted by an older release whose parameters do not convert: the pool fits a new one.
            log.warning(
                "stored matching model has an old format; refitting", extra={"format": model.doc["matcher"]["format"]}
            )
            model = None
        if model is not None:
            self.matcher = Matcher.from_dict(model.doc["matcher"])
            self.fitted_on = model.doc["fitted_on"]
        if model is None and self.config == DEFAULT_PERSON_CONFIG:
            # Until the pool is big enough to estimate its own weights, start from the parameters EM
            # found on a generated population of 10,000 people (see DEFAULT_MODEL).
            self.matcher = Matcher.from_dict(json.loads(DEFAULT_MODEL.read_text()))

    async def match_records(self, request: identity_pb2.MatchRecordsRequest) -> identity_pb2.MatchRecordsResponse:
        records = self._validate(request.records)
        now = int(time.time() * 1000)
        batch_keys = []
        response = identity_pb2.MatchRecordsResponse()
        for record in records:
            resolution, _ = await self.engine.resolve(
                record["identifiers"], request_id=f"record:{record['key']}", at=now
            )
            doc = {"id": record["key"], **record["fields"], "_person": resolution.person}
            self.pool[record["key"]] = doc
            batch_keys.append(record["key"])
            response.persons.append(resolution.person)
        await self.store.bulk_write([Put(RECORDS, key, self.pool[key]) for key in batch_keys])
        await self._refit_if_grown()

        in_batch = set(batch_keys)
        pool = [self._comparable(doc) for doc in self.pool.values()]
        for pair in self.matcher.score(pool):
            if pair.left_id not in in_batch and pair.right_id not in in_batch:
                continue
            left_person = await self.engine.canonical(self.pool[pair.left_id]["_person"])
            right_person = await self.engine.canonical(self.pool[pair.right_id]["_person"])
            scored = response.pairs.add(
                left_record=pair.left_id,
                right_record=pair.right_id,
                left_person=left_person,
                right_person=right_person,
                match_weight=pair.match_weight,
                probability=pair.probability,
                decision=pair.decision,
                levels=pair.levels,
            )
            if not request.apply or left_person == right_person or pair.decision == "non_match":
                continue
            if pair.decision == "match":
                merge = await self._merge(left_person, right_person, scored, rule="match", detail="")
                if merge is not None:
                    response.merges.append(merge)
                    continue
            response.review_ids.append(await self._queue_review(scored, now))
        return response

    async def list_reviews(self, request: identity_pb2.ListReviewsRequest) -> identity_pb2.ListReviewsResponse:
        size = request.page_size or 100
        if not 1 <= size <= 1000:
            raise InvalidArgument("page_size", f"{size} must be 1-1000")
        try:
            page = await self.store.scan(REVIEWS, cursor=request.page_token or None, limit=size)
        except InvalidArgument:
            raise InvalidArgument("page_token", "is not a token ListReviews returned") from None
        response = identity_pb2.ListReviewsResponse(next_page_token=page.next_cursor or "")
        for record in page.records:
            review = response.reviews.add(review_id=record.key, created_at=timestamp(record.doc["created_at"]))
            review.pair.ParseFromString(bytes.fromhex(record.doc["pair"]))
        return response

    async def resolve_review(self, request: identity_pb2.ResolveReviewRequest) -> identity_pb2.ResolveReviewResponse:
        if not request.review_id:
            raise InvalidArgument("review_id", "is required (see ListReviews)")
        if request.decision == identity_pb2.ResolveReviewRequest.DECISION_UNSPECIFIED:
            raise InvalidArgument("decision", "choose DECISION_MERGE or DECISION_REJECT")
        record = await self.store.get(REVIEWS, request.review_id)
        if record is None:
            raise NotFound(f"no open review {request.review_id!r}")
        pair = identity_pb2.ScoredPair()
        pair.ParseFromString(bytes.fromhex(record.doc["pair"]))
        response = identity_pb2.ResolveReviewResponse()
        if request.decision == identity_pb2.ResolveReviewRequest.DECISION_MERGE:
            left = await self.engine.canonical(pair.left_person)
            right = await self.engine.canonical(pair.right_person)
            merge = await self._merge(left, right, pair, rule="review", detail=request.reviewer, strict=True)
            if merge is not None:
                response.merge.CopyFrom(merge)
        await self.store.bulk_write([Delete(REVIEWS, request.review_id, expected_version=record.version)])
        return response

    async def purge(self, purged: Purged) -> list[WriteOp]:
        """A privacy purge's share here: the match-pool records resolved to a purged person and the
        reviews naming one of them or of those records, forgotten in memory now and deleted by the
        returned operations (the engine writes them with the graph's deletions). The fitted model keeps
        only m/u weights per comparison level, nothing about anyone, and stays."""
        persons = set(purged.persons)
        records = {key for key, doc in self.pool.items() if doc.get("_person") in persons}
        for person in sorted(persons):
            # Records another replica added are in the store only.
            records.update(r.key for r in await self.store.find(RECORDS, "_person", person, limit=MAX_FIND_LIMIT))
        for key in records:
            self.pool.pop(key, None)
        ops: list[WriteOp] = [Delete(RECORDS, key) for key in sorted(records)]
        async for record in self.store.scan_all(REVIEWS):
            pair = identity_pb2.ScoredPair.FromString(bytes.fromhex(record.doc["pair"]))
            if {pair.left_person, pair.right_person} & persons or {pair.left_record, pair.right_record} & records:
                ops.append(Delete(REVIEWS, record.key))
        return ops

    # --- helpers ----------------------------------------------------------------------------------

    def _validate(self, records) -> list[dict[str, Any]]:
        if not records:
            raise InvalidArgument("records", "give at least one record")
        if len(records) > MAX_RECORDS_PER_CALL:
            raise InvalidArgument("records", f"{len(records)} records; at most {MAX_RECORDS_PER_CALL} per call")
        out = []
        seen: set[str] = set()
        for index, record in enumerate(records):
            if not record.id:
                raise InvalidArgument(f"records[{index}].id", "is required")
            key = f"{record.source or 'default'}:{record.id}"
            if key in seen:
                raise InvalidArgument(f"records[{index}].id", f"{record.id!r} appears twice in this request")
            seen.add(key)
            if not record.identifiers:
                raise InvalidArgument(
                    f"records[{index}].identifiers",
                    "give at least one identifier (e.g. the CRM contact id as salesforce_id) so the record has a person",
                )
            pairs = []
            for j, ident in enumerate(record.identifiers):
                if not ident.type or not ident.value:
                    raise InvalidArgument(f"records[{index}].identifiers[{j}]", "type and value are required")
                pairs.append((ident.type, ident.value))
            unknown = [name for name in record.fields if name not in self.field_names]
            if unknown:
                raise InvalidArgument(
                    f"records[{index}].fields.{unknown[0]}",
                    f"not a compared field; compared: {', '.join(sorted(self.field_names))}",
                )
            # Before anything is resolved or stored: a value that cannot be read (a date in no accepted
            # format) would otherwise fail every later scoring of the pool.
            self.matcher.check_fields(record.fields, f"records[{index}].fields")
            out.append({"key": key, "identifiers": pairs, "fields": dict(record.fields)})
        return out

    @staticmethod
    def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if not k.startswith("_")}

    async def _refit_if_grown(self) -> None:
        size = len(self.pool)
        if size < MIN_RECORDS_TO_FIT and not self.matcher.fitted:
            raise FailedPrecondition(
                f"the matcher has no parameters yet and {size} records are too few to estimate them "
                f"(at least {MIN_RECORDS_TO_FIT}); configure CDP_IDENTITY_MATCHING_FILE with fitted parameters "
                "or submit more records",
                reason="matcher_not_fitted",
            )
        if size < MIN_RECORDS_TO_FIT or (self.fitted_on and size < self.fitted_on * REFIT_GROWTH):
            return
        started = time.perf_counter()
        report = self.matcher.fit([self._comparable(doc) for doc in self.pool.values()])
        self.fitted_on = size
        await self.store.put(MODEL, "current", {"matcher": self.matcher.to_dict(), "fitted_on": size})
        log.info(
            "matching model re-estimated",
            extra={"records": size, "seconds": round(time.perf_counter() - started, 3), "converged": report.converged},
        )

    async def _merge(self, left: str, right: str, pair, *, rule: str, detail: str, strict: bool = False):
        cause = {
            "event_id": f"{rule}:{pair.left_record}:{pair.right_record}",
            "identifiers": [pair.left_record, pair.right_record],
            "rule": rule,
            "detail": detail or f"p={pair.probability:.4f}",
        }
        try:
            merge = await self.engine.merge(left, right, cause=cause)
        except FailedPrecondition:
            if strict:
                raise
            return None  # over a limit or separated: a person decides instead
        return None if merge is None else merge_record(merge)

    async def _queue_review(self, pair: identity_pb2.ScoredPair, now: int) -> str:
        review_id = stable_id("r_", *sorted((pair.left_record, pair.right_record)))
        await self.store.put(REVIEWS, review_id, {"pair": pair.SerializeToString().hex(), "created_at": now})
        return review_id
