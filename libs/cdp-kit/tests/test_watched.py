"""A watched JSON file (rotating tokens, write keys) that turns malformed while the service runs: the last
good content stays in force, the operator is told once, and callers don't pay for re-parsing it."""

from __future__ import annotations

import json
import logging
import os

from cdp_kit.watched import WatchedJsonFile


def write(path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))  # a distinct modification time, however coarse the clock


def test_a_file_gone_bad_keeps_the_last_good_content_is_said_once_and_parsed_once(tmp_path, caplog):
    path = tmp_path / "sources.json"
    write(path, json.dumps({"keys": ["first"]}), 1_000_000_000)
    parses = []

    def parse(document):
        parses.append(document)
        return list(document["keys"])

    watched = WatchedJsonFile(path, parse, variable="CDP_EXAMPLE_FILE")
    assert watched.value == ["first"]

    caplog.set_level(logging.WARNING, logger="cdp.watched")
    write(path, '{"keys": ["secret-value"', 2_000_000_000)  # cut short mid-rewrite
    for _ in range(100):
        assert watched.value == ["first"]
    [line] = [r for r in caplog.records if r.name == "cdp.watched"]
    assert (line.variable, line.path) == ("CDP_EXAMPLE_FILE", str(path))
    assert "secret-value" not in line.getMessage() + line.error

    write(path, json.dumps({"nokeys": ["secret-value"]}), 3_000_000_000)  # valid JSON, wrong shape
    for _ in range(100):
        assert watched.value == ["first"]
    assert len(parses) == 2  # the first file and this one: the cut-short one failed in the decoder
    assert len([r for r in caplog.records if r.name == "cdp.watched"]) == 2

    write(path, json.dumps({"keys": ["second"]}), 4_000_000_000)
    assert watched.value == ["second"]
