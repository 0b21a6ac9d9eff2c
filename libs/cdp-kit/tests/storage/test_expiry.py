"""Records aging out: deleted a bounded page at a time, a record written again since the scan kept."""

from __future__ import annotations

from cdp_kit.storage import Put
from cdp_kit.storage.expiry import sweep_expired
from cdp_kit.storage.memory import MemoryStore


class Counting(MemoryStore):
    """A store that remembers how many ops each bulk write carried."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []

    async def bulk_write(self, ops):
        ops = list(ops)
        self.writes.append(len(ops))
        return await super().bulk_write(ops)


async def test_many_expired_records_go_in_bounded_pages_and_the_young_and_the_undated_stay():
    store = Counting()
    await store.bulk_write([Put("tombs", f"old-{n:04}", {"at": 100.0}) for n in range(1_203)])
    await store.bulk_write([Put("tombs", "young", {"at": 900.0}), Put("tombs", "undated", {"request": "r"})])
    store.writes.clear()
    assert await sweep_expired(store, "tombs", before=500.0, page=500) == 1_203
    assert max(store.writes) <= 500 and sum(store.writes) == 1_203
    assert {r.key async for r in store.scan_all("tombs")} == {"young", "undated"}


async def test_a_record_written_again_after_the_scan_is_kept():
    store = MemoryStore()
    await store.bulk_write([Put("tombs", "a", {"at": 100.0}), Put("tombs", "b", {"at": 100.0})])
    scan = store.scan

    async def scan_then_rewrite(*args, **kwargs):
        page = await scan(*args, **kwargs)
        await store.put("tombs", "a", {"at": 1_000.0})  # a deletion redelivered stamps it anew meanwhile
        return page

    store.scan = scan_then_rewrite  # type: ignore[method-assign]
    assert await sweep_expired(store, "tombs", before=500.0) == 1
    assert (await store.get("tombs", "a")).doc == {"at": 1_000.0} and await store.get("tombs", "b") is None
