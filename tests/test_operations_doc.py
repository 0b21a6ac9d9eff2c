"""docs/operations.md names only what the code has: an on-call engineer copies its metric names, labels
and alert expressions into Prometheus, and a name that was renamed or never existed is an alert that can
never fire.

Checked against the sources (services/*/src, libs/*/src), read the way cdp-kit's test_metric_names.py
reads them:

- every instrument the code creates has a row in a metrics table, and every instrument a metrics table lists (`| \\`scraped\\` | \\`instrument\\` (unit) | labels | ...`) is created
  in the code, and its scraped name is the one the Prometheus exporter derives from its kind and unit;
- every Prometheus metric name anywhere on the page (tables, alert expressions, prose) is one the
  exporter derives from an instrument in the code, with a histogram's `_bucket`/`_sum`/`_count`;
- every label a table lists (names outside parentheses; values are inside) and every label an alert
  expression groups or matches on is an attribute key the code writes (dots become underscores), or one
  Prometheus adds (`le`, `job`);
- every failure-table row the page names (`row "..."`) is a row of docs/architecture.md's Failure
  behaviour table, by its first cell.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from cdp_testing.source import parse_file

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "operations.md"
ARCHITECTURE = REPO / "docs" / "architecture.md"

CREATE = re.compile(r"create_(observable_)?(counter|up_down_counter|histogram|gauge)$")
TABLE_ROW = re.compile(r"^\| `([a-z0-9_]+)` \| `([a-z0-9_.]+)` \(")
PROMETHEUS_NAME = re.compile(r"(?<![\w/.-])((?:cdp|rpc_server)_[a-z0-9_]+)\b")  # not in a path: src/cdp_kit/...
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# Labels Prometheus itself gives a series: a histogram's bucket bound, the scrape job.
PROMETHEUS_LABELS = {"le", "job"}


def sources() -> list[Path]:
    return sorted([*REPO.glob("services/*/src/**/*.py"), *REPO.glob("libs/*/src/**/*.py")])


def strings_of(node: ast.AST | None) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple):
        return [s for element in node.elts for s in strings_of(element)]
    return []


@cache
def code() -> tuple[dict[str, tuple[str, str]], frozenset[str]]:
    """The instruments created in the sources (name -> (create_* method, unit)), and the strings that can
    be attribute keys: the string keys of dict displays (`{"outcome": ...}`, how the code writes metric
    attributes) and the strings given a module-level name (`FEATURE, SCORE = "feature", "score"`, a key
    the code passes by name)."""
    instruments: dict[str, tuple[str, str]] = {}
    strings: set[str] = set()
    for path in sources():
        tree = parse_file(path)
        for statement in tree.body:
            if isinstance(statement, ast.Assign):
                strings.update(strings_of(statement.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                strings.update(s for key in node.keys for s in strings_of(key))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and CREATE.match(node.func.attr):
                arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
                unit = next((k.value for k in node.keywords if k.arg == "unit"), None)
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    instruments[arg.value] = (
                        node.func.attr,
                        unit.value if isinstance(unit, ast.Constant) and isinstance(unit.value, str) else "",
                    )
    return instruments, frozenset(strings)


@cache
def scraped_name(name: str, create: str, unit: str) -> str:
    """What the Prometheus exporter the services use calls this instrument (without histogram suffixes)."""
    registry = CollectorRegistry(auto_describe=True)
    meter = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)]).get_meter("doc")
    if create.startswith("create_observable_"):
        getattr(meter, create)(name, callbacks=[lambda _options: [Observation(1)]], unit=unit)
    else:
        instrument = getattr(meter, create)(name, unit=unit)
        if "counter" in create:
            instrument.add(1)
        elif create == "create_gauge":
            instrument.set(1)
        else:
            instrument.record(1)
    names = [
        line.split()[2]
        for line in generate_latest(registry).decode().splitlines()
        if line.startswith("# TYPE ") and line.split()[2] != "target_info"
    ]
    assert len(names) == 1, names
    return names[0]


def derived() -> dict[str, str]:
    """Scraped name -> instrument name, for every instrument in the code."""
    instruments, _ = code()
    return {scraped_name(name, create, unit): name for name, (create, unit) in instruments.items()}


def table_rows() -> list[tuple[int, str, str, str]]:
    """(line, scraped name, instrument name, labels cell) of each metrics table row."""
    rows = []
    for number, line in enumerate(DOC.read_text().splitlines(), 1):
        match = TABLE_ROW.match(line)
        if match:
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            rows.append((number, match.group(1), match.group(2), cells[2]))
    return rows


def outside_parentheses(text: str) -> str:
    kept, depth = [], 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            kept.append(char)
    return "".join(kept)


@cache
def attribute_names() -> frozenset[str]:
    """The possible attribute keys of the sources as Prometheus spells a label (`rpc.grpc.status` ->
    `rpc_grpc_status`)."""
    _, strings = code()
    return frozenset(s.replace(".", "_") for s in strings if re.fullmatch(r"[a-z][a-z0-9_.]*", s))


def known_label(label: str) -> bool:
    return label in PROMETHEUS_LABELS or label in attribute_names()


def test_every_table_row_names_an_instrument_of_the_code_by_its_scraped_name():
    instruments, _ = code()
    rows = table_rows()
    assert len(rows) >= 50, "the metrics tables were not found: their row format changed?"
    wrong = []
    for line, scraped, name, _labels in rows:
        if name not in instruments:
            wrong.append(f"line {line}: {name} is created nowhere in services/*/src or libs/*/src")
        elif scraped != (expected := scraped_name(name, *instruments[name])):
            wrong.append(f"line {line}: {name} is scraped as {expected}, not {scraped}")
    assert not wrong, "\n".join(wrong)


def test_every_instrument_of_the_code_has_a_table_row():
    """An instrument nobody documented is a metric on-call never learns to read."""
    instruments, _ = code()
    listed = {name for _line, _scraped, name, _labels in table_rows()}
    missing = sorted(set(instruments) - listed)
    assert not missing, f"instruments created in the code that docs/operations.md has no table row for: {missing}"


def test_every_prometheus_name_on_the_page_is_derived_from_the_code():
    names = derived()
    histograms = {s for s, name in names.items() if code()[0][name][0] == "create_histogram"}
    unknown = []
    for number, line in enumerate(DOC.read_text().splitlines(), 1):
        for token in PROMETHEUS_NAME.findall(line):
            base = next((token.removesuffix(x) for x in HISTOGRAM_SERIES if token.removesuffix(x) in histograms), token)
            if base not in names:
                unknown.append(f"line {number}: {token}")
    assert not unknown, "metric names no instrument in the code is scraped as:\n" + "\n".join(unknown)


def test_every_label_the_page_names_is_written_by_the_code():
    unknown = []
    for line, _scraped, name, labels in table_rows():
        for label in re.findall(r"`([^`]+)`", outside_parentheses(labels)):
            if not known_label(label):
                unknown.append(f"line {line} ({name}): label {label}")
    text = DOC.read_text()
    for group in re.findall(r"\bby \(([^)]*)\)", text):
        unknown += [f"by ({group}): {label}" for label in re.split(r",\s*", group.strip()) if not known_label(label)]
    for matchers in re.findall(r"[a-z0-9_]\{([^}]*)\}", text):
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers):
            if not known_label(label):
                unknown.append(f"{{{matchers}}}: {label}")
    assert not unknown, "labels the code never writes:\n" + "\n".join(unknown)


def failure_rows() -> set[str]:
    text = ARCHITECTURE.read_text()
    section = text.split("\n## Failure behaviour\n", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| what dies") and not line.startswith("|---"):
            rows.add(line.strip().strip("|").split(" | ")[0].strip())
    return rows


def test_every_failure_row_the_page_names_is_in_the_architecture_table():
    rows = failure_rows()
    assert "one poisonous message" in rows, "the Failure behaviour table of architecture.md was not found"
    named = {" ".join(words.split()) for words in re.findall(r"\b[Rr]ow \"([^\"]+)\"", DOC.read_text())}
    assert len(named) >= 5, "the page names no failure rows: their format changed?"
    missing = sorted(named - rows)
    assert not missing, f"rows named in docs/operations.md that architecture.md's Failure behaviour lacks: {missing}"


def test_the_checks_catch_what_they_are_for():
    """A renamed instrument, a wrong suffix, a made-up label and a misnamed row are each found."""
    instruments, _ = code()
    assert scraped_name("cdp.bus.handle.duration", *instruments["cdp.bus.handle.duration"]) == (
        "cdp_bus_handle_duration_milliseconds"
    )
    assert "cdp_collector_events_total" in derived() and "cdp_collector_events" not in derived()
    assert known_label("rpc_grpc_status") and known_label("outcome") and not known_label("no_such_label_anywhere")
    assert outside_parentheses("`outcome` (`stored`, `failed` (x)), `stream`") == "`outcome` , `stream`"
    assert "nats-server" in failure_rows() and "nats server" not in failure_rows()
