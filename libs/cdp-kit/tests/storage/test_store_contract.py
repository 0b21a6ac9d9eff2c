"""The storage contract, run against every adapter (see conftest.ADAPTERS)."""

from __future__ import annotations

import asyncio

import pytest

from cdp_kit.errors import CdpError, Conflict, FailedPrecondition, InvalidArgument
from cdp_kit.storage import Delete, DuplicateValue, Put, Record, Store, VersionConflict

# --- get / put / versions ------------------------------------------------------------------------------


async def test_get_of_a_missing_key_is_none(store: Store) -> None:
    assert await store.get("profiles", "nobody") is None


async def test_put_returns_versions_from_one_and_get_returns_the_latest(store: Store) -> None:
    assert await store.put("profiles", "p1", {"name": "Ada"}) == 1
    assert await store.put("profiles", "p1", {"name": "Ada L."}) == 2
    assert await store.put("profiles", "p1", {"name": "Ada Lovelace"}, expected_version=2) == 3

    assert await store.get("profiles", "p1") == Record("p1", 3, {"name": "Ada Lovelace"})


async def test_create_only_put_conflicts_when_the_key_exists(store: Store) -> None:
    assert await store.put("profiles", "p1", {"n": 1}, expected_version=0) == 1

    with pytest.raises(VersionConflict) as caught:
        await store.put("profiles", "p1", {"n": 2}, expected_version=0)

    conflict = caught.value
    assert isinstance(conflict, Conflict)
    assert (conflict.collection, conflict.key, conflict.expected, conflict.actual) == ("profiles", "p1", 0, 1)
    assert "profiles" in str(conflict) and "version 1" in str(conflict)
    assert await store.get("profiles", "p1") == Record("p1", 1, {"n": 1})


async def test_stale_update_conflicts_and_changes_nothing(store: Store) -> None:
    await store.put("profiles", "p1", {"n": 1})
    await store.put("profiles", "p1", {"n": 2})

    with pytest.raises(VersionConflict) as caught:
        await store.put("profiles", "p1", {"n": 99}, expected_version=1)

    assert (caught.value.expected, caught.value.actual) == (1, 2)
    assert "expected version 1" in str(caught.value) and "at version 2" in str(caught.value)
    assert await store.get("profiles", "p1") == Record("p1", 2, {"n": 2})


async def test_conditional_update_of_a_missing_key_conflicts(store: Store) -> None:
    with pytest.raises(VersionConflict) as caught:
        await store.put("profiles", "ghost", {"n": 1}, expected_version=3)

    assert (caught.value.expected, caught.value.actual) == (3, 0)
    assert "does not exist" in str(caught.value)
    assert await store.get("profiles", "ghost") is None


# --- delete ---------------------------------------------------------------------------------------------


async def test_delete_reports_whether_it_removed_something(store: Store) -> None:
    await store.put("profiles", "p1", {"n": 1})

    assert await store.delete("profiles", "p1") is True
    assert await store.delete("profiles", "p1") is False
    assert await store.get("profiles", "p1") is None


async def test_stale_delete_conflicts_and_keeps_the_document(store: Store) -> None:
    await store.put("profiles", "p1", {"n": 1})
    await store.put("profiles", "p1", {"n": 2})

    with pytest.raises(VersionConflict) as caught:
        await store.delete("profiles", "p1", expected_version=1)
    assert (caught.value.key, caught.value.expected, caught.value.actual) == ("p1", 1, 2)
    with pytest.raises(VersionConflict):
        await store.delete("profiles", "absent", expected_version=1)
    with pytest.raises(VersionConflict):
        await store.delete("profiles", "p1", expected_version=0)

    assert await store.get("profiles", "p1") == Record("p1", 2, {"n": 2})
    assert await store.delete("profiles", "absent", expected_version=0) is False
    assert await store.delete("profiles", "p1", expected_version=2) is True


async def test_a_deleted_key_starts_again_at_version_one(store: Store) -> None:
    await store.put("profiles", "p1", {"n": 1})
    await store.put("profiles", "p1", {"n": 2})
    await store.delete("profiles", "p1")

    assert await store.put("profiles", "p1", {"n": 3}, expected_version=0) == 1


