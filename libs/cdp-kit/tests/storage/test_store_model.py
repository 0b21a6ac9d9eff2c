"""Every adapter behaves like a dict under random put / delete / bulk sequences (hypothesis state machine).

The model is deliberately naive: a dict of (collection, key) -> (version, doc) plus the rules of the port
in a dozen lines - versions checked in op order before anything is written, then ops applied in order,
and a unique-index violation undoing the batch where the backend is atomic or keeping the ops before it
where it is not.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from cdp_kit.storage import Delete, DuplicateValue, Put, Store, VersionConflict
from cdp_kit.storage.port import index_token

COLLECTIONS = ("c1", "c2")
KEYS = ("a", "b", "ü", "日本/1")
UNIQUE_FIELD = "u"  # uniquely indexed in c1 only
UNIQUE_VALUES = (1, 2, "x")

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)
field_names = text.filter(lambda name: not name.startswith("$") and "\x00" not in name)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(field_names, inner, max_size=3),
    max_leaves=8,
)
docs = st.fixed_dictionaries(
    {UNIQUE_FIELD: st.sampled_from((None, *UNIQUE_VALUES))}, optional={"body": json_values, "n": scalars}
)
# How an op's expected_version is chosen once the model's current version is known.
modes = st.sampled_from(("any", "any", "create", "current", "current", "stale"))


@dataclass(frozen=True)
class OpSpec:
    kind: str
    collection: str
    key: str
    doc: dict[str, Any]
    mode: str


op_specs = st.builds(
    OpSpec,
    kind=st.sampled_from(("put", "put", "delete")),
    collection=st.sampled_from(COLLECTIONS),
    key=st.sampled_from(KEYS),
    doc=docs,
    mode=modes,
)

Model = dict[tuple[str, str], tuple[int, dict[str, Any]]]


class ModelFailure(Exception):
    def __init__(self, kind: type[Exception], op_index: int, applied: Model | None) -> None:
        self.kind = kind
        self.op_index = op_index
        self.applied = applied  # the state left behind, for a non-atomic backend


def apply_to_model(model: Model, ops: list[Put | Delete], atomic: bool) -> tuple[Model, tuple[int, ...], int]:
    """The state after `ops`, each op's resulting version and how many deletes removed something."""
    versions = {ident: version for ident, (version, _) in model.items()}
    for index, op in enumerate(ops):
        before = versions.get((op.collection, op.key), 0)
        if op.expected_version is not None and op.expected_version != before:
            raise ModelFailure(VersionConflict, index, None)
        versions[(op.collection, op.key)] = before + 1 if isinstance(op, Put) else 0
    state = dict(model)
    results = []
    deleted = 0
    for index, op in enumerate(ops):
        ident = (op.collection, op.key)
        before = state[ident][0] if ident in state else 0
        if isinstance(op, Delete):
            deleted += state.pop(ident, None) is not None
            results.append(0)
            continue
        token = index_token(op.doc.get(UNIQUE_FIELD))
        if op.collection == "c1" and token is not None:
            holders = [
                key
                for (collection, key), (_, doc) in state.items()
                if collection == "c1" and key != op.key and index_token(doc.get(UNIQUE_FIELD)) == token
            ]
            if holders:
                raise ModelFailure(DuplicateValue, index, None if atomic else state)
        state[ident] = (before + 1, copy.deepcopy(op.doc))
        results.append(before + 1)
    return state, tuple(results), deleted


def store_machine(factory: Any) -> type[RuleBasedStateMachine]:
    class StoreAgainstModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.runner = asyncio.Runner()
            self.store: Store = factory()
            self.run(self.store.ensure_index("c1", UNIQUE_FIELD, unique=True))
            self.atomic = self.run(self.store.bulk_is_atomic())
            self.model: Model = {}

        def run(self, awaitable: Any) -> Any:
            return self.runner.run(awaitable)

        def teardown(self) -> None:
            try:
                self.run(factory.discard(self.store))
            finally:
                self.runner.close()

        def resolve(self, spec: OpSpec) -> Put | Delete:
            current = self.model.get((spec.collection, spec.key), (0, None))[0]
            expected = {"any": None, "create": 0, "current": current, "stale": current + 1}[spec.mode]
            if spec.kind == "delete":
                return Delete(spec.collection, spec.key, expected)
            return Put(spec.collection, spec.key, spec.doc, expected)

        def check(self, ops: list[Put | Delete], write: Any) -> None:
            try:
                after, versions, deleted = apply_to_model(self.model, ops, self.atomic)
            except ModelFailure as failure:
                try:
                    self.run(write())
                except failure.kind as raised:
                    assert raised.op_index == (failure.op_index if len(ops) > 1 else None)
                else:
                    raise AssertionError(f"expected {failure.kind.__name__} at op {failure.op_index}") from None
                if failure.applied is not None:
                    self.model = failure.applied
                return
            result = self.run(write())
            self.model = after
            if len(ops) > 1:
                assert (result.versions, result.deleted) == (versions, deleted)
            elif isinstance(ops[0], Put):
                assert result == versions[0]
            else:
                assert result is (deleted == 1)

        @rule(spec=op_specs)
        def single(self, spec: OpSpec) -> None:
            op = self.resolve(spec)
            if isinstance(op, Put):
                self.check(
                    [op],
                    lambda: self.store.put(op.collection, op.key, op.doc, expected_version=op.expected_version),
                )
            else:
                self.check(
                    [op],
                    lambda: self.store.delete(op.collection, op.key, expected_version=op.expected_version),
                )

        @rule(specs=st.lists(op_specs, min_size=2, max_size=6))
        def bulk(self, specs: list[OpSpec]) -> None:
            ops = [self.resolve(spec) for spec in specs]
            self.check(ops, lambda: self.store.bulk_write(ops))

        @invariant()
        def store_matches_model(self) -> None:
            for collection in COLLECTIONS:
                expected = sorted(
                    (key, version, doc) for (name, key), (version, doc) in self.model.items() if name == collection
                )
                scanned = []
                cursor = None
                while True:
                    page = self.run(self.store.scan(collection, cursor=cursor, limit=3))
                    scanned.extend((r.key, r.version, r.doc) for r in page.records)
                    if page.next_cursor is None:
                        break
                    cursor = page.next_cursor
                assert scanned == expected
                assert self.run(self.store.count(collection)) == len(expected)
                found = self.run(self.store.get_many(collection, list(KEYS)))
                assert sorted((r.key, r.version, r.doc) for r in found.values()) == expected
            for value in UNIQUE_VALUES:
                holders = [
                    key
                    for (name, key), (_, doc) in self.model.items()
                    if name == "c1" and index_token(doc.get(UNIQUE_FIELD)) == index_token(value)
                ]
                found_keys = [r.key for r in self.run(self.store.find("c1", UNIQUE_FIELD, value))]
                assert found_keys == sorted(holders)

    return StoreAgainstModel


def test_store_behaves_like_a_dict_model(store_factory) -> None:
    run_state_machine_as_test(
        store_machine(store_factory),
        settings=settings(
            max_examples=20,
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
