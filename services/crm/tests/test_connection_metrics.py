"""What an operator alerts on while a CRM is down: the connection's state and its failed requests, as
metrics (the trial found only `cdp_crm_records_total` going flat during a 104 s outage)."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cdp_crm.delivery import Deliverer
from cdp_crm.domain.isolation import AUTH, UNAVAILABLE, CrmError


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple, float]:
    found = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        found[tuple(sorted(point.attributes.items()))] = point.value
    return found


def test_a_connection_that_fails_shows_its_state_and_counts_its_failed_requests():
    reader = InMemoryMetricReader()
    deliverer = Deliverer({"hs": object(), "sf": object()}, {})
    deliverer.observe(MeterProvider(metric_readers=[reader]).get_meter("test"))
    deliverer._note_failure("hs", CrmError(UNAVAILABLE, "http_503", "down"))
    deliverer._note_failure("hs", CrmError(UNAVAILABLE, "http_503", "down"))
    deliverer._note_failure("sf", CrmError(AUTH, "INVALID_SESSION_ID", "expired"))
    states = points(reader, "cdp.crm.connection.state")
    assert states[(("connection", "hs"), ("state", "unavailable"))] == 1
    assert states[(("connection", "hs"), ("state", "active"))] == 0
    assert states[(("connection", "sf"), ("state", "auth_failed"))] == 1
    failures = points(reader, "cdp.crm.request.failures")
    assert failures == {(("connection", "hs"), ("reason", UNAVAILABLE)): 2, (("connection", "sf"), ("reason", AUTH)): 1}