# --- get_many -------------------------------------------------------------------------------------------


async def test_get_many_returns_the_existing_keys_only(store: Store) -> None:
    await store.bulk_write([Put("profiles", f"p{i}", {"i": i}) for i in range(5)])
    await store.put("other", "p9", {"elsewhere": True})

    found = await store.get_many("profiles", ["p1", "p3", "missing", "p3", "p9"])

    assert found == {"p1": Record("p1", 1, {"i": 1}), "p3": Record("p3", 1, {"i": 3})}
    assert await store.get_many("profiles", []) == {}


async def test_get_many_loads_thousands_of_keys_in_one_call(store: Store) -> None:
    keys = [f"person-{i:05d}" for i in range(2500)]
    await store.bulk_write([Put("profiles", key, {"k": key}) for key in keys[::2]])

    found = await store.get_many("profiles", keys)

    assert sorted(found) == keys[::2]
    assert all(record.doc == {"k": key} for key, record in found.items())


# --- indexes and find -----------------------------------------------------------------------------------


async def test_find_looks_up_an_indexed_field_in_key_order(store: Store) -> None:
    await store.ensure_index("profiles", "country")
    await store.bulk_write(
        [
            Put("profiles", "c", {"country": "FR"}),
            Put("profiles", "a", {"country": "FR"}),
            Put("profiles", "b", {"country": "DE"}),
            Put("profiles", "d", {"country": None}),
            Put("profiles", "e", {}),
        ]
    )

    assert [r.key for r in await store.find("profiles", "country", "FR")] == ["a", "c"]
    assert [r.key for r in await store.find("profiles", "country", "FR", limit=1)] == ["a"]
    assert await store.find("profiles", "country", "fr") == []
    assert await store.find("profiles", "country", "DE") == [Record("b", 1, {"country": "DE"})]


async def test_find_continues_after_a_key_page_by_page(store: Store) -> None:
    """A lookup past MAX_FIND_LIMIT matches is read page by page: each page from after the last key of the
    one before (orchestration reads a journey's instances so)."""
    await store.ensure_index("instances", "journey_id")
    await store.bulk_write([Put("instances", f"i{n:03}", {"journey_id": "j1" if n % 3 else "j2"}) for n in range(40)])
    wanted = [f"i{n:03}" for n in range(40) if n % 3]
    pages, after = [], None
    while True:
        page = await store.find("instances", "journey_id", "j1", limit=7, after=after)
        pages.append([r.key for r in page])
        if len(page) < 7:
            break
        after = page[-1].key
    assert [k for page in pages for k in page] == wanted
    assert all(0 < len(page) <= 7 for page in pages[:-1])
    # After a key that is not a match itself: from the next match on.
    assert [r.key for r in await store.find("instances", "journey_id", "j1", after="i003", limit=2)] == ["i004", "i005"]
    assert await store.find("instances", "journey_id", "j1", after=wanted[-1]) == []
    with pytest.raises(InvalidArgument):
        await store.find("instances", "journey_id", "j1", after="")


async def test_find_follows_updates_and_deletes(store: Store) -> None:
    await store.ensure_index("profiles", "tier")
    await store.put("profiles", "p1", {"tier": "gold"})
    await store.put("profiles", "p2", {"tier": "gold"})

    await store.put("profiles", "p1", {"tier": "silver"})
    await store.delete("profiles", "p2")

    assert await store.find("profiles", "tier", "gold") == []
    assert [r.key for r in await store.find("profiles", "tier", "silver")] == ["p1"]


async def test_find_indexes_documents_written_before_the_index(store: Store) -> None:
    await store.put("profiles", "p1", {"email": "a@example.com"})

    await store.ensure_index("profiles", "email")

    assert [r.key for r in await store.find("profiles", "email", "a@example.com")] == ["p1"]


