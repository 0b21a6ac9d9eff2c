"""The CRM connector's domain: mappings, coalescing, budgets, batch isolation. No I/O here; time is passed in.

The contract the service layer (engine, inbound, gRPC) builds on:

1. Start-up: `mapping.load_connections(text, schemas, form=...)` reads the connections document (JSON or
   YAML); `schemas` are what each connection's adapter describes (`adapters.*.describe()`), so an unknown
   object or field fails start-up with `MappingInvalid` naming "<connection>/<mapping>" and the field.
   Credentials are environment variable names; the service reads the variables, the domain never does.
2. A trigger for a person (`profiles.changed` touching `projection.reads(m)`, `segments.entered/exited`,
   `actions.crm`, a backfill page) becomes, per mapping listening to it, `projection.project(m, Source(...))`:
   a `Projection` (match key + fields) or `Skipped` (no match key value: counted, not an error). The
   service keeps the last projection written per record (record status) and sends only
   `projection.changed_fields(last, current)`; nothing changed, no call. A person out of the mapping's
   segment (`in_scope` false) is, in mirror mode, `projection.cleared(m, source)` sent as a REMOVE
   (list membership removed, or the record's mapped fields cleared) and nothing otherwise.
   An actions.crm message (cdp.orchestration.v1.ActionMessage) feeds the action mappings whose `action`
   equals its `crm_kind`, as `Source(action={"id": action_id, "category": ..., "journey_id": ...,
   "signals": "name: value" lines, **content})`; its idempotency key comes from the action id.
3. Changes go into a `coalesce.Coalescer` per connection and batch window: one `Change` per record, each
   field at its latest value. `coalesce.record_key` names a record in status, metrics and dead letters;
   `coalesce.task_key` is a task's or case's idempotency key (derived from the action id, stable across
   restarts and replicas).
4. Before each request: `budget.Budget.reserve(cost, now)` on the account's budget (state loaded from and
   stored to the shared store under compare-and-set, so every replica and sync shares it); not granted
   means wait until `wait_until`. Size batches so their cost fits the budget's burst (a request that
   could never fit raises ValueError rather than waiting forever). After it: `observe(outcome.headers, now)`, and `throttled(...)` for a
   THROTTLED outcome (its `retry_after` / `daily`).
5. Each batch is delivered through `isolation.Isolation`: the adapter sends `next_batch()` and returns a
   `BatchOutcome`; `record()` splits whole-batch rejections until bad records are alone; `synced` feed
   record status, `dead` are stored by record key (listed, replayed with `DeadLetter.replay()`), `retry`
   batches are re-sent unchanged once the budget and back-off allow - never dropped, never dead-lettered.
   An acknowledgement to the bus comes only after every change of the batch is synced, dead-lettered or
   durably queued for retry, so a crash re-delivers instead of losing; the re-delivery is an upsert by the
   same key and changes nothing.
"""
