"""The SQLite store writes a put of a key it takes for new (no expected version, or expecting none)
without reading the key's version first; when the key turns out to be stored, the write is made again the
usual way. These tests hold that path to the contract: versions, create-only, the op a conflict names,
unique indexes, and two stores sharing one file (replicas, leases)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_kit.storage import Delete, DuplicateValue, Put, Record, SqliteStore, VersionConflict


async def test_an_unconditional_put_of_a_stored_key_in_a_collection_of_new_keys_counts_on_from_its_version(
    tmp_path: Path,
) -> None:
    async with SqliteStore(tmp_path / "cdp.db") as store:
        # a collection whose puts have all been new so far
        for n in range(3):
            await store.bulk_write([Put("timeline", f"e{n}-{i}", {"n": i}) for i in range(5)])
        assert await store.put("timeline", "e0-1", {"n": "again"}) == 2
        result = await store.bulk_write([Put("timeline", "e1-1", {"n": "again"}), Put("timeline", "e9-0", {"n": 0})])
        assert result.versions == (2, 1)
        assert await store.get("timeline", "e0-1") == Record("e0-1", 2, {"n": "again"})
        assert await store.get("timeline", "e1-1") == Record("e1-1", 2, {"n": "again"})
        assert await store.get("timeline", "e9-0") == Record("e9-0", 1, {"n": 0})
        assert await store.count("timeline") == 16


async def test_create_only_of_a_stored_key_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "cdp.db") as store:
        await store.bulk_write([Put("leases", "a", {"owner": "one"})])
        with pytest.raises(VersionConflict) as caught:
            await store.bulk_write(
                [Put("other", "x", {"n": 1}), Put("leases", "a", {"owner": "two"}, expected_version=0)]
            )
        assert (caught.value.op_index, caught.value.expected, caught.value.actual) == (1, 0, 1)
        assert await store.get("leases", "a") == Record("a", 1, {"owner": "one"})
        assert await store.get("other", "x") is None


async def test_a_conflict_names_the_first_failing_op_when_that_is_a_create_of_a_stored_key(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "cdp.db") as store:
        await store.bulk_write([Put("leases", "a", {"owner": "one"}), Put("profiles", "p", {"v": 1})])
        with pytest.raises(VersionConflict) as caught:
            await store.bulk_write(
                [
                    Put("leases", "a", {"owner": "two"}, expected_version=0),  # stored: fails first
                    Put("profiles", "p", {"v": 2}, expected_version=7),  # fails too, later
                ]
            )
        assert (caught.value.collection, caught.value.op_index, caught.value.actual) == ("leases", 0, 1)


async def test_a_put_of_a_stored_key_frees_its_old_unique_value_for_a_later_op(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "cdp.db") as store:
        await store.ensure_index("people", "email", unique=True)
        await store.bulk_write([Put("people", "p1", {"email": "a@example.com"})])
        # p1 moves to b@, then p2 takes a@: valid in this order
        result = await store.bulk_write(
            [Put("people", "p1", {"email": "b@example.com"}), Put("people", "p2", {"email": "a@example.com"})]
        )
        assert result.versions == (2, 1)
        assert [r.key for r in await store.find("people", "email", "a@example.com")] == ["p2"]
        with pytest.raises(DuplicateValue) as caught:
            await store.bulk_write([Put("people", "p3", {"n": 1}), Put("people", "p4", {"email": "b@example.com"})])
        assert (caught.value.key, caught.value.op_index) == ("p4", 1)
        assert await store.get("people", "p3") is None


async def test_two_stores_on_one_file_see_each_others_keys(tmp_path: Path) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as one, SqliteStore(path) as two:
        assert (
            await one.bulk_write([Put("leases", "job", {"owner": "one"}), Put("log", "k", {"by": "one"})])
        ).versions == (
            1,
            1,
        )
        with pytest.raises(VersionConflict):
            await two.put("leases", "job", {"owner": "two"}, expected_version=0)
        assert await two.put("log", "k", {"by": "two"}) == 2
        assert await one.put("log", "k", {"by": "one"}) == 3
        assert await one.get("leases", "job") == Record("job", 1, {"owner": "one"})
        assert await two.get("log", "k") == Record("k", 3, {"by": "one"})


async def test_a_key_deleted_and_put_again_in_one_write_starts_at_version_one(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "cdp.db") as store:
        await store.bulk_write([Put("outbox", "o1", {"n": 1})])
        await store.put("outbox", "o1", {"n": 2})
        result = await store.bulk_write(
            [Delete("outbox", "o1"), Put("outbox", "o1", {"n": 3}), Put("outbox", "o2", {})]
        )
        assert (result.versions, result.deleted) == ((0, 1, 1), 1)
        assert await store.get("outbox", "o1") == Record("o1", 1, {"n": 3})


KEYS = ['quote"d', "back\\slash", "Zoë", "雪", "🙂 emoji", "tab\there", "line\u2028sep", "1", "null", "[1]"]


async def test_keys_of_any_characters_are_read_and_versioned(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "cdp.db") as store:
        await store.bulk_write([Put("odd", key, {"k": key}) for key in KEYS])
        result = await store.bulk_write([Put("odd", key, {"k": key}, expected_version=1) for key in KEYS])
        assert result.versions == (2,) * len(KEYS)
        assert await store.get_many("odd", [*KEYS, "absent"]) == {key: Record(key, 2, {"k": key}) for key in KEYS}
        assert (await store.bulk_write([Delete("odd", key, expected_version=2) for key in KEYS])).deleted == len(KEYS)


async def test_a_put_expecting_a_version_the_key_has_left_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "cdp.db") as store:
        await store.bulk_write([Put("profiles", f"p{i}", {"n": 0}) for i in range(3)])
        await store.put("profiles", "p1", {"n": 1})  # p1 is at 2 now
        with pytest.raises(VersionConflict) as caught:
            await store.bulk_write([Put("profiles", f"p{i}", {"n": "late"}, expected_version=1) for i in range(3)])
        assert (caught.value.key, caught.value.op_index, caught.value.expected, caught.value.actual) == ("p1", 1, 1, 2)
        with pytest.raises(VersionConflict) as caught:
            await store.put("profiles", "gone", {"n": 0}, expected_version=4)
        assert (caught.value.expected, caught.value.actual) == (4, 0)
        assert await store.get_many("profiles", ["p0", "p1", "p2", "gone"]) == {
            "p0": Record("p0", 1, {"n": 0}),
            "p1": Record("p1", 2, {"n": 1}),
            "p2": Record("p2", 1, {"n": 0}),
        }
        result = await store.bulk_write(
            [Put("profiles", f"p{i}", {"n": "next"}, expected_version=v) for i, v in ((0, 1), (1, 2))]
        )
        assert result.versions == (2, 3)


async def test_of_two_stores_on_one_file_writing_from_one_version_the_second_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as one, SqliteStore(path) as two:
        await one.put("leases", "job", {"owner": None})
        assert await one.put("leases", "job", {"owner": "one"}, expected_version=1) == 2
        with pytest.raises(VersionConflict) as caught:
            await two.put("leases", "job", {"owner": "two"}, expected_version=1)
        assert caught.value.actual == 2
        assert await two.put("leases", "job", {"owner": "two"}, expected_version=2) == 3
        assert await one.get("leases", "job") == Record("job", 3, {"owner": "two"})