async def test_find_matches_numbers_by_value_and_keeps_booleans_apart(store: Store) -> None:
    await store.ensure_index("scores", "value")
    await store.bulk_write(
        [
            Put("scores", "int", {"value": 1}),
            Put("scores", "float", {"value": 1.0}),
            Put("scores", "true", {"value": True}),
            Put("scores", "text", {"value": "1"}),
        ]
    )

    assert [r.key for r in await store.find("scores", "value", 1)] == ["float", "int"]
    assert [r.key for r in await store.find("scores", "value", 1.0)] == ["float", "int"]
    assert [r.key for r in await store.find("scores", "value", True)] == ["true"]
    assert [r.key for r in await store.find("scores", "value", "1")] == ["text"]
    assert await store.find("scores", "value", False) == []


async def test_find_on_an_undeclared_field_is_refused(store: Store) -> None:
    await store.put("profiles", "p1", {"email": "a@example.com"})

    with pytest.raises(InvalidArgument) as caught:
        await store.find("profiles", "email", "a@example.com")

    assert caught.value.field == "field"
    assert "'email'" in str(caught.value) and "ensure_index" in str(caught.value)


@pytest.mark.parametrize("value", [None, ["a"], {"a": 1}, float("nan")])
async def test_find_takes_a_scalar_value(store: Store, value: object) -> None:
    await store.ensure_index("profiles", "email")

    with pytest.raises(InvalidArgument) as caught:
        await store.find("profiles", "email", value)  # type: ignore[arg-type]

    assert caught.value.field == "value"


async def test_an_indexed_field_must_hold_a_scalar(store: Store) -> None:
    await store.ensure_index("profiles", "email")

    with pytest.raises(InvalidArgument) as caught:
        await store.put("profiles", "p1", {"email": ["a@example.com"]})

    assert caught.value.field == "doc.email"
    assert "indexed" in str(caught.value)
    assert await store.get("profiles", "p1") is None


async def test_ensure_index_is_idempotent_but_cannot_change_kind(store: Store) -> None:
    await store.ensure_index("profiles", "email", unique=True)
    await store.ensure_index("profiles", "email", unique=True)

    with pytest.raises(FailedPrecondition) as caught:
        await store.ensure_index("profiles", "email", unique=False)
    assert "profiles.email" in str(caught.value)


# --- unique indexes -------------------------------------------------------------------------------------


async def test_unique_index_rejects_a_second_document_with_the_value(store: Store) -> None:
    await store.ensure_index("profiles", "email", unique=True)
    await store.put("profiles", "p1", {"email": "a@example.com"})

    with pytest.raises(DuplicateValue) as caught:
        await store.put("profiles", "p2", {"email": "a@example.com"})

    duplicate = caught.value
    assert isinstance(duplicate, Conflict)
    assert (duplicate.collection, duplicate.field, duplicate.key) == ("profiles", "email", "p2")
    assert "'email'" in str(duplicate) and "profiles" in str(duplicate) and "a@example.com" not in str(duplicate)
    assert await store.get("profiles", "p2") is None
    assert await store.count("profiles") == 1


async def test_unique_index_conflicts_on_create_and_on_update(store: Store) -> None:
    await store.ensure_index("profiles", "email", unique=True)
    await store.put("profiles", "p1", {"email": "a@example.com"})
    await store.put("profiles", "p2", {"email": "b@example.com"})

    with pytest.raises(DuplicateValue):
        await store.put("profiles", "p3", {"email": "a@example.com"}, expected_version=0)
    with pytest.raises(DuplicateValue):
        await store.put("profiles", "p2", {"email": "a@example.com"}, expected_version=1)

    assert (await store.get("profiles", "p2")) == Record("p2", 1, {"email": "b@example.com"})


async def test_unique_index_lets_a_document_keep_its_value_and_frees_it_on_delete(store: Store) -> None:
    await store.ensure_index("profiles", "email", unique=True)
    await store.put("profiles", "p1", {"email": "a@example.com", "n": 1})

    assert await store.put("profiles", "p1", {"email": "a@example.com", "n": 2}) == 2
    await store.delete("profiles", "p1")
    assert await store.put("profiles", "p2", {"email": "a@example.com"}) == 1


