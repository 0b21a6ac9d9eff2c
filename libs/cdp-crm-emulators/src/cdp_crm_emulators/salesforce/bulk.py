"""Bulk API 2.0 ingest jobs: create, upload CSV, UploadComplete, poll, successful/failed/unprocessed results.

A job is Open until UploadComplete, then InProgress while a background task applies its rows (yielding to
the event loop every few thousand rows so a million-row backfill does not stall the API), then JobComplete.
Each row succeeds or fails on its own (``sf__Error`` carries ``CODE:message``); an Aborted job leaves its
remaining rows unprocessed. Empty CSV cells leave a field unchanged and ``#N/A`` clears it, as in Salesforce;
a ``Relationship.ExternalId__c`` column points a reference at a record by its external id.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OPERATIONS = {"insert", "update", "upsert", "delete"}
DELIMITERS = {"COMMA": ",", "TAB": "\t", "PIPE": "|", "SEMICOLON": ";", "CARET": "^", "BACKQUOTE": "`"}
_YIELD_EVERY = 2000


@dataclass
class IngestJob:
    id: str
    object: str
    operation: str
    external_id_field: str | None
    delimiter: str
    line_ending: str
    created: str
    api_version: str
    state: str = "Open"
    data: list[bytes] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    successful: list[list[str]] = field(default_factory=list)
    failed: list[list[str]] = field(default_factory=list)
    unprocessed: list[list[str]] = field(default_factory=list)
    processed: int = 0
    error_message: str | None = None
    modstamp: str = ""

    def info(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "operation": self.operation,
            "object": self.object,
            "createdById": "005Dp0000000001AAA",
            "createdDate": self.created,
            "systemModstamp": self.modstamp or self.created,
            "state": self.state,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": float(self.api_version),
            "jobType": "V2Ingest",
            "contentUrl": f"services/data/v{self.api_version}/jobs/ingest/{self.id}/batches",
            "lineEnding": self.line_ending,
            "columnDelimiter": next(k for k, v in DELIMITERS.items() if v == self.delimiter),
            "numberRecordsProcessed": self.processed,
            "numberRecordsFailed": len(self.failed),
            "retries": 0,
            "totalProcessingTime": 0,
            "apiActiveProcessingTime": 0,
            "apexProcessingTime": 0,
        }
        if self.external_id_field:
            body["externalIdFieldName"] = self.external_id_field
        if self.error_message:
            body["errorMessage"] = self.error_message
        return body

    def results_csv(self, kind: str) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if kind == "successfulResults":
            writer.writerow(["sf__Id", "sf__Created", *self.columns])
            writer.writerows(self.successful)
        elif kind == "failedResults":
            writer.writerow(["sf__Id", "sf__Error", *self.columns])
            writer.writerows(self.failed)
        else:
            writer.writerow(self.columns)
            writer.writerows(self.unprocessed)
        return out.getvalue()


# Applies one row: (object, operation, values, external id field) -> (record id, created) or (None, error text).
RowWriter = Callable[[str, str, dict[str, Any], str | None], tuple[str | None, bool | str]]


async def process(job: IngestJob, write_row: RowWriter, stamp: Callable[[], str]) -> None:
    job.state = "InProgress"
    text = b"".join(job.data).decode("utf-8-sig")
    job.data.clear()
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=job.delimiter)
    header = next(rows, None)
    if not header:
        job.state, job.error_message = "Failed", "InvalidBatch : Field name not found"
        return
    job.columns = header
    for n, row in enumerate(rows, start=1):
        if job.state == "Aborted":
            job.unprocessed.append(row)
            continue
        if n % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        values = _values(header, row)
        record_id, outcome = write_row(job.object, job.operation, values, job.external_id_field)
        job.processed += 1
        if record_id is None:
            job.failed.append(["", str(outcome), *row])
        else:
            job.successful.append([record_id, "true" if outcome is True else "false", *row])
    if job.state != "Aborted":
        job.state = "JobComplete"
    job.modstamp = stamp()


def _values(header: list[str], row: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, cell in zip(header, row, strict=False):
        if cell == "":
            continue
        value = None if cell == "#N/A" else cell
        if "." in name:
            relationship, external_field = name.split(".", 1)
            values[relationship] = {external_field: value}
        else:
            values[name] = value
    return values
