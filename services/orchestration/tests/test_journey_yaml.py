"""Journey YAML reads `on`, `off`, `yes`, `no`, `y` and `n` as the words they are: the documented segment
entry `entry: {segment: x, on: entered}` is written without quotes (YAML 1.1 would make the key `on` the
boolean true and refuse the journey with `entry[True]: unknown key here`); `true` and `false` stay booleans."""

from __future__ import annotations

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_orchestration.domain.document import load_journey
from cdp_orchestration.domain.journey import SegmentEntry
from cdp_orchestration.messages import read_definition

JOURNEY = """
id: vip-welcome
version: 1
name: Off we go
priority: 10
category: offer
timezone: UTC
entry: {segment: vip, on: entered}
reentry: always
nodes:
  - id: hello
    type: action
    channel: inapp
    purpose: Marketing
    approval: true
    template: {title: yes, body: no}
"""


def test_a_segment_entry_written_without_quotes_is_read_as_documented():
    journey = load_journey(JOURNEY, form="yaml")
    assert isinstance(journey.entry, SegmentEntry)
    assert journey.entry.segment == "vip" and journey.entry.on == "entered"
    assert journey.name == "Off we go"


def test_the_service_reads_the_same_words_as_strings_and_true_as_a_boolean():
    document = read_definition(pb.JourneyDefinition(yaml=JOURNEY))
    assert document["entry"] == {"segment": "vip", "on": "entered"}
    [node] = document["nodes"]
    assert node["approval"] is True
    assert node["template"] == {"title": "yes", "body": "no"}
    exited = read_definition(pb.JourneyDefinition(yaml="entry: {segment: vip, on: exited}\nflag: False\nx: off"))
    assert exited == {"entry": {"segment": "vip", "on": "exited"}, "flag": False, "x": "off"}