async def test_unique_index_ignores_null_and_absent_values(store: Store) -> None:
    await store.ensure_index("profiles", "email", unique=True)

    await store.bulk_write(
        [
            Put("profiles", "p1", {"email": None}),
            Put("profiles", "p2", {"email": None}),
            Put("profiles", "p3", {}),
            Put("profiles", "p4", {}),
        ]
    )

    assert await store.count("profiles") == 4


async def test_unique_index_cannot_be_created_over_duplicates(store: Store) -> None:
    await store.put("profiles", "p1", {"email": "a@example.com"})
    await store.put("profiles", "p2", {"email": "a@example.com"})

    with pytest.raises(Conflict) as caught:
        await store.ensure_index("profiles", "email", unique=True)

    assert "profiles.email" in str(caught.value)
    with pytest.raises(InvalidArgument):
        await store.find("profiles", "email", "a@example.com")


# --- scan -----------------------------------------------------------------------------------------------


async def _scan_all(store: Store, collection: str, *, limit: int, prefix: str | None = None) -> list[str]:
    keys: list[str] = []
    cursor = None
    while True:
        page = await store.scan(collection, cursor=cursor, limit=limit, prefix=prefix)
        assert len(page.records) <= limit
        keys.extend(record.key for record in page.records)
        if page.next_cursor is None:
            return keys
        assert len(page.records) == limit
        cursor = page.next_cursor


async def test_scan_pages_through_many_documents_in_key_order(store: Store) -> None:
    keys = [f"k{i:04d}" for i in range(1234)]
    await store.bulk_write([Put("profiles", key, {"k": key}) for key in reversed(keys)])
    await store.put("other", "k0000-other", {})

    assert await _scan_all(store, "profiles", limit=100) == keys
    assert await _scan_all(store, "profiles", limit=617) == keys  # exactly two full pages


async def test_scan_all_yields_every_record_across_pages(store: Store) -> None:
    keys = [f"k{i:04d}" for i in range(1234)]
    await store.bulk_write([Put("profiles", key, {"k": key}) for key in reversed(keys)])
    await store.put("profiles", "other", {})
    assert [r.key async for r in store.scan_all("profiles", page_size=100)] == [*keys, "other"]
    assert [r.doc["k"] async for r in store.scan_all("profiles", prefix="k", page_size=617)] == keys


async def test_scan_with_a_prefix_stays_inside_it(store: Store) -> None:
    keys = [
        "a",
        "user/",
        "user/1",
        "user/10",
        "user/2",
        "user0",
        "users",
        "userz",
        "ü/1",
        "ü/2",
        "ü0",
        "日本/1",
    ]
    await store.bulk_write([Put("profiles", key, {}) for key in keys])

    assert await _scan_all(store, "profiles", limit=2, prefix="user/") == [
        "user/",
        "user/1",
        "user/10",
        "user/2",
    ]
    assert await _scan_all(store, "profiles", limit=10, prefix="ü/") == ["ü/1", "ü/2"]
    assert await _scan_all(store, "profiles", limit=10, prefix="日本") == ["日本/1"]
    assert await _scan_all(store, "profiles", limit=10, prefix="nothing") == []
    assert await _scan_all(store, "profiles", limit=5, prefix="") == sorted(keys)


async def test_scan_of_an_empty_collection_is_one_empty_page(store: Store) -> None:
    page = await store.scan("nothing-here")

    assert page.records == [] and page.next_cursor is None


async def test_scan_rejects_a_cursor_it_did_not_make(store: Store) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await store.scan("profiles", cursor="not-a-cursor")

    assert caught.value.field == "cursor"


# --- bulk writes ----------------------------------------------------------------------------------------


async def test_bulk_write_spans_collections_and_reports_each_version(store: Store) -> None:
    await store.put("profiles", "p1", {"n": 1})

    result = await store.bulk_write(
        [
            Put("profiles", "p1", {"n": 2}, expected_version=1),
            Put("profiles", "p2", {"n": 1}, expected_version=0),
            Delete("segments", "absent"),
            Put("segments", "s1", {"members": ["p1", "p2"]}),
        ]
    )

    assert result.versions == (2, 1, 0, 1)
    assert result.deleted == 0
    assert await store.get("profiles", "p1") == Record("p1", 2, {"n": 2})
    assert await store.get("segments", "s1") == Record("s1", 1, {"members": ["p1", "p2"]})


