"""What a service's /metrics page holds per series: its own attributes, nothing repeated on every line.

The Prometheus exporter labels every line with the instrumentation scope by default (`otel_scope_name`,
`_version`, `_schema_url`): each service has one meter (`cdp.<service>`), so those labels say what the
scrape target already says, and made up ~40 % of a profile replica's 400 KB page. Run in a process of
its own: the exporter registers with prometheus_client's global registry."""

from __future__ import annotations

import subprocess
import sys

from cdp_kit.natsserver import free_port

SCRAPE = """
import sys, urllib.request
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, setup_telemetry

port = int(sys.argv[1])
telemetry = setup_telemetry("toy", metrics_port=port)
telemetry.meter.create_histogram(
    "cdp.toy.work.duration", unit="ms", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS
).record(3.0, {"service": "toy"})
telemetry.meter.create_counter("cdp.toy.things", unit="{thing}").add(2, {"kind": "a"})
page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
telemetry.shutdown()
print(page)
"""


def test_metric_lines_carry_their_own_attributes_only():
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-c", SCRAPE, str(port)], capture_output=True, text=True, timeout=60, check=True
    )
    page = done.stdout
    histogram = [line for line in page.splitlines() if line.startswith("cdp_toy_work_duration_milliseconds")]
    counter = [line for line in page.splitlines() if line.startswith("cdp_toy_things_total")]
    assert 'cdp_toy_work_duration_milliseconds_count{service="toy"} 1.0' in histogram
    assert 'cdp_toy_work_duration_milliseconds_bucket{le="5",service="toy"} 1.0' in histogram
    assert counter == ['cdp_toy_things_total{kind="a"} 2.0']
    assert "otel_scope" not in page
