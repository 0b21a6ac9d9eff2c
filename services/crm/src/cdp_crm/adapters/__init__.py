"""One adapter per CRM: its documented bulk endpoints, its auth, its answers turned into per-record results.

Every adapter offers the same calls (`Adapter`), so the engine never branches on the CRM:

- `describe(objects)` -> the CRM's own schema of those objects (`mapping.ObjectSchema`: fields, which are
  keys, which are read-only), for validating mappings at start; None when the adapter cannot describe
  (then that connection's mappings are validated without a schema - never with an empty one);
- `cost(mapping, n, op=UPSERT)` -> the budget units sending `n` changes of `mapping` will take (requests,
  or credits), reserved before `send`; `op` is the batch's operation (a delete may take a lookup first);
- `send(mapping, changes)` -> a `BatchOutcome`: per-record results keyed by `Change.record`, or one error
  for the whole request, plus the answer's rate-limit headers for `Budget.observe`. At most `batch_limit`
  changes per call. `send` never raises for what the CRM or the network does: a refusal, a 429, a 5xx, a
  timeout or a connection dropped after the CRM committed all come back as outcomes (`isolation`'s
  reasons), so the engine decides what to retry. Changes whose `op` is DELETE (a privacy erasure under the
  `delete` policy) delete the records they name by their match key with the CRM's own delete; a record
  already gone is a success, so a retry changes nothing.

Writes are upserts by the mapping's match key (tasks and cases by their idempotency key), so sending the
same changes again after an ANSWER_LOST outcome converges to the same records: it never duplicates.
Credentials arrive as values (the service reads the environment variables the mapping names); they are
sent to the CRM and never logged, nor is any field value.
"""

from __future__ import annotations

from typing import Protocol

from cdp_crm.domain.coalesce import UPSERT, Change
from cdp_crm.domain.isolation import BatchOutcome
from cdp_crm.domain.mapping import CrmSchema, ObjectMapping


class Adapter(Protocol):
    kind: str
    batch_limit: int

    async def describe(self, objects: list[str]) -> CrmSchema | None: ...

    def cost(self, mapping: ObjectMapping, n: int, op: str = UPSERT) -> int: ...

    async def send(self, mapping: ObjectMapping, changes: list[Change]) -> BatchOutcome: ...

    async def close(self) -> None: ...