async def test_bulk_ops_on_one_key_apply_in_order(store: Store) -> None:
    result = await store.bulk_write(
        [
            Put("profiles", "p1", {"n": 1}, expected_version=0),
            Put("profiles", "p1", {"n": 2}, expected_version=1),
            Delete("profiles", "p1", expected_version=2),
            Put("profiles", "p1", {"n": 3}, expected_version=0),
        ]
    )

    assert result.versions == (1, 2, 0, 1)
    assert result.deleted == 1
    assert await store.get("profiles", "p1") == Record("p1", 1, {"n": 3})


async def test_bulk_ops_on_stored_keys_apply_in_order(store: Store) -> None:
    # Keys stored before the write (SQLite writes those through the rows it read), one deleted and put
    # again twice in the same write.
    await store.put("profiles", "p1", {"n": 1})
    await store.put("profiles", "p2", {"n": 1})

    result = await store.bulk_write(
        [
            Put("profiles", "p1", {"n": 2}),
            Delete("profiles", "p1"),
            Put("profiles", "p1", {"n": 3}),
            Put("profiles", "p1", {"n": 4}, expected_version=1),
            Delete("profiles", "p2", expected_version=1),
            Put("profiles", "p3", {"n": 1}),
            Put("profiles", "p2", {"n": 5}, expected_version=0),
        ]
    )

    assert result.versions == (2, 0, 1, 2, 0, 1, 1)
    assert result.deleted == 2
    assert await store.get("profiles", "p1") == Record("p1", 2, {"n": 4})
    assert await store.get("profiles", "p2") == Record("p2", 1, {"n": 5})
    assert await store.get("profiles", "p3") == Record("p3", 1, {"n": 1})
    assert await store.count("profiles") == 3


async def test_bulk_version_conflict_names_the_first_failing_op_and_writes_nothing(store: Store) -> None:
    await store.put("profiles", "p1", {"n": 1})
    await store.put("profiles", "p2", {"n": 1})

    with pytest.raises(VersionConflict) as caught:
        await store.bulk_write(
            [
                Put("profiles", "new", {"n": 1}),
                Put("profiles", "p1", {"n": 2}, expected_version=1),
                Delete("profiles", "p2", expected_version=7),
                Put("profiles", "p1", {"n": 3}, expected_version=1),
            ]
        )

    assert (caught.value.op_index, caught.value.key, caught.value.expected, caught.value.actual) == (
        2,
        "p2",
        7,
        1,
    )
    assert str(caught.value).startswith("ops[2]: ")
    assert await store.get("profiles", "new") is None
    assert await store.get("profiles", "p1") == Record("p1", 1, {"n": 1})
    assert await store.get("profiles", "p2") == Record("p2", 1, {"n": 1})


async def test_state_and_its_stream_checkpoint_land_together_or_not_at_all(store: Store) -> None:
    """The write-behind pattern: a batch of state plus the stream position it reflects."""
    await store.put("checkpoints", "profile/p0", {"stream_seq": 100})
    await store.put("profiles", "p1", {"orders": 1})

    # A replica that still believes it owns the partition at checkpoint version 1 writes behind...
    result = await store.bulk_write(
        [
            Put("profiles", "p1", {"orders": 2}),
            Put("profiles", "p2", {"orders": 1}),
            Put("checkpoints", "profile/p0", {"stream_seq": 142}, expected_version=1),
        ]
    )
    assert result.versions == (2, 1, 2)

    # ...then a stale writer (checkpoint moved on) must not land its state either.
    with pytest.raises(VersionConflict) as caught:
        await store.bulk_write(
            [
                Put("profiles", "p1", {"orders": 99}),
                Put("profiles", "p3", {"orders": 99}),
                Put("checkpoints", "profile/p0", {"stream_seq": 120}, expected_version=1),
            ]
        )

    assert (caught.value.collection, caught.value.key, caught.value.op_index) == (
        "checkpoints",
        "profile/p0",
        2,
    )
    assert await store.get("checkpoints", "profile/p0") == Record("profile/p0", 2, {"stream_seq": 142})
    assert await store.get("profiles", "p1") == Record("p1", 2, {"orders": 2})
    assert await store.get("profiles", "p3") is None


