"""MatchRecords and the review queue: probabilistic matching wired to the graph.

Each submitted record is first resolved through its own identifiers (a CRM contact id, an email) to a
person, then kept in the match pool. Records are scored against the pool with the Fellegi-Sunter model
(`cdp_identity.matching`), whose m/u weights are re-estimated by EM, inside the call and before its
pairs are scored, whenever the pool or one source in it (a CRM export, then the app's sign-ups) has
grown by a quarter since the last fit; linking two sources, nothing is fitted or scored while the pool
holds one. Pairs of different persons above the upper threshold merge (lineage rule `match`); pairs between
the thresholds wait in the review queue until someone decides.

Invariants: a call's records are stored only once its answer is settled (validation, fit, scoring and
the response's largest possible size come first), so a refused call leaves no record behind. A call
scores only the pairs its records form: the blocking index (`blocks`, key -> record keys, kept with the
pool through adds and purges) finds their candidates, and the cost follows those, not the pool.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
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
MAX_BULK_RECORDS = 500_000
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1_000
MAX_ID_LENGTH = 200
# What a default gRPC client accepts (4 MiB), less room for the envelope.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024 - 64 * 1024
# A person id, a merge record's fixed fields (ids, timestamp, rule, detail), protobuf tags and lengths.
_PERSON_BYTES, _MERGE_FIXED_BYTES, _FIELD_OVERHEAD = 40, 160, 6
REFIT_GROWTH = 1.25
MIN_RECORDS_TO_FIT = 50
# Regenerate with: Matcher(DEFAULT_PERSON_CONFIG).fit(generate_population(10_000, seed=2026)[0]).to_dict()
# (cdp_testing.people); services/identity/tests/test_default_model.py checks it still matches.
DEFAULT_MODEL = Path(__file__).parent / "matching" / "default_model.json"


def load_match_config(path: Path | None) -> MatchConfig | Matcher:
    """The configuration, or a saved matcher (what GetMatchingModel returns: `format`, `config` and fitted
    `parameters`), whose weights are then used as they are and never refitted."""
    if path is None:
        return DEFAULT_PERSON_CONFIG
    try:
        document = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidArgument("CDP_IDENTITY_MATCHING_FILE", f"{path} is not JSON: {exc}") from None
    if isinstance(document, dict) and "format" in document:
        saved = Matcher.from_dict(document)
        return saved if saved.fitted else saved.config
    return MatchConfig.from_dict(document)


class MatchingService:
    def __init__(self, engine: IdentityEngine, store: Store, config: MatchConfig | Matcher) -> None:
        self.engine = engine
        self.store = store
        # Weights loaded from CDP_IDENTITY_MATCHING_FILE are the operator's choice: used, never refitted.
        self.frozen = isinstance(config, Matcher)
        self.matcher = config if isinstance(config, Matcher) else Matcher(config)
        self.config = config = self.matcher.config
        self.origin = "file" if self.frozen else "unfitted"
        self.em: dict[str, Any] = {}  # iterations and convergence of the last fit
        self.field_names = frozenset(config.normalisers())
        self.pool: dict[str, dict[str, Any]] = {}  # record key -> {"id", fields..., "_person"}
        self.blocks: dict[str, set[str]] = {}  # blocking key -> record keys: a new record's candidates
        self.fitted_on = 0
        # Records per source in the pool, and at the last fit: a source that grew by a quarter (or one the
        # fit never saw: the app's sign-ups after the CRM export) is refitted on before it is scored.
        self.source_counts: Counter[str] = Counter()
        self.fitted_sources: dict[str, int] = {}
        # Term frequencies follow the pool and, while a call is scored, its records: what each record
        # counted key was counted as, so a replaced or purged record is uncounted exactly.
        self.term_frequencies = any(spec.term_frequencies for spec in config.comparisons)
        self.counted: dict[str, dict[str, Any]] = {}

    async def start(self) -> None:
        await self.store.ensure_index(RECORDS, "_person")
        async for record in self.store.scan_all(RECORDS, page_size=5_000):
            self._add_to_pool(record.doc)
        await self._load_model()
        if self.term_frequencies:
            # Term frequencies are not saved with the weights (they are a list of names): count the pool
            # for the matcher loaded (a saved one starts with none).
            self.matcher.count_terms(list(self.counted.values()))

    async def _load_model(self) -> None:
        if self.frozen:
            return
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
            self.fitted_sources = model.doc.get("fitted_sources", {})
            self.em = model.doc.get("em", {})
            self.origin = "fitted"
        if model is None and self.config == DEFAULT_PERSON_CONFIG:
            # Until the pool is big enough to estimate its own weights, start from the parameters EM
            # found on a generated population of 10,000 people (see DEFAULT_MODEL).
            self.matcher = Matcher.from_dict(json.loads(DEFAULT_MODEL.read_text()))
            self.origin = "default"

    def model(self) -> identity_pb2.GetMatchingModelResponse:
        response = identity_pb2.GetMatchingModelResponse(
            model_json=json.dumps(self.matcher.to_dict(), indent=1),
            origin=self.origin,
            fitted_on_records=self.fitted_on,
            em_iterations=self.em.get("iterations", 0),
            em_converged=self.em.get("converged", False),
        )
        if not self.matcher.fitted:
            return response
        response.random_match_probability = self.matcher.random_match_probability
        for comparison in self.matcher.estimates():
            for level in comparison.levels:
                response.levels.add(
                    comparison=comparison.name, level=level.label, m=level.m, u=level.u, weight=level.weight
                )
        for summary in self.matcher.term_frequency_summary():
            response.term_frequencies.add(**summary)
        return response

    async def match_records(self, request: identity_pb2.MatchRecordsRequest) -> identity_pb2.MatchRecordsResponse:
        records = self._validate(request.records)
        now = int(time.time() * 1000)
        self._refuse_forgotten(records, now, "records")
        threshold = request.min_probability or self.config.lower_threshold
        if not 0 < threshold <= 1:
            raise InvalidArgument("min_probability", f"must be in (0, 1], got {request.min_probability}")
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"{page_size} must be 1-{MAX_PAGE_SIZE}")
        digest = hashlib.sha256(b"".join(r.SerializeToString(deterministic=True) for r in request.records))
        offset = self._page_offset(request.page_token, digest.hexdigest())
        docs = {
            record["key"]: {"id": record["key"], **record["fields"], "source": record["source"]} for record in records
        }
        # Everything that decides the answer happens before anything is stored: the fit, the scoring and
        # the size of the response, so a call whose answer could not be delivered leaves no trace.
        with self._terms_counted(docs):
            await self._refit_if_grown(docs)
            scored = self._score_new(docs)
            kept = sorted(
                (pair for pair in scored if pair.probability >= threshold),
                key=lambda pair: (-pair.probability, pair.left_id, pair.right_id),
            )
            page = kept[offset : offset + page_size]
            bound = self._response_bound(len(records), len(page))
            if bound > MAX_RESPONSE_BYTES:
                raise InvalidArgument(
                    "page_size",
                    f"a page of {len(page)} pairs could take {bound} bytes, more than a client accepts "
                    f"({MAX_RESPONSE_BYTES}); ask for fewer pairs per page",
                )
        response = identity_pb2.MatchRecordsResponse(omitted_pairs=len(scored) - len(kept), total_pairs=len(kept))
        if offset + page_size < len(kept):
            response.next_page_token = _page_token(offset + page_size, digest.hexdigest())

        batch_keys = []
        for record in records:
            resolution, _ = await self.engine.resolve(
                record["identifiers"], request_id=f"record:{record['key']}", at=now
            )
            self._add_to_pool({**docs[record["key"]], "_person": resolution.person})
            batch_keys.append(record["key"])
            response.persons.append(resolution.person)
        await self.store.bulk_write([Put(RECORDS, key, self.pool[key]) for key in batch_keys])

        apply = request.apply and offset == 0
        in_page = {(pair.left_id, pair.right_id) for pair in page}
        for pair in kept if apply else page:
            left_person = await self.engine.canonical(self.pool[pair.left_id]["_person"])
            right_person = await self.engine.canonical(self.pool[pair.right_id]["_person"])
            scored_pair = identity_pb2.ScoredPair(
                left_record=pair.left_id,
                right_record=pair.right_id,
                left_person=left_person,
                right_person=right_person,
                match_weight=pair.match_weight,
                probability=pair.probability,
                decision=pair.decision,
                levels=pair.levels,
            )
            shown = (pair.left_id, pair.right_id) in in_page
            if shown:
                response.pairs.append(scored_pair)
            if not apply or left_person == right_person or pair.decision == "non_match":
                continue
            if pair.decision == "match":
                merge = await self._merge(left_person, right_person, scored_pair, rule="match", detail="")
                if merge is not None:
                    if shown:
                        response.merges.append(merge)
                    continue
            review_id = await self._queue_review(scored_pair, now)
            if shown:
                response.review_ids.append(review_id)
        return response

    def _response_bound(self, records: int, pairs: int) -> int:
        """The most a response can take: each record's person, and per pair its two record keys and
        persons, the levels, and the merge (both keys again in its cause) or review it may cause."""
        key = MAX_ID_LENGTH + len("default:") + _FIELD_OVERHEAD
        levels = sum(
            len(name) + max(len(label) for label in labels) + 3 * _FIELD_OVERHEAD
            for name, labels in self.matcher.level_labels().items()
        )
        pair = 2 * key + 2 * _PERSON_BYTES + levels + 64
        merge = _MERGE_FIXED_BYTES + 4 * key + 3 * _PERSON_BYTES
        return records * _PERSON_BYTES + pairs * (pair + merge + _PERSON_BYTES)

    async def match_records_bulk(self, requests) -> AsyncIterator[identity_pb2.MatchRecordsBulkProgress]:
        batches: list[list[dict[str, Any]]] = []
        keys: set[str] = set()
        apply, threshold = False, self.config.lower_threshold
        async for position, request in _enumerate(requests):
            if position == 0:
                apply = request.apply
                threshold = request.min_probability or threshold
                if not 0 < threshold <= 1:
                    raise InvalidArgument("min_probability", f"must be in (0, 1], got {request.min_probability}")
            try:
                records = self._validate(request.records)
            except InvalidArgument as error:
                raise InvalidArgument(f"batches[{position}].{error.field}", error.description) from None
            self._refuse_forgotten(records, int(time.time() * 1000), f"batches[{position}].records")
            for index, record in enumerate(records):
                if record["key"] in keys:
                    raise InvalidArgument(
                        f"batches[{position}].records[{index}].id", "appears in an earlier batch of this call"
                    )
                keys.add(record["key"])
            if len(keys) > MAX_BULK_RECORDS:
                raise InvalidArgument("records", f"more than {MAX_BULK_RECORDS} records in one call")
            batches.append(records)
        total = len(keys)
        progress = identity_pb2.MatchRecordsBulkProgress(records_total=total)
        every_doc = {
            record["key"]: {"id": record["key"], **record["fields"], "source": record["source"]}
            for batch in batches
            for record in batch
        }
        # One fit on everything the call brings: the first batch is not fitted on alone. The term
        # frequencies count them all too, from the first batch on, as the fit did.
        with self._terms_counted(every_doc):
            progress.fitted = await self._fit(every_doc) if not self.frozen else False
        now = int(time.time() * 1000)
        for batch in batches:
            docs = {record["key"]: every_doc[record["key"]] for record in batch}
            scored = self._score_new(docs)
            kept = [pair for pair in scored if pair.probability >= threshold]
            for record in batch:
                resolution, _ = await self.engine.resolve(
                    record["identifiers"], request_id=f"record:{record['key']}", at=now
                )
                self._add_to_pool({**docs[record["key"]], "_person": resolution.person})
            await self.store.bulk_write([Put(RECORDS, key, self.pool[key]) for key in docs])
            for pair in kept:
                outcome = await self._apply_pair(pair, now) if apply else None
                progress.merges += outcome == "merge"
                progress.reviews += outcome == "review"
            progress.records_done += len(batch)
            progress.pairs_kept += len(kept)
            progress.pairs_omitted += len(scored) - len(kept)
            progress.done = progress.records_done == total
            yield progress

    async def _apply_pair(self, pair, now: int) -> str | None:
        """Merge a confident pair of two persons or queue a doubtful one: "merge", "review" or None."""
        left_person = await self.engine.canonical(self.pool[pair.left_id]["_person"])
        right_person = await self.engine.canonical(self.pool[pair.right_id]["_person"])
        if left_person == right_person or pair.decision == "non_match":
            return None
        scored_pair = identity_pb2.ScoredPair(
            left_record=pair.left_id,
            right_record=pair.right_id,
            left_person=left_person,
            right_person=right_person,
            match_weight=pair.match_weight,
            probability=pair.probability,
            decision=pair.decision,
            levels=pair.levels,
        )
        merged = pair.decision == "match" and await self._merge(
            left_person, right_person, scored_pair, rule="match", detail=""
        )
        if merged:
            return "merge"
        # A doubtful pair, or a match a merge rule refused: a person decides.
        await self._queue_review(scored_pair, now)
        return "review"

    def _score_new(self, docs: dict[str, dict[str, Any]]) -> list:
        """The candidate pairs the new records form, with the pool (through the blocking index) and with
        each other, scored; nothing else of the pool is read, so the cost follows their candidates."""
        members: dict[str, set[str]] = {}
        for key, doc in docs.items():
            for block in self.matcher.blocking_keys(doc):
                members.setdefault(block, set()).add(key)
        limit = self.config.max_block_size
        pairs: set[tuple[str, str]] = set()
        for block, new_keys in members.items():
            pooled = self.blocks.get(block, set())
            if len(pooled | new_keys) > limit:
                continue  # a block this big is skipped in batch scoring too: a shared value is no evidence
            for new in new_keys:
                for other in pooled | new_keys:
                    if other != new and not (other in docs and other < new):
                        pairs.add((new, other))
        involved = sorted({key for pair in pairs for key in pair})
        position = {key: i for i, key in enumerate(involved)}
        table = [docs[key] if key in docs else self._comparable(self.pool[key]) for key in involved]
        return self.matcher.score_pairs(table, [(position[a], position[b]) for a, b in sorted(pairs)])

    def _add_to_pool(self, doc: dict[str, Any]) -> None:
        key = doc["id"]
        if key not in self.pool:
            self.source_counts[self._comparable(doc)["source"]] += 1
        self._drop_from_blocks(key)
        self.pool[key] = doc
        for block in self.matcher.blocking_keys(doc):
            self.blocks.setdefault(block, set()).add(key)
        self._count({key: self._comparable(doc)})

    def _count(self, docs: dict[str, dict[str, Any]]) -> None:
        """Count `docs` in the term frequencies, in place of what their keys were counted as before."""
        if not self.term_frequencies:
            return
        replaced = [self.counted[key] for key in docs if key in self.counted]
        self.matcher.update_terms(added=list(docs.values()), removed=replaced)
        self.counted.update(docs)

    def _uncount(self, keys) -> None:
        if not self.term_frequencies:
            return
        self.matcher.update_terms(removed=[self.counted.pop(key) for key in keys if key in self.counted])

    @contextlib.contextmanager
    def _terms_counted(self, docs: dict[str, dict[str, Any]]):
        """The call's records counted while it is fitted and scored (a fit counts them too); a call refused
        before anything is stored takes them out again, putting back what the pool held."""
        before = {key: self.counted.get(key) for key in docs}
        self._count(docs)
        try:
            yield
        except BaseException:
            self._uncount(docs)
            self._count({key: doc for key, doc in before.items() if doc is not None})
            raise

    def _drop_from_blocks(self, key: str) -> None:
        old = self.pool.get(key)
        if old is None:
            return
        for block in self.matcher.blocking_keys(old):
            holders = self.blocks.get(block)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self.blocks[block]

    @staticmethod
    def _page_offset(token: str, digest: str) -> int:
        if not token:
            return 0
        try:
            offset_text, token_digest = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
            offset = int(offset_text)
        except ValueError:
            raise InvalidArgument("page_token", "is not a token MatchRecords returned") from None
        if token_digest != digest or offset < 0:
            raise InvalidArgument("page_token", "belongs to another request; send the same records with it")
        return offset

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
            self._drop_from_blocks(key)
            doc = self.pool.pop(key, None)
            if doc is not None:
                self.source_counts[self._comparable(doc)["source"]] -= 1
        self._uncount(records)
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
            if len(record.id) + len(record.source) > MAX_ID_LENGTH:
                raise InvalidArgument(
                    f"records[{index}].id", f"id and source together at most {MAX_ID_LENGTH} characters"
                )
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
            out.append(
                {"key": key, "identifiers": pairs, "fields": dict(record.fields), "source": record.source or "default"}
            )
        return out

    def _refuse_forgotten(self, records: list[dict[str, Any]], at: int, field: str) -> None:
        """Before anything is fitted or stored: a record carrying a deleted person's identifiers, as an
        event would be dropped for them, is refused (engine.refuse_forgotten); the whole call with it."""
        if not self.engine.forgotten:
            return
        for index, record in enumerate(records):
            fields = self.engine.request_fields(record["identifiers"], f"{field}[{index}].identifiers")
            self.engine.refuse_forgotten(fields, at)

    @staticmethod
    def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
        """The fields the matcher reads, with the record's source (link_only pairs only across sources;
        records stored before the source was kept carry it in their key, "source:id")."""
        return {k: v for k, v in doc.items() if not k.startswith("_")} | {
            "source": doc.get("source") or doc["id"].split(":", 1)[0]
        }

    def _sources_with(self, new_docs: dict[str, dict[str, Any]]) -> Counter[str]:
        """Records per source in the pool and the call's records together (a key names its source)."""
        sources = Counter(self.source_counts)
        sources.update(doc["source"] for key, doc in new_docs.items() if key not in self.pool)
        return sources

    def _grown(self, sources: Counter[str]) -> bool:
        """Whether the pool, or any one source in it, has grown by a quarter since the last fit: a fit on the
        CRM export alone must not score the app's sign-ups. A source counts once it brought at least
        MIN_RECORDS_TO_FIT new records, so a trickle from a new source does not refit on every call."""
        if not self.fitted_on or sum(sources.values()) >= self.fitted_on * REFIT_GROWTH:
            return True
        for source, count in sources.items():
            had = self.fitted_sources.get(source, 0)
            if count - had >= max(had * (REFIT_GROWTH - 1), MIN_RECORDS_TO_FIT):
                return True
        return False

    def _fittable(self, sources: Counter[str]) -> bool:
        """Enough records to estimate a model from; link_only needs two sources to have any pair at all."""
        if sum(sources.values()) < MIN_RECORDS_TO_FIT:
            return False
        return self.config.link_type != "link_only" or sum(1 for count in sources.values() if count) >= 2

    async def _refit_if_grown(self, new_docs: dict[str, dict[str, Any]]) -> None:
        """Fit on the pool with the call's records, before they are scored, when the pool or one of its
        sources has grown by a quarter since the last fit (see `_grown`)."""
        if self.frozen:
            return
        sources = self._sources_with(new_docs)
        if self.config.link_type == "link_only" and len(sources) < 2:
            return  # one file so far: its records form no pair, so there is nothing to score or fit yet
        size = sum(sources.values())
        if size < MIN_RECORDS_TO_FIT and not self.matcher.fitted:
            raise FailedPrecondition(
                f"the matcher has no parameters yet and {size} records are too few to estimate them "
                f"(at least {MIN_RECORDS_TO_FIT}); configure CDP_IDENTITY_MATCHING_FILE with fitted parameters "
                "or submit more records",
                reason="matcher_not_fitted",
            )
        if self._fittable(sources) and self._grown(sources):
            await self._fit(new_docs)

    async def _fit(self, new_docs: dict[str, dict[str, Any]]) -> bool:
        """Estimate the model on the pool and `new_docs` (not yet in it); False when they are too few (or,
        linking, all from one source)."""
        sources = self._sources_with(new_docs)
        if not self._fittable(sources):
            return False
        size = sum(sources.values())
        started = time.perf_counter()
        pooled = [self._comparable(doc) for key, doc in self.pool.items() if key not in new_docs]
        report = self.matcher.fit([*pooled, *new_docs.values()])
        self.fitted_on = size
        self.fitted_sources = dict(sources)
        self.em = {"iterations": report.iterations, "converged": report.converged}
        self.origin = "fitted"
        await self.store.put(
            MODEL,
            "current",
            {
                "matcher": self.matcher.to_dict(),
                "fitted_on": size,
                "fitted_sources": self.fitted_sources,
                "em": self.em,
            },
        )
        log.log(
            logging.INFO if report.converged else logging.WARNING,
            "matching model re-estimated" if report.converged else "matching model re-estimated; EM did not converge",
            extra={"records": size, "seconds": round(time.perf_counter() - started, 3), **self.em},
        )
        return True

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


async def _enumerate(items):
    position = 0
    async for item in items:
        yield position, item
        position += 1


def _page_token(offset: int, digest: str) -> str:
    return base64.urlsafe_b64encode(f"{offset}:{digest}".encode()).decode()
