"""What the CRM connector keeps in the store, one collection per idea (every document plain JSON).

- `crm_persons` / <person id>: the person as the connector follows it - the flat profile fields (all of
  them, so a mapping added later can be backfilled), the segments the person is in, the stream position
  of the last change applied. Written with the batch that changed it (the engine's commit), so a
  redelivered change is applied on it again. Deleted by a privacy erasure (and never written again:
  `crm_tombstones`).
- `crm_records` / <record key>: one per CRM record the connector writes (`coalesce.record_key`: a hash of
  the mapping and match key): the fields the CRM took last (a refused or queued write leaves them as
  they were: the next write is computed against them), `sent` (per field, the values sent since without
  a confirmation - an answer lost after the CRM applied the write -, until a write is confirmed: the
  inbound side reads them back as the connector's own), the CRM id, the state
  (synced, pending, dead_lettered, out_of_scope; after a privacy erasure anonymised or deleted, with the
  match key and values dropped), the person (indexed: privacy and GetRecordStatus).
- `crm_pending` / <record key>: a change the CRM did not take yet (throttled, down, answer lost past the
  batch's retry time): durably queued with the batch, so the stream message can be acknowledged; its
  partition's owner sends it again (`engine.CrmLogic.retry_pending`). Indexed by partition and by
  connection: the stream run's `pending` is how many a connection has queued now.
- `crm_dead_letters` / <record key>: `isolation.DeadLetter.to_state()`, the latest refusal of a record.
- `crm_runs` / <run id>: backfills, replays and each connection's continuous (stream) run, with counters.
- `crm_budgets` / <account>: `budget.Budget.to_state()` and the limits it was written under (`configured`:
  a start under other limits adopts them), read and written under compare-and-set by every replica and
  sync (budgets.py).
- `crm_cursors` / <connection>:<object>: how far the inbound side has read a CRM's changes (a stamp and
  the ids read at it, or a Dataverse delta link); <connection>:<object>:<record id>: what the inbound
  side saw last of one record - its status or stage and a digest of the fields it reports, and for a
  contact or lead a digest per field read back as a trait or consent (`fields`: the base of the identify's
  per-field comparison, salted with the record and field), no values (inbound/core.py writes it,
  inbound/news.py makes it).
- `crm_merges` / <survivor>:<loser>: a merge of two persons (identity.merged, as the survivor's profile
  change names it) whose records are still to be merged in the CRMs: written with the batch, done by the
  partition's owner once the survivor's records are written (`engine.CrmLogic.merge_pending`), then
  deleted. The loser's record document then reads state `merged` (`merged_into`: the survivor's record).
- `crm_privacy` / <request id>: what a privacy deletion did in each CRM (policy, counts, when), never values.
- `crm_tombstones` / <person id>: a person a privacy deletion erased (when, which request): what reaches
  the connector for them afterwards (segmentation's exits, a profile change sourced late) is dropped, so
  nothing writes them to a CRM again. The person id is the CDP's own; no identifier or value is kept.
  Swept after CDP_CRM_TOMBSTONE_DAYS (`privacy.TombstoneSweeper`), when nothing for the person can arrive.
- `crm_webhooks` / <connection>:<digest of the signature>: a signed HubSpot webhook request taken (`at`:
  its timestamp), so a replay of it is taken by no replica; swept once the request would be refused as
  stale anyway (`inbound.hubspot.WebhookSweeper`). No content of the request is kept.
"""

from __future__ import annotations

from cdp_kit.storage import Store

PERSONS = "crm_persons"
RECORDS = "crm_records"
PENDING = "crm_pending"
DEAD_LETTERS = "crm_dead_letters"
RUNS = "crm_runs"
BUDGETS = "crm_budgets"
CURSORS = "crm_cursors"
PRIVACY = "crm_privacy"
TOMBSTONES = "crm_tombstones"
MERGES = "crm_merges"
WEBHOOKS = "crm_webhooks"

SYNCED = "synced"
PENDING_STATE = "pending"
DEAD_LETTERED = "dead_lettered"
OUT_OF_SCOPE = "out_of_scope"
# After a privacy erasure: what became of the record in the CRM (privacy.py). The document stays as the
# record that it was done, without the match key or any field value.
ANONYMISED = "anonymised"
DELETED = "deleted"
ERASED = (ANONYMISED, DELETED)
# The loser's record of two merged persons: merged into the survivor's (HubSpot), deleted after what the
# survivor's lacked was carried over, or kept in the CRM (`on_merge: keep`); no longer written.
MERGED = "merged"


async def prepare_store(store: Store) -> None:
    await store.ensure_index(RECORDS, "person_id")
    await store.ensure_index(RECORDS, "crm_id")
    await store.ensure_index(PENDING, "partition")
    await store.ensure_index(MERGES, "partition")
    await store.ensure_index(PENDING, "connection")
    await store.ensure_index(DEAD_LETTERS, "connection")
    await store.ensure_index(RUNS, "connection")