async def test_bulk_unique_violation_is_all_or_nothing_where_the_backend_allows(store: Store) -> None:
    await store.ensure_index("profiles", "email", unique=True)
    await store.put("profiles", "p1", {"email": "a@example.com"})

    with pytest.raises(DuplicateValue) as caught:
        await store.bulk_write(
            [
                Put("profiles", "p2", {"email": "b@example.com"}),
                Put("checkpoints", "profile/p0", {"stream_seq": 7}),
                Put("profiles", "p3", {"email": "a@example.com"}),
                Put("checkpoints", "profile/p1", {"stream_seq": 8}),
            ]
        )

    assert (caught.value.op_index, caught.value.key, caught.value.field) == (2, "p3", "email")
    assert await store.get("profiles", "p3") is None
    assert await store.get("checkpoints", "profile/p1") is None
    landed = (
        await store.get("profiles", "p2") is not None,
        await store.get("checkpoints", "profile/p0") is not None,
    )
    if await store.bulk_is_atomic():
        assert landed == (False, False)
    else:  # documented: ops before the failing one stay applied, in order
        assert landed == (True, True)


async def test_bulk_unique_violation_by_a_stored_document_names_its_op(store: Store) -> None:
    await store.ensure_index("profiles", "email", unique=True)
    await store.put("profiles", "p1", {"email": "a@example.com"})
    await store.put("profiles", "p2", {"email": "b@example.com"})

    with pytest.raises(DuplicateValue) as caught:
        await store.bulk_write(
            [
                Put("profiles", "p3", {"email": "c@example.com"}),
                Put("profiles", "p2", {"email": "a@example.com"}),
            ]
        )

    assert (caught.value.op_index, caught.value.key, caught.value.field) == (1, "p2", "email")
    assert await store.get("profiles", "p2") == Record("p2", 1, {"email": "b@example.com"})


async def test_bulk_write_of_thousands_of_documents(store: Store) -> None:
    ops = [Put("events", f"e{i:05d}", {"i": i, "kind": "page", "props": {"path": f"/p/{i}"}}) for i in range(5000)]

    result = await store.bulk_write([*ops, Put("checkpoints", "events/0", {"seq": 5000})])

    assert result.versions == (1,) * 5001
    assert await store.count("events") == 5000
    assert (await store.get("events", "e04999")).doc["props"] == {"path": "/p/4999"}  # type: ignore[union-attr]


async def test_an_empty_bulk_write_does_nothing(store: Store) -> None:
    result = await store.bulk_write([])

    assert result.versions == () and result.deleted == 0


# --- concurrency ----------------------------------------------------------------------------------------


async def test_concurrent_conditional_puts_have_exactly_one_winner_per_version(store: Store) -> None:
    await store.put("journeys", "j1", {"step": 0})

    for version in range(1, 4):

        async def attempt(writer: int, version: int = version) -> int | None:
            try:
                return await store.put("journeys", "j1", {"step": version, "writer": writer}, expected_version=version)
            except VersionConflict:
                return None

        outcomes = await asyncio.gather(*(attempt(writer) for writer in range(25)))

        winners = [writer for writer, outcome in enumerate(outcomes) if outcome is not None]
        assert len(winners) == 1
        assert outcomes[winners[0]] == version + 1
        assert (await store.get("journeys", "j1")).doc == {"step": version, "writer": winners[0]}  # type: ignore[union-attr]


async def test_concurrent_creates_have_exactly_one_winner(store: Store) -> None:
    async def attempt(writer: int) -> bool:
        try:
            await store.put("identities", "email:a@example.com", {"person": writer}, expected_version=0)
            return True
        except VersionConflict:
            return False

    assert sum(await asyncio.gather(*(attempt(writer) for writer in range(20)))) == 1


