"""The account's budget in the store (`budgets.SharedBudget`): each change starts from the budget this process
last wrote, without reading its state back, and from the stored state whenever that is not known to be it (a
write that failed, another replica's write)."""

from __future__ import annotations

import pytest

from cdp_crm.budgets import SharedBudget
from cdp_crm.domain import budget as budget_domain
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.state import BUDGETS, prepare_store
from cdp_kit.storage import open_store

BURST = 5


def connection():
    document = {
        "connections": [
            {
                "id": "hs",
                "kind": "hubspot",
                "account": "62515",
                "url": "http://127.0.0.1:1",
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "limits": {"burst": BURST, "window_seconds": 10.0},
                "mappings": [
                    {"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                     "fields": {"email": "traits.email"}},
                ],
            }
        ]
    }  # fmt: skip
    return parse_connections(document)[0]


@pytest.fixture
async def store(tmp_path):
    async with open_store(f"sqlite:///{tmp_path}/crm.db") as opened:
        await prepare_store(opened)
        yield opened


async def grants(store) -> int:
    return len((await store.get(BUDGETS, "62515")).doc["grants"])


async def test_a_change_after_this_process_wrote_reads_no_state_back(store, monkeypatch):
    budget = SharedBudget(store, connection())
    parsed = []
    real = budget_domain.Budget.from_state
    monkeypatch.setattr(budget_domain.Budget, "from_state", classmethod(lambda cls, s: parsed.append(1) or real(s)))
    now = 1_000.0
    for i in range(3):
        reservation = await budget.acquire(1, lambda i=i: now + i)
        await budget.settle(reservation, now + i + 0.1)
    # Six changes, each on the budget the one before wrote: its state is never parsed again.
    assert parsed == []
    assert await grants(store) == 3


async def test_another_replicas_write_is_read_before_the_next_change(store):
    mine, theirs = SharedBudget(store, connection()), SharedBudget(store, connection())
    now = 1_000.0
    assert (await mine.reserve(2, now)).granted
    assert (await theirs.reserve(2, now)).granted  # reads mine's grants, adds its own
    # Mine's budget in memory holds only its own grant: the stale write is refused, the state read again.
    assert not (await mine.reserve(2, now)).granted  # 2 + 2 held: 2 more would pass the burst of 5
    assert (await mine.reserve(1, now)).granted
    assert await grants(store) == 3


async def test_a_write_that_failed_leaves_no_trace_in_the_next_change(store, monkeypatch):
    budget = SharedBudget(store, connection())
    now = 1_000.0
    assert (await budget.reserve(1, now)).granted
    real_put = store.put

    async def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "put", failing)
    with pytest.raises(OSError):
        await budget.reserve(1, now)  # granted in memory, never written: it must not count
    monkeypatch.setattr(store, "put", real_put)
    assert (await budget.reserve(1, now)).granted
    assert await grants(store) == 2
    assert (await budget.reserve(3, now)).granted  # 2 + 3 = the burst: the lost grant holds nothing
    assert not (await budget.reserve(1, now)).granted
