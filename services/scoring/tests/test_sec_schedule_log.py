"""A scheduled job's failure is logged by its type and place, never the exception's text.

The schedule runs training runs and realised-quality refreshes over profile's store: an exception from
them (numpy's "could not convert string to float: 'ada@example.com'", a store error quoting a key) says
what the code had in hand, and it went into the log line itself (`scheduled %s failed: %s`), where the
JSON formatter's withholding of exception messages (`cdp_kit.logging`) could not reach it."""

from __future__ import annotations

import asyncio
import io
import logging
import time

from cdp_kit.logging import JsonFormatter
from cdp_scoring.schedule import Cron, every
from cdp_testing.waiting import until

VALUE = "ada@example.com"


async def test_a_failed_scheduled_job_is_logged_without_the_exceptions_text():
    offset = 60 - time.time() % 60 - 0.2  # a moment before a minute starts: "every minute" is due at once
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("scoring"))
    logger = logging.getLogger("cdp.scoring.schedule")
    logger.addHandler(handler)

    async def job() -> None:
        raise ValueError(f"could not convert string to float: {VALUE!r}")

    task = asyncio.create_task(
        every(Cron.parse("* * * * *"), job, "training run of churn_risk", clock=lambda: time.time() + offset)
    )
    try:
        await until(lambda: "failed" in out.getvalue(), "the failure logged")
        line = out.getvalue()
        assert VALUE not in line
        assert "training run of churn_risk" in line and "ValueError" in line
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.removeHandler(handler)