async def test_concurrent_read_modify_write_loses_no_update(store: Store) -> None:
    await store.put("counters", "orders", {"n": 0})

    async def increment() -> None:
        while True:
            record = await store.get("counters", "orders")
            assert record is not None
            try:
                await store.put("counters", "orders", {"n": record.doc["n"] + 1}, expected_version=record.version)
                return
            except VersionConflict:
                await asyncio.sleep(0)

    await asyncio.gather(*(increment() for _ in range(20)))

    assert await store.get("counters", "orders") == Record("orders", 21, {"n": 20})


async def test_concurrent_unconditional_puts_all_count(store: Store) -> None:
    await asyncio.gather(*(store.put("profiles", "p1", {"writer": writer}) for writer in range(15)))

    record = await store.get("profiles", "p1")
    assert record is not None and record.version == 15


# --- documents ------------------------------------------------------------------------------------------


async def test_stored_documents_are_isolated_from_the_callers_objects(store: Store) -> None:
    await store.ensure_index("profiles", "plan")
    doc = {"plan": "free", "traits": {"city": "Oslo"}, "tags": ["a"]}
    await store.put("profiles", "p1", doc)

    doc["traits"]["city"] = "mutated"
    doc["tags"].append("mutated")
    read = await store.get("profiles", "p1")
    assert read is not None
    read.doc["traits"]["city"] = "mutated too"
    (found,) = await store.find("profiles", "plan", "free")
    found.doc["tags"].clear()
    (scanned,) = (await store.scan("profiles")).records
    scanned.doc["plan"] = "mutated"

    assert (await store.get("profiles", "p1")) == Record(
        "p1", 1, {"plan": "free", "traits": {"city": "Oslo"}, "tags": ["a"]}
    )


async def test_unicode_keys_and_nested_documents_round_trip_exactly(store: Store) -> None:
    doc = {
        "name": "Zoë Ångström 🚀",
        "日本語": {"ключ": ["значение", 1, 2.5, -0.0, None, True, False]},
        "numbers": [0, -1, 2**63 - 1, -(2**63), 1e-300, 1.7976931348623157e308, 0.1],
        "empty": {"dict": {}, "list": [], "string": ""},
        "deep": {"a": {"b": {"c": {"d": {"e": [[[{"f": "g"}]]]}}}}},
        "dotted.name": {"a@example.com": 1},
        "": "empty field name",
        "nul in value": "a\x00b",
    }
    keys = ["ü", "日本/東京", "emoji-🚀", "spaces and/slashes?&=", "a" * 1024]

    await store.bulk_write([Put("profiles", key, doc) for key in keys])

    for key in keys:
        record = await store.get("profiles", key)
        assert record == Record(key, 1, doc)
        assert type(record.doc["numbers"][4]) is float and type(record.doc["numbers"][2]) is int
    assert sorted(await store.get_many("profiles", keys)) == sorted(keys)
    assert await _scan_all(store, "profiles", limit=2) == sorted(keys)


