"""Every metric follows one naming convention (see `cdp_kit.telemetry`): `cdp.<service>.<thing>`, dotted,
the unit in `unit=` rather than in the name, no `_total`; and what Prometheus scrapes is derived from it.

Reads each instrument created in services/*/src and libs/*/src (the name passed to `create_counter`,
`create_histogram`, ...)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from cdp_testing.source import parse_file

REPO = Path(__file__).resolve().parents[3]

# Services still being changed by their owners to the convention. Each owner removes their entry when done.
PENDING_RENAME: tuple[str, ...] = ()

#: OpenTelemetry semantic-convention instruments keep their standard names.
SEMANTIC_CONVENTIONS = {"rpc.server.duration"}
CREATE = re.compile(r"create_(observable_)?(counter|up_down_counter|histogram|gauge)$")
DOTTED = re.compile(r"^cdp(\.[a-z][a-z0-9_]*){2,}$")
UNIT_IN_NAME = re.compile(r"(_total|_ms|_seconds|_milliseconds|_bytes|_count)$")


def instruments(path: Path) -> list[tuple[int, str | None, ast.Call]]:
    found = []
    for node in ast.walk(parse_file(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and CREATE.match(node.func.attr):
            arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
            found.append((node.lineno, name, node))
    return found


def problems(rel: str, name: str | None, call: ast.Call) -> list[str]:
    if name is None:
        return ["the name is not a string literal (write it out, so it can be found by grep)"]
    if name in SEMANTIC_CONVENTIONS:
        return []
    out = []
    if not DOTTED.match(name):
        out.append("not dotted lower case cdp.<service>.<thing>")
    if UNIT_IN_NAME.search(name):
        out.append("a unit or _total in the name (put the unit in unit=; the exporter adds _total)")
    parts = rel.split("/")
    if parts[0] == "services" and not name.startswith(f"cdp.{parts[1]}."):
        out.append(f"a {parts[1]} metric must start with cdp.{parts[1]}.")
    if call.func.attr.endswith("histogram") and not any(k.arg == "unit" for k in call.keywords):  # type: ignore[attr-defined]
        out.append("a histogram without unit=")
    return out


def test_every_instrument_follows_the_convention():
    wrong = []
    for path in sorted([*REPO.glob("services/*/src/**/*.py"), *REPO.glob("libs/*/src/**/*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(PENDING_RENAME):
            continue
        for line, name, call in instruments(path):
            wrong += [f"{rel}:{line}: {name!r}: {problem}" for problem in problems(rel, name, call)]
    assert not wrong, "metric names off the convention in cdp_kit.telemetry:\n" + "\n".join(wrong)


def test_pending_services_still_need_their_entry():
    """An entry that no longer hides anything is stale: remove it so the service stays checked."""
    stale = []
    for folder in PENDING_RENAME:
        found = [
            problem
            for path in REPO.glob(f"{folder}src/**/*.py")
            for _, name, call in instruments(path)
            for problem in problems(path.relative_to(REPO).as_posix(), name, call)
        ]
        if not found:
            stale.append(folder)
    assert not stale, f"remove from PENDING_RENAME, they follow the convention now: {stale}"


def test_the_check_catches_the_old_style(tmp_path):
    rel = "services/identity/src/cdp_identity/engine.py"
    sample = tmp_path / "engine.py"
    sample.write_text(
        'a = meter.create_counter("cdp_identity_events_total")\n'
        'b = meter.create_histogram("cdp.identity.batch.apply")\n'
        'c = meter.create_counter("cdp.profile.events", unit="{event}")\n'
        'd = meter.create_counter("cdp.identity.events", unit="{event}")\n'
    )
    found = {line: problems(rel, name, call) for line, name, call in instruments(sample)}
    assert len(found[1]) == 3 and found[2] == ["a histogram without unit="] and found[4] == []
    assert found[3] == ["a identity metric must start with cdp.identity."]


def test_prometheus_scrapes_the_derived_names():
    """What dashboards and alerts must query for a name written by the convention."""
    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    meter.create_counter("cdp.collector.events", unit="{event}").add(1, {"outcome": "stored"})
    meter.create_histogram("cdp.bus.handle.duration", unit="ms").record(3)
    scraped = generate_latest(registry).decode()
    assert "cdp_collector_events_total{" in scraped and 'outcome="stored"' in scraped
    assert "cdp_bus_handle_duration_milliseconds_bucket{" in scraped