@pytest.mark.parametrize(
    ("doc", "field", "problem"),
    [
        ({"score": float("nan")}, "doc.score", "finite"),
        ({"score": float("inf")}, "doc.score", "finite"),
        ({"big": 2**63}, "doc.big", "64-bit"),
        ({"at": __import__("datetime").datetime(2024, 1, 1)}, "doc.at", "ISO-8601"),
        ({"pair": (1, 2)}, "doc.pair", "tuple"),
        ({"raw": b"x"}, "doc.raw", "bytes"),
        ({"set": {1}}, "doc.set", "set"),
        ({"a": {"$set": 1}}, "doc.a['$set']", "'$'"),
        ({"a": [{"b\x00": 1}]}, "doc.a[0]['b\\x00']", "NUL"),
        ({"a": [1, {1: "x"}]}, "doc.a[1][1]", "keys are strings"),
        ({"text": "bad \ud800 surrogate"}, "doc.text", "Unicode"),
    ],
)
async def test_unportable_documents_are_refused_naming_the_path(
    store: Store, doc: dict, field: str, problem: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await store.put("profiles", "p1", doc)

    assert caught.value.field == field
    assert problem in str(caught.value) and "'profiles'" in str(caught.value)
    assert await store.get("profiles", "p1") is None


async def test_too_deep_or_too_large_documents_are_refused(store: Store) -> None:
    deep: dict = {}
    cursor = deep
    for _ in range(70):
        cursor["x"] = {}
        cursor = cursor["x"]

    with pytest.raises(InvalidArgument, match="deeper"):
        await store.put("profiles", "deep", deep)
    with pytest.raises(InvalidArgument) as caught:
        await store.put("profiles", "huge", {"blob": "x" * (17 * 1024 * 1024)})
    assert caught.value.field.startswith("doc")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.get("", "k"), "collection"),
        (lambda s: s.get("system.users", "k"), "collection"),
        (lambda s: s.get("has space", "k"), "collection"),
        (lambda s: s.get("c", ""), "key"),
        (lambda s: s.get("c", "a\x00b"), "key"),
        (lambda s: s.get("c", 42), "key"),
        (lambda s: s.get("c", "x" * 1025), "key"),
        (lambda s: s.put("c", "k", ["not", "a", "dict"]), "doc"),
        (lambda s: s.put("c", "k", {}, expected_version=-1), "expected_version"),
        (lambda s: s.put("c", "k", {}, expected_version=True), "expected_version"),
        (lambda s: s.get_many("c", "k"), "keys"),
        (lambda s: s.bulk_write([Put("c", "k", {}), ("c", "k")]), "ops[1]"),
        (lambda s: s.bulk_write([Put("c", "k", {}), Put("c", "k2", {"a": float("nan")})]), "ops[1].doc.a"),
        (lambda s: s.ensure_index("c", "nested.field"), "field"),
        (lambda s: s.find("c", "f", "v", limit=0), "limit"),
        (lambda s: s.scan("c", limit=10_001), "limit"),
    ],
)
async def test_bad_arguments_are_refused_naming_the_argument(store: Store, call, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await call(store)

    assert caught.value.field == field


# --- count, drop, lifecycle -----------------------------------------------------------------------------


async def test_count_and_drop_collection(store: Store) -> None:
    await store.ensure_index("profiles", "email", unique=True)
    await store.bulk_write([Put("profiles", f"p{i}", {"email": f"{i}@example.com"}) for i in range(7)])
    await store.put("segments", "s1", {})

    assert await store.count("profiles") == 7
    await store.drop_collection("profiles")
    await store.drop_collection("never-existed")

    assert await store.count("profiles") == 0
    assert await store.get("profiles", "p1") is None
    assert await store.count("segments") == 1
    with pytest.raises(InvalidArgument):  # the index declaration went with the collection
        await store.find("profiles", "email", "1@example.com")
    assert await store.put("profiles", "p1", {"email": "0@example.com"}, expected_version=0) == 1


async def test_a_closed_store_refuses_calls_and_closing_twice_is_fine(store_factory) -> None:
    async with store_factory() as store:
        await store.put("profiles", "p1", {})

    await store.close()
    with pytest.raises(CdpError, match="closed"):
        await store.get("profiles", "p1")


async def test_storage_errors_name_the_collection_never_the_key(store: Store) -> None:
    """Keys are often identifier values, and error messages end up in logs."""
    key = "email:ada@example.com"
    await store.ensure_index("identities", "phone", unique=True)
    await store.put("identities", key, {"phone": "+15550100"})
    failures = []
    for attempt in (
        store.put("identities", key, {"n": 1}, expected_version=0),
        store.put("identities", "email:bob@example.com", {"phone": "+15550100"}),
        store.put("identities", key, {"a": {"$set": 1}}),
        store.put("identities", key, {"phone": ["+15550100"]}),
        store.get("identities", "email:ada@example.com\x00"),
        store.scan("identities", cursor="k1." + "ada@example.com"),
        store.find("identities", "phone", ["+15550100"]),  # type: ignore[arg-type]
    ):
        with pytest.raises(CdpError) as caught:
            await attempt
        failures.append(str(caught.value))
    for message in failures:
        assert "identities" in message or "phone" in message or "cursor" in message
        assert "example.com" not in message and "15550100" not in message, message
